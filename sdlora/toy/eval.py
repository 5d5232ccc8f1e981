"""Measuring what an adapter learned, on the toy world: presence of a concept at several strengths.

Images are generated from fixed seeds for each prompt set at each strength, scored by the toy
scorer (colour, shape, style), and summed up as rates: how often the outline style or the star
shows, and how often the colour and shape asked for are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import loader
from ..adapters.strength import Strength, Window, scaled
from .world import COLOURS, SHAPES, STAR_TRIGGER, score

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
IMAGE_SIZE = 32


def content_prompts() -> list[str]:
    """`a COLOUR SHAPE` for every colour and pretraining shape."""
    return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def trigger_prompts(trigger: str = STAR_TRIGGER) -> list[str]:
    """`a COLOUR TRIGGER` for every colour: the character's prompts."""
    return [f"a {colour} {trigger}" for colour in COLOURS]


@dataclass
class Row:
    """Rates over the images of one prompt set at one strength."""

    prompts: str
    strength: float
    images: int
    outline: float
    star: float
    outlined_star: float  # both concepts in the same image: what stacking style and character should give
    colour_ok: float
    shape_ok: float | None  # None for trigger prompts, which ask for no pretraining shape


@dataclass
class Evaluation:
    per_prompt: int
    rows: list[Row] = field(default_factory=list)
    images: dict[tuple[str, float], list] = field(default_factory=dict)
    prompts: dict[str, list[str]] = field(default_factory=dict)

    def row(self, prompts: str, strength: float) -> Row:
        return next(r for r in self.rows if r.prompts == prompts and r.strength == strength)

    def table(self) -> str:
        """A Markdown table of the rates, one line per prompt set and strength."""
        lines = ["| prompts | strength | outline | star | outlined star | colour kept | shape kept |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            shape = "-" if r.shape_ok is None else f"{r.shape_ok:.0%}"
            lines.append(f"| {r.prompts} | {r.strength:g} | {r.outline:.0%} | {r.star:.0%} | {r.outlined_star:.0%} | "
                         f"{r.colour_ok:.0%} | {shape} |")
        return "\n".join(lines)


@torch.no_grad()
def generate(pipe, prompts: list[str], per_prompt: int, steps: int = 25, guidance: float = 5.0, seed: int = 0,
             callback=None):
    """per_prompt images for each prompt, image j of every prompt from seed + j, in prompt order;
    `callback` goes to the pipeline as its callback_on_step_end (step windows)."""
    images = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(seed + j) for j in range(per_prompt)]
        images += pipe([prompt] * per_prompt, height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generators, callback_on_step_end=callback).images
    return images


def rates(prompt_set: str, strength: float, prompts: list[str], per_prompt: int, images: list) -> Row:
    scores = [score(image) for image in images]
    asked = [prompt for prompt in prompts for _ in range(per_prompt)]
    colour_ok = sum(s.colour == prompt.split()[1] for s, prompt in zip(scores, asked)) / len(scores)
    shape_ok = None
    if prompt_set == "content":
        shape_ok = sum(s.shape == prompt.split()[2] for s, prompt in zip(scores, asked)) / len(scores)
    return Row(prompt_set, strength, len(scores), outline=sum(s.outline for s in scores) / len(scores),
               star=sum(s.star for s in scores) / len(scores),
               outlined_star=sum(s.star and s.outline for s in scores) / len(scores), colour_ok=colour_ok,
               shape_ok=shape_ok)


def evaluate(pipe, adapters: list[str], strengths=DEFAULT_STRENGTHS, per_prompt: int = 4,
             prompt_sets: dict[str, list[str]] | None = None, steps: int = 25, guidance: float = 5.0,
             seed: int = 0, windows: dict[str, Window] | None = None,
             own: dict[str, Strength] | None = None) -> Evaluation:
    """Generate and score every prompt set with all `adapters` (already loaded) at each strength, each
    adapter named in `windows` on for its part of the steps only (sdlora.step_windows). Each strength
    multiplies an adapter's `own` strength (default 1: a number, per component, per block, block weights)."""
    prompt_sets = prompt_sets or {"content": content_prompts()}
    result = Evaluation(per_prompt, prompts=dict(prompt_sets))
    for strength in strengths:
        for name in adapters:
            loader.set_strength(pipe, name, scaled((own or {}).get(name, 1.0), strength))
        with loader.step_windows(pipe, windows or {}) as callback:
            for prompt_set, prompts in prompt_sets.items():
                images = generate(pipe, prompts, per_prompt, steps, guidance, seed, callback if windows else None)
                result.images[prompt_set, strength] = images
                result.rows.append(rates(prompt_set, strength, prompts, per_prompt, images))
    return result


