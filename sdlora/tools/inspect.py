"""What an adapter file holds, without a model: family, layout, kinds, ranks and alphas, components,
training facts from its header, the size of its update per UNet block, and what looks wrong."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..files.safetensors import read_adapter, recorded_targets
from ..base_models.families import Family, family_from_tensors, family_named_in_metadata
from ..base_models.sgm import unet_module_map
from ..files.layouts import file_layout, group_tensors, module_tensors
from ..files.standard import parse_against, standard_parts
from ..files.names import block_of, component_of_file_key
from ..adapters.kinds import standalone_update

# Header keys worth showing, in this order, with a label.
FACTS = {
    "ss_output_name": "name", "ss_base_model_version": "base model", "ss_sd_model_name": "trained on",
    "ss_network_module": "network", "ss_network_args": "network args", "ss_steps": "steps", "ss_epoch": "epochs",
    "ss_num_train_images": "images", "ss_resolution": "resolution", "ss_learning_rate": "learning rate",
    "ss_unet_lr": "UNet lr", "ss_text_encoder_lr": "text encoder lr", "ss_optimizer": "optimizer",
    "ss_lr_scheduler": "lr schedule", "ss_clip_skip": "clip skip", "ss_noise_offset": "noise offset",
    "ss_min_snr_gamma": "min SNR gamma", "ss_training_comment": "comment", "modelspec.architecture": "architecture",
    "modelspec.prediction_type": "prediction", "modelspec.resolution": "model resolution",
    "modelspec.title": "title", "modelspec.date": "date",
}


@dataclass
class Report:
    path: str
    size_bytes: int
    tensor_count: int
    family: str | None
    family_from: str | None  # "header" or "tensors"
    layout: str
    kinds: dict[str, int]
    components: dict[str, int]
    # which layers: attention, MLP, conv, ... -> modules (or, for an sdlora file, the patterns it records)
    targets: dict[str, int | str]
    ranks: dict[str, int]  # rank -> modules
    alphas: dict[str, int]  # alpha -> modules
    dtypes: dict[str, int]
    block_norms: dict[str, float]  # UNet block / text encoder -> Frobenius norm of the update (strength 1)
    facts: dict[str, str]
    anomalies: list[str]
    modules: list[dict] = field(default_factory=list)  # per module: name, component, block, kind, rank, alpha, norm


def _original_names(parts: dict | None) -> dict[str, str]:
    """original UNet module path with `_` -> diffusers path, for the family's standard UNet, so that
    names in the original layout (`input_blocks_4_1_…`) are shown by diffusers block (`down 1`)."""
    if parts is None:
        return {}
    mapping = unet_module_map(dict(parts["unet"].config))
    return {original.replace(".", "_"): path for path, original in mapping.items()}


def _component(name: str) -> str | None:
    if name.startswith(("diffusion_model.", "lycoris_")):
        return "unet"
    if name.startswith("text_encoders."):
        return "text_encoder"
    return component_of_file_key(name) or ("unet" if re.match(r"(down_blocks|up_blocks|mid_block)", name) else None)


# What kind of layer a module name is, by how its path ends (any layout, dots or underscores).
_LAYER_KINDS = (
    ("attention", r"(to_q|to_k|to_v|to_out_0|q_proj|k_proj|v_proj|out_proj)$"),
    ("MLP", r"(ff_net_0_proj|ff_net_2|fc1|fc2|proj_in|proj_out|text_projection)$"),
    ("conv", r"(conv1|conv2|conv_shortcut|conv|op|skip_connection|in_layers_2|out_layers_3)$"),
)


def _layer_kind(name: str, component: str | None) -> str:
    flat = name.replace(".", "_")
    for kind, pattern in _LAYER_KINDS:
        if re.search(pattern, flat):
            return f"{'text encoder' if component and component.startswith('text_encoder') else 'UNet'} {kind}"
    return "other"


def _number(value: float | None) -> str:
    return "none (alpha = rank)" if value is None else f"{value:g}"


def inspect(path: str | Path) -> Report:
    path = Path(path)
    tensors, metadata = read_adapter(path, check_finite=False)
    grouped, _, unread = group_tensors(tensors)
    stated = family_named_in_metadata(metadata)
    family: Family | None = stated or family_from_tensors(tensors)
    anomalies = []
    if unread:
        anomalies.append(f"{len(unread)} tensor(s) of no kind sdlora knows, first {unread[0]!r}")
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        anomalies.append(f"{len(bad)} tensor(s) hold NaN or infinite values, first {bad[0]!r}: the adapter is broken")

    parts = standard_parts(family) if family is not None else None
    modules, norms, original = [], {}, _original_names(parts)
    zero_up, mismatched = [], []
    for name, roles in grouped.items():
        weights = module_tensors(roles)
        payload, alpha = weights.tensors, weights.alpha
        component = _component(name)
        entry = {"name": name, "component": component, "block": block_of(name, component, original),
                 "kind": weights.kind, "rank": weights.rank, "alpha": alpha, "norm": None}
        if "lora_up.weight" in payload and not payload["lora_up.weight"].any():
            zero_up.append(name)
        if {"lora_down.weight", "lora_up.weight"} <= set(payload) and \
                payload["lora_down.weight"].shape[0] != payload["lora_up.weight"].shape[1]:
            mismatched.append(name)
        else:
            try:
                entry["norm"] = float(standalone_update(payload, alpha).norm())
            except (RuntimeError, ValueError, KeyError, IndexError):
                problem = ("mix several adapter kinds" if weights.kind.startswith("unknown")
                           else f"do not make a whole {weights.kind}")
                anomalies.append(f"{name}: its tensors ({', '.join(sorted(payload))}) {problem}")
        if entry["norm"] is not None:
            norms[entry["block"]] = norms.get(entry["block"], 0.0) + entry["norm"] ** 2
        modules.append(entry)
    if zero_up:
        anomalies.append(f"{len(zero_up)} module(s) have all-zero up weights and change nothing, first {zero_up[0]!r} "
                         "(an untrained adapter?)")
    if mismatched:
        anomalies.append(f"{len(mismatched)} module(s) whose down and up ranks differ, first {mismatched[0]!r}")
    if family is not None:
        anomalies += _unreachable(tensors, metadata, family, parts)

    return Report(
        path=str(path), size_bytes=path.stat().st_size, tensor_count=len(tensors),
        family=family.title if family else None, family_from="header" if stated else "tensors" if family else None,
        layout=file_layout(list(grouped), tensors),
        kinds=dict(Counter(m["kind"] for m in modules)), components=dict(Counter(str(m["component"]) for m in modules)),
        targets={component: " | ".join(patterns) for component, patterns in recorded_targets(metadata).items()}
        or dict(Counter(_layer_kind(m["name"], m["component"]) for m in modules)),
        ranks=dict(Counter(str(m["rank"]) for m in modules)),
        alphas=dict(Counter(_number(m["alpha"]) for m in modules)),
        dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        block_norms={block: value ** 0.5 for block, value in sorted(norms.items(), key=lambda kv: _order(kv[0]))},
        facts={label: metadata[key] for key, label in FACTS.items() if key in metadata},
        anomalies=anomalies, modules=modules,
    )


def _unreachable(tensors: dict, metadata: dict, family: Family, parts: dict) -> list[str]:
    """Keys that a loader of the named family would not find: read against its standard architecture."""
    parsed, _ = parse_against(tensors, metadata, family, parts)
    if not parsed.unmatched:
        return []
    return [f"{len(parsed.unmatched)} tensor(s) name no module of {family.title}'s standard architecture (a loader "
            f"would skip or refuse them), first {parsed.unmatched[0]!r}"]


def _order(block: str) -> tuple:
    kinds = ("down", "input", "mid", "middle", "up", "output", "other")
    kind, _, index = block.partition(" ")
    return (kinds.index(kind) if kind in kinds else len(kinds), int(index) if index.isdigit() else 0, block)


def render(report: Report, per_module: bool = False) -> str:
    def counts(values: dict) -> str:
        return ", ".join(f"{key} (x{n})" for key, n in sorted(values.items())) or "-"

    recorded = any(isinstance(value, str) for value in report.targets.values())  # an sdlora file's patterns
    targets = "; ".join(f"{k}: {v}" for k, v in report.targets.items()) if recorded else counts(report.targets)
    lines = [
        f"file:        {report.path} ({report.size_bytes / 1024:.1f} KiB, {report.tensor_count} tensors)",
        f"family:      {report.family or 'not stated, and the tensors do not tell'}"
        + (f" (from its {report.family_from})" if report.family else ""),
        f"layout:      {report.layout}",
        f"kinds:       {counts(report.kinds)}",
        f"modules:     {counts(report.components)}",
        f"targets:     {targets}",
        f"ranks:       {counts(report.ranks)}",
        f"alphas:      {counts(report.alphas)}",
        f"dtypes:      {counts(report.dtypes)}",
        "update size (Frobenius norm at strength 1, per block):",
        *(f"  {block:<14} {value:.4g}" for block, value in report.block_norms.items()),
    ]
    if report.facts:
        lines.append("training facts from the header:")
        lines += [f"  {label + ':':<18} {value}" for label, value in report.facts.items()]
    if per_module:
        lines.append("modules:")
        lines += [f"  {m['name']}: {m['kind']}, rank {m['rank']}, alpha {_number(m['alpha'])}, norm "
                  f"{'-' if m['norm'] is None else format(m['norm'], '.4g')}" for m in report.modules]
    lines.append("anomalies:" if report.anomalies else "anomalies:   none found")
    lines += [f"  ! {anomaly}" for anomaly in report.anomalies]
    return "\n".join(lines)


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)
