"""Training data: finding images and captions, aspect-ratio buckets, and the torch Dataset/sampler.

Every random choice (flip, crop, caption shuffling/dropout, batch order) is a pure function of
(seed, epoch, index), so a resumed run sees exactly the same data as an uninterrupted one.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import os
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONCEPT_DIR = re.compile(r"^(\d+)_(.+)$")  # kohya's "N_concept words" folders
MASK_SUFFIX = ".mask.png"  # NAME.mask.png beside NAME.png weighs its loss; never a training image itself
_EXIF_ORIENTATION = 0x0112
# Pillow's own guard warns above 89 MP and refuses 179 MP, close to the 100-150 MP of medium-format
# cameras. 200 MP (600 MB decoded) admits any single-shot photo and still skips decompression bombs
# and gigapixel panoramas, which training would shrink to about 1 MP anyway.
MAX_IMAGE_PIXELS = 200_000_000


@dataclass(frozen=True)
class ImageItem:
    """One usable image: its caption, repeats per epoch and size after EXIF orientation.

    `mask` is the grayscale file that weighs the image's loss, or the image itself when its alpha
    channel does (see `attach_masks`); None trains every pixel alike. `caption_source` is the file the
    caption was read from: the caption file beside the image (also an empty one that nothing else
    overrides), or the metadata.jsonl or captions.csv listing it; None when there is none.
    """

    path: Path
    caption: str
    repeats: int
    width: int
    height: int
    concept: str | None = None
    mask: Path | None = None
    caption_source: Path | None = None


@dataclass
class DatasetScan:
    """What `find_images` found: usable items, skipped files and files used with a warning (each with
    its reason), and the missing-caption count."""

    items: list[ImageItem]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    missing_captions: int = 0
    root: Path | None = None
    notes: list[tuple[Path, str]] = field(default_factory=list)
    mask_files: int = 0

    def summary(self) -> str:
        """A few printable lines describing the scan."""
        samples = sum(item.repeats for item in self.items)
        where = f" in {self.root}" if self.root is not None else ""
        lines = [f"Found {len(self.items)} images{where} ({samples} samples per epoch with repeats)."]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} files:")
            lines += [f"  {shown_path(path, self.root)}: {reason}" for path, reason in self.skipped]
        if self.notes:
            lines.append(f"Used, but check these {len(self.notes)} files:")
            lines += [f"  {line}" for line in self.note_lines()]
        lines.append(self.missing_captions_line())
        if self.mask_files:
            lines.append(f"Mask files ({MASK_SUFFIX}, read with --masked-loss, never trained on as images): "
                         f"{self.mask_files}.")
        return "\n".join(lines)

    def note_lines(self) -> list[str]:
        """One line for each file used with a warning: its path in the folder and the warning."""
        return [f"{shown_path(path, self.root)}: {note}" for path, note in self.notes]

    def missing_captions_line(self) -> str:
        return f"Captions missing: {self.missing_captions} (these train with an empty caption)."


def shown_path(path: Path, root: Path | None) -> Path:
    """`path` relative to the data folder when it is inside it, for messages."""
    return path.relative_to(root) if root and path.is_relative_to(root) else path


# --- Discovery ---------------------------------------------------------------------------------


def _norm(path: Path) -> str:
    # NFC: macOS stores "café" decomposed, while a caption file typed elsewhere holds it composed.
    return unicodedata.normalize("NFC", os.path.normcase(os.path.normpath(path)))


def _read_text(path: Path, notes: list[tuple[Path, str]]) -> str:
    """A caption file's text: UTF-8 (BOM or not), else UTF-16 with a BOM, cp1252 or latin-1, noted in `notes`."""
    raw = path.read_bytes()
    encodings = ["utf-16"] if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else []
    # cp1252 is what Windows editors write; it leaves five bytes undefined, which latin-1 then takes.
    for encoding in encodings + ["utf-8-sig", "cp1252"]:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            pass
    else:
        encoding, text = "latin-1", raw.decode("latin-1")  # every byte is a latin-1 character
    if encoding != "utf-8-sig":
        notes.append((path, f"caption not UTF-8, read as {encoding}"))
    return text


