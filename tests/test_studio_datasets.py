"""The studio's view of a data folder (what the trainer reads) and its caption edits (never losing a text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdlora.studio.datasets import (MISSING, CaptionConflict, CaptionError, OutsideFolder, describe_folder,
                                    save_caption)
from sdlora.training.data import ImageCaptionDataset, bucket_histogram, find_image, find_images


def png(path: Path, size: tuple[int, int], colour="red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """A square, a wide and a tall image with .txt captions (the tall one has none), a concept folder,
    a broken image, an empty one, and a caption file with no image."""
    root = tmp_path / "data"
    png(root / "square.png", (32, 32))
    (root / "square.txt").write_text("a red square")
    png(root / "wide.png", (64, 32), "blue")
    (root / "wide.txt").write_text("a blue\nband\n")  # the trainer folds the newline
    png(root / "tall.png", (32, 64), "green")
    png(root / "2_sks dog" / "dog.png", (32, 32))
    (root / "broken.png").write_bytes(b"this is not a png")
    (root / "empty.png").write_bytes(b"")
    (root / "orphan.txt").write_text("a caption with no image")
    return root


def by_path(description: dict) -> dict[str, dict]:
    return {image["path"]: image for image in description["images"]}


def test_the_description_lists_images_captions_and_sizes(folder):
    description = describe_folder(folder, resolution=64)
    json.dumps(description)  # JSON-able as it is
    images = by_path(description)
    assert sorted(images) == ["2_sks dog/dog.png", "square.png", "tall.png", "wide.png"]
    assert images["square.png"] | {"version": None} == {
        "path": "square.png", "caption": "a red square", "caption_source": "square.txt", "width": 32, "height": 32,
        "version": None, "editable": True, "edit_refused": None}
    assert images["wide.png"]["caption"] == "a blue band" and (images["wide.png"]["width"],
                                                              images["wide.png"]["height"]) == (64, 32)
    assert images["tall.png"]["caption"] == "" and images["tall.png"]["caption_source"] is None
    assert images["tall.png"]["version"] == MISSING  # no caption file yet: saving creates one
    assert images["2_sks dog/dog.png"]["caption"] == "sks dog"  # the concept folder names it
    assert len({image["version"] for image in images.values()}) == 3  # the two files differ, two are missing
    assert description["summary"] == find_images(folder).summary()  # what the trainer prints


def test_skipped_files_show_with_their_reason(folder):
    skipped = {entry["path"]: entry["reason"] for entry in describe_folder(folder)["skipped"]}
    assert skipped["empty.png"] == "empty file (0 bytes)"
    assert skipped["broken.png"].startswith("not an image")
    # A caption file with no image is neither trained on nor reported: the trainer says nothing of it.
    assert "orphan.txt" not in skipped and "orphan.txt" not in by_path(describe_folder(folder))


def test_warnings_are_the_trainers(folder):
    (folder / "square.txt").write_bytes("caf\xe9 au lait".encode("cp1252"))
    (folder / "wide.txt").write_text(" ".join(["word"] * 100))
    warnings = describe_folder(folder)["warnings"]
    assert warnings[0] == "square.txt: caption not UTF-8, read as cp1252"
    assert "Captions missing: 1 (these train with an empty caption)." in warnings  # tall.png
    long = [w for w in warnings if "longer than the text encoder's 77 tokens" in w]
    assert len(long) == 1 and "wide.png (25 tokens)" in long[0]  # 100 words + start and end, 77 read
    assert any("images are enlarged more than 2x" in w for w in warnings)  # 32 px images at 512


def test_buckets_count_every_sample_in_the_trainers_buckets(folder):
    description = describe_folder(folder, resolution=64)
    buckets = {(b["width"], b["height"]): b["count"] for b in description["buckets"]}
    assert sum(buckets.values()) == 5  # four images, the concept folder's drawn twice
    assert buckets[64, 64] == 3  # the square and the twice-drawn dog
    wide, tall = [size for size in buckets if size[0] > size[1]], [size for size in buckets if size[0] < size[1]]
    assert len(wide) == len(tall) == 1 and buckets[wide[0]] == buckets[tall[0]] == 1
    assert [b["width"] / b["height"] for b in description["buckets"]] == sorted(
        b["width"] / b["height"] for b in description["buckets"])  # tall first, as the trainer's lines
    dataset = ImageCaptionDataset(find_images(folder), 64)
    assert description["histogram"] == bucket_histogram(dataset.sample_buckets)
    assert describe_folder(folder)["resolution"] == 512


def test_find_image_reads_one_image_as_the_scan_does(folder):
    (folder / "sub").mkdir()
    png(folder / "sub" / "listed.png", (16, 16))
    (folder / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "listed.png", "text": "listed"}) + "\n")
    for item in find_images(folder).items:
        assert find_image(folder, item.path) == item
    assert find_image(folder, folder / "sub" / "listed.png").caption_source == folder / "sub" / "metadata.jsonl"
    with pytest.raises(ValueError, match="broken.png is skipped by training: not an image"):
        find_image(folder, folder / "broken.png")


def test_a_caption_saves_and_reads_back(folder):
    images = by_path(describe_folder(folder))
    version = save_caption(folder, "square.png", "a red square, flat", images["square.png"]["version"])
    assert (folder / "square.txt").read_text() == "a red square, flat"
    again = by_path(describe_folder(folder))["square.png"]
    assert (again["caption"], again["version"]) == ("a red square, flat", version)
    # A missing caption file is created, and then edited with the version its creation returned.
    created = save_caption(folder, "tall.png", "a green band", MISSING)
    assert (folder / "tall.txt").read_text() == "a green band"
    save_caption(folder, "tall.png", "a tall green band", created)
    assert by_path(describe_folder(folder))["tall.png"]["caption"] == "a tall green band"
    assert not [path for path in folder.iterdir() if path.name.startswith(".")]  # no temporary left


def test_a_caption_changed_meanwhile_is_refused_and_both_texts_kept(folder):
    version = by_path(describe_folder(folder))["square.png"]["version"]
    (folder / "square.txt").write_text("edited in another editor")
    with pytest.raises(CaptionConflict, match="square.txt changed since it was read") as conflict:
        save_caption(folder, "square.png", "my edit", version)
    assert (conflict.value.current_text, conflict.value.rejected_text) == ("edited in another editor", "my edit")
    assert (folder / "square.txt").read_text() == "edited in another editor"
    # The conflict's version is the file's now: saving over it, knowingly, works.
    save_caption(folder, "square.png", "my edit", conflict.value.current_version)
    assert (folder / "square.txt").read_text() == "my edit"


def test_creating_a_caption_someone_else_created_is_a_conflict(folder):
    (folder / "tall.txt").write_text("theirs")
    with pytest.raises(CaptionConflict, match="tall.txt was created since") as conflict:
        save_caption(folder, "tall.png", "mine", MISSING)
    assert conflict.value.current_text == "theirs" and (folder / "tall.txt").read_text() == "theirs"


def test_paths_outside_the_folder_are_refused(folder, tmp_path):
    outside = png(tmp_path / "outside.png", (32, 32))
    (folder / "link.png").symlink_to(outside)
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    png(tmp_path / "elsewhere" / "far.png", (32, 32))
    for relpath in ("../outside.png", str(outside), str(folder / "square.png"), "link.png", "linked/far.png",
                    "2_sks dog/../../outside.png"):
        with pytest.raises(OutsideFolder):
            save_caption(folder, relpath, "escaped", MISSING)
    assert sorted(path.name for path in tmp_path.rglob("*.txt")) == ["orphan.txt", "square.txt", "wide.txt"]
    # Training reads images through links; the studio shows them but does not edit outside the folder.
    images = by_path(describe_folder(folder))
    assert not images["link.png"]["editable"] and "outside the data folder" in images["link.png"]["edit_refused"]


def test_a_caption_file_linked_out_of_the_folder_is_refused(folder, tmp_path):
    target = tmp_path / "secret.txt"
    target.write_text("not a caption")
    (folder / "square.txt").unlink()
    (folder / "square.txt").symlink_to(target)
    version = by_path(describe_folder(folder))["square.png"]["version"]
    with pytest.raises(OutsideFolder, match="caption file square.txt is a link"):
        save_caption(folder, "square.png", "overwritten", version)
    assert target.read_text() == "not a caption" and (folder / "square.txt").is_symlink()


def test_captions_from_metadata_or_csv_are_not_edited(folder):
    png(folder / "meta" / "a.png", (32, 32))
    (folder / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from jsonl"}) + "\n")
    png(folder / "table" / "b.png", (32, 32))
    (folder / "table" / "captions.csv").write_text("file_name,text\nb.png,from csv\n")
    images = by_path(describe_folder(folder))
    for relpath, source in (("meta/a.png", "meta/metadata.jsonl"), ("table/b.png", "table/captions.csv")):
        assert (images[relpath]["caption_source"], images[relpath]["editable"]) == (source, False)
        with pytest.raises(CaptionError, match=f"comes from {source}, which holds the captions of many images"):
            save_caption(folder, relpath, "edited", images[relpath]["version"])
    assert not (folder / "meta" / "a.txt").exists() and not (folder / "table" / "b.txt").exists()


@pytest.mark.parametrize("relpath, text, message", [
    ("square.png", "nul\0byte", "NUL"),
    ("square.png", "x" * 10_001, "over the limit of 10,000"),
    ("broken.png", "a caption", "skipped by training: not an image"),
    ("orphan.txt", "a caption", "not an image of"),
    ("missing.png", "a caption", "not an image of"),
])
def test_bad_texts_and_files_that_are_no_training_image_are_refused(folder, relpath, text, message):
    before = (folder / "square.txt").read_text()
    with pytest.raises(CaptionError, match=message) as error:
        save_caption(folder, relpath, text, MISSING)
    assert not isinstance(error.value, (OutsideFolder, CaptionConflict))
    assert (folder / "square.txt").read_text() == before and not (folder / "broken.txt").exists()
