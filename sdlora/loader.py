"""Attaching adapters to a pipeline: load, strength, stack, fuse, unload, and save."""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

import torch
from torch import nn

from .files.safetensors import SAVE_DTYPES, build_metadata, read_adapter, recorded_targets, write_adapter
from .files.layouts import (ModuleTensors, describe_unsupported, group_tensors, module_key_of, parse_state_dict,
                            split_tensor_name, to_kohya)
from .errors import AdapterFileError, FamilyMismatch
from .base_models.families import FAMILIES, detect_family, family_from_tensors, family_named_in_metadata
from .base_models.module_keys import TEXT_ENCODERS, module_key
from .files.names import component_of_file_key, kohya_index
from .adapters.lora import LoRA, AdaptedLayer
from .adapters.kinds import build_adapter, is_whole, standalone_update
from .adapters.lycoris import DoRA
from .base_models.parts import components, native_resolution, unet_block_counts
from .base_models.sgm import to_original, unet_module_map
from .adapters.block_weights import block_id, is_block_weights, sort_blocks
from .adapters.strength import Strength, Window, check_strength, check_window, in_window, layer_strengths
from .adapters.targets import adaptable_modules, patterns_for, select

logger = logging.getLogger("sdlora")
_REGISTRY = "_sdlora_adapters"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class AdapterInfo:
    """What `list_adapters` reports about one loaded adapter."""

    name: str
    source: str  # the file it came from, or "new" for an adapter made to be trained
    strength: Strength
    family: str
    layout: str
    modules: dict[str, int] = field(default_factory=dict)  # component -> adapted layers
    ranks: dict[str, list[int]] = field(default_factory=dict)  # component -> distinct ranks
    targets: dict[str, list[str]] = field(default_factory=dict)  # component -> patterns, for new adapters
    kinds: dict[str, int] = field(default_factory=dict)  # adapter kind (lora, loha, lokr+dora, ...) -> layers
    fused: bool = False


# ---------------------------------------------------------------- bookkeeping on the modules


def _registry(module: nn.Module) -> dict[str, AdapterInfo]:
    if not hasattr(module, _REGISTRY):
        object.__setattr__(module, _REGISTRY, {})
    return getattr(module, _REGISTRY)


def _infos(parts: dict[str, nn.Module]) -> dict[str, AdapterInfo]:
    infos: dict[str, AdapterInfo] = {}
    for module in parts.values():
        infos.update(_registry(module))
    return infos


def _layers(parts: dict[str, nn.Module]):
    """(component, path, wrapper) for every adapted layer."""
    for component, model in parts.items():
        for path, module in model.named_modules():
            if isinstance(module, AdaptedLayer):
                yield component, path, module


def _require_loaded(parts: dict[str, nn.Module], name: str) -> AdapterInfo:
    infos = _infos(parts)
    if name not in infos:
        loaded = ", ".join(infos) or "none"
        raise KeyError(f"no adapter named {name!r} is loaded (loaded: {loaded})")
    return infos[name]


def _check_new_name(parts: dict[str, nn.Module], name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"adapter name {name!r} may hold only letters, digits, '_' and '-'")
    if name in _infos(parts):
        raise ValueError(f"an adapter named {name!r} is already loaded: unload it first or pick another name")


def _wrap(model: nn.Module, path: str) -> AdaptedLayer:
    """The AdaptedLayer at `path`, putting one in place of the plain layer if needed."""
    layer = model.get_submodule(path)
    if isinstance(layer, AdaptedLayer):
        return layer
    parent_path, _, child = path.rpartition(".")
    wrapper = AdaptedLayer(layer)
    setattr(model.get_submodule(parent_path) if parent_path else model, child, wrapper)
    return wrapper


def _unwrap(model: nn.Module, path: str, wrapper: AdaptedLayer) -> None:
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, wrapper.base)


def _original_paths(parts: dict[str, nn.Module]) -> dict[str, str] | None:
    """diffusers UNet module path -> the original (SGM) layout's, which kohya uses for SDXL names."""
    if "unet" not in parts:
        return None
    try:
        return unet_module_map(dict(parts["unet"].config))
    except ValueError:  # a UNet with no original layout: its files can only use diffusers paths
        if detect_family(parts).sgm_unet_names:
            raise
        return None


