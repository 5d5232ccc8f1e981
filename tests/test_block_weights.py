"""Block weights as the A1111 LoRA Block Weight extension writes them: the blocks they name are the
ones of the original UNet layout, for the real SD 1.5 and SDXL architectures, and a loaded adapter gets
each block's weight in the layers of that block."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel

import sdlora
from sdlora.adapters.block_weights import BLOCK_IDS, PRESETS, block_weights, from_text
from sdlora.adapters.strength import describe, scaled
from sdlora.adapters.targets import adaptable_modules
from sdlora.cli import parse_lora
from sdlora.loader import _block_ids, _layers
from sdlora.base_models.parts import components
from sdlora.toy.pipelines import tiny_sdxl_pipeline

from conftest import make_adapter_file, te_out, unet_out
from test_sgm import SD15, SDXL, meta_unet


def reference_block(path: str) -> str | None:
    """The block of a diffusers UNet path, counted by hand for UNets with 2 layers per level (SD 1.x,
    2.x and SDXL): input block 0 is conv_in, then per level its two layers and a downsampler; the
    output blocks have three layers per level, the upsampler in the last one."""
    if path.startswith("conv_in"):
        return "IN00"
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return f"IN{3 * int(match[1]) + int(match[3]) + 1:02d}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.", path):
        return f"IN{3 * int(match[1]) + 3:02d}"
    if path.startswith("mid_block."):
        return "M00"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.", path):
        return f"OUT{3 * int(match[1]) + int(match[3]):02d}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.", path):
        return f"OUT{3 * int(match[1]) + 2:02d}"
    return None  # time embedding, conv_norm_out, conv_out


@pytest.mark.parametrize("config, attention_blocks", [(SD15, 17), (SDXL, 12)])
def test_blocks_are_those_of_the_original_layout(config, attention_blocks):
    unet = meta_unet(config)
    block_of, blocks = _block_ids({"unet": SimpleNamespace(config=unet.config), "text_encoder": None})
    paths = adaptable_modules(unet)
    assert len(paths) > 250
    for path in paths:
        assert block_of("unet", path) == reference_block(path), path
    assert block_of("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == "BASE"
    # The extension's short vectors list exactly the blocks that hold attention in that architecture.
    with_attention = {block_of("unet", path) for path in paths if ".attn1.to_q" in path}
    assert with_attention == set(BLOCK_IDS[attention_blocks]) - {"BASE"}
    # ... and its long ones every block there is.
    assert blocks == set(BLOCK_IDS[26 if attention_blocks == 17 else 20])


def test_a_few_blocks_by_name():
    unet = meta_unet(SD15)
    block_of, _ = _block_ids({"unet": SimpleNamespace(config=unet.config)})
    table = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
        "down_blocks.0.attentions.1.proj_out": "IN02",
        "down_blocks.0.downsamplers.0.conv": "IN03",
        "down_blocks.1.resnets.1.conv2": "IN05",
        "down_blocks.3.resnets.1.conv1": "IN11",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "M00",
        "up_blocks.0.resnets.2.conv1": "OUT02",
        "up_blocks.0.upsamplers.0.conv": "OUT02",
        "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": "OUT03",
        "up_blocks.3.attentions.2.proj_in": "OUT11",
        "time_embedding.linear_1": None,
        "conv_out": None,
    }
    assert {path: block_of("unet", path) for path in table} == table


def sd1_layout_pipe(pipe):
    """The tiny pipeline with a UNet of SD 1.5's layout (4 levels, 2 layers each; 12 input blocks)."""
    pipe.unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=4)
    return pipe


def strengths_by_block(pipe, name):
    block_of, _ = _block_ids(components(pipe))
    found = {}
    for component, path, wrapper in _layers(components(pipe)):
        if name in wrapper.adapters:
            found.setdefault(block_of(component, path), set()).add(wrapper.strengths[name])
    return found


@pytest.mark.parametrize("preset", ["OUTD", "INS", "MIDD", "ALL0.5"])
def test_presets_weight_the_blocks_they_name(pipe, tmp_path, preset):
    pipe = sd1_layout_pipe(pipe)
    path = make_adapter_file(pipe, tmp_path / "a.safetensors", targets="full")
    sdlora.load(pipe, path, strength=preset, name="a")
    vector = [float(value) for value in PRESETS[preset].split(",")]
    expected = dict(zip(BLOCK_IDS[17], vector))
    found = strengths_by_block(pipe, "a")
    assert "BASE" in found and "IN03" in found and "OUT00" in found  # the convs too
    for block, values in found.items():
        want = 1.0 if block is None else expected.get(block, 0.0)  # left out of the 17: 0, as there
        assert values == {want}, block


