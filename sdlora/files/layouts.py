"""Pure functions between adapter state dicts in other tools' layouts and module keys.

Layouts read: kohya/A1111 (`lora_unet_…​.lora_down.weight`, `.lora_up.weight`, `.alpha`; UNet names in
diffusers' or the original block layout), PEFT as diffusers saves it (`unet.….lora_A.weight` /
`.lora_B.weight`, alpha in the `lora_adapter_metadata` header), older diffusers (`.lora.down.weight`,
`.lora_linear_layer.down.weight`, and the attention-processor form `….processor.to_q_lora.down.weight`),
ComfyUI's own (`diffusion_model.<original path>`, `text_encoders.clip_l.transformer.…`) and SimpleTuner's
LyCORIS names (`lycoris_<UNet path>`). Per module, plain LoRA or a LyCORIS kind (`hada_*`, `lokr_*`,
`lora_mid`, `diff`, `dora_scale`; built by sdlora/adapters/lycoris.py). Layout written: kohya (convert.py
writes the others).
No I/O here, and every key is accounted for: a key left over is reported, never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import torch

from ..adapters.kinds import MAGNITUDE, ROLES as KIND_ROLES, UNREAD_KINDS, is_whole, kind_of
from ..adapters.lora import LoRA
from ..base_models.families import Family
from ..base_models.module_keys import TEXT_ENCODERS, canonical_path, split_key
from .names import kohya_index, kohya_name

DOWN, UP = LoRA.roles
# Tensor-name suffix -> role, the kohya/LyCORIS file name every kind takes its tensors by
# (sdlora/adapters/kinds.py); each layout's LoRA names come to kohya's, longest first so
# `lora.down.weight` wins over `down.weight`-like tails.
ROLES = {
    "lora_linear_layer.down.weight": DOWN,
    "lora_linear_layer.up.weight": UP,
    "lora.down.weight": DOWN,
    "lora.up.weight": UP,
    "lora_A.weight": DOWN,
    "lora_B.weight": UP,
    "alpha": "alpha",
    **{role: role for role in KIND_ROLES},
}
PROCESSOR_FORM = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass
class ModuleTensors:
    """One module's tensors, of any adapter kind (LoRA, LoHa, LoKr, Tucker LoCon, full, DoRA), by their file
    role names (`lora_down.weight`, `hada_w1_a`, `dora_scale`, ...); `sdlora.adapters.kinds` builds the adapter.
    alpha None means the file had none: alpha = rank (scale 1)."""

    tensors: dict[str, torch.Tensor]
    alpha: float | None = None

    @classmethod
    def lora(cls, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> ModuleTensors:
        return cls({DOWN: down, UP: up}, alpha)

    # The factor view of a LoRA (what merging, resizing and diffusers' layout work on).
    @property
    def down(self) -> torch.Tensor:
        return self.tensors[DOWN]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors[UP]

    @property
    def kind(self) -> str:
        """The kind's name (`lora`, `loha`, `lokr+dora`, ...); `unknown` for a mix of tensors no kind has."""
        kind = kind_of(self.tensors)
        return (kind.kind if kind is not None else "unknown") + ("+dora" if MAGNITUDE in self.tensors else "")

    @property
    def rank(self) -> int | None:
        kind = kind_of(self.tensors)
        return None if kind is None else kind.rank_of(self.tensors)

    @property
    def effective_alpha(self) -> float | None:
        return self.alpha if self.alpha is not None else None if self.rank is None else float(self.rank)


@dataclass
class Parsed:
    modules: dict[str, ModuleTensors]  # module key -> its tensors
    layout: str  # "kohya", "comfy", "simpletuner", "peft" or "diffusers"
    unmatched: list[str]  # file keys that name no module of the model
    unsupported: list[str]  # file keys of a kind or role this loader cannot apply


def split_tensor_name(key: str) -> tuple[str, str] | None:
    """`<module name>.<role suffix>` -> (module name, role) for the roles we read, else None."""
    match = PROCESSOR_FORM.match(key)
    if match:
        stem, projection, direction = match.groups()
        projection = "to_out.0" if projection == "to_out" else projection
        return f"{stem}.{projection}", DOWN if direction == "down" else UP
    for suffix, role in ROLES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return None


