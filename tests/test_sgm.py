"""sdlora.base_models.sgm against diffusers' own converters, for toy and real (meta-device) UNet configs."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from sdlora.base_models import sgm
from sdlora.base_models.families import SDXL as SDXL_FAMILY
from sdlora.files.names import kohya_index, kohya_name
from sdlora.toy.pipelines import build_clip_tokenizer, tiny_sdxl_unet, tiny_unet, tiny_vae

# Public UNet configs (huggingface.co/<repo>/blob/main/unet/config.json); the rest are diffusers' defaults.
SD15 = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
    "attention_head_dim": 8, "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SD21 = {**SD15, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
        "sample_size": 96}
SDXL = {
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def meta_unet(config: dict):
    """The real architecture with no memory behind it: enough for names, shapes and identity."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel(**config)


UNETS = {
    "tiny-sdxl": tiny_sdxl_unet,
    "tiny-sd1": tiny_unet,
    "sdxl": lambda: meta_unet(SDXL),
    "sd15": lambda: meta_unet(SD15),
    "sd21": lambda: meta_unet(SD21),
}


# Class-conditioned UNets (label_emb is an embedding table or a projection MLP), for the weight
# names only: their label_emb.0.0 means add_embedding to diffusers' LoRA loader, which assumes SDXL.
CLASS_UNETS = {
    "class-labels": lambda: meta_unet({**SD15, "num_class_embeds": 1000}),
    "class-projection": lambda: meta_unet({**SD15, "class_embed_type": "projection",
                                           "projection_class_embeddings_input_dim": 16}),
}


@pytest.fixture(scope="module", params=list(UNETS))
def unet(request):
    return UNETS[request.param]()


@pytest.fixture(scope="module", params=list(UNETS) + list(CLASS_UNETS))
def any_unet(request):
    return {**UNETS, **CLASS_UNETS}[request.param]()


def parameter_modules(model) -> set[str]:
    return {name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))}


def lora_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]


def test_map_covers_every_parameter_one_to_one(any_unet):
    unet = any_unet
    mapping = sgm.unet_module_map(unet.config)
    assert set(mapping) == parameter_modules(unet)
    inverse = sgm.invert(mapping)
    assert len(inverse) == len(mapping)
    originals = {sgm.to_original(name, mapping) for name in unet.state_dict()}
    assert len(originals) == len(unet.state_dict())
    assert all(sgm.to_diffusers(sgm.to_original(name, mapping), inverse) == name for name in unet.state_dict())


def test_diffusers_single_file_converter_gives_the_state_dict_back(any_unet):
    """Our original-layout state dict, read by diffusers' own LDM converter, is the model's again."""
    unet = any_unet
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state_dict = unet.state_dict()
    checkpoint = sgm.unet_state_dict_to_original(state_dict, unet.config, prefix="model.diffusion_model.")
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    assert converted.keys() == state_dict.keys()
    # The very same tensors, each under the name it came from (meta tensors have no values to compare).
    assert all(converted[name] is state_dict[name] for name in state_dict)
    inverse = sgm.invert(sgm.unet_module_map(unet.config))
    assert {sgm.to_diffusers(name.removeprefix("model.diffusion_model."), inverse) for name in checkpoint} \
        == state_dict.keys()


def diffusers_lora_module(key: str) -> str:
    """The module a key of `_convert_non_diffusers_lora_to_diffusers`' output is for."""
    key = re.sub(r"(\.lora)?\.down\.weight$", "", key.removeprefix("unet.")).replace(".processor.", ".")
    # attention projections come out in diffusers' old processor spelling: attn1.processor.to_q_lora
    return re.sub(r"to_(q|k|v)_lora$", r"to_\1", key).replace("to_out_lora", "to_out.0")


def test_names_agree_with_diffusers_sgm_lora_mapping(unet):
    """kohya SGM names, mapped by diffusers' LoRA loader, land on the module we named.

    One module at a time: diffusers' mapper matches `input_blocks_1` inside `input_blocks_10`, so it
    cannot take SD 1.x's twelve input blocks at once (SDXL has nine).
    """
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    mapping = sgm.unet_module_map(unet.config)
    config = SimpleNamespace(layers_per_block=unet.config.layers_per_block)
    landed = {}
    for module in lora_modules(unet):
        name = kohya_name(SDXL_FAMILY, f"unet.{module}", mapping)
        lora = {f"{name}.lora_down.weight": torch.zeros(1), f"{name}.lora_up.weight": torch.zeros(1)}
        converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(lora, config))
        [down] = [key for key in converted if key.endswith(".down.weight")]
        landed[module] = diffusers_lora_module(down)
    wrong = {module: there for module, there in landed.items() if module != there}
    attention = [module for module in landed if ".attentions." in module]
    assert attention and not any(module in wrong for module in attention)
    # diffusers files an upsampler that follows no attention (SD 1.x's output_blocks.2.1.conv) under
    # attentions; its own single-file converter, checked above, agrees with us.
    assert wrong == ({"up_blocks.0.upsamplers.0.conv": "up_blocks.0.attentions.2.conv"}
                     if unet.config.up_block_types[0] == "UpBlock2D" else {})


