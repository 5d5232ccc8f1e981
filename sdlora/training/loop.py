"""The training loop: a LoRA on a folder of captioned images, with the noise-prediction loss.

`setup_run` builds a `Run` (config -> data -> model -> adapter -> caches -> optimizer, see setup.py);
`run_training` is the loop: for each step: micro-batches -> loss -> backward -> clip -> optimizer step
-> EMA -> log / validate / sample / checkpoint -> the requests of control.py, then the adapter file;
the run's events (started, checkpoint, stopped, failed, finished) go to logs/events.jsonl. Every random
draw of a step comes from a generator seeded by (seed, step), so a resumed run repeats exactly what an
uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from tqdm.auto import tqdm

from .. import loader
from ..base_models.families import ImageGeometry, TextConditioning
from ..errors import ConfigError, TrainingDiverged, TrainingStopped, WriteFailed
from ..files.safetensors import kohya_training_header
from ..images import grid, png_bytes
from ..reliability import faults
from ..reliability.durable import write_file, write_text
from ..reliability.runlock import RunLock
from . import control, setup
from .caching import LatentCache, TextCache, encode_pixels, latent_mask, sample_latents, to_device
from .checkpoint import (ADAPTER_FILE, checkpoint_folder, checkpoint_folders, load_state, rng_states, save_checkpoint,
                         set_rng_states)
from .config import RESUME_KEYS, TrainConfig, to_toml, trained_text_encoders, validate
from .data import BucketBatchSampler, ImageCaptionDataset, collate
from .loss import Draws, TimestepSampling, diffusion_loss, rows_of
from .prior import RENAMED_OPTIONS, ClassBatch, class_batch_keys
from .runlog import RunLog
from .setup import ADAPTER, BaseModel, ImageSet, Optimization, RunPaths
from .steps import Share, batch_keys, ema_decay_at, global_batch_size, shares, step_generator, update_ema


def diverged_message(what: str, step: int, mixed_precision: str) -> str:
    fixes = ["a lower --lr", "--max-grad-norm 1", "check the images and captions"]
    if mixed_precision == "fp16":  # fp16 overflows at 65504; bf16 has fp32's range
        fixes.insert(0, "--mixed-precision bf16 (fp16 overflows easily; bf16 has fp32's range)")
    return (f"{what} at step {step}; nothing after the last checkpoint was saved. Usual fixes: "
            + ", ".join(fixes))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tell(message: str, quiet: bool, accelerator=None) -> None:
    """A line for the user: on the main process alone, once an accelerator says which that is."""
    if not quiet and (accelerator is None or accelerator.is_main_process):
        tqdm.write(message)


# ---------------------------------------------------------------- the run and its loss


@dataclass
class Run:
    """What setup built for one run (see `setup_run`), and the loss of a micro-batch under it."""

    config: TrainConfig
    quiet: bool
    paths: RunPaths
    resume_folder: Path | None
    prompts: list[str]  # for the sample sheets
    accelerator: object  # accelerate.Accelerator
    weight_dtype: torch.dtype
    model: BaseModel
    scheduler: object  # the training noise schedule, a diffusers DDPMScheduler
    images: ImageSet
    validation: ImageSet | None
    class_images: ImageSet | None
    prior_loss_weight: float
    text_cache: TextCache | None
    optim: Optimization
    steps_per_epoch: int
    total_steps: int
    frozen_digests: dict[str, str] = field(default_factory=dict)  # with_adapters entry -> sha256, as loaded

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def global_batch(self) -> int:
        """Images per optimizer step, over every process and micro-batch."""
        return global_batch_size(self.config.batch_size, self.accelerator.num_processes,
                                 self.config.gradient_accumulation)

    def say(self, message: str) -> None:
        tell(message, self.quiet, self.accelerator)

    def micro_batch_loss(self, epoch: int, indices: list[int], generator: torch.Generator,
                         images: ImageSet | None = None, training: bool = True,
                         pixels: torch.Tensor | None = None, prior: ClassBatch | None = None,
                         share: Share | None = None) -> torch.Tensor:
        """The loss of one micro-batch: a training batch (the adapter's wrapped models, cached latents)
        or, with training=False, an evaluation batch of `images` (plain models, images encoded now).

        With `share`, the micro-batch is those rows of its step's global batch: it takes their draws
        from `generator` and its mean loss is weighted as `steps.Share` says (without, it is the whole
        batch, weight 1). With `prior` (class images), DreamBooth's prior-preservation loss: the
        instance loss plus prior_loss_weight times the class loss. The class batch draws its
        randomness after the instance batch, from the same generator, so the instance half sees the
        draws it would see without it.
        """
        share = share or Share.whole(len(indices))
        draws = Draws(generator, share.rows, share.size)
        loss = self._images_loss(epoch, indices, draws, images or self.images, training, pixels) * share.weight
        if prior is None:
            return loss
        class_share = prior.share or Share.whole(len(prior.indices))
        class_draws = Draws(generator, class_share.rows, class_share.size)
        class_loss = self._images_loss(prior.epoch, prior.indices, class_draws, self.class_images, training,
                                       prior.pixels)
        return loss + self.prior_loss_weight * class_share.weight * class_loss

    @torch.no_grad()
    def fixed_noise_loss(self, images: ImageSet | None = None, seed: int = 1234) -> float:
        """Mean loss over a set of images (the training images by default) at fixed noise and timesteps:
        comparable across steps and runs, and the same however many processes train: the images go in
        batches of the run's global batch size, each evaluated --batch-size images at a time."""
        config, images = self.config, images or self.images
        sampler = BucketBatchSampler(images.dataset.sample_buckets, self.global_batch, seed=0, shuffle=False)
        losses = []
        for i, batch in enumerate(sampler.batches(0)):
            parts = shares(len(batch), config.batch_size, 1, len(batch), 0)  # one process, micro-batches
            losses.append(sum(self.micro_batch_loss(0, [batch[row] for row in part.rows], step_generator(seed, i),
                                                    images, training=False, share=part)
                              for part in parts if part.weight).item())
        return sum(losses) / len(losses)

    def _images_loss(self, epoch: int, indices: list[int], draws: Draws, images: ImageSet,
                     training: bool, pixels: torch.Tensor | None) -> torch.Tensor:
        """The diffusion loss of one batch of `images` (instance or class)."""
        config, model, dataset = self.config, self.model, images.dataset
        # An evaluation batch encodes its images now, whether or not the run caches latents: validation
        # images are few and never cached, and a fixed-noise loss then reads the same with caching or without.
        cache = images.cache if training else None
        latents = self._latents(dataset, cache, epoch, indices, draws, pixels if training else None)
        captions = [dataset.caption(i, epoch) for i in indices]
        text = self._text(captions, training)
        geometry = [ImageGeometry(*dataset.geometry(i, epoch)) for i in indices]
        inputs = model.family.unet_inputs(text, geometry)
        preserve = self._base_prediction(captions, inputs, geometry) if config.preserve_outside_window else None
        weight = self._loss_weight(dataset, epoch, indices, latents, cache)
        with self.accelerator.autocast():
            return diffusion_loss(self.optim.wrapped_unet if training else model.unet, self.scheduler, latents,
                                  inputs, draws,
                                  prediction_type=model.prediction_type, noise_offset=config.noise_offset,
                                  min_snr_gamma=config.min_snr_gamma, debiased_estimation=config.debiased_estimation,
                                  loss_type=config.loss_type, huber_c=config.huber_c,
                                  huber_schedule=config.huber_schedule,
                                  timestep_range=(config.timestep_min, config.timestep_max),
                                  timestep_sampling=TimestepSampling(config.timestep_sampling, config.logit_mean,
                                                                     config.logit_std, config.sigmoid_scale),
                                  base_prediction=preserve, weight=weight)

    def _latents(self, dataset: ImageCaptionDataset, cache: LatentCache | None, epoch: int, indices: list[int],
                 draws: Draws, pixels=None) -> torch.Tensor:
        vae = self.model.vae
        if cache is not None:
            mean, std = cache.batch(dataset, indices, epoch, self.device)
        else:
            if pixels is None:
                pixels = collate([dataset[(epoch, i)] for i in indices])["pixel_values"]
            mean, std = encode_pixels(vae, pixels)
        return sample_latents(vae.config, mean, std, draws)

    def _text(self, captions: list[str], training: bool) -> TextConditioning:
        if self.text_cache is not None:
            return self.text_cache.batch(captions).to(self.device)  # non-blocking: no sync per step
        return self.model.encode_text(captions, self.optim.wrapped_text_encoders if training else None)

    def _loss_weight(self, dataset: ImageCaptionDataset, epoch: int, indices: list[int], latents: torch.Tensor,
                     cache: LatentCache | None) -> torch.Tensor | None:
        """The batch's masks at the latents' size, [B, 1, h, w], or None when the images have none (class
        images never have one: they are read without masks)."""
        if not dataset.has_masks:
            return None
        if cache is not None:
            return cache.mask_batch(dataset, indices, epoch, self.device)
        masks = torch.stack([dataset.mask(i, epoch) for i in indices])
        return to_device(latent_mask(masks, tuple(latents.shape[-2:])), self.device)

    def _base_prediction(self, captions: list[str], inputs: dict, geometry: list[ImageGeometry]):
        """The target outside the timestep window: the frozen model's output, adapter off (text included)."""
        model = self.model

        @torch.no_grad()
        def predict(noisy: torch.Tensor, timesteps: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            with loader.disabled(model.pipe, ADAPTER):
                if model.trained_encoders:
                    chosen = rows.tolist()
                    text = model.encode_text([captions[i] for i in chosen])
                    base_inputs = model.family.unet_inputs(text, [geometry[i] for i in chosen])
                else:
                    base_inputs = rows_of(inputs, rows)
                return model.unet(noisy, timesteps, **base_inputs).sample

        return predict


def setup_run(config: TrainConfig, quiet: bool = False) -> Run:
    """Everything a run needs, in the order it is built; errors in the config or the folders come before
    any model loads."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    validate(config)
    say = partial(tell, quiet=quiet)
    paths = RunPaths(Path(config.output_dir), config.name)
    scans = setup.image_scans(config)
    resume_folder = setup.resume_folder(config, paths)
    prompts = setup.sample_prompts(config)
    say(scans.found.summary())
    class_scan = scans.classes
    if class_scan:
        say("class images (prior preservation): " + class_scan.summary())

    # accelerate keeps its settings process-wide; a second run in one process (a notebook) may
    # ask for another precision. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state()
    # cpu=True without CUDA: only then does accelerate see several CPU processes (torchrun) as one run.
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[setup.collective_timeout(config)])
    processes = accelerator.num_processes
    global_batch = global_batch_size(config.batch_size, processes, config.gradient_accumulation)
    say = partial(tell, quiet=quiet, accelerator=accelerator)
    progress = not quiet and accelerator.is_main_process
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    torch.manual_seed(config.seed)
    model = setup.load_base_model(config, weight_dtype)
    if config.class_prompts:
        folder = Path(config.class_data_dir or paths.root / "class-images")
        class_scan = setup.generate_class_images(config, model, folder, accelerator, progress, say)
    frozen_digests = setup.frozen_adapter_digests(config)  # once: the files as attach_adapter reads them
    scheduler = setup.attach_adapter(config, model, accelerator.device)

    dataset, sampler = setup.training_data(config, scans.training, model, global_batch, say)
    say(setup.batch_summary(config, processes, sampler))
    steps_per_epoch, total_steps = setup.step_counts(config, sampler)
    images = ImageSet(dataset, sampler, setup.latent_cache(config, model.vae, dataset, progress, accelerator))
    if images.cache is not None and config.cache_dir:
        say(f"latent cache: {images.cache.reused} of {len(images.cache.entries)} reused from {config.cache_dir}")
    validation = (ImageSet(setup.image_dataset(config, scans.validation, model.resolution, training=False))
                  if scans.validation else None)
    prior_loss_weight = 1.0 if config.prior_loss_weight is None else config.prior_loss_weight
    class_images = (setup.class_image_set(config, class_scan, model, prior_loss_weight, global_batch, progress,
                                          accelerator, say) if class_scan else None)
    text_cache = setup.text_cache(config, model, [s for s in (images, validation, class_images) if s], accelerator)
    setup.release_idle_models(model, text_cache, images, validation, prompts)
    optim = setup.build_optimizer(config, model, accelerator, total_steps)
    return Run(config=config, quiet=quiet, paths=paths, resume_folder=resume_folder, prompts=prompts,
               accelerator=accelerator, weight_dtype=weight_dtype, model=model, scheduler=scheduler, images=images,
               validation=validation, class_images=class_images, prior_loss_weight=prior_loss_weight,
               text_cache=text_cache, optim=optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               frozen_digests=frozen_digests)


# ---------------------------------------------------------------- the micro-batches


class MicroBatch(NamedTuple):
    """One micro-batch of this process: its epoch, the position in the epoch after its step (where a
    resume continues), its images' indices and their share of the step's global batch, their pixels
    when latents are not cached, and the class images that join it."""

    epoch: int
    position: int
    indices: list[int]
    share: Share
    pixels: torch.Tensor | None
    prior: ClassBatch | None


def pixel_batches(dataset: ImageCaptionDataset, keys: Iterator[tuple[int, list[int]]], workers: int):
    """Images of `dataset` for the (epoch, indices) batches that `keys` yields, loaded ahead by `workers`
    processes (in pinned memory when a GPU will read them)."""
    batches = ([(epoch, index) for index in indices] for epoch, indices in keys)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                            num_workers=workers, prefetch_factor=2 if workers else None,
                                            pin_memory=torch.cuda.is_available()))


def own_parts(run: Run, keys: Iterator[tuple[int, int, list[int]]]):
    """(epoch, position, indices, share) of this process's micro-batches of each global batch `keys` yields."""
    config, accelerator = run.config, run.accelerator
    for epoch, position, batch in keys:
        for share in shares(len(batch), config.batch_size, accelerator.num_processes,
                            config.gradient_accumulation, accelerator.process_index):
            yield epoch, position, [batch[row] for row in share.rows], share


def micro_batches(run: Run, step: int, epoch: int, position: int) -> Iterator[MicroBatch]:
    """This process's micro-batches from a resume point (`step`, and the `epoch` and `position` it
    reached) onwards, forever.

    Every process reads the same sequence of global batches and takes its own rows of each
    (`steps.shares`). Without cached latents, pixels come from a DataLoader that runs ahead of the
    loop: it reads its own copy of the batch order, while the indices yielded here come from another,
    in step with the loop. Step n takes global class batch n, see `class_batch_keys`.
    """
    config, images, classes = run.config, run.images, run.class_images

    def instance_parts():
        return own_parts(run, batch_keys(images.sampler, epoch, position))

    def class_parts():
        return own_parts(run, ((e, 0, batch) for e, batch in class_batch_keys(classes.sampler, step, 1)))

    pixels = None
    if images.cache is None:
        pixels = pixel_batches(images.dataset, ((e, indices) for e, _, indices, _ in instance_parts()),
                               config.num_workers)
    class_keys = class_pixels = None
    if classes:
        class_keys = class_parts()
        if classes.cache is None:
            class_pixels = pixel_batches(classes.dataset, ((e, indices) for e, _, indices, _ in class_parts()),
                                         config.num_workers)
    for epoch_now, position_now, indices, share in instance_parts():
        batch = next(pixels)["pixel_values"] if pixels is not None else None
        prior = None
        if class_keys is not None:
            class_epoch, _, class_indices, class_share = next(class_keys)
            class_batch = next(class_pixels)["pixel_values"] if class_pixels is not None else None
            prior = ClassBatch(class_epoch, class_indices, class_batch, class_share)
        yield MicroBatch(epoch_now, position_now, indices, share, batch, prior)


# ---------------------------------------------------------------- checkpoints, files, samples


def checkpoint_state(run: Run, step: int, epoch: int, position: int) -> dict:
    optim = run.optim
    state = {"step": step, "epoch": epoch, "position": position, "global_batch": run.global_batch,
             "optimizer": optim.optimizer.state_dict(),
             "lr_scheduler": optim.lr_scheduler.state_dict(), "rng": rng_states(),
             "config": json.dumps(asdict(run.config)), "with_adapters": run.frozen_digests}
    if optim.ema is not None:
        state["ema"] = [average.detach().cpu().clone() for average in optim.ema]
    return state


def restore(run: Run, folder: Path) -> tuple[int, int, int]:
    """The adapter, optimizer, schedule, EMA and generators of the checkpoint in `folder`; returns where
    it stopped: (step, epoch, position)."""
    config, model, optim = run.config, run.model, run.optim
    state = load_state(folder)
    saved = json.loads(state["config"])
    if saved.get("class_prompts"):  # from before class images had options of their own
        saved.update({new: saved[old] for old, new in RENAMED_OPTIONS.items() if new not in saved})
    was = trained_text_encoders(saved.get("train_text_encoder", False), saved.get("train_text_encoder_2"),
                                model.family.text_encoders)
    if was != model.trained_encoders:
        raise ConfigError(f"cannot resume from {folder}: it trained the text encoders {', '.join(was) or 'none'}, "
                          f"this run trains {', '.join(model.trained_encoders) or 'none'}: set "
                          "--train-text-encoder and --train-text-encoder-2 / --no-train-text-encoder-2 as it did")
    # The order of images and every draw depend on the global batch alone: how it is split over
    # processes and micro-batches is free to change. Before global batches, a checkpoint's batches
    # were per process and per micro-batch: only its single-process, one-micro-batch runs read the same.
    was = state.get("global_batch") or (saved["batch_size"] if saved.get("gradient_accumulation", 1) == 1
                                        and run.accelerator.num_processes == 1 else None)
    if was != run.global_batch:
        split = (f"{config.batch_size} x {run.accelerator.num_processes} processes x "
                 f"{config.gradient_accumulation} accumulation")
        raise ConfigError(f"cannot resume from {folder}: " + (
            f"it trained {was} images per step, this run {run.global_batch} ({split}): keep batch_size x "
            "processes x gradient_accumulation the same" if was else
            "it was written by an older sdlora that batched several processes or micro-batches otherwise: "
            "start a new run"))
    for key in RESUME_KEYS:
        # a checkpoint from before an option existed was trained with its default
        was = saved.get(key, TrainConfig.__dataclass_fields__[key].default)
        if was != getattr(config, key):
            raise ConfigError(f"cannot resume from {folder}: it was trained with {key}={was!r}, this run has "
                              f"{key}={getattr(config, key)!r}")
    changed = [entry for entry, digest in run.frozen_digests.items()
               if state.get("with_adapters", {}).get(entry) != digest]
    if changed:
        raise ConfigError(f"cannot resume from {folder}: with_adapters {', '.join(changed)} is not the file this run "
                          "was trained with (it changed since): restore that file, or start a new run")
    loader.copy_weights_from(model.pipe, ADAPTER, folder / ADAPTER_FILE)
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if optim.ema is not None:
        with torch.no_grad():
            for average, saved_average in zip(optim.ema, state["ema"], strict=True):
                average.copy_(saved_average)
    set_rng_states(state["rng"])
    return state["step"], state["epoch"], state["position"]


def save_adapter(run: Run, path: Path, dtype: str, step: int, ema: bool = False, scale: float = 1.0) -> Path:
    """The adapter file; with ema=True, the same file of the EMA weights (`ema_weights` swaps them in);
    `scale` multiplies the update written (save_scale: the final files, not the checkpoints)."""
    config, model = run.config, run.model
    header = kohya_training_header(
        asdict(config), steps=step, epoch=step // run.steps_per_epoch, resolution=model.resolution,
        images=len(run.images.dataset), class_images=len(run.class_images.dataset) if run.class_images else 0,
        clip_skip=config.clip_skip or model.family.default_clip_skip,
        trains_text_encoder=bool(model.trained_encoders), ema_decay=config.ema_decay if ema else None)
    record = {"training": asdict(config), "steps": step, "resolution": model.resolution,
              "prediction_type": model.prediction_type, **({"ema": True} if ema else {})}
    return loader.save(model.pipe, path, ADAPTER, dtype=dtype, title=config.name, record=record, header=header,
                       prediction_type=model.prediction_type, resolution=model.resolution, scale=scale)


@contextmanager
def ema_weights(optim: Optimization):
    """The adapter holds the EMA weights inside the block, its own again after it."""
    trained = [parameter.detach().clone() for parameter in optim.parameters]
    try:
        with torch.no_grad():
            for parameter, average in zip(optim.parameters, optim.ema):
                parameter.copy_(average)
        yield
    finally:
        with torch.no_grad():
            for parameter, weights in zip(optim.parameters, trained):
                parameter.copy_(weights)


def sample(run: Run, step: int, log: RunLog) -> Path | None:
    """The sheet of one image per sample prompt, on the main process."""
    if not run.prompts or not run.accelerator.is_main_process:
        return None
    config, size = run.config, run.model.resolution
    images = []
    with torch.no_grad(), run.accelerator.autocast():
        for i, prompt in enumerate(run.prompts):
            generator = torch.Generator().manual_seed(config.seed + i)
            images += run.model.pipe(prompt, num_inference_steps=config.sample_steps, height=size, width=size,
                                     guidance_scale=config.sample_guidance, generator=generator).images
    run.model.unet.train()
    path = run.paths.samples / f"step-{step:06d}.png"
    sheet = grid(images, columns=min(4, len(images)))
    write_file(path, png_bytes(sheet))
    log.image("samples", sheet, step)
    return path


def check_finite(parameters: list[torch.nn.Parameter], step: int, mixed_precision: str) -> None:
    """Before a save: a NaN in the weights (an fp16 overflow in the update, say) is never written."""
    if not all(torch.isfinite(parameter).all() for parameter in parameters):
        raise TrainingDiverged(diverged_message("the adapter's weights became NaN or infinite", step,
                                                mixed_precision))


def prepare_output(run: Run, resumed_step: int | None) -> RunLog:
    """The output folder cleared of what a killed run left half-written, its config, and the run's log."""
    paths = run.paths
    left = paths.remove_temporaries()
    if left:
        run.say(f"removed {len(left)} half-written file(s) an interrupted run left: "
                + ", ".join(str(path.relative_to(paths.root)) for path in left))
    write_text(paths.root / "config.toml", to_toml(run.config))
    return RunLog(paths.logs, resumed_step)


def saves_at(config: TrainConfig, step: int) -> bool:
    """Whether `step` writes a periodic (--save-every) checkpoint."""
    return bool(config.save_every) and step % config.save_every == 0


def samples_at(config: TrainConfig, step: int) -> bool:
    """Whether `step` writes a periodic (--sample-every) sample sheet."""
    return bool(config.sample_every) and step % config.sample_every == 0


def write_checkpoint(run: Run, step: int, epoch: int, position: int, log: RunLog) -> Path:
    """The checkpoint of `step`, on the main process (its only writer), and its event."""
    config, optim = run.config, run.optim
    check_finite(optim.parameters, step, config.mixed_precision)
    log.sync()  # the log on disk reaches at least as far as the checkpoint
    folder = save_checkpoint(run.paths.checkpoints, step, partial(save_adapter, run, dtype="fp32", step=step),
                             checkpoint_state(run, step, epoch, position), config.keep_checkpoints)
    event(run, "checkpoint", step)
    return folder


# ---------------------------------------------------------------- requests and events (see control.py)


def event(run: Run, name: str, step: int, **fields) -> None:
    """An event in the run's logs/events.jsonl, written by the main process alone."""
    if run.accelerator.is_main_process:
        control.record_event(run.paths.logs, {"event": name, "step": step, **fields})


def record_failure(run: Run, step: int, error: BaseException) -> None:
    """The `failed` event, best effort: not being able to write it (on the disk that is full, say)
    must never hide the error that ended the run."""
    step = getattr(error, "last_good_step", None) or step  # a NaN found some steps after it happened
    with suppress(Exception):
        event(run, "failed", step, message=str(error) or type(error).__name__)  # Ctrl-C has no message


def requested_actions(run: Run, step: int) -> list[str]:
    """What was asked of the run (control.py) by the end of this step.

    Processes of a multi-process run act together, on the same step, or the next collective call
    would hang: the main process takes the requests and broadcasts them, on logged steps only (each
    broadcast is a round trip between the processes). A single process looks after every step: a
    look at a folder.
    """
    config, accelerator = run.config, run.accelerator
    several = accelerator.num_processes > 1
    if several and step % config.log_every:
        return []
    actions = control.take_requests(run.paths.root) if accelerator.is_main_process else []
    if several:
        from accelerate.utils import broadcast_object_list

        actions = broadcast_object_list([actions], from_process=0)[0]
    return actions


def act_on(run: Run, actions: list[str], step: int, epoch: int, position: int, log: RunLog | None) -> None:
    """Do what was asked, after this step's own log, samples and checkpoint. `stop` ends every process
    with TrainingStopped."""
    config, accelerator = run.config, run.accelerator
    saved, sampled = saves_at(config, step), samples_at(config, step)  # this step's own, written already
    for action in actions:
        if action == "sample":
            if not run.prompts:
                event(run, "refused", step, action="sample", message="no sample prompts configured")
            elif not sampled:
                sample(run, step, log)
                sampled = True
            continue
        if not saved and accelerator.is_main_process:  # save, and stop
            write_checkpoint(run, step, epoch, position, log)
        saved = True
        if action == "stop":
            event(run, "stopped", step, reason="requested")
            # torchrun ends every process once one exits with an error status: not before the
            # checkpoint is whole
            accelerator.wait_for_everyone()
            raise TrainingStopped(f"stopped at step {step} on request; the checkpoint is "
                                  f"{checkpoint_folder(run.paths.checkpoints, step)}: continue with --resume latest")


# ---------------------------------------------------------------- what every process must agree on


def checks_at(config: TrainConfig, step: int, total_steps: int) -> bool:
    """Whether `step` is a check step: the loss is read (one host sync) and every process agrees on it.
    Every step that logs, validates, samples or saves is one, so nothing is written before the check."""
    return (step % config.log_every == 0 or step == total_steps or validates_at(config, step, total_steps)
            or samples_at(config, step) or saves_at(config, step))


def validates_at(config: TrainConfig, step: int, total_steps: int) -> bool:
    return bool(config.validation_every) and (step % config.validation_every == 0 or step == total_steps)


def agreed_losses(run: Run, step: int, total: torch.Tensor, smoothed: torch.Tensor,
                  first_bad: torch.Tensor) -> tuple[float, float]:
    """This step's loss and smoothed loss over the global batch (each process holds its share's), after
    stopping every process together, on this same step, if any of them had a NaN or infinite loss
    since the last check. One gather, the step's one host sync."""
    values = torch.stack([total.float(), smoothed.float(), first_bad.float()])[None]
    rows = run.accelerator.gather(values).cpu().tolist()  # a row per process
    bad = sorted((int(at), loss) for loss, _, at in rows if at)
    if bad:
        at, _ = bad[0]
        value = next((loss for loss, _, _ in rows if not math.isfinite(loss)), float("nan"))
        raise TrainingDiverged(diverged_message(f"the loss became {value}", at, run.config.mixed_precision),
                               last_good_step=at - 1)
    return (sum(loss for loss, _, _ in rows) / len(rows), sum(average for _, average, _ in rows) / len(rows))


def check_ranks_agree(run: Run, step: int) -> None:
    """--check-ranks: every process holds bit-identical adapter weights, or the run stops as a bug."""
    sums = weights_checksum(run.optim.parameters)[None]
    rows = run.accelerator.gather(sums.to(run.device)).cpu()
    for rank in range(1, len(rows)):
        if not torch.equal(rows[rank], rows[0]):
            tensors = (rows[rank] != rows[0]).nonzero().flatten().tolist()
            raise RuntimeError(f"bug: at step {step} the adapter weights of process {rank} differ from process "
                               f"0's in {len(tensors)} of {len(rows[0])} tensors (first: #{tensors[0]}); "
                               "the processes no longer train one adapter")


def weights_checksum(parameters: list[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor: the sum of its elements' bit patterns, so any changed bit shows."""
    def bits(parameter: torch.Tensor) -> torch.Tensor:
        flat = parameter.detach().contiguous().view(-1)
        integers = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[flat.element_size()])
        return integers.long().sum()

    return torch.stack([bits(parameter) for parameter in parameters])


def no_sync(accelerator, optim: Optimization):
    """No gradient exchange in this micro-batch's backward pass, for every model the processes train."""
    stack = ExitStack()
    for model in optim.synced:
        stack.enter_context(accelerator.no_sync(model))
    return stack


def resume_hint(paths: RunPaths) -> str:
    folders = checkpoint_folders(paths.checkpoints)
    if not folders:
        return "Files written before are intact; no checkpoint was written yet"
    return (f"Files written before are intact, and the last checkpoint is {folders[-1]}: fix the cause, then "
            "run again with --resume latest")


# ---------------------------------------------------------------- the loop


def run_training(run: Run) -> Path:
    """Train the adapter `run` set up, from its checkpoint when it resumes, and return the adapter file."""
    config, accelerator, model, optim, paths = run.config, run.accelerator, run.model, run.optim, run.paths
    step, epoch, position = restore(run, run.resume_folder) if run.resume_folder else (0, 0, 0)
    log = None  # the metrics, written by the main process alone
    if accelerator.is_main_process:
        log = prepare_output(run, resumed_step=step if run.resume_folder else None)
    try:
        event(run, "started", step, total_steps=run.total_steps, pid=os.getpid())
        trainable = sum(p.numel() for p in optim.parameters)
        run.say(f"training {trainable / 1e6:.2f} M parameters ({config.targets}, rank {config.rank}) of a "
                f"{model.family.title} model ({model.prediction_type}) on {run.device}, weights {run.weight_dtype}; "
                f"{run.total_steps} steps, {run.steps_per_epoch} per epoch"
                + (f"; resuming at step {step}" if step else ""))
        batches = micro_batches(run, step, epoch, position)
        bar = tqdm(total=run.total_steps, initial=step, desc="training", unit="step",
                   disable=run.quiet or not accelerator.is_main_process)
        started, smoothed = time.time(), None
        first_bad = torch.zeros((), dtype=torch.int64, device=run.device)  # the first step with a NaN loss
        while step < run.total_steps:
            total = torch.zeros((), device=run.device)
            for micro in range(config.gradient_accumulation):
                epoch, position, indices, share, pixels, prior = next(batches)
                syncing = micro == config.gradient_accumulation - 1
                with nullcontext() if syncing else no_sync(accelerator, optim):
                    loss = run.micro_batch_loss(epoch, indices, step_generator(config.seed, step), pixels=pixels,
                                                prior=prior, share=share)
                    if faults.nan_at(step + 1, accelerator.process_index):
                        loss = loss * float("nan")
                    accelerator.backward(loss)
                total = total + loss.detach().float()
            # Checked on the next check step, not here: reading a GPU's loss waits for the GPU, every step
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(total), step + 1, first_bad)
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(optim.parameters, config.max_grad_norm)
            optim.optimizer.step()
            optim.lr_scheduler.step()
            optim.optimizer.zero_grad(set_to_none=True)
            step += 1
            if optim.ema is not None:
                update_ema(optim.ema, optim.parameters, ema_decay_at(step, config.ema_decay))
            faults.kill_point("step", rank=accelerator.process_index)
            faults.perturb_at(step, accelerator.process_index, optim.parameters)
            smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
            bar.update(1)
            actions = requested_actions(run, step)
            if not actions and not checks_at(config, step, run.total_steps):
                continue

            loss, smoothed_loss = agreed_losses(run, step, total, smoothed, first_bad)
            if config.check_ranks:
                check_ranks_agree(run, step)
            lr = optim.lr_scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{smoothed_loss:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            if accelerator.is_main_process:
                if step % config.log_every == 0 or step == run.total_steps:
                    log.write({"step": step, "loss": loss, "loss_smoothed": smoothed_loss, "lr": lr,
                               "epoch": epoch, "time": round(time.time() - started, 3)})
                if validates_at(config, step, run.total_steps):
                    log.write({"step": step, "val_loss": run.fixed_noise_loss(run.validation),
                               "time": round(time.time() - started, 3)})
                if samples_at(config, step):
                    sample(run, step, log)
                if saves_at(config, step):
                    write_checkpoint(run, step, epoch, position, log)
            act_on(run, actions, step, epoch, position, log)
        bar.close()
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return paths.adapter
        if config.sample_prompts and (not config.sample_every or step % config.sample_every):
            sample(run, step, log)
        check_finite(optim.parameters, step, config.mixed_precision)
        output = save_adapter(run, paths.adapter, config.save_dtype, step, scale=config.save_scale)
        if optim.ema is not None:
            with ema_weights(optim):
                ema = save_adapter(run, paths.ema_adapter, config.save_dtype, step, ema=True, scale=config.save_scale)
            run.say(f"EMA adapter: {ema}")
        event(run, "finished", step, adapter=output.name)
        elapsed = time.time() - started
        run.say(f"done: {step} steps in {elapsed:.1f} s ({elapsed / max(1, step):.3f} s/step), peak memory "
                f"{peak_memory_mb(run.device):.0f} MB\nadapter: {output} ({output.stat().st_size / 1024:.1f} KiB)")
        return output
    except TrainingStopped:
        raise
    except WriteFailed as error:
        failed = WriteFailed(error.errno, f"{error}. {resume_hint(paths)}")
        record_failure(run, step, failed)
        raise failed from error
    except BaseException as error:  # a diverged run, a bug, Ctrl-C: the studio learns how the run ended
        record_failure(run, step, error)
        raise
    finally:
        if log:
            log.close()


def train(config: TrainConfig, quiet: bool = False) -> Path:
    """Run a training and return the adapter file's path. The output folder is locked meanwhile."""
    validate(config)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun, the main process alone writes
        return run_training(setup_run(config, quiet=quiet))
    with RunLock(config.output_dir, say=lambda message: print(f"sdlora: {message}", file=sys.stderr)):
        return run_training(setup_run(config, quiet=quiet))
