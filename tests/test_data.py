"""Tests for sdlora.training.data: discovery, image loading, captions, buckets, dataset and sampler."""

from __future__ import annotations

import codecs
import io
import json
import math
import random
import struct
import unicodedata
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlora.training.data import (
    BucketBatchSampler,
    CaptionOptions,
    DataError,
    DatasetScan,
    ImageCaptionDataset,
    ImageItem,
    assign_bucket,
    bucket_histogram,
    collate,
    find_images,
    load_image,
    make_buckets,
    process_caption,
    resize_and_crop,
    truncated_captions,
)


def save(path: Path, size=(48, 32), color=(200, 30, 30), mode="RGB", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return path


def halves(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: makes flips, crops and rotations visible."""
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 0, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


def noisy_image_bytes(fmt: str, size=(64, 64)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def captioned_tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    save(root / "a.png")
    (root / "a.txt").write_text("cat, sitting\n")
    save(root / "b.jpg")
    save(root / "G.PNG", size=(32, 64))
    (root / "notes.md").write_text("not an image")
    save(root / "sub" / "c.webp")
    save(root / "sub" / "only_csv.png")
    save(root / "sub" / "deep" / "d.bmp")
    save(root / "3_mystyle" / "e.png")
    save(root / "3_mystyle" / "f.png")
    (root / "3_mystyle" / "f.txt").write_text("own caption")
    rows = [
        {"file_name": "a.png", "text": "WRONG: the .txt beside the image wins"},
        {"file_name": "b.jpg", "text": "dog"},
        {"file_name": "sub/c.webp", "text": "bird from jsonl"},
    ]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "sub" / "captions.csv").write_text(
        'file_name,text\nc.webp,"bird from csv, loses to jsonl"\nonly_csv.png,"fish, blue"\n'
    )
    return root


def test_find_images_captions_repeats_and_concepts(captioned_tree: Path):
    scan = find_images(captioned_tree)
    by_name = {item.path.name: item for item in scan.items}
    assert set(by_name) == {"a.png", "b.jpg", "G.PNG", "c.webp", "only_csv.png", "d.bmp", "e.png", "f.png"}
    assert by_name["a.png"].caption == "cat, sitting"
    assert by_name["b.jpg"].caption == "dog"
    assert by_name["c.webp"].caption == "bird from jsonl"
    assert by_name["only_csv.png"].caption == "fish, blue"
    assert by_name["d.bmp"].caption == "" and by_name["G.PNG"].caption == ""
    assert (by_name["e.png"].caption, by_name["e.png"].repeats, by_name["e.png"].concept) == ("mystyle", 3, "mystyle")
    assert (by_name["f.png"].caption, by_name["f.png"].repeats) == ("own caption", 3)
    assert by_name["a.png"].repeats == 1 and by_name["a.png"].concept is None
    assert (by_name["G.PNG"].width, by_name["G.PNG"].height) == (32, 64)
    assert scan.missing_captions == 2 and scan.skipped == []
    assert find_images(captioned_tree).items == scan.items  # deterministic order
    assert "Found 8 images" in scan.summary() and "12 samples" in scan.summary()


def test_broken_files_are_skipped_and_named(tmp_path: Path):
    save(tmp_path / "good.png")
    (tmp_path / "random.png").write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    for name, fmt in (("truncated.png", "PNG"), ("truncated.jpg", "JPEG")):
        data = noisy_image_bytes(fmt)
        (tmp_path / name).write_bytes(data[: len(data) // 2])  # the header still opens fine
    (tmp_path / "empty.jpg").write_bytes(b"")
    scan = find_images(tmp_path)
    assert [item.path.name for item in scan.items] == ["good.png"]
    broken = ["empty.jpg", "random.png", "truncated.jpg", "truncated.png"]
    assert sorted(p.name for p, _ in scan.skipped) == broken
    summary = scan.summary()
    for name in broken:
        assert name in summary
    assert dict((p.name, r) for p, r in scan.skipped)["empty.jpg"] == "empty file (0 bytes)"
    assert dict((p.name, r) for p, r in scan.skipped)["random.png"] == NOT_AN_IMAGE


def test_no_usable_images_raise_data_error_naming_the_folder(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        find_images(empty)
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as info:
        find_images(missing)
    assert str(missing) in str(info.value)
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="x.png"):
        find_images(only_bad)
    with pytest.raises(DataError, match="not a folder"):
        find_images(save(tmp_path / "file.png"))


def test_malformed_metadata_names_file_and_line(tmp_path: Path):
    save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"metadata.jsonl, line 2"):
        find_images(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad files: each is skipped or used as stated and named once, and nothing stops the scan
# ---------------------------------------------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixels: a decompression bomb's header, in 45 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def reasons(scan) -> dict[str, str]:
    return {p.relative_to(scan.root).as_posix(): reason for p, reason in scan.skipped + scan.notes}


OVER_LIMIT = "400 megapixels, over the limit of 200 (set sdlora.training.data.MAX_IMAGE_PIXELS to raise it)"
NOT_AN_IMAGE = "not an image: its content is no format Pillow reads, whatever the extension says"


def test_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path: Path, monkeypatch):
    save(tmp_path / "good.png")
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 2.2x Pillow's own refusal limit
    pillow_limit = Image.MAX_IMAGE_PIXELS
    scan = find_images(tmp_path)
    assert [item.path.name for item in scan.items] == ["good.png"]
    assert reasons(scan) == {"bomb.png": OVER_LIMIT}
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # lifted for our check only, never left changed
    with pytest.raises(DataError, match="400 megapixels"):
        load_image(tmp_path / "bomb.png")
    # Our constant decides, not Pillow's limit: raised, the header passes and the missing pixels show.
    monkeypatch.setattr("sdlora.training.data.MAX_IMAGE_PIXELS", 500_000_000)
    assert reasons(find_images(tmp_path))["bomb.png"].startswith("unreadable image (OSError")


def test_the_content_decides_not_the_extension(tmp_path: Path):
    (tmp_path / "jpeg_named.png").write_bytes(noisy_image_bytes("JPEG", (40, 24)))
    (tmp_path / "png_named.jpg").write_bytes(noisy_image_bytes("PNG", (24, 40)))
    (tmp_path / "text_named.png").write_text("these are notes, not pixels\n")
    scan = find_images(tmp_path)
    assert {item.path.name: (item.width, item.height) for item in scan.items} == {
        "jpeg_named.png": (40, 24), "png_named.jpg": (24, 40)}
    assert reasons(scan) == {"text_named.png": NOT_AN_IMAGE}
    assert load_image(tmp_path / "jpeg_named.png").size == (40, 24)


def test_symlink_loops_and_broken_links_end_the_scan_and_are_named_once(tmp_path: Path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    save(root / "good.png")
    save(root / "sub" / "deep.png")
    save(outside / "linked.png")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)  # a loop to an ancestor
    (root / "2_linked").symlink_to(outside, target_is_directory=True)  # a linked-in folder is followed
    (root / "self.png").symlink_to("self.png")
    (root / "gone.png").symlink_to("missing.png")
    scan = find_images(root)
    assert sorted(item.path.relative_to(root).as_posix() for item in scan.items) == [
        "2_linked/linked.png", "good.png", "sub/deep.png"]
    assert reasons(scan) == {
        "sub/up": f"same folder as {root}, already scanned (a symlink loop or link)",
        "self.png": "broken symlink or symlink loop (points to self.png)",
        "gone.png": "broken symlink or symlink loop (points to missing.png)",
    }


def test_unicode_file_names_keep_their_captions(tmp_path: Path):
    name = "café_ñ_日本"
    save(tmp_path / f"{name}.png")
    (tmp_path / f"{name}.txt").write_text("ein Café in Tōkyō", encoding="utf-8")
    save(tmp_path / "ü_json.png")
    # macOS stores names decomposed (e + combining accent); a caption file typed elsewhere is composed.
    save(tmp_path / unicodedata.normalize("NFD", "é_decomposed.png"))
    save(tmp_path / "sub" / "日本_csv.png")
    rows = [{"file_name": "ü_json.png", "text": "über"}, {"file_name": "é_decomposed.png", "text": "accent"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows),
                                             encoding="utf-8")
    (tmp_path / "sub" / "captions.csv").write_text("file_name,text\n日本_csv.png,東京\n", encoding="utf-8")
    scan = find_images(tmp_path)
    captions = {unicodedata.normalize("NFC", item.path.name): item.caption for item in scan.items}
    assert captions == {f"{name}.png": "ein Café in Tōkyō", "ü_json.png": "über", "é_decomposed.png": "accent",
                        "日本_csv.png": "東京"}
    assert scan.skipped == [] and scan.notes == [] and scan.missing_captions == 0


def write_odd_captions(folder: Path) -> dict[str, tuple[str, str | None]]:
    """Captions in encodings other than UTF-8, beside their images: name -> (caption read, note)."""
    odd = {
        "latin1": ("Café crème".encode("latin-1"), "Café crème", "cp1252"),
        "cp1252": ("“quoted” – dash".encode("cp1252"), "“quoted” – dash", "cp1252"),
        "undefined": (b"bytes \x81\x8d", "bytes \x81\x8d", "latin-1"),  # no cp1252 character for these
        "utf16": ("naïve 日本".encode("utf-16"), "naïve 日本", "utf-16"),  # with its BOM
        "utf8bom": (codecs.BOM_UTF8 + "déjà vu".encode(), "déjà vu", None),  # UTF-8 all the same
    }
    for name, (raw, _, _) in odd.items():
        save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_bytes(raw)
    return {name: (text, encoding and f"caption not UTF-8, read as {encoding}") for name, (_, text, encoding) in
            odd.items()}


def test_captions_not_in_utf8_are_read_and_named_once(tmp_path: Path):
    expected = write_odd_captions(tmp_path)
    save(tmp_path / "excel.png")
    (tmp_path / "captions.csv").write_bytes("file_name,text\nexcel.png,façade\n".encode("cp1252"))
    scan = find_images(tmp_path)
    assert {item.path.stem: item.caption for item in scan.items} == {
        **{name: text for name, (text, _) in expected.items()}, "excel": "façade"}
    assert reasons(scan) == {"captions.csv": "caption not UTF-8, read as cp1252",
                             **{f"{name}.txt": note for name, (_, note) in expected.items() if note}}


def test_captions_longer_than_the_text_encoder_window_are_named_in_one_message(tiny_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "tokenizer")
    root = Path("/data")  # the message needs sizes and captions only, no pixels
    captions = {f"long{i:02}.png": "a, red, cat, " * (10 + i) for i in range(12)}
    captions["short.png"] = "a cat"
    items = [ImageItem(root / name, caption, 3, 32, 32) for name, caption in captions.items()]
    options = CaptionOptions(prefix="trigger", shuffle_tags=True, keep_tokens=1)
    dataset = ImageCaptionDataset(DatasetScan(items, root=root), 32, caption_options=options, seed=1)
    # Each image counts once (3 repeats), with the caption its first sample gets in epoch 0.
    over = {name: len(tokenizer(dataset.caption(3 * i, 0)).input_ids) - 77 for i, name in enumerate(captions)}
    assert over["short.png"] < 0 and all(over[f"long{i:02}.png"] > 0 for i in range(12))
    named = ", ".join(f"long{i:02}.png ({over[f'long{i:02}.png']} tokens)" for i in range(10))
    assert truncated_captions(dataset, tokenizer, root) == (
        f"12 of 13 captions are longer than the text encoder's 77 tokens and will be cut at the end, by up to "
        f"{over['long11.png']} tokens: {named} and 2 more. Shorten them, or read longer captions with "
        "--max-token-length 150 or 225.")
    items = [ImageItem(root / "short.png", "a cat", 1, 32, 32)]
    assert truncated_captions(ImageCaptionDataset(DatasetScan(items), 32), tokenizer) == ""


def test_a_folder_of_every_kind_of_bad_file_still_trains(tiny_dir, tmp_path: Path, capsys):
    from sdlora.training.config import TrainConfig
    from sdlora.training.loop import train

    root = tmp_path / "data"
    for i in range(3):
        save(root / f"good{i}.png", color=(60 * i, 90, 200))
        (root / f"good{i}.txt").write_text("a, blue, square, " * (30 if i == 0 else 1))
    expected = write_odd_captions(root)
    (root / "jpeg_named.png").write_bytes(noisy_image_bytes("JPEG", (40, 24)))
    (root / "png_named.jpg").write_bytes(noisy_image_bytes("PNG", (24, 40)))
    save(root / "日本_café.png")
    (root / "日本_café.txt").write_text("東京", encoding="utf-8")
    (root / "bomb.png").write_bytes(png_header(20_000, 20_000))
    (root / "empty.png").write_bytes(b"")
    (root / "text_named.png").write_text("notes")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "self.png").symlink_to("self.png")
    (root / "gone.jpg").symlink_to("missing.jpg")

    scan = find_images(root)
    good = {"good0", "good1", "good2", *expected, "jpeg_named", "png_named", "日本_café"}
    assert {item.path.stem for item in scan.items} == good
    bad = {"bomb.png": OVER_LIMIT, "empty.png": "empty file (0 bytes)", "text_named.png": NOT_AN_IMAGE,
           "loop": f"same folder as {root}, already scanned (a symlink loop or link)",
           "self.png": "broken symlink or symlink loop (points to self.png)",
           "gone.jpg": "broken symlink or symlink loop (points to missing.jpg)",
           **{f"{name}.txt": note for name, (_, note) in expected.items() if note}}
    assert reasons(scan) == bad
    summary = scan.summary()
    assert all(summary.count(f"  {name}: ") == 1 for name in bad), summary

    out = tmp_path / "out"
    config = TrainConfig(model=str(tiny_dir), data=str(root), output_dir=str(out), resolution=16, batch_size=2,
                         max_steps=2, rank=4, seed=0, save_dtype="fp32", cache_latents=False)
    assert train(config).is_file()
    printed = capsys.readouterr().out
    assert printed.count("captions are longer than the text encoder's 77 tokens") == 1
    assert "good0.png" in printed and summary in printed


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_image_alpha_modes_composite_on_white(tmp_path: Path):
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((1, 1), (10, 20, 30, 255))
    save_to = tmp_path / "rgba.png"
    rgba.save(save_to)
    out = load_image(save_to)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 1)) == (10, 20, 30)

    la = Image.new("LA", (4, 4), (0, 0))
    la.putpixel((2, 2), (0, 255))
    la.save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((2, 2)) == (0, 0, 0)

    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((3, 3), 1)
    pal.save(tmp_path / "p.png", transparency=0)
    out = load_image(tmp_path / "p.png")
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((3, 3)) == (0, 255, 0)


def test_load_image_grayscale_and_cmyk(tmp_path: Path):
    save(tmp_path / "l.png", mode="L", color=77)
    assert load_image(tmp_path / "l.png").getpixel((0, 0)) == (77, 77, 77)
    save(tmp_path / "cmyk.jpg", mode="CMYK", color=(0, 255, 0, 0))  # magenta ink
    r, g, b = load_image(tmp_path / "cmyk.jpg").getpixel((5, 5))
    assert r > 200 and g < 60 and b > 200


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path: Path):
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # really a high-bit-depth file
    row = np.asarray(load_image(tmp_path / "g16.png"))[0, :, 0].astype(int)
    assert row[0] <= 1 and row[-1] >= 254
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 200  # ordered, not clipped to a few values


def test_exif_orientation_6_rotates(tmp_path: Path):
    exif = Image.Exif()
    exif[0x0112] = 6
    halves((20, 10)).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (10, 20)
    # Orientation 6 means "rotate 90 degrees clockwise to display": the stored left (red) goes on top.
    top, bottom = out.getpixel((5, 2)), out.getpixel((5, 17))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    item = find_images(tmp_path).items[0]
    assert (item.width, item.height) == (10, 20)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

CAPTION = "sks person,  red hat , smiling, outdoors, sunny, portrait"
TAGS = ["sks person", "red hat", "smiling", "outdoors", "sunny", "portrait"]


def test_shuffle_keeps_tokens_and_is_a_permutation():
    outputs = set()
    for seed in range(20):
        out = process_caption(CAPTION, random.Random(seed), shuffle_tags=True, keep_tokens=2).split(", ")
        assert out[:2] == TAGS[:2] and sorted(out) == sorted(TAGS)
        outputs.add(tuple(out))
    assert len(outputs) > 1  # some seed really changes the order
    assert process_caption(CAPTION, random.Random(0)) == ", ".join(TAGS)  # no options: only whitespace tidied


def test_dropouts_prefix_suffix_and_determinism():
    rng = random.Random(0)
    assert process_caption(CAPTION, rng, caption_dropout=1.0, prefix="trig", suffix="end") == ""
    assert process_caption(CAPTION, rng, tag_dropout=1.0, keep_tokens=1) == "sks person"
    assert process_caption(CAPTION, rng, tag_dropout=1.0, keep_tokens=1, prefix="trig") == "trig, sks person"
    assert process_caption("a, b", rng, prefix="trig", suffix="best quality") == "trig, a, b, best quality"
    assert process_caption("", rng, prefix="trig") == "trig"
    outs = [process_caption(CAPTION, random.Random(s), tag_dropout=0.5) for s in range(300)]
    kept = [len([t for t in out.split(", ") if t]) for out in outs]
    assert 0.4 < sum(kept) / (300 * len(TAGS)) < 0.6  # about half the tags survive
    options = dict(shuffle_tags=True, keep_tokens=1, caption_dropout=0.3, tag_dropout=0.3, prefix="p")
    for seed in range(10):
        assert process_caption(CAPTION, random.Random(seed), **options) == process_caption(
            CAPTION, random.Random(seed), **options
        )


@pytest.mark.parametrize("bad", [dict(caption_dropout=1.5), dict(tag_dropout=-0.1), dict(keep_tokens=-1)])
def test_caption_options_are_validated(bad):
    with pytest.raises(DataError):
        process_caption("a", random.Random(0), **bad)
    with pytest.raises(DataError):
        CaptionOptions(**bad)


# ---------------------------------------------------------------------------------------------
# Buckets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution,step,lo,hi", [(512, 64, 256, 1024), (64, 8, 32, 128), (40, 8, 16, 80)])
def test_make_buckets_rules(resolution, step, lo, hi):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets and len(buckets) > 4
    assert buckets == sorted(set(buckets))
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert lo <= w <= hi and lo <= h <= hi
        assert w * h <= resolution * resolution
        assert (h, w) in buckets
        # as large as possible: one more step on one side (the one the rule solved for) breaks a limit
        def maximal(a, b):
            return a * (b + step) > resolution * resolution or b + step > hi

        assert maximal(w, h) or maximal(h, w)


def test_make_buckets_rejects_bad_settings():
    with pytest.raises(DataError, match="multiple"):
        make_buckets(100, step=64)
    with pytest.raises(DataError):
        make_buckets(512, min_side=640)


def test_assign_bucket_prefers_matching_aspect():
    buckets = make_buckets(512)
    for w, h in buckets:
        bw, bh = assign_bucket(w * 3, h * 3, buckets)
        assert math.isclose(bw / bh, w / h) and bw * bh >= w * h
    bw, bh = assign_bucket(2000, 1000, buckets)
    assert bw > bh
    assert assign_bucket(700, 700, buckets) == (512, 512)


def test_no_upscaling_unless_allowed():
    buckets = make_buckets(512)
    assert assign_bucket(1010, 256, buckets) == (1024, 256)  # closest aspect, but wider than the image
    bucket = assign_bucket(1010, 256, buckets, allow_upscale=False)
    assert bucket[0] <= 1010 and bucket[1] <= 256 and bucket == (960, 256)
    img = Image.new("RGB", (1010, 256))
    cropped = resize_and_crop(img, bucket, random.Random(0))
    assert cropped.image.size == bucket
    # Fallback: nothing fits inside a tiny image, so it is upscaled to the nearest-aspect bucket anyway.
    assert assign_bucket(10, 10, buckets, allow_upscale=False) == (512, 512)


def test_resize_and_crop_center_and_random():
    img = halves((100, 50))
    cropped = resize_and_crop(img, (40, 40))
    assert cropped.image.size == (40, 40)
    assert cropped.crop_top_left == (0, 20) and cropped.original_size == (50, 100)
    assert cropped.image.getpixel((19, 20))[0] > 200 and cropped.image.getpixel((20, 20))[2] > 200  # centred
    offsets = {resize_and_crop(img, (40, 40), random.Random(s), random_crop=True).crop_top_left for s in range(20)}
    assert len(offsets) > 3 and all(top == 0 and 0 <= left <= 40 for top, left in offsets)
    again = [resize_and_crop(img, (40, 40), random.Random(5), random_crop=True) for _ in range(2)]
    assert again[0].crop_top_left == again[1].crop_top_left and again[0].image.tobytes() == again[1].image.tobytes()


def test_bucket_histogram():
    text = bucket_histogram([(64, 32), (32, 32), (64, 32)])
    assert text.splitlines()[0].startswith("32x32: 1") and text.splitlines()[1].startswith("64x32: 2")


# ---------------------------------------------------------------------------------------------
# Dataset and sampler
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def scan(tmp_path: Path):
    sizes = [(64, 64), (96, 48), (48, 96), (80, 80), (120, 60), (40, 80), (70, 70)]
    for i, size in enumerate(sizes):
        folder = tmp_path / ("2_thing" if i % 3 == 0 else "plain")
        folder.mkdir(exist_ok=True)
        halves(size).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"tag{i}, red, blue, green, yellow")
    return find_images(tmp_path)


def make_dataset(scan, **kwargs) -> ImageCaptionDataset:
    options = CaptionOptions(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2, prefix="trig")
    defaults = dict(flip_prob=0.5, random_crop=True, caption_options=options, seed=7)
    return ImageCaptionDataset(scan, 32, **{**defaults, **kwargs})


def test_dataset_samples(scan):
    ds = make_dataset(scan)
    assert len(ds) == sum(item.repeats for item in scan.items) == 10
    for index in range(len(ds)):
        sample = ds[(0, index)]
        w, h = sample["bucket"]
        assert sample["pixel_values"].shape == (3, h, w) and sample["pixel_values"].dtype == torch.float32
        assert sample["pixel_values"].min() >= -1 and sample["pixel_values"].max() <= 1
        assert sample["pixel_values"].min() < -0.9 and sample["pixel_values"].max() > 0.9  # full range used
        assert sample["caption"].startswith("trig, tag") and sample["index"] == index
    with pytest.raises(IndexError):
        ds[(0, len(ds))]


def test_flip_mirrors_the_image(scan):
    plain = make_dataset(scan, flip_prob=0.0, random_crop=False)[(0, 0)]["pixel_values"]
    flipped = make_dataset(scan, flip_prob=1.0, random_crop=False)[(0, 0)]["pixel_values"]
    assert plain[0, :, 0].mean() > 0.9 and flipped[0, :, 0].mean() < -0.9  # red moved from left to right
    assert torch.equal(flipped, plain.flip(-1))


def test_dataset_is_a_function_of_seed_epoch_index(scan):
    ds, other = make_dataset(scan), make_dataset(scan)
    first = [ds[(2, i)] for i in range(len(ds))]
    for a, b in zip(first, [other[(2, i)] for i in range(len(other))]):  # another instance, straight to epoch 2
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
    changed = [ds[(3, i)] for i in range(len(ds))]
    assert any(a["caption"] != b["caption"] for a, b in zip(first, changed))
    assert any(not torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(first, changed))
    reseeded = make_dataset(scan, seed=8)
    assert [reseeded.caption(i, 3) for i in range(len(ds))] != [s["caption"] for s in changed]


def test_geometry_is_the_crop_the_image_gets(scan):
    """SDXL's size conditioning of cached latents comes from `geometry`, which never opens the image."""
    for random_crop in (False, True):
        ds = make_dataset(scan, random_crop=random_crop)
        for epoch in (0, 1):
            for index in range(len(ds)):
                sample = ds[(epoch, index)]
                original, top_left, target = ds.geometry(index, epoch)
                assert original == sample["original_size"] and top_left == sample["crop_top_left"]
                assert target == (sample["bucket"][1], sample["bucket"][0])


def test_sampler_batches_one_bucket_and_repeats(scan):
    ds = make_dataset(scan)
    assert len(set(ds.sample_buckets)) > 1  # the test needs several buckets
    for drop_last in (False, True):
        sampler = BucketBatchSampler(ds.sample_buckets, 2, seed=3, drop_last=drop_last)
        batches = sampler.batches(0)
        for batch in batches:
            assert len({ds.sample_buckets[i] for i in batch}) == 1
            assert len(batch) == 2 or not drop_last
        flat = [i for batch in batches for i in batch]
        if not drop_last:
            assert sorted(flat) == list(range(len(ds)))
            per_item = Counter(ds.item_of[i] for i in flat)
            assert all(per_item[k] == item.repeats for k, item in enumerate(ds.items))


def test_sampler_order_depends_on_seed_and_epoch(scan):
    buckets = make_dataset(scan).sample_buckets
    a, b = BucketBatchSampler(buckets, 2, seed=3), BucketBatchSampler(buckets, 2, seed=3)
    assert a.batches(0) == b.batches(0)
    assert a.batches(1) != a.batches(0) and BucketBatchSampler(buckets, 2, seed=4).batches(0) != a.batches(0)


def test_dataloader_workers_load_what_the_keys_name(scan):
    """The trainer's num_workers path: a DataLoader fed (epoch, index) keys gives the samples the
    dataset gives in the main process."""
    ds = make_dataset(scan)
    sampler = BucketBatchSampler(ds.sample_buckets, 2, seed=1)
    keys = [[(epoch, i) for i in batch] for epoch in range(2) for batch in sampler.batches(epoch)]
    loader = torch.utils.data.DataLoader(ds, batch_sampler=iter(keys), collate_fn=collate, num_workers=1)
    for batch, wanted in zip(loader, keys, strict=True):
        assert batch["indices"] == [i for _, i in wanted]
        assert batch["captions"] == [ds.caption(i, epoch) for epoch, i in wanted]
        expected = torch.stack([ds[key]["pixel_values"] for key in wanted])
        assert torch.equal(batch["pixel_values"], expected)


def test_collate_rejects_mixed_sizes(scan):
    ds = make_dataset(scan)
    first = ds[(0, 0)]
    other = next(ds[(0, i)] for i in range(len(ds)) if ds.sample_buckets[i] != first["bucket"])
    with pytest.raises(DataError, match="BucketBatchSampler"):
        collate([first, other])
    batch = collate([first, ds[(0, 1)]] if ds.sample_buckets[1] == first["bucket"] else [first])
    assert batch["pixel_values"].ndim == 4 and isinstance(batch["captions"], list)
