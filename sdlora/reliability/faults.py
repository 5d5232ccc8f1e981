"""Test hooks that make a run fail at a chosen moment, set through SDLORA_TEST_FAULT.

- `kill:POINT:N[:NAME]` kills the process (SIGKILL) the N-th time it reaches POINT (for a file
  named NAME, if given): `write` (half of a file written), `rename` (a file complete under its
  temporary name), `publish` (a checkpoint folder between the two renames that replace an older
  one of the same step), `step` (after an optimizer step). A timer alone would hit these moments
  only by luck.
- `nan:STEP` makes the loss of that step NaN.
Unset, as it is outside the tests, each hook is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def _spec() -> list[str]:
    return os.environ.get("SDLORA_TEST_FAULT", "").split(":")


def kill_point(point: str, name: str = "") -> None:
    spec = _spec()
    if spec[0] != "kill" or spec[1] != point or (len(spec) > 3 and spec[3] != name):
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(spec[2]):
        os.kill(os.getpid(), signal.SIGKILL)


def nan_at(step: int) -> bool:
    spec = _spec()
    return spec[0] == "nan" and int(spec[1]) == step
