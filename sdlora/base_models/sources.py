"""Where a model comes from: a diffusers folder, a hub id (cache only when offline), or one file.

`load_pipeline` takes whatever the user passed as `--model` and returns a StableDiffusionPipeline
or StableDiffusionXLPipeline without a safety checker, its weights frozen and in `dtype`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelSourceError
from .families import pipeline_for
from .model_index import read_model_index

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
HOW_TO_POINT = ("point --model at a local copy: a diffusers folder (--model /path/to/folder) or a single "
                ".safetensors/.ckpt file (--model /path/to/model.safetensors)")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    # Read now, not from huggingface_hub.constants, which freezes the environment at import time.
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The hub cache huggingface_hub would use with the current environment (same precedence)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def _looks_like_path(model: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else the user typed meant a file or folder."""
    return (model.startswith(("/", "./", "../", "~", ".\\")) or "\\" in model or model.count("/") > 1
            or model.lower().endswith((*SINGLE_FILE_SUFFIXES, ".pt", ".pth", ".bin")))


def _from_folder(folder: Path, dtype):
    import diffusers

    index = read_model_index(folder, "point --model at the folder that holds model_index.json, or at a single "
                                     ".safetensors/.ckpt file")
    pipeline_class, options = pipeline_for(index)
    try:
        return getattr(diffusers, pipeline_class).from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                                  **options)
    except (OSError, ValueError) as error:
        raise ModelSourceError(f"{folder}: could not load this diffusers folder ({error})") from None


def _causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def _unreachable(error: BaseException) -> bool:
    """Whether a failed download failed for want of a network (httpx/requests name these errors so)."""
    markers = ("Connect", "NetworkError", "Timeout", "Offline", "gaierror")
    return any(marker in type(cause).__name__ for cause in _causes(error) for marker in markers)


def _hub_snapshot(repo_id: str) -> Path:
    """The local folder of a hub model: downloaded when online, from the cache when offline."""
    from diffusers import DiffusionPipeline

    offline = hub_offline()
    cache = hub_cache_dir()
    try:
        # Online, diffusers itself falls back to the cache when the hub cannot be reached.
        return Path(DiffusionPipeline.download(repo_id, cache_dir=str(cache), local_files_only=offline))
    except (OSError, ValueError) as error:
        if offline:
            why = "this machine is offline (HF_HUB_OFFLINE=1), so it cannot be downloaded"
        elif _unreachable(error):
            why = "the hub cannot be reached from this machine (offline), so it cannot be downloaded"
        else:
            root = _causes(error)[-1]
            why = f"the hub did not provide it ({type(root).__name__}: {(str(root).splitlines() or [''])[0]})"
        raise ModelSourceError(
            f"{repo_id!r} is not a local folder or file, and as a hub model id it is not in the local Hugging Face "
            f"cache ({cache}); {why}. To use it, {HOW_TO_POINT}"
        ) from None


def _check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelSourceError(f"prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}")


def _set_prediction_type(pipe, prediction_type: str | None) -> None:
    if prediction_type and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)


def check_model_source(model: str, model_config: str | None = None) -> None:
    """The checks that need no loading, for a config's validation: refuse at once a model that is no
    folder, checkpoint file or hub id, before any time is spent."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(f"model folder {model} has no model_index.json: give a diffusers folder, a "
                                   "single .safetensors/.ckpt checkpoint file, or a hub id")
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelSourceError(f"model file {model} is not a checkpoint sdlora reads: give a .safetensors or "
                                   ".ckpt file, a diffusers folder, or a hub id")
    elif _looks_like_path(model) or not model:
        raise ModelSourceError(f"model {model!r} does not exist: give a diffusers folder, a checkpoint file "
                               "(.safetensors / .ckpt), or a hub id (org/name)")
    if model_config is not None:
        if not path.is_file():
            raise ModelSourceError(f"--model-config applies to single-file checkpoints only, and {model} is not a "
                                   "file")
        if not Path(model_config).is_dir():
            raise ModelSourceError(f"model config folder {model_config} does not exist: give a diffusers folder "
                                   "whose configs describe the checkpoint's architecture")


def load_pipeline(model: str, dtype=None, model_config: str | None = None, prediction_type: str | None = None):
    """A frozen SD/SDXL pipeline from a diffusers folder, a hub id or one .safetensors/.ckpt file.

    `model_config` (a diffusers-format folder of configs) replaces the shipped configs for a single
    file of another architecture; `prediction_type` overrides the scheduler's (and picks SD 2.x
    512-base over 768-v for a single file when "epsilon").
    """
    _check_prediction_type(prediction_type)
    model = str(model)  # a Path is welcome too
    path = Path(model).expanduser()
    if model_config is not None and not path.is_file():
        raise ModelSourceError(f"--model-config applies to single-file checkpoints only, and {model} is not a file")
    if path.is_dir():
        pipe = _from_folder(path, dtype)
    elif path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelSourceError(
                f"{path}: unknown model file type {path.suffix or '(no suffix)'!r}; sdlora reads "
                f"{' and '.join(SINGLE_FILE_SUFFIXES)} single-file checkpoints and diffusers folders"
            )
        from .single_file import load_single_file  # here, not at the top: it imports torch and diffusers

        pipe = load_single_file(path, dtype, model_config, prediction_type)
    elif _looks_like_path(model):
        raise ModelSourceError(f"{model}: no such file or folder; {HOW_TO_POINT}")
    else:
        pipe = _from_folder(_hub_snapshot(model), dtype)
    _set_prediction_type(pipe, prediction_type)
    for component in pipe.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)  # base weights are frozen; adapters add their own parameters
    return pipe