def _read_metadata_jsonl(path: Path, notes: list[tuple[Path, str]]) -> dict[str, str]:
    captions = {}
    for number, line in enumerate(_read_text(path, notes).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            captions[_norm(path.parent / row["file_name"])] = str(row["text"]).strip()
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(
                f"{path}, line {number}: expected a JSON object with 'file_name' and 'text' ({e!r}); "
                "fix or remove the line"
            ) from None
    return captions


def _read_captions_csv(path: Path, notes: list[tuple[Path, str]]) -> dict[str, str]:
    # newline="": a quoted caption may span lines, and csv wants to see those line ends itself.
    reader = csv.DictReader(io.StringIO(_read_text(path, notes), newline=""))
    if not reader.fieldnames or not {"file_name", "text"} <= set(reader.fieldnames):
        raise DataError(f"{path}: needs a header row with columns file_name,text; found {reader.fieldnames}")
    return {_norm(path.parent / r["file_name"]): (r["text"] or "").strip() for r in reader if r["file_name"]}


def _open_image(path: Path | str) -> Image.Image:
    """Image.open (which reads only the header) with MAX_IMAGE_PIXELS as the limit, not Pillow's."""
    # Pillow checks its process-wide limit inside open(); lift it for this call only, then check ours.
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    if img.width * img.height > MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(f"{img.width * img.height / 1e6:.3g} megapixels, over the limit of "
                        f"{MAX_IMAGE_PIXELS / 1e6:g} (set sdlora.training.data.MAX_IMAGE_PIXELS to raise it)")
    return img


def _probe_image(path: Path) -> tuple[int, int] | str:
    """(width, height) after EXIF orientation, or the reason the file cannot be used."""
    try:
        if not path.exists():  # exists() follows links, and os.walk listed the file, so it is a link
            return f"broken symlink or symlink loop (points to {os.readlink(path)})"
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with _open_image(path) as img:
            # verify() misses truncated files; a full load() decodes every byte and catches them.
            img.load()
            width, height = img.size
            # Orientations 5-8 swap the axes; reading the tag is cheaper than exif_transpose on a copy.
            if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
    except DataError as e:
        return str(e)
    except UnidentifiedImageError:  # Pillow goes by the content, so a misnamed image still opens
        return "not an image: its content is no format Pillow reads, whatever the extension says"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad data
        return f"unreadable image ({type(e).__name__}: {e})"
    return width, height


class _Walk(NamedTuple):
    """What walking a data folder finds before any image is opened."""

    image_paths: list[Path]
    jsonl: dict[str, tuple[str, Path]]  # normalised image path -> (caption, the metadata.jsonl giving it)
    table: dict[str, tuple[str, Path]]  # the same from captions.csv files
    skipped: list[tuple[Path, str]]
    notes: list[tuple[Path, str]]
    mask_files: int


def _check_folder(root: Path) -> None:
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"training data folder {root} {what}; pass the folder that holds your images")


