"""The studio's metrics reader and downsampling, against plain recomputation."""

from __future__ import annotations

import json
import os
import random

from sdlora.studio.metrics import MetricsCache, chart_series, downsample, records_after


def write(path, records, mode="a"):
    with path.open(mode) as file:
        for record in records:
            file.write(json.dumps(record) + "\n")


def test_downsampling_keeps_each_buckets_first_lowest_highest_and_last_point():
    rng = random.Random(0)
    steps = list(range(1, 100_001))
    values = [rng.random() for _ in steps]
    values[51_234] = 50.0  # a spike must survive
    values[77_777] = -3.0
    shown_steps, shown_values = downsample(steps, values, 500)
    assert len(shown_steps) <= 4 * 500 and shown_steps == sorted(shown_steps)
    assert 50.0 in shown_values and -3.0 in shown_values
    assert shown_steps[0] == 1 and shown_steps[-1] == 100_000
    # each bucket's extremes equal the full series' extremes over that bucket
    width = (100_000 - 1) / 500
    for bucket in (0, 123, 499):
        inside = [v for s, v in zip(steps, values) if int((s - 1) / width) == bucket]
        kept = [v for s, v in zip(shown_steps, shown_values) if int((s - 1) / width) == bucket]
        assert max(kept) == max(inside) and min(kept) == min(inside)


def test_a_zoomed_range_and_a_short_series_come_back_whole():
    steps, values = list(range(10)), [float(i) for i in range(10)]
    assert downsample(steps, values, 100) == (steps, values)
    assert downsample(steps, values, 100, first=3, last=5) == ([3, 4, 5], [3.0, 4.0, 5.0])


def test_the_reader_reads_only_what_was_appended_and_waits_for_a_whole_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, [{"step": i, "loss": 1.0 / i, "lr": 1e-4} for i in range(1, 11)])
    cache = MetricsCache()
    assert list(cache.read(path).steps["loss"]) == list(range(1, 11))
    with path.open("a") as file:
        file.write(json.dumps({"step": 11, "loss": 0.5}) + "\n" + '{"step": 12, "lo')  # a line being written
    columns = cache.read(path)
    assert columns.steps["loss"][-1] == 11 and columns.last_step == 11
    with path.open("a") as file:
        file.write('ss": 0.25}\n')
    assert list(cache.read(path).values["loss"][-2:]) == [0.5, 0.25]
    assert records_after(cache.read(path), 10)["series"]["loss"] == {"step": [11, 12], "value": [0.5, 0.25]}


def test_a_replaced_log_is_read_again_and_broken_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, [{"step": i, "loss": 1.0} for i in range(1, 21)])
    cache = MetricsCache()
    assert cache.read(path).last_step == 20
    replacement = tmp_path / "new.jsonl"  # a resumed run trims its log by replacing the file
    write(replacement, [{"step": i, "loss": 2.0} for i in range(1, 6)])
    replacement.write_text(replacement.read_text() + "not json\n" + json.dumps({"step": 6, "val_loss": 3.0}) + "\n")
    os.replace(replacement, path)
    columns = cache.read(path)
    assert list(columns.steps["loss"]) == [1, 2, 3, 4, 5] and list(columns.values["loss"]) == [2.0] * 5
    assert list(columns.steps["val_loss"]) == [6]
    assert chart_series(columns)["series"]["val_loss"] == {"step": [6], "value": [3.0]}
