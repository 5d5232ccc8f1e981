"""Tiny Stable Diffusion pipelines (SD 1.x, SD 2.x v-prediction, SDXL) built in code, for tests,
demos and benchmarks.

Nothing here downloads anything: the UNet, VAE and CLIP text encoder are built from small
configs with seeded random weights, and the CLIP tokenizer's BPE vocabulary is built in code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..base_models.clip_tokenizer import byte_symbols


def _merges_for_word(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that make `word` (with its end-of-word mark) a single token."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def build_clip_tokenizer(words: tuple[str, ...] = (), max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer whose vocabulary is the byte alphabet plus one token for each of `words`.

    Words not in the list still tokenize, one token per character, as with the real CLIP vocabulary.
    """
    from transformers import CLIPTokenizer

    alphabet = byte_symbols()
    vocab: dict[str, int] = {}
    for symbol in alphabet + [c + "</w>" for c in alphabet]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        for left, right in _merges_for_word(word):
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def tiny_unet(cross_attention_dim: int = 32, seed: int = 0, linear_projection: bool = False):
    """A UNet2DConditionModel with the SD 1.x block layout at toy size (attention in down, mid and up)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
        use_linear_projection=linear_projection,  # SD 2.x's transformers project with Linear, SD 1.x's with 1x1 convs
    )


def tiny_sdxl_unet(seed: int = 0, cross_attention_dim: int = 64, pooled_dim: int = 32, time_ids_dim: int = 8):
    """A UNet2DConditionModel with the SDXL block layout at toy size.

    Like SDXL: no attention in the first level, deeper transformers further down (1, 1, 2 here for
    SDXL's 1, 2, 10), linear projections, and size/crop conditioning (`text_time`). Pair it with two
    text encoders whose hidden sizes add up to `cross_attention_dim`, the second projecting its
    pooled output to `pooled_dim`; diffusers embeds each of the six time ids in `time_ids_dim`.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),  # diffusers' name for the number of heads: 8 channels each
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_ids_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_ids_dim,
        norm_num_groups=8,
    )


def tiny_text_encoder(vocab_size: int, hidden_size: int = 32, seed: int = 0, intermediate_size: int | None = None,
                      max_positions: int = 77, hidden_act: str = "quick_gelu", projection_dim: int | None = None):
    """A 2-layer CLIPTextModel; build_clip_tokenizer puts <|startoftext|>, <|endoftext|> last.

    SD 1.x's CLIP uses quick_gelu, SD 2.x's OpenCLIP gelu; a projection_dim gives the
    CLIPTextModelWithProjection that SDXL's second encoder is.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden_size,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


WORDS = ("a", "red", "blue", "circle", "square")


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,  # clipping predicted latents to [-1, 1] ruins latent-diffusion samples
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_pipeline(seed: int = 0, words: tuple[str, ...] = WORDS):
    """A complete StableDiffusionPipeline (16 px images, 8x8x4 latents) with seeded random weights."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_clip_tokenizer(words)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        unet=tiny_unet(seed=seed),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sd2_pipeline(seed: int = 0, words: tuple[str, ...] = WORDS, prediction_type: str = "v_prediction"):
    """An SD 2.x-shaped StableDiffusionPipeline: OpenCLIP's gelu text encoder, linear projections in the
    UNet, and v-prediction like the 768 px SD 2.x models."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_clip_tokenizer(words, pad_token="!")
    unet = tiny_unet(seed=seed, linear_projection=True)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed, hidden_act="gelu"),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, words: tuple[str, ...] = WORDS):
    """An SDXL-shaped StableDiffusionXLPipeline: two text encoders (the second projected and padded with
    "!"), the SDXL block layout with size conditioning, 16 px images."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = build_clip_tokenizer(words)
    tokenizer_2 = build_clip_tokenizer(words, pad_token="!")
    vae = tiny_vae(seed)
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's VAE scale
    return StableDiffusionXLPipeline(
        vae=vae,
        # widths 24 + 40 = the UNet's 64; unequal, as SDXL's 768 and 1280 are, since a single-file
        # checkpoint tells its two encoders apart by width
        text_encoder=tiny_text_encoder(len(tokenizer), hidden_size=24, seed=seed),
        text_encoder_2=tiny_text_encoder(len(tokenizer_2), hidden_size=40, seed=seed + 1, hidden_act="gelu",
                                         projection_dim=32),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(seed=seed, cross_attention_dim=64, pooled_dim=32),
        scheduler=_scheduler(),
        add_watermarker=False,
    )


PIPELINES = {"sd1": tiny_pipeline, "sd2": tiny_sd2_pipeline, "sdxl": tiny_sdxl_pipeline}


def save_tiny_pipeline(path: str | Path, seed: int = 0, family: str = "sd1") -> Path:
    """Build a tiny pipeline of a family and save it as a diffusers folder that `from_pretrained` loads."""
    path = Path(path)
    PIPELINES[family](seed).save_pretrained(path)
    return path


def reference_client_problem() -> str | None:
    """Why diffusers' own LoRA loader (our reference client) cannot run here, or None if it can.

    diffusers loads LoRA through peft, and transformers refuses a peft older than its own minimum
    with a ValueError deep inside `add_adapter`. Say it up front, with the versions and the fix.
    """
    from importlib.metadata import PackageNotFoundError, version

    fix = "install the versions CI tests: pip install -c requirements-lock.txt -e '.[dev]'"
    try:
        installed = version("peft")
    except PackageNotFoundError:
        return f"peft is not installed; diffusers needs it to load LoRA files: {fix}"
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION as needed
    except ImportError:  # older transformers keep no minimum there
        needed = None
    return peft_mismatch(installed, version("transformers"), needed, fix)


def peft_mismatch(peft_version: str, transformers_version: str, needed: str | None, fix: str) -> str | None:
    from packaging.version import Version

    if needed is None or Version(peft_version) >= Version(needed):
        return None
    return (f"peft {peft_version} is installed, but transformers {transformers_version} refuses peft below "
            f"{needed}: {fix}")
