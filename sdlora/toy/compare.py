"""What did one training option do? Train a config as it is and with the option changed, from the same
seed, score both on the toy world with the same seeds, and print the two side by side.

Each run lands in its own folder named after a hash of its resolved config, so a rerun (or a second
comparison against the same baseline) reuses an adapter already trained rather than training it again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..reliability import durable

from .. import loader
from ..errors import ConfigError
from . import eval as toy_eval

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_change(text: str) -> tuple[str, object]:
    """'KEY=VALUE' -> (key, value), the value read as TOML (true, 0.5, 16, "text") or else as a plain string."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"--change {text!r}: write it as KEY=VALUE, e.g. --change prior_loss_weight=1.0")
    try:
        parsed = tomllib.loads(f"value = {value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key, parsed


@dataclass
class Run:
    label: str
    adapter: Path
    seconds: float  # training time; the time of the run that made it when reused
    reused: bool


def train_or_reuse(config, root: Path, label: str, quiet: bool) -> Run:
    """Train `config` into ROOT/LABEL-HASH, or reuse the adapter a run of the very same config left there."""
    from ..training.config import to_toml
    from ..training.loop import train

    settings = replace(config, output_dir="")  # the folder itself must not change the hash
    digest = hashlib.sha256(to_toml(settings).encode()).hexdigest()[:10]
    folder = root / f"{label}-{digest}"
    config = replace(config, output_dir=str(folder))
    adapter, timing = folder / f"{config.name}.safetensors", folder / "training-time.json"
    if adapter.is_file() and timing.is_file():
        return Run(label, adapter, json.loads(timing.read_text())["seconds"], reused=True)
    started = time.perf_counter()
    adapter = train(config, quiet=quiet)
    seconds = time.perf_counter() - started
    durable.write_text(timing, json.dumps({"seconds": seconds}))
    return Run(label, adapter, seconds, reused=False)


@dataclass
class Rates:
    """The toy scores of one adapter at strength 1 (and the outline at 0), averaged over seed sets."""

    values: dict[str, list[float]]  # metric -> one rate per seed set
    images: int  # per condition and seed set


METRICS = {
    "outline, ordinary prompts, strength 1": ("content", 1.0, "outline"),
    "outline, ordinary prompts, strength 0": ("content", 0.0, "outline"),
    "colour kept, ordinary prompts": ("content", 1.0, "colour_ok"),
    "shape kept, ordinary prompts": ("content", 1.0, "shape_ok"),
    "star leak, ordinary prompts": ("content", 1.0, "star"),
    "star with the trigger": ("trigger", 1.0, "star"),
    "outlined star, stacked 1 + 1, trigger prompts": ("stacked", 1.0, "outlined_star"),
}


def score_adapter(pipe, adapter: Path, per_prompt: int, seeds: list[int], trigger: str | None,
                  stack_with: Path | None, steps: int, guidance: float) -> tuple[Rates, toy_eval.Evaluation]:
    prompt_sets = {"content": toy_eval.content_prompts()}
    if trigger:
        prompt_sets["trigger"] = toy_eval.trigger_prompts(trigger)
    values: dict[str, list[float]] = {}
    first = None
    for seed in seeds:
        name = loader.load(pipe, adapter, name="compared")
        try:
            result = toy_eval.evaluate(pipe, [name], (0.0, 1.0), per_prompt, prompt_sets, steps, guidance, seed)
            if stack_with is not None:
                other = loader.load(pipe, stack_with, name="stacked")
                try:
                    stacked = toy_eval.evaluate(pipe, [name, other], (1.0,), per_prompt,
                                                {"stacked": toy_eval.trigger_prompts(trigger)}, steps, guidance, seed)
                finally:
                    loader.unload(pipe, other)
                result.rows += stacked.rows
                result.images.update(stacked.images)
        finally:
            loader.unload(pipe, name)
        first = first or result
        for metric, (prompts, strength, field) in METRICS.items():
            row = next((r for r in result.rows if r.prompts == prompts and r.strength == strength), None)
            if row is not None:
                values.setdefault(metric, []).append(getattr(row, field))
    return Rates(values, per_prompt * len(toy_eval.content_prompts())), first


def table(runs: list[Run], scores: list[Rates], seeds: list[int]) -> str:
    """Markdown: one line per metric, one column per run; each cell the rate per seed set."""
    header = "| | " + " | ".join(run.label for run in runs) + " |"
    lines = [header, "|---" * (len(runs) + 1) + "|"]
    for metric in METRICS:
        if metric not in scores[0].values:
            continue
        cells = [" / ".join(f"{v:.0%}" for v in s.values[metric]) for s in scores]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines.append("| training time | " + " | ".join(f"{run.seconds:.0f} s" for run in runs) + " |")
    note = (f"Rates per seed set (images j of each prompt from seed S + j, S in {', '.join(map(str, seeds))}); "
            f"{scores[0].images} images per ordinary-prompt condition per seed set.")
    return "\n".join(lines) + "\n\n" + note


def compare(config_path: Path, changes: list[str], out: Path, per_prompt: int, seeds: list[int],
            trigger: str | None, stack_with: Path | None, steps: int = 25, guidance: float = 5.0,
            quiet: bool = False) -> str:
    """Train the config and the config with `changes`, score both, write OUT/compare.md and grids; the table."""
    from ..training.config import build, validate

    if stack_with is not None and not trigger:
        raise ConfigError("--stack-with scores outlined stars on the trigger prompts: give --trigger too")
    if stack_with is not None and not Path(stack_with).is_file():
        raise ConfigError(f"--stack-with {stack_with}: no such adapter file")
    overrides = dict(parse_change(text) for text in changes)
    baseline = build({"output_dir": str(out)}, config_path)
    changed = build({"output_dir": str(out), **overrides}, config_path)
    validate(changed)  # a bad change fails here, before the baseline spends minutes training
    label = ", ".join(f"{key} = {value!r}" for key, value in overrides.items()) or "unchanged"
    runs = [train_or_reuse(baseline, out, "baseline", quiet), train_or_reuse(changed, out, "changed", quiet)]
    runs[1].label = label
    pipe = toy_eval.load_toy_pipeline(baseline.model)
    scores = []
    for run, slug in zip(runs, ("baseline", "changed")):
        result, evaluation = score_adapter(pipe, run.adapter, per_prompt, seeds, trigger, stack_with, steps, guidance)
        scores.append(result)
        toy_eval.grid(evaluation, strengths=(1.0,)).save(out / f"grid-{slug}.png")
    text = (f"# {config_path}: baseline vs {label}\n\n" + table(runs, scores, seeds) + "\n\nGrids: "
            f"{out / 'grid-baseline.png'}, {out / 'grid-changed.png'} (strength 1, first image of each prompt).\n")
    durable.write_text(out / "compare.md", text)
    return text
