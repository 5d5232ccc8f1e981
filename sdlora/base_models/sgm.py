"""The original (LDM/SGM) UNet layout <-> diffusers module paths, generated from a UNet config.

kohya, A1111 and ComfyUI name UNet modules the way the original `openaimodel.UNetModel` nests them
(`input_blocks.4.1.transformer_blocks.0.attn1.to_q`); diffusers nests them by block type
(`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). The numbering depends on the
config (layers per block, which blocks attend, where the resamplers sit), so the correspondence is
derived from it rather than written out for one model. Checked against diffusers'
`convert_ldm_unet_checkpoint` and `_maybe_map_sgm_blocks_to_diffusers` in tests/test_sgm.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

# diffusers' ResnetBlock2D part -> the original ResBlock's; the gaps in the original numbering
# (in_layers.1, emb_layers.0, out_layers.1-2) are activations and dropout, which hold no parameters.
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# One BasicTransformerBlock as UNet2DConditionModel builds it (cross-attention always on, GEGLU
# feed-forward); the original SpatialTransformer uses the very same names.
_TRANSFORMER_BLOCK = (
    "norm1", *(f"attn1.{part}" for part in _ATTENTION),
    "norm2", *(f"attn2.{part}" for part in _ATTENTION),
    "norm3", "ff.net.0.proj", "ff.net.2",
)

# UNet2DConditionModel's defaults, for configs that leave a key out.
_DEFAULTS: dict[str, Any] = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "norm_num_groups": 32,
    "class_embed_type": None,
    "num_class_embeds": None,
    "addition_embed_type": None,
}

# Config values the original layout has no place for: (key, value that is fine).
_UNSUPPORTED = (
    ("time_embedding_type", "positional"), ("time_cond_proj_dim", None), ("encoder_hid_dim", None),
    ("encoder_hid_dim_type", None),
    ("dual_cross_attention", False), ("cross_attention_norm", None), ("attention_type", "default"),
    ("class_embeddings_concat", False),
)


def _setting(config: Mapping[str, Any], key: str) -> Any:
    return config.get(key, _DEFAULTS.get(key))


def _per_layer(value: int | list[int] | tuple[int, ...], layers: int) -> list[int]:
    """transformer_layers_per_block entries are one depth for the block or one per layer."""
    return [value] * layers if isinstance(value, int) else list(value)


def _check(config: Mapping[str, Any]) -> None:
    for key, fine in _UNSUPPORTED:
        if config.get(key, fine) != fine:
            raise ValueError(f"the original UNet layout has no equivalent of {key}={config[key]!r}")
    if _setting(config, "resnet_time_scale_shift") in ("ada_group", "spatial"):
        raise ValueError("the original UNet layout has no conditioned-norm resnets")
    if _setting(config, "norm_num_groups") is None:
        raise ValueError("the original UNet layout always has the output norm (norm_num_groups=None)")
    if _setting(config, "mid_block_type") not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"the original UNet layout has no {_setting(config, 'mid_block_type')}")
    if _setting(config, "addition_embed_type") not in (None, "text_time"):
        raise ValueError(f"addition_embed_type={_setting(config, 'addition_embed_type')!r} is not supported")
    if _setting(config, "addition_embed_type") and (_setting(config, "class_embed_type")
                                                    or _setting(config, "num_class_embeds")):
        raise ValueError("class and addition embeddings would both be the original label_emb")
    if _setting(config, "class_embed_type") not in (None, "timestep", "projection", "identity"):
        raise ValueError(f"class_embed_type={_setting(config, 'class_embed_type')!r} is not supported")


def _resnet(diffusers: str, original: str, channels_in: int, channels_out: int) -> dict[str, str]:
    # ResnetBlock2D gets a 1x1 shortcut convolution exactly when the channel count changes.
    parts = [part for part in RESNET_PARTS if part != "conv_shortcut" or channels_in != channels_out]
    return {f"{diffusers}.{part}": f"{original}.{RESNET_PARTS[part]}" for part in parts}


def _transformer(diffusers: str, original: str, depth: int) -> dict[str, str]:
    inner = ["norm", "proj_in", *(f"transformer_blocks.{k}.{part}" for k in range(depth)
                                  for part in _TRANSFORMER_BLOCK), "proj_out"]
    return {f"{diffusers}.{part}": f"{original}.{part}" for part in inner}


def _embeddings(config: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    yield "conv_in", "input_blocks.0.0"
    yield "time_embedding.linear_1", "time_embed.0"
    yield "time_embedding.linear_2", "time_embed.2"
    # The original has one label_emb for both: an MLP (SDXL's size/crop conditioning, projected or
    # timestep class labels) or an embedding table (num_class_embeds).
    if _setting(config, "addition_embed_type") == "text_time":
        yield "add_embedding.linear_1", "label_emb.0.0"
        yield "add_embedding.linear_2", "label_emb.0.2"
    elif _setting(config, "class_embed_type") in ("timestep", "projection"):
        yield "class_embedding.linear_1", "label_emb.0.0"
        yield "class_embedding.linear_2", "label_emb.0.2"
    elif _setting(config, "class_embed_type") is None and _setting(config, "num_class_embeds") is not None:
        yield "class_embedding", "label_emb"
    yield "conv_norm_out", "out.0"
    yield "conv_out", "out.2"


def unet_module_map(unet_config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module path -> original module path, for every UNet module that holds parameters.

    `unet_config` is a UNet2DConditionModel config (`unet.config` or its config.json as a dict).
    """
    _check(unet_config)
    channels = list(_setting(unet_config, "block_out_channels"))
    down_types = list(_setting(unet_config, "down_block_types"))
    up_types = list(_setting(unet_config, "up_block_types"))
    layers = _setting(unet_config, "layers_per_block")
    layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
    depths = _setting(unet_config, "transformer_layers_per_block")
    depths = [depths] * len(channels) if isinstance(depths, int) else list(depths)
    up_depths = _setting(unet_config, "reverse_transformer_layers_per_block") or depths[::-1]
    for kind in (*down_types, *up_types):
        if kind not in ("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"):
            raise ValueError(f"the original UNet layout has no {kind}")

    mapping = dict(_embeddings(unet_config))

    # Input blocks: input_blocks.0 is conv_in; then one block per resnet (with its attention as .1)
    # and one per downsampler, numbered consecutively through all levels.
    index = 1
    for i, kind in enumerate(down_types):
        channels_in = channels[max(i - 1, 0)]
        attends = kind.startswith("CrossAttn")
        block_depths = _per_layer(depths[i], layers[i])
        for j in range(layers[i]):
            mapping |= _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{index}.0",
                               channels_in if j == 0 else channels[i], channels[i])
            if attends:
                mapping |= _transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{index}.1", block_depths[j])
            index += 1
        if i < len(channels) - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1

    # Middle block: resnet, attention, resnet.
    if _setting(unet_config, "mid_block_type") is not None:
        mapping |= _resnet("mid_block.resnets.0", "middle_block.0", channels[-1], channels[-1])
        mapping |= _transformer("mid_block.attentions.0", "middle_block.1", _per_layer(depths[-1], 1)[0])
        mapping |= _resnet("mid_block.resnets.1", "middle_block.2", channels[-1], channels[-1])

    # Output blocks: one per resnet (layers + 1 per level, each taking a skip connection), with its
    # attention as .1; a level's upsampler joins its last output block, after the attention if any.
    reversed_channels, index = channels[::-1], 0
    for i, kind in enumerate(up_types):
        out, previous = reversed_channels[i], reversed_channels[max(i - 1, 0)]
        skip_last = reversed_channels[min(i + 1, len(channels) - 1)]
        count = layers[::-1][i] + 1
        attends = kind.startswith("CrossAttn")
        block_depths = _per_layer(up_depths[i], count)
        for j in range(count):
            channels_in = (previous if j == 0 else out) + (skip_last if j == count - 1 else out)
            mapping |= _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{index}.0", channels_in, out)
            if attends:
                mapping |= _transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{index}.1", block_depths[j])
            if j == count - 1 and i < len(channels) - 1:
                mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{2 if attends else 1}.conv"
            index += 1
    return mapping


