"""Other tools' layouts of the same adapter: ComfyUI's own (`diffusion_model.<original path>`,
`text_encoders.clip_l.transformer.…`), SimpleTuner's LyCORIS (`lycoris_<UNet path>`), and OneTrainer's
projection of SDXL's second text encoder (`lora_te2_text_projection`) load as the kohya file does."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdlora
from sdlora.base_models import sgm
from sdlora.base_models.sources import load_pipeline
from sdlora.toy.pipelines import save_tiny_pipeline
from conftest import randomize
from test_families import outputs

COMFY_TEXT = {"sd1": {"text_encoder": "clip_l"}, "sd2": {"text_encoder": "clip_h"},
              "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family_pipe(request, tmp_path_factory):
    folder = save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "pipe", family=request.param)
    return request.param, folder


def comfy_name(family: str, key: str, mapping: dict[str, str]) -> str:
    component, _, path = key.partition(".")
    if component == "unet":
        return f"diffusion_model.{mapping[path]}"
    return f"text_encoders.{COMFY_TEXT[family][component]}.transformer.{path}"


def test_comfyui_layout_loads_as_the_kohya_file(family_pipe, tmp_path):
    family, folder = family_pipe
    pipe = load_pipeline(str(folder))
    parts = ("unet", "text_encoder", "text_encoder_2") if family == "sdxl" else ("unet", "text_encoder")
    sdlora.add_adapter(pipe, "a", rank=2, alpha=1, targets="attn-mlp", components_to_adapt=parts)
    randomize(pipe, "a", seed=4)
    kohya_file = sdlora.save(pipe, tmp_path / "kohya.safetensors", "a", dtype="fp32")
    mapping = sgm.unet_module_map(pipe.unet.config)
    comfy = {}
    for key, weights in sdlora.adapter_weights(pipe, "a").items():
        name = comfy_name(family, key, mapping)
        comfy |= {f"{name}.lora_down.weight": weights.down.detach(), f"{name}.lora_up.weight": weights.up.detach(),
                  f"{name}.alpha": torch.tensor(1.0)}
    save_file(comfy, tmp_path / "comfy.safetensors")
    sdlora.unload(pipe)

    sdlora.load(pipe, kohya_file)
    expected = outputs(pipe)
    sdlora.unload(pipe)
    name = sdlora.load(pipe, tmp_path / "comfy.safetensors")
    info = sdlora.list_adapters(pipe)[0]
    assert info.layout == "comfy" and sum(info.modules.values()) == len(comfy) // 3
    got = outputs(pipe)
    for part in expected:
        torch.testing.assert_close(got[part], expected[part], atol=1e-6, rtol=0, msg=part)
    assert name == "comfy"


def test_simpletuner_lycoris_names_load_as_kohya_names(tmp_path):
    """SimpleTuner writes LyCORIS files (LoKr, say) with `lycoris_` and the diffusers UNet path."""
    folder = save_tiny_pipeline(tmp_path / "pipe", family="sdxl")
    pipe = load_pipeline(str(folder))
    to_q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # [32, 32]
    generator = torch.Generator().manual_seed(0)
    payload = {"lokr_w1": torch.randn(4, 4, generator=generator) * 0.1,
               "lokr_w2_a": torch.randn(8, 2, generator=generator) * 0.1,
               "lokr_w2_b": torch.randn(2, 8, generator=generator) * 0.1, "alpha": torch.tensor(1.0)}
    mapping = sgm.unet_module_map(pipe.unet.config)
    kohya = "lora_unet_" + mapping[to_q].replace(".", "_")
    save_file({f"{kohya}.{role}": t for role, t in payload.items()}, tmp_path / "kohya.safetensors")
    save_file({f"lycoris_{to_q.replace('.', '_')}.{role}": t for role, t in payload.items()},
              tmp_path / "simpletuner.safetensors")
    sdlora.load(pipe, tmp_path / "kohya.safetensors")
    expected = outputs(pipe)["unet"]
    sdlora.unload(pipe)
    assert not torch.allclose(outputs(pipe)["unet"], expected)
    sdlora.load(pipe, tmp_path / "simpletuner.safetensors")
    assert sdlora.list_adapters(pipe)[0].layout == "simpletuner"
    torch.testing.assert_close(outputs(pipe)["unet"], expected, atol=1e-6, rtol=0)


def test_onetrainer_text_projection_of_the_second_encoder(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "pipe", family="sdxl")
    pipe = load_pipeline(str(folder))
    projection = pipe.text_encoder_2.text_projection  # [32, 40]
    down, up = torch.randn(2, 40) * 0.1, torch.randn(32, 2) * 0.1
    save_file({"lora_te2_text_projection.lora_down.weight": down, "lora_te2_text_projection.lora_up.weight": up,
               "lora_te2_text_projection.alpha": torch.tensor(2.0)}, tmp_path / "onetrainer.safetensors")
    x = torch.randn(3, 40)
    expected = x @ (projection.weight + up @ down).T
    sdlora.load(pipe, tmp_path / "onetrainer.safetensors")
    torch.testing.assert_close(pipe.text_encoder_2.text_projection(x), expected, atol=1e-6, rtol=0)


def test_text_encoder_names_without_text_model_load_too(pipe, tmp_path):
    """LyCORIS running under transformers 5 names CLIP's modules without `text_model_`."""
    from conftest import make_adapter_file, te_out

    path = make_adapter_file(pipe, tmp_path / "a.safetensors", targets="attn")
    tensors = load_file(path)
    short = {key.replace("lora_te_text_model_", "lora_te_"): value for key, value in tensors.items()}
    assert short.keys() != tensors.keys()
    save_file(short, tmp_path / "short.safetensors")
    sdlora.load(pipe, path)
    expected = te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, tmp_path / "short.safetensors")
    torch.testing.assert_close(te_out(pipe), expected, atol=0, rtol=0)
