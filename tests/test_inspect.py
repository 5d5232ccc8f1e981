"""`sdlora inspect`: what a file holds, the size of its update per block (checked against a naive
recomputation), and the anomalies it flags."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import sdlora
from sdlora.cli import main
from sdlora.tools.inspect import inspect
from conftest import make_adapter_file


def test_a_trained_looking_file_is_described(pipe, tmp_path, capsys):
    path = make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4, alpha=2, targets="attn")
    report = inspect(path)
    assert report.family == "Stable Diffusion 1.x" and report.family_from == "header"
    assert report.layout == "kohya" and report.kinds == {"lora": 64} and report.ranks == {"4": 64}
    assert report.components == {"unet": 56, "text_encoder": 8} and report.alphas == {"2": 64}
    # the tiny UNet is not SD 1.5's: its up_blocks.0 attends, SD 1.5's does not, and that is all that is odd
    assert len(report.anomalies) == 1 and "up_blocks_0_attentions" in report.anomalies[0]
    # per-block norms: sqrt of the sum over the block's modules of ||up @ down * alpha / rank||^2
    tensors = sdlora.read_adapter(path)[0]
    expected: dict[str, float] = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            delta = tensors[f"{name}.lora_up.weight"].float() @ tensors[key].float() * 2 / 4
            block = "text_encoder" if name.startswith("lora_te_") else "down 0" if "down_blocks_0" in name else \
                "down 1" if "down_blocks_1" in name else "mid" if "mid_block" in name else \
                "up 0" if "up_blocks_0" in name else "up 1"
            expected[block] = expected.get(block, 0.0) + float(delta.norm()) ** 2
    assert report.block_norms.keys() == expected.keys()
    for block, value in expected.items():
        assert abs(report.block_norms[block] - value ** 0.5) < 1e-5 * value ** 0.5, block
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"] == {"lora": 64}


def test_anomalies_are_flagged(tmp_path):
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    other = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    save_file({f"{module}.lora_down.weight": torch.ones(4, 320), f"{module}.lora_up.weight": torch.zeros(320, 4),
               f"{other}.lora_down.weight": torch.ones(4, 320), f"{other}.lora_up.weight": torch.ones(320, 2),
               "lora_unet_no_such_module.lora_down.weight": torch.full((2, 3), float("nan")),
               "lora_unet_no_such_module.lora_up.weight": torch.ones(3, 2)},
              tmp_path / "odd.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    report = inspect(tmp_path / "odd.safetensors")
    assert report.targets == {"UNet attention": 2, "other": 1}  # from the names: the file records none
    anomalies = "\n".join(report.anomalies)
    assert "1 module(s) have all-zero up weights" in anomalies
    assert "1 module(s) whose down and up ranks differ" in anomalies
    assert "NaN or infinite" in anomalies
    assert "name no module of Stable Diffusion 1.x's standard architecture" in anomalies
    assert "no_such_module" in anomalies


def test_lycoris_kinds_are_measured(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    generator = torch.Generator().manual_seed(0)
    t = {role: torch.randn(*shape, generator=generator) for role, shape in
         (("hada_w1_a", (8, 2)), ("hada_w1_b", (2, 8)), ("hada_w2_a", (8, 2)), ("hada_w2_b", (2, 8)))}
    save_file({f"{name}.{role}": tensor for role, tensor in t.items()} | {f"{name}.alpha": torch.tensor(1.0)},
              tmp_path / "loha.safetensors")
    report = inspect(tmp_path / "loha.safetensors")
    naive = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.5).norm()
    assert report.kinds == {"loha": 1} and report.ranks == {"2": 1}
    assert abs(report.modules[0]["norm"] - float(naive)) < 1e-5


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdlora: error:") and "Traceback" not in err


def test_a_module_mixing_two_kinds_is_named_as_such(tmp_path):
    """LoHa's first factor beside a LoRA's down: no kind has these tensors, so the report does not guess one
    (by prefix it was once called a LoHa, of the LoRA's rank)."""
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{name}.hada_w1_a": torch.ones(320, 2), f"{name}.lora_down.weight": torch.ones(2, 320)},
              tmp_path / "mixed.safetensors", metadata={"ss_base_model_version": "sd_v1"})
    report = inspect(tmp_path / "mixed.safetensors")
    assert report.kinds == {"unknown": 1} and report.ranks == {"None": 1}
    assert any("mix several adapter kinds" in anomaly for anomaly in report.anomalies)
