"""The training config: one dataclass, read from TOML and overridden by command-line flags.

Precedence: defaults < `--config` file < flags. Unknown keys and wrong types are errors that name
the key. The command-line flags and their help are generated from the fields below.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tempfile
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..errors import ConfigError
from ..adapters.targets import PRESETS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CHOICES = {
    "mixed_precision": ("no", "fp16", "bf16"),
    "optimizer": ("adamw", "adamw8bit", "prodigy"),
    "lr_scheduler": ("constant", "constant_with_warmup", "cosine", "linear"),
    "prediction_type": ("epsilon", "v_prediction"),
    "save_dtype": ("fp16", "bf16", "fp32"),
    "loss_type": ("l2", "huber", "smooth_l1"),
    "huber_schedule": ("constant", "exponential", "snr"),
    "timestep_sampling": ("uniform", "logit_normal", "sigmoid"),
}


REQUIRED = ("model", "data", "output_dir")
# What decides the adapter's shape or a step's draws: a resumed run must have what its checkpoint had.
# (Which text encoders are trained is compared too, resolved for the model: see trained_text_encoders; and
# the global batch, batch_size x processes x gradient_accumulation, however it is made up: see loop.restore.)
RESUME_KEYS = ("rank", "alpha", "targets", "blocks", "with_adapters", "seed", "resolution", "data",
               "clip_skip", "max_token_length", "dora", "loraplus_ratio", "ema_decay", "reg_data", "class_prompts",
               "num_class_images", "class_sample_steps", "class_guidance")




def option(default, help: str, group: str):
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig:
    # paths
    model: str = option("", "base model: a diffusers folder, a hub id (from the local cache when offline), or "
                        "one checkpoint file (.safetensors, or .ckpt read without unpickling code)", "paths")
    model_config: typing.Optional[str] = option(None, "for a checkpoint file of an architecture sdlora does not "
                                                "ship: a diffusers folder whose configs describe it (no weights "
                                                "needed)", "paths")
    data: str = option("", "folder of images with captions (.txt beside each image, metadata.jsonl, "
                       "captions.csv, or kohya-style N_concept folders)", "paths")
    output_dir: str = option("", "where the adapter, checkpoints, samples and logs go", "paths")
    name: str = option("lora", "adapter name: the final file is OUTPUT_DIR/NAME.safetensors", "paths")
    resume: typing.Optional[str] = option(None, "continue from a checkpoint folder, or 'latest'", "paths")
    # adapter
    rank: int = option(16, "LoRA rank", "adapter")
    alpha: typing.Optional[float] = option(None, "LoRA alpha; the update is scaled by alpha/rank "
                                           "(default: alpha = rank, scale 1)", "adapter")
    dora: bool = option(False, "train DoRA: each layer W' = m (W + s BA) / ||W + s BA||, the norm per input column, "
                        "the magnitude m trained too; written as lora_up/lora_down/alpha plus dora_scale = m, which "
                        "A1111, ComfyUI and LyCORIS read (diffusers drops dora_scale); convs included", "adapter")
    targets: str = option("attn", "layers to adapt: attn, attn-mlp (kohya's default set), full (+ convs, "
                          "LoCon), convs (UNet convs only), or a regular expression searched in module paths",
                          "adapter")
    train_text_encoder: bool = option(False, "also train a LoRA on every text encoder of the model (needed to bind "
                                      "a new trigger word), as diffusers' SDXL scripts and kohya do; kohya names "
                                      "them lora_te_ (SDXL: lora_te1_, lora_te2_)", "adapter")
    train_text_encoder_2: typing.Optional[bool] = option(
        None, "SDXL: whether the second text encoder gets a LoRA (lora_te2_) (default: as --train-text-encoder); "
        "--no-train-text-encoder-2 trains the first alone, --train-text-encoder-2 alone the second alone",
        "adapter")
    blocks: typing.Optional[list[str]] = option(
        None, "train the UNet only in these blocks, named as block weights name them (IN04, M00, OUT01: see "
        "docs/loading.md), so that two adapters trained in different blocks cannot overwrite each other; "
        "b-lora-style is OUT01 and b-lora-content OUT00, B-LoRA's blocks for SDXL (default: every block)",
        "adapter")
    with_adapters: typing.Optional[list[str]] = option(
        None, "adapter files applied, frozen, while this one trains (FILE or FILE:STRENGTH; repeat the flag): a "
        "style trained with the character it will be stacked with learns to act on what the character draws; "
        "the file written holds the trained adapter alone", "adapter")
    # prior preservation
    reg_data: typing.Optional[str] = option(
        None, "prior preservation (DreamBooth): a folder of class images with captions, read like --data (no "
        "caption prefix or suffix); each micro-batch adds as many class images as instance images",
        "prior preservation")
    class_prompts: typing.Optional[list[str]] = option(
        None, "prior preservation with class images generated by the base model before training: prompts, or a "
        ".txt file of prompts one per line (repeat the flag; in TOML a list or a file name); needs "
        "--num-class-images", "prior preservation")
    num_class_images: typing.Optional[int] = option(
        None, "how many class images to generate from --class-prompts (image i: prompt i modulo the prompts, "
        "seed + i)", "prior preservation")
    class_data_dir: typing.Optional[str] = option(
        None, "where generated class images are kept, with the fingerprint (base model, prompts, count, size, "
        "seed, steps, guidance) that lets a rerun reuse them (default: OUTPUT_DIR/class-images)",
        "prior preservation")
    class_sample_steps: int = option(20, "denoising steps for each generated class image", "prior preservation")
    class_guidance: float = option(7.5, "guidance scale for the generated class images", "prior preservation")
    prior_loss_weight: typing.Optional[float] = option(
        None, "weight of the class images' loss: loss = instance loss + weight * class loss (default 1 with "
        "--reg-data or --class-prompts)", "prior preservation")
    # data
    resolution: typing.Optional[int] = option(None, "training resolution; images go to aspect-ratio buckets of "
                                              "about this area (default: the model's own: 512 for SD 1.x, 768 "
                                              "for SD 2.x v, 1024 for SDXL)", "data")
    buckets: bool = option(True, "aspect-ratio buckets; off: every image is cropped to a square", "data")
    allow_upscale: bool = option(False, "let buckets upscale images smaller than the bucket", "data")
    caption_extension: str = option(".txt", "extension of the caption file beside each image", "data")
    caption_prefix: str = option("", "text put before every caption (a trigger word, say)", "data")
    caption_suffix: str = option("", "text put after every caption", "data")
    shuffle_tags: bool = option(False, "shuffle comma-separated tags of each caption every epoch", "data")
    keep_tokens: int = option(0, "leading tags kept in place by shuffling and tag dropout", "data")
    caption_dropout: float = option(0.0, "probability of training on an empty caption (helps guidance)", "data")
    tag_dropout: float = option(0.0, "probability of dropping each tag", "data")
    flip: float = option(0.0, "probability of a horizontal flip", "data")
    random_crop: bool = option(False, "crop at random instead of the centre (turns latent caching off)", "data")
    validation_split: float = option(0.0, "fraction of images held out for a validation loss", "data")
    num_workers: int = option(0, "processes that load and crop images ahead of the training step, when latents "
                              "are not cached (random crops); 0 loads them in the training process", "data")
    clip_skip: typing.Optional[int] = option(None, "use the text encoder's Nth layer from the end, counted as A1111 "
                                             "does (1: the last; 2 is usual for anime models; default: the "
                                             "family's own, SDXL's is 2)", "data")
    max_token_length: typing.Optional[int] = option(None, "caption length in tokens: 75 (one window; longer "
                                                    "captions are cut, with a warning), 150 or 225 (two or three "
                                                    "windows, as A1111 reads long prompts)", "data")
    masked_loss: bool = option(False, "weigh each image's loss by the grayscale NAME.mask.png beside it (white: "
                               "learnt, black: ignored, grey: in between; the image's size); every image needs "
                               "one (an all-white mask trains the whole image)", "data")
    alpha_mask: bool = option(False, "weigh each image's loss by its own alpha channel (opaque: learnt, "
                              "transparent: ignored); every image needs one", "data")
    # training
    batch_size: int = option(1, "images per micro-batch of each process; a step trains batch_size x processes x "
                             "gradient_accumulation images, from one bucket", "training")
    max_steps: typing.Optional[int] = option(None, "optimizer steps to train (or give --epochs)", "training")
    epochs: typing.Optional[int] = option(None, "passes over the data (default 10 when --max-steps is not "
                                          "given)", "training")
    lr: float = option(1e-4, "learning rate (UNet LoRA)", "training")
    text_encoder_lr: typing.Optional[float] = option(None, "text-encoder LoRA learning rate (default: --lr)",
                                                     "training")
    loraplus_ratio: typing.Optional[float] = option(None, "LoRA+: train the up (B) matrices at this multiple of "
                                                    "the learning rate (16 is the paper's usual; off by default)",
                                                    "training")
    ema_decay: typing.Optional[float] = option(None, "also keep an exponential moving average of the adapter "
                                               "weights (0.999, say) and write it as OUTPUT_DIR/NAME.ema.safetensors "
                                               "(off by default)", "training")
    optimizer: str = option("adamw", "adamw, adamw8bit (needs bitsandbytes) or prodigy (needs prodigyopt)",
                            "training")
    weight_decay: float = option(1e-2, "AdamW weight decay", "training")
    lr_scheduler: str = option("constant", "constant, constant_with_warmup, cosine or linear", "training")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up (with constant_with_warmup, cosine or "
                               "linear)", "training")
    max_grad_norm: float = option(1.0, "clip gradients to this norm (0: no clipping)", "training")
    gradient_accumulation: int = option(1, "micro-batches per optimizer step", "training")
    mixed_precision: str = option("no", "no, fp16 or bf16: frozen weights in that dtype, LoRA weights and "
                                  "optimizer state in fp32", "training")
    gradient_checkpointing: bool = option(False, "recompute activations in backward: less memory, slower",
                                          "training")
    check_ranks: bool = option(False, "with several processes: on every logged step, check that each holds "
                               "bit-identical adapter weights, and stop as a bug if not (a debug aid)", "training")
    collective_timeout: int = option(600, "with several processes: seconds one waits for the others (at a "
                                     "gradient exchange, say) before the run ends; longer than the slowest "
                                     "sample sheet, validation or checkpoint, which the main process does alone",
                                     "training")
    prediction_type: typing.Optional[str] = option(None, "epsilon or v_prediction (default: from the model's "
                                                   "scheduler config; SD 2.x 768 models are v_prediction)",
                                                   "training")
    zero_terminal_snr: bool = option(False, "rescale the noise schedule so its last step is pure noise (Lin et "
                                     "al. 2023); needs v_prediction", "training")
    min_snr_gamma: typing.Optional[float] = option(None, "min-SNR-gamma loss weighting (5 is usual; off by "
                                                   "default)", "training")
    noise_offset: float = option(0.0, "noise offset (0.05-0.1 helps very dark/bright images)", "training")
    debiased_estimation: bool = option(False, "debiased estimation loss weighting (Yu et al. 2023, as kohya's "
                                       "--debiased_estimation_loss): each sample's loss times 1/sqrt(SNR) (v "
                                       "targets: 1/(SNR+1)), SNR capped at 1000; multiplies with min-SNR-gamma",
                                       "training")
    loss_type: str = option("l2", "l2 (mean squared error), huber or smooth_l1 (kohya's scheduled pseudo-Huber "
                            "losses: quadratic for small errors, linear for large, so outliers pull less)",
                            "training")
    huber_c: float = option(0.1, "the Huber loss's threshold c, in (0, 1]; with a schedule, its value at high "
                            "noise", "training")
    huber_schedule: str = option("snr", "how c changes with the timestep: constant, exponential (1 at t=0 down "
                                 "to huber_c) or snr (about 1 at low noise, huber_c at high noise)", "training")
    timestep_sampling: str = option("uniform", "how timesteps are drawn from the window: uniform, logit_normal "
                                    "(sigmoid(logit_mean + logit_std * z), SD3's) or sigmoid (sigmoid("
                                    "sigmoid_scale * z), kohya's flux option); both favour the middle",
                                    "training")
    logit_mean: float = option(0.0, "logit_normal sampling: mean of the normal (> 0 favours noisier timesteps)",
                               "training")
    logit_std: float = option(1.0, "logit_normal sampling: standard deviation of the normal (larger spreads "
                              "draws towards the window's ends)", "training")
    sigmoid_scale: float = option(1.0, "sigmoid sampling: scale of the normal (larger spreads draws towards the "
                                  "window's ends)", "training")
    timestep_min: int = option(0, "lowest training timestep", "training")
    timestep_max: int = option(1000, "one past the highest training timestep", "training")
    preserve_outside_window: bool = option(
        False, "with a timestep window: also train on the timesteps outside it, towards the base model's own "
        "prediction, so the adapter acts only inside the window (a style kept to timestep_max 600 leaves the "
        "layout to the base model and to adapters stacked with it)", "training")
    cache_latents: bool = option(True, "encode every image with the VAE once, before training", "training")
    cache_dir: typing.Optional[str] = option(None, "also keep the latent cache on disk here, keyed by image "
                                             "content, size and VAE, so later runs reuse it", "training")
    cache_text: bool = option(True, "encode captions once when the text encoder is frozen and captions do "
                              "not change between epochs", "training")
    seed: int = option(42, "random seed: the same seed and data give the same adapter", "training")
    # output
    save_scale: float = option(
        1.0, "multiply the update the final file holds (through its alpha; checkpoints keep the trained one): "
        "with 1.5, strength 1 is the trained adapter at 1.5 and the trained effect sits at about 0.67, so that "
        "strength 0.5 gives part of it rather than none (docs/stacking.md has the curves); LoRA only",
        "output")
    save_every: typing.Optional[int] = option(None, "write a checkpoint (adapter + training state) every N "
                                              "steps", "output")
    keep_checkpoints: int = option(3, "keep only the newest N checkpoints", "output")
    save_dtype: str = option("fp16", "dtype of the saved adapter: fp16, bf16 or fp32", "output")
    sample_prompts: typing.Optional[str] = option(None, "text file with one prompt per line for sample "
                                                  "images", "output")
    sample_every: typing.Optional[int] = option(None, "make sample images every N steps (and at the end)",
                                                "output")
    sample_steps: int = option(20, "denoising steps for samples (class images have --class-sample-steps)",
                               "output")
    sample_guidance: float = option(7.5, "guidance scale for samples (class images have --class-guidance)",
                                    "output")
    validation_every: typing.Optional[int] = option(None, "compute the validation loss every N steps",
                                                    "output")
    log_every: int = option(10, "write a metrics.jsonl record every N steps", "output")

    def resolved_epochs(self) -> int | None:
        return self.epochs if self.epochs is not None or self.max_steps is not None else 10

    def trained_text_encoders(self, names: tuple[str, ...]) -> list[str]:
        """Which of a model's text encoders (`names`, in the family's order) get a LoRA."""
        return trained_text_encoders(self.train_text_encoder, self.train_text_encoder_2, names)


def trained_text_encoders(first: bool, second: bool | None, names: tuple[str, ...]) -> list[str]:
    """--train-text-encoder trains every text encoder; train_text_encoder_2, when set, decides the second alone.
    (A run's config from before train_text_encoder_2 could be unset always set it, so it reads the same.)"""
    wanted = (first, first if second is None else second)
    return [name for name, train in zip(names, wanted) if train]


def _types() -> dict[str, type]:
    """Field name -> the plain type a value must have (Optional[X] -> X)."""
    hints = typing.get_type_hints(TrainConfig)
    plain = {}
    for name, hint in hints.items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        plain[name] = args[0] if args else hint
    return plain


def _check_value(key: str, value, source: str):
    types = _types()
    if key not in types:
        close = difflib.get_close_matches(key, list(types), n=1)
        raise ConfigError(f"{source}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    expected = types[key]
    if value is None and typing.get_type_hints(TrainConfig)[key] != expected:
        return None
    if typing.get_origin(expected) is list:  # a list of strings; one string is a list of one
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{source}: {key} must be a string or a list of strings, got {value!r}")
        return items
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: {key} must be {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def parse_toml(text: str, source: str) -> dict:
    """The keys (with - read as _) and values of a TOML text, unchecked; `source` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML: {error}") from None
    return {key.replace("-", "_"): value for key, value in raw.items()}


def read_toml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = parse_toml(path.read_text(), str(path))
    return {key: _check_value(key, value, str(path)) for key, value in raw.items()}


def build(cli_values: dict, config_file: str | None = None) -> TrainConfig:
    """Defaults < TOML file < command-line values."""
    values = read_toml(config_file) if config_file else {}
    values.update(cli_values)
    # Checked values as _check_value returns them: one class prompt from Python is a list of one, too.
    return TrainConfig(**{key: _check_value(key, value, "command line") for key, value in values.items()})


def flag(name: str) -> str:
    """The command-line flag of a field: --output-dir for output_dir."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, help showing the default; unset flags stay absent so the file can set them."""
    types = _types()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        switch = flag(f.name)
        default = f.default if f.default is not MISSING else None
        shown = "unset" if default is None else json.dumps(default) if isinstance(default, str) else default
        help_text = f.metadata["help"]
        if f.name in REQUIRED:
            help_text += " (required)"
        elif "default" not in help_text:
            help_text += f" (default: {shown})"
        kind = types[f.name]
        if kind is bool:
            groups[group_name].add_argument(switch, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                            help=help_text)
        elif typing.get_origin(kind) is list:
            groups[group_name].add_argument(switch, action="append", default=argparse.SUPPRESS, help=help_text,
                                            metavar=f.name.upper())
        else:
            groups[group_name].add_argument(switch, type=kind, default=argparse.SUPPRESS, help=help_text,
                                            choices=CHOICES.get(f.name), metavar=f.name.upper())


def to_toml(config: TrainConfig) -> str:
    """The resolved config as TOML, so `--config OUT/config.toml` repeats the run."""
    lines = ["# sdlora train config, resolved: defaults < file < command line"]
    for key, value in asdict(config).items():
        if value is None:
            lines.append(f"# {key} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (str, list)):
            lines.append(f"{key} = {json.dumps(value)}")  # JSON strings and lists of them are valid TOML
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"


def validate(config: TrainConfig) -> None:
    """Every check that needs no model: raise ConfigError with the key and what to do."""
    for key in REQUIRED:
        if not getattr(config, key):
            raise ConfigError(f"--{key.replace('_', '-')} is required")
    from ..errors import ModelError
    from ..base_models.sources import check_model_source

    try:
        check_model_source(config.model, config.model_config)
    except ModelError as error:
        raise ConfigError(str(error)) from None
    if not Path(config.data).is_dir():
        raise ConfigError(f"data folder {config.data} does not exist")
    for key, choices in CHOICES.items():
        value = getattr(config, key)
        if value is not None and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    positive = ("rank", "batch_size", "gradient_accumulation", "log_every", "collective_timeout",
                "sample_steps", "class_sample_steps")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(config, key)}")
    for key in ("max_steps", "epochs", "save_every", "sample_every", "validation_every"):
        value = getattr(config, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if config.lr <= 0 or (config.text_encoder_lr is not None and config.text_encoder_lr <= 0):
        raise ConfigError("learning rates must be > 0")
    if config.loraplus_ratio is not None and config.loraplus_ratio < 1:
        raise ConfigError(f"loraplus_ratio multiplies the learning rate of the up matrices and must be at least 1 "
                          f"(16 is usual), got {config.loraplus_ratio}; leave it unset to train without LoRA+")
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be between 0 and 1 (0.999 is usual), got {config.ema_decay}; leave it "
                          "unset for no EMA")
    if config.targets not in PRESETS:
        try:
            re.compile(config.targets)
        except re.error as error:
            raise ConfigError(f"targets must be {', '.join(PRESETS)} or a regular expression over module paths; "
                              f"{config.targets!r} is neither ({error})") from None
    if config.save_scale <= 0:
        raise ConfigError(f"save_scale multiplies the saved update and must be > 0, got {config.save_scale}")
    if config.save_scale != 1.0 and config.dora:
        raise ConfigError("save_scale scales a LoRA's update through its alpha; a DoRA's update does not scale so: "
                          "drop save_scale, or train without --dora")
    if config.blocks is not None:
        training_blocks(config.blocks)
    for entry in config.with_adapters or []:
        path, _ = frozen_adapter(entry)
        if not path.is_file():
            raise ConfigError(f"with_adapters: {path} does not exist: give adapter files (.safetensors), each "
                              "with an optional :STRENGTH")
    if config.resolution is not None and (config.resolution < 8 or config.resolution % 8):
        raise ConfigError(f"resolution must be a positive multiple of 8, got {config.resolution}")
    # The upper bound is the text encoder's depth, checked once the model is loaded (CLIP-L has 12 layers,
    # SD 2.x's encoder 23, SDXL's second 32).
    if config.clip_skip is not None and config.clip_skip < 1:
        raise ConfigError(f"clip_skip counts layers from the end, 1 being the last, got {config.clip_skip}")
    if config.max_token_length not in (None, 75, 150, 225):
        raise ConfigError(f"max_token_length must be 75, 150 or 225, got {config.max_token_length}")
    for key in ("num_workers", "warmup_steps"):
        if getattr(config, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(config, key)}")
    if config.zero_terminal_snr and config.prediction_type == "epsilon":
        raise ConfigError("zero_terminal_snr needs v_prediction: at the last step the noisy image is pure noise, so "
                          "predicting the noise is trivial and the image is never learnt")
    if config.masked_loss and config.alpha_mask:
        raise ConfigError("give --masked-loss (NAME.mask.png files) or --alpha-mask (the images' alpha), not both")
    if config.max_steps is not None and config.epochs is not None:
        raise ConfigError("give --max-steps or --epochs, not both")
    for key in ("caption_dropout", "tag_dropout", "flip"):
        if not 0.0 <= getattr(config, key) <= 1.0:
            raise ConfigError(f"{key} is a probability in [0, 1], got {getattr(config, key)}")
    if not 0.0 <= config.validation_split < 1.0:
        raise ConfigError(f"validation_split must be in [0, 1), got {config.validation_split}")
    if not 0 <= config.timestep_min < config.timestep_max <= 1000:
        raise ConfigError(f"need 0 <= timestep_min < timestep_max <= 1000, got {config.timestep_min}, "
                          f"{config.timestep_max}")
    if not 0.0 < config.huber_c <= 1.0:
        raise ConfigError(f"huber_c must be in (0, 1], got {config.huber_c}: 0.1 is usual")
    for key in ("logit_std", "sigmoid_scale"):
        if getattr(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {getattr(config, key)}: 1.0 is usual")
    _check_acts(config, ("huber_c", "huber_schedule"), "loss_type", ("huber", "smooth_l1"))
    _check_acts(config, ("logit_mean", "logit_std"), "timestep_sampling", ("logit_normal",))
    _check_acts(config, ("sigmoid_scale",), "timestep_sampling", ("sigmoid",))
    # Refused rather than made to act: "constant" is the schedule without warm-up here as in diffusers'
    # get_scheduler (and kohya refuses warm-up steps with it), and constant_with_warmup is the one with it.
    _check_acts(config, ("warmup_steps",), "lr_scheduler", ("constant_with_warmup", "cosine", "linear"))
    _refuse_idle(config, ("keep_tokens",), config.shuffle_tags or config.tag_dropout > 0,
                 "--shuffle-tags or --tag-dropout", "neither",
                 "add --shuffle-tags or --tag-dropout P")
    # Cached latents need no image loading during training, so workers would sit idle.
    _refuse_idle(config, ("num_workers",), not config.cache_latents, "--no-cache-latents",
                 "latents cached, the default", "add --no-cache-latents")
    if config.preserve_outside_window and (config.timestep_min, config.timestep_max) == (0, 1000):
        raise ConfigError("preserve_outside_window needs a timestep window: set timestep_min above 0 or "
                          "timestep_max below 1000")
    if config.random_crop and config.cache_latents:
        raise ConfigError("random crops change every epoch and cannot be cached: pass --no-cache-latents "
                          "or drop --random-crop")
    if config.sample_every is not None and not config.sample_prompts:
        raise ConfigError("--sample-every needs --sample-prompts FILE")
    if config.sample_prompts and not Path(config.sample_prompts).is_file():
        raise ConfigError(f"sample prompts file {config.sample_prompts} does not exist")
    if config.validation_every is not None and config.validation_split == 0:
        raise ConfigError("--validation-every needs --validation-split > 0")
    if config.text_encoder_lr is not None and not (config.train_text_encoder or config.train_text_encoder_2):
        raise ConfigError("--text-encoder-lr is set but the text encoder is not trained: add "
                          "--train-text-encoder or drop --text-encoder-lr")
    _validate_prior(config)
    if config.optimizer == "adamw8bit":
        _require("bitsandbytes", "adamw8bit", "pip install 'sdlora[8bit]'")
    if config.optimizer == "prodigy":
        _require("prodigyopt", "prodigy", "pip install 'sdlora[prodigy]'")
    _check_writable(Path(config.output_dir))


def training_blocks(blocks: list[str]) -> list[str]:
    """The block names `blocks` means (presets expanded); ConfigError for a name that is not a block's."""
    from ..adapters.block_weights import TRAINING_PRESETS, is_unet_block

    names = [name for entry in blocks for name in TRAINING_PRESETS.get(entry, (entry,))]
    bad = [name for name in names if not is_unet_block(name)]
    if bad or not names:
        raise ConfigError(f"blocks {', '.join(bad) or '(none)'}: name UNet blocks as block weights do (IN04, M00, "
                          f"OUT01) or give a preset ({', '.join(TRAINING_PRESETS)})")
    return names


def frozen_adapter(entry: str) -> tuple[Path, float]:
    """A with_adapters entry `FILE[:STRENGTH]` -> (FILE, STRENGTH)."""
    from ..adapters.strength import split_weight

    path, weight = split_weight(entry)
    return Path(path), 1.0 if weight is None else weight


def class_prompt_list(class_prompts: list[str] | str) -> list[str]:
    """The prompts `class_prompts` names: an entry ending in .txt is a file of prompts, one per line (blank
    lines skipped), any other entry is a prompt."""
    prompts = []
    for entry in [class_prompts] if isinstance(class_prompts, str) else class_prompts:
        if not entry.lower().endswith(".txt"):
            prompts.append(entry.strip())
            continue
        path = Path(entry)
        if not path.is_file():
            raise ConfigError(f"class_prompts file {path} does not exist: give a text file with one prompt per "
                              "line, or the prompts themselves")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts or not all(prompts):
        raise ConfigError(f"class_prompts {class_prompts!r} holds an empty prompt or none: give the class's "
                          "prompts, like 'a photo of a dog'")
    return prompts


def _validate_prior(config: TrainConfig) -> None:
    """Prior preservation: one source of class images, and no option that would be silently ignored."""
    if config.reg_data is not None and config.class_prompts is not None:
        raise ConfigError("give --reg-data (a folder of class images) or --class-prompts (images generated from "
                          "the base model), not both")
    if config.reg_data is not None and not Path(config.reg_data).is_dir():
        raise ConfigError(f"reg_data folder {config.reg_data} does not exist: give the folder of class images "
                          "with captions")
    if config.class_prompts is not None:
        class_prompt_list(config.class_prompts)
        if config.num_class_images is None:
            raise ConfigError("--class-prompts needs --num-class-images N: how many class images to generate "
                              "(100-200 is usual)")
    else:
        for key in ("num_class_images", "class_data_dir"):
            if getattr(config, key) is not None:
                raise ConfigError(f"{key} is set but no class images are generated: add --class-prompts or drop "
                                  f"--{key.replace('_', '-')}")
        for key in ("class_sample_steps", "class_guidance"):
            if getattr(config, key) != TrainConfig.__dataclass_fields__[key].default:
                raise ConfigError(f"{key} is set but no class images are generated: add --class-prompts or drop "
                                  f"--{key.replace('_', '-')}")
    if config.num_class_images is not None and config.num_class_images < 1:
        raise ConfigError(f"num_class_images must be at least 1, got {config.num_class_images}")
    if config.prior_loss_weight is not None:
        if config.reg_data is None and config.class_prompts is None:
            raise ConfigError("prior_loss_weight is set but prior preservation is off: add --reg-data or "
                              "--class-prompts, or drop --prior-loss-weight")
        if not config.prior_loss_weight >= 0:  # `not >=` catches NaN too
            raise ConfigError(f"prior_loss_weight must be 0 or more, got {config.prior_loss_weight}")
    if config.class_data_dir is not None:
        _check_writable(Path(config.class_data_dir))


def _check_acts(config: TrainConfig, keys: tuple[str, ...], switch: str, acting: tuple[str, ...]) -> None:
    """An option changed from its default must be one that acts with the chosen `switch`."""
    value = getattr(config, switch)
    _refuse_idle(config, keys, value in acting, f"{switch} {' or '.join(acting)}", f"{switch} {value}",
                 f"set {switch}")


def _refuse_idle(config: TrainConfig, keys: tuple[str, ...], acts: bool, needs: str, this_run: str,
                 fix: str) -> None:
    """An option changed from its default is refused when `acts` is false: it would be accepted and ignored."""
    if acts:
        return
    for key in keys:
        if getattr(config, key) != TrainConfig.__dataclass_fields__[key].default:
            raise ConfigError(f"{key} is set but acts only with {needs} (this run has {this_run}): {fix} or drop "
                              f"{key}")


def _require(module: str, what: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"optimizer {what} needs the {module} package: {install}")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(f"output folder {folder} is not writable: {error.strerror}") from None
