"""The LyCORIS reference fixtures make sense on their own, and docs/lycoris-facts.md's formulas are
LyCORIS's: files with the expected names and shapes, outputs that move with the multiplier, and
ΔW re-derived from each file's tensors in plain torch matching what LyCORIS's forward applies."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from conftest import te_out, unet_out
from lycoris_reference import VARIANTS, make_reference
from sdlora.toy.pipelines import tiny_pipeline


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One reference per variant, built on first use and shared by the tests of this file."""
    folder = tmp_path_factory.mktemp("lycoris")
    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = make_reference(tiny, variant, folder / f"{variant}.safetensors")
        return built[variant]
    return get


def layers(pipe) -> dict:
    """kohya name -> layer, for every layer LyCORIS's SD preset adapts."""
    found = {}
    for name, layer in pipe.unet.named_modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            found[f"lora_unet_{name}".replace(".", "_")] = layer
    for name, layer in pipe.text_encoder.named_modules():
        if isinstance(layer, torch.nn.Linear) and (".self_attn." in name or ".mlp." in name):
            found[f"lora_te_text_model_{name}".replace(".", "_")] = layer
    return found


# ---- docs/lycoris-facts.md, in plain torch: ΔW and W' from a file's tensors ------------------------

def tucker(core, a, b):
    """Σ_ij core[i, j, ...]·a[i, p]·b[j, q] -> [p, q, ...]."""
    return torch.einsum("ij...,ip,jq->pq...", core, a, b)


def delta_weight(t: dict, shape) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW (scale included, multiplier not) and Δb of one module; `t` maps tensor name -> tensor."""
    if "diff" in t:
        return t["diff"], t.get("diff_b")
    alpha = t["alpha"].item()
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        rank = down.shape[0]
        up, down = up.reshape(up.shape[0], rank), down.reshape(rank, -1)
        if "lora_mid.weight" in t:
            return alpha / rank * tucker(t["lora_mid.weight"], up.T, down), None
        return alpha / rank * (up @ down).reshape(shape), None
    if "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]
        if "hada_t1" in t:
            product = (tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                       * tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]))
        else:
            product = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
        return alpha / rank * product, None
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(t["lokr_w2_a"].shape[0], -1, *shape[2:])
    factorized = t.get("lokr_w1_b", t.get("lokr_w2_b"))
    scale = 1.0 if factorized is None else alpha / factorized.shape[0]  # both halves full: alpha ignored
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
    return scale * torch.kron(w1, w2.contiguous()), None


def new_weight(t: dict, weight, bias, multiplier: float):
    """W' and b' at a multiplier, as LyCORIS's forward applies them (DoRA included)."""
    delta, delta_b = delta_weight(t, weight.shape)
    if "dora_scale" not in t:
        return weight + multiplier * delta, bias if delta_b is None else bias + multiplier * delta_b
    m, merged = t["dora_scale"], weight + delta  # ΔW at full strength, whatever the multiplier
    rows = m.shape[0] != 1  # (out, 1, ...): a norm per output row; (1, in, ...): per input column
    flat = merged.reshape(merged.shape[0], -1) if rows else merged.transpose(0, 1).reshape(merged.shape[1], -1)
    norm = flat.norm(dim=1).reshape(m.shape) + torch.finfo(torch.float32).eps
    return merged * (1 + multiplier * (m / norm - 1)), bias


def module_tensors(state_dict: dict, name: str) -> dict:
    return {key.split(".", 1)[1]: value for key, value in state_dict.items() if key.split(".", 1)[0] == name}


def layer_input(layer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if isinstance(layer, torch.nn.Linear):
        return torch.randn(3, layer.in_features, generator=generator)
    return torch.randn(2, layer.in_channels, 8, 8, generator=generator)


# ---- the files --------------------------------------------------------------------------------------

TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32, no bias
PROJ_IN = "lora_unet_down_blocks_1_attentions_0_proj_in"  # Conv2d 32 -> 32, 1x1
CONV1 = "lora_unet_down_blocks_1_resnets_0_conv1"  # Conv2d 16 -> 32, 3x3
FF_IN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"  # Linear 32 -> 256

LOCON = {TO_Q: {"lora_down.weight": (4, 32), "lora_up.weight": (32, 4)},
         PROJ_IN: {"lora_down.weight": (4, 32, 1, 1), "lora_up.weight": (32, 4, 1, 1)},
         CONV1: {"lora_down.weight": (4, 16, 3, 3), "lora_up.weight": (32, 4, 1, 1)}}
LOHA = {TO_Q: {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 4), "hada_w2_b": (4, 32)},
        PROJ_IN: {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 4), "hada_w2_b": (4, 32)},
        CONV1: {"hada_w1_a": (32, 4), "hada_w1_b": (4, 144), "hada_w2_a": (32, 4), "hada_w2_b": (4, 144)}}
