"""Benchmark: images per second of one `sdlora train` with 1 process and with 2, at the same global batch.

Both train the bundled toy model on datasets/style-outline with the same global batch (--batch images
per step: 1 process x batch, or 2 processes x batch/2, under torchrun), so they are the same run (see
docs/distributed.md) and only the speed differs. On a CPU each process gets --threads threads
(default 1, so that 2 processes use 2 cores where 1 process uses 1: the ratio is what a second core
brings through data parallelism, against what the same core brings to one process's OpenMP threads,
shown as the third row). With CUDA, each process gets a GPU and the processes are the GPUs' count.
Images per second come from the run's own metrics (setup and caching excluded).

    python bench/scaling.py                       # about 2 minutes on 2 CPU cores
    python bench/scaling.py --steps 60 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(out: Path, batch: int, warmup: int) -> float:
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    steps = [record for record in map(json.loads, lines) if "loss" in record]
    first, last = steps[warmup - 1], steps[-1]
    return (last["step"] - first["step"]) * batch / (last["time"] - first["time"])


def run(processes: int, threads: int, args, workdir: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m"]
                if processes > 1 else [sys.executable, "-m"])
    command = [*launcher, "sdlora", "train", "--config", "datasets/style-outline/train.toml", "--quiet",
               "--output-dir", str(out), "--max-steps", str(args.steps), "--log-every", "1",
               "--batch-size", str(args.batch // processes)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return images_per_second(out, args.batch, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--steps", type=int, default=40, help="steps per run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="global batch, even (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process (default: %(default)s)")
    args = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    many = max(2, gpus)
    with tempfile.TemporaryDirectory() as workdir:
        rows = [(f"1 process x {args.threads} thread(s)", 1, run(1, args.threads, args, Path(workdir)))]
        name = f"{many} processes x {args.threads} thread(s)"
        rows.append((name, many, run(many, args.threads, args, Path(workdir))))
        if not gpus:
            rows.append((f"1 process x {2 * args.threads} threads", 1, run(1, 2 * args.threads, args, Path(workdir))))
    device = f"{gpus} GPU(s)" if gpus else f"{os.cpu_count()} CPU cores"
    print(f"`sdlora train`, datasets/style-outline, global batch {args.batch}, {args.steps} steps, {device}")
    print(f"{'':<28} {'images/s':>9} {'ratio to 1 process':>19}")
    for name, _, speed in rows:
        print(f"{name:<28} {speed:>9.1f} {speed / rows[0][2]:>18.2f}x")


if __name__ == "__main__":
    main()
