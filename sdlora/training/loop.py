"""The training loop: a LoRA on a folder of captioned images, with the noise-prediction loss.

setup (config -> data -> model -> adapter -> caches) -> for each step: micro-batches -> loss ->
backward -> clip -> optimizer step -> log / validate / sample / checkpoint -> the adapter file.
Every random draw of a step comes from a generator seeded by (seed, step), so a resumed run
repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import loader
from ..reliability import faults
from ..errors import ConfigError, TrainingDiverged, WriteFailed
from ..base_models.families import ImageGeometry, TextConditioning, TextOptions, detect_family
from ..reliability.durable import remove_temporaries, write_file, write_text
from ..base_models.parts import components, native_resolution
from ..base_models.sources import load_pipeline
from ..files.safetensors import kohya_training_header
from ..images import grid, png_bytes
from ..reliability.runlock import RunLock
from ..adapters.targets import PRESETS
from .caching import LatentCache, TextCache, encode_pixels, latent_mask, sample_latents
from .checkpoint import (ADAPTER_FILE, checkpoint_folders, load_state, resolve_resume, rng_states, save_checkpoint,
                         set_rng_states)
from .config import RESUME_KEYS, TrainConfig, class_prompt_list, to_toml, trained_text_encoders, validate
from .data import (BucketBatchSampler, CaptionOptions, DatasetScan, ImageCaptionDataset, attach_masks,
                   bucket_histogram, collate, find_images, truncated_captions)
from .loss import TimestepSampling, diffusion_loss, rows_of
from .prior import RENAMED_OPTIONS, ClassBatch, class_batch_keys, prepare_class_images
from .runlog import RunLog
from .steps import (batch_keys, ema_decay_at, epoch_batches, lr_factor, split_validation, step_generator,
                    update_ema)

ADAPTER = "lora"  # the adapter's name inside the pipeline while training
logger = logging.getLogger("sdlora")


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
    def ema_adapter(self) -> Path:
        return self.root / f"{self.name}.ema.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def remove_temporaries(self) -> list[Path]:
        """What a killed run left half-written; only safe while holding the folder's lock."""
        return [path for folder in (self.root, self.checkpoints, self.samples, self.logs)
                for path in remove_temporaries(folder)]


@dataclass
class ImageSet:
    """One set of images as the trainer reads them: the dataset, the order of its batches and, when
    latents are cached, their cache. A run holds one for its training images, and one each for its
    validation and class images when it has them. Validation images have no sampler (they are scored
    in a fixed order) and no cache (they are few)."""

    dataset: ImageCaptionDataset
    sampler: BucketBatchSampler | None = None
    cache: LatentCache | None = None


