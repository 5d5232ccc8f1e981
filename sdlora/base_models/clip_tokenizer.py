"""The real CLIP tokenizer (SD 1.x, SD 2.x, SDXL), built offline from the BPE merges we ship.

Every Stable Diffusion text encoder uses OpenAI CLIP's byte-level BPE with 49,408 tokens. Its
vocabulary is not stored anywhere in the package: it follows from the merges file
(`configs/clip-bpe.txt.gz`, taken from the open_clip wheel, MIT licence) by the rule CLIP's own
tokenizer uses, so one 1.3 MB file serves every model and nothing is downloaded.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49_408
# CLIP keeps the first 49,152 - 256 - 2 merges of the file, after its version header line.
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2

# SD 1.x and SDXL's first tokenizer pad with <|endoftext|>; SD 2.x and SDXL's tokenizer_2 (both
# OpenCLIP) pad with "!" (id 0). The padding positions feed the UNet, so the choice matters.
PAD_END_OF_TEXT = EOS
PAD_EXCLAMATION = "!"


def bpe_path() -> Path:
    return Path(str(resources.files(__package__) / "configs" / "clip-bpe.txt.gz"))


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes, in CLIP's order.

    Printable Latin-1 bytes stand for themselves; the rest are shifted up past 255 in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [byte for byte in range(256) if byte not in printable]
    return [chr(code) for code in printable] + [chr(256 + index) for index in range(len(shifted))]


def parse_merges(text: str) -> list[tuple[str, str]]:
    """The merges CLIP uses from the text of bpe_simple_vocab_16e6.txt (header line skipped)."""
    lines = text.split("\n")[1 : MERGE_COUNT + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != MERGE_COUNT or any(len(pair) != 2 for pair in merges):
        raise ValueError(
            f"the CLIP BPE file {bpe_path()} is damaged: expected {MERGE_COUNT} merge pairs after the header; "
            "reinstall sdlora"
        )
    return merges  # type: ignore[return-value]


def vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token ids: bytes, bytes ending a word, one token per merge, then the two specials."""
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [left + right for left, right in merges]
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    with gzip.open(bpe_path(), "rt", encoding="utf-8") as file:
        merges = parse_merges(file.read())
    return vocabulary(merges), merges


def clip_tokenizer(pad_token: str = PAD_END_OF_TEXT, model_max_length: int = 77):
    """A transformers CLIPTokenizer equal to the one Stable Diffusion models ship, built offline."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not a CLIP token; use {PAD_END_OF_TEXT!r} or {PAD_EXCLAMATION!r}")
    # Copies: the tokenizer library may keep references, and the cached originals must stay intact.
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=model_max_length
    )
