"""bench/peers.py: what it can check without the peers installed (their venvs live outside the repo)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "models" / "toy-sd1"


def load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_without_the_peers_venvs_it_says_to_run_the_setup_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "bench/peers.py", "--peers", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"{tmp_path}/kohya-venv/bin/python is missing" in result.stderr
    assert f"bash bench/peers_setup.sh {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_tool_is_refused_with_the_choices(tmp_path):
    command = [sys.executable, "bench/peers.py", "--peers", str(tmp_path), "--tools", "sdlora,onetrainer"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "onetrainer" in result.stderr and "kohya" in result.stderr


def test_setup_without_the_clones_names_the_missing_folder(tmp_path):
    result = subprocess.run(["bash", "bench/peers_setup.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert f"{tmp_path}/sd-scripts is missing" in result.stderr
    assert not (tmp_path / "kohya-venv").exists()


def test_each_peer_gets_the_same_images_and_captions_in_its_layout(tmp_path):
    peers = load_peers()
    images = tmp_path / "images"
    images.mkdir()
    captions = {"a.png": "a red circle", "b.png": "two blue squares, outlined"}
    for name, caption in captions.items():
        (images / name).write_bytes(b"not really a png")
        (images / name).with_suffix(".txt").write_text(caption + "\n")
    data = tmp_path / "data"
    peers.lay_out_data(peers.Setting(TOY, 32, images, True), data)

    kohya = data / "kohya" / "1_bench"  # kohya: REPEATS_NAME folders, captions beside the images
    assert sorted(path.name for path in kohya.iterdir()) == ["a.png", "a.txt", "b.png", "b.txt"]
    assert (kohya / "b.txt").read_text().strip() == captions["b.png"]
    rows = [json.loads(line) for line in (data / "imagefolder" / "metadata.jsonl").read_text().splitlines()]
    assert {row["file_name"]: row["text"] for row in rows} == captions  # the diffusers imagefolder
    assert all((data / "imagefolder" / name).resolve() == (images / name).resolve() for name in captions)


def test_the_slow_tokenizer_files_for_kohya_tokenize_as_the_model_does(tmp_path):
    """kohya's pinned transformers reads CLIP's vocab.json + merges.txt; built from the toy model's
    tokenizer.json, they must give the same ids as the model's own tokenizer."""
    import transformers

    peers = load_peers()
    target = tmp_path / "tokenizer"
    peers.slow_tokenizer(TOY / "tokenizer", target)
    (target / "tokenizer.json").unlink()  # only the pair that kohya reads is left
    from_pair = transformers.CLIPTokenizer.from_pretrained(target)  # as kohya's load_tokenizer reads it
    own = transformers.AutoTokenizer.from_pretrained(TOY / "tokenizer")
    for text in ("a red circle", "two blue squares, outlined", "an unusual wordpiece zyx"):
        assert from_pair(text).input_ids == own(text).input_ids, text
