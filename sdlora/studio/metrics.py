"""A run's metrics (logs/metrics.jsonl) for a chart: read incrementally, downsampled on the server.

A long run logs 100,000 steps and more; the browser never reads the whole file. `MetricsCache` keeps
each file's records as columns and reads only what was appended since the last look (a file that
shrank or was replaced, as a resumed run trims its log, is read again from the start). `downsample`
keeps, per pixel column of the chart, the first, lowest, highest and last point: the drawn line then
looks exactly as the full series would (spikes included), from at most four points a column.
"""

from __future__ import annotations

import bisect
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

SERIES = ("loss", "loss_smoothed", "lr", "val_loss")


@dataclass
class Columns:
    """Each series as (steps, values), in the order the records came."""

    steps: dict[str, list[int]] = field(default_factory=lambda: {name: [] for name in SERIES})
    values: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in SERIES})

    def add(self, records: list[dict]) -> None:
        for record in records:
            step = record.get("step")
            if not isinstance(step, int):
                continue
            for name in SERIES:
                value = record.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.steps[name].append(step)
                    self.values[name].append(float(value))

    @property
    def last_step(self) -> int:
        return max((steps[-1] for steps in self.steps.values() if steps), default=0)


def parse_lines(data: bytes) -> list[dict]:
    """The records of complete JSON lines; a broken line (a disk that filled up) is skipped, not fatal."""
    lines = [line for line in data.split(b"\n") if line.strip()]
    try:  # one parse of the whole chunk is several times faster than one per line
        records = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return [record for record in records if isinstance(record, dict)]


@dataclass
class _Entry:
    identity: tuple[int, int]  # (device, inode): a replaced file is another file
    offset: int  # bytes read so far, always at a line end
    columns: Columns


class MetricsCache:
    """Columns of every metrics file looked at, brought up to date on each `read`."""

    def __init__(self):
        self._entries: dict[Path, _Entry] = {}
        self._lock = threading.Lock()

    def read(self, path: Path) -> Columns:
        with self._lock:
            try:
                stat = path.stat()
            except FileNotFoundError:
                self._entries.pop(path, None)
                return Columns()
            entry = self._entries.get(path)
            identity = (stat.st_dev, stat.st_ino)
            if entry is None or entry.identity != identity or stat.st_size < entry.offset:
                entry = _Entry(identity, 0, Columns())
                self._entries[path] = entry
            if stat.st_size > entry.offset:
                with path.open("rb") as file:
                    file.seek(entry.offset)
                    data = file.read(stat.st_size - entry.offset)
                complete = data.rfind(b"\n") + 1  # a line being written is read next time
                entry.columns.add(parse_lines(data[:complete]))
                entry.offset += complete
            return entry.columns


def downsample(steps: list[int], values: list[float], buckets: int, first: int | None = None,
               last: int | None = None) -> tuple[list[int], list[float]]:
    """At most four points per bucket of the step range [first, last]: first, min, max and last of each,
    in step order."""
    if not steps:
        return [], []
    low = steps[0] if first is None else first
    high = steps[-1] if last is None else last
    start, end = _bisect(steps, low), _bisect(steps, high + 1)
    if end - start <= 4 * buckets:
        return steps[start:end], values[start:end]
    width = max(1e-9, (high - low) / buckets)
    out_steps, out_values = [], []
    i = start
    while i < end:
        bucket = int((steps[i] - low) / width)
        j = i
        lowest = highest = i
        while j < end and int((steps[j] - low) / width) == bucket:
            if values[j] < values[lowest]:
                lowest = j
            if values[j] > values[highest]:
                highest = j
            j += 1
        for k in sorted({i, lowest, highest, j - 1}):
            out_steps.append(steps[k])
            out_values.append(values[k])
        i = j
    return out_steps, out_values


def _bisect(steps: list[int], step: int) -> int:
    return bisect.bisect_left(steps, step)


def chart_series(columns: Columns, points: int = 1000, first: int | None = None, last: int | None = None) -> dict:
    """Every series downsampled to about `points` columns over [first, last] (the zoomed range)."""
    series = {}
    for name in SERIES:
        steps, values = downsample(columns.steps[name], columns.values[name], points, first, last)
        series[name] = {"step": steps, "value": values}
    return {"series": series, "last_step": columns.last_step}


def records_after(columns: Columns, step: int, limit: int = 5000) -> dict:
    """The raw points after `step` (what a live chart appends), at most `limit` per series."""
    series = {}
    for name in SERIES:
        steps = columns.steps[name]
        start = _bisect(steps, step + 1)
        start = max(start, len(steps) - limit)
        series[name] = {"step": steps[start:], "value": columns.values[name][start:]}
    return {"series": series, "last_step": columns.last_step}
