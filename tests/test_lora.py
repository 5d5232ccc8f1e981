"""The LoRA layer against a naive `W + s * (up @ down) * alpha / rank` reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdlora.adapters.lora import AdaptedLayer, LoRA


def random_lora(base, rank, alpha, seed):
    lora = LoRA(base, rank, alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.1)
    return lora


def naive_linear(base: nn.Linear, x, adapters):
    weight = base.weight.detach().clone()
    for strength, lora in adapters:
        weight += strength * (lora.up.weight @ lora.down.weight) * lora.alpha / lora.rank
    return F.linear(x, weight, base.bias)


def naive_conv(base: nn.Conv2d, x, adapters):
    weight = base.weight.detach().clone()
    for strength, lora in adapters:
        up = lora.up.weight.flatten(1)
        down = lora.down.weight.flatten(1)
        weight += strength * (up @ down).view_as(weight) * lora.alpha / lora.rank
    return F.conv2d(x, weight, base.bias, base.stride, base.padding)


def layers():
    torch.manual_seed(0)
    return [
        (nn.Linear(12, 10), torch.randn(3, 5, 12), naive_linear),
        (nn.Conv2d(6, 8, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9), naive_conv),
        (nn.Conv2d(6, 8, 1), torch.randn(2, 6, 5, 5), naive_conv),
    ]


@pytest.mark.parametrize("case", range(3))
def test_matches_naive_reference(case):
    base, x, naive = layers()[case]
    layer = AdaptedLayer(base)
    lora = random_lora(base, rank=4, alpha=3.0, seed=1)
    layer.add("a", lora, strength=0.7)
    torch.testing.assert_close(layer(x), naive(base, x, [(0.7, lora)]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", range(3))
def test_two_adapters_stack_as_sum_of_deltas(case):
    base, x, naive = layers()[case]
    layer = AdaptedLayer(base)
    a, b = random_lora(base, 4, 4.0, seed=1), random_lora(base, 2, 8.0, seed=2)
    layer.add("a", a, 0.5)
    layer.add("b", b, -1.5)
    expected = naive(base, x, [(0.5, a), (-1.5, b)])
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    delta_a = naive(base, x, [(0.5, a)]) - base(x)
    delta_b = naive(base, x, [(-1.5, b)]) - base(x)
    torch.testing.assert_close(layer(x) - base(x), delta_a + delta_b, atol=1e-5, rtol=0)


def test_fresh_adapter_changes_nothing_and_strength_zero_is_base():
    base, x, _ = layers()[0]
    layer = AdaptedLayer(base)
    layer.add("fresh", LoRA(base, 4))
    assert torch.equal(layer(x), base(x))  # up starts at zero
    layer.add("random", random_lora(base, 4, 4.0, seed=3), strength=0.0)
    assert torch.equal(layer(x), base(x))


def test_output_is_linear_in_strength():
    base, x, _ = layers()[0]
    layer = AdaptedLayer(base)
    layer.add("a", random_lora(base, 4, 2.0, seed=4))
    outputs = {}
    for strength in (0.0, 1.0, 0.3, -2.0):
        layer.strengths["a"] = strength
        outputs[strength] = layer(x)
    unit = outputs[1.0] - outputs[0.0]
    assert unit.abs().max() > 1e-3
    for strength in (0.3, -2.0):
        torch.testing.assert_close(outputs[strength] - outputs[0.0], strength * unit, atol=1e-5, rtol=0)


def test_delta_weight_is_the_one_update():
    base, x, naive = layers()[1]
    lora = random_lora(base, 3, 1.5, seed=5)
    expected = naive(base, x, [(1.0, lora)]) - F.conv2d(x, base.weight, base.bias, base.stride, base.padding)
    got = F.conv2d(x, lora.delta_weight(), None, base.stride, base.padding)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", range(3))
def test_fused_equals_unfused(case):
    base, x, _ = layers()[case]
    layer = AdaptedLayer(base)
    layer.add("a", random_lora(base, 4, 2.0, seed=6), 0.8)
    layer.add("b", random_lora(base, 2, 2.0, seed=7), 1.2)
    unfused = layer(x)
    layer.fuse()
    assert layer.fused == ["a", "b"]
    torch.testing.assert_close(layer(x), unfused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unfuse_restores_weights_bit_for_bit(dtype):
    base = nn.Linear(64, 48).to(dtype)
    original = base.weight.detach().clone()
    layer = AdaptedLayer(base)
    layer.add("a", random_lora(base, 8, 8.0, seed=8), 0.9)
    layer.fuse()
    assert not torch.equal(base.weight, original)
    layer.unfuse()
    assert base.weight.dtype == dtype
    assert torch.equal(base.weight, original)


def test_fusing_twice_is_refused():
    base, _, _ = layers()[0]
    layer = AdaptedLayer(base)
    layer.add("a", random_lora(base, 4, 4.0, seed=9))
    layer.fuse()
    with pytest.raises(RuntimeError, match="already fused"):
        layer.fuse()


def test_fuse_computes_in_fp32():
    """Fusing a small update into fp16 weights rounds once, not per step of the product: each fused weight is
    the naive fp64 W + up @ down * alpha / rank rounded to fp16, within fp16's unit roundoff (2^-11 relative).
    Computing in fp16 misses that by up to hundreds of fp16 steps on this layer."""
    base = nn.Linear(256, 256).half()
    lora = random_lora(base, 16, 16.0, seed=10)
    exact = base.weight.double() + (lora.up.weight.double() @ lora.down.weight.double()) * lora.alpha / lora.rank
    layer = AdaptedLayer(base)
    layer.add("a", lora)
    layer.fuse()
    assert base.weight.dtype == torch.float16
    # atol: fp16's smallest step is 2^-24; the fp32 product adds errors of order 1e-7 relative
    torch.testing.assert_close(base.weight.double(), exact, rtol=2 ** -11, atol=2 ** -24)


def test_bad_layers_and_ranks_are_refused():
    with pytest.raises(ValueError, match="rank must be > 0"):
        LoRA(nn.Linear(4, 4), 0)
    with pytest.raises(TypeError, match="Linear or nn.Conv2d"):
        AdaptedLayer(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="grouped conv"):
        LoRA(nn.Conv2d(4, 4, 3, groups=2), 2)
