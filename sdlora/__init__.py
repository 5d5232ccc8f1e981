"""sdlora: train and use LoRA adapters for Stable Diffusion."""

from .adapter import AdapterFileError, read_adapter
from .loader import (
    AdapterInfo,
    add_adapter,
    adapter_weights,
    copy_weights_from,
    disabled,
    fuse,
    list_adapters,
    load,
    save,
    set_strength,
    trainable_parameters,
    unfuse,
    unload,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "AdapterInfo",
    "add_adapter",
    "adapter_weights",
    "copy_weights_from",
    "disabled",
    "fuse",
    "list_adapters",
    "load",
    "read_adapter",
    "save",
    "set_strength",
    "trainable_parameters",
    "unfuse",
    "unload",
]
