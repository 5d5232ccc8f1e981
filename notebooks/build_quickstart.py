"""Writes quickstart.ipynb from the cells below (edit here, run, commit both)."""

from pathlib import Path

import nbformat

CELLS = [
    ("markdown", """# sdlora quickstart

Train a LoRA adapter on the CPU in a couple of minutes, load it with a strength, compare strengths,
and stack two adapters. Everything runs offline on the bundled toy model (`models/toy-sd1`, a tiny
Stable Diffusion 1.x pretrained on coloured shapes) and the bundled datasets:

- `datasets/style-outline`: shapes drawn as outlines, a style the base model never saw;
- `datasets/character-star`: a star bound to the trigger word `zkz`, a shape the base model never saw."""),
    ("code", """import logging
import shutil
from pathlib import Path

import sdlora
from sdlora.training.config import build
from sdlora.training.loop import train
from sdlora.toy import eval as toy_eval

logging.getLogger("diffusers").setLevel(logging.ERROR)
ROOT = Path.cwd() if (Path.cwd() / "models").is_dir() else Path.cwd().parent  # repo root
OUT = ROOT / "out" / "quickstart"
shutil.rmtree(OUT, ignore_errors=True)  # a rerun starts over: `train` never overwrites a finished adapter"""),
    ("markdown", """## 1. Train a style adapter

The recommended settings live in `datasets/style-outline/train.toml`; any of them can be overridden
here, as flags override the file on the command line (`sdlora train --config … --lr …`). This notebook
trains 200 steps instead of the config's 300 to stay quick."""),
    ("code", """style_config = build({"output_dir": str(OUT / "style"), "data": str(ROOT / "datasets/style-outline"),
                      "model": str(ROOT / "models/toy-sd1"), "max_steps": 200},
                     ROOT / "datasets/style-outline/train.toml")
style_file = train(style_config, quiet=True)
style_file"""),
    ("markdown", """## 2. Load it with a strength and compare strengths

`sdlora.load` works on any diffusers Stable Diffusion pipeline. Here every row is one strength, from
0 (the base model, unchanged) to 1; every column a prompt `a COLOUR SHAPE`."""),
    ("code", """pipe = toy_eval.load_toy_pipeline(ROOT / "models/toy-sd1")
sdlora.load(pipe, style_file, strength=1.0, name="style")
result = toy_eval.evaluate(pipe, ["style"], strengths=(0.0, 0.5, 1.0), per_prompt=1, steps=15)
print(result.table())
toy_eval.grid(result)"""),
    ("markdown", """## 3. A character adapter, with the text encoder

A new shape bound to a new word needs the text encoder to learn the word: `train_text_encoder`."""),
    ("code", """character_config = build({"output_dir": str(OUT / "character"), "data": str(ROOT / "datasets/character-star"),
                          "model": str(ROOT / "models/toy-sd1"), "max_steps": 200},
                         ROOT / "datasets/character-star/train.toml")
character_file = train(character_config, quiet=True)"""),
    ("markdown", """## 4. Stack the two adapters

Each adapter keeps its own strength; `list_adapters` shows what is loaded."""),
    ("code", """sdlora.load(pipe, character_file, name="star")
for info in sdlora.list_adapters(pipe):
    print(info.name, info.strength, info.ranks)
prompts = {"trigger": toy_eval.trigger_prompts()}
stacked = toy_eval.evaluate(pipe, ["style", "star"], strengths=(0.0, 1.0), per_prompt=2, prompt_sets=prompts,
                            steps=15)
print(stacked.table())
toy_eval.grid(stacked)"""),
    ("markdown", """## 5. Per-component strength, fuse, unload

Strength can differ per component and per UNet block. Fusing adds the deltas into the weights for
zero-overhead inference; unfusing restores the base weights bit for bit."""),
    ("code", """sdlora.set_strength(pipe, "style", {"unet": {"down": 1.0, "mid": 1.0, "up": [1.0, 0.5, 0.0]}, "text_encoder": 1.0})
sdlora.fuse(pipe)
fused = toy_eval.generate(pipe, ["a red zkz"], per_prompt=4, steps=15)
sdlora.unfuse(pipe)
sdlora.unload(pipe)
print(sdlora.list_adapters(pipe))
toy_eval.grid(toy_eval.Evaluation(per_prompt=1, images={("fused", 1.0): fused}))"""),
]


def main() -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
                      for kind, text in CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, Path(__file__).with_name("quickstart.ipynb"))


if __name__ == "__main__":
    main()
