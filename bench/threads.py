"""Benchmark: seconds per step of a CPU training alone and with a second one on its cores, per thread policy.

For each policy the same short `sdlora train` (the bundled toy model and style dataset, each run in
its own process) runs alone; then twice, started together; then twice staggered: the second starts
once the first trains (which so started alone and keeps what it chose then), and the first has four
times the steps, so that it outlasts the second. The table gives seconds per training step (setup
excluded, from the run's metrics log; started together, the mean of both; staggered, the second's) and,
for each case, the ratio to the best policy of that case. One run already keeps every core busy, so
two at once should take about 2x per step; far more means that the runs fight for the cores.

The policies (the environment each run gets; the command fills in what is not set, see
sdlora/threads.py):
  sdlora        nothing set: the command's choice from the situation at start: a 300,000-pause spin
                (~7 ms) alone, 1000 pauses when another sdlora command runs or the cores are busy
  spin 1000     GOMP_SPINCOUNT=1000: sdlora's choice for every run before
  spin 300000   GOMP_SPINCOUNT=300000: libgomp's own default
  ACTIVE        OMP_WAIT_POLICY=ACTIVE: waiting threads spin for minutes
  PASSIVE       OMP_WAIT_POLICY=PASSIVE: waiting threads sleep at once
  1 thread      OMP_NUM_THREADS=1: no OpenMP team to wait for, but one core per run

A run still going after --budget seconds is stopped and timed on the steps it finished; when none
had finished, the table says so. The spinning policies vary from one try to the next (two at once
with the old default took 0.5 s and 18 s per step on the same machine, minutes apart): --repeats
shows the spread. Compare within one invocation only; on a shared machine absolute times are noise.

    python bench/threads.py                  # about 8 minutes on 2 CPU cores
    python bench/threads.py --repeats 3      # median of 3, policies interleaved
    python bench/threads.py --setting peers  # bench/peers.py's settings: batch 4, rank 4 on attention
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

from peers import BATCH, LR, RANK  # bench/peers.py, beside this script: the comparison's settings

ROOT = Path(__file__).resolve().parents[1]
THREAD_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
POLICIES = {
    "sdlora": {},
    "spin 1000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"},
    "spin 300000": {"GOMP_SPINCOUNT": "300000"},
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


# --setting: the style demo's own config, or the peer comparison's (bench/peers.py: batch 4, rank 4 on
# attention), whose ops are so small that the wait between them weighs most.
SETTINGS = {
    "style": ["--config", "datasets/style-outline/train.toml"],
    "peers": ["--model", "models/toy-sd1", "--data", "datasets/style-outline", "--resolution", "32",
              "--batch-size", str(BATCH), "--rank", str(RANK), "--alpha", str(RANK), "--targets", "attn",
              "--lr", str(LR)],
}


def start(env: dict, workdir: Path, steps: int, setting: str):
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    command = [sys.executable, "-m", "sdlora", "train", *SETTINGS[setting], "--output-dir", str(out),
               "--max-steps", str(steps), "--log-every", "1", "--quiet"]
    stderr = open(out.parent / "stderr", "w")
    return out, stderr, subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def measure(policy: dict[str, str], case: str, workdir: Path, args: argparse.Namespace) -> list[float | None]:
    """Seconds per step of the runs `case` times (see the module's text)."""
    env = {key: value for key, value in os.environ.items() if key not in THREAD_ENV} | policy
    deadline = time.monotonic() + args.budget
    if case == "alone":
        runs = [start(env, workdir, args.steps, args.setting)]
    elif case == "two together":
        runs = [start(env, workdir, args.steps, args.setting), start(env, workdir, args.steps, args.setting)]
    else:
        first = start(env, workdir, 4 * args.steps, args.setting)
        metrics = first[0] / "logs" / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()) and first[2].poll() is None:
            time.sleep(0.1)
        runs = [first, start(env, workdir, args.steps, args.setting)]
        deadline = time.monotonic() + args.budget
    timed = runs[1:] if case == "two staggered" else runs  # staggered: the first only keeps the cores busy
    for out, stderr, process in timed:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for out, stderr, process in runs:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()
        if process.returncode > 0:
            raise RuntimeError(f"sdlora train failed:\n{(out.parent / 'stderr').read_text()[-2000:]}")
    return [seconds_per_step(out) for out, _, _ in timed]


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
    parser.add_argument("--setting", choices=SETTINGS, default="style",
                        help="style: the demo's train.toml; peers: bench/peers.py's settings (default: %(default)s)")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help="which, comma-separated (default: all: %(default)s)")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    cases = ("alone", "two together", "two staggered")
    policies = {name: POLICIES[name] for name in args.policies.split(",")}
    times = {case: {name: [] for name in policies} for case in cases}
    with tempfile.TemporaryDirectory() as workdir:
        for _ in range(args.repeats):
            for name, policy in policies.items():
                for case in cases:
                    times[case][name] += measure(policy, case, Path(workdir), args)
                print(f"measured {name}", file=sys.stderr, flush=True)

    print(f"`sdlora train`, {args.steps} steps of datasets/style-outline ({args.setting} setting), "
          f"{os.cpu_count()} CPUs, load average {load:.1f} before; s/step (ratio to the best policy of the case)")
    print(f"{'policy':<12}" + "".join(f" {case:>22}" for case in cases))
    stopped = f"none in {args.budget:g} s"
    medians = {case: {name: median(values) for name, values in by.items()} for case, by in times.items()}
    best = {case: min((v for v in by.values() if v), default=None) for case, by in medians.items()}
    for name in policies:
        cells = []
        for case in cases:
            value = medians[case][name]
            ratio = f" ({value / best[case]:.2f}x)" if value and best[case] else ""
            cells.append(f" {show(value, '{:.3f}', stopped) + ratio:>22}")
        print(f"{name:<12}" + "".join(cells))


if __name__ == "__main__":
    main()
