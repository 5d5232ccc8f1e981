"""Training-free ways to stack two adapters, and the blend a perfectly gradual adapter would be, scored on
the toy world as `sdlora toy eval` scores stacking (docs/stacking.md has the results).

    python bench/composers.py winner STYLE CHARACTER   # K-LoRA's rule, static: per shared layer the larger update acts
    python bench/composers.py switch STYLE CHARACTER   # LoRA Switch: the character on even steps, the style on odd
    python bench/composers.py blend ADAPTER [--trigger] # UNet output (1 - s) base + s adapted, s = 0.25, 0.5, 0.75

Each prints the toy eval table: 25 images per prompt, seed sets 0 and 1 (blend: seed set 0).
"""

from __future__ import annotations

import argparse
import sys

import sdlora
from sdlora.base_models.parts import components
from sdlora.loader import _layers
from sdlora.toy import eval as toy_eval

PER_PROMPT = 25
TOP_SHARE = 0.1  # K-LoRA compares the sum of each update's largest entries, by size


def layers(pipe):
    return [wrapper for _, _, wrapper in _layers(components(pipe))]


def keep_larger_updates(pipe, names: tuple[str, str]) -> dict[str, int]:
    """In every layer both adapters touch, switch off the one whose update's largest entries sum smaller;
    returns how many shared layers each kept."""
    kept = dict.fromkeys(names, 0)
    for wrapper in layers(pipe):
        if all(name in wrapper.adapters for name in names):
            size = {}
            for name in names:
                entries = wrapper.adapters[name].delta_weight(wrapper.base.weight).abs().flatten()
                size[name] = entries.topk(max(1, int(entries.numel() * TOP_SHARE))).values.sum().item()
            winner = max(size, key=size.get)
            for name in names:
                if name != winner:
                    wrapper.strengths[name] = 0.0
            kept[winner] += 1
    return kept


def turns(pipe, names: tuple[str, str]):
    """A step callback, and the function that sets the turn of step i: names[i % 2] alone is on."""
    wrappers = layers(pipe)

    def set_turn(step: int) -> None:
        on = names[step % 2]
        for wrapper in wrappers:
            for name in wrapper.adapters:
                wrapper.strengths[name] = 1.0 if name == on else 0.0

    def callback(pipe_, step, timestep, kwargs):
        set_turn(step + 1)
        return kwargs
    return callback, set_turn


def blended(pipe, name: str, share: dict) -> None:
    """Make the UNet return (1 - s) x its output with adapter `name` off + s x with it on, s = share["s"]."""
    unet, forward = pipe.unet, pipe.unet.forward

    def blend(*args, **kwargs):
        adapted = forward(*args, **kwargs)
        with sdlora.disabled(pipe, name):
            base = forward(*args, **kwargs)
        s = share["s"]
        if isinstance(adapted, tuple):
            return ((1 - s) * base[0] + s * adapted[0], *adapted[1:])
        adapted.sample = (1 - s) * base.sample + s * adapted.sample
        return adapted
    unet.forward = blend


def score(pipe, prompt_sets, seed: int, callback=None, before=None) -> str:
    rows = []
    for prompt_set, prompts in prompt_sets.items():
        if before:
            before()
        images = toy_eval.generate(pipe, prompts, PER_PROMPT, seed=seed, callback=callback)
        rows.append(toy_eval.rates(prompt_set, 1.0, prompts, PER_PROMPT, images))
    return toy_eval.Evaluation(PER_PROMPT, rows=rows).table()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=("winner", "switch", "blend"))
    parser.add_argument("adapters", nargs="+", help="STYLE CHARACTER (winner, switch) or one ADAPTER (blend)")
    parser.add_argument("--model", default="models/toy-sd1")
    parser.add_argument("--trigger", action="store_true", help="blend: also score 'a COLOUR zkz'")
    args = parser.parse_args(argv)
    if len(args.adapters) != (1 if args.method == "blend" else 2):
        parser.error(f"{args.method} takes {'one adapter' if args.method == 'blend' else 'two adapters'}")
    pipe = toy_eval.load_toy_pipeline(args.model)
    names = tuple(sdlora.load(pipe, path, name=f"adapter{i}") for i, path in enumerate(args.adapters))
    sets = {"content": toy_eval.content_prompts(), "trigger": toy_eval.trigger_prompts()}
    if args.method == "blend":
        if not args.trigger:
            del sets["trigger"]
        share = {"s": 1.0}
        blended(pipe, names[0], share)
        for s in (0.25, 0.5, 0.75):
            share["s"] = s
            print(f"\nblend {s:g}:\n" + score(pipe, sets, seed=0))
        return 0
    callback = before = None
    if args.method == "winner":
        print("shared layers kept:", keep_larger_updates(pipe, names))
    else:  # the character first: it draws the layout in the first step
        callback, set_turn = turns(pipe, (names[1], names[0]))
        before = lambda: set_turn(0)  # noqa: E731
    for seed in (0, 1):
        print(f"\nseed set {seed}:\n" + score(pipe, sets, seed, callback, before))
    return 0


if __name__ == "__main__":
    sys.exit(main())
