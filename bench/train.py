"""Benchmark: seconds per step and peak memory of `sdlora train`, next to the floor it cannot beat.

The floor is the bare UNet's forward + backward for the same batch (gradients through every
activation, no optimizer, no data, no text encoder). sdlora is measured with latent and text caching
on and off, and with `preserve_outside_window` (a timestep window of [0, 500): about half of each
batch also needs the frozen model's prediction, a forward pass without gradients). Each measurement
runs in its own process so that its peak memory is its own; all of them run in one invocation and
are printed as ratios.

    python bench/train.py                     # a couple of minutes on 2 CPU cores
    python bench/train.py --width 320 --resolution 512 --batch 4    # SD 1.5-sized UNet, on a GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sdlora.threads import use_cpu_policy

use_cpu_policy()  # before torch loads OpenMP, as the sdlora command does

import torch


def build_model(folder: Path, width: int) -> None:
    """An SD 1.x-layout pipeline with a UNet of the given width and the tiny VAE (2x downsampling)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from sdlora.toy.pipelines import build_clip_tokenizer, tiny_text_encoder, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(width, 2 * width, 4 * width, 4 * width), cross_attention_dim=768,
                                attention_head_dim=8, norm_num_groups=min(32, width // 2))
    tokenizer = build_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer), hidden_size=768), tokenizer=tokenizer,
        unet=unet, scheduler=DDPMScheduler(beta_schedule="scaled_linear"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def build_data(folder: Path, resolution: int, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture number {i}")


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_worker(args) -> dict:
    """UNet forward + backward (to the activations) on a batch shaped like the trainer's."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(args.device)
    unet.requires_grad_(False)
    unet.train()
    latent = args.resolution // 2
    sample = torch.randn(args.batch, 4, latent, latent, device=args.device, requires_grad=True)
    context = torch.randn(args.batch, 77, 768, device=args.device)
    timesteps = torch.randint(0, 1000, (args.batch,), device=args.device)

    def step():
        loss = unet(sample, timesteps, encoder_hidden_states=context).sample.float().pow(2).mean()
        loss.backward()
        sample.grad = None

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return {"seconds_per_step": (time.perf_counter() - started) / args.steps, "peak_mb": peak_mb(args.device)}


def train_worker(args, cache: bool, preserve: bool = False) -> dict:
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import Trainer

    config = TrainConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(), resolution=args.resolution,
                         batch_size=args.batch, max_steps=args.warmup + args.steps, rank=16, log_every=1,
                         cache_latents=cache, cache_text=cache, targets="attn",
                         **({"timestep_max": 500, "preserve_outside_window": True} if preserve else {}))
    Trainer(config, quiet=True).run()
    records = [json.loads(line) for line in (Path(config.output_dir) / "logs" / "metrics.jsonl").open()]
    times = {r["step"]: r["time"] for r in records}
    per_step = (times[args.warmup + args.steps] - times[args.warmup]) / args.steps
    return {"seconds_per_step": per_step, "peak_mb": peak_mb(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=32, help="UNet base channels (SD 1.5: 320)")
    parser.add_argument("--resolution", type=int, default=64, help="image side; latents are half of it here")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after --warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", choices=["floor", "cached", "uncached", "preserved"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        if args.worker == "floor":
            result = floor_worker(args)
        else:
            result = train_worker(args, cache=args.worker != "uncached", preserve=args.worker == "preserved")
        print("RESULT " + json.dumps(result))
        return

    workdir = Path(tempfile.mkdtemp())
    build_model(workdir / "model", args.width)
    build_data(workdir / "data", args.resolution, count=4 * args.batch)
    results = {}
    for worker in ("floor", "cached", "uncached", "preserved"):
        command = [sys.executable, __file__, "--worker", worker, "--model", str(workdir / "model"), "--data",
                   str(workdir / "data"), "--width", str(args.width), "--resolution", str(args.resolution),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--device", args.device]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[worker] = json.loads(output.split("RESULT ", 1)[1])

    floor = results["floor"]
    print(f"UNet width {args.width}, batch {args.batch} at {args.resolution} px, {args.device}; "
          f"mean over {args.steps} steps after {args.warmup} warm-up")
    print(f"{'':28}{'s/step':>10}{'vs floor':>10}{'peak MB':>10}")
    labels = {"floor": "UNet forward+backward floor", "cached": "sdlora train, cached",
              "uncached": "sdlora train, no caching", "preserved": "cached, preserve outside"}
    for worker, label in labels.items():
        r = results[worker]
        print(f"{label:28}{r['seconds_per_step']:10.3f}{r['seconds_per_step'] / floor['seconds_per_step']:9.2f}x"
              f"{r['peak_mb']:10.0f}")


if __name__ == "__main__":
    main()
