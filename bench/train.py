"""Benchmark: seconds per step and peak memory of `sdlora train`, next to the floor it cannot beat.

The floor is the bare UNet's forward + backward for the same batch and resolution: gradients through
every activation (to the noisy input), no weight gradients, no optimizer, no data, no text encoder, no
gradient checkpointing; for SDXL it gets the pooled text and size/crop ids (added_cond_kwargs) too.
sdlora's training (what `sdlora train` runs) is measured in several configurations. Each measurement
runs in its own process, so that its peak memory is its own; all of them run in one invocation and
are printed as ratios to the floor, next to the absolute numbers. Compare within one invocation only:
on a shared machine absolute times are noise.

Architectures (--arch):
  tiny  (default) an SD 1.x-layout UNet of --width base channels (32), a toy VAE (2x downsampling)
        and a 2-layer text encoder of width 768: a couple of minutes on 2 CPU cores.
  sd15  the real SD 1.5 architecture: UNet 860 M, VAE 84 M, CLIP ViT-L text encoder 123 M.
  sdxl  the real SDXL base 1.0 architecture: UNet 2.57 B, VAE 84 M, CLIP ViT-L 123 M + OpenCLIP
        bigG 695 M (hidden 768 + 1280 = 2048, pooled 1280).
sd15 and sdxl are built from the configs sdlora ships (sdlora/base_models/configs/sd15, sdxl-base) with
random weights; nothing is downloaded and nothing is reduced: UNet, VAE, text encoders and the CLIP
tokenizers are the real ones. The build runs once per invocation, in its own process; the folder is
saved with fp16 weights (--save-dtype; SDXL: 5.1 GB UNet, 7 GB in all) in a temporary directory that is
removed at the end (--model-dir keeps and reuses one), and every run loads it in its own dtype (fp32,
or bf16/fp16 with --mixed-precision).

Training configurations (--runs, comma-separated):
  cached     latent and text caching on: the VAE and text encoders run once per image and caption
  cached-gc  the same with gradient checkpointing
  uncached   no caching: the VAE and text encoders run every step
  preserved  cached, with preserve_outside_window (timestep window [0, 500): about half of each batch
             also needs the frozen model's prediction, a forward pass without gradients)
Default: all four for tiny; cached and cached-gc for sd15 and sdxl. Every run: LoRA rank 16 on the
attention layers (targets "attn"), AdamW, 4 x batch synthetic random-noise images of the resolution
with short captions, no aspect buckets needed (all square).

Memory, in MiB: on CPU the RSS, on CUDA torch.cuda.max_memory_allocated (with the whole run's peak
RSS beside it). "peak" is the whole process's high-water mark, loading included (on CPU that is where
it lies: the fp16 file's mapped pages next to their fp32 copies); "steps" is the high-water mark of the
training steps alone, reset after loading and caching (VmHWM via /proc/self/clear_refs on Linux; CUDA
peak stats). RSS counts everything a process holds, so the trainer's VAE and text encoders weigh in
where the floor has only the UNet: "weights" says how much each holds on the device. (On CUDA the
trainer moves the text encoders and VAE off the GPU once their caches are filled.) Time: mean seconds
per step over --steps steps after --warmup (the trainer's from its metrics log); "setup s" is loading
plus caching, outside the step time.

    python bench/train.py                      # tiny: a couple of minutes on 2 CPU cores
    python bench/train.py --arch sd15 --resolution 256 --batch 1 --steps 3     # 2 CPU cores: ~2 min, 6 GB RAM
    python bench/train.py --arch sdxl --resolution 256 --batch 1 --steps 2     # ~4 min, 19 GB RAM, 7 GB disk
    python bench/train.py --arch sd15 --resolution 512 --batch 4 --mixed-precision bf16   # on a GPU
    python bench/train.py --sdxl-vram          # on a GPU: SDXL LoRA VRAM at 1024 px, batch 1, cached + gc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from sdlora.threads import use_cpu_policy

use_cpu_policy()  # before torch loads OpenMP, as the sdlora command does

import torch

ARCHITECTURES = {"tiny": None, "sd15": "sd15", "sdxl": "sdxl-base"}  # --arch -> shipped config folder
DTYPES = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Run:
    label: str
    cache: bool = True
    checkpointing: bool = False
    preserve: bool = False


RUNS = {
    "cached": Run("sdlora train, cached"),
    "cached-gc": Run("cached + grad checkpointing", checkpointing=True),
    "uncached": Run("sdlora train, no caching", cache=False),
    "preserved": Run("cached, preserve outside", preserve=True),
}
DEFAULT_RUNS = {"tiny": ("cached", "cached-gc", "uncached", "preserved"), "sd15": ("cached", "cached-gc"),
                "sdxl": ("cached", "cached-gc")}
FLOOR = "UNet forward+backward floor"


# ---------------------------------------------------------------- building the model and the data


def build_tiny(folder: Path, width: int) -> dict:
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
    return {name: parameter_count(module) for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)}


def random_component(source: Path, part: str, class_name: str):
    """One component of a shipped architecture, built from its config with fresh random weights."""
    if class_name == "UNet2DConditionModel":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(source / part))
    if class_name == "AutoencoderKL":
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_config(AutoencoderKL.load_config(source / part))
    if class_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        import transformers

        config = transformers.CLIPTextConfig.from_pretrained(source / part)
        return getattr(transformers, class_name)(config)
    raise ValueError(f"{source.name}/{part}: no random builder for {class_name}")


def build_real(folder: Path, architecture: str, dtype: torch.dtype) -> dict:
    """A diffusers folder of a shipped architecture with random weights, one component at a time (so
    that only one full-size model is in memory), saved in `dtype`; tokenizers from the shipped BPE."""
    from sdlora.base_models import architectures
    from sdlora.base_models.clip_tokenizer import clip_tokenizer

    source = architectures.config_folder(architecture)
    index = json.loads((source / "model_index.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for seed, (part, entry) in enumerate(sorted(index.items())):
        if part.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        class_name = entry[1]
        if part.startswith("scheduler"):
            shutil.copytree(source / part, folder / part)
        elif part.startswith("tokenizer"):
            settings = json.loads((source / part / "tokenizer_config.json").read_text())
            clip_tokenizer(settings["pad_token"], settings["model_max_length"]).save_pretrained(folder / part)
        else:
            torch.manual_seed(seed)
            module = random_component(source, part, class_name).to(dtype)
            counts[part] = parameter_count(module)
            module.save_pretrained(folder / part)
            del module
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return counts


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_data(folder: Path, resolution: int, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        pixels = (torch.rand(resolution, resolution, 3, generator=generator) * 255).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"picture number {i}")


def vae_scale(model: Path) -> int:
    config = json.loads((model / "vae" / "config.json").read_text())
    return 2 ** (len(config["block_out_channels"]) - 1)


# ---------------------------------------------------------------- measuring (in worker processes)


class Peaks:
    """Peak memory of a worker's setup (loading, caching) and of its steps, read apart.

    RSS peaks come from VmHWM, which writing "5" to /proc/self/clear_refs resets (Linux); elsewhere only
    the whole process's peak is known. On CUDA, torch's allocator peaks are read and reset likewise.
    """

    def __init__(self, device: str):
        self.device, self.setup = device, {}

    def end_setup(self) -> None:
        self.setup = self._read()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_reset = True
        except OSError:
            self.rss_reset = False
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def result(self) -> dict:
        steps = self._read()
        found = {"peak_rss_mb": max(self.setup["rss"], steps["rss"]),
                 "steps_rss_mb": steps["rss"] if self.rss_reset else None}
        if self.device == "cuda":
            found |= {"peak_cuda_mb": max(self.setup["cuda"], steps["cuda"]), "steps_cuda_mb": steps["cuda"]}
        return found

    def _read(self) -> dict:
        status = Path("/proc/self/status")
        if status.is_file():
            kib = int(next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:")).split()[1])
        else:
            import resource

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
        found = {"rss": kib / 1024}
        if self.device == "cuda":
            found["cuda"] = torch.cuda.max_memory_allocated() / 2**20
        return found


def weights_mb(modules, device: str) -> float:
    """Parameters and buffers of `modules` that sit on `device`, in MB."""
    tensors = [t for module in modules for t in (*module.parameters(), *module.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == device) / 2**20


def floor_inputs(unet, batch: int, resolution: int, latent_side: int, device: str) -> tuple:
    """Noisy latents (needing gradients), timesteps and the conditioning the trainer gives this UNet."""
    config = unet.config
    sample = torch.randn(batch, config.in_channels, latent_side, latent_side, device=device, requires_grad=True)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    conditioning = {"encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, device=device)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text + (original, crop, target) size ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)
        conditioning["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, device=device),
                                             "time_ids": time_ids.float()}
    return sample, timesteps, conditioning


def autocast(device: str, mixed_precision: str):
    if mixed_precision == "no":
        return nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[mixed_precision])


def floor_worker(args) -> dict:
    """UNet forward + backward (to the activations) on a batch shaped like the trainer's."""
    from diffusers import UNet2DConditionModel

    peaks, started = Peaks(args.device), time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", dtype=DTYPES[args.mixed_precision])
    unet.to(args.device).requires_grad_(False)
    unet.train()
    latent_side = args.resolution // vae_scale(Path(args.model))
    sample, timesteps, conditioning = floor_inputs(unet, args.batch, args.resolution, latent_side, args.device)
    setup = time.perf_counter() - started
    peaks.end_setup()

    def step():
        with autocast(args.device, args.mixed_precision):
            loss = unet(sample, timesteps, **conditioning).sample.float().pow(2).mean()
        loss.backward()
        sample.grad = None

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    return {"seconds_per_step": (time.perf_counter() - started) / args.steps, "setup_s": setup,
            "weights_mb": weights_mb([unet], args.device), **peaks.result()}


