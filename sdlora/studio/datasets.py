"""A data folder as the studio shows it, and caption edits that never lose a text.

What is shown is what the trainer reads (`training.data`): the same images, captions, skipped
files, warnings and buckets. A caption is edited in the caption file beside its image, written
atomically, and only over the content the editor was shown: a file changed meanwhile (another
edit, an editor) refuses the save with both texts kept.
"""

from __future__ import annotations

import hashlib
import threading
from functools import lru_cache
from pathlib import Path

from ..base_models.clip_tokenizer import clip_tokenizer
from ..errors import DataError, SdloraError
from ..reliability.durable import write_file
from ..training.data import (ImageCaptionDataset, ImageItem, bucket_counts, bucket_histogram, caption_path,
                             find_image, find_images, read_caption, shown_path, truncated_captions,
                             upscale_warning)
from .security import OutsideFolder

# The trainer's resolution is the model's own; without a model, SD 1.x's 512 (SD 2.x v: 768, SDXL: 1024).
DEFAULT_RESOLUTION = 512
MAX_CAPTION_CHARS = 10_000  # a caption is a prompt: CLIP reads 75 tokens a window, three windows at most
MISSING = "missing"  # the version of a caption file that does not exist yet


class CaptionError(SdloraError, ValueError):
    """A caption that cannot be saved; the message names the file and why."""


class CaptionConflict(CaptionError):
    """The caption file changed since the editor read it; nothing was written.

    `current_text` and `current_version` are the file's now, `rejected_text` the text that was not
    saved: the caller shows both so that neither is lost.
    """

    def __init__(self, message: str, current_text: str, current_version: str, rejected_text: str) -> None:
        super().__init__(message)
        self.current_text, self.current_version, self.rejected_text = current_text, current_version, rejected_text


def caption_version(content: bytes | None) -> str:
    """An opaque token of a caption file's content (None: no file), to tell whether it changed."""
    return MISSING if content is None else "sha256:" + hashlib.sha256(content).hexdigest()


