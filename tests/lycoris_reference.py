"""LyCORIS files and their outputs as the LyCORIS library itself computes them: the reference
sdlora's LyCORIS loader is tested against (test support; docs/lycoris-facts.md has the formulas).

`make_reference(pipe, "loha", path)` builds a LyCORIS network over copies of the pipeline's UNet
(and text encoder) with LyCORIS's own kohya entry point (`lycoris.kohya.create_network`, what
sd-scripts runs), fills every adapter tensor with seeded random values (LyCORIS starts some factors
at zero, and a ΔW of zero would prove nothing), saves the file with LyCORIS's own `save_weights`,
and returns the file's path with the outputs of the UNet and text encoder with the network applied
by LyCORIS (its forward, in eval mode) at each multiplier. The pipeline passed in is not changed.

Inputs and outputs are conftest's `unet_out` / `te_out`, so a loader test compares
`unet_out(pipe)` after loading the file with `reference.outputs["unet"][strength]`.

Names in the file are the kohya names A1111 and ComfyUI read: `lora_unet_<diffusers path>` and
`lora_te_text_model_<path>`. Two things in LyCORIS 4.1.3 need working around for that:
- its built-in "full" preset lists both the `TimestepEmbedding` class and the names
  `time_embedding.linear_1/2`, so on a diffusers UNet it wraps those twice and fails
  ("duplicated lora name"); we pass the classic SD preset (`SD_PRESET`) as a TOML file instead;
- it names text-encoder modules by the tree it is given, and transformers 5's CLIPTextModel has no
  `text_model.` level; we hand it the encoder under a `text_model` attribute so the names keep it.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from conftest import te_out, unet_out

MULTIPLIERS = (0.5, 1.0)

# The targets LyCORIS and kohya have always used for SD 1.x/2.x (every Linear and Conv2d of the UNet
# and every Linear of CLIP's attention and MLP); LyCORIS 4.1.3's own "full" preset minus the
# classes of other architectures, and minus `TimestepEmbedding`, which its names already cover.
SD_PRESET = {
    "enable_conv": True,
    "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPMLP"],
    "text_encoder_target_name": [],
}

# Named variants the sanity tests (and loader tests) use: (algo, options for create_network).
# On the tiny model's widths (4..256) LoKr's layout depends on rank and factor, see VARIANT_NOTES.
VARIANTS: dict[str, tuple[str, dict]] = {
    "locon": ("locon", {}),
    "locon-tucker": ("locon", {"use_tucker": True}),
    "loha": ("loha", {}),
    "loha-tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {"rank": 2, "conv_rank": 2, "alpha": 1.0}),
    "lokr-decompose-both": ("lokr", {"rank": 1, "conv_rank": 1, "decompose_both": True}),
    "lokr-full": ("lokr", {"full_matrix": True}),
    "lokr-tucker": ("lokr", {"rank": 2, "conv_rank": 2, "alpha": 1.0, "use_tucker": True}),
    "lokr-factor": ("lokr", {"factor": 4, "rank": 2, "conv_rank": 2, "alpha": 1.0}),
    "full": ("full", {}),
    "locon-dora": ("locon", {"dora_wd": True}),
    "locon-dora-in": ("locon", {"dora_wd": True, "wd_on_output": False}),
    "loha-dora": ("loha", {"dora_wd": True}),
    "lokr-dora": ("lokr", {"rank": 2, "conv_rank": 2, "alpha": 1.0, "dora_wd": True}),
}

VARIANT_NOTES = {
    "lokr": "lokr_w1 full; lokr_w2_a/b wherever rank < max(w2 dims)/2, lokr_w2 full elsewhere",
    "lokr-decompose-both": "lokr_w1_a/b wherever rank < max(w1 dims)/2 as well",
    "lokr-full": "full_matrix: lokr_w1 and lokr_w2 everywhere, scale 1 whatever alpha says",
    "lokr-tucker": "3x3 convs with a factorized w2 carry lokr_t2",
    "lokr-factor": "factor=4: w1 is 4 x 4 (or smaller) wherever the widths divide by 4",
}

# Each module's ΔW (at multiplier 1, before DoRA) is rescaled to this fraction of its weight's norm:
# outputs move clearly, nothing saturates, whatever the algo and layout.
DELTA_RATIO = 0.15

class LycorisReference(NamedTuple):
    path: Path
    outputs: dict  # {"unet": {multiplier: tensor}, "text_encoder": {multiplier: tensor}} (no TE key without one)
    base: dict  # {"unet": tensor, "text_encoder": tensor}: the same inputs without the network
    network: object  # the applied LyCORIS network, on the copies, at the last multiplier: to look inside


def _quiet_lycoris():
    from lycoris.logging import logger

    logger.setLevel(logging.WARNING)


def build_network(unet, text_encoder, algo: str, *, rank: int = 4, alpha: float = 2.0,
                  conv_rank: int | None = None, conv_alpha: float | None = None, **options):
    """A LyCORIS network (kohya flavour: `lora_unet_` / `lora_te_` names) over the given modules.

    `text_encoder` may be None. Options go to `lycoris.kohya.create_network` as sd-scripts'
    `--network_args` would (use_tucker, dora_wd, wd_on_output, factor, decompose_both,
    full_matrix, use_scalar, ...). The network is created but not applied.
    """
    import toml
    from lycoris import kohya

    _quiet_lycoris()
    # Class attributes that earlier presets may have set; SD_PRESET does not mention them.
    kohya.LycorisNetworkKohya.MODULE_ALGO_MAP = {}
    kohya.LycorisNetworkKohya.NAME_ALGO_MAP = {}
    kohya.LycorisNetworkKohya.USE_FNMATCH = False
    kohya.LycorisNetworkKohya.TARGET_EXCLUDE_NAME = []
    holder = None
    if text_encoder is not None:
        if hasattr(text_encoder, "text_model"):  # transformers 4 keeps the level itself
            holder = text_encoder
        else:
            holder = torch.nn.Module()
            holder.text_model = text_encoder
    with tempfile.TemporaryDirectory() as folder:
        preset = Path(folder) / "sd.toml"
        preset.write_text(toml.dumps(SD_PRESET))
        network = kohya.create_network(
            1.0, rank, alpha, None, holder, unet,
            algo=algo, conv_dim=conv_rank or rank, conv_alpha=conv_alpha if conv_alpha is not None else alpha,
            preset=str(preset), warn_on_unmatched=False, **options)
    return network


def _delta(lora) -> torch.Tensor:
    """ΔW as the module's own forward builds it (scale included, multiplier and DoRA not)."""
    kind = type(lora).__name__
    if kind == "LoConModule":
        return lora.make_weight() * lora.scale
    if kind in ("LohaModule", "LokrModule"):
        return lora.get_weight(lora.shape)
    if kind == "FullModule":
        return lora.weight
    raise ValueError(f"no reference for LyCORIS module {kind}")


