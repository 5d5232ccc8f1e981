"""sdlora: train and use LoRA adapters for Stable Diffusion.

Where things live (docs/architecture.md has every module):

    loader.py                 the API below: load, set_strength, disabled, fuse, unfuse, unload, save
    adapters/lora.py          the LoRA layer: the Adapter contract, LoRA, and AdaptedLayer (the wrapper);
                              the LyCORIS kinds in adapters/lycoris.py
    files/                    the adapter file on disk: safetensors.py (read, write, header),
                              layouts.py (other tools' layouts), names.py (key names)
    training/loop.py          the training loop; training/setup.py builds what it runs on
    base_models/families.py   what differs between SD 1.x, SD 2.x and SDXL; base_models/sources.py has
                              load_pipeline (a folder, a hub id or one checkpoint file, offline)
    tools/                    one module per command: inspect, convert, merge, extract, bake, generate
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below imports them
    from .base_models.sources import load_pipeline
    from .files.safetensors import read_adapter
    from .errors import AdapterFileError, ConfigError, DataError, FamilyMismatch, ModelError, SdloraError
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
        step_windows,
        trainable_parameters,
        unfuse,
        unload,
    )

__version__ = "0.1.0"

_ERRORS = ("AdapterFileError", "ConfigError", "DataError", "FamilyMismatch", "ModelError", "SdloraError")
__all__ = [
    "AdapterFileError",
    "ConfigError",
    "DataError",
    "FamilyMismatch",
    "ModelError",
    "SdloraError",
    "AdapterInfo",
    "add_adapter",
    "adapter_weights",
    "copy_weights_from",
    "disabled",
    "fuse",
    "list_adapters",
    "load",
    "load_pipeline",
    "read_adapter",
    "save",
    "set_strength",
    "step_windows",
    "trainable_parameters",
    "unfuse",
    "unload",
]


def __getattr__(name: str):
    # The public names load on first use (PEP 562), so that `import sdlora` does not import torch:
    # the command line (sdlora/__main__.py) is inside this package and must set the OpenMP thread
    # policy before torch loads (sdlora/threads.py). Library users get the same names as before.
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    if name == "load_pipeline":
        from .base_models.sources import load_pipeline

        return load_pipeline
    from . import loader  # defines or imports every other public name

    return getattr(loader, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