def _block_ids(parts: dict[str, nn.Module]):
    """Which block of the A1111 block-weight naming (BASE, IN04, M00, OUT03) a layer is in, as a
    function of (component, path), and every block the model has."""
    original = _original_paths(parts) or {}
    blocks = {"BASE"} if any(component in TEXT_ENCODERS for component in parts) else set()
    blocks |= {block_id("unet", path) for path in original.values()} - {None}

    def block_of(component: str, path: str) -> str | None:
        if component != "unet":
            return block_id(component, None)
        try:
            return block_id(component, to_original(path, original))
        except KeyError:  # a layer the original layout does not name
            return None
    return block_of, blocks


class _Strengths:
    """A strength checked against a model, resolved layer by layer. Only block weights need each
    layer's block, and so the original layout's module map."""

    def __init__(self, parts: dict[str, nn.Module], strength: Strength):
        self.block_of, blocks = _block_ids(parts) if is_block_weights(strength) else (None, set())
        check_strength(strength, unet_block_counts(parts), list(parts), blocks)
        self.resolve = layer_strengths(strength, blocks)

    def __call__(self, component: str, path: str) -> float:
        return self.resolve(component, path, self.block_of(component, path) if self.block_of else None)


def _model_layers(parts: dict[str, nn.Module]) -> dict[str, tuple[str, str, nn.Module]]:
    """module key -> (component, path in the installed model, layer) for every adaptable layer."""
    layers = {}
    for component, model in parts.items():
        for path, layer in adaptable_modules(model).items():
            layers[module_key(component, path)] = (component, path, layer)
    return layers


# ---------------------------------------------------------------- checking a file against a model


def _check_shapes(path: Path, modules: dict[str, ModuleTensors], layers: dict, file_family: str, model_family: str):
    for key, weights in modules.items():
        _check_kind(path, key, layers[key][2], weights, file_family, model_family)


def _check_kind(path: Path, key: str, layer: nn.Module, weights: ModuleTensors, file_family: str,
                model_family: str) -> None:
    """A module fits when its kind can be built on the layer and its update has the layer's shape: build it
    on the meta device and see."""
    if isinstance(layer, nn.Linear):
        meta = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    else:
        meta = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    tensors = {role: tensor.to("meta") for role, tensor in weights.tensors.items()}
    reason = ""
    try:
        adapter = build_adapter(meta, tensors, weights.alpha)
        delta = adapter.delta_weight(meta.weight)
        bias = adapter.delta_bias(meta.bias)
        fits = delta.shape == layer.weight.shape and (bias is None or (layer.bias is not None
                                                                       and bias.shape == layer.bias.shape))
    except (RuntimeError, ValueError, IndexError) as error:
        fits, reason = False, f" ({error})" if isinstance(error, ValueError) else ""
    if not fits:
        shapes = ", ".join(f"{role} {list(tensor.shape)}" for role, tensor in weights.tensors.items())
        raise AdapterFileError(f"{path}: {key} ({weights.kind}) does not fit this model's layer of weight "
                               f"{list(layer.weight.shape)}: the file has {shapes}{reason}. The file says it is "
                               f"for {file_family}; this model is {model_family}.")


def _file_family(tensors: dict, metadata: dict[str, str]) -> str:
    family = family_named_in_metadata(metadata) or family_from_tensors(tensors)
    return family.title if family else "an unstated model family"


def _check_family(path: Path, tensors: dict, family) -> None:
    """Refuse, before anything is modified, a file whose tensors are made for another family."""
    made_for = family_from_tensors(tensors)
    if made_for is not None and made_for is not family:
        raise FamilyMismatch(f"{path} is an adapter for {made_for.title}, but this model is {family.title}: load it "
                             f"on a {made_for.title} model, or use an adapter trained on {family.title}")


def _update_is_zero(roles: dict[str, torch.Tensor]) -> bool:
    """Whether a module's file tensors (by role, alpha included) change nothing at any strength."""
    roles = dict(roles)
    alpha = roles.pop("alpha", None)
    bias = roles.pop("diff_b", None)
    if (bias is not None and bias.any()) or "dora_scale" in roles:  # DoRA rescales the weight even with no update
        return False
    if not roles:
        return bias is not None
    if not is_whole(roles):
        return False
    if set(roles) == {"lora_down.weight", "lora_up.weight"} and not all(t.any() for t in roles.values()):
        return True  # ComfyUI's zero pairs, without a product as large as a token embedding
    try:
        return not standalone_update(roles, None if alpha is None else alpha.item()).any()
    except (RuntimeError, ValueError, IndexError):  # tensors that make no update: refused as before, not skipped
        return False


