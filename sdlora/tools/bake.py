"""Baking adapters into a model's own weights, and saving the result as a diffusers folder or as one
checkpoint file in the original layout (what A1111 and ComfyUI load as a model)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save
from tqdm.auto import tqdm

from .. import loader
from ..files.safetensors import SAVE_DTYPES
from ..base_models.checkpoints import pipeline_to_original
from ..reliability.durable import failure, fsync_folder, publish_folder, remove_tree, write_file
from ..errors import ConfigError
from ..adapters.lora import AdaptedLayer
from ..base_models.parts import components


@torch.no_grad()
def bake(pipe, sources: list[tuple[Path, float]]) -> None:
    """Add each adapter file's update at its strength into the pipeline's weights, for good.

    The files are loaded with the loader (every layout, checked against the model), each layer fused
    by its own `fuse` (weight and bias, fp32), and the adapters removed again: what stays is a plain
    pipeline whose weights hold them.
    """
    for index, (path, strength) in enumerate(sources):
        loader.load(pipe, path, strength=strength, name=f"bake{index}")
    layers = [module for model in components(pipe).values() for module in model.modules()
              if isinstance(module, AdaptedLayer)]
    for layer in tqdm(layers, desc="bake", unit="module"):
        layer.fuse(keep_original=False)  # the one fusing path: a copy of it here once dropped diff_b
    # The layers kept no original to restore, so unloading only unwraps them, leaving the fused weights.
    loader.unload(pipe)


def check_model_output(output: Path, model: str) -> None:
    """Refuse, before any work, an output that would overwrite the base model or a folder of other things."""
    if output.exists() and Path(model).exists() and output.resolve() == Path(model).resolve():
        raise ConfigError(f"{output} is the model being merged into: write the result somewhere else")
    if output.suffix == ".ckpt":
        raise ConfigError(f"{output}: sdlora writes checkpoints as .safetensors only; name it *.safetensors")
    if output.suffix != ".safetensors" and output.is_dir() and any(output.iterdir()) \
            and not (output / "model_index.json").is_file():
        raise ConfigError(f"{output} is a folder that holds something other than a diffusers model; it would be "
                          "replaced: choose a new folder")
    if output.suffix != ".safetensors" and output.is_file():
        raise ConfigError(f"{output} is a file: give a folder for a diffusers model, or a *.safetensors file name "
                          "for one checkpoint")


def save_pipeline(pipe, output: Path, dtype: str = "fp16") -> Path:
    """A *.safetensors output becomes one checkpoint in the original layout; anything else a diffusers
    folder. Both appear whole or not at all."""
    if dtype not in SAVE_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}")
    pipe.to(dtype=SAVE_DTYPES[dtype])
    if output.suffix == ".safetensors":
        state = {name: tensor.contiguous() for name, tensor in pipeline_to_original(pipe).items()}
        return write_file(output, save(state))
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    remove_tree(partial)
    try:
        pipe.save_pretrained(partial, safe_serialization=True)
        for folder, _, files in os.walk(partial):  # save_pretrained does not fsync; a power cut must not
            for name in files:                     # leave empty files in the published folder
                descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(descriptor)
                finally:
                    os.close(descriptor)
            fsync_folder(Path(folder))
    except BaseException as error:  # a Ctrl-C halfway through too: leave no partial folder behind
        remove_tree(partial)
        if isinstance(error, OSError):
            raise failure(output, error) from error
        raise
    publish_folder(partial, output)
    return output
