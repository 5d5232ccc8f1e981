"""Benchmark: sdlora against its peers, side by side on one machine: kohya's sd-scripts
(train_network.py) and the diffusers LoRA example (examples/text_to_image/train_text_to_image_lora.py).

The peers are not part of sdlora and nothing of theirs is in this repository: clone them yourself and
give each its own venv with its own requirements (bench/peers_setup.sh says how):

    git clone https://github.com/kohya-ss/sd-scripts PEERS/sd-scripts
    git clone https://github.com/huggingface/diffusers PEERS/diffusers
    bash bench/peers_setup.sh PEERS
    python bench/peers.py --peers PEERS                      # toy model: about 15 minutes on 2 CPU cores
    python bench/peers.py --peers PEERS --arch sd15 --rounds 1 --tools sdlora,kohya,diffusers
                                                   # the real SD 1.5 at 256 px: about 12 minutes

What each tool trains, with its own defaults for everything not named here: LoRA rank 4, alpha 4, on
the UNet alone, AdamW at lr 1e-4 (constant), fp32, batch 4, on the same images and captions at
--resolution, for --steps steps and again for --short-steps. Latents are cached where the tool can:
sdlora caches latents and text; kohya caches latents (--cache_latents) and encodes text every step
(it caches text only for SDXL); the diffusers example caches nothing and encodes every step. Layers:
sdlora (--targets attn) and the diffusers example adapt to_q, to_k, to_v and to_out.0 of every
attention; kohya's LoRA has no such choice and adapts every linear and 1x1 conv of the transformer
blocks (proj_in, proj_out and the feed-forward too), so the row "sdlora attn-mlp" trains kohya's set.

Time: seconds per step = (the long run's wall time - the short run's) / (steps - short steps), so that
start-up, loading, caching and saving cancel out; "whole" = the long run's wall time, from start to
exit, as a user waits for it. Each round runs every tool once each way, in an order that rotates
from round to round; the table gives each tool's median over rounds and the median of the paired
ratios, peer / sdlora (above 1: sdlora is faster). Every run is a fresh process with the environment
this script was started with: each tool picks its own CPU threads (sdlora: see docs/benchmarks.md,
"CPU threads"). Compare within one invocation only: on a shared machine absolute times are noise.

Models (--arch):
  toy   the bundled models/toy-sd1 on datasets/style-outline (33 images, 32 px). kohya's script
        rebuilds any diffusers UNet as its own SD 1.x UNet with SD 1.5's widths fixed in code, which
        the toy does not fit; its run keeps the diffusers UNet (bench/peer_kohya.py swaps that one
        loader function) and is otherwise kohya's own.
  sd15  the real SD 1.5 architecture with random weights (bench/train.py's builder, from the config
        sdlora ships), 8 random images at --resolution (default 256); kohya runs unpatched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
ENVIRONMENT = dict(os.environ)  # as started: every run gets this, before anything here sets threads
RANK, BATCH, LR = 4, 4, 1e-4


@dataclass(frozen=True)
class Setting:
    model: Path
    resolution: int
    images: Path  # images with .txt captions beside them
    kohya_patch: bool  # the toy: kohya runs through bench/peer_kohya.py


class Tool:
    def __init__(self, name: str, python: Path):
        self.name, self.python = name, python

    def command(self, setting: Setting, data: Path, out: Path, steps: int, peers: Path) -> list[str]:
        raise NotImplementedError


class Sdlora(Tool):
    def __init__(self, targets: str):
        super().__init__(f"sdlora {targets}" if targets != "attn" else "sdlora", Path(sys.executable))
        self.targets = targets

    def command(self, setting, data, out, steps, peers):
        return [str(self.python), "-m", "sdlora", "train", "--model", str(setting.model),
                "--data", str(setting.images), "--output-dir", str(out), "--resolution", str(setting.resolution),
                "--batch-size", str(BATCH), "--rank", str(RANK), "--alpha", str(RANK), "--targets", self.targets,
                "--optimizer", "adamw", "--lr", str(LR), "--mixed-precision", "no", "--max-steps", str(steps),
                "--seed", "0", "--quiet"]


class Kohya(Tool):
    def command(self, setting, data, out, steps, peers):
        script = ([str(BENCH / "peer_kohya.py")] if setting.kohya_patch
                  else [str(peers / "sd-scripts" / "train_network.py")])
        return [str(self.python), *script, "--pretrained_model_name_or_path", str(setting.model),
                "--train_data_dir", str(data / "kohya"), "--caption_extension", ".txt",
                "--tokenizer_cache_dir", str(data / "kohya-tokenizers"),
                "--output_dir", str(out), "--output_name", "lora", "--save_model_as", "safetensors",
                "--resolution", str(setting.resolution), "--train_batch_size", str(BATCH),
                "--network_module", "networks.lora", "--network_dim", str(RANK), "--network_alpha", str(RANK),
                "--network_train_unet_only", "--optimizer_type", "AdamW", "--learning_rate", str(LR),
                "--mixed_precision", "no", "--max_train_steps", str(steps), "--cache_latents", "--sdpa",
                "--max_data_loader_n_workers", "0", "--seed", "0"]


class DiffusersExample(Tool):
    def command(self, setting, data, out, steps, peers):
        script = peers / "diffusers" / "examples" / "text_to_image" / "train_text_to_image_lora.py"
        return [str(self.python), str(script), "--pretrained_model_name_or_path", str(setting.model),
                "--train_data_dir", str(data / "imagefolder"), "--output_dir", str(out),
                "--resolution", str(setting.resolution), "--center_crop", "--train_batch_size", str(BATCH),
                "--rank", str(RANK), "--learning_rate", str(LR), "--lr_scheduler", "constant",
                "--mixed_precision", "no", "--max_train_steps", str(steps), "--seed", "0"]


def lay_out_data(setting: Setting, data: Path) -> None:
    """The same images and captions in each peer's layout: kohya's REPEATS_NAME folders (and its
    tokenizer cache, which it otherwise fetches from the hub), the diffusers imagefolder with metadata."""
    images = sorted(path for path in setting.images.iterdir() if path.suffix in (".png", ".jpg"))
    kohya = data / "kohya" / "1_bench"
    folder = data / "imagefolder"
    kohya.mkdir(parents=True)
    folder.mkdir(parents=True)
    rows = []
    for image in images:
        caption = image.with_suffix(".txt")
        for target in (kohya, folder):
            (target / image.name).symlink_to(image.resolve())
        (kohya / caption.name).symlink_to(caption.resolve())
        rows.append(json.dumps({"file_name": image.name, "text": caption.read_text().strip()}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    slow_tokenizer(setting.model / "tokenizer", data / "kohya-tokenizers" / "openai_clip-vit-large-patch14")


def slow_tokenizer(source: Path, target: Path) -> None:
    """The model's CLIP tokenizer as the vocab.json + merges.txt pair that kohya's pinned transformers
    reads (its slow CLIPTokenizer), from the tokenizer.json that the model ships."""
    shutil.copytree(source, target)
    model = json.loads((source / "tokenizer.json").read_text())["model"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (target / "vocab.json").write_text(json.dumps(model["vocab"]))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def prepare(arch: str, resolution: int | None, workdir: Path) -> Setting:
    if arch == "toy":
        return Setting(ROOT / "models" / "toy-sd1", resolution or 32, ROOT / "datasets" / "style-outline", True)
    sys.path.insert(0, str(BENCH))
    from train import build_data, build_real  # noqa: E402  (bench/train.py, which imports torch)

    import torch

    model, images = workdir / "sd15", workdir / "sd15-images"
    print("building the SD 1.5 architecture with random weights ...", file=sys.stderr, flush=True)
    build_real(model, "sd15", torch.float32)
    build_data(images, resolution or 256, 8)
    return Setting(model, resolution or 256, images, False)


def timed_run(tool: Tool, setting: Setting, data: Path, steps: int, peers: Path, workdir: Path) -> float:
    out = Path(tempfile.mkdtemp(prefix=tool.name.replace(" ", "-") + "-", dir=workdir))
    log = out.with_suffix(".log")
    command = tool.command(setting, data, out / "out", steps, peers)
    env = dict(ENVIRONMENT, KOHYA=str(peers / "sd-scripts"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    started = time.monotonic()
    with log.open("w") as sink:
        code = subprocess.call(command, cwd=out, env=env, stdout=sink, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - started
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"{tool.name} failed (exit {code}); its log {log}:\n{tail}\ncommand: {' '.join(command)}")
    shutil.rmtree(out / "out", ignore_errors=True)  # keep the log, drop the adapter and caches
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--peers", type=Path, required=True,
                        help="folder with sd-scripts/, diffusers/ and their venvs (bench/peers_setup.sh)")
    parser.add_argument("--arch", choices=("toy", "sd15"), default="toy")
    parser.add_argument("--resolution", type=int, help="default: 32 for toy, 256 for sd15")
    parser.add_argument("--steps", type=int, help="steps of the long run (default: 300 toy, 6 sd15)")
    parser.add_argument("--short-steps", type=int, help="steps of the short run (default: 50 toy, 2 sd15)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, the tools' order rotating (default: 5)")
    parser.add_argument("--tools", default="sdlora,kohya,diffusers,sdlora attn-mlp",
                        help="comma-separated subset of: sdlora, kohya, diffusers, sdlora attn-mlp")
    parser.add_argument("--workdir", type=Path, help="keep models, data and logs here (default: a temporary one)")
    args = parser.parse_args()
    steps = args.steps or (300 if args.arch == "toy" else 6)
    short = args.short_steps or (50 if args.arch == "toy" else 2)
    if not 0 < short < steps:
        parser.error(f"--short-steps {short} must be between 0 and --steps {steps}")
    peers = args.peers.resolve()
    available = {
        "sdlora": Sdlora("attn"),
        "sdlora attn-mlp": Sdlora("attn-mlp"),
        "kohya": Kohya("kohya", peers / "kohya-venv" / "bin" / "python"),
        "diffusers": DiffusersExample("diffusers example", peers / "diffusers-venv" / "bin" / "python"),
    }
    names = [name.strip() for name in args.tools.split(",")]
    unknown = [name for name in names if name not in available]
    if unknown or "sdlora" not in names:
        parser.error(f"--tools: {', '.join(unknown) or 'sdlora missing'}; choose from {', '.join(available)} "
                     "(sdlora always, the ratios are to it)")
    tools = [available[name] for name in names]
    for tool in tools:
        if not tool.python.exists():
            parser.error(f"{tool.python} is missing: run bash bench/peers_setup.sh {peers} first")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sdlora-peers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        setting = prepare(args.arch, args.resolution, workdir)
        data = workdir / "data"
        shutil.rmtree(data, ignore_errors=True)
        lay_out_data(setting, data)
        load = os.getloadavg()[0]
        per_step: dict[str, list[float]] = {tool.name: [] for tool in tools}
        whole: dict[str, list[float]] = {tool.name: [] for tool in tools}
        for round_ in range(args.rounds):
            order = tools[round_ % len(tools):] + tools[:round_ % len(tools)]
            for tool in order:
                long_time = timed_run(tool, setting, data, steps, peers, workdir)
                short_time = timed_run(tool, setting, data, short, peers, workdir)
                per_step[tool.name].append((long_time - short_time) / (steps - short))
                whole[tool.name].append(long_time)
                print(f"round {round_ + 1}: {tool.name}: {per_step[tool.name][-1]:.4f} s/step, "
                      f"{long_time:.1f} s whole", file=sys.stderr, flush=True)
        print(f"{args.arch} at {setting.resolution} px, batch {BATCH}, rank {RANK}, AdamW, fp32; {steps} and "
              f"{short} steps; {args.rounds} round(s), medians; {os.cpu_count()} CPUs, load average {load:.1f} before")
        print(f"{'tool':<18} {'s/step':>8} {'peer/sdlora':>12} {'whole s':>9} {'peer/sdlora':>12}")
        base = available["sdlora"].name
        for tool in tools:
            step_ratio = statistics.median(a / b for a, b in zip(per_step[tool.name], per_step[base]))
            whole_ratio = statistics.median(a / b for a, b in zip(whole[tool.name], whole[base]))
            print(f"{tool.name:<18} {statistics.median(per_step[tool.name]):>8.4f} {step_ratio:>11.2f}x "
                  f"{statistics.median(whole[tool.name]):>9.1f} {whole_ratio:>11.2f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
