"""Benchmark: the studio's three goals, measured side by side in one run.

1. Server time for a run's page with 100,000 metric rows (goal: at most 300 ms): the page's HTML and the
   chart's downsampled series, the first time (the whole file parsed) and again (only what was appended
   is read), with the in-process client.
2. From a metrics line written to its point in the page (goal: at most 1 s): `sdlora studio` in its own
   process, the run's page open in headless Chromium; a line is appended to the run's log and the time
   until the chart has one more point is taken, 20 times.
3. A training's seconds per step with the studio watching it and its page open in a browser, against
   the same training unwatched (goal: at most 1.02x): the toy style config, the two conditions
   interleaved, the median of each. On this 2-core machine the browser and the studio share the cores
   with the training: this is the worst case, a training box with a GPU has its CPU mostly idle.

    python bench/studio.py              # about 6 minutes on 2 CPU cores
    python bench/studio.py --repeats 3 --steps 120
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from studio_process import StudioProcess, browser_paths, headless_chrome  # noqa: E402


def fake_run(folder: Path, rows: int) -> None:
    (folder / "logs").mkdir(parents=True)
    (folder / "config.toml").write_text('name = "lora"\nmax_steps = %d\n' % rows)
    with (folder / "logs" / "metrics.jsonl").open("w") as file:
        for step in range(1, rows + 1):
            record = {"step": step, "loss": 0.1 + 1.0 / step, "loss_smoothed": 0.1 + 1.0 / step, "lr": 1e-4,
                      "epoch": step // 100, "time": step * 0.2}
            file.write(json.dumps(record) + "\n")
            if step % 500 == 0:
                file.write(json.dumps({"step": step, "val_loss": 0.2, "time": step * 0.2}) + "\n")


def page_time(rows: int) -> None:
    from starlette.testclient import TestClient

    from sdlora.studio.app import Studio, create_app

    with tempfile.TemporaryDirectory() as folder:
        runs = Path(folder) / "runs"
        fake_run(runs / "long", rows)
        studio = Studio(runs=runs, data=[])
        client = TestClient(create_app(studio, tick=False), base_url="http://localhost")

        def load() -> tuple[float, int]:
            started = time.perf_counter()
            assert client.get("/runs/long").status_code == 200
            answer = client.get("/api/runs/long/metrics?points=900")
            assert answer.status_code == 200
            return (time.perf_counter() - started) * 1000, sum(len(s["step"]) for s in answer.json()["series"].values())

        cold, points = load()
        warm = statistics.median(load()[0] for _ in range(5))
    print(f"1. run page + chart series, {rows:,} metric rows ({points} points sent): first {cold:.0f} ms, "
          f"again {warm:.0f} ms (goal <= 300 ms)")


def latency(repeats: int) -> None:
    paths = browser_paths()
    if paths is None:
        print("2. line -> page: skipped, no chromium/chromedriver here (apt-get install chromium chromium-driver)")
        return
    with tempfile.TemporaryDirectory() as folder:
        runs = Path(folder) / "runs"
        fake_run(runs / "live", 2000)
        metrics = runs / "live" / "logs" / "metrics.jsonl"
        studio = StudioProcess(runs, [], Path(folder) / "studio.log").start()
        driver = headless_chrome()
        try:
            driver.get(studio.url + "/runs/live")
            count = "return Number(document.querySelector('#loss-chart path.raw')?.dataset.points || 0)"
            deadline = time.monotonic() + 30
            while driver.execute_script(count) == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # the event stream is open
            delays = []
            for i in range(repeats):
                before = driver.execute_script(count)
                with metrics.open("a") as file:
                    file.write(json.dumps({"step": 2001 + i, "loss": 0.3, "loss_smoothed": 0.3, "lr": 1e-4,
                                           "time": 1.0}) + "\n")
                written = time.perf_counter()
                while driver.execute_script(count) <= before and time.perf_counter() - written < 10:
                    time.sleep(0.01)
                delays.append(time.perf_counter() - written)
                time.sleep(0.3)
        finally:
            driver.quit()
            studio.stop()
    print(f"2. metrics line -> its point in the page: median {statistics.median(delays) * 1000:.0f} ms, "
          f"max {max(delays) * 1000:.0f} ms over {len(delays)} lines (goal <= 1 s)")


def seconds_per_step(out: Path) -> float:
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]
    first = steps[len(steps) // 5]  # past the first steps' warm-up
    return (steps[-1]["time"] - first["time"]) / (steps[-1]["step"] - first["step"])


def train(out: Path, steps: int) -> float:
    command = [sys.executable, "-m", "sdlora", "train", "--quiet", "--config",
               str(ROOT / "datasets" / "style-outline" / "train.toml"), "--output-dir", str(out),
               "--max-steps", str(steps), "--log-every", "1"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return seconds_per_step(out)


def watched(folder: Path, steps: int, browser: bool) -> float:
    """The training run inside a studio's runs folder, with the run's page open in a browser or not."""
    runs = folder / "runs"
    runs.mkdir(parents=True)
    studio = StudioProcess(runs, [], folder / "studio.log").start()
    driver = None
    try:
        if browser:
            driver = headless_chrome()
        out = runs / "run"
        process = subprocess.Popen([sys.executable, "-m", "sdlora", "train", "--quiet", "--config",
                                    str(ROOT / "datasets" / "style-outline" / "train.toml"), "--output-dir",
                                    str(out), "--max-steps", str(steps), "--log-every", "1"], cwd=ROOT)
        while driver and not (out / "config.toml").exists() and process.poll() is None:
            time.sleep(0.2)
        if driver:
            driver.get(studio.url + "/runs/run")  # open once the run exists, as a user would
        assert process.wait() == 0
        return seconds_per_step(out)
    finally:
        if driver:
            driver.quit()
        studio.stop()


def watched_overhead(repeats: int, steps: int) -> None:
    browser = browser_paths() is not None
    conditions = {"unwatched": [], "studio": [], "studio + browser": []}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for i in range(repeats):  # interleaved, so that a slow spell of the machine hits every condition
            conditions["unwatched"].append(train(folder / f"plain-{i}", steps))
            conditions["studio"].append(watched(folder / f"studio-{i}", steps, browser=False))
            if browser:
                conditions["studio + browser"].append(watched(folder / f"browser-{i}", steps, browser=True))
    base = statistics.median(conditions["unwatched"])
    print(f"3. s/step of the toy style config, {steps} steps, median of {repeats} (goal <= 1.02x):")
    for name, times in conditions.items():
        if times:
            print(f"   {name:18s} {statistics.median(times):.3f} s/step  {statistics.median(times) / base:.3f}x   "
                  f"(each: {', '.join(f'{t:.3f}' for t in times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    page_time(args.rows)
    latency(args.lines)
    watched_overhead(args.repeats, args.steps)


if __name__ == "__main__":
    main()
