"""The `sdlora` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from . import loader
from .training import config
from .adapter import read_adapter
from .errors import SdloraError, TrainingDiverged, WriteFailed
from .formats import split_tensor_name
from .families import family_from_tensors, family_named_in_metadata
from .keys import component_of_file_key


def describe(path: Path) -> str:
    """A human summary of an adapter file: family, layout, modules per component, ranks, alphas."""
    tensors, metadata = read_adapter(path)
    modules: dict[str, dict[str, object]] = {}
    for key, tensor in tensors.items():
        split = split_tensor_name(key)
        if split:
            modules.setdefault(split[0], {})[split[1]] = tensor
    components = Counter(component_of_file_key(name) or "unet" for name in modules)
    ranks = Counter(int(roles["down"].shape[0]) for roles in modules.values() if "down" in roles)
    alphas = Counter(round(float(roles["alpha"].item()), 4) for roles in modules.values() if "alpha" in roles)
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    family = family_named_in_metadata(metadata) or family_from_tensors(tensors)
    lines = [
        f"file:       {path} ({path.stat().st_size / 1024:.1f} KiB, {len(tensors)} tensors)",
        f"family:     {family.title if family else 'not stated'}",
        f"modules:    {', '.join(f'{c} {n}' for c, n in sorted(components.items()))}",
        f"ranks:      {', '.join(f'{r} (x{n})' for r, n in sorted(ranks.items()))}",
        f"alphas:     {', '.join(f'{a:g} (x{n})' for a, n in sorted(alphas.items())) or 'none stored (alpha = rank)'}",
        f"dtypes:     {', '.join(f'{d} (x{n})' for d, n in sorted(dtypes.items()))}",
    ]
    unread = [key for key in tensors if split_tensor_name(key) is None]
    if unread:
        lines.append(f"not LoRA:   {len(unread)} tensor(s), first {unread[0]!r}")
    for key in sorted(metadata):
        if key.startswith(("ss_network", "ss_base", "modelspec.title", "modelspec.architecture", "ss_steps")):
            lines.append(f"{key + ':':<27} {metadata[key]}")
    if "sdlora" in metadata:
        record = json.loads(metadata["sdlora"])
        lines.append(f"sdlora:     format {record.get('format_version')}, targets {record.get('targets')}")
    return "\n".join(lines)


TRAIN_EXAMPLES = """examples:
  sdlora train --model models/toy-sd1 --data datasets/style-outline --output-dir out/style   # the toy model, on a CPU
  sdlora train --model v1-5-pruned-emaonly.safetensors --data my_images/ --output-dir out/ --max-steps 1500
  sdlora train --model v2-1_768-ema-pruned.safetensors --data my_images/ --output-dir out/   # v-prediction, 768 px
  sdlora train --model sd_xl_base_1.0.safetensors --data my_images/ --output-dir out/ \\
      --mixed-precision bf16 --gradient-checkpointing                                        # 1024 px
  sdlora train --config train.toml --resume latest

The family (SD 1.x, 2.x, XL), its prediction type and its resolution come from the model.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and use LoRA adapters for Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="describe adapter files (layout, family, ranks, metadata)",
                                  description="Describe adapter .safetensors files without loading a model.")
    inspect.add_argument("files", nargs="+", type=Path, metavar="FILE")

    train = commands.add_parser(
        "train", help="train a LoRA on a folder of captioned images",
        description="Train a LoRA adapter on a folder of captioned images. Every option can also be set in\n"
                    "a TOML file given with --config (keys as below, with _ or -); flags override the file.",
        usage="sdlora train --model MODEL --data DIR --output-dir OUT [--config train.toml] [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EXAMPLES)
    toy = commands.add_parser("toy", help="the toy world: measure adapters, run the CPU demo",
                              description="The tiny bundled model and its procedural world of coloured shapes.")
    toy_commands = toy.add_subparsers(dest="toy_command", required=True)
    evaluate = toy_commands.add_parser(
        "eval", help="score adapters at several strengths",
        description="Generate images at each strength with the adapters loaded (stacked when several), score "
                    "them (outline style, star, colour and shape kept) and print a table.")
    evaluate.add_argument("--lora", action="append", required=True, type=Path, metavar="FILE",
                          help="adapter file; repeat to stack several")
    evaluate.add_argument("--model", default="models/toy-sd1", help="the toy base model (default: %(default)s)")
    evaluate.add_argument("--trigger", help=f"also score prompts 'a COLOUR TRIGGER' (the star dataset uses "
                                            f"{toy_trigger()!r})")
    evaluate.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="comma-separated (default: %(default)s)")
    evaluate.add_argument("--n", type=int, default=4, help="images per prompt (default: %(default)s)")
    evaluate.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    evaluate.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s)")
    evaluate.add_argument("--grid", type=Path, help="write a PNG grid: one row per prompt set and strength")
    demo = toy_commands.add_parser(
        "demo", help="train the style adapter on the bundled model and data, then score it",
        description="Train an outline-style adapter on datasets/style-outline with the bundled toy model on the "
                    "CPU, then write the adapter, a before/after grid and the score table.")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--config", type=Path, default=Path("datasets/style-outline/train.toml"),
                      help="training config (default: %(default)s)")

    train.add_argument("--config", type=Path, help="TOML file with any of the options below")
    train.add_argument("--quiet", action="store_true", help="no progress bar or summaries")
    config.add_arguments(train)
    return parser


def quiet_libraries() -> None:
    """diffusers and transformers talk a lot at load time; our own summaries say what matters."""
    import logging

    for name in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # their first use resets the level set above
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # transformers 5 shows one per model it loads


def run_train(args: argparse.Namespace) -> int:
    from .training.loop import train

    quiet_libraries()
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    try:
        train(config.build(values, args.config), quiet=args.quiet)
    except (TrainingDiverged, WriteFailed) as error:  # the run started; what it wrote is intact
        print(f"sdlora: training stopped: {error}", file=sys.stderr)
        return 1
    return 0


def toy_trigger() -> str:
    from .toy.world import STAR_TRIGGER

    return STAR_TRIGGER


def run_toy(args: argparse.Namespace) -> int:
    from .toy import eval as toy_eval

    quiet_libraries()
    if args.toy_command == "demo":
        return toy_eval.demo(args.out, args.config)
    strengths = [float(value) for value in args.strengths.split(",")]
    for path in [args.model, *args.lora]:
        if not Path(path).exists():
            print(f"sdlora: error: {path} does not exist", file=sys.stderr)
            return 2
    pipe = toy_eval.load_toy_pipeline(args.model)
    names = [loader.load(pipe, path, name=f"adapter{i}") for i, path in enumerate(args.lora)]
    prompt_sets = {"content": toy_eval.content_prompts()}
    if args.trigger:
        prompt_sets["trigger"] = toy_eval.trigger_prompts(args.trigger)
    result = toy_eval.evaluate(pipe, names, strengths, args.n, prompt_sets, args.steps, args.guidance)
    print(result.table())
    if args.grid:
        toy_eval.grid(result).save(args.grid)
        print(f"grid: {args.grid}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    print("\n\n".join(describe(path) for path in args.files))
    return 0


COMMANDS = {"train": run_train, "toy": run_toy, "inspect": run_inspect}


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user's mistake (any SdloraError) is one line and exit code 2, a bug a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SdloraError as error:
        print(f"sdlora: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
