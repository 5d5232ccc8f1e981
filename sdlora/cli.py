"""The `sdlora` command line."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from . import loader
from .training import config
from .reliability.durable import write_file
from .errors import AdapterFileError, ConfigError, SdloraError, TrainingDiverged, TrainingStopped, WriteFailed


TRAIN_EXAMPLES = """examples:
  sdlora train --model models/toy-sd1 --data datasets/style-outline --output-dir out/style   # the toy model, on a CPU
  sdlora train --model v1-5-pruned-emaonly.safetensors --data my_images/ --output-dir out/ --max-steps 1500
  sdlora train --model v2-1_768-ema-pruned.safetensors --data my_images/ --output-dir out/   # v-prediction, 768 px
  sdlora train --model sd_xl_base_1.0.safetensors --data my_images/ --output-dir out/ \\
      --mixed-precision bf16 --gradient-checkpointing                                        # 1024 px
  sdlora train --config train.toml --resume latest

The family (SD 1.x, 2.x, XL), its prediction type and its resolution come from the model.
"""

TOY_EVAL_EXAMPLES = """examples:
  sdlora toy eval --lora out/style-outline/style-outline.safetensors --n 8
  sdlora toy eval --lora style.safetensors --lora star.safetensors --trigger zkz --strengths 1   # stacked
  sdlora toy eval --config datasets/character-star/train.toml --change prior_loss_weight=1.0 \\
      --trigger zkz --n 8 --seeds 0,1000        # what does prior preservation change?
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and use LoRA adapters for Stable Diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="describe adapter files: family, layout, kinds, ranks, update per block, anomalies",
        description="Describe adapter .safetensors files without loading a model: family, layout (kohya, "
                    "diffusers, ComfyUI, ...), adapter kinds, ranks and alphas, components, the size of the update "
                    "per UNet block, training facts from the header, and anything that looks wrong.",
        epilog="example: sdlora inspect style.safetensors --modules",
        formatter_class=argparse.RawDescriptionHelpFormatter)
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
        "eval", help="score adapters at several strengths, or what one training option changes",
        description="Generate images at each strength with the adapters loaded (stacked when several), score "
                    "them (outline style, star, colour and shape kept) and print a table.\n\n"
                    "With --config and --change: train the config as it is and with the change, from the same "
                    "seed, score both with the same image seeds, and print them side by side (OUT/compare.md, "
                    "with labelled grids). Runs are kept under --out by config, so a rerun reuses them.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TOY_EVAL_EXAMPLES)
    evaluate.add_argument("--lora", action="append", metavar="FILE[:STRENGTH][@START-STOP]",
                          help="adapter file, with its own strength after a colon (a number or block weights such "
                               "as :IN01=0,OUT05=0; each of --strengths multiplies it) and a step window after @ "
                               "(on from START to STOP, fractions of the steps); repeat to stack several")
    evaluate.add_argument("--config", type=Path, help="a training config to train and score with and without "
                                                      "--change")
    evaluate.add_argument("--change", action="append", default=[], metavar="KEY=VALUE",
                          help="a config key to change (value as in TOML); repeat to change several together")
    evaluate.add_argument("--out", type=Path, default=Path("out/compare"),
                          help="with --config: where the runs, grids and compare.md go (default: %(default)s)")
    evaluate.add_argument("--stack-with", type=Path, metavar="FILE",
                          help="with --config: also score outlined stars with this adapter stacked at 1 "
                               "(needs --trigger)")
    evaluate.add_argument("--seeds", default="0", help="comma-separated image seed sets: image j of each prompt "
                                                        "from seed S + j (default: %(default)s)")
    evaluate.add_argument("--model", default="models/toy-sd1", help="the toy base model (default: %(default)s)")
    evaluate.add_argument("--trigger", help=f"also score prompts 'a COLOUR TRIGGER' (the star dataset uses "
                                            f"{toy_trigger()!r})")
    evaluate.add_argument("--strengths", default="0,0.25,0.5,0.75,1", help="comma-separated (default: %(default)s)")
    evaluate.add_argument("--n", type=int, default=4, help="images per prompt (default: %(default)s)")
    evaluate.add_argument("--steps", type=int, default=25, help="denoising steps (default: %(default)s)")
    evaluate.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s)")
    evaluate.add_argument("--grid", type=Path, help="write a PNG grid: one row per prompt set and strength")
    evaluate.add_argument("--save-images", type=Path, metavar="DIR",
                          help="also write every generated image, as DIR/PROMPTS-STRENGTH/NNN-PROMPT.png, to score "
                               "or inspect again later")
    demo = toy_commands.add_parser(
        "demo", help="train the style adapter on the bundled model and data, then score it",
        description="Train an outline-style adapter on datasets/style-outline with the bundled toy model on the "
                    "CPU, then write the adapter, a before/after grid and the score table.")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: %(default)s)")
    demo.add_argument("--config", type=Path, default=Path("datasets/style-outline/train.toml"),
                      help="training config (default: %(default)s)")

    add_adapter_commands(commands)
    add_studio_command(commands)

    train.add_argument("--config", type=Path, help="TOML file with any of the options below")
    train.add_argument("--quiet", action="store_true", help="no progress bar or summaries")
    config.add_arguments(train)
    return parser