def _walk(root: Path) -> _Walk:
    """The image files under `root` and the captions of its metadata.jsonl and captions.csv files."""
    image_paths: list[Path] = []
    jsonl: dict[str, tuple[str, Path]] = {}
    table: dict[str, tuple[str, Path]] = {}
    skipped: list[tuple[Path, str]] = []
    notes: list[tuple[Path, str]] = []
    mask_files = 0
    # Linked folders are followed (datasets are often assembled from links); each real folder is
    # scanned once, keyed by (device, inode), so a link to an ancestor cannot loop.
    top = root.stat()
    scanned = {(top.st_dev, top.st_ino): root}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        folder = Path(dirpath)
        # Hidden folders/files (.git, .ipynb_checkpoints, macOS "._x.png") are never training data.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in list(dirnames):
            stat = (folder / name).stat()
            if first := scanned.get((stat.st_dev, stat.st_ino)):
                skipped.append((folder / name, f"same folder as {first}, already scanned (a symlink loop or link)"))
                dirnames.remove(name)
            else:
                scanned[stat.st_dev, stat.st_ino] = folder / name
        # os.walk is top-down, so a deeper folder's file overrides a shallower one for the same image.
        if "metadata.jsonl" in filenames:
            source = folder / "metadata.jsonl"
            jsonl.update({key: (text, source) for key, text in _read_metadata_jsonl(source, notes).items()})
        if "captions.csv" in filenames:
            source = folder / "captions.csv"
            table.update({key: (text, source) for key, text in _read_captions_csv(source, notes).items()})
        found = [n for n in sorted(filenames) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        masks = [n for n in found if n.lower().endswith(MASK_SUFFIX)]
        mask_files += len(masks)
        image_paths += [folder / n for n in found if n not in masks]
    return _Walk(image_paths, jsonl, table, skipped, notes, mask_files)


def read_caption(path: Path, notes: list[tuple[Path, str]]) -> str:
    """A caption file's caption, its encoding noted in `notes` when it is not UTF-8."""
    # Whitespace (newlines included) is folded so a caption over several lines stays one prompt.
    return " ".join(_read_text(path, notes).split())


def caption_path(image: Path, caption_extension: str = ".txt") -> Path:
    """Where the caption file of `image` lies: NAME.txt beside NAME.png (or the extension given, dot or not)."""
    return image.with_suffix(caption_extension if caption_extension.startswith(".") else "." + caption_extension)


def _item(root: Path, path: Path, caption_extension: str, walk: _Walk) -> ImageItem | str:
    """The image at `path` as training uses it, or the reason it cannot be used."""
    size = _probe_image(path)
    if isinstance(size, str):
        return size
    repeats, concept = 1, None
    for part in path.parent.relative_to(root).parts:  # the deepest concept folder wins
        if match := CONCEPT_DIR.match(part):
            repeats, concept = int(match.group(1)), match.group(2).strip()
            if repeats < 1:
                raise DataError(f"folder {part!r} under {root} asks for 0 repeats; use at least 1 (1_{concept})")
    caption, source = "", None
    sidecar = caption_path(path, caption_extension)
    if sidecar.is_file():
        caption, source = read_caption(sidecar, walk.notes), sidecar
    if not caption:  # an empty sidecar falls through to the other sources
        for captions in (walk.jsonl, walk.table):
            text, listed_in = captions.get(_norm(path), ("", None))
            if text:
                caption, source = text, listed_in
                break
    if not caption:
        caption = concept or ""
    return ImageItem(path, caption, repeats, size[0], size[1], concept, caption_source=source)


def find_images(root: Path | str, caption_extension: str = ".txt") -> DatasetScan:
    """Walk `root` recursively for images, their captions and kohya-style `N_concept` repeats."""
    root = Path(root)
    _check_folder(root)
    walk = _walk(root)
    items: list[ImageItem] = []
    skipped = walk.skipped
    for path in walk.image_paths:
        item = _item(root, path, caption_extension, walk)
        if isinstance(item, str):
            skipped.append((path, item))
        else:
            items.append(item)
    if not items:
        bad = f"; unreadable: {', '.join(p.name for p, _ in skipped[:10])}" if skipped else ""
        raise DataError(f"no usable images in {root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}){bad}")
    missing = sum(not item.caption for item in items)
    return DatasetScan(items, skipped, missing, root, walk.notes, walk.mask_files)


def find_image(root: Path | str, path: Path | str, caption_extension: str = ".txt") -> ImageItem:
    """The one image `path` of the folder `root` as `find_images` would find it, without opening the others.

    `path` is root / its path in the folder, as `ImageItem.path` has it; a file `find_images` would not
    train on (not listed, or unreadable) is a DataError saying why.
    """
    root, path = Path(root), Path(path)
    _check_folder(root)
    walk = _walk(root)
    if path not in walk.image_paths:
        raise DataError(f"{shown_path(path, root)} is not an image of {root} that training would read (looked "
                        f"for {', '.join(IMAGE_EXTENSIONS)}, hidden files and {MASK_SUFFIX} masks left out)")
    item = _item(root, path, caption_extension, walk)
    if isinstance(item, str):
        raise DataError(f"{shown_path(path, root)} is skipped by training: {item}")
    return item


# --- Masks -------------------------------------------------------------------------------------

# Single-channel modes a mask file may have: 1-bit, 8-bit, and 16-bit (PNG opens as I;16 or I).
MASK_MODES = ("1", "L", "I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
MASK_HINT = "save it as a grayscale PNG (white: learnt, black: ignored, grey: in between)"


def mask_path(image: Path) -> Path:
    """Where the mask of `image` lies: NAME.mask.png beside NAME.png (or NAME.jpg, ...)."""
    return image.with_name(image.stem + MASK_SUFFIX)


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    return (height, width) if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def _mask_problem(item: ImageItem, path: Path, root: Path | None) -> str | None:
    """Why the mask file `path` cannot weigh `item`, or None. Reads the header, and the pixels of a colour file."""
    shown, image = shown_path(path, root), shown_path(item.path, root)
    try:
        with _open_image(path) as img:
            size = _oriented_size(img)
            if size != (item.width, item.height):
                rotated = " (it matches the image before its EXIF rotation: rotate the mask as the image is shown)" \
                    if size == (item.height, item.width) else ""
                return (f"mask {shown} is {size[0]}x{size[1]} but its image {image} is {item.width}x{item.height}: a "
                        f"mask must have its image's size{rotated}")
            if img.mode in MASK_MODES:
                return None
            # A grey mask saved as RGB (or a grey palette) is common and unambiguous; a coloured one is not.
            if img.mode in ("RGB", "P") and "transparency" not in img.info:
                rgb = np.asarray(img.convert("RGB"))
                if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
                    return None
                return f"mask {shown} has colour (mode {img.mode}, its channels differ): {MASK_HINT}"
            return f"mask {shown} has mode {img.mode}, not a single grey channel: {MASK_HINT}"
    except DataError as e:
        return f"mask {shown}: {e}"
    except Exception as e:  # PIL raises many types for bad data
        return f"mask {shown} is unreadable ({type(e).__name__}: {e}): {MASK_HINT}"


def _has_alpha(path: Path) -> bool:
    with _open_image(path) as img:  # the mode and the tRNS chunk are in the header
        return img.mode in ALPHA_MODES or "transparency" in img.info


def _listed(paths: list[Path], root: Path | None, most: int = 5) -> str:
    names = ", ".join(str(shown_path(path, root)) for path in paths[:most])
    return names + (f" and {len(paths) - most} more" if len(paths) > most else "")


def attach_masks(scan: DatasetScan, alpha: bool = False) -> DatasetScan:
    """The scan with every item's mask: NAME.mask.png beside it, or (alpha) its own alpha channel.

    Every image must have one: a missing mask, one of another size, or one that is not a single
    grey channel is a DataError naming the file. An all-white mask trains the whole image.
    """
    items, root = scan.items, scan.root
    if alpha:
        plain = [item.path for item in items if not _has_alpha(item.path)]
        if plain:
            raise DataError(f"{len(plain)} of {len(items)} images have no alpha channel for --alpha-mask: "
                            f"{_listed(plain, root)}. Save them with transparency (RGBA PNG), or give NAME.mask.png "
                            "files and use --masked-loss")
        masked = [dataclasses.replace(item, mask=item.path) for item in items]
    else:
        missing = [item.path for item in items if not mask_path(item.path).is_file()]
        if missing:
            raise DataError(f"{len(missing)} of {len(items)} images have no mask NAME{MASK_SUFFIX} "
                            f"beside them: {_listed(missing, root)}. Add one for each (an all-white mask trains "
                            "the whole image), or drop --masked-loss")
        problems = [problem for item in items if (problem := _mask_problem(item, mask_path(item.path), root))]
        if problems:
            more = f" (and {len(problems) - 1} more masks with problems)" if len(problems) > 1 else ""
            raise DataError(problems[0] + more)
        masked = [dataclasses.replace(item, mask=mask_path(item.path)) for item in items]
    return dataclasses.replace(scan, items=masked)


def load_mask(item: ImageItem) -> Image.Image:
    """An item's mask as a float image (mode F) in [0, 1], EXIF orientation applied as to its image."""
    with _open_image(item.mask) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
    if item.mask == item.path:  # the image's own alpha channel
        alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else img.convert("RGBA").getchannel("A")
        values = np.asarray(alpha, dtype=np.float32) / 255.0
    elif img.mode in ("1", "L"):
        values = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    elif img.mode.startswith("I"):  # 16-bit grey
        values = np.asarray(img, dtype=np.float32) / 65535.0
    else:  # grey stored as RGB or a palette, checked by attach_masks
        values = np.asarray(img.convert("RGB"), dtype=np.float32)[..., 0] / 255.0
    return Image.fromarray(np.clip(values, 0.0, 1.0))  # float32: mode F


# --- Loading -----------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: transparency composited on white, high bit depths scaled (not clipped)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert() clips these at 255, which turns a 16-bit photo almost white.
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0  # 65535 -> 255
        elif img.mode == "F" and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0  # float images are usually 0..1
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        # White, not black: most transparent training images are cut-outs meant to sit on a page.
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: Path | str) -> Image.Image:
    """Open an image as RGB with its EXIF orientation applied."""
    with _open_image(path) as img:
        img.load()
        img = ImageOps.exif_transpose(img)  # returns a new image, safe to use after close
    return to_rgb(img)


# --- Captions ----------------------------------------------------------------------------------


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DataError(f"{name} must be a probability between 0 and 1, got {value}")


def process_caption(
    caption: str,
    rng: random.Random,
    *,
    prefix: str = "",
    suffix: str = "",
    shuffle_tags: bool = False,
    keep_tokens: int = 0,
    caption_dropout: float = 0.0,
    tag_dropout: float = 0.0,
) -> str:
    """Apply tag shuffling/dropout, caption dropout and prefix/suffix to a comma-separated caption."""
    _check_probability("caption_dropout", caption_dropout)
    _check_probability("tag_dropout", tag_dropout)
    if keep_tokens < 0:
        raise DataError(f"keep_tokens must be 0 or more, got {keep_tokens}")
    # random() is in [0, 1), so a probability of 1 always fires and 0 never does.
    if caption_dropout > 0 and rng.random() < caption_dropout:
        return ""  # unconditional sample for classifier-free guidance: no trigger word either
    tags = [t.strip() for t in caption.split(",")]
    tags = [t for t in tags if t]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle_tags:
        rng.shuffle(rest)
    if tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= tag_dropout]
    parts = [prefix.strip(), ", ".join(kept + rest), suffix.strip()]
    return ", ".join(p for p in parts if p)


