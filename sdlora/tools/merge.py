"""Merging adapter files into one, and resizing one to a lower rank.

Merging is exact by concatenation along the rank: sum_i w_i up_i down_i s_i is the product of
[w_1 s_1 up_1, w_2 s_2 up_2, ...] and [down_1; down_2; ...], a LoRA of rank sum_i r_i with scale 1.
With a rank, and for resizing, each module's update is decomposed by SVD and truncated
(`lowrank`). Everything here works on what a module's update is (`module_update`), so adapter
kinds other than plain LoRA only need to provide their full update.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.kinds import standalone_update
from ..base_models.families import Family
from ..errors import AdapterFileError, ConfigError, FamilyMismatch
from ..files.layouts import ModuleTensors
from ..files.lowrank import Factored, lora_factors, with_common_alpha
from ..files.names import kohya_name
from ..files.reduce import Reduction, Update, reduce
from ..files.safetensors import SAVE_DTYPES, check_output, recorded_targets, write_adapter
from ..files.derived import kohya_state_dict, output_metadata, widest_dtype
from ..files.standard import ReadFile, open_against, read_against


def module_update(read: ReadFile, key: str) -> Update:
    """A module's whole update, in its layer's weight shape: a plain LoRA as its factors; a LyCORIS kind
    (LoHa, LoKr, Tucker, full) as the full update its tensors make (DoRA's rescaling needs the base weight
    and is refused). Refused too when it does not fit the layer of the model the file was read against."""
    weights = read.modules[key]
    if weights.kind == "lora":  # kept as factors, so that merging LoRAs is exact
        update = lora_factors(weights)
        read.check_fits(key, tuple(update.shape))
        return Factored(update.up, update.down, tuple(read.weight_shape(key)))  # a 1x1 conv's LoRA may be 2-d
    if "dora_scale" in weights.tensors:
        raise AdapterFileError(f"{read.path}: {key}: DoRA rescales the base model's weight, so its update cannot "
                               "be known from the file alone: merge it into a model with --into, or load it as it is")
    if "diff_b" in weights.tensors:
        raise AdapterFileError(f"{read.path}: {key}: a full adapter that also changes the bias (diff_b), which no "
                               "LoRA can hold: merge it into a model with --into, or load it as it is")
    update = standalone_update(weights.tensors, weights.alpha)
    read.check_fits(key, tuple(update.shape))
    return update.reshape(read.weight_shape(key))  # LoHa and LoKr store a conv's kernel flat


def _flat_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def weighted_sum(parts: list[tuple[Update, float]]) -> Update:
    """sum_i w_i * update_i, kept factored (concatenated along the rank) when every part is."""
    shape = parts[0][0].shape
    if all(isinstance(update, Factored) for update, _ in parts):
        up = torch.cat([update.up * weight for update, weight in parts], dim=1)
        down = torch.cat([update.down for update, _ in parts], dim=0)
        return Factored(up, down, tuple(shape))
    total = torch.zeros(_flat_shape(tuple(shape)))
    for update, weight in parts:
        full = update.full() if isinstance(update, Factored) else update
        total += weight * full.reshape(total.shape)
    return total.reshape(shape)


def as_lora(update: Factored) -> ModuleTensors:
    """A factored update as LoRA tensors in the layer's layout, alpha = rank (scale 1)."""
    rank = update.up.shape[1]
    if len(update.shape) == 4:
        return ModuleTensors.lora(update.down.reshape(rank, *update.shape[1:]),
                                  update.up.reshape(update.shape[0], rank, 1, 1), float(rank))
    return ModuleTensors.lora(update.down, update.up, float(rank))


# ---------------------------------------------------------------- files


def output_dtype(name: str | None, inputs: list[ReadFile]) -> torch.dtype:
    """The dtype asked for, else the inputs' own: no precision is lost or invented unasked."""
    if name is None:
        return widest_dtype([tensor.dtype for read in inputs for weights in read.modules.values()
                             for tensor in weights.tensors.values()])
    if name not in SAVE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


def common_family(inputs: list[ReadFile]) -> Family:
    """The one family the files are for; refuse files of two families."""
    first = inputs[0]
    for other in inputs[1:]:
        if other.family is not first.family:
            raise FamilyMismatch(f"{first.path} is an adapter for {first.family.title} but {other.path} is "
                                 f"for {other.family.title}: only adapters of one model family can be merged")
    return first.family


def kohya_names(read: ReadFile, updates: dict[str, Update]) -> dict[str, Update]:
    """Updates by module key -> by the kohya name the output file gives them (the original UNet layout for a
    family kohya names that way), which every reader takes; reports name modules so too."""
    return {kohya_name(read.family, key, read.original): update for key, update in updates.items()}


def merge_files(sources: list[tuple[Path, float]], output: Path, rank: int | None = None,
                dtype: str | None = None, model=None) -> Reduction | None:
    """Write one adapter equal to sum_i w_i * file_i; exact without `rank`, else SVD-truncated.

    Every file is read against `model` (a pipeline) or its family's standard architecture, so modules
    pair by the layer they adapt, whatever layout or UNet naming each file uses. Returns the truncation
    report (None when exact). Modules present in only some files are kept.
    """
    check_output(output)
    if not sources:
        raise ConfigError("give at least one adapter file to merge")
    inputs = [open_against(path, model) for path, _ in sources]
    family = common_family(inputs)
    inputs = [read_against(read, doing="the merge") for read in inputs]
    keys = list(dict.fromkeys(key for read in inputs for key in read.modules))
    updates: dict[str, Update] = {}
    for key in keys:
        parts = [(module_update(read, key), weight) for read, (_, weight) in zip(inputs, sources)
                 if key in read.modules]
        updates[key] = weighted_sum(parts)
    updates = kohya_names(inputs[0], updates)
    if rank is None:
        not_factored = [name for name, update in updates.items() if not isinstance(update, Factored)]
        if not_factored:
            raise AdapterFileError(f"{not_factored[0]} is not a plain LoRA in every file, so the merge cannot be "
                                   "exact: give --rank R to merge by SVD")
        modules = {name: as_lora(update) for name, update in tqdm(updates.items(), desc="merge", unit="module")}
        report = None
    else:
        modules, report = reduce(updates.items(), rank=rank, desc="merge (SVD)", total=len(updates))
    record = {"merged_from": [{"file": path.name, "weight": weight} for path, weight in sources],
              "merge": "concatenated" if rank is None else f"svd rank {rank}"}
    modules = with_common_alpha(modules)
    metadata = output_metadata(modules, family, output.stem, inputs[0].metadata, record)
    write_adapter(output, kohya_state_dict(modules, output_dtype(dtype, inputs)), metadata)
    return report


def resize_file(path: Path, output: Path, rank: int | None = None, energy: float | None = None,
                dtype: str | None = None, model=None) -> Reduction:
    """Write `path` at a lower rank (one rank for all modules, or per module by kept energy), read against
    `model` (a pipeline) or its family's standard architecture."""
    check_output(output)
    source = read_against(path, model, doing="the resize")
    updates = kohya_names(source, {key: module_update(source, key) for key in source.modules})
    modules, report = reduce(updates.items(), rank=rank, energy=energy, desc="resize", total=len(updates))
    record = {"resized_from": Path(path).name, "resize": f"rank {rank}" if rank is not None else f"energy {energy}",
              "targets": recorded_targets(source.metadata)}
    modules = with_common_alpha(modules)
    metadata = output_metadata(modules, source.family, output.stem, source.metadata, record)
    write_adapter(output, kohya_state_dict(modules, output_dtype(dtype, [source])), metadata)
    return report