GENERATE_EXAMPLES = """examples:
  sdlora generate --model models/toy-sd1 --lora out/demo/style-outline.safetensors --prompt "a red circle" \\
      --steps 25 --guidance 5 --output out/red.png
  sdlora generate --model sd_xl_base_1.0.safetensors --lora style.safetensors:0.8 --lora character.safetensors \\
      --prompt "a portrait" --num 4 --output out/portrait.png          # out/portrait-0.png ... -3.png
  sdlora generate --model v1-5-pruned-emaonly.safetensors --lora style.safetensors --prompt "a house" \\
      --compare --output out/strengths.png                              # one grid, strengths 0 to 1
  sdlora generate --model sd_xl_base_1.0.safetensors --lora character.safetensors@0-0.4 \\
      --lora style.safetensors:0.8@0.4-1 --prompt "a portrait" --output out/windows.png
                     # the character sets the composition early, the style acts late (step windows)
  sdlora generate --model v1-5-pruned-emaonly.safetensors --lora style.safetensors:OUTD --prompt "a house" \
      --output out/outd.png            # block weights: the LoRA Block Weight extension's preset OUTD

Image j comes from seed + j. On a GPU it runs in fp16, on a CPU in fp32. The size defaults to the
model's own (512, 768 or 1024).
"""

MERGE_EXAMPLES = """examples:
  sdlora merge style.safetensors:0.7 detail.safetensors:0.3 -o merged.safetensors          # exact
  sdlora merge style.safetensors:0.7 detail.safetensors:0.3 -o merged.safetensors --rank 32
  sdlora merge style.safetensors:0.8 --into v1-5-pruned-emaonly.safetensors -o my-model/    # a diffusers folder
  sdlora merge style.safetensors:0.8 --into models/toy-sd1 -o my-model.safetensors          # one checkpoint
  sdlora merge out/a/a.safetensors out/b/b.safetensors --model models/toy-sd1 -o ab.safetensors

A weight after the last colon scales that file's update (default 1; negative subtracts). Without
--rank the merged file holds the rank of all inputs together and equals their weighted sum exactly;
with --rank each module's summed update is cut to that rank by SVD and the error is printed.
Files are read against their family's standard model (SD 1.x, 2.x, XL base), so modules pair whatever
layout each file has; --model gives the model for adapters made for another one (a refiner, a toy).
"""

