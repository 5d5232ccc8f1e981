"""Load a whole pipeline from one original-layout `.safetensors` or `.ckpt` file, offline.

diffusers' `from_single_file` does the weight conversion; we hand it everything it would otherwise
fetch from the hub: the diffusers configs (shipped in sdlora/architectures, or the user's
`model_config` folder), the tokenizers (built from the shipped CLIP BPE) and the scheduler.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from . import architectures
from .clip_tokenizer import clip_tokenizer
from .sources import ModelSourceError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _unwrap(checkpoint: Mapping) -> Mapping:
    # Training checkpoints nest the weights under "state_dict" (next to global_step and the like).
    while isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    return checkpoint


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled PyTorch checkpoint, loaded without running code from it.

    `weights_only=True` lets the unpickler build tensors and plain containers only; a file that
    needs anything else is refused rather than trusted.
    """
    try:
        # mmap keeps a multi-GB file on disk until its tensors are used; it needs the zip format.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelSourceError(
            f"{path}: refused to load this .ckpt: it holds pickled Python objects other than tensors "
            f"({first_line}), and unpickling those could run code hidden in the file. Use a .safetensors "
            "release of the model, or convert this file with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise ModelSourceError(f"{path}: not a readable PyTorch checkpoint ({error})") from None
    checkpoint = _unwrap(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ModelSourceError(f"{path}: expected a dict of tensors, found a {type(checkpoint).__name__}")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, without reading a .safetensors file's data."""
    if path.suffix == ".ckpt":
        return {key: tuple(value.shape) for key, value in read_ckpt(path).items()}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except (SafetensorError, OSError) as error:
        raise ModelSourceError(f"{path}: not a readable .safetensors file ({error})") from None


def _model_index(folder: Path) -> dict:
    try:
        return json.loads((folder / "model_index.json").read_text())
    except FileNotFoundError:
        raise ModelSourceError(
            f"{folder}: no model_index.json; --model-config must be a diffusers-format folder "
            "(model_index.json and one subfolder per component)"
        ) from None


def load_tokenizer(folder: Path, name: str):
    """The folder's own tokenizer when it has vocabulary files, else CLIP's with its settings."""
    from transformers import CLIPTokenizer

    subfolder = folder / name
    if any((subfolder / file).is_file() for file in TOKENIZER_FILES):
        return CLIPTokenizer.from_pretrained(str(subfolder), local_files_only=True)
    settings_file = subfolder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    return clip_tokenizer(pad_token=settings.get("pad_token", "<|endoftext|>"),
                          model_max_length=settings.get("model_max_length", 77))


def load_scheduler(folder: Path, class_name: str, prediction_type: str | None):
    import diffusers

    scheduler_class = getattr(diffusers, class_name)
    scheduler = scheduler_class.from_pretrained(str(folder), subfolder="scheduler", local_files_only=True)
    if prediction_type and scheduler.config.get("prediction_type") != prediction_type:
        scheduler = scheduler_class.from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler


def _choose_config(path: Path, shapes: Mapping, model_config: str | None, prediction_type: str | None) -> Path:
    if model_config is not None:
        folder = Path(model_config).expanduser()
        if not folder.is_dir():
            raise ModelSourceError(f"--model-config {model_config}: no such folder")
        return folder
    try:
        name = architectures.detect(shapes, prediction_type)
    except architectures.UnknownArchitecture as error:
        raise ModelSourceError(
            f"{path}: cannot tell which model this is: {error}. Pass --model-config with a diffusers-format "
            "config folder for it (the model's diffusers release without its weights is enough)"
        ) from None
    missing = architectures.missing_components(shapes, name)
    if missing:
        raise ModelSourceError(
            f"{path}: looks like {name} but has no weights for its {', '.join(missing)}; sdlora needs a "
            "checkpoint with every part (or use the model's diffusers folder)"
        )
    return architectures.config_folder(name)


def _check_loaded(pipe, path: Path, folder: Path) -> None:
    """Weights the checkpoint lacked stay on the meta device; say so now, not at the first forward."""
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        empty = [name for name, param in module.named_parameters() if param.device.type == "meta"]
        if empty:
            raise ModelSourceError(
                f"{path}: has no weights for {len(empty)} {component} parameters (e.g. {empty[0]}) of the "
                f"architecture in {folder}; if the checkpoint is another architecture, pass --model-config"
            )


def load_single_file(path: Path, dtype: torch.dtype | None = None, model_config: str | None = None,
                     prediction_type: str | None = None):
    """A StableDiffusion(XL)Pipeline from one original-layout checkpoint, with nothing downloaded."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    shapes = read_shapes(path)  # for a .ckpt this is also the weights_only safety check
    folder = _choose_config(path, shapes, model_config, prediction_type)
    index = _model_index(folder)
    is_xl = index.get("_class_name", "").startswith("StableDiffusionXL")
    pipeline_class = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    parts = {name: load_tokenizer(folder, name) for name in ("tokenizer", "tokenizer_2") if name in index}
    parts["scheduler"] = load_scheduler(folder, index["scheduler"][1], prediction_type)
    if is_xl:
        parts["add_watermarker"] = False  # training previews should show what the model makes
    else:
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        pipe = pipeline_class.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=dtype, **parts
        )
    except ModelSourceError:
        raise
    except Exception as error:  # diffusers' conversion raises many kinds; all mean the same to the user
        raise ModelSourceError(
            f"{path}: could not be loaded with the configs in {folder} ({type(error).__name__}: {error}); "
            "if it is another architecture, pass --model-config with its diffusers-format config folder"
        ) from error
    _check_loaded(pipe, path, folder)
    return pipe
