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
import os
import sys
import time
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass
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
from .caching import LatentCache, TextCache, encode_pixels, latent_mask, sample_latents
from .checkpoint import (ADAPTER_FILE, checkpoint_folder, checkpoint_folders, load_state, rng_states, save_checkpoint,
                         set_rng_states)
from .config import RESUME_KEYS, TrainConfig, to_toml, trained_text_encoders, validate
from .data import BucketBatchSampler, ImageCaptionDataset, collate
from .loss import TimestepSampling, diffusion_loss, rows_of
from .prior import RENAMED_OPTIONS, ClassBatch, class_batch_keys
from .runlog import RunLog
from .setup import ADAPTER, BaseModel, ImageSet, Optimization, RunPaths
from .steps import batch_keys, ema_decay_at, step_generator, update_ema


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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def say(self, message: str) -> None:
        tell(message, self.quiet, self.accelerator)

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

    @torch.no_grad()
    def fixed_noise_loss(self, images: ImageSet | None = None, seed: int = 1234) -> float:
        """Mean loss over a set of images (the training images by default) at fixed noise and timesteps:
        comparable across steps and runs."""
        images = images or self.images
        sampler = BucketBatchSampler(images.dataset.sample_buckets, self.config.batch_size, seed=0, shuffle=False)
        losses = [self.micro_batch_loss(0, batch, step_generator(seed, i), images, training=False).item()
                  for i, batch in enumerate(sampler.batches(0))]
        return sum(losses) / len(losses)

    def _images_loss(self, epoch: int, indices: list[int], generator: torch.Generator, images: ImageSet,
                     training: bool, pixels: torch.Tensor | None) -> torch.Tensor:
        """The diffusion loss of one batch of `images` (instance or class)."""
        config, model, dataset = self.config, self.model, images.dataset
        # An evaluation batch encodes its images now, whether or not the run caches latents: validation
        # images are few and never cached, and a fixed-noise loss then reads the same with caching or without.
        cache = images.cache if training else None
        latents = self._latents(dataset, cache, epoch, indices, generator, pixels if training else None)
        captions = [dataset.caption(i, epoch) for i in indices]
        text = self._text(captions, training)
        geometry = [ImageGeometry(*dataset.geometry(i, epoch)) for i in indices]
        inputs = model.family.unet_inputs(text, geometry)
        preserve = self._base_prediction(captions, inputs, geometry) if config.preserve_outside_window else None
        weight = self._loss_weight(dataset, epoch, indices, latents, cache)
        with self.accelerator.autocast():
            return diffusion_loss(self.optim.wrapped_unet if training else model.unet, self.scheduler, latents,
                                  inputs, generator,
                                  prediction_type=model.prediction_type, noise_offset=config.noise_offset,
                                  min_snr_gamma=config.min_snr_gamma, debiased_estimation=config.debiased_estimation,
                                  loss_type=config.loss_type, huber_c=config.huber_c,
                                  huber_schedule=config.huber_schedule,
                                  timestep_range=(config.timestep_min, config.timestep_max),
                                  timestep_sampling=TimestepSampling(config.timestep_sampling, config.logit_mean,
                                                                     config.logit_std, config.sigmoid_scale),
                                  base_prediction=preserve, weight=weight)

    def _latents(self, dataset: ImageCaptionDataset, cache: LatentCache | None, epoch: int, indices: list[int],
                 generator: torch.Generator, pixels=None) -> torch.Tensor:
        vae = self.model.vae
        if cache is not None:
            mean, std = cache.batch(dataset, indices, epoch, self.device)
        else:
            if pixels is None:
                pixels = collate([dataset[(epoch, i)] for i in indices])["pixel_values"]
            mean, std = encode_pixels(vae, pixels)
        return sample_latents(vae.config, mean, std, generator)

    def _text(self, captions: list[str], training: bool) -> TextConditioning:
        if self.text_cache is not None:
            return self.text_cache.batch(captions).to(self.device)
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
        return latent_mask(masks, tuple(latents.shape[-2:])).to(self.device)

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
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available())
    say = partial(tell, quiet=quiet, accelerator=accelerator)
    progress = not quiet and accelerator.is_main_process
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    torch.manual_seed(config.seed)
    model = setup.load_base_model(config, weight_dtype)
    if config.class_prompts:
        folder = Path(config.class_data_dir or paths.root / "class-images")
        class_scan = setup.generate_class_images(config, model, folder, accelerator, progress, say)
    scheduler = setup.attach_adapter(config, model, accelerator.device)

    dataset, sampler = setup.training_data(config, scans.training, model, say)
    # The step counts first: too few batches fail before the latents are cached.
    steps_per_epoch, total_steps = setup.step_counts(config, sampler, accelerator.num_processes)
    images = ImageSet(dataset, sampler, setup.latent_cache(config, model.vae, dataset, progress))
    if images.cache is not None and config.cache_dir:
        say(f"latent cache: {images.cache.reused} of {len(images.cache.entries)} reused from {config.cache_dir}")
    validation = (ImageSet(setup.image_dataset(config, scans.validation, model.resolution, training=False))
                  if scans.validation else None)
    prior_loss_weight = 1.0 if config.prior_loss_weight is None else config.prior_loss_weight
    class_images = (setup.class_image_set(config, class_scan, model, prior_loss_weight, progress, say)
                    if class_scan else None)
    text_cache = setup.text_cache(config, model, [s for s in (images, validation, class_images) if s])
    setup.release_idle_models(model, text_cache, images, validation, prompts)
    optim = setup.build_optimizer(config, model, accelerator, total_steps)
    return Run(config=config, quiet=quiet, paths=paths, resume_folder=resume_folder, prompts=prompts,
               accelerator=accelerator, weight_dtype=weight_dtype, model=model, scheduler=scheduler, images=images,
               validation=validation, class_images=class_images, prior_loss_weight=prior_loss_weight,
               text_cache=text_cache, optim=optim, steps_per_epoch=steps_per_epoch, total_steps=total_steps)


