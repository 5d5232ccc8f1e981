"""Benchmark: loading an adapter (sdlora vs diffusers' load_lora_weights) and per-step inference overhead,
for each adapter kind (LoRA, LyCORIS LoHa and LoKr, DoRA) and for stacks of adapters.

Everything is measured side by side in one run and printed as ratios, since absolute times on a
shared machine are noise. The UNet is built in code (no download) from SD 1.5's layout, scaled by
--width so a CPU run finishes in a minute or two; `--width 320` is SD 1.5's own size. Every file
adapts the same layers (attention and MLP of the UNet) with seeded random tensors of --rank.

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


def kind_file(pipe, path: Path, kind: str, rank: int) -> Path:
    """A file of one kind over the UNet's attention and MLP layers, with random tensors (kohya names)."""
    from safetensors.torch import save_file

    from sdlora.adapters.targets import patterns_for, select

    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.01

    tensors = {}
    for module_path in select(pipe.unet, patterns_for("attn-mlp", "unet")):
        layer = pipe.unet.get_submodule(module_path)
        out, inn = layer.weight.shape[:2]
        flat = layer.weight[0].numel()
        name = "lora_unet_" + module_path.replace(".", "_")
        if kind in ("lora", "dora"):
            roles = {"lora_down.weight": rand(rank, inn, *layer.weight.shape[2:]),
                     "lora_up.weight": rand(out, rank, *([1, 1] if layer.weight.dim() == 4 else []))}
            if kind == "dora":
                roles["dora_scale"] = layer.weight.detach().float().flatten(1).norm(dim=1, keepdim=True)
        elif kind == "loha":
            roles = {"hada_w1_a": rand(out, rank), "hada_w1_b": rand(rank, flat), "hada_w2_a": rand(out, rank),
                     "hada_w2_b": rand(rank, flat)}
        else:  # lokr: a whole 4 x 4 factor and a rank-r one, as LyCORIS's defaults make
            roles = {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(out // 4, rank), "lokr_w2_b": rand(rank, flat // 4)}
        tensors |= {f"{name}.{role}": tensor.contiguous() for role, tensor in roles.items()}
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path)
    return path


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
    print(f"UNet {params:.1f} M parameters, {args.device} {args.dtype}; adapters rank {args.rank} on attention + MLP, "
          f"LoRA file {adapter.stat().st_size / 1e6:.1f} MB")
    files = {"lora": adapter, **{kind: kind_file(pipe, workdir / f"{kind}.safetensors", kind, args.rank)
                                 for kind in ("loha", "lokr", "dora")}}
    stack = [adapter, *(kind_file(pipe, workdir / f"lora{i}.safetensors", "lora", args.rank) for i in (1, 2))]

    def load_and_unload(path: Path):
        def run():
            sdlora.load(pipe, path, name="bench")
            sdlora.unload(pipe)
        return run

    def diffusers_load():
        pipe.load_lora_weights(str(adapter), adapter_name="bench")
        pipe.unload_lora_weights()

    loads = {kind: timed(load_and_unload(path), args.repeats, sync) for kind, path in files.items()}
    load_diffusers = timed(diffusers_load, args.repeats, sync)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, args.latent, args.latent, generator=generator).to(args.device, dtype)
    context = torch.randn(args.batch, 77, 768, generator=generator).to(args.device, dtype)
    timestep = torch.tensor([500] * args.batch, device=args.device)

    @torch.no_grad()
    def step():
        pipe.unet(sample, timestep, encoder_hidden_states=context)

    base = timed(step, args.repeats, sync)
    steps = {}
    for kind, path in files.items():
        sdlora.load(pipe, path, name="bench")
        steps[f"1 {kind}, unfused"] = timed(step, args.repeats, sync)
        sdlora.fuse(pipe)
        steps[f"1 {kind}, fused"] = timed(step, args.repeats, sync)
        sdlora.unload(pipe)
    for i, path in enumerate(stack):
        sdlora.load(pipe, path, name=f"stack{i}", strength=0.5)
    steps["3 LoRAs stacked, unfused"] = timed(step, args.repeats, sync)
    sdlora.fuse(pipe)
    steps["3 LoRAs stacked, fused"] = timed(step, args.repeats, sync)
    sdlora.unload(pipe)
    pipe.load_lora_weights(str(adapter), adapter_name="bench")
    steps["1 lora, diffusers unfused"] = timed(step, args.repeats, sync)
    pipe.unload_lora_weights()

    print(f"\nload + apply (median of {args.repeats}); diffusers reads LoRA only (it refuses LoHa and LoKr and drops "
          "DoRA's dora_scale)")
    for kind, seconds in loads.items():
        print(f"  sdlora.load {kind:<6}      {seconds * 1e3:8.1f} ms")
    print(f"  pipe.load_lora_weights  {load_diffusers * 1e3:8.1f} ms   {load_diffusers / loads['lora']:.2f}x sdlora's "
          "LoRA load")
    print(f"\nUNet step, batch {args.batch}, {args.latent}x{args.latent} latents (median of {args.repeats})")
    print(f"  {'base':<28} {base * 1e3:8.1f} ms   1.00x")
    for label, seconds in steps.items():
        print(f"  {label:<28} {seconds * 1e3:8.1f} ms   {seconds / base:.2f}x base")


if __name__ == "__main__":
    main()