def test_known_sdxl_names():
    mapping = sgm.unet_module_map(SDXL)
    assert mapping["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert kohya_name(SDXL_FAMILY, "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", mapping) == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert mapping["mid_block.attentions.0.transformer_blocks.9.ff.net.2"] == \
        "middle_block.1.transformer_blocks.9.ff.net.2"
    assert mapping["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert mapping["up_blocks.1.resnets.2.conv_shortcut"] == "output_blocks.5.0.skip_connection"
    assert mapping["down_blocks.1.downsamplers.0.conv"] == "input_blocks.6.0.op"
    assert mapping["add_embedding.linear_2"] == "label_emb.0.2"
    assert sgm.to_diffusers("input_blocks.7.1.proj_in.lora_down.weight", sgm.invert(mapping)) == \
        "down_blocks.2.attentions.0.proj_in.lora_down.weight"
    index = kohya_index(SDXL_FAMILY, [f"unet.{path}" for path in mapping], mapping)
    assert index["lora_unet_output_blocks_0_0_emb_layers_1"] == "unet.up_blocks.0.resnets.0.time_emb_proj"
    with pytest.raises(KeyError):
        sgm.to_original("down_blocks.0.attentions.0.proj_in.weight", mapping)  # SDXL's first level has none
    assert sgm.unet_module_map(SD15)["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"


def test_uneven_layers_per_block_still_cover_the_model():
    """The original numbering runs on through the levels, so per-level layer counts work too."""
    config = {**SD15, "block_out_channels": [16, 32], "layers_per_block": [1, 2], "norm_num_groups": 8,
              "attention_head_dim": 2, "cross_attention_dim": 8, "transformer_layers_per_block": [1, 2],
              "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]}
    unet = meta_unet(config)
    mapping = sgm.unet_module_map(unet.config)
    assert set(mapping) == parameter_modules(unet) and len(sgm.invert(mapping)) == len(mapping)
    assert mapping["down_blocks.1.resnets.1.conv2"] == "input_blocks.4.0.out_layers.3"
    assert mapping["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert mapping["up_blocks.1.resnets.1.conv1"] == "output_blocks.4.0.in_layers.2"


def test_layouts_without_an_original_equivalent_are_refused():
    with pytest.raises(ValueError, match="dual_cross_attention"):
        sgm.unet_module_map({**SD15, "dual_cross_attention": True})
    with pytest.raises(ValueError, match="SimpleCrossAttn"):
        sgm.unet_module_map({**SD15, "down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


def tiny_sdxl_pipeline():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_clip_tokenizer(("a", "red", "circle"))
    encoder = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, projection_dim=32, bos_token_id=len(tokenizer) - 2,
                             eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    torch.manual_seed(0)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(encoder), text_encoder_2=CLIPTextModelWithProjection(encoder),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=tiny_sdxl_unet(cross_attention_dim=64, pooled_dim=32),
        scheduler=EulerDiscreteScheduler(), add_watermarker=False,
    )


def test_sdxl_pipeline_loads_a_kohya_lora_named_by_us(reference_client):
    """Every Linear and Conv2d of the UNet, named the SGM way, loads into exactly that module."""
    pipe = tiny_sdxl_pipeline()
    mapping = sgm.unet_module_map(pipe.unet.config)
    modules = dict(pipe.unet.named_modules())
    generator = torch.Generator().manual_seed(0)
    lora, downs = {}, {}
    for path in lora_modules(pipe.unet):
        layer, name = modules[path], kohya_name(SDXL_FAMILY, f"unet.{path}", mapping)
        if isinstance(layer, torch.nn.Conv2d):  # kohya's LoCon: the layer's kernel down, 1x1 up
            down = torch.randn(2, layer.in_channels, *layer.kernel_size, generator=generator)
            up = torch.randn(layer.out_channels, 2, 1, 1, generator=generator)
        else:
            down = torch.randn(2, layer.in_features, generator=generator)
            up = torch.randn(layer.out_features, 2, generator=generator)
        lora |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(1.0)}
        downs[path] = down

    pipe.load_lora_weights(dict(lora), adapter_name="kohya")
    loaded = {path.removesuffix(".lora_A.kohya"): module.weight for path, module in pipe.unet.named_modules()
              if path.endswith(".lora_A.kohya")}
    assert loaded.keys() == downs.keys()
    assert all(torch.equal(loaded[path], downs[path]) for path in downs)