def _zero_modules(keys: list[str], tensors: dict) -> dict[str, list[str]]:
    """Module name -> its file keys, for the modules among `keys` whose update is exactly zero.

    ComfyUI's extractor writes a pair for every 2-D weight of a model difference, so its files hold
    all-zero updates for modules sdlora does not adapt (the text encoders' position embedding) or that
    diffusers' models lack (clip_l's text_projection): they change nothing, so they are skipped, not refused.
    """
    groups, sources, _ = group_tensors({key: tensors[key] for key in keys})
    return {name: sources[name] for name, roles in groups.items() if _update_is_zero(roles)}


def _embeddings_named(keys: list[str], parts: dict[str, nn.Module], family) -> list[str]:
    """The module names among file keys that name an nn.Embedding of the model, in any layout."""
    embeddings = [module_key(component, path) for component, model in parts.items()
                  for path, module in model.named_modules() if isinstance(module, nn.Embedding)]
    index = kohya_index(family, embeddings)
    names = {split[0] for split in map(split_tensor_name, keys) if split is not None}
    return sorted(name for name in names if module_key_of(name, family, index, {}) in embeddings)


def _check_parsed(path: Path, parsed, tensors: dict, metadata: dict, layers: dict, parts: dict, family,
                  strict: bool) -> None:
    """Refuse a file that cannot be applied whole; report what strict=False skips."""
    absent = [k for k in parsed.unmatched if component_of_file_key(k) not in (None, *parts)]
    unmatched = [k for k in parsed.unmatched if k not in absent]
    file_family = _file_family(tensors, metadata)
    if parsed.unsupported:
        raise AdapterFileError(
            f"{path}: {len(parsed.unsupported)} tensor(s) sdlora cannot apply, first {parsed.unsupported[:3]}"
            + describe_unsupported(parsed.unsupported)
        )
    zero = _zero_modules(unmatched, tensors)
    skipped = {key for keys in zero.values() for key in keys}
    unmatched = [k for k in unmatched if k not in skipped]
    if unmatched and strict:
        embeddings = _embeddings_named(unmatched, parts, family)
        if embeddings:
            raise AdapterFileError(
                f"{path}: {len(embeddings)} module(s) update an embedding, first {embeddings[:3]}; sdlora adapts "
                "Linear and Conv2d layers only and does not apply embedding updates. Pass strict=False to load "
                "the rest without them."
            )
        raise AdapterFileError(
            f"{path}: {len(unmatched)} tensor(s) name no layer of this {family.title} model, first "
            f"{unmatched[:5]}. The file says it is for {file_family}. "
            "Pass strict=False to load the layers that match and skip the rest."
        )
    if not parsed.modules:
        raise AdapterFileError(f"{path}: no tensor of this file matches a layer of this {family.title} model "
                               f"(the file says it is for {file_family})")
    _check_shapes(path, parsed.modules, layers, file_family, family.title)
    if zero:
        logger.warning("%s: skipped %d module(s) whose update is exactly zero (nothing to apply): %s",
                       path, len(zero), ", ".join(sorted(zero)[:10]))
    if unmatched:
        logger.warning("%s: skipped %d tensor(s) that name no layer of this model: %s",
                       path, len(unmatched), ", ".join(unmatched[:10]))
    if absent:
        logger.info("%s: %d tensor(s) are for components this target does not have", path, len(absent))


# ---------------------------------------------------------------- the public API


def load(target, path: str | os.PathLike, strength: Strength = 1.0, name: str | None = None,
         strict: bool = True) -> str:
    """Apply an adapter file to a pipeline (or a bare UNet / text encoder); returns its name.

    Reads sdlora, kohya/A1111, diffusers, PEFT, ComfyUI and SimpleTuner files, plain LoRA or a LyCORIS
    kind (LoCon, LoHa, LoKr, full, with or without DoRA); see sdlora/files/layouts.py. With strict=False,
    tensors that name no layer of this model are skipped and reported instead of refused.
    Nothing is modified unless the whole file checks out.
    """
    parts = components(target)
    path = Path(path)
    name = name or re.sub(r"[^A-Za-z0-9_-]", "_", path.stem)
    _check_new_name(parts, name)
    strength_of = _Strengths(parts, strength)
    family = detect_family(parts)

    tensors, metadata = read_adapter(path)
    _check_family(path, tensors, family)
    layers = _model_layers(parts)
    parsed = parse_state_dict(tensors, metadata, family, list(layers), _original_paths(parts))
    _check_parsed(path, parsed, tensors, metadata, layers, parts, family, strict)

    info = AdapterInfo(name=name, source=str(path), strength=strength, family=family.name, layout=parsed.layout,
                       targets=recorded_targets(metadata))
    for key, weights in parsed.modules.items():
        component, model_path, _ = layers[key]
        wrapper = _wrap(parts[component], model_path)
        adapter = build_adapter(wrapper.base, weights.tensors, weights.alpha)
        wrapper.add(name, adapter, strength_of(component, model_path))
        info.modules[component] = info.modules.get(component, 0) + 1
        info.ranks.setdefault(component, [])
        if weights.rank not in info.ranks[component]:
            info.ranks[component].append(weights.rank)
        info.kinds[adapter.kind] = info.kinds.get(adapter.kind, 0) + 1
    for component in info.modules:
        _registry(parts[component])[name] = info
    return name