@dataclass(frozen=True)
class CaptionOptions:
    """Caption processing settings for `ImageCaptionDataset` (see `process_caption`)."""

    prefix: str = ""
    suffix: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0

    def __post_init__(self) -> None:
        process_caption("", random.Random(0), **self.__dict__)  # same validation, fails early


# --- Aspect-ratio buckets ----------------------------------------------------------------------


def bucket_defaults(resolution: int) -> tuple[int, int, int]:
    """Default (min_side, max_side, step) for a resolution: step 64 from 256 px up, else 8."""
    step = 64 if resolution >= 256 else 8
    return max(step, resolution // 2 // step * step), resolution * 2, step


def make_buckets(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int | None = None
) -> list[tuple[int, int]]:
    """Kohya-style (width, height) buckets with area <= resolution**2, sides multiples of `step`.

    Rule: for each width w in min_side..max_side by step, h = the largest multiple of step with
    w*h <= resolution**2, capped at max_side; keep (w, h) and (h, w) if h >= min_side; add the
    square (resolution, resolution). Defaults (see `bucket_defaults`): step = 64 for resolution >= 256
    else 8, min_side = resolution/2 rounded down to step, max_side = 2 * resolution.
    """
    d_min, d_max, d_step = bucket_defaults(resolution)
    min_side, max_side, step = min_side or d_min, max_side or d_max, step or d_step
    for name, value in (("resolution", resolution), ("min_side", min_side), ("max_side", max_side)):
        if value <= 0 or value % step:
            raise DataError(f"{name}={value} must be a positive multiple of the bucket step {step}")
    if not min_side <= resolution <= max_side:
        raise DataError(f"need min_side <= resolution <= max_side, got {min_side}, {resolution}, {max_side}")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def assign_bucket(
    width: int, height: int, buckets: Sequence[tuple[int, int]], allow_upscale: bool = True
) -> tuple[int, int]:
    """The bucket closest in log aspect ratio to width/height; ties go to the larger area.

    Without `allow_upscale`, only buckets that fit inside the image are candidates; if none does
    (always the case for images smaller in area than the buckets) the image is upscaled anyway.
    The choice is made here, not at crop time, because batches need the final size up front.
    """
    candidates = list(buckets)
    if not allow_upscale:
        candidates = [b for b in buckets if b[0] <= width and b[1] <= height] or candidates
    if not candidates:
        raise DataError("assign_bucket got an empty bucket list; build one with make_buckets")
    aspect = math.log(width / height)
    # Rounding turns float noise into exact ties, so the larger-area rule really decides them.
    return min(candidates, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 9), -b[0] * b[1]))


