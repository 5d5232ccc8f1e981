"""The training loop: a LoRA on a folder of captioned images, with the noise-prediction loss.

setup (config -> data -> model -> adapter -> caches) -> for each step: micro-batches -> loss ->
backward -> clip -> optimizer step -> log / validate / sample / checkpoint -> the adapter file.
Every random draw of a step comes from a generator seeded by (seed, step), so a resumed run
repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import faults, loader
from .caching import LatentCache, TextCache, encode_pixels, encode_text, sample_latents
from .checkpoint import (checkpoint_folders, load_state, resolve_resume, rng_states, save_checkpoint,
                         set_rng_states)
from .config import ConfigError, TrainConfig, to_toml, validate
from .data import (BucketBatchSampler, CaptionOptions, DatasetScan, ImageCaptionDataset, bucket_histogram,
                   collate, find_images, truncated_captions)
from .durable import WriteFailed, failure, remove_temporaries, write_file, write_text
from .models import load_pipeline
from .runlock import RunLock
from .targets import PRESETS

ADAPTER = "lora"  # the adapter's name inside the pipeline while training
logger = logging.getLogger("sdlora")


class TrainingDiverged(RuntimeError):
    """The loss or the adapter's weights became NaN or infinite."""


def diverged_message(what: str, step: int, mixed_precision: str) -> str:
    fixes = ["a lower --lr", "--max-grad-norm 1", "check the images and captions"]
    if mixed_precision == "fp16":  # fp16 overflows at 65504; bf16 has fp32's range
        fixes.insert(0, "--mixed-precision bf16 (fp16 overflows easily; bf16 has fp32's range)")
    return (f"{what} at step {step}; nothing after the last checkpoint was saved. Usual fixes: "
            + ", ".join(fixes))


@dataclass
class RunPaths:
    root: Path
    name: str

    @property
    def adapter(self) -> Path:
        return self.root / f"{self.name}.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics(self) -> Path:
        return self.logs / "metrics.jsonl"

    def remove_temporaries(self) -> list[Path]:
        """What a killed run left half-written; only safe while holding the folder's lock."""
        return [path for folder in (self.root, self.checkpoints, self.samples, self.logs)
                for path in remove_temporaries(folder)]


# ---------------------------------------------------------------- small pure helpers


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base learning rate at an optimizer step."""
    if warmup and step < warmup and schedule != "constant":
        return (step + 1) / warmup
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def step_generator(seed: int, step: int, micro: int = 0, process: int = 0) -> torch.Generator:
    """The generator every random draw of one micro-batch comes from."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 64 + micro) * 16 + process)


def split_validation(scan: DatasetScan, fraction: float, seed: int) -> tuple[DatasetScan, DatasetScan | None]:
    if fraction == 0:
        return scan, None
    order = list(range(len(scan.items)))
    random.Random(f"{seed}:validation").shuffle(order)
    count = max(1, round(fraction * len(order)))
    if count >= len(order):
        raise ValueError(f"validation_split {fraction} leaves no training image out of {len(order)}")
    held = set(order[:count])
    train = [item for i, item in enumerate(scan.items) if i not in held]
    validation = [item for i, item in enumerate(scan.items) if i in held]
    return DatasetScan(train, root=scan.root), DatasetScan(validation, root=scan.root)


def epoch_batches(sampler: BucketBatchSampler, epoch: int, processes: int) -> list[list[int]]:
    """This epoch's batches, a whole number of rounds so every process takes as many."""
    batches = sampler.batches(epoch)
    usable = len(batches) // processes * processes
    if usable == 0:
        raise ValueError(f"{len(batches)} batch(es) per epoch cannot feed {processes} processes: use more images "
                         "or a smaller --batch-size")
    return batches[:usable]


def batch_keys(sampler: BucketBatchSampler, epoch: int, position: int, processes: int, process: int):
    """(epoch, position after, this process's batch) from a resume point onwards, forever."""
    while True:
        batches = epoch_batches(sampler, epoch, processes)
        while position < len(batches):
            position += processes
            yield epoch, position, batches[position - processes + process]
        epoch, position = epoch + 1, 0


