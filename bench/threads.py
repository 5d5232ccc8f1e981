"""Benchmark: how much a CPU training slows down when a second one shares its cores, per thread policy.

For each policy the same short `sdlora train` (the bundled toy model and style dataset, each run in
its own process) runs alone, then twice at once. The table gives seconds per training step (setup and
the first steps excluded, read from the run's metrics log) and the ratio two-at-once / alone. One run
already keeps every core busy, so two at once should take about 2x per step: a ratio far above that
means the runs fight for the cores instead of sharing them. The last column compares each policy's
run alone with sdlora's, the price of the policy when nothing else runs.

The policies (the environment each run gets; the command fills in what is not set, see
sdlora/threads.py):
  sdlora        nothing set: the command's choice, a 1000-pause spin then sleep, one thread per core
  old default   GOMP_SPINCOUNT=300000: libgomp's own default (what sdlora ran with before)
  ACTIVE        OMP_WAIT_POLICY=ACTIVE: waiting threads spin for minutes
  PASSIVE       OMP_WAIT_POLICY=PASSIVE: waiting threads sleep at once
  1 thread      OMP_NUM_THREADS=1: no OpenMP team to wait for, but one core per run

A run still going after --budget seconds is stopped and timed on the steps it finished ('-': fewer
than two). Measure side by side in one invocation: on a shared machine absolute times are noise.

    python bench/threads.py                  # about 5 minutes on 2 CPU cores
    python bench/threads.py --repeats 3      # median of 3, policies interleaved
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
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
POLICIES = {
    "sdlora": {},
    "old default": {"GOMP_SPINCOUNT": "300000"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
WARMUP_STEPS = 3  # not timed: the first steps allocate and warm caches


def seconds_per_step(out: Path) -> float | None:
    """Mean step time after the warm-up, from the metrics log (written every step, also when stopped)."""
    path = out / "logs" / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    times = {record["step"]: record["time"] for record in map(json.loads, lines) if "loss" in record}
    steps = sorted(step for step in times if step >= WARMUP_STEPS)
    if len(steps) < 2:
        return None
    return (times[steps[-1]] - times[steps[0]]) / (steps[-1] - steps[0])


def measure(policy: dict[str, str], copies: int, workdir: Path, args: argparse.Namespace) -> list[float | None]:
    """Start `copies` identical trainings at once; seconds per step of each."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_ENV} | policy
    runs = []
    for _ in range(copies):
        out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
        command = [sys.executable, "-m", "sdlora", "train", "--config", "datasets/style-outline/train.toml",
                   "--output-dir", str(out), "--max-steps", str(args.steps), "--log-every", "1", "--quiet"]
        stderr = open(out.parent / "stderr", "w")
        runs.append((out, stderr, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                                   stderr=stderr)))
    deadline = time.monotonic() + args.budget
    for out, stderr, process in runs:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        stderr.close()
        if process.returncode > 0:
            raise RuntimeError(f"sdlora train failed:\n{(out.parent / 'stderr').read_text()[-2000:]}")
    return [seconds_per_step(out) for out, _, _ in runs]


def median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def show(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.3f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=60,
                        help="seconds before a measurement is stopped (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="median over this many rounds (default: %(default)s)")
    args = parser.parse_args()

    alone = {name: [] for name in POLICIES}
    together = {name: [] for name in POLICIES}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, policy in POLICIES.items():
                alone[name] += measure(policy, 1, Path(workdir), args)
                together[name] += measure(policy, 2, Path(workdir), args)
                print(f"measured {name}", file=sys.stderr, flush=True)

    print(f"`sdlora train`, {args.steps} steps of datasets/style-outline, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'policy':<12} {'alone s/step':>13} {'two at once s/step':>19} {'two/alone':>10} {'alone/sdlora':>13}")
    for name in POLICIES:
        one, two = median(alone[name]), median(together[name])
        ratio = two / one if one and two else None
        price = one / median(alone["sdlora"]) if one and median(alone["sdlora"]) else None
        print(f"{name:<12} {show(one):>13} {show(two):>19} {show(ratio, 'x'):>10} {show(price, 'x'):>13}")


if __name__ == "__main__":
    main()
