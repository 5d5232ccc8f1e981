"""Reading and writing adapter files: safetensors only, checked before use, written atomically."""

from __future__ import annotations

import datetime
import json
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..reliability.durable import write_file
from ..errors import AdapterFileError, ConfigError
from .layouts import ModuleTensors
from ..base_models.families import Family

FORMAT_VERSION = 1
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}




def _header(path: Path) -> dict:
    """The safetensors JSON header, after checking the file is complete. Never unpickles anything."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            if head[:2] == b"PK" or head[:1] == b"\x80":
                hint = "it looks like a pickled PyTorch checkpoint, which sdlora never opens"
            else:
                hint = "its first 8 bytes are not a safetensors header length"
            raise AdapterFileError(f"{path}: not a safetensors file ({hint}); adapters must be .safetensors")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"{path}: not a safetensors file (its header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: not a safetensors file (its header is not a JSON object)")
    try:
        data_end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                       default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise AdapterFileError(f"{path}: not a safetensors file (its header has malformed tensor entries)") from None
    expected = 8 + header_len + data_end
    if size < expected:
        raise AdapterFileError(
            f"{path}: truncated: the header describes {expected} bytes but the file has {size}; "
            "the download or copy was cut short, fetch the file again"
        )
    return header


def read_adapter(path: str | os.PathLike, check_finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file, checked: complete, safetensors, all values finite
    (`check_finite=False` for a tool that reports such values instead of refusing them)."""
    path = Path(path)
    if path.is_dir():  # a folder written by diffusers' save_lora_weights, or holding one adapter
        candidates = sorted(path.glob("*.safetensors"))
        preferred = path / "pytorch_lora_weights.safetensors"
        if preferred.is_file():
            path = preferred
        elif len(candidates) == 1:
            path = candidates[0]
        else:
            raise AdapterFileError(f"{path}: a folder with {len(candidates)} .safetensors files; name the file")
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    header = _header(path)
    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error type for malformed files
        raise AdapterFileError(f"{path}: cannot be read as safetensors: {error}") from None
    for name, tensor in tensors.items() if check_finite else ():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(
                f"{path}: tensor {name!r} holds NaN or infinite values; the adapter is broken "
                "(often a training run that diverged): use an earlier checkpoint"
            )
    return tensors, dict(header.get("__metadata__") or {})


def recorded_targets(metadata: dict[str, str]) -> dict[str, list[str]]:
    """component -> the target patterns an sdlora file records in its header; other tools' files do not say."""
    try:
        return json.loads(metadata.get("sdlora", "{}")).get("targets") or {}
    except (json.JSONDecodeError, AttributeError):
        return {}


def check_output(path: Path) -> None:
    """Refuse, before any work, an output path that is not a .safetensors file (what the tools write)."""
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: adapter files are written as .safetensors; name the output *.safetensors")


def write_adapter(path: str | os.PathLike, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapter files are written as .safetensors; name the file *.safetensors")
    return write_file(path, save(state_dict, metadata=metadata))


def _uniform(values: list[float]) -> str:
    """kohya writes 'Dynamic' when modules differ (for example after resizing)."""
    distinct = sorted(set(values))
    if len(distinct) == 1:
        value = distinct[0]
        return str(int(value)) if float(value).is_integer() else str(value)
    return "Dynamic"


def build_metadata(
    modules: dict[str, ModuleTensors], family: Family, title: str,
    targets: dict[str, list[str]] | None = None,
    extra: dict | None = None, prediction_type: str = "epsilon", resolution: int | tuple[int, int] | None = None,
) -> dict[str, str]:
    """kohya's `ss_*` keys, Stability's `modelspec.*` keys, and sdlora's own JSON record.

    The family keys say what the adapter was trained with (prediction type, resolution), not the
    family's defaults; without a resolution, the header states none.
    """
    ranks = {key: weights.rank for key, weights in modules.items()}
    alphas = [weights.effective_alpha for weights in modules.values()]
    downs = {key: weights.tensors.get("lora_down.weight") for key, weights in modules.items()}
    record = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "targets": targets or {},
        "ranks": ranks,
        **(extra or {}),
    }
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _uniform(list(ranks.values())),
        "ss_network_alpha": _uniform(alphas),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        **family.header(prediction_type, resolution),
        "sdlora": json.dumps(record, sort_keys=True),
    }
    args = {}
    conv = [modules[key] for key, down in downs.items() if down is not None and down.dim() == 4 and down.shape[-1] > 1]
    if conv:
        args.update(conv_dim=_uniform([w.rank for w in conv]), conv_alpha=_uniform([w.effective_alpha for w in conv]))
    scales = [weights.tensors["dora_scale"] for weights in modules.values() if "dora_scale" in weights.tensors]
    if scales:  # what LyCORIS, the usual writer of DoRA files, records (readers go by the tensors)
        metadata["ss_network_module"] = "lycoris.kohya"
        args.update(algo="lora", dora_wd="True", wd_on_output=str(all(s.shape[0] > 1 for s in scales)))
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    return metadata


def kohya_training_header(options: dict, *, steps: int, epoch: int, resolution: int, images: int,
                          class_images: int, clip_skip: int, trains_text_encoder: bool,
                          ema_decay: float | None = None) -> dict[str, str]:
    """The `ss_*` keys kohya's trainer writes about a run, which A1111's and ComfyUI's LoRA browsers
    show: `options` is the run's options by their sdlora names (a TrainConfig as a dict); `ema_decay`
    says that the file holds the exponential moving average of the weights."""
    text_encoder_lr = options.get("text_encoder_lr") or options["lr"]
    return {
        "ss_learning_rate": str(options["lr"]), "ss_unet_lr": str(options["lr"]),
        "ss_text_encoder_lr": str(text_encoder_lr) if trains_text_encoder else "0",
        "ss_optimizer": options["optimizer"], "ss_lr_scheduler": options["lr_scheduler"],
        "ss_resolution": f"({resolution}, {resolution})", "ss_steps": str(steps), "ss_epoch": str(epoch),
        "ss_num_train_images": str(images), "ss_num_reg_images": str(class_images),
        "ss_noise_offset": str(options["noise_offset"]), "ss_min_snr_gamma": str(options["min_snr_gamma"]),
        "ss_clip_skip": str(clip_skip), "ss_max_token_length": str(options["max_token_length"] or 75),
        "ss_zero_terminal_snr": str(options["zero_terminal_snr"]),
        "ss_debiased_estimation": str(options["debiased_estimation"]), "ss_loss_type": options["loss_type"],
        "ss_huber_c": str(options["huber_c"]), "ss_huber_schedule": options["huber_schedule"],
        "ss_seed": str(options["seed"]), "ss_training_comment": "trained with sdlora" + (
            f"; the exponential moving average of the weights (decay {ema_decay})" if ema_decay is not None else ""),
    }
