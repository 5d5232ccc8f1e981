"""Adapter files: what we write, what we read, and clear errors for bad input with nothing modified."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sdlora
from sdlora.files.safetensors import AdapterFileError, write_adapter
from conftest import make_adapter_file, unet_out


def untouched(pipe, before):
    """Nothing was attached and the outputs are the base ones."""
    assert sdlora.list_adapters(pipe) == []
    assert torch.equal(unet_out(pipe), before)


def test_written_file_is_kohya_layout_with_metadata(pipe, tmp_path):
    path = make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4, alpha=2, dtype="fp16")
    tensors = load_file(path)
    names = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert all(n.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for n in names)
    for name in names:
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 4
        assert tensors[f"{name}.lora_up.weight"].shape[1] == 4
        assert tensors[f"{name}.alpha"].item() == 2.0
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "2"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0"
    record = json.loads(metadata["sdlora"])
    assert record["format_version"] == 1 and set(record["ranks"].values()) == {4}
    assert "unet" in record["targets"] and "text_encoder" in record["targets"]
    # Nothing but the adapter: the 8-byte length, the JSON header, the tensors' bytes.
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    header_bytes = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header_bytes + tensor_bytes
    assert header_bytes < 300 * len(tensors) + 4096


def test_text_encoder_names_are_canonical_whatever_transformers_builds(pipe, tmp_path):
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    te_keys = [k for k in load_file(path) if k.startswith("lora_te_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)


def test_unet_only_and_text_encoder_only_files(pipe, tmp_path):
    full = load_file(make_adapter_file(pipe, tmp_path / "a.safetensors"))
    for prefix in ("lora_unet_", "lora_te_"):
        part = {k: v for k, v in full.items() if k.startswith(prefix)}
        save_file(part, tmp_path / f"{prefix}.safetensors")
        name = sdlora.load(pipe, tmp_path / f"{prefix}.safetensors", name=prefix.strip("_"))
        (info,) = [i for i in sdlora.list_adapters(pipe) if i.name == name]
        assert list(info.modules) == ["unet" if prefix == "lora_unet_" else "text_encoder"]


def test_missing_alpha_means_alpha_equals_rank(pipe, tmp_path):
    tensors = load_file(make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4, alpha=1.0))
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, tmp_path / "b.safetensors")
    sdlora.load(pipe, tmp_path / "b.safetensors")
    assert {w.alpha for w in sdlora.adapter_weights(pipe, "b").values()} == {4.0}


@pytest.mark.parametrize("content, message", [
    (b"", "too short"),
    (b"\x80\x04\x95" + b"pickle" * 20, "pickled PyTorch checkpoint"),
    (b"hello world, not an adapter at all", "not a safetensors file"),
    ((20).to_bytes(8, "little") + b"{not json at all!!}!", "header is not JSON"),
])
def test_not_a_safetensors_file(pipe, tmp_path, content, message):
    before = unet_out(pipe)
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(AdapterFileError, match=message) as error:
        sdlora.load(pipe, path)
    assert str(path) in str(error.value)
    untouched(pipe, before)


def test_torch_pickle_is_never_opened(pipe, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(3)}, path)
    with pytest.raises(AdapterFileError, match="not a safetensors file"):
        sdlora.load(pipe, path)


def test_truncated_file(pipe, tmp_path):
    before = unet_out(pipe)
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(AdapterFileError, match="truncated") as error:
        sdlora.load(pipe, path)
    assert str(path) in str(error.value)
    untouched(pipe, before)


def test_missing_file(pipe, tmp_path):
    with pytest.raises(AdapterFileError, match="no such adapter file"):
        sdlora.load(pipe, tmp_path / "nope.safetensors")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_tensor(pipe, tmp_path, bad_value):
    before = unet_out(pipe)
    tensors = load_file(make_adapter_file(pipe, tmp_path / "a.safetensors"))
    victim = sorted(tensors)[7]
    tensors[victim] = tensors[victim].clone()
    tensors[victim].view(-1)[0] = bad_value
    save_file(tensors, tmp_path / "b.safetensors")
    with pytest.raises(AdapterFileError, match="NaN or infinite") as error:
        sdlora.load(pipe, tmp_path / "b.safetensors")
    assert victim in str(error.value)
    untouched(pipe, before)


def test_shape_mismatch_names_the_module_and_the_family(pipe, tmp_path):
    before = unet_out(pipe)
    tensors = load_file(make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4))
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    tensors[key] = torch.zeros(4, 768)  # a real SD 1.5 file: 768-wide text embeddings
    save_file(tensors, tmp_path / "b.safetensors", metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(AdapterFileError) as error:
        sdlora.load(pipe, tmp_path / "b.safetensors")
    message = str(error.value)
    assert "attn2.to_k" in message and "[4, 32]" in message and "[4, 768]" in message
    assert "Stable Diffusion XL" in message and "Stable Diffusion 1.x" in message
    untouched(pipe, before)


def test_unknown_keys_strict_and_lenient(pipe, tmp_path, caplog):
    before = unet_out(pipe)
    tensors = load_file(make_adapter_file(pipe, tmp_path / "a.safetensors"))
    tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.zeros(8, 4)
    save_file(tensors, tmp_path / "b.safetensors")
    with pytest.raises(AdapterFileError, match="name no layer") as error:
        sdlora.load(pipe, tmp_path / "b.safetensors")
    assert "input_blocks_4_1" in str(error.value) and "strict=False" in str(error.value)
    # original-layout UNet names are read for every family (ComfyUI does), so they say nothing of it
    assert "an unstated model family" in str(error.value)
    untouched(pipe, before)
    with caplog.at_level(logging.WARNING, logger="sdlora"):
        sdlora.load(pipe, tmp_path / "b.safetensors", strict=False)
    assert "skipped 2 tensor(s)" in caplog.text
    assert sum(sdlora.list_adapters(pipe)[0].modules.values()) == 64


def test_kinds_sdlora_does_not_read_are_named(pipe, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{name}.oft_blocks": torch.zeros(4, 4, 4), f"{name}.alpha": torch.tensor(4.0)}
    save_file(tensors, tmp_path / "oft.safetensors")
    with pytest.raises(AdapterFileError, match="LyCORIS OFT"):
        sdlora.load(pipe, tmp_path / "oft.safetensors")
    assert not sdlora.list_adapters(pipe)


def test_file_for_another_model_matches_nothing(pipe, tmp_path):
    tensors = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    save_file(tensors, tmp_path / "xl.safetensors")
    with pytest.raises(AdapterFileError, match="Stable Diffusion XL"):
        sdlora.load(pipe, tmp_path / "xl.safetensors", strict=False)


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    write_adapter(path, {"x": torch.ones(3)}, {"v": "1"})
    original = path.read_bytes()

    def crash(descriptor, data, name):
        os.write(descriptor, b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr("sdlora.reliability.durable._write_all", crash)
    with pytest.raises(KeyboardInterrupt):
        write_adapter(path, {"x": torch.zeros(3)}, {})
    assert path.read_bytes() == original
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        write_adapter(tmp_path / "a.pt", {"x": torch.ones(3)}, {})