def grid(evaluation: Evaluation, strengths=None, scale: int = 3):
    """One row per (prompt set, strength): the first image of every prompt, enlarged, each row labelled with
    its prompt set and strength and each image with its prompt."""
    from PIL import Image, ImageDraw

    keys = [key for key in evaluation.images if strengths is None or key[1] in strengths]
    rows = [evaluation.images[key][:: evaluation.per_prompt] for key in keys]
    cell, margin, caption = IMAGE_SIZE * scale, 90, 12
    width = margin + max(len(r) for r in rows) * cell
    canvas = Image.new("RGB", (width, len(rows) * (cell + caption)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, ((prompt_set, strength), images) in enumerate(zip(keys, rows)):
        top = y * (cell + caption)
        draw.text((4, top + cell // 2 - 12), f"{prompt_set}\nstrength {strength:g}", fill="black")
        prompts = evaluation.prompts.get(prompt_set, [])
        for x, image in enumerate(images):
            canvas.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (margin + x * cell, top))
            if x < len(prompts):
                draw.text((margin + x * cell + 2, top + cell), prompts[x].removeprefix("a "), fill="black")
    return canvas


def save_images(evaluation: Evaluation, folder: str | Path) -> int:
    """Write every image as FOLDER/PROMPTS-STRENGTH/NNN-PROMPT.png (NNN: its place in the prompt set's list,
    so image j of prompt i is NNN = i * per_prompt + j, drawn from seed + j); returns how many."""
    count = 0
    for (prompt_set, strength), images in evaluation.images.items():
        sub = Path(folder) / f"{prompt_set}-{strength:g}"
        sub.mkdir(parents=True, exist_ok=True)
        prompts = evaluation.prompts.get(prompt_set, [])
        for index, image in enumerate(images):
            prompt = prompts[index // evaluation.per_prompt] if prompts else prompt_set
            image.save(sub / f"{index:03d}-{prompt.replace(' ', '_')}.png")
            count += 1
    return count


def load_toy_pipeline(model: str | Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo(out: Path, config_path: Path) -> int:
    """Train the style adapter on the bundled model and data, score it, write the adapter, grid and table."""
    import time

    from ..training.config import build
    from ..training.loop import train

    settings = build({"output_dir": str(out)}, config_path)
    # The demo's folder holds the last demo's results, which a rerun replaces (its grids and table too);
    # `sdlora train` itself refuses to overwrite a finished run's adapter.
    earlier = out / f"{settings.name}.safetensors"
    if earlier.exists():
        print(f"replacing the earlier demo's adapter {earlier}")
        earlier.unlink()
    started = time.time()
    adapter = train(settings)
    trained = time.time() - started
    pipe = load_toy_pipeline(settings.model)
    loader.load(pipe, adapter, name="style")
    result = evaluate(pipe, ["style"], DEFAULT_STRENGTHS, per_prompt=2)
    scored = time.time() - started - trained
    grid(result, strengths=(0.0, 1.0)).save(out / "before-after.png")
    grid(result).save(out / "strengths.png")
    report = (f"# Outline-style adapter on the toy model\n\nTrained in {trained:.0f} s with {config_path}; "
              f"scored in {scored:.0f} s ({result.per_prompt} images per prompt, 12 prompts).\n\n{result.table()}\n")
    (out / "scores.md").write_text(report)
    print("\n" + result.table())
    print(f"\nadapter: {adapter}\nbefore (top) / after (bottom): {out / 'before-after.png'}\n"
          f"every strength: {out / 'strengths.png'}\ntable: {out / 'scores.md'}")
    return 0