# factorization(32) = (4, 8), factorization(16) = (4, 4), factorization(256) = (16, 16).
LOKR = {TO_Q: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
        PROJ_IN: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)},
        CONV1: {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 36)},
        FF_IN: {"lokr_w1": (16, 4), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 8)}}


def with_alpha(layout, alpha):
    return {name: {**tensors, "alpha": ()} for name, tensors in layout.items()}, alpha


def dora(layout, rows=True):
    shapes = {TO_Q: (32, 1), PROJ_IN: (32, 1, 1, 1), CONV1: (32, 1, 1, 1)} if rows else \
        {TO_Q: (1, 32), PROJ_IN: (1, 32, 1, 1), CONV1: (1, 16, 1, 1)}
    return {name: {**tensors, "dora_scale": shapes[name]} for name, tensors in layout.items() if name in shapes}


EXPECTED = {  # variant -> ({kohya name: {tensor: shape}}, alpha in the file)
    "locon": with_alpha(LOCON, 2.0),
    "locon-tucker": with_alpha({**LOCON, CONV1: {"lora_down.weight": (4, 16, 1, 1), "lora_mid.weight": (4, 4, 3, 3),
                                                 "lora_up.weight": (32, 4, 1, 1)}}, 2.0),
    "loha": with_alpha(LOHA, 2.0),
    "loha-tucker": with_alpha({**LOHA, CONV1: {"hada_t1": (4, 4, 3, 3), "hada_w1_a": (4, 32), "hada_w1_b": (4, 16),
                                               "hada_t2": (4, 4, 3, 3), "hada_w2_a": (4, 32), "hada_w2_b": (4, 16)}},
                              2.0),
    "lokr": with_alpha(LOKR, 1.0),
    "lokr-decompose-both": with_alpha(
        {TO_Q: {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)},
         CONV1: {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 36)}}, 2.0),
    "lokr-full": with_alpha({TO_Q: {"lokr_w1": (4, 4), "lokr_w2": (8, 8)},
                             PROJ_IN: {"lokr_w1": (4, 4), "lokr_w2": (8, 8, 1, 1)},
                             CONV1: {"lokr_w1": (4, 4), "lokr_w2": (8, 4, 3, 3)}}, 4.0),  # alpha := rank
    "lokr-tucker": with_alpha({**LOKR, CONV1: {"lokr_w1": (4, 4), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 8),
                                               "lokr_w2_b": (2, 4)}}, 1.0),
    "lokr-factor": with_alpha({**LOKR, FF_IN: {"lokr_w1": (4, 4), "lokr_w2_a": (64, 2), "lokr_w2_b": (2, 8)}}, 1.0),
    "full": ({TO_Q: {"diff": (32, 32)}, PROJ_IN: {"diff": (32, 32, 1, 1), "diff_b": (32,)},
              CONV1: {"diff": (32, 16, 3, 3), "diff_b": (32,)}}, None),
    "locon-dora": with_alpha(dora(LOCON), 2.0),
    "locon-dora-in": with_alpha(dora(LOCON, rows=False), 2.0),
    "loha-dora": with_alpha(dora(LOHA), 2.0),
    "lokr-dora": with_alpha(dora(LOKR), 1.0),
}


def test_every_variant_has_expectations():
    assert set(EXPECTED) == set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
def test_file_has_kohya_names_and_the_expected_tensors(variant, reference, tiny):
    state_dict = load_file(reference(variant).path)
    names = {key.split(".", 1)[0] for key in state_dict}
    assert names == set(layers(tiny))  # every Linear/Conv2d of the UNet, CLIP's attention and MLP
    expected, alpha = EXPECTED[variant]
    for name, shapes in expected.items():
        tensors = module_tensors(state_dict, name)
        assert {key: tuple(value.shape) for key, value in tensors.items()} == shapes, name
        if alpha is not None:
            assert tensors["alpha"].item() == alpha
    families = {key.split(".", 1)[1].split("_")[0] for key in state_dict} - {"alpha", "dora"}
    assert len(families) == 1, families  # one algo per file: lora_*, hada_*, lokr_* or diff*


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_move_with_the_multiplier(variant, reference):
    ref = reference(variant)
    for model in ("unet", "text_encoder"):
        base, half, full = ref.base[model], ref.outputs[model][0.5], ref.outputs[model][1.0]
        assert torch.isfinite(half).all() and torch.isfinite(full).all()
        size = base.abs().max()
        assert (half - base).abs().max() > 0.02 * size, model
        assert (full - base).abs().max() > 0.02 * size, model
        assert (full - half).abs().max() > 0.02 * size, model