def invert(mapping: Mapping[str, str]) -> dict[str, str]:
    """original module path -> diffusers module path (the map is one-to-one)."""
    inverse = {original: diffusers for diffusers, original in mapping.items()}
    if len(inverse) != len(mapping):
        raise ValueError("the module map is not one-to-one")
    return inverse


def _rename(name: str, table: Mapping[str, str]) -> str:
    """Swap the longest module path that `name` starts with (`...to_q.weight`, `...to_q.lora_A.weight`)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    raise KeyError(f"{name!r} is not a parameter of any mapped UNet module")


def to_original(name: str, mapping: Mapping[str, str]) -> str:
    """`down_blocks.1.attentions.0...to_q.weight` -> `input_blocks.4.1...to_q.weight`."""
    return _rename(name, mapping)


def to_diffusers(name: str, inverse: Mapping[str, str]) -> str:
    """`input_blocks.4.1...to_q.weight` -> `down_blocks.1.attentions.0...to_q.weight` (`inverse = invert(map)`)."""
    return _rename(name, inverse)


def unet_state_dict_to_original(state_dict: Mapping[str, Any], unet_config: Mapping[str, Any],
                                prefix: str = "") -> dict[str, Any]:
    """A diffusers UNet state dict with original names; prefix `model.diffusion_model.` for checkpoints."""
    mapping = unet_module_map(unet_config)
    return {prefix + to_original(name, mapping): value for name, value in state_dict.items()}
