"""The run's log: metrics.jsonl (one JSON record per line) and, when installed, TensorBoard.

Made once, by the main process only; the other processes of a multi-process run get `None` and log
nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..reliability.durable import failure, write_text


class RunLog:
    """Appends records to `folder/metrics.jsonl`, continuing a resumed run's log cleanly."""

    def __init__(self, folder: Path, resumed_step: int | None):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        trim_metrics(self.path, resumed_step)
        self.file = self.path.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(folder))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as error:
            raise failure(self.path, error) from error
        if self.tensorboard:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def image(self, tag: str, image, step: int) -> None:
        if self.tensorboard:
            import numpy as np

            self.tensorboard.add_image(tag, np.array(image), step, dataformats="HWC")

    def sync(self) -> None:
        """Make every record so far durable (before a checkpoint, so the log reaches at least as far)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as error:
            raise failure(self.path, error) from error

    def close(self) -> None:
        self.file.close()
        if self.tensorboard:
            self.tensorboard.close()


def trim_metrics(path: Path, resumed_step: int | None) -> None:
    """Make the log continue cleanly: drop a line a kill cut in half and, on resume, the records of
    the steps after the checkpoint, which the resumed run logs again."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if record is not None and (resumed_step is None or record.get("step", 0) <= resumed_step):
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(kept))
