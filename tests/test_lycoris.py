"""LyCORIS files, written by the LyCORIS library itself (the reference client), load in sdlora with the
outputs LyCORIS's own network gives, at two strengths; fuse and unfuse are exact."""

from __future__ import annotations

import pytest
import torch

import sdlora
import sdlora.adapters.lora
from conftest import te_out, unet_out
from lycoris_reference import VARIANTS, make_reference

PLAIN = [name for name in VARIANTS if "dora" not in name]
DORA = [name for name in VARIANTS if "dora" in name]


@pytest.mark.parametrize("variant", PLAIN)
def test_each_kind_gives_lycoris_outputs_at_two_strengths(pipe, tmp_path, variant):
    reference = make_reference(pipe, variant, tmp_path / f"{variant}.safetensors")
    base = unet_out(pipe)
    sdlora.load(pipe, reference.path)
    for strength in (0.5, 1.0):
        sdlora.set_strength(pipe, reference.path.stem, strength)
        torch.testing.assert_close(unet_out(pipe), reference.outputs["unet"][strength], atol=2e-5, rtol=1e-4,
                                   msg=f"unet at {strength}")
        torch.testing.assert_close(te_out(pipe), reference.outputs["text_encoder"][strength], atol=2e-5,
                                   rtol=1e-4, msg=f"text encoder at {strength}")
    unfused = unet_out(pipe)
    sdlora.fuse(pipe)
    torch.testing.assert_close(unet_out(pipe), unfused, atol=2e-5, rtol=1e-4)
    sdlora.unfuse(pipe)
    sdlora.unload(pipe)
    assert torch.equal(unet_out(pipe), base)


@pytest.mark.parametrize("variant", DORA)
def test_dora_gives_lycoris_outputs_at_full_strength_and_blends_below(pipe, tmp_path, variant):
    """At strength 1 every tool agrees; below it sdlora follows A1111 and ComfyUI, W + s (W' - W), so that
    strength 0 is the base model (LyCORIS's own network keeps all of ΔW at any strength)."""
    reference = make_reference(pipe, variant, tmp_path / f"{variant}.safetensors")
    base = unet_out(pipe)
    name = sdlora.load(pipe, reference.path)
    torch.testing.assert_close(unet_out(pipe), reference.outputs["unet"][1.0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(te_out(pipe), reference.outputs["text_encoder"][1.0], atol=2e-5, rtol=1e-4)
    layers = [module for module in pipe.unet.modules() if isinstance(module, sdlora.adapters.lora.AdaptedLayer)]
    full = [layer.delta_weight() for layer in layers]
    sdlora.set_strength(pipe, name, 0.5)
    for layer, delta in zip(layers, full):
        torch.testing.assert_close(layer.delta_weight(), 0.5 * delta, atol=1e-7, rtol=1e-6)
    sdlora.set_strength(pipe, name, 0.0)
    assert torch.equal(unet_out(pipe), base)


@pytest.mark.parametrize("variant", ["loha", "lokr", "lokr-tucker", "locon-tucker"])
def test_resize_goes_through_the_full_update(pipe, tmp_path, variant):
    """`sdlora resize` on a LyCORIS file: at full energy, the LoRA it writes gives LyCORIS's own outputs."""
    from sdlora.tools.merge import resize_file

    reference = make_reference(pipe, variant, tmp_path / f"{variant}.safetensors")
    resize_file(reference.path, tmp_path / "resized.safetensors", energy=1.0, dtype="fp32", model=pipe)
    sdlora.load(pipe, tmp_path / "resized.safetensors")
    assert sdlora.list_adapters(pipe)[0].kinds == {"lora": sum(sdlora.list_adapters(pipe)[0].modules.values())}
    torch.testing.assert_close(unet_out(pipe), reference.outputs["unet"][1.0], atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(te_out(pipe), reference.outputs["text_encoder"][1.0], atol=5e-5, rtol=1e-4)


def test_what_a_lora_cannot_hold_is_refused_by_resize(pipe, tmp_path):
    from sdlora.tools.merge import resize_file

    reference = make_reference(pipe, "full", tmp_path / "full.safetensors")  # it changes biases too
    with pytest.raises(sdlora.AdapterFileError, match="changes the bias"):
        resize_file(reference.path, tmp_path / "resized.safetensors", energy=1.0, model=pipe)
    dora = make_reference(pipe, "locon-dora", tmp_path / "dora.safetensors")
    with pytest.raises(sdlora.AdapterFileError, match="DoRA rescales the base model's weight"):
        resize_file(dora.path, tmp_path / "resized.safetensors", rank=2, model=pipe)
    assert not (tmp_path / "resized.safetensors").exists()
