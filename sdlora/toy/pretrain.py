"""Pretrain the tiny SD 1.x model of the toy world (models/toy-sd1) from scratch, on CPU.

Two stages, both full training and seeded:

  1. VAE      an AutoencoderKL (3 down-blocks: 32x32 RGB <-> 8x8x4 latents) on rendered scenes
              and generic random shapes (see render_codec_pool); then its scaling_factor is set
              to 1/std of the latents, as SD does.
  2. UNet+TE  a UNet2DConditionModel with SD 1.x cross-attention blocks and a 2-layer CLIP text
              encoder, trained together on `a {colour} {shape}` captions (10% empty, for CFG),
              epsilon prediction on SD's scaled_linear schedule, EMA weights saved.

The UNet and text encoder only ever see filled circles, squares and triangles: the outline style
and the star stay unknown to the model, so adapters trained on datasets/ have something new to learn.
With the same arguments, threads and library versions a run is bit-for-bit repeatable.

    OMP_WAIT_POLICY=PASSIVE python -m sdlora.toy.pretrain --out models/toy-sd1

OMP_WAIT_POLICY=PASSIVE matters on a shared machine: with the default (spinning) OpenMP threads a
second busy process on the same cores slows every step down ~10x instead of ~2x.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import world as toy
from ..training.caching import encode_pixels
from ..training.steps import ema_decay_at, lr_factor, update_ema
from .pipelines import build_clip_tokenizer

# Every word the toy tokenizer knows as one token. Only "a", the colours and the pretraining shapes
# appear in pretraining captions; the rest are spare tokens for adapters to bind new concepts to.
WORDS = (
    "a", *toy.COLOURS, *toy.SHAPES,
    "star", "outline", "outlined", "filled", "hollow", "style", "shape", "drawing", "of", "in", "the",
    *toy.TRIGGERS, "purple", "orange", "black", "white",
)
MAX_LENGTH = 16  # tokens per prompt, <|startoftext|> and <|endoftext|> included: captions are ~5
IMAGE_SIZE = 32
EMPTY_CAPTION_RATE = 0.1  # trained with no caption this often, so classifier-free guidance works


# --- The model -----------------------------------------------------------------------------------


SPARE = ("star", "outline", "outlined", *toy.TRIGGERS)  # never in pretraining captions

REPORT_FILE = "pretrain_report.json"  # beside the saved pipeline: what pretraining measured


def is_toy_model(folder: str | Path) -> bool:
    """A folder this module pretrained (the toy world's base model): it holds the pretraining report."""
    return (Path(folder) / REPORT_FILE).is_file()


def build_tokenizer():
    # A known wart, kept because models/toy-sd1 was trained with it: build_clip_tokenizer adds each
    # word's merges in list order, and BPE applies merges by rank, so "red"'s early r+e merge splits
    # "green" into g/re/e/n. The model learned "green" as those 4 tokens (it draws green 100%).
    # Reordering WORDS would fix it but changes the token ids, so it needs a new pretraining run.
    tokenizer = build_clip_tokenizer(WORDS, max_length=MAX_LENGTH)
    split = [w for w in SPARE if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:  # adapters bind a concept to one token's embedding: these must stay whole
        raise RuntimeError(f"toy tokenizer: spare words {split} are not single tokens")
    return tokenizer


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),  # 3 blocks: 32 px -> 8x8 latents (vae_scale_factor 4)
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def build_unet(seed: int, cross_attention_dim: int = 64):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        # SD 1.x's layout at 3 levels: attention everywhere but the deepest down/up block, and the mid.
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # SD 1.x's config name for the number of heads
        norm_num_groups=16,
    )


def build_text_encoder(vocab_size: int, seed: int, hidden_size: int = 64):
    from .pipelines import tiny_text_encoder

    return tiny_text_encoder(vocab_size, hidden_size, seed, intermediate_size=4 * hidden_size,
                             max_positions=MAX_LENGTH)


SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_scheduler():
    """The sampling scheduler saved with the model: SD 1.x's DDIM settings."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        **SCHEDULE,
        clip_sample=False,  # clipping predicted latents to [-1, 1] ruins latent-diffusion samples
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# --- Data ----------------------------------------------------------------------------------------


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """n pretraining scenes (filled circles/squares/triangles only) as a uint8 N,3,H,W tensor + captions."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        scene = toy.random_scene(rng, shapes=toy.SHAPES, style="filled")
        images[i] = np.asarray(toy.render(scene, IMAGE_SIZE))
        captions.append(toy.caption(scene))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def render_codec_pool(n: int, seed: int) -> torch.Tensor:
    """n generic images for the VAE alone: random polygons, ellipses and thick strokes in any colour.

    The VAE is the model's image codec, like SD's (trained on generic photos, not on concepts). Trained
    on the world alone it cannot even reconstruct a hollow outline or a star (the scorer read back
    ~40% and ~30% of them after a round trip), and no adapter could then draw them. These images hold
    neither concept: no outlined circle/square/triangle, no 5-pointed star, no captions; and the UNet
    and text encoder never see them.
    """
    rng = np.random.default_rng(seed)
    big = IMAGE_SIZE * toy.SUPERSAMPLE
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i in range(n):
        background = toy.BACKGROUND if rng.random() < 0.7 else tuple(int(v) for v in rng.integers(150, 256, 3))
        image = Image.new("RGB", (big, big), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.5:
                colour = toy.COLOURS[list(toy.COLOURS)[int(rng.integers(len(toy.COLOURS)))]]
            else:
                colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            cx, cy = rng.uniform(0.15, 0.85, 2) * big
            radius = rng.uniform(0.08, 0.35) * big
            kind = rng.integers(3)
            if kind == 0:  # a random, often concave, polygon
                corners = int(rng.integers(3, 10))
                angles = np.sort(rng.uniform(0, 2 * np.pi, corners))
                radii = radius * rng.uniform(0.3, 1.0, corners)
                draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, angles)], fill=colour)
            elif kind == 1:  # an ellipse
                rx, ry = radius * rng.uniform(0.4, 1.0, 2)
                draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
            else:  # a thick open stroke of 1-3 straight segments
                points = [(cx, cy)] + [tuple(rng.uniform(0.05, 0.95, 2) * big) for _ in range(int(rng.integers(1, 4)))]
                draw.line(points, fill=colour, width=int(rng.uniform(1.5, 4.5) * toy.SUPERSAMPLE))
        images[i] = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def to_model(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak: the trainer's schedule with a floor."""
    return peak * lr_factor(step, "cosine", warmup, steps, floor=0.1)


class Progress:
    """Prints `stage step/steps loss s/step` every `every` steps; also the stop-on-time-limit check."""

    def __init__(self, stage: str, steps: int, every: int, minutes: float | None):
        self.stage, self.steps, self.every = stage, steps, every
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.start = self.last = time.monotonic()
        self.losses: list[float] = []
        self.history: list[tuple[int, float]] = []

    def update(self, step: int, loss: float, lr: float) -> bool:
        """Record one step; False when the time limit says stop."""
        self.losses.append(loss)
        done = step + 1
        if done % self.every == 0 or done == self.steps:
            now = time.monotonic()
            mean = sum(self.losses) / len(self.losses)
            self.history.append((done, mean))
            print(f"[{self.stage}] step {done}/{self.steps}  loss {mean:.4f}  lr {lr:.2e}  "
                  f"{(now - self.last) / len(self.losses):.3f} s/step  {(now - self.start) / 60:.1f} min", flush=True)
            self.losses, self.last = [], now
        return self.deadline is None or time.monotonic() < self.deadline

    @property
    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60


# --- Stage 1: VAE --------------------------------------------------------------------------------


def train_vae(vae, images: torch.Tensor, args) -> dict:
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    progress = Progress("vae", args.vae_steps, args.log_every, args.vae_minutes)
    vae.train()
    step = 0
    for step in range(args.vae_steps):
        lr = lr_at(step, args.vae_steps, args.vae_lr, warmup=100)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = to_model(images[torch.randint(len(images), (args.vae_batch,), generator=generator)])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        # SD's VAE loss weights the KL term 1e-6 against the per-image *sum* of the reconstruction
        # error; both are per-image sums here, divided by the pixel count to keep the numbers readable.
        pixels = batch[0].numel()
        loss = F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean() / pixels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if not progress.update(step, loss.item(), lr):
            print(f"[vae] time limit reached after {step + 1} steps", flush=True)
            break
    vae.eval()
    return {"steps": step + 1, "minutes": round(progress.minutes, 2), "loss_history": progress.history}


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (latents are then sampled per step, as SD does)."""
    means, stds = zip(*(encode_pixels(vae, to_model(images[start:start + batch]))
                        for start in range(0, len(images), batch)))
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_accuracy(vae, n: int = 192, seed: int = 7) -> dict[str, float]:
    """How often the scorer still reads colour/shape/style after a VAE round trip, on every
    colour x shape x style, stars included (those the VAE never saw: it must still carry them)."""
    cases = [(shape, style) for shape in toy.ALL_SHAPES for style in toy.STYLES]
    rng = np.random.default_rng(seed)
    scenes = [toy.random_scene(rng, shapes=(cases[i % len(cases)][0],), style=cases[i % len(cases)][1])
              for i in range(n)]
    images = torch.stack([torch.from_numpy(np.array(toy.render(s, IMAGE_SIZE))).permute(2, 0, 1) for s in scenes])
    decoded = vae.decode(vae.encode(to_model(images)).latent_dist.mean).sample
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    result = {}
    for name, keep in (("seen", lambda s: s.shape != toy.STAR and s.style == "filled"),
                       ("outline", lambda s: s.style == "outline"), ("star", lambda s: s.shape == toy.STAR)):
        chosen = [(s, toy.score(p)) for s, p in zip(scenes, pixels) if keep(s)]
        result[name] = sum(sc.colour == s.colour and sc.shape == s.shape and sc.style == s.style
                           for s, sc in chosen) / len(chosen)
    return result


# --- Stage 2: UNet + text encoder ----------------------------------------------------------------


class EMA:
    """Exponential moving average of parameters; sampling from it gives much cleaner images."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters, self.decay = parameters, decay
        self.shadow = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # The trainer's warm-up (short memory early, while weights move fast), one step later; at the
        # first step the toy's average keeps a tenth of the initial weights (the trainer's none), as when
        # the shipped model was made.
        decay = ema_decay_at(step + 1, self.decay) if step else min(self.decay, 0.1)
        update_ema(self.shadow, self.parameters, decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.parameters, self.shadow):
            p.copy_(s)


def train_unet(unet, text_encoder, tokenizer, means, stds, captions, scaling_factor: float, args) -> dict:
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(args.seed + 2)
    noise_scheduler = DDPMScheduler(**SCHEDULE)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    # Min-SNR-5 weighting (Hang et al. 2023): easy low-noise steps stop dominating; converges faster.
    weights = snr.clamp(max=5.0) / snr

    def tokens(texts: list[str]) -> torch.Tensor:
        return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    caption_ids = tokens(captions)
    empty_ids = tokens([""])[0]
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = EMA(parameters, args.ema)
    progress = Progress("unet", args.unet_steps, args.log_every, args.unet_minutes)
    unet.train()
    text_encoder.train()
    step = 0
    for step in range(args.unet_steps):
        lr = lr_at(step, args.unet_steps, args.unet_lr, warmup=200)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(means), (args.batch,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        ids = caption_ids[index].clone()
        ids[torch.rand(args.batch, generator=generator) < EMPTY_CAPTION_RATE] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(ids)[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
        per_sample = (prediction - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weights[timesteps] * per_sample).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        ema.update(step)
        # Logged: the plain epsilon MSE, comparable across runs whatever the weighting.
        if not progress.update(step, per_sample.mean().item(), lr):
            print(f"[unet] time limit reached after {step + 1} steps", flush=True)
            break
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()
    return {"steps": step + 1, "minutes": round(progress.minutes, 2), "loss_history": progress.history}


# --- Evaluation ----------------------------------------------------------------------------------


def generate(pipe, prompts: list[str], per_prompt: int, steps: int, guidance: float, seed: int = 0):
    """toy_eval.generate, grouped per prompt: image k of a prompt always uses seed + k."""
    from .eval import generate as generate_flat

    pipe.set_progress_bar_config(disable=True)
    flat = generate_flat(pipe, prompts, per_prompt, steps, guidance, seed)
    return [flat[i * per_prompt : (i + 1) * per_prompt] for i in range(len(prompts))]


def evaluate(pipe, per_prompt: int = 8, steps: int = 25, guidance: float = 5.0, seed: int = 0) -> dict:
    """Scores of the base model on every `a COLOUR SHAPE` prompt, plus concept presence.

    Returns {"prompts": {prompt: {"colour": rate, "shape": rate, "both": rate}}, "both": overall rate,
    "outline": rate, "star": rate (on the ordinary prompts), "trigger_star": star rate for `a COLOUR zkz`}.
    """
    prompts = [f"a {c} {s}" for s in toy.SHAPES for c in toy.COLOURS]
    table, everything = {}, []
    for prompt, images in zip(prompts, generate(pipe, prompts, per_prompt, steps, guidance, seed)):
        colour, shape = toy.parse_caption(prompt)
        scores = [toy.score(image) for image in images]
        everything += scores
        table[prompt] = {"colour": toy.match_rate(scores, colour=colour), "shape": toy.match_rate(scores, shape=shape),
                         "both": toy.match_rate(scores, colour=colour, shape=shape)}
    presence = toy.presence_rates(everything)
    triggered = [image for images in generate(pipe, [f"a {c} {toy.STAR_TRIGGER}" for c in toy.COLOURS],
                                              per_prompt, steps, guidance, seed) for image in images]
    return {
        "settings": {"per_prompt": per_prompt, "steps": steps, "guidance": guidance, "seed": seed},
        "prompts": table,
        "both": sum(row["both"] for row in table.values()) / len(table),
        "outline": presence["style:outline"],
        "star": presence["shape:star"],
        "none": presence["none"],
        "trigger_star": toy.presence_rates(triggered)["shape:star"],
    }


def print_evaluation(result: dict) -> None:
    s = result["settings"]
    print(f"evaluation: {s['per_prompt']} images per prompt, {s['steps']} DDIM steps, guidance {s['guidance']}")
    for prompt, row in result["prompts"].items():
        print(f"  {prompt:<18} colour {row['colour']:.2f}  shape {row['shape']:.2f}  both {row['both']:.2f}")
    print(f"  overall both {result['both']:.3f}; on these prompts outline {result['outline']:.3f}, "
          f"star {result['star']:.3f}, nothing found {result['none']:.3f}; "
          f"star on 'a COLOUR {toy.STAR_TRIGGER}' {result['trigger_star']:.3f}", flush=True)


# --- Command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sdlora.toy.pretrain",
        description="Pretrain the tiny SD 1.x toy model (VAE, then UNet + text encoder) on CPU.",
        epilog="Run with OMP_WAIT_POLICY=PASSIVE on a shared machine (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="diffusers folder to write, e.g. models/toy-sd1")
    parser.add_argument("--seed", type=int, default=0, help="seeds data, initial weights and noise")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--pool", type=int, default=16384, help="rendered scenes to train on")
    parser.add_argument("--batch", type=int, default=64, help="UNet batch size")
    parser.add_argument("--vae-batch", type=int, default=32, help="VAE batch size")
    parser.add_argument("--vae-steps", type=int, default=1000, help="VAE training steps")
    parser.add_argument("--vae-lr", type=float, default=2e-3, help="VAE peak learning rate")
    parser.add_argument("--vae-minutes", type=float, default=None,
                        help="also stop the VAE stage after this long (the run is then not reproducible)")
    parser.add_argument("--unet-steps", type=int, default=3500, help="UNet + text encoder training steps")
    parser.add_argument("--unet-lr", type=float, default=1e-3, help="UNet + text encoder peak learning rate")
    parser.add_argument("--unet-minutes", type=float, default=None,
                        help="also stop the UNet stage after this long (the run is then not reproducible)")
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the saved UNet/text-encoder weights")
    parser.add_argument("--log-every", type=int, default=50, help="print progress every N steps")
    parser.add_argument("--eval-images", type=int, default=8, help="images per prompt in the final check (0: skip)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the model already in --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: OMP_WAIT_POLICY=PASSIVE is not set; steps slow down ~10x if another process uses these cores",
              flush=True)
    from diffusers import StableDiffusionPipeline

    out = Path(args.out)
    if args.eval_only:
        pipe = StableDiffusionPipeline.from_pretrained(out)
        print_evaluation(evaluate(pipe, per_prompt=args.eval_images))
        return

    report: dict = {"command": vars(args)}
    started = time.monotonic()
    images, captions = render_pool(args.pool, args.seed)
    print(f"rendered {len(images)} scenes in {time.monotonic() - started:.1f} s", flush=True)

    tokenizer = build_tokenizer()
    vae = build_vae(args.seed)
    unet = build_unet(args.seed)
    text_encoder = build_text_encoder(len(tokenizer), args.seed)
    for name, model in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder)):
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)

    codec = render_codec_pool(args.pool, args.seed + 100)
    # Half world scenes, half generic shapes: the VAE is exact on the world yet can carry new concepts.
    report["vae"] = train_vae(vae, torch.cat([images, codec]), args)
    means, stds = encode_pool(vae, images)
    # As SD: scale latents to unit variance for the UNet (SD 1.x's 0.18215 was measured the same way).
    latent_std = torch.sqrt((means.pow(2) + stds.pow(2)).mean() - means.mean().pow(2)).item()
    vae.register_to_config(scaling_factor=round(1.0 / latent_std, 5))
    report["vae"]["scaling_factor"] = vae.config.scaling_factor
    report["vae"]["round_trip"] = reconstruction_accuracy(vae)
    print(f"[vae] scaling_factor {vae.config.scaling_factor}; scorer agreement after a round trip "
          f"{report['vae']['round_trip']}", flush=True)

    report["unet"] = train_unet(unet, text_encoder, tokenizer, means, stds, captions, vae.config.scaling_factor, args)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    report["minutes_total"] = round((time.monotonic() - started) / 60, 2)
    print(f"saved {out} after {report['minutes_total']} min", flush=True)

    if args.eval_images:
        report["evaluation"] = evaluate(StableDiffusionPipeline.from_pretrained(out), per_prompt=args.eval_images)
        print_evaluation(report["evaluation"])
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