def _content(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


def _relative(path: Path, root: Path) -> str:
    return shown_path(path, root).as_posix()


@lru_cache(maxsize=1)
def _tokenizer():
    # Every SD family's first tokenizer is CLIP's, and the trainer measures captions with that one;
    # sdlora ships it, so the long-caption warning needs no model and no network.
    return clip_tokenizer()


def _edit_refusal(root: Path, item: ImageItem, caption_extension: str) -> CaptionError | None:
    """Why the caption of `item` cannot be edited in its caption file, or None."""
    inside = root.resolve()
    sidecar = caption_path(item.path, caption_extension)
    for path, what in ((item.path, "image"), (sidecar, "caption file")):
        if not path.resolve().is_relative_to(inside):
            return OutsideFolder(f"the {what} {_relative(path, root)} is a link to {path.resolve()}, outside the "
                                 f"data folder {root}: the studio edits captions inside the folder only")
    if item.caption_source not in (None, sidecar):
        listed_in = _relative(item.caption_source, root)
        return CaptionError(f"the caption of {_relative(item.path, root)} comes from {listed_in}, which holds the "
                            f"captions of many images and is not edited here: change it in {listed_in}, or move "
                            f"the caption to {_relative(sidecar, root)} (a caption file overrides {listed_in})")
    return None


def describe_folder(root: Path, caption_extension: str = ".txt", resolution: int | None = None) -> dict:
    """The folder as training with default options at `resolution` reads it, JSON-able.

    Keys: `images` (one dict each: path, caption, caption_source, width, height, version, editable,
    edit_refused), `skipped` (path, reason), `warnings` (what the trainer prints for the user to
    check), `summary` (the trainer's scan summary), `resolution`, `buckets` (width, height, count;
    counts include repeats, as training draws them) and `histogram` (the trainer's bucket lines).
    `version` is that of the caption file beside the image, the one `save_caption` writes. A folder
    with no usable image is a DataError, as for the trainer.
    """
    root = Path(root)
    resolution = resolution or DEFAULT_RESOLUTION
    scan = find_images(root, caption_extension)
    dataset = ImageCaptionDataset(scan, resolution)  # the trainer's defaults: buckets, no upscaling
    images = []
    for item in scan.items:
        refusal = _edit_refusal(root, item, caption_extension)
        images.append({
            "path": _relative(item.path, root),
            "caption": item.caption,
            "caption_source": _relative(item.caption_source, root) if item.caption_source else None,
            "width": item.width,
            "height": item.height,
            "version": caption_version(_content(caption_path(item.path, caption_extension))),
            "editable": refusal is None,
            "edit_refused": str(refusal) if refusal else None,
        })
    warnings = scan.note_lines()
    if scan.missing_captions:
        warnings.append(scan.missing_captions_line())
    # One window of 75 tokens: the trainer's default --max-token-length.
    for message in (upscale_warning(dataset, resolution), truncated_captions(dataset, _tokenizer(), root)):
        if message:
            warnings.append(message)
    return {
        "root": str(root),
        "images": images,
        "skipped": [{"path": _relative(path, root), "reason": reason} for path, reason in scan.skipped],
        "warnings": warnings,
        "summary": scan.summary(),
        "resolution": resolution,
        "buckets": [{"width": w, "height": h, "count": n} for (w, h), n in bucket_counts(dataset.sample_buckets)],
        "histogram": bucket_histogram(dataset.sample_buckets),
    }


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise CaptionError(f"a caption is text, got {type(text).__name__}")
    if len(text) > MAX_CAPTION_CHARS:
        raise CaptionError(f"the caption has {len(text):,} characters, over the limit of {MAX_CAPTION_CHARS:,}: "
                           "a caption is a prompt, and the text encoder reads at most 225 tokens of it")
    if "\0" in text:
        raise CaptionError("the caption holds a NUL character, which no caption file should: remove it")


def _image_path(root: Path, image_relpath: str) -> Path:
    """root / image_relpath, refused unless it resolves (symlinks followed) inside `root`."""
    if not isinstance(image_relpath, str) or not image_relpath or "\0" in image_relpath:
        raise OutsideFolder(f"{image_relpath!r} is not a path inside the data folder {root}")
    relative = Path(image_relpath)
    if relative.is_absolute() or not (root / relative).resolve().is_relative_to(root.resolve()):
        raise OutsideFolder(f"{image_relpath} is not inside the data folder {root} (symlinks followed): give an "
                            "image's path as the folder's listing shows it")
    return root / relative


# One save at a time in this process, so that two requests cannot both pass the version check.
_saving = threading.Lock()


def save_caption(root: Path, image_relpath: str, text: str, version: str, caption_extension: str = ".txt") -> str:
    """Write `text` as the caption of the image at `image_relpath` in its caption file; returns the new version.

    `version` is the one the editor was shown (`describe_folder`, or the last save): if the file changed
    since, nothing is written and CaptionConflict carries the file's text and version. A path outside
    the folder is OutsideFolder; an image training does not read, a caption from metadata.jsonl or
    captions.csv, or a text too long or holding NUL is a CaptionError.
    """
    root = Path(root)
    _check_text(text)
    if not root.is_dir():
        raise CaptionError(f"data folder {root} does not exist")
    path = _image_path(root, image_relpath)
    try:
        item = find_image(root, path, caption_extension)
    except DataError as error:
        raise CaptionError(f"cannot caption {image_relpath}: {error}") from None
    if refusal := _edit_refusal(root, item, caption_extension):
        raise refusal
    sidecar = caption_path(item.path, caption_extension)
    data = text.encode("utf-8")
    with _saving:
        current = _content(sidecar)
        if caption_version(current) != version:
            now = read_caption(sidecar, []) if current is not None else ""
            what = "was deleted" if current is None else "was created" if version == MISSING else "changed"
            raise CaptionConflict(f"{_relative(sidecar, root)} {what} since it was read (another edit, or an "
                                  "editor): nothing was written; compare the two texts and save again",
                                  now, caption_version(current), text)
        write_file(sidecar, data)
    return caption_version(data)
