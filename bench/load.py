"""Benchmark: loading an adapter (sdlora vs diffusers' load_lora_weights) and per-step inference overhead.

Everything is measured side by side in one run and printed as ratios, since absolute times on a
shared machine are noise. The UNet is built in code (no download) from SD 1.5's layout, scaled by
--width so a CPU run finishes in a minute or two; `--width 320` is SD 1.5's own size.

    python bench/load.py                # about a minute on 2 CPU cores
    python bench/load.py --width 320 --device cuda --dtype fp16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from sdlora.threads import use_cpu_policy

use_cpu_policy()  # before torch loads OpenMP, as the sdlora command does

import torch

import sdlora


def build_pipeline(width: int, device: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from sdlora.toy.pipelines import build_clip_tokenizer, tiny_text_encoder, tiny_vae

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=64,
    )
    tokenizer = build_clip_tokenizer()
    from diffusers import DDIMScheduler

    pipe = StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(len(tokenizer), hidden_size=768), tokenizer=tokenizer,
        unet=unet, scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device, dtype)


def timed(fn, repeats: int, sync) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="UNet base channels (SD 1.5: 320)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32, help="latent side (SD 1.5 at 512 px: 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    pipe = build_pipeline(args.width, args.device, dtype)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    workdir = Path(tempfile.mkdtemp())
    adapter = workdir / "bench.safetensors"
    sdlora.add_adapter(pipe, "bench", rank=args.rank, targets="attn-mlp")
    with torch.no_grad():
        for parameter in sdlora.trainable_parameters(pipe, "bench"):
            parameter.normal_(std=0.01)
    sdlora.save(pipe, adapter, "bench")
    sdlora.unload(pipe)
    print(f"UNet {params:.1f} M parameters, {args.device} {args.dtype}; adapter rank {args.rank}, "
          f"{adapter.stat().st_size / 1e6:.1f} MB")

    def ours_load():
        sdlora.load(pipe, adapter, name="bench")
        sdlora.unload(pipe)

    def diffusers_load():
        pipe.load_lora_weights(str(adapter), adapter_name="bench")
        pipe.unload_lora_weights()

    load_ours = timed(ours_load, args.repeats, sync)
    load_diffusers = timed(diffusers_load, args.repeats, sync)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, args.latent, args.latent, generator=generator).to(args.device, dtype)
    context = torch.randn(args.batch, 77, 768, generator=generator).to(args.device, dtype)
    timestep = torch.tensor([500] * args.batch, device=args.device)

    @torch.no_grad()
    def step():
        pipe.unet(sample, timestep, encoder_hidden_states=context)

    base = timed(step, args.repeats, sync)
    sdlora.load(pipe, adapter, name="bench")
    unfused = timed(step, args.repeats, sync)
    sdlora.fuse(pipe)
    fused = timed(step, args.repeats, sync)
    sdlora.unload(pipe)
    pipe.load_lora_weights(str(adapter), adapter_name="bench")
    diffusers_unfused = timed(step, args.repeats, sync)
    pipe.unload_lora_weights()

    print(f"\nload + apply (median of {args.repeats})")
    print(f"  sdlora.load             {load_ours * 1e3:8.1f} ms   1.00x")
    print(f"  pipe.load_lora_weights  {load_diffusers * 1e3:8.1f} ms   {load_diffusers / load_ours:.2f}x ours")
    print(f"\nUNet step, batch {args.batch}, {args.latent}x{args.latent} latents (median of {args.repeats})")
    print(f"  base                    {base * 1e3:8.1f} ms   1.00x")
    print(f"  sdlora unfused          {unfused * 1e3:8.1f} ms   {unfused / base:.2f}x base")
    print(f"  sdlora fused            {fused * 1e3:8.1f} ms   {fused / base:.2f}x base")
    print(f"  diffusers unfused       {diffusers_unfused * 1e3:8.1f} ms   {diffusers_unfused / base:.2f}x base")


if __name__ == "__main__":
    main()
