"""Our files and our loader against diffusers' own `load_lora_weights`, the reference client."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import sdlora
from conftest import make_adapter_file, te_out, unet_out

ATOL = 1e-4
pytestmark = pytest.mark.usefixtures("reference_client")


def peft_layers(model) -> int:
    return sum(1 for name, _ in model.named_modules() if name.endswith("lora_A"))


def test_our_file_loads_in_diffusers_with_same_outputs(pipe, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = make_adapter_file(pipe, tmp_path / "ours.safetensors", rank=4, alpha=2.0, targets="attn-mlp")
    sdlora.load(pipe, path, strength=0.7)
    ours_unet, ours_te = unet_out(pipe), te_out(pipe)

    reference = StableDiffusionPipeline.from_pretrained(tiny_dir)
    base_unet = unet_out(reference)
    reference.load_lora_weights(str(path), adapter_name="ours")
    reference.set_adapters(["ours"], adapter_weights=[0.7])
    # Every module in the file became a diffusers LoRA layer: no key was left over.
    file_modules = sum(sdlora.list_adapters(pipe)[0].modules.values())
    assert peft_layers(reference.unet) + peft_layers(reference.text_encoder) == file_modules
    assert (ours_unet - base_unet).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(unet_out(reference), ours_unet, atol=ATOL, rtol=0)
    torch.testing.assert_close(te_out(reference), ours_te, atol=ATOL, rtol=0)


def kohya_state_dict(pipe, rank=4, with_alpha=True, seed=1):
    """A hand-made kohya file as A1111-era trainers wrote it (fp16, optional alpha)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for prefix, model in (("lora_unet", pipe.unet), ("lora_te", pipe.text_encoder)):
        for path, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and path.endswith(("to_q", "to_v", "q_proj", "out_proj", "fc1")):
                if prefix == "lora_te" and not path.startswith("text_model."):
                    path = "text_model." + path
                name = f"{prefix}_{path.replace('.', '_')}"
                state_dict[f"{name}.lora_down.weight"] = (torch.randn(rank, layer.in_features, generator=generator)
                                                          * 0.1).half()
                state_dict[f"{name}.lora_up.weight"] = (torch.randn(layer.out_features, rank, generator=generator)
                                                        * 0.1).half()
                if with_alpha:
                    state_dict[f"{name}.alpha"] = torch.tensor(float(rank) / 2)
    return state_dict


def compare_with_diffusers(pipe, tiny_dir, path, strength=1.0):
    from diffusers import StableDiffusionPipeline

    sdlora.load(pipe, path, strength=strength)
    reference = StableDiffusionPipeline.from_pretrained(tiny_dir)
    base_unet = unet_out(reference)
    reference.load_lora_weights(str(path), adapter_name="ref")
    reference.set_adapters(["ref"], adapter_weights=[strength])
    ours = unet_out(pipe)
    assert (ours - base_unet).abs().max() > 1e-3
    torch.testing.assert_close(ours, unet_out(reference), atol=ATOL, rtol=0)
    torch.testing.assert_close(te_out(pipe), te_out(reference), atol=ATOL, rtol=0)


def test_kohya_file_matches_diffusers(pipe, tiny_dir, tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file(kohya_state_dict(pipe, with_alpha=True), path)
    compare_with_diffusers(pipe, tiny_dir, path, strength=0.8)


def test_kohya_file_without_alpha_matches_diffusers(pipe, tiny_dir, tmp_path):
    path = tmp_path / "kohya_no_alpha.safetensors"
    save_file(kohya_state_dict(pipe, with_alpha=False), path)
    compare_with_diffusers(pipe, tiny_dir, path)


def diffusers_written_file(tiny_dir, directory, rank=4, alpha=8, te_alpha=4):
    """A file written by diffusers' save_lora_weights from PEFT adapters, alpha != rank."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    writer = StableDiffusionPipeline.from_pretrained(tiny_dir)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    te_config = LoraConfig(r=rank, lora_alpha=te_alpha, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj"])
    torch.manual_seed(3)
    writer.unet.add_adapter(unet_config)
    writer.text_encoder.add_adapter(te_config)
    with torch.no_grad():  # PEFT's non-default init is large; keep the update moderate
        for name, parameter in [*writer.unet.named_parameters(), *writer.text_encoder.named_parameters()]:
            if "lora_" in name:
                parameter.mul_(0.3)
    StableDiffusionPipeline.save_lora_weights(
        directory,
        unet_lora_layers=get_peft_model_state_dict(writer.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(writer.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    return directory / "pytorch_lora_weights.safetensors"


def test_diffusers_peft_file_matches_diffusers(pipe, tiny_dir, tmp_path):
    path = diffusers_written_file(tiny_dir, tmp_path)
    with __import__("safetensors").safe_open(path, "pt") as f:
        assert any(".lora_A." in key for key in f.keys()) and "lora_adapter_metadata" in f.metadata()
    compare_with_diffusers(pipe, tiny_dir, path.parent, strength=0.6)  # the folder diffusers wrote
    info = sdlora.list_adapters(pipe)[0]
    assert info.layout == "peft"


def test_old_diffusers_layout_matches_diffusers(pipe, tiny_dir, tmp_path):
    """The pre-PEFT layout: `.lora.down.weight` in the UNet, `.lora_linear_layer.down` in the text encoder."""
    from safetensors.torch import load_file

    peft_path = diffusers_written_file(tiny_dir, tmp_path, alpha=4, te_alpha=4)  # old files had no alpha
    renamed = {}
    for key, tensor in load_file(peft_path).items():
        if key.startswith("unet."):
            key = key.replace("lora_A", "lora.down").replace("lora_B", "lora.up")
        else:
            key = key.replace("lora_A", "lora_linear_layer.down").replace("lora_B", "lora_linear_layer.up")
        renamed[key] = tensor
    path = tmp_path / "old.safetensors"
    assert any("lora_linear_layer" in key for key in renamed)
    save_file(renamed, path)
    compare_with_diffusers(pipe, tiny_dir, path)
    assert sdlora.list_adapters(pipe)[0].layout == "diffusers"
