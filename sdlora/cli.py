"""The `sdlora` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import loader
from .training import config
from .errors import SdloraError, TrainingDiverged, WriteFailed


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
    inspect = commands.add_parser(
        "inspect", help="describe adapter files: family, layout, kinds, ranks, update per block, anomalies",
        description="Describe adapter .safetensors files without loading a model: family, layout (kohya, "
                    "diffusers, ComfyUI, ...), adapter kinds, ranks and alphas, components, the size of the update "
                    "per UNet block, training facts from the header, and anything that looks wrong.",
        epilog="example: sdlora inspect style.safetensors --modules", formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("files", nargs="+", type=Path, metavar="FILE")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON (one object per file)")
    inspect.add_argument("--modules", action="store_true", help="also list every module with its rank and norm")

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
    from . import inspection

    reports = [inspection.inspect(path) for path in args.files]
    if args.json:
        print("\n".join(inspection.to_json(report) for report in reports))
    else:
        print("\n\n".join(inspection.render(report, per_module=args.modules) for report in reports))
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