RESIZE_EXAMPLES = """examples:
  sdlora resize style.safetensors --rank 8 -o style-r8.safetensors
  sdlora resize style.safetensors --energy 0.95 -o style-dynamic.safetensors   # rank chosen per module
  sdlora resize out/a/a.safetensors --rank 2 --model models/toy-sd1 -o a-r2.safetensors

Each module's update up @ down * alpha / rank is decomposed by SVD; the output has alpha = its rank.
The file is read against its family's standard model, or the one --model gives.
"""

EXTRACT_EXAMPLES = """examples:
  sdlora extract --base v1-5-pruned-emaonly.safetensors --tuned my-finetune.safetensors --rank 32 \\
      -o finetune.safetensors
  sdlora extract --base sd_xl_base_1.0.safetensors --tuned sdxl-finetune.safetensors --rank 64 \\
      --components unet -o finetune-xl.safetensors

Models are loaded in fp32; on a GPU the SVDs run there. Layers the fine-tune left unchanged are left out.
"""


STUDIO_EXAMPLES = """examples:
  sdlora studio                                  # http://127.0.0.1:7860/ over the runs in ./out
  sdlora studio --runs runs/ --data datasets/ --data ~/photos
  sdlora studio --host 0.0.0.0 --port 8080       # a headless training box: prints the address with its token

It only reads the files runs write and leaves requests for them (stop, save now, sample now): a run
started with `sdlora train --output-dir RUNS/NAME` shows up as one queued from a page, and stopping
or killing the studio never touches a training. Needs the studio extra: pip install 'sdlora[studio]'.
"""


