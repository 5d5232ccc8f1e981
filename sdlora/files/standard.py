"""Reading an adapter file against a model: the one way a file becomes modules by module key.

A file names modules, not a model, and kohya names lose the dots of module paths; so a file is read against
a model's module names: the model given (`--model`), or else its family's standard UNet and text encoders,
built from the configs sdlora ships with no weights (on the meta device), so that building them costs no
memory and reads nothing. convert, merge and resize read every input this way; the loader reads against the
pipeline it loads into, through the same `parse_state_dict`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters.targets import adaptable_modules
from ..base_models.families import FAMILIES, Family, detect_family, family_from_tensors, family_named_in_metadata
from ..base_models.module_keys import module_key
from ..base_models.parts import components
from ..base_models.sgm import unet_module_map
from ..errors import AdapterFileError
from .layouts import ModuleTensors, Parsed, parse_state_dict
from .safetensors import read_adapter


@functools.cache  # read-only modules on the meta device: one build per family serves every file
def _standard_parts(name: str) -> dict[str, nn.Module]:
    family = FAMILIES[name]
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..base_models import architectures

    folder = architectures.config_folder(family.standard_architecture)
    with torch.device("meta"):  # shapes without storage: building SDXL's takes well under a second
        parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))}
        for name in family.text_encoders:
            config = CLIPTextConfig.from_pretrained(folder / name)
            model = CLIPTextModelWithProjection if name in family.projected_text_encoders else CLIPTextModel
            parts[name] = model(config)
    return parts


def standard_parts(family: Family) -> dict[str, nn.Module]:
    """The family's standard UNet and text encoders, built from the shipped configs on the meta device (once;
    callers only read them)."""
    return _standard_parts(family.name)


def layers_by_key(parts: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Every layer an adapter may hold in a model's parts, by its module key."""
    return {module_key(component, path): layer for component, model in parts.items()
            for path, layer in adaptable_modules(model).items()}


def parse_against(tensors: dict[str, torch.Tensor], metadata: dict[str, str], family: Family,
                  parts: dict[str, nn.Module]) -> tuple[Parsed, dict[str, str]]:
    """A file's modules by module key, read against `parts` (a model's, or `standard_parts(family)`), and the
    parts' UNet paths in the original layout (what kohya and ComfyUI names use)."""
    original = unet_module_map(dict(parts["unet"].config))
    return parse_state_dict(tensors, metadata, family, list(layers_by_key(parts)), original), original


@dataclass
class ReadFile:
    """An adapter file read against a model: its modules by module key (once `read_against` has parsed it),
    its header, and the model's facts it is read with."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    family: Family
    parts: dict[str, nn.Module]  # the model's, or its family's standard ones (on the meta device)
    standard: bool  # read against the family's standard architecture (no model given)
    modules: dict[str, ModuleTensors] = field(default_factory=dict)
    layout: str = ""  # what wrote it: kohya, comfy, simpletuner, peft or diffusers
    original: dict[str, str] = field(default_factory=dict)  # UNet diffusers path -> original-layout path
    layers: dict[str, nn.Module] = field(default_factory=dict)  # the model's adaptable layers by module key

    def against(self) -> str:
        """What the file is read against, for messages, with what to do when that is the wrong model."""
        if self.standard:
            return (f"{self.family.title}'s standard architecture (for a file made for another model, pass --model "
                    "with that model)")
        return "the model given"

    def weight_shape(self, key: str) -> torch.Size:
        """The shape of the weight of the layer `key` names, in the model read against."""
        return self.layers[key].weight.shape

    def check_fits(self, key: str, update_shape: tuple[int, ...]) -> None:
        """Refuse a module whose update does not fit its layer (a file for another model, such as a refiner)."""
        expected = tuple(self.weight_shape(key))
        if (update_shape[0], math.prod(update_shape[1:])) != (expected[0], math.prod(expected[1:])):
            raise AdapterFileError(f"{self.path}: module {key} holds an update of shape {list(update_shape)}, but "
                                   f"that layer's weight is {list(expected)} in {self.against()}")


def open_against(path: str | Path, model=None) -> ReadFile:
    """An adapter file's tensors and header, and what it is to be read against: `model` (a pipeline) or,
    without one, the standard architecture of the family its header or tensors name. Not parsed yet, so
    that the families of several files can be compared first."""
    path = Path(path)
    tensors, metadata = read_adapter(path)
    if model is not None:
        parts = components(model)
        family = detect_family(parts)
    else:
        family = family_named_in_metadata(metadata) or family_from_tensors(tensors)
        if family is None:
            raise AdapterFileError(f"{path}: neither its header nor its tensors say which model family it is for: "
                                   "pass --model with the model it was made for")
        parts = standard_parts(family)
    return ReadFile(path, tensors, metadata, family, parts, standard=model is None)


def read_against(file: ReadFile | str | Path, model=None, doing: str = "reading") -> ReadFile:
    """Read an adapter file of any layout sdlora reads (a path, or what `open_against` opened) against its
    model; refuse a file with tensors that name no module there (they would be lost in `doing`)."""
    read = file if isinstance(file, ReadFile) else open_against(file, model)
    read.layers = layers_by_key(read.parts)
    read.original = unet_module_map(dict(read.parts["unet"].config))
    parsed = parse_state_dict(read.tensors, read.metadata, read.family, list(read.layers), read.original)
    read.modules, read.layout = parsed.modules, parsed.layout
    problems = parsed.unmatched + parsed.unsupported
    if problems:
        raise AdapterFileError(f"{read.path}: {len(problems)} tensor(s) would be lost in {doing}, first "
                               f"{problems[:3]}: they name no module of {read.against()}")
    if not parsed.modules:
        raise AdapterFileError(f"{read.path}: holds no LoRA tensors")
    return read