class Cropped(NamedTuple):
    """Result of `resize_and_crop`; sizes and offsets are (row, column) order, as SDXL conditioning wants."""

    image: Image.Image
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    original_size: tuple[int, int]  # (height, width) before resizing


def crop_box(size: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None = None,
             random_crop: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) to resize to, (top, left) of the crop) that make an image of `size` fill `bucket`.

    A pure function of its arguments, so an image's crop is known without opening it (SDXL's size
    conditioning of cached latents needs it).
    """
    (bw, bh), (w, h) = bucket, size
    scale = max(bw / w, bh / h)
    # max() guards against rounding a covering size down by one pixel.
    new_w, new_h = max(bw, round(w * scale)), max(bh, round(h * scale))
    if random_crop:
        if rng is None:
            raise DataError("random_crop=True needs an rng so the crop is reproducible")
        return (new_w, new_h), (rng.randint(0, new_h - bh), rng.randint(0, new_w - bw))
    return (new_w, new_h), ((new_h - bh) // 2, (new_w - bw) // 2)


def resize_and_crop(
    img: Image.Image, bucket: tuple[int, int], rng: random.Random | None = None, random_crop: bool = False
) -> Cropped:
    """Scale `img` to cover `bucket` (keeping aspect), then crop centre or at random to exactly the bucket."""
    (bw, bh), (w, h) = bucket, img.size
    (new_w, new_h), (top, left) = crop_box(img.size, bucket, rng, random_crop)
    if (new_w, new_h) != (w, h):
        # reducing_gap: shrink big photos by an integer factor first; much faster, same look.
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return Cropped(img.crop((left, top, left + bw, top + bh)), (top, left), (h, w))


def bucket_counts(assignments: Iterable[tuple[int, int]]) -> list[tuple[tuple[int, int], int]]:
    """((width, height), how many) for each bucket used; tall buckets first, wide ones last."""
    return sorted(Counter(assignments).items(), key=lambda kv: (kv[0][0] / kv[0][1], kv[0]))


def bucket_histogram(assignments: Iterable[tuple[int, int]]) -> str:
    """One line per bucket, `WxH: count` then a bar; tall buckets first, wide ones last."""
    rows = bucket_counts(assignments)
    if not rows:
        return "(no images)"
    most = max(n for _, n in rows)
    return "\n".join(f"{w}x{h}: {n} {'#' * max(1, round(40 * n / most))}" for (w, h), n in rows)


# --- Torch dataset and sampler -----------------------------------------------------------------


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Bucketed, augmented image/caption samples; item i appears `repeats` times per epoch."""

    def __init__(
        self,
        scan: DatasetScan,
        resolution: int,
        *,
        min_side: int | None = None,
        max_side: int | None = None,
        step: int | None = None,
        allow_upscale: bool = False,
        flip_prob: float = 0.0,
        random_crop: bool = False,
        caption_options: CaptionOptions | None = None,
        seed: int = 0,
    ) -> None:
        _check_probability("flip_prob", flip_prob)
        self.items = list(scan.items)
        self.has_masks = any(item.mask is not None for item in self.items)  # see attach_masks
        self.buckets = make_buckets(resolution, min_side, max_side, step)
        self.flip_prob, self.random_crop, self.seed = flip_prob, random_crop, seed
        self.caption_options = caption_options or CaptionOptions()
        item_buckets = [assign_bucket(it.width, it.height, self.buckets, allow_upscale) for it in self.items]
        # Dataset index -> item index, each item's repeats laid out consecutively.
        self.item_of: list[int] = [i for i, it in enumerate(self.items) for _ in range(it.repeats)]
        self.sample_buckets: list[tuple[int, int]] = [item_buckets[i] for i in self.item_of]

    def __len__(self) -> int:
        return len(self.item_of)

    def _rng(self, index: int, purpose: str, epoch: int) -> random.Random:
        # String seeds are hashed with SHA-512, so this is stable across processes and Python runs.
        # Separate streams keep captions identical whether or not flips/crops are enabled.
        return random.Random(f"{self.seed}:{epoch}:{index}:{purpose}")

    def caption(self, index: int, epoch: int = 0) -> str:
        """The processed caption of sample `index` in an epoch."""
        item = self.items[self.item_of[index]]
        return process_caption(item.caption, self._rng(index, "caption", epoch), **self.caption_options.__dict__)

    def flipped(self, index: int, epoch: int = 0) -> bool:
        """Whether sample `index` is mirrored in an epoch; known without loading the image."""
        return self.flip_prob > 0 and self._rng(index, "flip", epoch).random() < self.flip_prob

    def geometry(self, index: int, epoch: int = 0) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(original size, crop top-left, bucket size) of sample `index`, each (height, width): SDXL's size
        conditioning, known without loading the image."""
        item, bucket = self.items[self.item_of[index]], self.sample_buckets[index]
        _, top_left = crop_box((item.width, item.height), bucket, self._rng(index, "crop", epoch), self.random_crop)
        return (item.height, item.width), top_left, (bucket[1], bucket[0])

    def upscaled(self, factor: float = 2.0) -> int:
        """How many images are enlarged more than `factor` times to fill their bucket."""
        return sum(max(bw / item.width, bh / item.height) > factor
                   for item, (bw, bh) in zip((self.items[i] for i in self.item_of), self.sample_buckets))

    def item_pixels(self, item_index: int, bucket: tuple[int, int], flipped: bool,
                    rng: random.Random | None = None) -> tuple[torch.Tensor, Cropped]:
        """One image cropped to its bucket, maybe mirrored, as a [3, H, W] tensor in [-1, 1]."""
        item = self.items[item_index]
        try:
            img = load_image(item.path)
        except Exception as e:
            raise DataError(f"could not load {item.path} ({e}); it was readable at start-up, was it changed?") from e
        cropped = resize_and_crop(img, bucket, rng, self.random_crop)
        out = ImageOps.mirror(cropped.image) if flipped else cropped.image
        pixels = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1.0
        return pixels, cropped

    def item_mask(self, item_index: int, bucket: tuple[int, int], flipped: bool,
                  crop_top_left: tuple[int, int]) -> torch.Tensor:
        """An item's mask through its image's geometry (resized to cover `bucket`, cut at `crop_top_left`,
        maybe mirrored), as a [1, H, W] weight in [0, 1]."""
        item = self.items[item_index]
        try:
            mask = load_mask(item)
        except Exception as e:
            raise DataError(f"could not load the mask {item.mask} ({e}); it was readable at start-up, was it "
                            "changed?") from e
        (bw, bh), (top, left) = bucket, crop_top_left
        (new_w, new_h), _ = crop_box(mask.size, bucket)  # the image's own size: attach_masks checked it
        if (new_w, new_h) != mask.size:
            # BOX averages the pixels each output pixel covers: a weight stays a weighted mean, in [0, 1].
            mask = mask.resize((new_w, new_h), Image.Resampling.BOX)
        mask = mask.crop((left, top, left + bw, top + bh))
        if flipped:
            mask = ImageOps.mirror(mask)
        return torch.from_numpy(np.array(mask, dtype=np.float32))[None].clamp(0.0, 1.0)

    def mask(self, index: int, epoch: int = 0) -> torch.Tensor:
        """The mask of sample `index` in an epoch, aligned with its `pixel_values`; [1, H, W] in [0, 1].

        Its crop and flip come from `geometry` and `flipped`, the same pure functions of (seed, epoch,
        index) that crop and flip the image, so the mask is found without loading the image.
        """
        _, crop_top_left, _ = self.geometry(index, epoch)
        return self.item_mask(self.item_of[index], self.sample_buckets[index], self.flipped(index, epoch),
                              crop_top_left)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        """A sample by (epoch, index): the epoch travels with the key, so prefetching workers never guess."""
        epoch, index = key
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        bucket = self.sample_buckets[index]
        flipped = self.flipped(index, epoch)
        pixels, cropped = self.item_pixels(self.item_of[index], bucket, flipped, self._rng(index, "crop", epoch))
        return {
            "pixel_values": pixels,
            "caption": self.caption(index, epoch),
            "index": index,
            "bucket": bucket,
            "original_size": cropped.original_size,
            "crop_top_left": cropped.crop_top_left,
            "flipped": flipped,
        }


def upscale_warning(dataset: ImageCaptionDataset, resolution: int) -> str:
    """A message when most images are enlarged more than 2x to fill their buckets, or "" if not."""
    upscaled = dataset.upscaled(2.0)
    if upscaled <= len(dataset) / 2:
        return ""
    return (f"{upscaled} of {len(dataset)} images are enlarged more than 2x to fill their buckets at {resolution} px: "
            "training learns their blur, and each step costs more. Give larger images, or a lower --resolution")


def truncated_captions(dataset: ImageCaptionDataset, tokenizer, root: Path | None = None, most: int = 10,
                       windows: int = 1) -> str:
    """One message naming the images whose caption the text encoder will cut, or "" if none.

    Each image's caption is the one its first sample gets in epoch 0, as the dataset builds it
    (prefix, suffix, shuffling); the tokenizer's `model_max_length` counts the start and end tokens,
    and `windows` of it are read (A1111's long prompts: each window holds model_max_length - 2 words).
    """
    first_sample: dict[int, int] = {}
    for index, item in enumerate(dataset.item_of):
        first_sample.setdefault(item, index)
    captions = [dataset.caption(index, 0) for index in first_sample.values()]
    # verbose=False: the tokenizer would otherwise log a warning of its own that names no file.
    lengths = [len(ids) for ids in tokenizer(captions, verbose=False).input_ids]
    window = windows * (tokenizer.model_max_length - 2) + 2
    cut = [(dataset.items[item].path, n - window) for item, n in zip(first_sample, lengths) if n > window]
    if not cut:
        return ""
    names = ", ".join(f"{shown_path(path, root)} ({extra} tokens)" for path, extra in cut[:most])
    more = f" and {len(cut) - most} more" if len(cut) > most else ""
    return (f"{len(cut)} of {len(captions)} captions are longer than the text encoder's {window} tokens and will "
            f"be cut at the end, by up to {max(extra for _, extra in cut)} tokens: {names}{more}. Shorten them, "
            "or read longer captions with --max-token-length 150 or 225.")


class BucketBatchSampler:
    """Batches of dataset indices, each from one bucket, in an order fixed by (seed, epoch).

    `batches(epoch)` is a pure function, so a resumed run finds its place by (epoch, position)
    alone (see `training.steps.batch_keys`).
    """

    def __init__(
        self,
        sample_buckets: Sequence[tuple[int, int]],
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.sample_buckets = list(sample_buckets)
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of `epoch`, in order; a pure function of (seed, epoch) and the buckets."""
        rng = random.Random(f"{self.seed}:{epoch}:batches")
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.sample_buckets):
            groups[bucket].append(index)
        batches = []
        for bucket in sorted(groups):  # sorted: dict order must not depend on anything but the data
            indices = groups[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack `pixel_values` into [B, 3, H, W] and gather the other fields into lists."""
    shapes = {tuple(sample["pixel_values"].shape) for sample in batch}
    if len(shapes) > 1:
        raise DataError(f"a batch mixes image sizes {sorted(shapes)}; use BucketBatchSampler or batch_size=1")
    return {
        "pixel_values": torch.stack([sample["pixel_values"] for sample in batch]),
        "captions": [sample["caption"] for sample in batch],
        "indices": [sample["index"] for sample in batch],
        "buckets": [sample["bucket"] for sample in batch],
        "original_sizes": [sample["original_size"] for sample in batch],
        "crop_top_lefts": [sample["crop_top_left"] for sample in batch],
    }