def add_studio_command(commands) -> None:
    studio = commands.add_parser(
        "studio", help="a local web app to queue, watch, steer and compare trainings",
        description="Serve the studio: every run in --runs with its status, live loss and samples; a queue; "
                    "compare runs side by side; edit captions; inspect adapters. A JSON API under /api/ "
                    "(docs/studio.md) lets a script on another machine drive a training box.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=STUDIO_EXAMPLES)
    studio.add_argument("--runs", type=Path, default=Path("out"),
                        help="the folder of run folders; queued runs go to RUNS/NAME (default: %(default)s)")
    studio.add_argument("--data", type=Path, action="append", metavar="DIR",
                        help="a folder of datasets to browse and caption; repeat for several (default: ./datasets "
                             "when it exists)")
    studio.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; any but a loopback one requires a token (default: %(default)s)")
    studio.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    studio.add_argument("--token", help="the token to require (default: generated and printed at start when "
                                        "--host is not a loopback address)")
    studio.add_argument("--parallel", type=positive_int, default=1,
                        help="queued runs that may train at once (default: %(default)s: one GPU, one run)")


def add_adapter_commands(commands) -> None:
    """generate, merge, resize and extract: the commands that use and reshape adapter files."""
    raw = argparse.RawDescriptionHelpFormatter
    generate = commands.add_parser(
        "generate", help="generate images with adapters (or a grid over strengths)", formatter_class=raw,
        description="Generate images with a base model and adapters, each at its strength.", epilog=GENERATE_EXAMPLES)
    generate.add_argument("--model", required=True, help="diffusers folder, hub id or .safetensors/.ckpt file")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH][@START-STOP]",
                          help="adapter file, with a strength after a colon (default 1) and a step window after @ "
                               "(on from START to STOP, fractions of the steps: @0.4-1 is the last 60%%); repeat "
                               "to stack. STRENGTH may be block weights as the A1111 LoRA Block Weight extension "
                               "writes them: a preset (:OUTD), 17 or 26 values for SD 1.x/2.x and 12 or 20 for "
                               "SDXL (:1,0,0,...), or blocks by name (:IN04=0.5,M00=0)")
    generate.add_argument("--prompt", required=True, help="what to draw")
    generate.add_argument("--negative", help="negative prompt")
    generate.add_argument("--steps", type=positive_int, default=30, help="denoising steps (default: %(default)s)")
    generate.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first image (default: %(default)s)")
    generate.add_argument("--size", help="WIDTHxHEIGHT (default: the model's native size)")
    generate.add_argument("--num", type=positive_int, default=1,
                          help="images, from seeds seed, seed+1, ...; written as PATH-0.png, PATH-1.png, ... when "
                               "more than one (with --compare: rows of the grid) (default: %(default)s)")
    generate.add_argument("--fuse", action="store_true", help="fuse the adapters into the weights (faster steps)")
    generate.add_argument("--compare", action="store_true",
                          help="write one grid: the prompt at strengths 0, 0.25, 0.5, 0.75 and 1 (times each "
                               "adapter's own), labelled; strength 0 is the base model's image")
    generate.add_argument("--output", "-o", required=True, type=Path, metavar="PATH", help="the PNG to write")

    merge = commands.add_parser(
        "merge", help="merge adapters into one, or bake them into a model", formatter_class=raw,
        description="Merge adapter files into one adapter equal to their weighted sum, or bake them into a "
                    "base model's weights (--into).", epilog=MERGE_EXAMPLES)
    merge.add_argument("files", nargs="+", metavar="FILE[:WEIGHT]", help="adapter files, each with its weight")
    merge.add_argument("--output", "-o", required=True, type=Path,
                       help="the adapter (*.safetensors); with --into a model folder, or a *.safetensors checkpoint")
    merge.add_argument("--rank", type=positive_int, help="cut each module to this rank by SVD (default: exact)")
    merge.add_argument("--into", metavar="MODEL", help="bake the adapters into this model and save the model")
    merge.add_argument("--model", help="the model the adapters are for, when it is not their family's standard "
                                       "one (diffusers folder, hub id or single file)")
    merge.add_argument("--dtype", choices=("fp16", "bf16", "fp32"),
                       help="tensor type written (default: the inputs' for an adapter, fp16 for a model)")

    resize = commands.add_parser(
        "resize", help="reduce an adapter's rank by SVD", formatter_class=raw,
        description="Reduce an adapter's rank module by module by SVD, to one rank or by kept energy.",
        epilog=RESIZE_EXAMPLES)
    resize.add_argument("file", type=Path, metavar="FILE", help="the adapter to resize (any layout sdlora reads)")
    amount = resize.add_mutually_exclusive_group(required=True)
    amount.add_argument("--rank", type=positive_int, help="the new rank of every module")
    amount.add_argument("--energy", type=float,
                        help="per module, the smallest rank whose squared singular values reach this fraction")
    resize.add_argument("--output", "-o", required=True, type=Path, help="the new adapter (*.safetensors)")
    resize.add_argument("--model", help="the model the adapter is for, when it is not its family's standard one")
    resize.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="tensor type written (default: the input's)")

    convert = commands.add_parser(
        "convert", help="rewrite an adapter in another tool's layout (kohya, diffusers, comfy), losslessly",
        formatter_class=raw,
        description="Rewrite an adapter file in the layout another tool reads; the tensors are carried over "
                    "unchanged, and converting back gives the same file contents. kohya: what A1111 and ComfyUI "
                    "read (SDXL with the original UNet names, lora_te1_/lora_te2_, alphas); diffusers: the PEFT "
                    "names diffusers writes, alphas in the header; comfy: ComfyUI's own (diffusion_model., "
                    "text_encoders.clip_l.). LyCORIS kinds convert between kohya and comfy.",
        epilog="examples:\n  sdlora convert pytorch_lora_weights.safetensors --to kohya -o for-a1111.safetensors\n"
               "  sdlora convert style.safetensors --to diffusers -o style-diffusers.safetensors\n"
               "  sdlora convert toy.safetensors --to comfy --model models/toy-sd1 -o toy-comfy.safetensors\n\n"
               "Without --model, the file is read against its family's standard architecture (SD 1.5, SD 2.1, "
               "SDXL base),\nbuilt from the configs sdlora ships; pass --model for any other.")
    convert.add_argument("file", type=Path, metavar="FILE", help="the adapter to convert (any layout sdlora reads)")
    convert.add_argument("--to", required=True, choices=("kohya", "diffusers", "comfy"), help="the layout to write")
    convert.add_argument("--output", "-o", required=True, type=Path, help="the new file (*.safetensors)")
    convert.add_argument("--model", help="the model the adapter is for, when it is not its family's standard one")

    extract = commands.add_parser(
        "extract", help="extract a LoRA from a fine-tuned model", formatter_class=raw,
        description="Extract a LoRA from the difference of a fine-tuned model and its base, by SVD of each "
                    "layer's change.", epilog=EXTRACT_EXAMPLES)
    extract.add_argument("--base", required=True, metavar="MODEL", help="the base model")
    extract.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned model")
    extract.add_argument("--rank", required=True, type=positive_int, help="the rank of every extracted module")
    extract.add_argument("--output", "-o", required=True, type=Path, help="the adapter (*.safetensors)")
    extract.add_argument("--targets", default="attn-mlp", choices=sorted(target_presets()),
                         help="which layers (default: %(default)s)")
    extract.add_argument("--components", help="comma-separated, e.g. unet,text_encoder (default: all the model has)")
    extract.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16",
                         help="tensor type written (default: %(default)s)")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def target_presets() -> list[str]:
    from .adapters.targets import PRESETS

    return list(PRESETS)