# ---------------------------------------------------------------- the micro-batches


class MicroBatch(NamedTuple):
    """One micro-batch of the run: its epoch, the position in the epoch after it (where a resume
    continues), its images' indices, their pixels when latents are not cached, and the class images
    that join it."""

    epoch: int
    position: int
    indices: list[int]
    pixels: torch.Tensor | None
    prior: ClassBatch | None


def pixel_batches(dataset: ImageCaptionDataset, keys: Iterator[tuple[int, list[int]]], workers: int):
    """Images of `dataset` for the (epoch, indices) batches that `keys` yields, loaded ahead by `workers`
    processes."""
    batches = ([(epoch, index) for index in indices] for epoch, indices in keys)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                            num_workers=workers, prefetch_factor=2 if workers else None))


def micro_batches(run: Run, step: int, epoch: int, position: int) -> Iterator[MicroBatch]:
    """This process's micro-batches from a resume point (`step`, and the `epoch` and `position` it
    reached) onwards, forever.

    Without cached latents, pixels come from a DataLoader that runs ahead of the loop: it reads its own
    copy of the batch order, while the indices yielded here come from another, in step with the loop.
    Micro-batch number n of the whole run (every process's counted) takes class batch n, see
    `class_batch_keys`.
    """
    config, accelerator = run.config, run.accelerator
    processes, process = accelerator.num_processes, accelerator.process_index
    images, classes = run.images, run.class_images
    keys = batch_keys(images.sampler, epoch, position, processes, process)
    pixels = None
    if images.cache is None:
        pixels = pixel_batches(images.dataset, ((e, batch) for e, _, batch in batch_keys(
            images.sampler, epoch, position, processes, process)), config.num_workers)
    class_keys = class_pixels = None
    if classes:
        first = step * config.gradient_accumulation * processes + process
        class_keys = class_batch_keys(classes.sampler, first, processes)
        if classes.cache is None:
            class_pixels = pixel_batches(classes.dataset, class_batch_keys(classes.sampler, first, processes),
                                         config.num_workers)
    for epoch, position, indices in keys:
        batch = next(pixels)["pixel_values"] if pixels is not None else None
        prior = None
        if class_keys is not None:
            class_epoch, class_indices = next(class_keys)
            class_batch = next(class_pixels)["pixel_values"] if class_pixels is not None else None
            prior = ClassBatch(class_epoch, class_indices, class_batch)
        yield MicroBatch(epoch, position, indices, batch, prior)


# ---------------------------------------------------------------- checkpoints, files, samples


def checkpoint_state(run: Run, step: int, epoch: int, position: int) -> dict:
    optim = run.optim
    state = {"step": step, "epoch": epoch, "position": position, "optimizer": optim.optimizer.state_dict(),
             "lr_scheduler": optim.lr_scheduler.state_dict(), "rng": rng_states(),
             "config": json.dumps(asdict(run.config))}
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
    for key in RESUME_KEYS:
        # a checkpoint from before an option existed was trained with its default
        was = saved.get(key, TrainConfig.__dataclass_fields__[key].default)
        if was != getattr(config, key):
            raise ConfigError(f"cannot resume from {folder}: it was trained with {key}={was!r}, this run has "
                              f"{key}={getattr(config, key)!r}")
    loader.copy_weights_from(model.pipe, ADAPTER, folder / ADAPTER_FILE)
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.lr_scheduler.load_state_dict(state["lr_scheduler"])
    if optim.ema is not None:
        with torch.no_grad():
            for average, saved_average in zip(optim.ema, state["ema"], strict=True):
                average.copy_(saved_average)
    set_rng_states(state["rng"])
    return state["step"], state["epoch"], state["position"]