def diffusion_loss(unet, scheduler, latents, text, generator, *, prediction_type, noise_offset=0.0,
                   min_snr_gamma=None, timestep_range=(0, 1000), base_prediction=None) -> torch.Tensor:
    """The noise-prediction loss of one batch; all randomness from `generator`.

    Timesteps are drawn from `timestep_range`. With `base_prediction` (a function of the noisy latents,
    their timesteps and their rows in the batch, returning the model's output with the adapter off),
    timesteps are drawn from the whole schedule instead, and those outside the range are trained
    towards that output: the adapter learns to leave them alone.
    """
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(batch, latents.shape[1], 1, 1, generator=generator)
    low, high = timestep_range
    if base_prediction is not None:
        low, high = 0, scheduler.config.num_train_timesteps
    timesteps = torch.randint(low, high, (batch,), generator=generator)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if base_prediction is not None:
        outside = ((timesteps < timestep_range[0]) | (timesteps >= timestep_range[1])).nonzero().flatten()
        if len(outside):
            target = target.clone()
            target[outside] = base_prediction(noisy[outside], timesteps[outside], outside).to(target.dtype)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample  # autocast picks the dtype
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = scheduler.alphas_cumprod.to(latents.device)[timesteps]
        snr = alphas / (1 - alphas)
        weight = snr.clamp(max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        loss = loss * weight
    return loss.mean()


def make_grid(images: list, columns: int):
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Holds what a run needs; `run()` is the loop."""

    def __init__(self, config: TrainConfig, quiet: bool = False):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        validate(config)
        self.config, self.quiet = config, quiet
        self.paths = RunPaths(Path(config.output_dir), config.name)
        self.metrics = self.tensorboard = None  # opened by run(), on the main process
        scan = find_images(config.data, config.caption_extension)
        self.train_scan, self.val_scan = split_validation(scan, config.validation_split, config.seed)
        self.resume_folder = resolve_resume(config.resume, self.paths.checkpoints) if config.resume else None
        earlier = checkpoint_folders(self.paths.checkpoints)
        if earlier and not config.resume:  # a fresh run would mix its checkpoints with these and prune them
            raise ConfigError(f"{self.paths.checkpoints} holds checkpoints of an earlier run (newest {earlier[-1].name}): "
                              "continue it with --resume latest, or choose another --output-dir")
        self.prompts = ([line.strip() for line in Path(config.sample_prompts).read_text().splitlines()
                         if line.strip()] if config.sample_prompts else [])
        self.say(scan.summary())

        # accelerate keeps its settings process-wide; a second run in one process (a notebook) may
        # ask for another precision. The distributed part (PartialState) is kept.
        AcceleratorState._reset_state()
        # cpu=True without CUDA: only then does accelerate see several CPU processes (torchrun) as one run.
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            config.mixed_precision]
        torch.manual_seed(config.seed)
        self._load_model()
        self._build_data()
        self._build_optimizer()

    def say(self, message: str) -> None:
        if not self.quiet and self.accelerator_is_main():
            tqdm.write(message)

    def accelerator_is_main(self) -> bool:
        return not hasattr(self, "accelerator") or self.accelerator.is_main_process

    # -- setup

    def _load_model(self) -> None:
        from diffusers import DDPMScheduler

        config = self.config
        pipe = load_pipeline(config.model, dtype=self.weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.unet, self.text_encoder, self.tokenizer = pipe.unet, pipe.text_encoder, pipe.tokenizer
        self.vae = pipe.vae.to(torch.float32)  # an fp16 VAE can overflow; it runs rarely when caching
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = config.prediction_type or self.scheduler.config.prediction_type
        for module in (self.unet, self.text_encoder, self.vae):
            module.requires_grad_(False)
        pipe.to(self.device)
        parts = ("unet", "text_encoder") if config.train_text_encoder else ("unet",)
        targets = config.targets if config.targets in PRESETS else [config.targets]
        loader.add_adapter(pipe, ADAPTER, rank=config.rank, alpha=config.alpha, targets=targets,
                           components_to_adapt=parts, dtype=torch.float32)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        self.unet.train()
        self.text_encoder.train(config.train_text_encoder)

    def _dataset(self, scan: DatasetScan, training: bool) -> ImageCaptionDataset:
        config = self.config
        captions = CaptionOptions(
            prefix=config.caption_prefix, suffix=config.caption_suffix,
            shuffle_tags=config.shuffle_tags and training, keep_tokens=config.keep_tokens,
            caption_dropout=config.caption_dropout if training else 0.0,
            tag_dropout=config.tag_dropout if training else 0.0,
        )
        sides = {} if config.buckets else {"min_side": config.resolution, "max_side": config.resolution}
        return ImageCaptionDataset(scan, config.resolution, allow_upscale=config.allow_upscale,
                                   flip_prob=config.flip if training else 0.0, random_crop=config.random_crop,
                                   caption_options=captions, seed=config.seed, **sides)

    def _build_data(self) -> None:
        config = self.config
        self.dataset = self._dataset(self.train_scan, training=True)
        self.sampler = BucketBatchSampler(self.dataset.sample_buckets, config.batch_size, seed=config.seed)
        self.say("buckets:\n" + bucket_histogram(self.dataset.sample_buckets))
        if message := truncated_captions(self.dataset, self.tokenizer, self.train_scan.root):
            self.say(message)
        processes = self.accelerator.num_processes
        per_epoch = len(epoch_batches(self.sampler, 0, processes)) // processes // config.gradient_accumulation
        self.steps_per_epoch = max(1, per_epoch)
        epochs = config.resolved_epochs()
        self.total_steps = config.max_steps or epochs * self.steps_per_epoch

        options = self.dataset.caption_options
        self.captions_vary = options.shuffle_tags or options.caption_dropout > 0 or options.tag_dropout > 0
        self.latents = None
        if config.cache_latents:
            cache_dir = Path(config.cache_dir) if config.cache_dir else None
            self.latents = LatentCache(self.vae, self.dataset, flips=config.flip > 0, cache_dir=cache_dir,
                                       progress=not self.quiet and self.accelerator.is_main_process)
            if cache_dir:
                self.say(f"latent cache: {self.latents.reused} of {len(self.latents.entries)} reused from {cache_dir}")
        self.text_cache = None
        if config.cache_text and not config.train_text_encoder and not self.captions_vary:
            self.text_cache = TextCache(self.text_encoder, self.tokenizer,
                                        [self.dataset.caption(i, 0) for i in range(len(self.dataset))])
        self.val_dataset = self._dataset(self.val_scan, training=False) if self.val_scan else None
        if self.latents is not None and self.val_dataset is None and not self.prompts:
            self.vae.to("cpu")  # every latent is cached and nothing decodes: free the accelerator's memory

    def _build_optimizer(self) -> None:
        config = self.config
        groups = [{"params": loader.trainable_parameters(self.unet, ADAPTER), "lr": config.lr}]
        if config.train_text_encoder:
            te_params = loader.trainable_parameters(self.text_encoder, ADAPTER)
            groups.append({"params": te_params, "lr": config.text_encoder_lr or config.lr})
        self.parameters = [p for group in groups for p in group["params"]]
        for parameter in self.parameters:
            parameter.requires_grad_(True)
        if config.optimizer == "adamw8bit":
            import bitsandbytes

            self.optimizer = bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.weight_decay)
        elif config.optimizer == "prodigy":
            import prodigyopt

            self.optimizer = prodigyopt.Prodigy(groups, weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, config.lr_scheduler, config.warmup_steps, self.total_steps))
        # accelerate wraps the models for multi-process training; the adapters stay the same tensors.
        # The wrapped ones serve the training steps; work on the main process alone (validation,
        # samples) uses the plain ones, since a wrapped forward may wait on the other processes.
        self.wrapped_unet, self.optimizer = self.accelerator.prepare(self.unet, self.optimizer)
        self.wrapped_text_encoder = (self.accelerator.prepare(self.text_encoder) if config.train_text_encoder
                                     else self.text_encoder)

    # -- one step

    def _text(self, captions: list[str], training: bool) -> torch.Tensor:
        if self.text_cache is not None:
            return self.text_cache.batch(captions).to(self.device)
        text_encoder = self.wrapped_text_encoder if training else self.text_encoder
        with nullcontext() if self.config.train_text_encoder else torch.no_grad():
            return encode_text(text_encoder, self.tokenizer, captions)

    def _latents(self, epoch: int, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        if self.latents is not None:
            mean, std = self.latents.batch(self.dataset, indices, epoch, self.device)
        else:
            batch = collate([self.dataset[(epoch, i)] for i in indices])
            mean, std = encode_pixels(self.vae, batch["pixel_values"])
        return sample_latents(self.vae.config, mean, std, generator)

    def micro_batch_loss(self, epoch: int, indices: list[int], generator: torch.Generator,
                         dataset: ImageCaptionDataset | None = None, training: bool = True) -> torch.Tensor:
        config = self.config
        dataset = dataset or self.dataset
        if dataset is self.dataset:
            latents = self._latents(epoch, indices, generator)
        else:  # validation images are few and never cached
            pixels = collate([dataset[(epoch, i)] for i in indices])["pixel_values"]
            latents = sample_latents(self.vae.config, *encode_pixels(self.vae, pixels), generator)
        captions = [dataset.caption(i, epoch) for i in indices]
        text = self._text(captions, training)
        preserve = self._base_prediction(captions, text) if config.preserve_outside_window else None
        with self.accelerator.autocast():
            return diffusion_loss(self.wrapped_unet if training else self.unet, self.scheduler, latents, text,
                                  generator,
                                  prediction_type=self.prediction_type, noise_offset=config.noise_offset,
                                  min_snr_gamma=config.min_snr_gamma,
                                  timestep_range=(config.timestep_min, config.timestep_max),
                                  base_prediction=preserve)

    def _base_prediction(self, captions: list[str], text: torch.Tensor):
        """The target outside the timestep window: the frozen model's output, adapter off (text included)."""

        @torch.no_grad()
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            with loader.disabled(self.pipe, ADAPTER):
                if self.config.train_text_encoder:
                    base_text = encode_text(self.text_encoder, self.tokenizer, [captions[i] for i in rows.tolist()])
                else:
                    base_text = text[rows]
                return self.unet(noisy, timesteps, encoder_hidden_states=base_text).sample

        return predict

    @torch.no_grad()
    def fixed_noise_loss(self, dataset: ImageCaptionDataset | None = None, seed: int = 1234) -> float:
        """Mean loss over a dataset at fixed noise and timesteps: comparable across steps and runs."""
        dataset = dataset or self.dataset
        sampler = BucketBatchSampler(dataset.sample_buckets, self.config.batch_size, seed=0, shuffle=False)
        losses = [self.micro_batch_loss(0, batch, step_generator(seed, i), dataset, training=False).item()
                  for i, batch in enumerate(sampler.batches(0))]
        return sum(losses) / len(losses)

    # -- state

    def state(self, step: int, epoch: int, position: int) -> dict:
        return {"step": step, "epoch": epoch, "position": position, "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "rng": rng_states(),
                "config": json.dumps(asdict(self.config))}

    def restore(self, folder: Path) -> tuple[int, int, int]:
        state = load_state(folder)
        saved = json.loads(state["config"])
        for key in ("rank", "alpha", "targets", "train_text_encoder", "seed", "batch_size", "gradient_accumulation",
                    "resolution", "data"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(f"cannot resume from {folder}: it was trained with {key}={saved[key]!r}, this run "
                                 f"has {key}={getattr(self.config, key)!r}")
        loader.copy_weights_from(self.pipe, ADAPTER, folder / "adapter.safetensors")
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        set_rng_states(state["rng"])
        return state["step"], state["epoch"], state["position"]

    def save_adapter(self, path: Path, dtype: str, step: int) -> Path:
        config = self.config
        header = {
            "ss_learning_rate": str(config.lr), "ss_unet_lr": str(config.lr),
            "ss_text_encoder_lr": str(config.text_encoder_lr or config.lr) if config.train_text_encoder else "0",
            "ss_optimizer": config.optimizer, "ss_lr_scheduler": config.lr_scheduler,
            "ss_resolution": f"({config.resolution}, {config.resolution})", "ss_steps": str(step),
            "ss_epoch": str(step // self.steps_per_epoch), "ss_num_train_images": str(len(self.dataset)),
            "ss_noise_offset": str(config.noise_offset), "ss_min_snr_gamma": str(config.min_snr_gamma),
            "ss_seed": str(config.seed), "ss_training_comment": "trained with sdlora",
        }
        record = {"training": asdict(config), "steps": step}
        return loader.save(self.pipe, path, ADAPTER, dtype=dtype, title=config.name, record=record, header=header)

    # -- watching

    def sample(self, step: int) -> Path | None:
        if not self.prompts or not self.accelerator.is_main_process:
            return None
        size = self.config.resolution
        images = []
        with torch.no_grad(), self.accelerator.autocast():
            for i, prompt in enumerate(self.prompts):
                generator = torch.Generator().manual_seed(self.config.seed + i)
                images += self.pipe(prompt, num_inference_steps=self.config.sample_steps, height=size, width=size,
                                    guidance_scale=self.config.sample_guidance, generator=generator).images
        self.unet.train()
        path = self.paths.samples / f"step-{step:06d}.png"
        png = io.BytesIO()
        make_grid(images, columns=min(4, len(images))).save(png, format="PNG")
        write_file(path, png.getvalue())
        if self.tensorboard:
            import numpy as np

            self.tensorboard.add_image("samples", np.array(make_grid(images, min(4, len(images)))), step,
                                       dataformats="HWC")
        return path

    def _open_logs(self, resumed_step: int | None):
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        trim_metrics(self.paths.metrics, resumed_step)
        self.metrics = self.paths.metrics.open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.paths.logs))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def sync_logs(self) -> None:
        try:
            self.metrics.flush()
            os.fsync(self.metrics.fileno())
        except OSError as error:
            raise failure(self.paths.metrics, error) from error

    def _close_logs(self) -> None:
        if self.metrics:
            self.metrics.close()
        if self.tensorboard:
            self.tensorboard.close()
        self.metrics = self.tensorboard = None

    def log(self, record: dict) -> None:
        try:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        except OSError as error:
            raise failure(self.paths.metrics, error) from error
        if self.tensorboard:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])

    # -- the loop

    def run(self) -> Path:
        step, epoch, position = self.restore(self.resume_folder) if self.resume_folder else (0, 0, 0)
        if self.accelerator.is_main_process:
            self._prepare_output(resumed_step=step if self.resume_folder else None)
        try:
            return self._train(step, epoch, position)
        except WriteFailed as error:
            raise WriteFailed(error.errno, f"{error}. {self.resume_hint()}") from error
        finally:
            self._close_logs()

    def _prepare_output(self, resumed_step: int | None) -> None:
        left = self.paths.remove_temporaries()
        if left:
            self.say(f"removed {len(left)} half-written file(s) an interrupted run left: "
                     + ", ".join(str(path.relative_to(self.paths.root)) for path in left))
        write_text(self.paths.root / "config.toml", to_toml(self.config))
        self._open_logs(resumed_step)

    def resume_hint(self) -> str:
        folders = checkpoint_folders(self.paths.checkpoints)
        if not folders:
            return "Files written before are intact; no checkpoint was written yet"
        return (f"Files written before are intact, and the last checkpoint is {folders[-1]}: fix the cause, then "
                "run again with --resume latest")

    def check_finite(self, step: int) -> None:
        """Before a save: a NaN in the weights (an fp16 overflow in the update, say) is never written."""
        if not all(torch.isfinite(parameter).all() for parameter in self.parameters):
            raise TrainingDiverged(diverged_message("the adapter's weights became NaN or infinite", step,
                                                    self.config.mixed_precision))

    def _train(self, step: int, epoch: int, position: int) -> Path:
        config, accelerator = self.config, self.accelerator
        trainable = sum(p.numel() for p in self.parameters)
        self.say(f"training {trainable / 1e6:.2f} M parameters ({config.targets}, rank {config.rank}) on "
                 f"{self.device}, weights {self.weight_dtype}; {self.total_steps} steps, "
                 f"{self.steps_per_epoch} per epoch" + (f"; resuming at step {step}" if step else ""))
        keys = batch_keys(self.sampler, epoch, position, accelerator.num_processes, accelerator.process_index)
        bar = tqdm(total=self.total_steps, initial=step, desc="training", unit="step",
                   disable=self.quiet or not accelerator.is_main_process)
        started, smoothed = time.time(), None
        while step < self.total_steps:
            total = 0.0
            for micro in range(config.gradient_accumulation):
                epoch, position, indices = next(keys)
                generator = step_generator(config.seed, step, micro, accelerator.process_index)
                syncing = micro == config.gradient_accumulation - 1
                with nullcontext() if syncing else accelerator.no_sync(self.wrapped_unet):
                    loss = self.micro_batch_loss(epoch, indices, generator) / config.gradient_accumulation
                    if faults.nan_at(step + 1):
                        loss = loss * float("nan")
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(diverged_message(f"the loss became {loss.item()}", step + 1,
                                                                config.mixed_precision))
                    accelerator.backward(loss)
                total += loss.item()
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.parameters, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            faults.kill_point("step")

            smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            if accelerator.is_main_process:
                if step % config.log_every == 0 or step == self.total_steps:
                    self.log({"step": step, "loss": total, "loss_smoothed": smoothed, "lr": lr, "epoch": epoch,
                              "time": round(time.time() - started, 3)})
                if config.validation_every and (step % config.validation_every == 0 or step == self.total_steps):
                    self.log({"step": step, "val_loss": self.fixed_noise_loss(self.val_dataset),
                              "time": round(time.time() - started, 3)})
                if config.sample_every and step % config.sample_every == 0:
                    self.sample(step)
                if config.save_every and step % config.save_every == 0:
                    self.check_finite(step)
                    self.sync_logs()  # the log on disk reaches at least as far as the checkpoint
                    save_checkpoint(self.paths.checkpoints, step,
                                    lambda path: self.save_adapter(path, "fp32", step),
                                    self.state(step, epoch, position), config.keep_checkpoints)
        bar.close()
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return self.paths.adapter
        if config.sample_prompts and (not config.sample_every or step % config.sample_every):
            self.sample(step)
        self.check_finite(step)
        output = self.save_adapter(self.paths.adapter, config.save_dtype, step)
        elapsed = time.time() - started
        self.say(f"done: {step} steps in {elapsed:.1f} s ({elapsed / max(1, step):.3f} s/step), peak memory "
                 f"{peak_memory_mb(self.device):.0f} MB\nadapter: {output} ({output.stat().st_size / 1024:.1f} KiB)")
        return output


def trim_metrics(path: Path, resumed_step: int | None) -> None:
    """Make the log continue cleanly: drop a line a kill cut in half and, on resume, the records of
    the steps after the checkpoint, which the resumed run logs again."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            record = None
        if record is not None and (resumed_step is None or record.get("step", 0) <= resumed_step):
            kept.append(line)
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def train(config: TrainConfig, quiet: bool = False) -> Path:
    """Run a training and return the adapter file's path. The output folder is locked meanwhile."""
    validate(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun, the main process alone writes
        return Trainer(config, quiet=quiet).run()
    with RunLock(config.output_dir, say=lambda message: print(f"sdlora: {message}", file=sys.stderr)):
        return Trainer(config, quiet=quiet).run()
