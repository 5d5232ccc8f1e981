"""`sdlora convert`: kohya <-> diffusers (PEFT names) <-> ComfyUI, lossless, for every family; a PEFT
SDXL file becomes one A1111 and ComfyUI read (original UNet names, lora_te1_/lora_te2_, alphas)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdlora
from sdlora.tools.convert import convert
from sdlora.base_models.sources import load_pipeline
from sdlora.toy.pipelines import save_tiny_pipeline
from conftest import randomize
from test_families import diffusers_sdxl_file, outputs


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", family="sdxl")


def sdxl_file(folder, path, alpha=1.0):
    pipe = load_pipeline(str(folder))
    sdlora.add_adapter(pipe, "a", rank=2, alpha=alpha, targets="attn-mlp",
                       components_to_adapt=("unet", "text_encoder", "text_encoder_2"))
    randomize(pipe, "a", seed=8)
    return sdlora.save(pipe, path, "a", dtype="fp32"), pipe


@pytest.mark.parametrize("via", ["diffusers", "comfy"])
def test_there_and_back_gives_the_same_tensors(sdxl_folder, tmp_path, via):
    original, pipe = sdxl_file(sdxl_folder, tmp_path / "a.safetensors")
    middle = convert(original, via, tmp_path / f"{via}.safetensors", model=pipe)
    back = convert(middle, "kohya", tmp_path / "back.safetensors", model=pipe)
    first, second = load_file(original), load_file(back)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert set(load_file(middle)).isdisjoint(first)  # really another layout in between


def test_a_diffusers_sdxl_file_becomes_one_a1111_and_comfyui_read(sdxl_folder, tmp_path, reference_client):
    # all four projections: diffusers cannot read back a kohya text-encoder LoRA without out_proj ("Could not
    # automatically infer state dict type"), a limit of the reference, not of the file
    path, expected = diffusers_sdxl_file(sdxl_folder, tmp_path / "peft")
    kohya = convert(path, "kohya", tmp_path / "kohya.safetensors",
                    model=load_pipeline(str(sdxl_folder)))
    names = list(load_file(kohya))
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te2_")) for n in names)
    alphas = {n: t.item() for n, t in load_file(kohya).items() if n.endswith(".alpha")}
    assert len(alphas) == len(names) // 3 and set(alphas.values()) == {2.0, 8.0}

    for reader in ("diffusers", "sdlora"):
        pipe = load_pipeline(str(sdxl_folder))
        if reader == "diffusers":
            pipe.load_lora_weights(str(kohya))
        else:
            sdlora.load(pipe, kohya)
        got = outputs(pipe)
        for part in ("unet", "text_encoder_2"):
            torch.testing.assert_close(got[part], expected[part], atol=1e-4, rtol=1e-4, msg=f"{reader} {part}")


def test_lycoris_kinds_convert_between_kohya_and_comfy_but_not_diffusers(pipe, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(0)
    loha = {f"{name}.{role}": torch.randn(*shape, generator=generator)
            for role, shape in (("hada_w1_a", (16, 2)), ("hada_w1_b", (2, 16)), ("hada_w2_a", (16, 2)),
                                ("hada_w2_b", (2, 16)))} | {f"{name}.alpha": torch.tensor(1.0)}
    save_file(loha, tmp_path / "loha.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    comfy = convert(tmp_path / "loha.safetensors", "comfy", tmp_path / "comfy.safetensors", model=pipe)
    assert all(key.startswith("diffusion_model.input_blocks.1.1.") for key in load_file(comfy))
    back = load_file(convert(comfy, "kohya", tmp_path / "back.safetensors", model=pipe))
    assert back.keys() == loha.keys() and all(torch.equal(back[k], loha[k]) for k in loha)
    with pytest.raises(sdlora.AdapterFileError, match="loha: diffusers' layout holds plain LoRA only"):
        convert(tmp_path / "loha.safetensors", "diffusers", tmp_path / "d.safetensors", model=pipe)


def test_without_a_model_the_familys_standard_architecture_names_the_modules(tmp_path):
    """Real SDXL names, converted with no model at hand (built from the shipped configs on the meta device)."""
    names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_te2_text_model_encoder_layers_31_mlp_fc2"]
    tensors = {}
    for name in names:
        tensors |= {f"{name}.lora_down.weight": torch.ones(2, 3), f"{name}.lora_up.weight": torch.ones(3, 2),
                    f"{name}.alpha": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "xl.safetensors")
    diffusers_file = convert(tmp_path / "xl.safetensors", "diffusers", tmp_path / "d.safetensors")
    assert sorted(load_file(diffusers_file)) == [
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc2.lora_A.weight",
        "text_encoder_2.text_model.encoder.layers.31.mlp.fc2.lora_B.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]


def test_nothing_is_dropped_silently(pipe, tmp_path):
    save_file({"lora_unet_no_such_module.lora_down.weight": torch.ones(2, 3),
               "lora_unet_no_such_module.lora_up.weight": torch.ones(3, 2)}, tmp_path / "odd.safetensors",
              metadata={"ss_base_model_version": "sd_v1"})
    with pytest.raises(sdlora.AdapterFileError, match="would be lost in conversion"):
        convert(tmp_path / "odd.safetensors", "diffusers", tmp_path / "d.safetensors", model=pipe)
    assert not (tmp_path / "d.safetensors").exists()


def test_the_command_converts_and_refuses_in_one_line(tmp_path, tiny_dir, capsys):
    from sdlora.cli import main

    pipe = load_pipeline(str(tiny_dir))
    sdlora.add_adapter(pipe, "a", rank=2, targets="attn")
    randomize(pipe, "a", seed=1)
    original = sdlora.save(pipe, tmp_path / "a.safetensors", "a", dtype="fp32")
    assert main(["convert", str(original), "--to", "diffusers", "--model", str(tiny_dir), "-o",
                 str(tmp_path / "peft.safetensors")]) == 0
    assert all(".lora_A." in key or ".lora_B." in key for key in load_file(tmp_path / "peft.safetensors"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # one name for one layout: diffusers' (PEFT names)
        main(["convert", str(original), "--to", "peft", "-o", str(tmp_path / "p.safetensors")])
    assert refused.value.code == 2 and "invalid choice: 'peft'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.safetensors"), "--to", "kohya", "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: error:") and "Traceback" not in err


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_converted_file_with_text_encoder_layers_loads_in_diffusers_with_our_outputs(
        family, tiny_dir, sdxl_folder, tmp_path, reference_client):
    """`convert --to diffusers` writes what diffusers' load_lora_weights takes under transformers 5 (whose CLIP
    has no `text_model`), text encoders included, with per-module ranks and alphas in the header."""
    folder = tiny_dir if family == "sd1" else sdxl_folder
    pipe = load_pipeline(str(folder))
    parts = ("unet", "text_encoder") if family == "sd1" else ("unet", "text_encoder", "text_encoder_2")
    sdlora.add_adapter(pipe, "a", rank=2, alpha=1.0, targets="attn-mlp", components_to_adapt=parts)
    randomize(pipe, "a", seed=4)
    original = sdlora.save(pipe, tmp_path / "a.safetensors", "a", dtype="fp32")
    # one text-encoder module of another rank and alpha, so the header needs its rank and alpha patterns
    tensors = load_file(original)
    odd = next(k.removesuffix(".lora_down.weight") for k in tensors
               if k.startswith("lora_te") and k.endswith("mlp_fc1.lora_down.weight"))
    tensors[f"{odd}.lora_down.weight"] = tensors[f"{odd}.lora_down.weight"][:1].clone()
    tensors[f"{odd}.lora_up.weight"] = tensors[f"{odd}.lora_up.weight"][:, :1].clone()
    tensors[f"{odd}.alpha"] = torch.tensor(3.0)
    save_file(tensors, original, metadata=sdlora.read_adapter(original)[1])
    ours = load_pipeline(str(folder))
    converted = convert(original, "diffusers", tmp_path / "d.safetensors", model=ours)  # tiny: not standard
    assert any(key.startswith("text_encoder.") for key in load_file(converted))

    base = outputs(ours)
    sdlora.load(ours, original)
    expected = outputs(ours)
    theirs = load_pipeline(str(folder))
    theirs.load_lora_weights(str(converted))
    got = outputs(theirs)
    for part in parts:
        assert not torch.allclose(expected[part], base[part], atol=1e-4), part  # the file changes every part
        torch.testing.assert_close(got[part], expected[part], atol=1e-4, rtol=1e-4, msg=part)
    modules = {key.rsplit(".", 2)[0] for key in tensors if key.endswith(".lora_down.weight")}
    loaded = sum(1 for part in parts for path, _ in getattr(theirs, part).named_modules()
                 if path.endswith("lora_A.default_0"))
    assert loaded == len(modules)  # nothing left out
    again = load_pipeline(str(folder))
    sdlora.load(again, converted)  # and our own reader takes the header's patterns as diffusers does
    for part, value in outputs(again).items():
        torch.testing.assert_close(value, expected[part], atol=1e-5, rtol=1e-5, msg=part)