def parse_weighted(value: str, default: float = 1.0) -> tuple[Path, float]:
    """`FILE:WEIGHT` -> (FILE, WEIGHT); a FILE alone gets `default`. Only a number after the last
    colon is a weight, so a path with colons in it still works."""
    from .adapters.strength import split_weight

    path, weight = split_weight(value)
    return Path(path), default if weight is None else weight


def parse_lora(value: str):
    """`FILE[:STRENGTH][@START-STOP]` -> (FILE, STRENGTH, window or None): `style.safetensors:0.8@0.4-1`
    is the style at 0.8 from 40% of the steps to the end. STRENGTH is a number or block weights as the
    A1111 LoRA Block Weight extension writes them: a preset (`:OUTD`), a vector (`:1,0,0,...`) or
    blocks by name (`:IN04=0.5,M00=0`)."""
    from .adapters.block_weights import from_text
    from .adapters.strength import check_window

    window = None
    head, at, tail = value.rpartition("@")
    if at and (match := re.fullmatch(r"([0-9.]+)-([0-9.]+)", tail)):
        try:
            window = (float(match[1]), float(match[2]))
        except ValueError:
            raise ConfigError(f"--lora {value}: the step window after @ must be START-STOP, fractions of the "
                              "steps such as 0.4-1") from None
        try:
            check_window(Path(head).stem, window)
        except ValueError as error:
            raise ConfigError(f"--lora {value}: {error}") from None
        value = head
    head, colon, tail = value.rpartition(":")
    if colon and (blocks := from_text(tail)) is not None:
        return Path(head), blocks, window
    path, strength = parse_weighted(value)
    return path, strength, window


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
    """Exit status: 0 the adapter is written; 1 the run failed after it started (diverged, a write
    failed), what it wrote intact; 2 a mistake in what it was given (from main); 3 it stopped on
    request (training/control.py), its checkpoint written, to be continued with --resume latest."""
    from .training.loop import train

    quiet_libraries()
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    try:
        train(config.build(values, args.config), quiet=args.quiet)
    except (TrainingDiverged, WriteFailed) as error:  # the run started; what it wrote is intact
        error_line(f"sdlora: training stopped: {error}")
        return 1
    except TrainingStopped as stopped:
        error_line(f"sdlora: {stopped}")
        return 3
    return 0


def toy_trigger() -> str:
    from .toy.world import STAR_TRIGGER

    return STAR_TRIGGER