def test_all_is_the_plain_adapter_and_none_the_base_model(pipe, tmp_path):
    pipe = sd1_layout_pipe(pipe)
    path = make_adapter_file(pipe, tmp_path / "a.safetensors", targets="attn")
    base_unet, base_te = unet_out(pipe), te_out(pipe)
    sdlora.load(pipe, path, name="a")
    plain_unet, plain_te = unet_out(pipe), te_out(pipe)
    assert not torch.allclose(plain_unet, base_unet) and not torch.allclose(plain_te, base_te)
    sdlora.set_strength(pipe, "a", "ALL")
    assert torch.equal(unet_out(pipe), plain_unet) and torch.equal(te_out(pipe), plain_te)
    sdlora.set_strength(pipe, "a", "NONE")  # attention only: nothing outside the 17 blocks
    assert torch.equal(unet_out(pipe), base_unet) and torch.equal(te_out(pipe), base_te)
    sdlora.set_strength(pipe, "a", [0.0] + [1.0] * 16)  # BASE off: the text encoder alone is the base one
    assert torch.equal(te_out(pipe), base_te) and torch.equal(unet_out(pipe), plain_unet)


def test_sdxl_takes_its_own_vectors(tmp_path):
    pipe = tiny_sdxl_pipeline()
    path = make_adapter_file(pipe, tmp_path / "x.safetensors", targets="attn")
    vector = [1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.25, 0.75]
    sdlora.load(pipe, path, strength=vector, name="x")
    expected = dict(zip(BLOCK_IDS[12], vector))
    found = strengths_by_block(pipe, "x")
    assert set(found) <= set(BLOCK_IDS[12]) and len(found) >= 4
    for block, values in found.items():
        assert values == {float(expected[block])}, block
    with pytest.raises(ValueError, match=r"17-value vector is for SD 1.x/2.x.*SDXL UNet takes 12 or 20"):
        sdlora.set_strength(pipe, "x", "OUTD")


def test_bad_block_weights_are_named(pipe, tmp_path):
    pipe = sd1_layout_pipe(pipe)
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="is not a number, a block-weight preset"):
        sdlora.load(pipe, path, strength="OUTX")
    with pytest.raises(ValueError, match="12-value vector is for SDXL"):
        sdlora.load(pipe, path, strength=[1.0] * 12)
    with pytest.raises(ValueError, match="vector of 5 values fits no UNet"):
        sdlora.load(pipe, path, strength="1,1,1,1,1")
    with pytest.raises(ValueError, match="name IN12, which this model does not have"):
        sdlora.load(pipe, path, strength={"IN12": 0.0})
    assert sdlora.list_adapters(pipe) == []  # nothing was loaded


def test_blocks_by_name_on_any_layout(pipe, tmp_path):
    """The tiny pipeline's UNet (2 levels, 1 layer each) fits no vector, but its blocks have names."""
    path = make_adapter_file(pipe, tmp_path / "a.safetensors", targets="full")
    with pytest.raises(ValueError, match="has no block-weight vectors: name its blocks"):
        sdlora.load(pipe, path, strength="ALL")
    sdlora.load(pipe, path, strength={"IN01": 0.0, "OUT02": 0.5}, name="a")
    found = strengths_by_block(pipe, "a")
    assert found.pop("IN01") == {0.0} and found.pop("OUT02") == {0.5}
    assert all(values == {1.0} for values in found.values())


def test_command_line_forms():
    path, strength, window = parse_lora("style.safetensors:OUTD@0-0.5")
    assert (str(path), strength, window) == ("style.safetensors", "OUTD", (0.0, 0.5))
    path, strength, _ = parse_lora("a:b/style.safetensors:IN04=0.5,M00=0")
    assert (str(path), strength) == ("a:b/style.safetensors", {"IN04": 0.5, "M00": 0.0})
    assert parse_lora("style.safetensors:" + PRESETS["IND"])[1] == PRESETS["IND"]
    assert parse_lora("style.safetensors:0.8")[1] == 0.8
    assert from_text("style") is None and from_text("IN04=x") is None
    assert scaled("OUTD", 0.5) == [0.5 * float(value) for value in PRESETS["OUTD"].split(",")]
    assert scaled("OUTD", 0) == 0.0  # off everywhere, layers outside the blocks too
    assert scaled({"unet": {"up": [1.0, 0.5]}, "text_encoder": 0.4}, 2) == {"unet": {"up": [2.0, 1.0]},
                                                                             "text_encoder": 0.8}
    assert describe({"IN04": 0.5}) == "{IN04=0.5}" and describe([1.0, 0.5]) == "1,0.5"
    assert block_weights({"IN04": 0.5}, {"IN04", "M00"}) == {"IN04": 0.5, "M00": 1.0}