def group_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                                 dict[str, list[str]], list[str]]:
    """The one reading of a file's keys: its tensors by the module name the file gives them (name -> role ->
    tensor, alpha among the roles), the file keys each module came from, and the keys of no role sdlora reads.
    Reading against a model (`parse_state_dict`: loading, converting, merging) and inspecting a file start here."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    sources: dict[str, list[str]] = {}
    unread: list[str] = []
    for key, tensor in state_dict.items():
        split = split_tensor_name(key)
        if split is None:
            unread.append(key)
            continue
        name, role = split
        grouped.setdefault(name, {})[role] = tensor
        sources.setdefault(name, []).append(key)
    return grouped, sources, unread


def describe_unsupported(keys: list[str]) -> str:
    """A short description of what kind of adapter the unreadable keys belong to, if we know: a kind sdlora does
    not read (by a role no kind of ours has), or a module mixing roles of two kinds."""
    kinds, mixes = set(), set()
    roles_by_module: dict[str, set[str]] = {}
    for key in keys:
        split = split_tensor_name(key)
        if split is None:
            kinds |= {kind for tail, kind in UNREAD_KINDS.items() if key.endswith("." + tail)}
        else:
            roles_by_module.setdefault(split[0], set()).add(split[1])
    for roles in roles_by_module.values():
        if "diff_b" in roles and {DOWN, UP} <= roles:
            mixes.add("a LoRA with a bias difference (`diff_b`), as ComfyUI's extractor writes with bias_diff on; "
                      "sdlora reads `diff_b` with a full `diff` only: extract with bias_diff off")
        elif kind_of(roles) is None and len(roles) > 1:
            mixes.add(f"tensors of two adapter kinds in one module ({', '.join(sorted(roles))})")
    parts = [f"these look like {', '.join(sorted(kinds))}, which sdlora does not read yet"] if kinds else []
    return f" ({'; '.join(parts + sorted(mixes))})" if parts or mixes else ""


def peft_alphas(metadata: dict[str, str]) -> dict[str, dict]:
    """Per-component PEFT config (lora_alpha, r, alpha_pattern, use_rslora) from diffusers' header."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    flat = json.loads(raw)
    configs: dict[str, dict] = {}
    for name, value in flat.items():
        component, _, field_name = name.partition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def peft_alpha(config: dict, path: str, rank: int) -> float | None:
    """The alpha PEFT would use for a module, expressed as a plain alpha (scale = alpha / rank)."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            alpha = value
            break
    if alpha is None:
        return None
    if config.get("use_rslora"):  # rsLoRA scales by alpha / sqrt(r): the same as alpha * sqrt(r) / r
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


def dotted_module_key(name: str) -> str | None:
    """`unet.x.y` / `text_encoder.x.y` (diffusers and PEFT names) -> module key; bare UNet paths too."""
    component, _, path = name.partition(".")
    if component in ("unet", *TEXT_ENCODERS):
        return f"{component}.{canonical_path(component, path)}"
    if re.match(r"(down_blocks|up_blocks|mid_block)\.", name):  # old attention-processor files
        return f"unet.{name}"
    return None


def module_key_of(name: str, family: Family, kohya_names: dict[str, str],
                  original_to_diffusers: dict[str, str]) -> str | None:
    """The module key a file's module name means, in any layout we read, or None.

    kohya (`lora_unet_…`, `lora_te_…`), SimpleTuner's LyCORIS (`lycoris_<UNet path with _>`), ComfyUI's
    own (`diffusion_model.<original path>`, `text_encoders.clip_l.transformer.<path>`), and the dotted
    names of diffusers and PEFT.
    """
    if name.startswith("lora_"):
        return kohya_names.get(name)
    if name.startswith("lycoris_"):
        return kohya_names.get(f"{family.kohya_prefixes['unet']}_{name.removeprefix('lycoris_')}")
    if name.startswith("diffusion_model."):
        path = original_to_diffusers.get(name.removeprefix("diffusion_model."))
        return None if path is None else f"unet.{path}"
    if name.startswith("text_encoders."):
        encoder, _, path = name.removeprefix("text_encoders.").partition(".")
        component = family.comfy_text_encoders.get(encoder)
        if component is None or not path.startswith("transformer."):
            return None
        return f"{component}.{canonical_path(component, path.removeprefix('transformer.'))}"
    return dotted_module_key(name)


def file_layout(names: list[str], state_dict: dict) -> str:
    """What wrote a file, judged from its module names: kohya, comfy, simpletuner, peft or diffusers."""
    if any(name.startswith("lora_") for name in names):
        return "kohya"
    if any(name.startswith(("diffusion_model.", "text_encoders.")) for name in names):
        return "comfy"
    if any(name.startswith("lycoris_") for name in names):
        return "simpletuner"
    return "peft" if any(".lora_A." in key for key in state_dict) else "diffusers"


def parse_state_dict(
    state_dict: dict[str, torch.Tensor], metadata: dict[str, str], family: Family, model_keys: list[str],
    original_paths: dict[str, str] | None = None,
) -> Parsed:
    """Map an adapter file's tensors onto module keys of a model.

    kohya names lose the dots of module paths, so they are matched against the names the model's own
    modules would have (`model_keys`); dotted layouts name their modules directly.
    """
    grouped, sources, unsupported = group_tensors(state_dict)

    known = set(model_keys)
    kohya_names = kohya_index(family, model_keys, original_paths)
    layout = file_layout(list(grouped), state_dict)
    original_to_diffusers = {original: path for path, original in (original_paths or {}).items()}
    configs = peft_alphas(metadata)

    modules: dict[str, ModuleTensors] = {}
    unmatched: list[str] = []
    for name, roles in grouped.items():
        key = module_key_of(name, family, kohya_names, original_to_diffusers)
        if key is None or key not in known:
            unmatched.extend(sources[name])
            continue
        module = module_tensors(roles)
        if not is_whole(module.tensors):  # half a module: a LoRA without its up, a LoHa without its second pair
            unsupported.extend(sources[name])
            continue
        component, path = split_key(key)
        if module.alpha is None and component in configs and module.rank is not None:
            module.alpha = peft_alpha(configs[component], path, module.rank)
        modules[key] = module
    return Parsed(modules=modules, layout=layout, unmatched=sorted(unmatched), unsupported=sorted(unsupported))


def module_tensors(roles: dict[str, torch.Tensor]) -> ModuleTensors:
    """One module's tensors by role, as `split_tensor_name` gives them, with its alpha taken out of them."""
    alpha = roles["alpha"].item() if "alpha" in roles else None
    return ModuleTensors({role: tensor for role, tensor in roles.items() if role != "alpha"}, alpha)


def to_kohya(modules: dict[str, ModuleTensors], family: Family, dtype: torch.dtype | None,
             original_paths: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Module weights -> the kohya state dict that A1111, ComfyUI and diffusers read.

    Tensors are cast to `dtype` (None: kept as they are). alpha stays fp32 whatever `dtype` is: a
    value like 0.3 would not survive fp16, and readers take it with `.item()`. LyCORIS kinds keep
    their own tensor names (A1111 and ComfyUI read those too).
    """
    state_dict: dict[str, torch.Tensor] = {}
    for key, weights in modules.items():
        state_dict |= module_state_dict(kohya_name(family, key, original_paths), weights, dtype)
    return state_dict


def module_state_dict(name: str, weights: ModuleTensors, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One module's tensors under its file name `name`: each role, cast to `dtype` (None: as they are), and
    alpha in fp32 when the module has one."""
    state_dict = {f"{name}.{role}": tensor.detach().to("cpu", dtype).contiguous()
                  for role, tensor in weights.tensors.items()}
    if weights.effective_alpha is not None:
        state_dict[f"{name}.alpha"] = torch.tensor(weights.effective_alpha, dtype=torch.float32)
    return state_dict