# ---- the formulas -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_formulas_give_what_lycoris_applies(variant, reference, tiny):
    """For every module: the layer with W', b' from the doc's formulas and the file's tensors gives
    what the LyCORIS-wrapped layer gives, at both multipliers."""
    ref = reference(variant)
    state_dict, originals = load_file(ref.path), layers(tiny)
    with torch.no_grad():
        for multiplier in (0.5, 1.0):
            ref.network.set_multiplier(multiplier)
            for lora in ref.network.loras:
                layer = originals[lora.lora_name]
                x = layer_input(layer)
                weight, bias = new_weight(module_tensors(state_dict, lora.lora_name), layer.weight, layer.bias,
                                          multiplier)
                expected = functional_call(layer, {"weight": weight, "bias": bias}, (x,))
                torch.testing.assert_close(lora(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("variant, merge_is_forward", [
    ("locon", True), ("locon-tucker", True), ("locon-dora", True), ("full", True),
    ("lokr-full", True),  # scale 1
    ("loha", False), ("loha-tucker", False), ("lokr", False), ("lokr-decompose-both", False),
])
def test_lycoris_merge_applies_lohas_and_lokrs_scale_twice(variant, merge_is_forward, reference, tiny):
    """LyCORIS's own merge (get_merged_weight, what merge_to/onfly_merge write) against the doc:
    the same for LoCon, DoRA and full; for LoHa and LoKr it multiplies by alpha/rank twice
    (get_weight already includes it, get_diff_weight applies it again), unlike its forward."""
    ref = reference(variant)
    state_dict, originals = load_file(ref.path), layers(tiny)
    lora = next(lora for lora in ref.network.loras if lora.lora_name == TO_Q)
    layer = originals[TO_Q]
    tensors = module_tensors(state_dict, TO_Q)
    with torch.no_grad():
        merged = lora.get_merged_weight(1.0)[0]
        if merge_is_forward:
            torch.testing.assert_close(merged, new_weight(tensors, layer.weight, None, 1.0)[0])
        else:
            scale = lora.scale
            assert scale != 1
            torch.testing.assert_close(merged, layer.weight + scale * delta_weight(tensors, layer.weight.shape)[0])


@pytest.mark.parametrize("variant", ["locon-dora", "lokr-dora"])
def test_dora_at_multiplier_zero_still_applies_the_delta(variant, reference, tiny):
    """LyCORIS scales DoRA's magnitude step, not ΔW: at multiplier 0 a layer computes with W + ΔW."""
    ref = reference(variant)
    state_dict, originals = load_file(ref.path), layers(tiny)
    lora = ref.network.loras[-1]
    layer = originals[lora.lora_name]
    x = layer_input(layer)
    ref.network.set_multiplier(0.0)
    with torch.no_grad():
        delta, _ = delta_weight(module_tensors(state_dict, lora.lora_name), layer.weight.shape)
        expected = functional_call(layer, {"weight": layer.weight + delta, "bias": layer.bias}, (x,))
        torch.testing.assert_close(lora(x), expected)
        assert (lora(x) - layer(x)).abs().max() > 1e-3


def test_lycoris_reads_its_files_back_with_the_same_outputs(reference, tiny):
    """LyCORIS's own loader (kohya.create_network_from_weights) gives the reference outputs; the
    three layouts it cannot rebuild from a file (doc, "LyCORIS's own loader") fail loudly."""
    from lycoris import kohya

    def load(variant):
        unet, encoder = copy.deepcopy(tiny.unet), copy.deepcopy(tiny.text_encoder)
        holder = torch.nn.Module()
        holder.text_model = encoder
        network, _ = kohya.create_network_from_weights(0.5, str(reference(variant).path), None, holder, unet)
        network.apply_to(holder, unet, True, True)
        return unet, encoder

    for variant in ("locon-tucker", "loha-tucker", "lokr", "full", "loha-dora"):
        unet, encoder = load(variant)
        torch.testing.assert_close(unet_out(unet), reference(variant).outputs["unet"][0.5], atol=0, rtol=0)
        torch.testing.assert_close(te_out(encoder), reference(variant).outputs["text_encoder"][0.5], atol=0, rtol=0)
    for variant in ("lokr-decompose-both", "lokr-tucker", "locon-dora-in"):
        with pytest.raises((RuntimeError, AttributeError)):
            load(variant)


def test_the_pipeline_is_left_as_it_was(tmp_path):
    pipe = tiny_pipeline()
    before = unet_out(pipe), te_out(pipe)
    ref = make_reference(pipe, "full", tmp_path / "full.safetensors")
    assert torch.equal(unet_out(pipe), before[0]) and torch.equal(te_out(pipe), before[1])
    assert torch.equal(ref.base["unet"], before[0])
    without_te = make_reference(pipe, "locon", tmp_path / "unet.safetensors", text_encoder=False)
    assert "text_encoder" not in without_te.outputs
    assert all(key.startswith("lora_unet_") for key in load_file(without_te.path))
