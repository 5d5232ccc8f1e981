"""Test hooks that make a run fail at a chosen moment, set through SDLORA_TEST_FAULT.

- `kill:POINT:N[:NAME]` kills the process (SIGKILL) the N-th time it reaches POINT (for a file
  named NAME, if given): `write` (half of a file written), `rename` (a file complete under its
  temporary name), `publish` (a checkpoint folder between the two renames that replace an older
  one of the same step), `step` (after an optimizer step). A timer alone would hit these moments
  only by luck.
- `nan:STEP[:RANK]` makes the loss of that step NaN (in process RANK alone, if given).
- `perturb:STEP:RANK` changes one adapter weight of process RANK after that step by one bit's worth:
  what `--check-ranks` must catch.
- `kill:...` with SDLORA_TEST_FAULT_RANK=R acts in process R of a multi-process run alone.
Unset, as it is outside the tests, each hook is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _spec() -> list[str]:
    return os.environ.get("SDLORA_TEST_FAULT", "").split(":")


def kill_point(point: str, name: str = "", rank: int = 0) -> None:
    spec = _spec()
    if spec[0] != "kill" or spec[1] != point or (len(spec) > 3 and spec[3] != name):
        return
    if int(os.environ.get("SDLORA_TEST_FAULT_RANK", rank)) != rank:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(spec[2]):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_at(step: int, rank: int = 0) -> bool:
    spec = _spec()
    return spec[0] == "nan" and int(spec[1]) == step and (len(spec) < 3 or int(spec[2]) == rank)


def perturb_at(step: int, rank: int, parameters) -> None:
    spec = _spec()
    if spec[0] == "perturb" and int(spec[1]) == step and int(spec[2]) == rank:
        import torch

        with torch.no_grad():
            flat = parameters[0].view(-1)
            flat[0] = torch.nextafter(flat[0], flat[0] + 1)
