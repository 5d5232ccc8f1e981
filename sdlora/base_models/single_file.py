"""Load a whole pipeline from one original-layout `.safetensors` or `.ckpt` file, offline.

diffusers' `from_single_file` does the weight conversion; we hand it everything it would otherwise
fetch from the hub: the diffusers configs (shipped in sdlora/base_models/configs, or the user's
`model_config` folder), the tokenizers (built from the shipped CLIP BPE) and the scheduler.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ModelSourceError, UnknownArchitecture
from . import architectures
from .clip_tokenizer import clip_tokenizer
from .families import pipeline_for
from .model_index import read_model_index

TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _unwrap(checkpoint: Mapping) -> Mapping:
    # Training checkpoints nest the weights under "state_dict" (next to global_step and the like).
    while isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    return checkpoint


def _unpickler_complaint(error: Exception) -> str:
    """The one useful line of torch's weights_only refusal (the rest is advice to turn it off)."""
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please|\n|$)", str(error))
    return found[1].strip() if found else (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled PyTorch checkpoint, loaded without running code from it.

    `weights_only=True` lets the unpickler build tensors and plain containers only; a file that
    needs anything else is refused rather than trusted.
    """
    try:
        # mmap keeps a multi-GB file on disk until its tensors are used; it needs the zip format.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        complaint = _unpickler_complaint(error)
        if "Unsupported global" not in complaint:
            raise ModelSourceError(f"{path}: not a readable PyTorch checkpoint ({complaint})") from None
        raise ModelSourceError(
            f"{path}: refused to load this .ckpt: it holds pickled Python objects other than tensors "
            f"({complaint}), and unpickling those could run code hidden in the file. Use a .safetensors "
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


def load_tokenizer(folder: Path, name: str):
    """The folder's own tokenizer when it has vocabulary files, else CLIP's with its settings."""
    from transformers import CLIPTokenizer

    subfolder = folder / name
    if any((subfolder / file).is_file() for file in TOKENIZER_FILES):
        return CLIPTokenizer.from_pretrained(str(subfolder), local_files_only=True)
    settings_file = subfolder / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
    pad = settings.get("pad_token") or "<|endoftext|>"
    pad = pad["content"] if isinstance(pad, dict) else pad  # older files store tokens as AddedToken dicts
    try:
        return clip_tokenizer(pad_token=pad, model_max_length=settings.get("model_max_length", 77))
    except ValueError as error:
        raise ModelSourceError(f"{settings_file}: {error}") from None


def load_scheduler(folder: Path, class_name: str, prediction_type: str | None):
    import diffusers

    scheduler_class = getattr(diffusers, str(class_name), None)
    if not isinstance(scheduler_class, type) or not issubclass(scheduler_class, diffusers.SchedulerMixin):
        raise ModelSourceError(f"{folder / 'model_index.json'}: {class_name!r} is not a diffusers scheduler")
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
    except UnknownArchitecture as error:
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


def _conversion_complaint(error: Exception) -> str:
    # A weight the checkpoint lacks is left on the meta device and fails later with a torch message
    # about meta tensors; diffusers' own messages go on with advice for its API, so keep line one.
    if "meta tensor" in str(error):
        return "it lacks some of the weights this architecture has"
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


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
    import diffusers

    shapes = read_shapes(path)  # for a .ckpt this is also the weights_only safety check
    folder = _choose_config(path, shapes, model_config, prediction_type)
    index = read_model_index(folder, "--model-config must be a diffusers-format folder (model_index.json and one "
                                     "subfolder per component)")
    pipeline_class, options = pipeline_for(index)
    # every tokenizer the config folder's pipeline has (tokenizer, and SDXL's tokenizer_2)
    parts = {name: load_tokenizer(folder, name) for name in index if name.startswith("tokenizer")}
    parts["scheduler"] = load_scheduler(folder, (index.get("scheduler") or [None, None])[1], prediction_type)
    parts |= options
    try:
        pipe = getattr(diffusers, pipeline_class).from_single_file(
            str(path), config=str(folder), local_files_only=True, dtype=dtype, **parts
        )
    except ModelSourceError:
        raise
    except Exception as error:  # diffusers' conversion raises many kinds; all mean the same to the user
        raise ModelSourceError(
            f"{path}: could not be loaded with the configs in {folder} ({_conversion_complaint(error)}); "
            "if it is another architecture, pass --model-config with its diffusers-format config folder"
        ) from error
    _check_loaded(pipe, path, folder)
    return pipe