# The one tensor each kind's ΔW is linear in, used to set its size.
_LINEAR_IN = {"LoConModule": ("lora_up.weight",), "LohaModule": ("hada_w1_a",),
              "LokrModule": ("lokr_w1", "lokr_w1_a"), "FullModule": ("weight",)}


@torch.no_grad()
def randomize_network(network, seed: int = 0, ratio: float = DELTA_RATIO) -> None:
    """Seeded non-zero values in every adapter tensor, before `apply_to`.

    Every factor is drawn from N(0, 1), then the one ΔW is linear in is rescaled so that
    ‖ΔW‖ = ratio·‖W‖ for that module. dora_scale becomes the layer's own norm times a random
    factor in [0.8, 1.2] (LyCORIS starts it at the norm). A `full` module holds ΔW itself until
    `apply_to` adds the original weight in.
    """
    generator = torch.Generator().manual_seed(seed)
    for lora in network.loras:
        for name, parameter in lora.named_parameters():
            if name == "dora_scale":
                parameter.mul_(0.8 + 0.4 * torch.rand(parameter.shape, generator=generator))
            elif name == "scalar":  # use_scalar: baked into the first factor when saved
                parameter.fill_(0.5 + torch.rand((), generator=generator).item())
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
        parameters = dict(lora.named_parameters())
        target = next(parameters[name] for name in _LINEAR_IN[type(lora).__name__] if name in parameters)
        target.mul_(ratio * lora.org_module[0].weight.norm() / _delta(lora).norm())
        if parameters.get("bias") is not None:  # full: diff_b, sized like ΔW against the bias
            bias = parameters["bias"]
            bias.mul_(ratio * lora.org_module[0].bias.norm() / bias.norm())


def make_reference(pipe, algo: str, path, *, text_encoder: bool = True, seed: int = 0,
                   multipliers=MULTIPLIERS, **options) -> LycorisReference:
    """Write a LyCORIS file for `pipe` at `path` and return it with LyCORIS's outputs.

    `algo` is a LyCORIS algo ("locon", "loha", "lokr", "full") or a key of VARIANTS (whose options
    the given ones extend). Options: rank (4), alpha (2.0), conv_rank (rank), conv_alpha (alpha),
    and any create_network option. Outputs are float32 on the CPU, computed on deep copies of the
    pipeline's UNet and text encoder, which stay as they were.
    """
    if algo in VARIANTS:
        algo, preset_options = VARIANTS[algo]
        options = {**preset_options, **options}
    path = Path(path)
    unet = copy.deepcopy(pipe.unet).float().eval()
    encoder = copy.deepcopy(pipe.text_encoder).float().eval() if text_encoder else None
    base = {"unet": unet_out(unet)}
    if encoder is not None:
        base["text_encoder"] = te_out(encoder)

    network = build_network(unet, encoder, algo, **options)
    randomize_network(network, seed)
    network.apply_to(encoder, unet, apply_text_encoder=encoder is not None, apply_unet=True)
    network.eval()
    network.save_weights(str(path), None, {})

    outputs = {"unet": {}}
    if encoder is not None:
        outputs["text_encoder"] = {}
    for multiplier in multipliers:
        network.set_multiplier(float(multiplier))
        outputs["unet"][float(multiplier)] = unet_out(unet)
        if encoder is not None:
            outputs["text_encoder"][float(multiplier)] = te_out(encoder)
    return LycorisReference(path, outputs, base, network)