def train_worker(args, run: Run) -> dict:
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import run_training, setup_run

    config = TrainConfig(model=args.model, data=args.data, output_dir=tempfile.mkdtemp(dir=args.workdir),
                         resolution=args.resolution, batch_size=args.batch, max_steps=args.warmup + args.steps,
                         rank=16, log_every=1, cache_latents=run.cache, cache_text=run.cache, targets="attn",
                         gradient_checkpointing=run.checkpointing, mixed_precision=args.mixed_precision,
                         **({"timestep_max": 500, "preserve_outside_window": True} if run.preserve else {}))
    peaks, started = Peaks(args.device), time.perf_counter()
    training = setup_run(config, quiet=True)  # loads the model, fills the caches
    setup = time.perf_counter() - started
    peaks.end_setup()
    run_training(training)
    memory = peaks.result()
    records = [json.loads(line) for line in (Path(config.output_dir) / "logs" / "metrics.jsonl").open()]
    times = {r["step"]: r["time"] for r in records if "loss" in r}
    per_step = (times[args.warmup + args.steps] - times[args.warmup]) / args.steps
    modules = [m for m in training.model.pipe.components.values() if isinstance(m, torch.nn.Module)]
    return {"seconds_per_step": per_step, "setup_s": setup, "weights_mb": weights_mb(modules, args.device), **memory}


