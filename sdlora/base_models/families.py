"""Model families: what differs between SD 1.x, SD 2.x and SDXL, each in one object.

A `Family` knows its components and their kohya names, how captions become the UNet's conditioning
(hidden states, and for SDXL the pooled embedding and the size/crop `time_ids`), its defaults, its
diffusers pipeline and tokenizers, the shipped architecture its files are read against, where its
text encoders sit in an original checkpoint, and what an adapter's header says about it. Code
elsewhere asks the family for these; none of it branches on a family's name
(tests/test_layering.py checks that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelError

KOHYA_UNET_PREFIX = "lora_unet"


@dataclass(frozen=True)
class TextConditioning:
    """What the text encoders give the UNet for a batch of captions."""

    hidden: torch.Tensor  # [batch, tokens, width]
    pooled: torch.Tensor | None = None  # [batch, width]: SDXL's second encoder, projected

    def __getitem__(self, rows) -> "TextConditioning":
        return TextConditioning(self.hidden[rows], None if self.pooled is None else self.pooled[rows])

    def to(self, device) -> "TextConditioning":
        """On `device`, copied without waiting (from the host, a waiting copy would be a sync per step)."""
        def move(tensor):
            return tensor.to(device, non_blocking=True)

        return TextConditioning(move(self.hidden), None if self.pooled is None else move(self.pooled))

    @staticmethod
    def stack(rows: list["TextConditioning"]) -> "TextConditioning":
        pooled = None if rows[0].pooled is None else torch.stack([row.pooled for row in rows])
        return TextConditioning(torch.stack([row.hidden for row in rows]), pooled)


@dataclass(frozen=True)
class ImageGeometry:
    """Where a training image came from, as SDXL's size conditioning wants it: (height, width) pairs."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def time_ids(self) -> list[int]:
        return [*self.original_size, *self.crop_top_left, *self.target_size]


@dataclass(frozen=True)
class TextOptions:
    """How captions are encoded. clip_skip counts as A1111 and kohya do: 1 is the last layer."""

    clip_skip: int | None = None  # None: the family's own (SDXL: the penultimate layer)
    chunks: int = 1  # windows of the encoder's length, concatenated (A1111's 150 / 225 tokens)


@dataclass(frozen=True)
class CheckpointTextEncoder:
    """Where one text encoder sits in an original (LDM/SGM) single-file checkpoint, and in whose names."""

    prefix: str  # before transformers' `text_model.` names, or before OpenCLIP's own
    open_clip: bool = False  # OpenCLIP's names (q/k/v fused into in_proj), not transformers' CLIP names


