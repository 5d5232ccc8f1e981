"""Tiny Stable Diffusion 1.x pipelines built in code, for tests, demos and benchmarks.

Nothing here downloads anything: the UNet, VAE and CLIP text encoder are built from small
configs with seeded random weights, and the CLIP tokenizer's BPE vocabulary is built in code.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _clip_byte_alphabet() -> list[str]:
    """The 256 printable stand-ins that CLIP's byte-level BPE uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _merges_for_word(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that make `word` (with its end-of-word mark) a single token."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def build_clip_tokenizer(words: tuple[str, ...] = (), max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is the byte alphabet plus one token for each of `words`.

    Words not in the list still tokenize, one token per character, as with the real CLIP vocabulary.
    """
    from transformers import CLIPTokenizer

    alphabet = _clip_byte_alphabet()
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_unet(cross_attention_dim: int = 32, seed: int = 0):
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
                      max_positions: int = 77):
    """A 2-layer CLIPTextModel; build_clip_tokenizer puts <|startoftext|>, <|endoftext|> last."""
    from transformers import CLIPTextConfig, CLIPTextModel

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
    )
    return CLIPTextModel(config)


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


def tiny_pipeline(seed: int = 0, words: tuple[str, ...] = ("a", "red", "blue", "circle", "square")):
    """A complete StableDiffusionPipeline (16 px images, 8x8x4 latents) with seeded random weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tokenizer = build_clip_tokenizer(words)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,  # clipping predicted latents to [-1, 1] ruins latent-diffusion samples
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(len(tokenizer), seed=seed),
        tokenizer=tokenizer,
        unet=tiny_unet(seed=seed),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder that `from_pretrained` loads."""
    path = Path(path)
    tiny_pipeline(seed).save_pretrained(path)
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