def save_adapter(run: Run, path: Path, dtype: str, step: int, ema: bool = False) -> Path:
    """The adapter file; with ema=True, the same file of the EMA weights (`ema_weights` swaps them in)."""
    config, model = run.config, run.model
    header = kohya_training_header(
        asdict(config), steps=step, epoch=step // run.steps_per_epoch, resolution=model.resolution,
        images=len(run.images.dataset), class_images=len(run.class_images.dataset) if run.class_images else 0,
        clip_skip=config.clip_skip or model.family.default_clip_skip,
        trains_text_encoder=bool(model.trained_encoders), ema_decay=config.ema_decay if ema else None)
    record = {"training": asdict(config), "steps": step, "resolution": model.resolution,
              "prediction_type": model.prediction_type, **({"ema": True} if ema else {})}
    return loader.save(model.pipe, path, ADAPTER, dtype=dtype, title=config.name, record=record, header=header,
                       prediction_type=model.prediction_type, resolution=model.resolution)


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
    with suppress(Exception):
        event(run, "failed", step, message=str(error) or type(error).__name__)  # Ctrl-C has no message


def act_on_requests(run: Run, step: int, epoch: int, position: int, log: RunLog | None) -> None:
    """Do what was asked of the run (control.py) after this step's own log, samples and checkpoint.

    Processes of a multi-process run act together, on the same step, or the next collective call
    would hang: the main process takes the requests and broadcasts them, on logged steps only (each
    broadcast is a round trip between the processes). `stop` ends every process with TrainingStopped.
    """
    config, accelerator = run.config, run.accelerator
    several = accelerator.num_processes > 1
    if several and step % config.log_every:
        return
    actions = control.take_requests(run.paths.root) if accelerator.is_main_process else []
    if several:
        from accelerate.utils import broadcast_object_list

        actions = broadcast_object_list([actions], from_process=0)[0]
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
        while step < run.total_steps:
            total = 0.0
            for micro in range(config.gradient_accumulation):
                epoch, position, indices, pixels, prior = next(batches)
                generator = step_generator(config.seed, step, micro, accelerator.process_index)
                syncing = micro == config.gradient_accumulation - 1
                with nullcontext() if syncing else accelerator.no_sync(optim.wrapped_unet):
                    loss = run.micro_batch_loss(epoch, indices, generator, pixels=pixels, prior=prior)
                    loss = loss / config.gradient_accumulation
                    if faults.nan_at(step + 1):
                        loss = loss * float("nan")
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(diverged_message(f"the loss became {loss.item()}", step + 1,
                                                                config.mixed_precision))
                    accelerator.backward(loss)
                total += loss.item()
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(optim.parameters, config.max_grad_norm)
            optim.optimizer.step()
            optim.lr_scheduler.step()
            optim.optimizer.zero_grad(set_to_none=True)
            step += 1
            if optim.ema is not None:
                update_ema(optim.ema, optim.parameters, ema_decay_at(step, config.ema_decay))
            faults.kill_point("step")

            smoothed = total if smoothed is None else 0.9 * smoothed + 0.1 * total
            lr = optim.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.4f}", lr=f"{lr:.2e}", epoch=epoch)
            if accelerator.is_main_process:
                if step % config.log_every == 0 or step == run.total_steps:
                    log.write({"step": step, "loss": total, "loss_smoothed": smoothed, "lr": lr, "epoch": epoch,
                               "time": round(time.time() - started, 3)})
                if config.validation_every and (step % config.validation_every == 0 or step == run.total_steps):
                    log.write({"step": step, "val_loss": run.fixed_noise_loss(run.validation),
                               "time": round(time.time() - started, 3)})
                if samples_at(config, step):
                    sample(run, step, log)
                if saves_at(config, step):
                    write_checkpoint(run, step, epoch, position, log)
            act_on_requests(run, step, epoch, position, log)
        bar.close()
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return paths.adapter
        if config.sample_prompts and (not config.sample_every or step % config.sample_every):
            sample(run, step, log)
        check_finite(optim.parameters, step, config.mixed_precision)
        output = save_adapter(run, paths.adapter, config.save_dtype, step)
        if optim.ema is not None:
            with ema_weights(optim):
                ema = save_adapter(run, paths.ema_adapter, config.save_dtype, step, ema=True)
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
