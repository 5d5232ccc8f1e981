"""Training checkpoints: a folder per step with the adapter (fp32) and the full training state.

A checkpoint is written into a hidden folder, each file fsynced, and renamed into place, so a kill
or a power cut leaves either the whole checkpoint or none; rewriting a step replaces the old folder
only once the new one is complete. State is read back with `torch.load(weights_only=True)`: tensors,
numbers, strings and containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from ..reliability.durable import TEMPORARY_SUFFIX, publish_folder, recover_folder, remove_tree, write_file
from ..errors import ConfigError

STEP_FOLDER = re.compile(r"^step-(\d+)$")
ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "state.pt"


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints.is_dir():
        return []
    for aside in checkpoints.glob(".step-*.previous"):  # a replacement that a kill interrupted
        recover_folder(checkpoints / aside.name[1:].removesuffix(".previous"))
    found = [p for p in checkpoints.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name)
             and (p / STATE_FILE).is_file() and (p / ADAPTER_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_FOLDER.match(p.name).group(1)))


def resolve_resume(resume: str, checkpoints: Path) -> Path:
    """The folder `--resume` names: a checkpoint folder, or 'latest' in this run's checkpoints."""
    if resume == "latest":
        folders = checkpoint_folders(checkpoints)
        if not folders:
            raise ConfigError(f"--resume latest: no checkpoint in {checkpoints} (write some with --save-every)")
        return folders[-1]
    folder = Path(resume)
    if not (folder / STATE_FILE).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise ConfigError(f"--resume {resume}: not a checkpoint folder (it needs {ADAPTER_FILE} and "
                                f"{STATE_FILE})")
    return folder


def checkpoint_folder(checkpoints: Path, step: int) -> Path:
    return checkpoints / f"step-{step:06d}"


def save_checkpoint(checkpoints: Path, step: int, write_adapter, state: dict, keep: int) -> Path:
    """Write step-NNNNNN/: write_adapter(path) writes the adapter, `state` is torch-saved. On a failure
    nothing of the new checkpoint is left and the older ones are untouched."""
    final = checkpoint_folder(checkpoints, step)
    partial = checkpoints / f".{final.name}{TEMPORARY_SUFFIX}"
    try:
        remove_tree(partial)
        write_adapter(partial / ADAPTER_FILE)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        write_file(partial / STATE_FILE, buffer.getvalue())
        publish_folder(partial, final)
    except BaseException:
        remove_tree(partial)
        recover_folder(final)
        raise
    for old in checkpoint_folders(checkpoints)[:-keep] if keep > 0 else []:
        remove_tree(old)
    return final


def load_state(folder: Path) -> dict:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def rng_states() -> dict:
    """Global RNG states, saved so that anything drawing from them (dropout) resumes exactly too."""
    import random

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_version": random.getstate()[0], "python_gauss": random.getstate()[2]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
