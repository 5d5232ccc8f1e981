"""Benchmark: how much a CPU training slows down when a second one shares its cores, per thread policy.

For each policy the same short `sdlora train` (the bundled toy model and style dataset, each run in
its own process) runs alone, then twice at once. The table gives seconds per training step (setup
excluded, from the run's metrics log) and the ratio two-at-once / alone. One run already keeps every
core busy, so two at once should take about 2x per step; far more means that the runs fight for the
cores instead of sharing them. The last column compares each policy's run alone with sdlora's: the
price of the policy when nothing else runs.

The policies (the environment each run gets; the command fills in what is not set, see
sdlora/threads.py):
  sdlora        nothing set: the command's choice, a 1000-pause spin then sleep, one thread per core
  old default   GOMP_SPINCOUNT=300000: libgomp's own default, what sdlora ran with before
  ACTIVE        OMP_WAIT_POLICY=ACTIVE: waiting threads spin for minutes
  PASSIVE       OMP_WAIT_POLICY=PASSIVE: waiting threads sleep at once
  1 thread      OMP_NUM_THREADS=1: no OpenMP team to wait for, but one core per run

A run still going after --budget seconds is stopped and timed on the steps it finished; when none
had finished, the table says so. The spinning policies vary from one try to the next (two at once
with the old default took 0.5 s and 18 s per step on the same machine, minutes apart): --repeats
shows the spread. Compare within one invocation only; on a shared machine absolute times are noise.

    python bench/threads.py                  # about 3 minutes on 2 CPU cores
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


def seconds_per_step(out: Path) -> float | None:
    """Mean step time from the metrics log (written every step, so also when the run was stopped)."""
    path = out / "logs" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [record for record in records if "loss" in record]
    return steps[-1]["time"] / steps[-1]["step"] if steps else None


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


def show(value: float | None, form: str, missing: str = "-") -> str:
    return missing if value is None else form.format(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (default: %(default)s)")
    parser.add_argument("--budget", type=float, default=40,
                        help="seconds before a measurement is stopped (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="median over this many rounds (default: %(default)s)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    alone = {name: [] for name in POLICIES}
    together = {name: [] for name in POLICIES}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, policy in POLICIES.items():
                alone[name] += measure(policy, 1, Path(workdir), args)
                together[name] += measure(policy, 2, Path(workdir), args)
                print(f"measured {name}", file=sys.stderr, flush=True)

    print(f"`sdlora train`, {args.steps} steps of datasets/style-outline, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} before")
    print(f"{'policy':<12} {'alone s/step':>13} {'two at once s/step':>19} {'two/alone':>10} {'alone/sdlora':>13}")
    ours, stopped = median(alone["sdlora"]), f"no step in {args.budget:g} s"
    for name in POLICIES:
        one, two = median(alone[name]), median(together[name])
        ratio = two / one if one and two else None
        price = one / ours if one and ours else None
        print(f"{name:<12} {show(one, '{:.3f}', stopped):>13} {show(two, '{:.3f}', stopped):>19} "
              f"{show(ratio, '{:.2f}x'):>10} {show(price, '{:.2f}x'):>13}")


if __name__ == "__main__":
    main()
