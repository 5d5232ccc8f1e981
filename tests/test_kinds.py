"""Adapter kinds other than LoRA (LyCORIS's LoHa, LoKr, Tucker LoCon, full, DoRA): loaded from files,
each layer equals a naive `W + s * ΔW` written here from the formulas, and strength, stacking, fuse and
exact unfuse work as for LoRA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import sdlora
from conftest import te_out, unet_out

LINEAR = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # [16, 16] in the tiny UNet
CONV = "unet.down_blocks.0.resnets.0.conv1"  # [16, 16, 3, 3]


def kohya(key: str) -> str:
    return "lora_unet_" + key.removeprefix("unet.").replace(".", "_")


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def naive(kind: str, weight: torch.Tensor, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(file tensors without the module name, ΔW at strength 1), from the formulas in ../shared/FORMATS.md."""
    out, inn = weight.shape[:2]
    spatial = tuple(weight.shape[2:])
    flat = inn * (spatial[0] * spatial[1] if spatial else 1)
    r, alpha = 4, 2.0
    if kind == "loha":
        t = {"hada_w1_a": rand(out, r, seed=seed), "hada_w1_b": rand(r, flat, seed=seed + 1),
             "hada_w2_a": rand(out, r, seed=seed + 2), "hada_w2_b": rand(r, flat, seed=seed + 3)}
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * alpha / r
    elif kind == "lokr":  # W1 whole [4, 4], W2 low-rank: scale alpha / r
        t = {"lokr_w1": rand(4, 4, seed=seed), "lokr_w2_a": rand(out // 4, r, seed=seed + 1),
             "lokr_w2_b": rand(r, inn // 4 * flat // inn, seed=seed + 2)}
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(out // 4, inn // 4, *spatial)
        w1 = t["lokr_w1"].reshape(4, 4, *([1] * len(spatial)))
        delta = torch.kron(w1, w2) * alpha / r
    elif kind == "lokr-whole":  # both factors whole: scale 1, alpha ignored
        t = {"lokr_w1": rand(4, 4, seed=seed), "lokr_w2": rand(out // 4, inn // 4, *spatial, seed=seed + 1)}
        delta = torch.kron(t["lokr_w1"].reshape(4, 4, *([1] * len(spatial))), t["lokr_w2"])
    elif kind == "full":
        t = {"diff": rand(*weight.shape, seed=seed)}
        delta = t["diff"]
    elif kind == "locon-tucker":
        t = {"lora_down.weight": rand(r, inn, 1, 1, seed=seed), "lora_mid.weight": rand(r, r, *spatial, seed=seed + 1),
             "lora_up.weight": rand(out, r, 1, 1, seed=seed + 2)}
        # compose the three convs: 1x1 down, k x k mid, 1x1 up
        delta = torch.einsum("pi,ijkl,jq->pqkl", t["lora_up.weight"].flatten(1), t["lora_mid.weight"],
                             t["lora_down.weight"].flatten(1)) * alpha / r
    else:
        raise ValueError(kind)
    t["alpha"] = torch.tensor(alpha)
    if kind.startswith("lokr-whole") or kind == "full":
        t.pop("alpha")
    return t, delta.reshape(weight.shape)


CASES = [("loha", LINEAR), ("loha", CONV), ("lokr", LINEAR), ("lokr", CONV), ("lokr-whole", LINEAR),
         ("lokr-whole", CONV), ("full", LINEAR), ("full", CONV), ("locon-tucker", CONV)]


@pytest.mark.parametrize("kind, key", CASES)
def test_each_kind_is_its_formula(pipe, tmp_path, kind, key):
    layer = pipe.unet.get_submodule(key.removeprefix("unet."))
    weight = layer.weight.detach().clone()
    tensors, delta = naive(kind, weight, seed=1)
    save_file({f"{kohya(key)}.{role}": tensor for role, tensor in tensors.items()}, tmp_path / "a.safetensors")
    x = rand(2, 16, *((8, 8) if weight.dim() == 4 else (5,)), seed=9)
    if weight.dim() == 2:
        x = x.transpose(1, 2)  # [batch, tokens, features]
    op = (lambda w: F.linear(x, w, layer.bias)) if weight.dim() == 2 else (
        lambda w: F.conv2d(x, w, layer.bias, layer.stride, layer.padding))
    before = unet_out(pipe)

    sdlora.load(pipe, tmp_path / "a.safetensors", strength=0.7)
    wrapped = pipe.unet.get_submodule(key.removeprefix("unet."))
    torch.testing.assert_close(wrapped(x), op(weight + 0.7 * delta), atol=1e-5, rtol=1e-5)
    assert sdlora.list_adapters(pipe)[0].kinds == {kind.removesuffix("-whole"): 1}
    unfused = unet_out(pipe)
    sdlora.fuse(pipe)
    torch.testing.assert_close(unet_out(pipe), unfused, atol=1e-5, rtol=1e-4)
    sdlora.unfuse(pipe)
    assert torch.equal(wrapped.base.weight, weight)  # exact
    sdlora.set_strength(pipe, "a", 0.0)
    assert torch.equal(unet_out(pipe), before)
    sdlora.unload(pipe)
    assert torch.equal(unet_out(pipe), before)


def test_full_bias_difference_fuses_and_unfuses(pipe, tmp_path):
    key = "unet.down_blocks.0.attentions.0.proj_in"  # a conv with a bias in the tiny UNet
    layer = pipe.unet.get_submodule(key.removeprefix("unet."))
    bias = layer.bias.detach().clone()
    diff_b = rand(*bias.shape, seed=3)
    save_file({f"{kohya(key)}.diff": rand(*layer.weight.shape, seed=2), f"{kohya(key)}.diff_b": diff_b},
              tmp_path / "full.safetensors")
    sdlora.load(pipe, tmp_path / "full.safetensors", strength=0.5)
    unfused = unet_out(pipe)
    sdlora.fuse(pipe)
    torch.testing.assert_close(layer.bias, bias + 0.5 * diff_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(unet_out(pipe), unfused, atol=1e-5, rtol=1e-4)
    sdlora.unfuse(pipe)
    assert torch.equal(layer.bias, bias)


@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_dora_rescales_each_output_row_to_its_magnitude(pipe, tmp_path, kind):
    """DoRA: W' = m * (W + ΔW) / ||W + ΔW|| per output row; at strength s the layer is W + s (W' - W)."""
    layer = pipe.unet.get_submodule(LINEAR.removeprefix("unet."))
    weight = layer.weight.detach().clone()
    if kind == "lora":
        tensors = {"lora_down.weight": rand(4, 16, seed=1), "lora_up.weight": rand(16, 4, seed=2),
                   "alpha": torch.tensor(4.0)}
        delta = tensors["lora_up.weight"] @ tensors["lora_down.weight"]
    else:
        tensors, delta = naive("loha", weight, seed=1)
    magnitude = rand(16, 1, seed=5).abs() + 0.5
    tensors["dora_scale"] = magnitude
    save_file({f"{kohya(LINEAR)}.{role}": tensor for role, tensor in tensors.items()}, tmp_path / "dora.safetensors")
    merged = weight + delta
    rescaled = merged * magnitude / merged.norm(dim=1, keepdim=True)
    x = rand(2, 5, 16, seed=9)
    sdlora.load(pipe, tmp_path / "dora.safetensors", strength=0.6)
    wrapped = pipe.unet.get_submodule(LINEAR.removeprefix("unet."))
    assert sdlora.list_adapters(pipe)[0].kinds == {f"{kind}+dora": 1}
    torch.testing.assert_close(wrapped(x), F.linear(x, weight + 0.6 * (rescaled - weight), layer.bias),
                               atol=1e-5, rtol=1e-5)


def test_a_kind_that_does_not_fit_the_layer_is_refused_before_anything_changes(pipe, tmp_path):
    tensors, _ = naive("loha", torch.empty(16, 32), seed=1)  # made for a [16, 32] layer; to_q is [16, 16]
    save_file({f"{kohya(LINEAR)}.{role}": tensor for role, tensor in tensors.items()}, tmp_path / "bad.safetensors")
    before = unet_out(pipe)
    with pytest.raises(sdlora.AdapterFileError, match=r"\(loha\) does not fit .* hada_w1_b \[4, 32\]"):
        sdlora.load(pipe, tmp_path / "bad.safetensors")
    assert not sdlora.list_adapters(pipe) and torch.equal(unet_out(pipe), before)


def test_a_lora_whose_factors_do_not_fit_is_refused_even_when_their_sizes_do(pipe, tmp_path):
    """up stored [rank, out] instead of [out, rank] holds as many numbers as the layer's: only a check of each
    factor's shape (1x1 kernel dims aside) refuses it."""
    save_file({f"{kohya(LINEAR)}.lora_down.weight": rand(4, 16, seed=1),
               f"{kohya(LINEAR)}.lora_up.weight": rand(4, 16, seed=2)}, tmp_path / "bad.safetensors")
    before = unet_out(pipe)
    with pytest.raises(sdlora.AdapterFileError, match=r"\(lora\) does not fit .*\(lora_up should be \[16, 4\]"):
        sdlora.load(pipe, tmp_path / "bad.safetensors")
    assert not sdlora.list_adapters(pipe) and torch.equal(unet_out(pipe), before)


def test_kinds_stack_with_lora_and_take_per_block_strength(pipe, tmp_path):
    """A LoHa and a LoRA on the same layer add up; per-block strength reaches LyCORIS kinds too."""
    layer = pipe.unet.get_submodule(LINEAR.removeprefix("unet."))
    weight = layer.weight.detach().clone()
    loha, loha_delta = naive("loha", weight, seed=1)
    lora = {"lora_down.weight": rand(2, 16, seed=7), "lora_up.weight": rand(16, 2, seed=8), "alpha": torch.tensor(2.0)}
    lora_delta = lora["lora_up.weight"] @ lora["lora_down.weight"]
    for name, tensors in (("loha", loha), ("lora", lora)):
        save_file({f"{kohya(LINEAR)}.{role}": t for role, t in tensors.items()}, tmp_path / f"{name}.safetensors")
    x = rand(2, 5, 16, seed=9)
    sdlora.load(pipe, tmp_path / "loha.safetensors", strength={"unet": {"down": [0.5, 1.0], "up": 1.0}})
    sdlora.load(pipe, tmp_path / "lora.safetensors", strength=0.3)
    wrapped = pipe.unet.get_submodule(LINEAR.removeprefix("unet."))  # in down block 0: the LoHa at 0.5
    expected = F.linear(x, weight + 0.5 * loha_delta + 0.3 * lora_delta, layer.bias)
    torch.testing.assert_close(wrapped(x), expected, atol=1e-5, rtol=1e-5)
    sdlora.set_strength(pipe, "loha", {"unet": {"down": [0.0, 1.0]}})
    torch.testing.assert_close(wrapped(x), F.linear(x, weight + 0.3 * lora_delta, layer.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind, key", CASES)
def test_a_file_module_is_its_kind_without_a_layer(pipe, kind, key):
    """The registry names each kind from its tensors alone, and the update it computes with no layer at hand
    (what inspect, merge and resize use) is the naive formula, in the weight's shape or flattened."""
    from sdlora.adapters.kinds import is_whole, kind_of, standalone_update
    from sdlora.files.layouts import ModuleTensors

    weight = pipe.unet.get_submodule(key.removeprefix("unet.")).weight.detach()
    tensors, delta = naive(kind, weight, seed=1)
    alpha = tensors.pop("alpha").item() if "alpha" in tensors else None
    module = ModuleTensors(tensors, alpha)
    assert kind_of(tensors).kind == module.kind == kind.removesuffix("-whole")
    assert module.rank == (None if kind in ("full", "lokr-whole") else 4)
    assert is_whole(tensors) and not is_whole(dict(list(tensors.items())[:-1]))
    update = standalone_update(tensors, alpha)
    torch.testing.assert_close(update.reshape(weight.shape), delta, atol=1e-6, rtol=1e-5)
    assert update.numel() == weight.numel()


TE_LINEAR = "text_encoder.encoder.layers.0.self_attn.q_proj"  # [32, 32] with a bias
BIASED_CONV = "unet.down_blocks.0.attentions.0.proj_in"  # a conv with a bias
KIND_MODULES = {"lora": [LINEAR, CONV, TE_LINEAR], "locon-tucker": [CONV], "loha": [LINEAR, CONV, TE_LINEAR],
                "lokr": [LINEAR, CONV, TE_LINEAR], "lokr-whole": [LINEAR, CONV],
                "full": [LINEAR, BIASED_CONV, TE_LINEAR], "dora": [LINEAR, TE_LINEAR]}


def kohya_any(key: str) -> str:
    """kohya's name; text encoder names keep the canonical `text_model_` even where transformers 5 dropped it."""
    if key.startswith("text_encoder."):
        return "lora_te_text_model_" + key.removeprefix("text_encoder.").replace(".", "_")
    return kohya(key)


def kind_file(pipe, kind: str) -> dict[str, torch.Tensor]:
    """A file of one kind over the modules KIND_MODULES names; full adds diff_b where a layer has a bias."""
    state = {}
    for seed, key in enumerate(KIND_MODULES[kind], start=1):
        component, path = key.split(".", 1)
        layer = getattr(pipe, component).get_submodule(path)
        weight = layer.weight.detach()
        if kind in ("lora", "dora"):
            out, inn = weight.shape[:2]
            tensors = {"lora_down.weight": rand(4, inn, *weight.shape[2:], seed=10 * seed),
                       "lora_up.weight": rand(out, 4, *([1, 1] if weight.dim() == 4 else []), seed=10 * seed + 1),
                       "alpha": torch.tensor(2.0)}
            if kind == "dora":
                tensors["dora_scale"] = rand(out, 1, seed=10 * seed + 2).abs() + 0.5
        else:
            tensors, _ = naive(kind, weight, seed=10 * seed)
        if kind == "full" and layer.bias is not None:
            tensors["diff_b"] = rand(*layer.bias.shape, seed=10 * seed + 5)
        state.update({f"{kohya_any(key)}.{role}": tensor for role, tensor in tensors.items()})
    return state


@pytest.mark.parametrize("kind", list(KIND_MODULES))
def test_merge_into_bakes_each_kind_as_loading_it(pipe, tiny_dir, tmp_path, kind):
    """`sdlora merge --into` gives the model that loading the file at strength 1 gives, bias updates included."""
    from diffusers import StableDiffusionPipeline

    from sdlora.cli import main

    path = tmp_path / f"{kind}.safetensors"
    save_file(kind_file(pipe, kind), path)
    before = unet_out(pipe), te_out(pipe)
    base_bias = pipe.unet.get_submodule(BIASED_CONV.removeprefix("unet.")).bias.detach().clone()
    sdlora.load(pipe, path)
    expected = unet_out(pipe), te_out(pipe)
    assert not torch.equal(expected[0], before[0])  # the file changes what is compared
    assert torch.equal(expected[1], before[1]) == (TE_LINEAR not in KIND_MODULES[kind])

    folder = tmp_path / "baked"
    assert main(["merge", f"{path}:1", "--into", str(tiny_dir), "-o", str(folder), "--dtype", "fp32"]) == 0
    baked = StableDiffusionPipeline.from_pretrained(folder)
    torch.testing.assert_close(unet_out(baked), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(baked), expected[1], atol=1e-5, rtol=0)
    if kind == "full":  # diff_b reached the bias
        baked_bias = baked.unet.get_submodule(BIASED_CONV.removeprefix("unet.")).bias
        diff_b = load_file(path)[f"{kohya(BIASED_CONV)}.diff_b"]
        assert not torch.equal(baked_bias, base_bias)
        torch.testing.assert_close(baked_bias, base_bias + diff_b, atol=1e-6, rtol=0)
