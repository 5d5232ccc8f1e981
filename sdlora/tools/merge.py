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

from ..files.reduce import Reduction, Update, reduce
from ..files.safetensors import SAVE_DTYPES, check_output, recorded_targets, write_adapter
from ..errors import AdapterFileError, ConfigError, FamilyMismatch
from ..base_models.families import Family
from ..files.standalone import (AdapterModules, kohya_state_dict, output_metadata, read_modules,
                           widest_dtype, with_original_unet_names)
from ..files.layouts import ModuleTensors
from ..adapters.kinds import standalone_update
from ..files.lowrank import Factored, lora_factors, with_common_alpha


# Every conv with a kernel in a Stable Diffusion UNet is 3x3: the resnets' conv1/conv2, the resamplers,
# conv_in and conv_out (the shortcuts and the transformers' proj_in/proj_out are 1x1).
_KERNEL_3X3 = ("conv1", "conv2", "_conv", "_op", "conv_in", "conv_out")


def module_update(weights, name: str = "") -> Update:
    """A module's whole update: a plain LoRA as its factors; a LyCORIS kind (LoHa, LoKr, Tucker, full)
    as the full update its tensors make (DoRA's rescaling needs the base weight and is refused)."""
    if weights.kind == "lora":  # kept as factors, so that merging LoRAs is exact
        return lora_factors(weights)
    if "dora_scale" in weights.tensors:
        raise AdapterFileError(f"{name}: DoRA rescales the base model's weight, so its update cannot be known from "
                               "the file alone: merge it into a model with --into, or load it as it is")
    if "diff_b" in weights.tensors:
        raise AdapterFileError(f"{name}: a full adapter that also changes the bias (diff_b), which no LoRA can "
                               "hold: merge it into a model with --into, or load it as it is")
    update = standalone_update(weights.tensors, weights.alpha)
    if update.dim() == 2 and name.endswith(_KERNEL_3X3) and "shortcut" not in name and update.shape[1] % 9 == 0:
        update = update.reshape(update.shape[0], update.shape[1] // 9, 3, 3)  # LoHa/LoKr store kernels flat
    return update


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


def output_dtype(name: str | None, inputs: list[AdapterModules]) -> torch.dtype:
    """The dtype asked for, else the inputs' own: no precision is lost or invented unasked."""
    if name is None:
        return widest_dtype([adapter.dtype for adapter in inputs])
    if name not in SAVE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {name!r}")
    return SAVE_DTYPES[name]


def common_family(inputs: list[AdapterModules]) -> Family | None:
    """The one family the files are for; refuse files of two families."""
    stated = [adapter for adapter in inputs if adapter.family is not None]
    for other in stated[1:]:
        if other.family is not stated[0].family:
            raise FamilyMismatch(f"{stated[0].path} is an adapter for {stated[0].family.title} but {other.path} is "
                                 f"for {other.family.title}: only adapters of one model family can be merged")
    return stated[0].family if stated else None


def paired_names(inputs: list[AdapterModules], family: Family | None) -> list[AdapterModules]:
    """The inputs with one UNet naming. Files that name UNet modules by diffusers' blocks and files that
    use the original layout pair up for a family kohya names by that layout (SDXL base, whose layout is
    known); otherwise nothing without a model says which modules are the same, and the merge is refused."""
    named = [adapter for adapter in inputs if adapter.unet_naming is not None]
    if len({adapter.unet_naming for adapter in named}) <= 1:
        return inputs
    if family is not None and family.sgm_unet_names:
        renamed = [with_original_unet_names(a, family) if a.unet_naming == "diffusers" else a for a in inputs]
        if all(adapter is not None for adapter in renamed):
            return renamed
    first = named[0]
    other = next(adapter for adapter in named if adapter.unet_naming != first.unet_naming)
    raise AdapterFileError(
        f"{first.path} names UNet modules by the {first.unet_naming} layout and {other.path} by the "
        f"{other.unet_naming} one: without a model sdlora cannot pair their modules. Bake both into the "
        "model instead (sdlora merge ... --into MODEL)")


def _check_shapes(name: str, parts: list[tuple[AdapterModules, Update, float]]) -> None:
    first_file, first, _ = parts[0]
    for adapter, update, _ in parts[1:]:
        if _flat_shape(tuple(update.shape)) != _flat_shape(tuple(first.shape)):
            raise AdapterFileError(f"{name} has a weight of shape {list(first.shape)} in {first_file.path} but "
                                   f"{list(update.shape)} in {adapter.path}: the files are for different models")


def merge_files(sources: list[tuple[Path, float]], output: Path, rank: int | None = None,
                dtype: str | None = None) -> Reduction | None:
    """Write one adapter equal to sum_i w_i * file_i; exact without `rank`, else SVD-truncated.

    Returns the truncation report (None when exact). Modules present in only some files are kept.
    """
    check_output(output)
    if not sources:
        raise ConfigError("give at least one adapter file to merge")
    inputs = [read_modules(path) for path, _ in sources]
    family = common_family(inputs)
    inputs = paired_names(inputs, family)
    names = list(dict.fromkeys(name for adapter in inputs for name in adapter.modules))
    updates: dict[str, Update] = {}
    for name in names:
        parts = [(adapter, module_update(adapter.modules[name], name), weight)
                 for adapter, (_, weight) in zip(inputs, sources) if name in adapter.modules]
        _check_shapes(name, parts)
        updates[name] = weighted_sum([(update, weight) for _, update, weight in parts])
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
                dtype: str | None = None) -> Reduction:
    """Write `path` at a lower rank (one rank for all modules, or per module by kept energy)."""
    check_output(output)
    source = read_modules(path)
    updates = {name: module_update(weights, name) for name, weights in source.modules.items()}
    modules, report = reduce(updates.items(), rank=rank, energy=energy, desc="resize", total=len(updates))
    record = {"resized_from": Path(path).name, "resize": f"rank {rank}" if rank is not None else f"energy {energy}",
              "targets": recorded_targets(source.metadata)}
    modules = with_common_alpha(modules)
    metadata = output_metadata(modules, source.family, output.stem, source.metadata, record)
    write_adapter(output, kohya_state_dict(modules, output_dtype(dtype, [source])), metadata)
    return report


def parse_weighted(value: str, default: float = 1.0) -> tuple[Path, float]:
    """`FILE:WEIGHT` -> (FILE, WEIGHT); a FILE alone gets `default`. Only a number after the last
    colon is a weight, so a path with colons in it still works."""
    head, colon, tail = value.rpartition(":")
    if colon:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(value), default