def add_adapter(target, name: str, rank: int = 16, alpha: float | None = None, targets: str | list[str] = "attn",
                components_to_adapt: tuple[str, ...] | None = None, dtype: torch.dtype | None = None,
                dora: bool = False, blocks: Collection[str] | None = None) -> list[str]:
    """Attach a fresh, trainable adapter (down Kaiming-uniform, up zero); returns the module keys adapted.

    alpha defaults to rank (scale 1); dtype defaults to each base layer's. With dora=True each layer is
    a DoRA over the LoRA (sdlora.adapters.lycoris.DoRA.trainable), its magnitude starting at the base weight's
    norms. `blocks` keeps the UNet layers of those blocks alone, named as block weights name them
    (IN04, M00, OUT01: sdlora.adapters.block_weights); the text encoders are not affected. Raises if the
    targets match no layer of a component asked for.
    """
    parts = components(target)
    _check_new_name(parts, name)
    chosen = components_to_adapt or tuple(parts)
    missing = [c for c in chosen if c not in parts]
    if missing:
        raise ValueError(f"cannot adapt {', '.join(missing)}: the target has only {', '.join(parts)}")
    family = detect_family(parts)
    info = AdapterInfo(name=name, source="new", strength=1.0, family=family.name, layout="sdlora")
    plan = {}
    for component in chosen:
        patterns = patterns_for(targets, component)
        paths = select(parts[component], patterns)
        if not paths:
            raise ValueError(f"targets {targets!r} match no Linear or Conv2d layer of the {component}")
        if blocks is not None and component == "unet":
            paths = _in_blocks(parts, paths, blocks, targets)
        plan[component] = paths
        info.targets[component] = patterns
    adapted = []
    for component, paths in plan.items():
        for path in paths:
            wrapper = _wrap(parts[component], path)
            adapter = (DoRA.trainable(wrapper.base, rank, alpha, dtype=dtype) if dora
                       else LoRA(wrapper.base, rank, alpha, dtype=dtype))
            wrapper.add(name, adapter)
            adapted.append(module_key(component, path))
            info.kinds[adapter.kind] = info.kinds.get(adapter.kind, 0) + 1
        info.modules[component] = len(paths)
        info.ranks[component] = [rank]
        _registry(parts[component])[name] = info
    return adapted


def _in_blocks(parts: dict[str, nn.Module], paths: list[str], blocks: Collection[str], targets) -> list[str]:
    """The UNet layer paths that lie in `blocks`; ValueError naming blocks the model lacks, or none left."""
    block_of, model_blocks = _block_ids(parts)
    unknown = sorted(set(blocks) - model_blocks)
    if unknown or not blocks:
        raise ValueError(f"blocks {', '.join(unknown) or '(none)'}: this UNet's blocks are "
                         f"{', '.join(sort_blocks(model_blocks - {'BASE'}))}")
    kept = [path for path in paths if block_of("unet", path) in blocks]
    if not kept:
        raise ValueError(f"targets {targets!r} match no UNet layer in blocks {', '.join(blocks)}")
    return kept


def set_strength(target, name: str, strength: Strength) -> None:
    """Change an adapter's strength: a float, per component, or per UNet block (see sdlora.adapters.strength)."""
    parts = components(target)
    info = _require_loaded(parts, name)
    strength_of = _Strengths(parts, strength)
    if info.fused:
        raise RuntimeError(f"adapter {name!r} is fused into the weights: call sdlora.unfuse first, "
                           "set the strength, then fuse again")
    for component, path, wrapper in _layers(parts):
        if name in wrapper.adapters:
            wrapper.strengths[name] = strength_of(component, path)
    info.strength = strength