# ---------------------------------------------------------------- small helpers


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
        self.log: RunLog | None = None  # opened by run(), on the main process
        scan = find_images(config.data, config.caption_extension)
        if config.masked_loss or config.alpha_mask:
            scan = attach_masks(scan, alpha=config.alpha_mask)
        train_scan, val_scan = split_validation(scan, config.validation_split, config.seed)
        # Class images for prior preservation: a folder is scanned now, before any model loads; generated
        # ones are made once the model is loaded, from the base model before the adapter is attached.
        class_scan = find_images(config.reg_data, config.caption_extension) if config.reg_data else None
        self.resume_folder = resolve_resume(config.resume, self.paths.checkpoints) if config.resume else None
        earlier = checkpoint_folders(self.paths.checkpoints)
        if earlier and not config.resume:  # a fresh run would mix its checkpoints with these and prune them
            raise ConfigError(f"{self.paths.checkpoints} holds checkpoints of an earlier run (newest "
                              f"{earlier[-1].name}): "
                              "continue it with --resume latest, or choose another --output-dir")
        # A finished run leaves no checkpoint to resume, only its adapter: a fresh run would overwrite that.
        finished = [path for path in (self.paths.adapter, self.paths.ema_adapter) if path.exists()]
        if finished and not config.resume:
            raise ConfigError(f"{finished[0]} holds the adapter of an earlier run: choose another --output-dir or "
                              "--name, or move that file away")
        self.prompts = ([line.strip() for line in Path(config.sample_prompts).read_text().splitlines()
                         if line.strip()] if config.sample_prompts else [])
        self.say(scan.summary())
        if class_scan:
            self.say("class images (prior preservation): " + class_scan.summary())

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
        if config.class_prompts:  # the base model as it is: its own sampler, no adapter, weights unchanged
            class_scan = self._generate_class_images()
        self._attach_adapter()

        dataset, sampler = self._training_data(train_scan)
        self.steps_per_epoch, self.total_steps = self._step_counts(sampler)  # too few batches fail before caching
        self.images = ImageSet(dataset, sampler, self._latent_cache(dataset))
        if self.images.cache is not None and config.cache_dir:
            self.say(f"latent cache: {self.images.cache.reused} of {len(self.images.cache.entries)} reused from "
                     f"{config.cache_dir}")
        self.validation = ImageSet(self._dataset(val_scan, training=False)) if val_scan else None
        self.prior_loss_weight = 1.0 if config.prior_loss_weight is None else config.prior_loss_weight
        self.class_images = self._class_images(class_scan) if class_scan else None
        self.text_cache = self._text_cache()
        self._release_idle_models()
        self._build_optimizer()

    def say(self, message: str) -> None:
        if not self.quiet and self.accelerator_is_main():
            tqdm.write(message)

    def accelerator_is_main(self) -> bool:
        return not hasattr(self, "accelerator") or self.accelerator.is_main_process

    # -- setup

    def _load_model(self) -> None:
        config = self.config
        pipe = load_pipeline(config.model, dtype=self.weight_dtype, model_config=config.model_config,
                             prediction_type=config.prediction_type)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.unet = pipe, pipe.unet
        self.family = detect_family(components(pipe))
        self.text_encoders = [getattr(pipe, name) for name in self.family.text_encoders]
        for name, encoder in zip(self.family.text_encoders, self.text_encoders):
            depth = encoder.config.num_hidden_layers  # clip_skip = depth + 1 would be the token embeddings
            if config.clip_skip is not None and config.clip_skip > depth:
                raise ConfigError(f"clip_skip {config.clip_skip} is deeper than this {self.family.title} model's "
                                  f"{name}, which has {depth} layers: give 1 to {depth}")
        self.tokenizers = [getattr(pipe, name) for name in self.family.tokenizers]
        self.trained_encoders = config.trained_text_encoders(self.family.text_encoders)
        if config.train_text_encoder_2 and len(self.text_encoders) < 2:
            raise ConfigError(f"--train-text-encoder-2: this {self.family.title} model has one text encoder")
        self.text_options = TextOptions(clip_skip=config.clip_skip, chunks=(config.max_token_length or 75) // 75)
        self.resolution = config.resolution or native_resolution(pipe)
        self.vae = pipe.vae.to(torch.float32)  # an fp16 VAE can overflow; it runs rarely when caching
        self.prediction_type = config.prediction_type or pipe.scheduler.config.prediction_type
        if config.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ConfigError("zero_terminal_snr needs v_prediction, and this model predicts "
                              f"{self.prediction_type}: add --prediction-type v_prediction (and train long enough "
                              "for the model to adapt) or drop --zero-terminal-snr")

    def _generate_class_images(self) -> DatasetScan:
        config, pipe = self.config, self.pipe
        folder = Path(config.class_data_dir or self.paths.root / "class-images")
        pipe.to(self.device)
        # The main process generates; the others then find the folder complete, with the same fingerprint.
        with self.accelerator.main_process_first():
            prepare_class_images(pipe, folder, class_prompt_list(config.class_prompts), config.num_class_images,
                                 self.resolution, config.seed, config.class_sample_steps, config.class_guidance,
                                 config.batch_size, autocast=self.accelerator.autocast,
                                 progress=not self.quiet and self.accelerator.is_main_process, say=self.say)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # what generation held is not needed for training
        return find_images(folder, ".txt")

    def _attach_adapter(self) -> None:
        """The training schedule, the frozen base on the device, and the adapter to train on it."""
        from diffusers import DDPMScheduler

        config, pipe = self.config, self.pipe
        # The training schedule, and the sampler's when it changes: ZTSNR samples from the last step.
        rescale = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if config.zero_terminal_snr else {}
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, **rescale)
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=self.prediction_type,
                                                          **rescale)
        for module in (self.unet, self.vae, *self.text_encoders):
            module.requires_grad_(False)
        pipe.to(self.device)
        targets = config.targets if config.targets in PRESETS else [config.targets]
        loader.add_adapter(pipe, ADAPTER, rank=config.rank, alpha=config.alpha, targets=targets,
                           components_to_adapt=("unet", *self.trained_encoders), dtype=torch.float32,
                           dora=config.dora)
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for name in self.trained_encoders:
                getattr(pipe, name).gradient_checkpointing_enable()
        self.unet.train()
        for name, encoder in zip(self.family.text_encoders, self.text_encoders):
            encoder.train(name in self.trained_encoders)

    def _dataset(self, scan: DatasetScan, training: bool, class_images: bool = False) -> ImageCaptionDataset:
        """The dataset of `scan`. Class images get no caption prefix or suffix, which name the instance
        concept (a trigger word in the class captions would teach the class prompts the concept: the leak
        prior preservation is there to stop), and a seed of their own for flips and caption processing."""
        config = self.config
        captions = CaptionOptions(
            prefix="" if class_images else config.caption_prefix, suffix="" if class_images else config.caption_suffix,
            shuffle_tags=config.shuffle_tags and training, keep_tokens=config.keep_tokens,
            caption_dropout=config.caption_dropout if training else 0.0,
            tag_dropout=config.tag_dropout if training else 0.0,
        )
        sides = {} if config.buckets else {"min_side": self.resolution, "max_side": self.resolution}
        return ImageCaptionDataset(scan, self.resolution, allow_upscale=config.allow_upscale,
                                   flip_prob=config.flip if training else 0.0, random_crop=config.random_crop,
                                   caption_options=captions, seed=f"{config.seed}:class" if class_images else
                                   config.seed, **sides)

    def _training_data(self, scan: DatasetScan) -> tuple[ImageCaptionDataset, BucketBatchSampler]:
        """The training images and the order of their batches, with what a user should know about them."""
        config = self.config
        dataset = self._dataset(scan, training=True)
        sampler = BucketBatchSampler(dataset.sample_buckets, config.batch_size, seed=config.seed)
        source = "" if config.resolution else " (the model's own size; set --resolution to change it)"
        self.say(f"resolution {self.resolution}{source}; buckets:\n" + bucket_histogram(dataset.sample_buckets))
        upscaled = dataset.upscaled(2.0)
        if upscaled > len(dataset) / 2:
            self.say(f"{upscaled} of {len(dataset)} images are enlarged more than 2x to fill their buckets at "
                     f"{self.resolution} px: training learns their blur, and each step costs more. Give larger "
                     "images, or a lower --resolution")
        if message := truncated_captions(dataset, self.tokenizers[0], scan.root, windows=self.text_options.chunks):
            self.say(message)
        return dataset, sampler

    def _step_counts(self, sampler: BucketBatchSampler) -> tuple[int, int]:
        """(optimizer steps per epoch, steps of the run)."""
        config = self.config
        processes = self.accelerator.num_processes
        per_epoch = len(epoch_batches(sampler, 0, processes)) // processes // config.gradient_accumulation
        steps_per_epoch = max(1, per_epoch)
        return steps_per_epoch, config.max_steps or config.resolved_epochs() * steps_per_epoch

    def _latent_cache(self, dataset: ImageCaptionDataset) -> LatentCache | None:
        """Every latent of `dataset` encoded once (None without --cache-latents)."""
        config = self.config
        if not config.cache_latents:
            return None
        return LatentCache(self.vae, dataset, flips=config.flip > 0,
                           cache_dir=Path(config.cache_dir) if config.cache_dir else None,
                           progress=not self.quiet and self.accelerator.is_main_process)

    def _class_images(self, scan: DatasetScan) -> ImageSet:
        config = self.config
        dataset = self._dataset(scan, training=True, class_images=True)
        # Batches of batch_size class images, from one bucket each, in an order of their own seed.
        sampler = BucketBatchSampler(dataset.sample_buckets, config.batch_size, seed=f"{config.seed}:class")
        self.say(f"prior preservation: {len(dataset)} class images, up to {config.batch_size} per "
                 f"micro-batch, prior_loss_weight {self.prior_loss_weight:g}; buckets:\n"
                 + bucket_histogram(dataset.sample_buckets))
        return ImageSet(dataset, sampler, self._latent_cache(dataset))

    def _text_cache(self) -> TextCache | None:
        """Every caption encoded once, when nothing changes its encoding: the text encoders frozen and the
        captions the same each epoch (None otherwise, or without --cache-text)."""
        options = self.images.dataset.caption_options
        captions_vary = options.shuffle_tags or options.caption_dropout > 0 or options.tag_dropout > 0
        if not self.config.cache_text or self.trained_encoders or captions_vary:
            return None
        datasets = [images.dataset for images in (self.images, self.validation, self.class_images) if images]
        return TextCache(self._encode_text, [data.caption(i, 0) for data in datasets for i in range(len(data))])

    def _release_idle_models(self) -> None:
        """Models nothing will run again go to the CPU, freeing the accelerator's memory."""
        if self.text_cache is not None and not self.prompts:  # samples would need the text encoders
            for encoder in self.text_encoders:
                encoder.to("cpu")
        if self.images.cache is not None and self.validation is None and not self.prompts:
            self.vae.to("cpu")  # every latent is cached and nothing decodes

    def _build_optimizer(self) -> None:
        config = self.config
        rates = {"unet": config.lr, **{name: config.text_encoder_lr or config.lr for name in self.trained_encoders}}
        groups = []
        for component, lr in rates.items():
            parameters = loader.trainable_parameters(getattr(self.pipe, component), ADAPTER)
            if config.loraplus_ratio is None:
                groups.append({"params": parameters, "lr": lr})
                continue
            # LoRA+ (Hayou et al. 2024): B (up) learns at ratio x the rate of A (down); DoRA's magnitude stays with A
            ups = {id(p) for p in loader.up_parameters(getattr(self.pipe, component), ADAPTER)}
            groups.append({"params": [p for p in parameters if id(p) not in ups], "lr": lr})
            groups.append({"params": [p for p in parameters if id(p) in ups], "lr": lr * config.loraplus_ratio})
        self.parameters = [p for group in groups for p in group["params"]]
        for parameter in self.parameters:
            parameter.requires_grad_(True)
        # The EMA of the adapter weights, fp32 like them; `ema_decay_at` starts it as the weights after step 1.
        self.ema = [p.detach().clone() for p in self.parameters] if config.ema_decay is not None else None
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
        self.wrapped_text_encoders = [self.accelerator.prepare(encoder) if name in self.trained_encoders
                                      else encoder for name, encoder in zip(self.family.text_encoders,
                                                                            self.text_encoders)]

    # -- one step

    def _encode_text(self, captions: list[str], training: bool = False) -> TextConditioning:
        encoders = self.wrapped_text_encoders if training else self.text_encoders
        with nullcontext() if self.trained_encoders else torch.no_grad():
            return self.family.encode_text(encoders, self.tokenizers, captions, self.text_options)

    def _text(self, captions: list[str], training: bool) -> TextConditioning:
        if self.text_cache is not None:
            return self.text_cache.batch(captions).to(self.device)
        return self._encode_text(captions, training)

    def _pixel_batches(self, dataset: ImageCaptionDataset, keys):
        """Images of `dataset` for the (epoch, indices) batches that `keys` yields, loaded ahead by num_workers
        processes (only for runs whose latents are not cached)."""
        batches = ([(epoch, index) for index in indices] for epoch, indices in keys)
        workers = self.config.num_workers
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                                num_workers=workers, prefetch_factor=2 if workers else None))

    def _latents(self, dataset: ImageCaptionDataset, cache: LatentCache | None, epoch: int, indices: list[int],
                 generator: torch.Generator, pixels=None) -> torch.Tensor:
        if cache is not None:
            mean, std = cache.batch(dataset, indices, epoch, self.device)
        else:
            if pixels is None:
                pixels = collate([dataset[(epoch, i)] for i in indices])["pixel_values"]
            mean, std = encode_pixels(self.vae, pixels)
        return sample_latents(self.vae.config, mean, std, generator)

    def micro_batch_loss(self, epoch: int, indices: list[int], generator: torch.Generator,
                         images: ImageSet | None = None, training: bool = True,
                         pixels: torch.Tensor | None = None, prior: ClassBatch | None = None) -> torch.Tensor:
        """The loss of one micro-batch: a training batch (the adapter's wrapped models, cached latents)
        or, with training=False, an evaluation batch of `images` (plain models, images encoded now).

        With `prior` (class images), DreamBooth's prior-preservation loss: the instance loss plus
        prior_loss_weight times the class loss. The class batch draws its randomness after the instance
        batch, from the same generator, so the instance half sees the draws it would see without it.
        """
        loss = self._images_loss(epoch, indices, generator, images or self.images, training, pixels)
        if prior is None:
            return loss
        class_loss = self._images_loss(prior.epoch, prior.indices, generator, self.class_images, training,
                                       prior.pixels)
        return loss + self.prior_loss_weight * class_loss

    def _images_loss(self, epoch: int, indices: list[int], generator: torch.Generator, images: ImageSet,
                     training: bool, pixels: torch.Tensor | None) -> torch.Tensor:
        """The diffusion loss of one batch of `images` (instance or class)."""
        config, dataset = self.config, images.dataset
        # An evaluation batch encodes its images now, whether or not the run caches latents: validation
        # images are few and never cached, and a fixed-noise loss then reads the same with caching or without.
        cache = images.cache if training else None
        latents = self._latents(dataset, cache, epoch, indices, generator, pixels if training else None)
        captions = [dataset.caption(i, epoch) for i in indices]
        text = self._text(captions, training)
        geometry = [ImageGeometry(*dataset.geometry(i, epoch)) for i in indices]
        inputs = self.family.unet_inputs(text, geometry)
        preserve = self._base_prediction(captions, inputs, geometry) if config.preserve_outside_window else None
        weight = self._loss_weight(dataset, epoch, indices, latents, cache)
        with self.accelerator.autocast():
            return diffusion_loss(self.wrapped_unet if training else self.unet, self.scheduler, latents, inputs,
                                  generator,
                                  prediction_type=self.prediction_type, noise_offset=config.noise_offset,
                                  min_snr_gamma=config.min_snr_gamma, debiased_estimation=config.debiased_estimation,
                                  loss_type=config.loss_type, huber_c=config.huber_c,
                                  huber_schedule=config.huber_schedule,
                                  timestep_range=(config.timestep_min, config.timestep_max),
                                  timestep_sampling=TimestepSampling(config.timestep_sampling, config.logit_mean,
                                                                     config.logit_std, config.sigmoid_scale),
                                  base_prediction=preserve, weight=weight)

    def _loss_weight(self, dataset: ImageCaptionDataset, epoch: int, indices: list[int], latents: torch.Tensor,
                     cache: LatentCache | None) -> torch.Tensor | None:
        """The batch's masks at the latents' size, [B, 1, h, w], or None when the images have none (class
        images never have one: they are read without masks)."""
        if not dataset.has_masks:
            return None
        if cache is not None:
            return cache.mask_batch(dataset, indices, epoch, self.device)
        masks = torch.stack([dataset.mask(i, epoch) for i in indices])
        return latent_mask(masks, tuple(latents.shape[-2:])).to(self.device)

    def _base_prediction(self, captions: list[str], inputs: dict, geometry: list[ImageGeometry]):
        """The target outside the timestep window: the frozen model's output, adapter off (text included)."""

        @torch.no_grad()
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            with loader.disabled(self.pipe, ADAPTER):
                if self.trained_encoders:
                    chosen = rows.tolist()
                    text = self._encode_text([captions[i] for i in chosen])
                    base_inputs = self.family.unet_inputs(text, [geometry[i] for i in chosen])
                else:
                    base_inputs = rows_of(inputs, rows)
                return self.unet(noisy, timesteps, **base_inputs).sample

        return predict

    @torch.no_grad()
    def fixed_noise_loss(self, images: ImageSet | None = None, seed: int = 1234) -> float:
        """Mean loss over a set of images (the training images by default) at fixed noise and timesteps:
        comparable across steps and runs."""
        images = images or self.images
        sampler = BucketBatchSampler(images.dataset.sample_buckets, self.config.batch_size, seed=0, shuffle=False)
        losses = [self.micro_batch_loss(0, batch, step_generator(seed, i), images, training=False).item()
                  for i, batch in enumerate(sampler.batches(0))]
        return sum(losses) / len(losses)

    # -- state

    def state(self, step: int, epoch: int, position: int) -> dict:
        state = {"step": step, "epoch": epoch, "position": position, "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "rng": rng_states(),
                 "config": json.dumps(asdict(self.config))}
        if self.ema is not None:
            state["ema"] = [average.detach().cpu().clone() for average in self.ema]
        return state

    def restore(self, folder: Path) -> tuple[int, int, int]:
        state = load_state(folder)
        saved = json.loads(state["config"])
        if saved.get("class_prompts"):  # from before class images had options of their own
            saved.update({new: saved[old] for old, new in RENAMED_OPTIONS.items() if new not in saved})
        was = trained_text_encoders(saved.get("train_text_encoder", False), saved.get("train_text_encoder_2"),
                                    self.family.text_encoders)
        if was != self.trained_encoders:
            raise ConfigError(f"cannot resume from {folder}: it trained the text encoders {', '.join(was) or 'none'}, "
                              f"this run trains {', '.join(self.trained_encoders) or 'none'}: set "
                              "--train-text-encoder and --train-text-encoder-2 / --no-train-text-encoder-2 as it did")
        for key in RESUME_KEYS:
            # a checkpoint from before an option existed was trained with its default
            was = saved.get(key, TrainConfig.__dataclass_fields__[key].default)
            if was != getattr(self.config, key):
                raise ConfigError(f"cannot resume from {folder}: it was trained with {key}={was!r}, this run has "
                                  f"{key}={getattr(self.config, key)!r}")
        loader.copy_weights_from(self.pipe, ADAPTER, folder / ADAPTER_FILE)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            with torch.no_grad():
                for average, saved_average in zip(self.ema, state["ema"], strict=True):
                    average.copy_(saved_average)
        set_rng_states(state["rng"])
        return state["step"], state["epoch"], state["position"]

    def save_adapter(self, path: Path, dtype: str, step: int, ema: bool = False) -> Path:
        """The adapter file; with ema=True, the same file of the EMA weights (`ema_weights` swaps them in)."""
        config = self.config
        header = kohya_training_header(
            asdict(config), steps=step, epoch=step // self.steps_per_epoch, resolution=self.resolution,
            images=len(self.images.dataset), class_images=len(self.class_images.dataset) if self.class_images else 0,
            clip_skip=config.clip_skip or self.family.default_clip_skip,
            trains_text_encoder=bool(self.trained_encoders), ema_decay=config.ema_decay if ema else None)
        record = {"training": asdict(config), "steps": step, "resolution": self.resolution,
                  "prediction_type": self.prediction_type, **({"ema": True} if ema else {})}
        return loader.save(self.pipe, path, ADAPTER, dtype=dtype, title=config.name, record=record, header=header,
                           prediction_type=self.prediction_type, resolution=self.resolution)

    @contextmanager
    def ema_weights(self):
        """The adapter holds the EMA weights inside the block, its own again after it."""
        trained = [parameter.detach().clone() for parameter in self.parameters]
        try:
            with torch.no_grad():
                for parameter, average in zip(self.parameters, self.ema):
                    parameter.copy_(average)
            yield
        finally:
            with torch.no_grad():
                for parameter, weights in zip(self.parameters, trained):
                    parameter.copy_(weights)

    # -- watching

    def sample(self, step: int) -> Path | None:
        if not self.prompts or not self.accelerator.is_main_process:
            return None
        size = self.resolution
        images = []
        with torch.no_grad(), self.accelerator.autocast():
            for i, prompt in enumerate(self.prompts):
                generator = torch.Generator().manual_seed(self.config.seed + i)
                images += self.pipe(prompt, num_inference_steps=self.config.sample_steps, height=size, width=size,
                                    guidance_scale=self.config.sample_guidance, generator=generator).images
        self.unet.train()
        path = self.paths.samples / f"step-{step:06d}.png"
        sheet = grid(images, columns=min(4, len(images)))
        write_file(path, png_bytes(sheet))
        self.log.image("samples", sheet, step)
        return path

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
            if self.log:
                self.log.close()
                self.log = None

    def _prepare_output(self, resumed_step: int | None) -> None:
        left = self.paths.remove_temporaries()
        if left:
            self.say(f"removed {len(left)} half-written file(s) an interrupted run left: "
                     + ", ".join(str(path.relative_to(self.paths.root)) for path in left))
        write_text(self.paths.root / "config.toml", to_toml(self.config))
        self.log = RunLog(self.paths.logs, resumed_step)

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
        self.say(f"training {trainable / 1e6:.2f} M parameters ({config.targets}, rank {config.rank}) of a "
                 f"{self.family.title} model ({self.prediction_type}) on {self.device}, weights {self.weight_dtype}; "
                 f"{self.total_steps} steps, {self.steps_per_epoch} per epoch"
                 + (f"; resuming at step {step}" if step else ""))
        processes, process = accelerator.num_processes, accelerator.process_index
        images, classes = self.images, self.class_images
        keys = batch_keys(images.sampler, epoch, position, processes, process)
        pixels = None
        if images.cache is None:
            pixels = self._pixel_batches(images.dataset, ((e, batch) for e, _, batch in batch_keys(
                images.sampler, epoch, position, processes, process)))
        prior_keys = prior_pixels = None
        if classes:  # micro-batch number n of the whole run takes class batch n (see class_batch_keys)
            first = step * config.gradient_accumulation * processes + process
            prior_keys = class_batch_keys(classes.sampler, first, processes)
            if classes.cache is None:
                prior_pixels = self._pixel_batches(classes.dataset, class_batch_keys(classes.sampler, first, processes))
        bar = tqdm(total=self.total_steps, initial=step, desc="training", unit="step",
                   disable=self.quiet or not accelerator.is_main_process)
        started, smoothed = time.time(), None
        while step < self.total_steps:
            total = 0.0
            for micro in range(config.gradient_accumulation):
                epoch, position, indices = next(keys)
                images = next(pixels)["pixel_values"] if pixels is not None else None
                prior = None
                if prior_keys is not None:
                    prior = ClassBatch(*next(prior_keys), next(prior_pixels)["pixel_values"]
                                       if prior_pixels is not None else None)
                generator = step_generator(config.seed, step, micro, accelerator.process_index)
                syncing = micro == config.gradient_accumulation - 1
                with nullcontext() if syncing else accelerator.no_sync(self.wrapped_unet):
                    loss = self.micro_batch_loss(epoch, indices, generator, pixels=images, prior=prior)
                    loss = loss / config.gradient_accumulation
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
            if self.ema is not None:
                update_ema(self.ema, self.parameters, ema_decay_at(step, config.ema_decay))
            faults.kill_point("step")

            smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            if accelerator.is_main_process:
                if step % config.log_every == 0 or step == self.total_steps:
                    self.log.write({"step": step, "loss": total, "loss_smoothed": smoothed, "lr": lr, "epoch": epoch,
                                    "time": round(time.time() - started, 3)})
                if config.validation_every and (step % config.validation_every == 0 or step == self.total_steps):
                    self.log.write({"step": step, "val_loss": self.fixed_noise_loss(self.validation),
                                    "time": round(time.time() - started, 3)})
                if config.sample_every and step % config.sample_every == 0:
                    self.sample(step)
                if config.save_every and step % config.save_every == 0:
                    self.check_finite(step)
                    self.log.sync()  # the log on disk reaches at least as far as the checkpoint
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
        if self.ema is not None:
            with self.ema_weights():
                ema = self.save_adapter(self.paths.ema_adapter, config.save_dtype, step, ema=True)
            self.say(f"EMA adapter: {ema}")
        elapsed = time.time() - started
        self.say(f"done: {step} steps in {elapsed:.1f} s ({elapsed / max(1, step):.3f} s/step), peak memory "
                 f"{peak_memory_mb(self.device):.0f} MB\nadapter: {output} ({output.stat().st_size / 1024:.1f} KiB)")
        return output


def train(config: TrainConfig, quiet: bool = False) -> Path:
    """Run a training and return the adapter file's path. The output folder is locked meanwhile."""
    validate(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun, the main process alone writes
        return Trainer(config, quiet=quiet).run()
    with RunLock(config.output_dir, say=lambda message: print(f"sdlora: {message}", file=sys.stderr)):
        return Trainer(config, quiet=quiet).run()
