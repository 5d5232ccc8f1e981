#!/usr/bin/env bash
# Every GPU figure sdlora states, in one run on one CUDA GPU (about 8 minutes on an H100-class card):
#   1. SD 1.5 (the shipped config, random weights) at 512 px, batch 1 and 4; SDXL base at 1024 px, batch 1;
#      bf16; latents and text cached; gradient checkpointing off and on; and "uncached" (the VAE and the
#      text encoders every step, as the diffusers LoRA example trains). bench/train.py prints for each
#      s/step, images/s (batch / s), peak VRAM (torch.cuda.max_memory_allocated; the driver's figure is
#      nvidia-smi's, printed before and after) and the ratio to the bare UNet forward + backward.
#   2. The GPU tests: pytest -m gpu (fp16 and bf16 training, AdamW8bit, checkpointing, fp16 fuse/unfuse,
#      no host sync in a step that does not log, VAE and text encoders off the GPU once cached).
# Goals (docs/benchmarks.md): SDXL 1024 px batch 1 cached + checkpointing <= 6 GB peak; a step <= 1.05x
# the bare forward + backward; >= 1.5x the uncached (diffusers example's) way.
#
#   bash bench/gpu.sh            # on a machine with CUDA; prints the tables, exits with the tests' status
# Without CUDA it says so and exits 2 before doing anything.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device here (torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not installed')): run it on a machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi

driver() { nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"; }
section() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
status=0

section "GPU"; driver
section "SD 1.5, 512 px, batch 1"
timeout 150 "$PYTHON" bench/train.py --arch sd15 --resolution 512 --batch 1 --steps 10 --warmup 3 \
    --mixed-precision bf16 --runs cached,cached-gc,uncached || status=1
section "SD 1.5, 512 px, batch 4"
timeout 120 "$PYTHON" bench/train.py --arch sd15 --resolution 512 --batch 4 --steps 10 --warmup 3 \
    --mixed-precision bf16 --runs cached,cached-gc || status=1
section "SDXL base, 1024 px, batch 1"
timeout 200 "$PYTHON" bench/train.py --arch sdxl --resolution 1024 --batch 1 --steps 5 --warmup 2 \
    --mixed-precision bf16 --runs cached,cached-gc,uncached --sdxl-vram || status=1
section "driver after"; driver
section "GPU tests"
timeout 120 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py || status=1
exit $status