@dataclass(frozen=True)
class Family:
    """One model family: names other tools use for it and its modules, its conditioning, its defaults."""

    name: str
    title: str
    text_encoders: tuple[str, ...]
    kohya_prefixes: dict[str, str]  # component -> kohya's name prefix
    base_model_version: str  # kohya's ss_base_model_version (v-prediction adds "_v" for SD 2.x)
    architecture: str  # modelspec.architecture without the resolution/prediction part and "/lora"
    default_clip_skip: int
    comfy_text_encoders: dict[str, str]  # ComfyUI's name of each text encoder (clip_l, ...) -> component
    context_width: int  # the text width the UNet cross-attends to (SDXL: both encoders', concatenated)
    # The shipped config (base_models/configs) that reads this family's files when no model is given.
    standard_architecture: str
    tokenizers: tuple[str, ...]  # the pipeline's tokenizer attributes, one per text encoder, in order
    checkpoint_text_encoders: dict[str, CheckpointTextEncoder]  # component -> its place in a single file
    pipeline_class: str = "StableDiffusionPipeline"  # the diffusers class, by name (diffusers loads lazily)
    # What the pipeline is built with, so that previews show what the model makes (no safety checker,
    # no watermark) and nothing is fetched for parts we drop.
    pipeline_options: dict = field(default_factory=lambda: {
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False})
    projected_text_encoders: tuple[str, ...] = ()  # encoders that are CLIPTextModelWithProjection
    # A second shipped architecture with the same weights that predicts noise rather than velocity
    # (SD 2.x 512-base beside 768-v); a single file's weights cannot tell them apart.
    epsilon_architecture: str | None = None
    # -- the header
    # modelspec.architecture per prediction type, where the family names them apart (SD 2.x)
    architecture_by_prediction: dict[str, str] = field(default_factory=dict)
    v_version_suffix: str = "_v"  # added to ss_base_model_version for a v-prediction model
    kohya_v2: bool = False  # kohya's ss_v2 flag
    sgm_unet_names: bool = False  # kohya and A1111 name this family's UNet modules by the original layout
    pooled_text: bool = False
    size_conditioning: bool = False
    aliases: tuple[str, ...] = field(default=())

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", *self.text_encoders)

    @property
    def shipped_architectures(self) -> tuple[str, ...]:
        return (self.standard_architecture, *([self.epsilon_architecture] if self.epsilon_architecture else []))

    def shipped_architecture(self, prediction_type: str | None = None) -> str:
        """The shipped config for a model of this family; "epsilon" picks the noise-predicting one
        where the family has two (like diffusers, the v-prediction one otherwise)."""
        if prediction_type == "epsilon" and self.epsilon_architecture:
            return self.epsilon_architecture
        return self.standard_architecture

    # -- conditioning

    def encode_text(self, encoders: list, tokenizers: list, captions: list[str],
                    options: TextOptions = TextOptions()) -> TextConditioning:
        """Captions -> what the UNet is conditioned on, for this family's text encoders."""
        clip_skip = options.clip_skip or self.default_clip_skip
        hidden, pooled = [], None
        for index, (encoder, tokenizer) in enumerate(zip(encoders, tokenizers)):
            chunks = [encoder(ids.to(encoder.device), output_hidden_states=True)
                      for ids in chunked_token_ids(tokenizer, captions, options.chunks)]
            states = [self._hidden_states(encoder, output, clip_skip) for output in chunks]
            hidden.append(torch.cat(states, dim=1))
            if self.pooled_text and index == len(encoders) - 1:
                pooled = chunks[0].text_embeds  # A1111 pools the first window
        return TextConditioning(torch.cat(hidden, dim=-1), pooled)

    def _hidden_states(self, encoder, output, clip_skip: int) -> torch.Tensor:
        if self.pooled_text:  # SDXL: the chosen layer as it is (the original takes the penultimate, no norm)
            return output.hidden_states[-clip_skip]
        if clip_skip == 1:
            return output.last_hidden_state
        # SD 1.x/2.x with clip skip: an earlier layer, through the final layer norm, as A1111 does
        final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
        return final_norm(output.hidden_states[-clip_skip])

    def unet_inputs(self, text: TextConditioning, geometry: list[ImageGeometry] | None = None) -> dict:
        """Keyword arguments of the UNet's forward for a batch, after the noisy latents and timesteps."""
        inputs = {"encoder_hidden_states": text.hidden}
        if self.size_conditioning:
            if text.pooled is None or geometry is None:
                raise ValueError(f"{self.title} needs the pooled text embedding and each image's geometry")
            time_ids = torch.tensor([g.time_ids() for g in geometry], dtype=text.hidden.dtype,
                                    device=text.hidden.device)
            inputs["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": time_ids}
        return inputs

    # -- what the header says

    def header(self, prediction_type: str, resolution: int | tuple[int, int] | None) -> dict[str, str]:
        """The metadata keys A1111, ComfyUI and kohya's tools read to tell families apart, for this run."""
        v = prediction_type == "v_prediction"
        architecture = self.architecture_by_prediction.get("v_prediction" if v else "epsilon", self.architecture)
        return {
            "ss_base_model_version": self.base_model_version + (self.v_version_suffix if v else ""),
            "ss_v2": str(self.kohya_v2),
            "ss_v_parameterization": str(v),
            "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if self.sgm_unet_names
                                         else "diffusers"),
            "modelspec.prediction_type": "v" if v else "epsilon",
        } | ({} if resolution is None else {"modelspec.resolution": "{}x{}".format(
            *((resolution, resolution) if isinstance(resolution, int) else resolution))})


