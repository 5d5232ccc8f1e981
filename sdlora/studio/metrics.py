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
import threading
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SERIES = ("loss", "loss_smoothed", "lr", "val_loss")


@dataclass
class Columns:
    """Each series as (steps, values), in the order the records came: typed arrays, which numpy reads
    without a copy."""

    steps: dict[str, array] = field(default_factory=lambda: {name: array("q") for name in SERIES})
    values: dict[str, array] = field(default_factory=lambda: {name: array("d") for name in SERIES})

    def add(self, records: list[dict]) -> None:
        for name in SERIES:  # a series at a time, through numpy: a first read of 100,000 rows stays quick
            rows = [record for record in records if name in record]
            try:
                steps = np.array([record["step"] for record in rows], dtype=np.int64)
                values = np.array([record[name] for record in rows], dtype=np.float64)
            except (KeyError, TypeError, ValueError, OverflowError):  # a record written by hand: one at a time
                pairs = [(record.get("step"), record[name]) for record in rows]
                pairs = [(step, float(value)) for step, value in pairs if type(step) is int
                         and type(value) in (int, float)]
                steps = np.array([step for step, _ in pairs], dtype=np.int64)
                values = np.array([value for _, value in pairs], dtype=np.float64)
            finite = np.isfinite(values)
            self.steps[name].frombytes(steps[finite].tobytes())
            self.values[name].frombytes(values[finite].tobytes())

    @property
    def last_step(self) -> int:
        return max((steps[-1] for steps in self.steps.values() if steps), default=0)


def parse_lines(data: bytes) -> list[dict]:
    """The records of complete JSON lines; a broken line (a disk that filled up) is skipped, not fatal."""
    body = data.strip(b"\n")
    if not body:
        return []
    try:  # one parse of the whole chunk as a JSON array: the fastest way through the standard library
        records = json.loads(b"[" + body.replace(b"\n", b",") + b"]")
    except ValueError:
        records = []
        for line in body.split(b"\n"):
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


def downsample(steps, values, buckets: int, first: int | None = None,
               last: int | None = None) -> tuple[list[int], list[float]]:
    """At most four points per bucket of the step range [first, last]: first, min, max and last of each,
    in step order."""
    if not steps:
        return [], []
    low = steps[0] if first is None else first
    high = steps[-1] if last is None else last
    start, end = bisect.bisect_left(steps, low), bisect.bisect_left(steps, high + 1)
    if end - start <= 4 * buckets:
        return list(steps[start:end]), list(values[start:end])
    x = _numbers(steps, np.int64)[start:end].astype(np.float64)
    y = _numbers(values, np.float64)[start:end]
    bucket = np.floor((x - low) / max(1e-9, (high - low) / buckets)).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])  # steps are in order: buckets are runs
    sizes = np.diff(np.r_[starts, len(x)])
    owner = np.repeat(np.arange(len(starts)), sizes)
    keep = [starts, starts + sizes - 1]
    for extreme in (np.minimum, np.maximum):
        hits = np.flatnonzero(y == np.repeat(extreme.reduceat(y, starts), sizes))
        keep.append(hits[np.unique(owner[hits], return_index=True)[1]])  # the first hit of each bucket
    chosen = np.unique(np.concatenate(keep)) + start
    return _numbers(steps, np.int64)[chosen].tolist(), _numbers(values, np.float64)[chosen].tolist()


def _numbers(column, dtype) -> np.ndarray:
    return np.frombuffer(column, dtype=dtype) if isinstance(column, array) else np.asarray(column, dtype=dtype)


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
        start = bisect.bisect_left(steps, step + 1)
        start = max(start, len(steps) - limit)
        series[name] = {"step": steps[start:].tolist(), "value": columns.values[name][start:].tolist()}
    return {"series": series, "last_step": columns.last_step}
