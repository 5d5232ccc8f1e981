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
from conftest import make_adapter_file, te_out, unet_out


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
    # a non-zero update: a module whose update is exactly zero is skipped, not refused (the next test)
    tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.ones(4, 8)
    tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"] = torch.ones(8, 4)
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


def comfyui_extracted(pipe, path, embedding_up=None, projection_up=None):
    """A file in the layout of ComfyUI's own extractor ("LoRA save" over a model difference): a pair for
    every 2-D weight, here a real update of one UNet and one text-encoder layer, and the all-zero pairs its
    SVD gives for weights the difference left alone: the position embedding (an nn.Embedding) and clip_l's
    text_projection (which diffusers' CLIPTextModel lacks). Its zero pairs have up = U·S = 0, down = Vh."""
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, (out, inn) in {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (16, 16),
                             "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
                             "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding": (77, 32),
                             "text_encoders.clip_l.transformer.text_projection": (32, 32)}.items():
        down = torch.linalg.qr(torch.randn(inn, 2, generator=generator))[0].T.contiguous()  # like SVD's Vh
        up = torch.randn(out, 2, generator=generator) * 0.1
        if "position_embedding" in name:
            up = torch.zeros(out, 2) if embedding_up is None else embedding_up
        if "text_projection" in name:
            up = torch.zeros(out, 2) if projection_up is None else projection_up
        tensors |= {f"{name}.lora_up.weight": up.half(), f"{name}.lora_down.weight": down.half()}
    save_file(tensors, path)
    return path


def test_a_comfyui_extracted_file_loads_strictly_skipping_its_zero_updates(pipe, tmp_path, caplog):
    """Its zero pairs change nothing, so a strict load skips them with a note naming them; the real updates
    load as the same file without those pairs does. A non-zero update of an embedding, or of a module the
    model lacks, is still refused, with nothing changed."""
    before = unet_out(pipe), te_out(pipe)
    path = comfyui_extracted(pipe, tmp_path / "comfy.safetensors")
    tensors = load_file(path)
    save_file({k: v for k, v in tensors.items() if "position_embedding" not in k and "text_projection" not in k},
              tmp_path / "real.safetensors")
    sdlora.load(pipe, tmp_path / "real.safetensors")
    expected = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    assert not torch.equal(expected[0], before[0]) and not torch.equal(expected[1], before[1])

    with caplog.at_level(logging.WARNING, logger="sdlora"):
        sdlora.load(pipe, path)
    assert "skipped 2 module(s) whose update is exactly zero" in caplog.text
    assert "position_embedding" in caplog.text and "text_projection" in caplog.text
    assert sdlora.list_adapters(pipe)[0].modules == {"unet": 1, "text_encoder": 1}
    assert torch.equal(unet_out(pipe), expected[0]) and torch.equal(te_out(pipe), expected[1])
    sdlora.unload(pipe)

    updated = comfyui_extracted(pipe, tmp_path / "embedding.safetensors", embedding_up=torch.full((77, 2), 0.01))
    with pytest.raises(AdapterFileError, match=r"1 module\(s\) update an embedding, .*position_embedding.*"
                                               r"strict=False"):
        sdlora.load(pipe, updated)
    untouched(pipe, before[0])
    lacking = comfyui_extracted(pipe, tmp_path / "projection.safetensors", projection_up=torch.full((32, 2), 0.01))
    with pytest.raises(AdapterFileError, match=r"2 tensor\(s\) name no layer .*text_projection"):
        sdlora.load(pipe, lacking)
    untouched(pipe, before[0])


def test_a_comfyui_file_with_bias_differences_is_refused_for_what_it_is(pipe, tmp_path):
    """ComfyUI's extractor with bias_diff on (its default) writes a `diff_b` beside a module's LoRA pair. sdlora
    does not apply that mix yet: the refusal says so and how to extract a file it reads, and does not call the
    LoRA's own tensors another kind (it said "LyCORIS IA3" for any `….weight`)."""
    before = unet_out(pipe)
    path = comfyui_extracted(pipe, tmp_path / "comfy.safetensors")
    tensors = load_file(path)
    tensors["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.diff_b"] = torch.full((16,), 0.01).half()
    save_file(tensors, tmp_path / "bias.safetensors")
    for strict in (True, False):
        with pytest.raises(AdapterFileError, match=r"3 tensor\(s\) sdlora cannot apply") as error:
            sdlora.load(pipe, tmp_path / "bias.safetensors", strict=strict)
        assert "bias_diff off" in str(error.value) and "IA3" not in str(error.value)
        untouched(pipe, before)


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