def run_toy(args: argparse.Namespace) -> int:
    from .toy import eval as toy_eval

    quiet_libraries()
    if args.toy_command == "demo":
        return toy_eval.demo(args.out, args.config)
    seeds = [int(value) for value in args.seeds.split(",")]
    if args.config:
        from .toy.compare import compare

        if args.lora:
            raise ConfigError("give --lora (score adapters) or --config (train and compare), not both")
        print(compare(args.config, args.change, args.out, args.n, seeds, args.trigger, args.stack_with,
                      args.steps, args.guidance))
        return 0
    if not args.lora:
        raise ConfigError("give --lora FILE to score an adapter, or --config FILE --change KEY=VALUE to compare")
    strengths = [float(value) for value in args.strengths.split(",")]
    specs = [parse_lora(value) for value in args.lora]
    for path in [args.model, *(path for path, _, _ in specs)]:
        if not Path(path).exists():
            print(f"sdlora: error: {path} does not exist", file=sys.stderr)
            return 2
    pipe = toy_eval.load_toy_pipeline(args.model)
    names = [loader.load(pipe, path, strength, name=f"adapter{i}") for i, (path, strength, _) in enumerate(specs)]
    windows = {name: window for name, (_, _, window) in zip(names, specs) if window}
    own = {name: strength for name, (_, strength, _) in zip(names, specs)}
    prompt_sets = {"content": toy_eval.content_prompts()}
    if args.trigger:
        prompt_sets["trigger"] = toy_eval.trigger_prompts(args.trigger)
    result = None  # the grid and saved images show the first seed set
    for seed in seeds:
        scored = toy_eval.evaluate(pipe, names, strengths, args.n, prompt_sets, args.steps, args.guidance, seed,
                                   windows, own)
        print(("" if len(seeds) == 1 else f"\nseed set {seed}:\n") + scored.table())
        result = result or scored
    if args.grid:
        toy_eval.grid(result).save(args.grid)
        print(f"grid: {args.grid}")
    if args.save_images:
        count = toy_eval.save_images(result, args.save_images)
        print(f"images: {count} in {args.save_images}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from .tools import inspect as inspection

    reports = [inspection.inspect(path) for path in args.files]
    if args.json:
        print("\n".join(inspection.to_json(report) for report in reports))
    else:
        print("\n\n".join(inspection.render(report, per_module=args.modules) for report in reports))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .images import png_bytes
    from .tools import generate

    if args.compare and not args.lora:
        raise ConfigError("--compare shows adapters at several strengths: give at least one --lora")
    if args.output.suffix.lower() != ".png":
        raise ConfigError(f"{args.output}: images are written as PNG; name the output *.png")
    size = generate.parse_size(args.size) if args.size else None
    specs = [parse_lora(value) for value in args.lora]
    if args.fuse and any(window for _, _, window in specs):
        raise ConfigError("--fuse adds the adapters into the weights for every step: a step window (@START-STOP) "
                          "needs them unfused; drop --fuse")
    loras = [(path, strength) for path, strength, _ in specs]
    settings = generate.Settings(args.prompt, args.negative, args.steps, args.guidance, args.seed, size)
    quiet_libraries()
    pipe, names = generate.load_with_adapters(args.model, loras, fuse=args.fuse)
    windows = {name: window for name, (_, _, window) in zip(names, specs) if window}
    if args.compare:
        sheet = generate.compare(pipe, names, [strength for _, strength in loras], settings, args.num, args.fuse,
                                 windows)
        written = [write_file(args.output, png_bytes(sheet))]
    else:
        found = generate.images(pipe, settings, args.num, windows=windows)
        written = generate.write_images(args.output, found, settings, generate.image_size(pipe, size), loras)
    print("\n".join(str(path) for path in written))
    return 0


def reading_model(model: str | None, files: list[Path], output: Path):
    """The pipeline `--model` names, to read adapter files against (None: their family's standard one),
    once the files and the output are known to be usable: loading a model takes a while."""
    from .files.safetensors import check_output

    check_output(output)
    for path in files:
        if not path.is_file():
            raise AdapterFileError(f"{path}: no such adapter file")
    if not model:
        return None
    from .base_models.sources import load_pipeline

    quiet_libraries()
    return load_pipeline(model)


def run_merge(args: argparse.Namespace) -> int:
    from .tools.merge import merge_files

    sources = [parse_weighted(value) for value in args.files]
    if args.into:
        from .tools import bake
        from .base_models.sources import load_pipeline

        if args.rank:
            raise ConfigError("--rank applies to merged adapter files; --into bakes the full update into the model")
        if args.model:
            raise ConfigError("--model is for merging into an adapter file; with --into the files are read against "
                              "the model they are baked into")
        bake.check_model_output(args.output, args.into)
        for path, _ in sources:
            if not path.exists():
                raise AdapterFileError(f"{path}: no such adapter file")
        quiet_libraries()
        import torch

        pipe = load_pipeline(args.into, torch.float32)  # baked in fp32, written in --dtype
        bake.bake(pipe, sources)
        bake.save_pipeline(pipe, args.output, args.dtype or "fp16")
        print(f"wrote {args.output}: {args.into} with {len(sources)} adapter(s) baked in")
        return 0
    model = reading_model(args.model, [path for path, _ in sources], args.output)
    report = merge_files(sources, args.output, args.rank, args.dtype, model)
    print(f"wrote {args.output}: {len(sources)} file(s) merged " + ("exactly (ranks concatenated)" if report is None
                                                                   else f"at rank {args.rank}"))
    if report is not None:
        print("\n".join(report.error_lines()))
    return 0


def run_resize(args: argparse.Namespace) -> int:
    from .tools.merge import resize_file

    report = resize_file(args.file, args.output, args.rank, args.energy, args.dtype,
                         reading_model(args.model, [args.file], args.output))
    print(f"wrote {args.output}")
    print("\n".join([*report.energy_lines(), *report.error_lines(), report.rank_line()]))
    return 0


def run_extract(args: argparse.Namespace) -> int:
    from .tools.extract import extract_file

    names = [name.strip() for name in args.components.split(",") if name.strip()] if args.components else None
    quiet_libraries()
    report, unchanged = extract_file(args.base, args.tuned, args.output, args.rank, args.targets, names, args.dtype)
    print(f"wrote {args.output}: {len(report.rows)} module(s) at rank {args.rank}")
    if unchanged:
        print(f"left out {len(unchanged)} unchanged layer(s), first {unchanged[0]}")
    print("\n".join(report.error_lines()))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .tools.convert import convert

    output = convert(args.file, args.to, args.output, reading_model(args.model, [args.file], args.output))
    print(f"wrote {output} ({args.to} layout)")
    return 0


def run_studio(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn", "jinja2") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"the studio needs {', '.join(missing)}: pip install 'sdlora[studio]'")
    from .studio.app import serve

    data = args.data or ([Path("datasets")] if Path("datasets").is_dir() else [])
    for folder in data:
        if not folder.is_dir():
            raise ConfigError(f"--data {folder}: no such folder")
    serve(args.runs, data, host=args.host, port=args.port, token=args.token, parallel=args.parallel)
    return 0


COMMANDS = {"studio": run_studio, "train": run_train, "toy": run_toy, "inspect": run_inspect, "generate": run_generate,
            "merge": run_merge, "resize": run_resize, "extract": run_extract, "convert": run_convert}


def error_line(text: str) -> None:
    """One line on stderr in one write: processes of one torchrun share the pipe, and print's separate
    write of the newline let their lines run into each other."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user's mistake (any SdloraError) is one line and exit code 2, a bug a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except SdloraError as error:
        error_line(f"sdlora: error: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