def worker(args) -> dict:
    import logging

    logging.disable(logging.WARNING)
    if args.worker == "build":
        started = time.perf_counter()
        if args.arch == "tiny":
            counts = build_tiny(Path(args.model), args.width)
        else:
            counts = build_real(Path(args.model), ARCHITECTURES[args.arch], DTYPES[args.save_dtype])
        return {"parameters": counts, "seconds": time.perf_counter() - started}
    if args.worker == "floor":
        return floor_worker(args)
    return train_worker(args, RUNS[args.worker])


# ---------------------------------------------------------------- the driver


def run_worker(name: str, args, model: Path, data: Path, workdir: Path) -> dict:
    """One measurement in a fresh process; {"error": ...} when it fails (its stderr's tail is shown)."""
    command = [sys.executable, __file__, "--worker", name, "--model", str(model), "--data", str(data),
               "--workdir", str(workdir), "--arch", args.arch, "--width", str(args.width),
               "--resolution", str(args.resolution), "--batch", str(args.batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device, "--mixed-precision", args.mixed_precision,
               "--save-dtype", args.save_dtype]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes the GPU whenever it sees one
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0 or "RESULT " not in done.stdout:
        why = "killed by the kernel (out of memory?)" if done.returncode == -9 else f"exit status {done.returncode}"
        progress(f"{name} failed after {wall:.0f} s: {why}\n" + "\n".join(done.stderr.splitlines()[-15:]))
        return {"error": why}
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    progress(f"{name}: {wall:.0f} s" + (f", {result['seconds_per_step']:.3f} s/step"
                                         if "seconds_per_step" in result else ""))
    return result


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def describe_model(arch: str, width: int, counts: dict) -> str:
    sizes = ", ".join(f"{part} {count / 1e6:.1f} M" for part, count in sorted(counts.items()))
    sizes = f"; parameters: {sizes}" if sizes else ""
    if arch == "tiny":
        return f"tiny SD 1.x-layout model (UNet width {width}, toy VAE 2x, 2-layer text encoder{sizes})"
    return f"real {arch} architecture, every component full size, random weights{sizes}"


def ratio(value, floor) -> str:
    return f"{value / floor:8.2f}x" if value is not None and floor else f"{'-':>9}"


def megabytes(value, width: int = 10) -> str:
    return f"{value:{width}.0f}" if value is not None else f"{'-':>{width}}"


def print_table(args, results: dict, description: str, latent_side: int) -> None:
    cuda = args.device == "cuda"
    device = f"cuda ({torch.cuda.get_device_name()})" if cuda else "cpu"
    print(f"{description}\nbatch {args.batch} at {args.resolution} px (latents {latent_side}x{latent_side}), "
          f"{device}, frozen weights {str(DTYPES[args.mixed_precision]).removeprefix('torch.')} (mixed precision "
          f"{args.mixed_precision}); mean over {args.steps} steps after {args.warmup} warm-up")
    kind = "cuda" if cuda else "rss"
    print(f"memory: {'torch.cuda.max_memory_allocated' if cuda else 'RSS'} in MiB; 'peak' over the whole process, "
          "'steps' over the training steps alone (after loading and caching)")
    print(f"{'':30}{'s/step':>9}{'x floor':>9}{'peak':>10}{'x floor':>9}{'steps':>10}{'x floor':>9}"
          + (f"{'RSS peak':>10}" if cuda else "") + f"{'weights':>10}{'setup s':>9}")
    floor = results["floor"]
    for name, result in results.items():
        label = FLOOR if name == "floor" else RUNS[name].label
        if "error" in result:
            print(f"{label:30}failed: {result['error']}")
            continue
        peak, steps, seconds = result[f"peak_{kind}_mb"], result[f"steps_{kind}_mb"], result["seconds_per_step"]
        print(f"{label:30}{seconds:9.3f}{ratio(seconds, floor.get('seconds_per_step'))}"
              f"{megabytes(peak)}{ratio(peak, floor.get(f'peak_{kind}_mb'))}"
              f"{megabytes(steps)}{ratio(steps, floor.get(f'steps_{kind}_mb'))}"
              + (megabytes(result["peak_rss_mb"]) if cuda else "")
              + f"{megabytes(result['weights_mb'])}{result['setup_s']:9.1f}")


def sdxl_vram_line(results: dict) -> str:
    result = results["cached-gc"]
    if "error" in result:
        return f"SDXL LoRA VRAM: the run failed ({result['error']})"
    peak, steps = result["peak_cuda_mb"], result["steps_cuda_mb"]
    return (f"SDXL LoRA training at 1024 px, batch 1, latent + text caching, gradient checkpointing: "
            f"torch.cuda.max_memory_allocated = {peak / 1024:.2f} GiB ({peak:.0f} MiB; "
            f"{steps / 1024:.2f} GiB during the training steps)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHITECTURES, default="tiny")
    parser.add_argument("--width", type=int, default=32, help="tiny only: UNet base channels (SD 1.5: 320)")
    parser.add_argument("--resolution", type=int, help="image side in px (default: tiny 64, else 256)")
    parser.add_argument("--batch", type=int, help="default: tiny 4, else 1")
    parser.add_argument("--steps", type=int, help="timed steps, after --warmup (default: tiny 10, else 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps first, at least 1 (default: tiny 3, else 1)")
    parser.add_argument("--runs", help=f"trainer configurations, comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                        help="frozen weights' dtype and autocast (default: bf16 on CUDA, no on CPU)")
    parser.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16",
                        help="sd15/sdxl: dtype of the random weights on disk (loading casts them)")
    parser.add_argument("--model-dir", type=Path,
                        help="build the model here and keep it; reuse it if it exists (same --arch)")
    parser.add_argument("--sdxl-vram", action="store_true",
                        help="CUDA only: the VRAM of SDXL LoRA training at 1024 px, batch 1, caching and "
                             "gradient checkpointing (sets --arch sdxl --resolution 1024 --batch 1 --runs cached-gc)")
    parser.add_argument("--worker", choices=["build", "floor", *RUNS], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sdxl_vram:
        args.arch, args.resolution, args.batch, args.runs = "sdxl", 1024, 1, "cached-gc"
    tiny = args.arch == "tiny"
    for key, small, real in (("resolution", 64, 256), ("batch", 4, 1), ("steps", 10, 3), ("warmup", 3, 1)):
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else real)
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    args.runs = tuple(args.runs.split(",")) if args.runs else DEFAULT_RUNS[args.arch]
    if unknown := [run for run in args.runs if run not in RUNS]:
        parser.error(f"unknown --runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (a step's time is read from the previous step's)")
    return args


def main() -> int:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    if args.sdxl_vram and args.device != "cuda":
        print("--sdxl-vram measures torch.cuda.max_memory_allocated and needs CUDA; this machine has none "
              f"(torch {torch.__version__}, cuda available: {torch.cuda.is_available()}).")
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device here")
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="sdlora-bench-"))
    try:
        model = args.model_dir or workdir / "model"
        data = workdir / "data"
        counts = {}
        if not (model / "model_index.json").is_file():
            progress(f"building {args.arch} in {model}" + ("" if args.arch == "tiny" else f" ({args.save_dtype})"))
            built = run_worker("build", args, model, data, workdir)
            if "error" in built:
                return 1
            counts = built["parameters"]
        latent_side = args.resolution // vae_scale(model)
        build_data(data, args.resolution, count=4 * args.batch)
        results = {name: run_worker(name, args, model, data, workdir) for name in ("floor", *args.runs)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(args, results, describe_model(args.arch, args.width, counts), latent_side)
    if args.sdxl_vram:
        print(sdxl_vram_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
