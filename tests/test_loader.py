"""The loader on a whole pipeline: strength, per-block strength, stacking, fuse, unload, round-trips."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import sdlora
from sdlora.adapters.lora import AdaptedLayer
from conftest import make_adapter_file, randomize, te_out, unet_out


def state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(before, after):
    assert list(before) == list(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def wrappers(model, name):
    return {path: layer for path, layer in model.named_modules() if isinstance(layer, AdaptedLayer)
            and name in layer.adapters}


def test_strength_zero_equals_base(pipe, tmp_path):
    base_unet, base_te = unet_out(pipe), te_out(pipe)
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    sdlora.load(pipe, path, strength=0.0)
    assert torch.equal(unet_out(pipe), base_unet)
    assert torch.equal(te_out(pipe), base_te)
    sdlora.set_strength(pipe, "a", 1.0)
    assert (unet_out(pipe) - base_unet).abs().max() > 1e-3


def test_save_load_round_trip_is_exact(pipe, tmp_path):
    sdlora.add_adapter(pipe, "a", rank=4, alpha=2.5, targets="attn-mlp")
    randomize(pipe, "a", seed=1)
    trained = {k: (w.down.detach().clone(), w.up.detach().clone(), w.alpha)
               for k, w in sdlora.adapter_weights(pipe, "a").items()}
    expected = unet_out(pipe), te_out(pipe)
    sdlora.save(pipe, tmp_path / "fp32.safetensors", "a", dtype="fp32")
    sdlora.save(pipe, tmp_path / "fp16.safetensors", "a")  # fp16 is the default
    sdlora.unload(pipe)

    sdlora.load(pipe, tmp_path / "fp32.safetensors", name="a")
    loaded = sdlora.adapter_weights(pipe, "a")
    assert loaded.keys() == trained.keys()
    for key, (down, up, alpha) in trained.items():
        assert torch.equal(loaded[key].down, down) and torch.equal(loaded[key].up, up)
        assert loaded[key].alpha == alpha
    assert torch.equal(unet_out(pipe), expected[0]) and torch.equal(te_out(pipe), expected[1])

    half = load_file(tmp_path / "fp16.safetensors")
    assert all(t.dtype == torch.float16 for k, t in half.items() if not k.endswith(".alpha"))
    sdlora.load(pipe, tmp_path / "fp16.safetensors", name="half")
    for key, (down, up, _) in trained.items():
        assert torch.equal(sdlora.adapter_weights(pipe, "half")[key].down, down.half().float())


def test_per_component_strength(pipe, tmp_path):
    base_unet, base_te = unet_out(pipe), te_out(pipe)
    sdlora.load(pipe, make_adapter_file(pipe, tmp_path / "a.safetensors"), strength=1.0)
    full_te = te_out(pipe)
    sdlora.set_strength(pipe, "a", {"unet": 0.0, "text_encoder": 1.0})
    assert torch.equal(unet_out(pipe), base_unet)
    torch.testing.assert_close(te_out(pipe), full_te, atol=0, rtol=0)
    sdlora.set_strength(pipe, "a", {"unet": 1.0, "text_encoder": 0.0})
    assert torch.equal(te_out(pipe), base_te)
    assert (unet_out(pipe) - base_unet).abs().max() > 1e-3


def test_per_block_strength(pipe, tmp_path):
    base_unet = unet_out(pipe)
    sdlora.load(pipe, make_adapter_file(pipe, tmp_path / "a.safetensors"))
    sdlora.set_strength(pipe, "a", {"unet": {"down": 1.0, "mid": 0.5, "up": [0.2, 1.0]}, "text_encoder": 0.3})
    seen = set()
    for path, layer in wrappers(pipe.unet, "a").items():
        kind = path.split("_")[0]
        expected = {"down": 1.0, "mid": 0.5}.get(kind) or [0.2, 1.0][int(path.split(".")[1])]
        assert layer.strengths["a"] == expected, path
        seen.add((kind, expected))
    assert seen == {("down", 1.0), ("mid", 0.5), ("up", 0.2), ("up", 1.0)}
    assert all(layer.strengths["a"] == 0.3 for layer in wrappers(pipe.text_encoder, "a").values())
    sdlora.set_strength(pipe, "a", {"unet": {"down": 0.0, "mid": 0.0, "up": [0.0, 0.0]}})
    assert torch.equal(unet_out(pipe), base_unet)


@pytest.mark.parametrize("bad, message", [
    ({"unet": {"up": [1.0]}}, "has 1 values but this UNet has 2 up block"),
    ({"unet": {"middle": 1.0}}, "unknown block 'middle'"),
    ({"text_encoder_2": 1.0}, "names component 'text_encoder_2'"),
    ({"text_encoder": {"down": 1.0}}, "must be a number"),
    ("strong", "is not a number, a block-weight preset"),
])
def test_bad_strength_is_refused_before_anything_changes(pipe, tmp_path, bad, message):
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match=message):
        sdlora.load(pipe, path, strength=bad)
    assert sdlora.list_adapters(pipe) == []
    sdlora.load(pipe, path, strength=0.5)
    with pytest.raises(ValueError, match=message):
        sdlora.set_strength(pipe, "a", bad)
    assert sdlora.list_adapters(pipe)[0].strength == 0.5


def test_two_adapters_stack_as_sum_of_deltas(pipe, tmp_path):
    a = make_adapter_file(pipe, tmp_path / "a.safetensors", name="a", seed=1)
    b = make_adapter_file(pipe, tmp_path / "b.safetensors", name="b", seed=2, rank=2, targets="attn-mlp")
    base = state(pipe.unet)
    sdlora.load(pipe, a, strength=0.7)
    sdlora.load(pipe, b, strength=-0.4)
    for path, layer in wrappers(pipe.unet, "b").items():
        expected = layer.base.weight.float().clone()
        for name, strength in (("a", 0.7), ("b", -0.4)):
            if name in layer.adapters:
                lora = layer.adapters[name]
                expected += strength * (lora.up.weight.flatten(1) @ lora.down.weight.flatten(1)).view_as(expected) \
                    * lora.alpha / lora.rank
        torch.testing.assert_close(layer.base.weight + layer.delta_weight(), expected, atol=1e-6, rtol=0)
    stacked = unet_out(pipe)
    sdlora.fuse(pipe)
    torch.testing.assert_close(unet_out(pipe), stacked, atol=1e-5, rtol=0)
    sdlora.unfuse(pipe)
    sdlora.unload(pipe)
    assert_same_state(base, state(pipe.unet))


def test_disabled_switches_one_adapter_off_and_restores_it(pipe, tmp_path):
    a = make_adapter_file(pipe, tmp_path / "a.safetensors", name="a", seed=1)
    b = make_adapter_file(pipe, tmp_path / "b.safetensors", name="b", seed=2)
    sdlora.load(pipe, a, strength={"unet": 0.7, "text_encoder": 0.3})
    sdlora.load(pipe, b, strength=0.5)
    stacked = unet_out(pipe)
    sdlora.set_strength(pipe, "a", 0.0)
    only_b = unet_out(pipe)
    sdlora.set_strength(pipe, "a", {"unet": 0.7, "text_encoder": 0.3})
    with sdlora.disabled(pipe, "a"):
        assert torch.equal(unet_out(pipe), only_b)
    assert torch.equal(unet_out(pipe), stacked)
    assert (stacked - only_b).abs().max() > 1e-3
    assert {layer.strengths["a"] for layer in wrappers(pipe.unet, "a").values()} == {0.7}
    assert {layer.strengths["a"] for layer in wrappers(pipe.text_encoder, "a").values()} == {0.3}
    sdlora.fuse(pipe)
    with pytest.raises(RuntimeError, match="fused"):
        with sdlora.disabled(pipe, "a"):
            pass
    sdlora.unfuse(pipe)
    sdlora.unload(pipe)


def test_fused_equals_unfused_and_unfuse_is_exact(pipe, tmp_path):
    base_unet_state, base_te_state = state(pipe.unet), state(pipe.text_encoder)
    sdlora.load(pipe, make_adapter_file(pipe, tmp_path / "a.safetensors"), strength=0.9)
    unfused = unet_out(pipe), te_out(pipe)
    sdlora.fuse(pipe)
    assert all(info.fused for info in sdlora.list_adapters(pipe))
    torch.testing.assert_close(unet_out(pipe), unfused[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), unfused[1], atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already fused"):
        sdlora.fuse(pipe)
    with pytest.raises(RuntimeError, match="unfuse first"):
        sdlora.set_strength(pipe, "a", 0.5)
    assert sdlora.unfuse(pipe) is True
    sdlora.unload(pipe)
    assert_same_state(base_unet_state, state(pipe.unet))
    assert_same_state(base_te_state, state(pipe.text_encoder))


def test_fp16_pipeline_unfuse_is_bit_exact(pipe, tmp_path):
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    pipe.to(torch_dtype=torch.float16)
    before = state(pipe.unet)
    sdlora.load(pipe, path)
    sdlora.fuse(pipe)
    sdlora.unfuse(pipe)
    sdlora.unload(pipe)
    assert_same_state(before, state(pipe.unet))


def test_unload_one_of_two_while_fused_keeps_the_other_fused(pipe, tmp_path):
    a = make_adapter_file(pipe, tmp_path / "a.safetensors", name="a", seed=1)
    b = make_adapter_file(pipe, tmp_path / "b.safetensors", name="b", seed=2)
    sdlora.load(pipe, b)
    only_b = unet_out(pipe)
    sdlora.load(pipe, a)
    sdlora.fuse(pipe)
    sdlora.unload(pipe, "a")
    assert [info.name for info in sdlora.list_adapters(pipe)] == ["b"]
    assert sdlora.list_adapters(pipe)[0].fused
    torch.testing.assert_close(unet_out(pipe), only_b, atol=1e-5, rtol=0)


def test_unload_restores_original_modules(pipe, tmp_path):
    base = state(pipe.unet), state(pipe.text_encoder)
    types = {path: type(m) for path, m in pipe.unet.named_modules()}
    sdlora.load(pipe, make_adapter_file(pipe, tmp_path / "a.safetensors", targets="full"))
    assert any(isinstance(m, AdaptedLayer) for m in pipe.unet.modules())
    sdlora.unload(pipe)
    assert {path: type(m) for path, m in pipe.unet.named_modules()} == types
    assert_same_state(base[0], state(pipe.unet))
    assert_same_state(base[1], state(pipe.text_encoder))
    assert sdlora.list_adapters(pipe) == []


def test_names_and_listing(pipe, tmp_path):
    path = make_adapter_file(pipe, tmp_path / "my style.safetensors", rank=4, targets="attn-mlp")
    name = sdlora.load(pipe, path, strength=0.8)
    assert name == "my_style"
    with pytest.raises(ValueError, match="already loaded"):
        sdlora.load(pipe, path, name="my_style")
    with pytest.raises(KeyError, match="no adapter named 'other'"):
        sdlora.unload(pipe, "other")
    (info,) = sdlora.list_adapters(pipe)
    assert info.strength == 0.8 and info.ranks == {"unet": [4], "text_encoder": [4]}
    assert info.modules["text_encoder"] == 2 * 6  # 2 layers x (q, k, v, out, fc1, fc2)
    assert info.targets["unet"] and info.family == "sd1" and info.layout == "kohya"


def test_bare_unet_and_text_encoder(pipe, tmp_path):
    path = make_adapter_file(pipe, tmp_path / "a.safetensors")
    sdlora.load(pipe, path, strength=0.6)
    expected_unet, expected_te = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe.unet, path, strength=0.6)  # the text-encoder half of the file is not for this target
    sdlora.load(pipe.text_encoder, path, strength=0.6)
    torch.testing.assert_close(unet_out(pipe.unet), expected_unet, atol=0, rtol=0)
    torch.testing.assert_close(te_out(pipe.text_encoder), expected_te, atol=0, rtol=0)


def test_add_adapter_targets(pipe):
    before = unet_out(pipe), te_out(pipe)
    attn = sdlora.add_adapter(pipe, "attn", rank=2, targets="attn")
    assert len(attn) == 14 * 4 + 2 * 4  # 14 attention modules x 4 projections, 2 text layers x 4
    assert all(k.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj"))
               for k in attn)
    full = sdlora.add_adapter(pipe, "full", rank=2, targets="full", components_to_adapt=("unet",))
    assert any(k.endswith("resnets.0.conv1") for k in full) and any(k.endswith("proj_in") for k in full)
    convs = sdlora.add_adapter(pipe, "convs", rank=2, targets="convs")
    unet_convs = [k for k in convs if k.startswith("unet.")]
    assert unet_convs and all(".resnets." in k or "samplers.0.conv" in k for k in unet_convs)
    text_keys = [k for k in convs if k.startswith("text_encoder.")]
    assert len(text_keys) == 2 * 6 and all(k.endswith(("_proj", "fc1", "fc2")) for k in text_keys)
    custom = sdlora.add_adapter(pipe, "custom", rank=2, targets=[r"mid_block.*to_q$"], components_to_adapt=("unet",))
    assert custom == ["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                      "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q"]
    with pytest.raises(ValueError, match="match no Linear or Conv2d"):
        sdlora.add_adapter(pipe, "none", targets=["nothing_here"], components_to_adapt=("unet",))
    with pytest.raises(ValueError, match="unknown targets preset"):
        sdlora.add_adapter(pipe, "bad", targets="everything")
    # fresh adapters (up = 0) run and change nothing, bit for bit
    assert torch.equal(unet_out(pipe), before[0]) and torch.equal(te_out(pipe), before[1])
