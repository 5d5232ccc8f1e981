"""bench/gpu.sh, the one GPU run: without CUDA it says so and stops before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole GPU bench")
def test_the_gpu_bench_refuses_clearly_without_cuda():
    result = subprocess.run(["bash", "bench/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stderr.startswith("bench/gpu.sh: no CUDA device here (torch ")
    assert "run it on a machine with an NVIDIA GPU" in result.stderr and result.stdout == ""