SD1 = Family(
    name="sd1", title="Stable Diffusion 1.x", text_encoders=("text_encoder",),
    kohya_prefixes={"unet": KOHYA_UNET_PREFIX, "text_encoder": "lora_te"},
    base_model_version="sd_v1", architecture="stable-diffusion-v1", default_clip_skip=1,
    comfy_text_encoders={"clip_l": "text_encoder"},
    context_width=768, standard_architecture="sd15", tokenizers=("tokenizer",),
    checkpoint_text_encoders={"text_encoder": CheckpointTextEncoder("cond_stage_model.transformer.")},
    aliases=("sd_v1", "stable-diffusion-v1"),
)
SD2 = Family(
    name="sd2", title="Stable Diffusion 2.x", text_encoders=("text_encoder",),
    kohya_prefixes={"unet": KOHYA_UNET_PREFIX, "text_encoder": "lora_te"},
    base_model_version="sd_v2", architecture="stable-diffusion-v2", default_clip_skip=1,
    comfy_text_encoders={"clip_h": "text_encoder"},
    context_width=1024, standard_architecture="sd21-v", epsilon_architecture="sd21-base", tokenizers=("tokenizer",),
    checkpoint_text_encoders={"text_encoder": CheckpointTextEncoder("cond_stage_model.model.", open_clip=True)},
    architecture_by_prediction={"v_prediction": "stable-diffusion-v2-768-v", "epsilon": "stable-diffusion-v2-512"},
    kohya_v2=True,
    aliases=("sd_v2", "stable-diffusion-v2"),
)
SDXL = Family(
    name="sdxl", title="Stable Diffusion XL", text_encoders=("text_encoder", "text_encoder_2"),
    kohya_prefixes={"unet": KOHYA_UNET_PREFIX, "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    base_model_version="sdxl_base_v1-0", architecture="stable-diffusion-xl-v1-base", default_clip_skip=2,
    comfy_text_encoders={"clip_l": "text_encoder", "clip_g": "text_encoder_2"},
    context_width=2048, standard_architecture="sdxl-base", tokenizers=("tokenizer", "tokenizer_2"),
    checkpoint_text_encoders={
        "text_encoder": CheckpointTextEncoder("conditioner.embedders.0.transformer."),
        "text_encoder_2": CheckpointTextEncoder("conditioner.embedders.1.model.", open_clip=True),
    },
    pipeline_class="StableDiffusionXLPipeline", pipeline_options={"add_watermarker": False},
    projected_text_encoders=("text_encoder_2",), v_version_suffix="",
    sgm_unet_names=True, pooled_text=True, size_conditioning=True,
    aliases=("sdxl", "stable-diffusion-xl"),
)
FAMILIES: dict[str, Family] = {family.name: family for family in (SD1, SD2, SDXL)}
_BY_CONTEXT_WIDTH = {family.context_width: family for family in FAMILIES.values()}


def family_of_context_width(width: int | None) -> Family | None:
    """The family whose UNet cross-attends to text of this width (768, 1024, 2048), if any."""
    return _BY_CONTEXT_WIDTH.get(width)


def family_of_architecture(name: str) -> Family:
    """The family of a shipped architecture (`sd15`, `sd21-base`, ...)."""
    for family in FAMILIES.values():
        if name in family.shipped_architectures:
            return family
    raise KeyError(f"no family ships architecture {name!r}")


def is_xl_model_index(model_index: dict) -> bool:
    """Whether a diffusers folder's model_index.json is SDXL's: its pipeline class, or a second text encoder."""
    return (str(model_index.get("_class_name", "")).startswith(SDXL.pipeline_class)
            or "text_encoder_2" in model_index)


def pipeline_for(model_index: dict) -> tuple[str, dict]:
    """The diffusers pipeline class name and options for a folder with this model_index.json. SD 1.x
    and 2.x share theirs, so the index need not say which it is (the UNet's config does, once loaded)."""
    family = SDXL if is_xl_model_index(model_index) else SD1
    return family.pipeline_class, dict(family.pipeline_options)


def chunked_token_ids(tokenizer, captions: list[str], chunks: int = 1) -> list[torch.Tensor]:
    """Token ids in `chunks` windows of the tokenizer's length, each `<start> up to N-2 tokens <end> <pad>…`.

    With one chunk this is exactly the usual `padding="max_length", truncation=True`; more chunks
    carry the rest of a long caption, as A1111 does for prompts over 75 tokens.
    """
    length = tokenizer.model_max_length
    if chunks == 1:
        return [tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids]
    window = length - 2
    bodies = [ids[:window * chunks] for ids in tokenizer(captions, add_special_tokens=False, verbose=False).input_ids]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    windows = []
    for chunk in range(chunks):
        rows = []
        for body in bodies:
            piece = body[chunk * window:(chunk + 1) * window]
            rows.append([start, *piece, end] + [pad] * (window - len(piece)))
        windows.append(torch.tensor(rows, dtype=torch.long))
    return windows


# ---------------------------------------------------------------- telling families apart


def detect_family(parts: dict) -> Family:
    """SD 1.x, 2.x or SDXL, from the UNet config (or the text encoder's width when alone)."""
    unet = parts.get("unet")
    if "text_encoder_2" in parts or (unet is not None and unet.config.get("addition_embed_type") == "text_time"):
        return SDXL
    if unet is not None and unet.config.get("addition_embed_type") is not None:
        raise ModelError(f"this UNet has addition_embed_type={unet.config.addition_embed_type!r}: it is not a "
                         "Stable Diffusion 1.x, 2.x or XL model, which are what sdlora trains")
    width = unet.config.cross_attention_dim if unet is not None else parts["text_encoder"].config.hidden_size
    if (family := family_of_context_width(width)) is not None:
        return family
    # A model of another size (a tiny one for tests): SD 2.x's OpenCLIP uses gelu where SD 1.x's CLIP
    # uses quick_gelu, and its UNet projects with Linear layers where SD 1.x's uses 1x1 convs.
    if "text_encoder" in parts:
        return SD2 if parts["text_encoder"].config.hidden_act == "gelu" else SD1
    return SD2 if unet.config.get("use_linear_projection") else SD1


def family_named_in_metadata(metadata: dict[str, str]) -> Family | None:
    """The family an adapter file's metadata says it is for, if it says."""
    for field_name in ("ss_base_model_version", "modelspec.architecture"):
        value = metadata.get(field_name, "")
        for family in FAMILIES.values():
            if value and any(value.startswith(alias) for alias in family.aliases):
                return family
    if metadata.get("ss_v2") == "True":
        return SD2
    return None


# kohya prefixes that only SDXL files have (its two text encoders'). The original UNet layout is no
# sign: ComfyUI reads it for every family.
_SDXL_ONLY = tuple(f"{prefix}_" for component, prefix in SDXL.kohya_prefixes.items()
                   if prefix not in SD1.kohya_prefixes.values())


def family_from_tensors(state_dict: dict[str, torch.Tensor]) -> Family | None:
    """The family an adapter's tensors fit, when they say: SDXL's text-encoder prefixes, or the input
    width of a cross-attention key projection (768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL)."""
    if any(name.startswith(_SDXL_ONLY) for name in state_dict):
        return SDXL
    for name, tensor in state_dict.items():
        flat = name.replace(".", "_")
        down = ("lora_down_weight", "lora_A_weight", "lora_linear_layer_down_weight")
        if "attn2_to_k" in flat and flat.endswith(down):
            return family_of_context_width(tensor.shape[-1])
    return None