@contextmanager
def disabled(target, name: str):
    """Switch one adapter off for the duration of a `with` block, then restore its strengths: the base
    model's output, with any other adapters still on (the trainer's preservation target uses this)."""
    parts = components(target)
    info = _require_loaded(parts, name)
    if info.fused:
        raise RuntimeError(f"adapter {name!r} is fused into the weights: call sdlora.unfuse first")
    saved = _layer_strengths(parts, name)
    try:
        for wrapper, _ in saved:
            wrapper.strengths[name] = 0.0
        yield
    finally:
        _restore_strengths(name, saved)


def _layer_strengths(parts: dict[str, nn.Module], name: str) -> list[tuple[AdaptedLayer, float]]:
    """Each layer that holds adapter `name`, with its strength there now (to restore later)."""
    return [(wrapper, wrapper.strengths[name]) for _, _, wrapper in _layers(parts) if name in wrapper.adapters]


def _restore_strengths(name: str, saved: list[tuple[AdaptedLayer, float]]) -> None:
    for wrapper, strength in saved:
        wrapper.strengths[name] = strength


@contextmanager
def step_windows(target, windows: dict[str, Window]):
    """Adapters on for part of the denoising only: {name: (start, stop)}, fractions of the steps (see
    sdlora.adapters.strength). Yields the callback to give the pipeline, which switches each adapter on
    or off after every step; the strengths are restored at the end of the block.

        with sdlora.step_windows(pipe, {"character": (0, 0.4), "style": (0.4, 1)}) as callback:
            image = pipe(prompt, callback_on_step_end=callback).images[0]

    Off is strength 0, which every layer skips: outside its window an adapter costs nothing and
    changes nothing. Several pipeline calls may share one block.
    """
    parts = components(target)
    saved = {}
    for name, window in windows.items():
        info = _require_loaded(parts, name)
        check_window(name, window)
        if info.fused:
            raise RuntimeError(f"adapter {name!r} is fused into the weights: a step window needs it unfused "
                               "(call sdlora.unfuse first)")
        saved[name] = _layer_strengths(parts, name)

    def switch(step: int, steps: int) -> None:
        for name, layers in saved.items():
            on = in_window(windows[name], step, steps)
            for wrapper, strength in layers:
                wrapper.strengths[name] = strength if on else 0.0

    def on_step_end(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        steps = pipe.num_timesteps
        if step + 1 < steps:
            switch(step + 1, steps)
        else:  # the call is done: ready for the first step of the next one
            switch(0, 1)
        return callback_kwargs

    try:
        switch(0, 1)
        yield on_step_end
    finally:
        for name, layers in saved.items():
            _restore_strengths(name, layers)


def list_adapters(target) -> list[AdapterInfo]:
    """The loaded adapters with their strengths, ranks and targets, in load order."""
    return list(_infos(components(target)).values())


def fuse(target) -> None:
    """Add every loaded adapter's strength-scaled update into the base weights (zero-overhead inference)."""
    parts = components(target)
    infos = _infos(parts)
    if any(info.fused for info in infos.values()):
        raise RuntimeError("adapters are already fused: call sdlora.unfuse first to fuse again")
    for _, _, wrapper in _layers(parts):
        wrapper.fuse()
    for info in infos.values():
        info.fused = True


def unfuse(target) -> bool:
    """Restore the base weights exactly as they were before `fuse`; returns whether anything was fused."""
    parts = components(target)
    infos = _infos(parts)
    was_fused = any(info.fused for info in infos.values())
    for _, _, wrapper in _layers(parts):
        wrapper.unfuse()
    for info in infos.values():
        info.fused = False
    return was_fused


def unload(target, name: str | None = None) -> None:
    """Remove one adapter, or all; layers left with no adapter get their original module back."""
    parts = components(target)
    names = [name] if name is not None else list(_infos(parts))
    if name is not None:
        _require_loaded(parts, name)
    refuse = unfuse(target)
    for component, path, wrapper in list(_layers(parts)):
        for adapter_name in names:
            if adapter_name in wrapper.adapters:
                wrapper.remove(adapter_name)
        if not wrapper.adapters:
            _unwrap(parts[component], path, wrapper)
    for module in parts.values():
        for adapter_name in names:
            _registry(module).pop(adapter_name, None)
    if refuse and _infos(parts):
        fuse(target)


def adapter_weights(target, name: str) -> dict[str, ModuleTensors]:
    """module key -> the adapter's tensors by file role (no copy), for saving or inspection; a LoRA's
    factors are also `.down` and `.up`."""
    parts = components(target)
    _require_loaded(parts, name)
    weights = {}
    for component, path, wrapper in _layers(parts):
        adapter = wrapper.adapters[name] if name in wrapper.adapters else None
        if adapter is not None:
            weights[module_key(component, path)] = ModuleTensors(adapter.file_tensors(), adapter.alpha)
    return weights


def save(target, path: str | os.PathLike, name: str, dtype: str = "fp16", title: str | None = None,
         record: dict | None = None, header: dict[str, str] | None = None, prediction_type: str | None = None,
         resolution: int | tuple[int, int] | None = None, scale: float = 1.0) -> Path:
    """Write an adapter as a kohya-layout .safetensors file (A1111, ComfyUI and diffusers read it).

    `record` joins sdlora's JSON record in the header (the training config, say); `header` adds
    plain header keys (kohya's `ss_*` training facts). The header states the prediction type and
    resolution given, by default the pipeline's own (its scheduler's, and its native size). `scale`
    multiplies a LoRA's update, through its alpha: the file at strength 1 is the adapter at `scale`.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    parts = components(target)
    info = _require_loaded(parts, name)
    family = FAMILIES[info.family]
    weights = adapter_weights(target, name)
    if scale != 1.0:
        weights = {key: _scaled_lora(key, module, scale) for key, module in weights.items()}
    state_dict = to_kohya(weights, family, SAVE_DTYPES[dtype], _original_paths(parts))
    scheduler = getattr(target, "scheduler", None)
    prediction_type = prediction_type or (scheduler.config.prediction_type if scheduler is not None else "epsilon")
    resolution = resolution or (native_resolution(target) if hasattr(target, "vae") else None)
    metadata = build_metadata(weights, family, title=title or name, targets=info.targets, extra=record,
                              prediction_type=prediction_type, resolution=resolution)
    metadata.update(header or {})
    return write_adapter(path, state_dict, metadata)


def _scaled_lora(key: str, module: ModuleTensors, scale: float) -> ModuleTensors:
    """A LoRA module whose update is `scale` times this one's: the same factors, alpha times `scale`."""
    if set(module.tensors) != set(LoRA.roles):
        raise ValueError(f"{key}: only a plain LoRA's update scales with its alpha; this module holds "
                         f"{', '.join(sorted(module.tensors))}")
    alpha = module.alpha if module.alpha is not None else module.down.shape[0]
    return ModuleTensors(module.tensors, alpha * scale)


@torch.no_grad()
def copy_weights_from(target, name: str, path: str | os.PathLike) -> None:
    """Overwrite a loaded adapter's tensors with a file's (resuming training); the layers must match."""
    parts = components(target)
    info = _require_loaded(parts, name)
    tensors, metadata = read_adapter(path)
    mine = adapter_weights(target, name)
    parsed = parse_state_dict(tensors, metadata, FAMILIES[info.family], list(mine), _original_paths(parts))
    if parsed.modules.keys() != mine.keys() or parsed.unmatched or parsed.unsupported:
        raise AdapterFileError(f"{path}: its layers are not those of adapter {name!r} (different targets?)")
    for key, weights in parsed.modules.items():
        source, destination = weights.tensors, mine[key].tensors
        if source.keys() != destination.keys():
            raise AdapterFileError(f"{path}: {key} holds {sorted(source)}, adapter {name!r} has {sorted(destination)} "
                                   "(DoRA in one and not the other?)")
        for role, tensor in destination.items():
            tensor.copy_(source[role].reshape(tensor.shape))


def trainable_parameters(target, name: str) -> list[nn.Parameter]:
    parts = components(target)
    _require_loaded(parts, name)
    return [p for _, _, wrapper in _layers(parts) if name in wrapper.adapters
            for p in wrapper.adapters[name].parameters()]


def up_parameters(target, name: str) -> list[nn.Parameter]:
    """The `up` (B) matrix of each layer of a LoRA or DoRA adapter, a subset of `trainable_parameters`: LoRA+
    trains them at a larger learning rate."""
    parts = components(target)
    _require_loaded(parts, name)
    adapters = [wrapper.adapters[name] for _, _, wrapper in _layers(parts) if name in wrapper.adapters]
    return [(adapter.inner if isinstance(adapter, DoRA) else adapter).up.weight for adapter in adapters]


