"""The toy world, its concept scorer, the shipped datasets and the shipped pretrained toy model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from sdlora import toy

ROOT = Path(__file__).parents[1]
MODEL = ROOT / "models" / "toy-sd1"
DATASETS = ROOT / "datasets"
# Every attribute the scorer must read: all colours x shapes (the star too: stacking the style with the
# character draws outlined stars) x both styles.
CASES = [(shape, style) for shape in toy.ALL_SHAPES for style in toy.STYLES]


def held_out_scenes(seed: int, per_case: int) -> list[toy.Scene]:
    rng = np.random.default_rng(seed)
    return [toy.random_scene(rng, colours=(colour,), shapes=(shape,), style=style)
            for shape, style in CASES for colour in toy.COLOURS for _ in range(per_case)]


def accuracy(scenes: list[toy.Scene], images: list[Image.Image]) -> dict[str, float]:
    scores = [toy.score(image) for image in images]
    return {attribute: sum(getattr(s, attribute) == getattr(scene, attribute) for s, scene in zip(scores, scenes))
            / len(scenes) for attribute in ("colour", "shape", "style")}


def degrade(image: Image.Image, rng: np.random.Generator, blur: float, noise: float) -> Image.Image:
    pixels = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    pixels = pixels + rng.normal(0, noise, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


# --- The world -----------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_images():
    def draw(seed):
        return [toy.render(scene).tobytes() for scene in toy.balanced_scenes(12, seed, shapes=toy.ALL_SHAPES)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    assert toy.random_scene(rng_a) == toy.random_scene(rng_b)


def test_render_is_small_rgb_on_the_plain_background():
    image = toy.render(toy.Scene("red", "circle", size=0.4, cx=0.3, cy=0.3))
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert (pixels[-1] == toy.BACKGROUND).all() and (pixels[:, -1] == toy.BACKGROUND).all()
    assert tuple(pixels[10, 10]) == toy.COLOURS["red"]  # the centre of the circle
    assert toy.render(toy.Scene("red", "circle"), size=64).size == (64, 64)


def test_outline_is_hollow_and_the_same_shape():
    filled = np.asarray(toy.render(toy.Scene("blue", "square", "filled", size=0.7)))
    outline = np.asarray(toy.render(toy.Scene("blue", "square", "outline", size=0.7)))
    assert tuple(filled[16, 16]) == toy.COLOURS["blue"]
    assert tuple(outline[16, 16]) == toy.BACKGROUND
    assert (outline[:, 5] == filled[:, 5]).all()  # the left edge is the same


def test_bad_scene_values_are_rejected():
    with pytest.raises(ValueError, match="colour"):
        toy.render(toy.Scene("purple", "circle"))
    with pytest.raises(ValueError, match="shape"):
        toy.render(toy.Scene("red", "pentagon"))
    with pytest.raises(ValueError, match="style"):
        toy.render(toy.Scene("red", "circle", style="dotted"))


def test_captions():
    scene = toy.Scene("yellow", "triangle", "outline")
    assert toy.caption(scene) == "a yellow triangle"  # the style is never named
    assert toy.caption(toy.Scene("red", "star"), trigger="zkz") == "a red zkz"
    assert toy.parse_caption("a green square") == ("green", "square")
    with pytest.raises(ValueError):
        toy.parse_caption("a green")


def test_write_dataset_writes_numbered_png_and_txt(tmp_path):
    scenes = toy.write_dataset(tmp_path, 5, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:04d}.{ext}" for i in range(5) for ext in ("png", "txt")]
    assert (tmp_path / "0003.txt").read_text() == toy.caption(scenes[3]) + "\n"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "0003.png")), np.asarray(toy.render(scenes[3])))
    # Balanced: the first 12 cover every colour x shape pair once.
    assert len({(s.colour, s.shape) for s in toy.balanced_scenes(12, seed=0)}) == 12


# --- The shipped datasets ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(toy.DATASETS))
def test_shipped_dataset_matches_a_fresh_regeneration(name, tmp_path):
    shipped = DATASETS / name
    assert (shipped / "README.md").is_file()
    toy.write_dataset(tmp_path, **toy.DATASETS[name])
    fresh = sorted(tmp_path.iterdir())
    assert [p.name for p in fresh] == sorted(p.name for p in shipped.iterdir() if p.suffix in (".png", ".txt"))
    for path in fresh:
        if path.suffix == ".png":
            # Pixels, not PNG bytes: another zlib may compress the same pixels differently.
            assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(shipped / path.name))), path.name
        else:
            assert path.read_text() == (shipped / path.name).read_text(), path.name


def test_style_outline_dataset_teaches_the_style_from_images_alone():
    folder = DATASETS / "style-outline"
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == 32 and len(list(folder.glob("*.png"))) == 32
    assert {toy.parse_caption(c) for c in captions} == {(c, s) for c in toy.COLOURS for s in toy.SHAPES}
    assert not any(word in c for c in captions for word in ("outline", *toy.TRIGGERS))
    assert toy.match_rate([Image.open(p) for p in folder.glob("*.png")], style="outline") == 1.0


def test_character_star_dataset_binds_the_trigger():
    folder = DATASETS / "character-star"
    captions = [p.read_text().strip() for p in sorted(folder.glob("*.txt"))]
    assert len(captions) == 24 and len(list(folder.glob("*.png"))) == 24
    assert {toy.parse_caption(c) for c in captions} == {(c, toy.STAR_TRIGGER) for c in toy.COLOURS}
    assert toy.match_rate([Image.open(p) for p in folder.glob("*.png")], shape="star", style="filled") == 1.0


# --- The scorer ----------------------------------------------------------------------------------


def test_scorer_reads_held_out_images():
    scenes = held_out_scenes(seed=2024, per_case=5)  # 140 images, seeds no dataset uses
    result = accuracy(scenes, [toy.render(s) for s in scenes])
    assert min(result.values()) >= 0.95, result


def test_scorer_survives_blur_and_noise():
    """Samples from a small diffusion model are a little soft and grainy."""
    rng = np.random.default_rng(5)
    scenes = held_out_scenes(seed=77, per_case=5)
    result = accuracy(scenes, [degrade(toy.render(s), rng, blur=0.7, noise=10) for s in scenes])
    assert min(result.values()) >= 0.9, result


def test_scorer_at_other_sizes_and_on_arrays():
    scene = toy.Scene("green", "triangle", "outline", size=0.7)
    for image in (toy.render(scene, size=128), np.asarray(toy.render(scene))):
        s = toy.score(image)
        assert (s.colour, s.shape, s.style) == ("green", "triangle", "outline")
        assert s.outline and not s.star


def test_scorer_finds_nothing_in_a_blank_image():
    blank = Image.new("RGB", (32, 32), toy.BACKGROUND)
    assert toy.score(blank) == toy.Scores(None, None, None)
    assert toy.presence_rates([blank])["none"] == 1.0


def test_presence_and_match_rates():
    images = [toy.render(toy.Scene("red", "star")), toy.render(toy.Scene("red", "circle", "outline")),
              toy.render(toy.Scene("blue", "circle"))]
    rates = toy.presence_rates(images)
    assert rates["shape:star"] == pytest.approx(1 / 3) and rates["style:outline"] == pytest.approx(1 / 3)
    assert rates["colour:red"] == pytest.approx(2 / 3) and rates["none"] == 0
    assert toy.match_rate(images, colour="red") == pytest.approx(2 / 3)
    assert toy.match_rate(images, colour="red", shape="circle") == pytest.approx(1 / 3)
    assert toy.match_rate(images) == 1.0


# --- Pretraining data and the shipped model ------------------------------------------------------


def test_pretraining_data_never_shows_the_new_concepts():
    from sdlora.toy import pretrain as toy_pretrain

    images, captions = toy_pretrain.render_pool(300, seed=0)
    assert all(toy.parse_caption(c)[1] in toy.SHAPES for c in captions)
    pixels = images.permute(0, 2, 3, 1).numpy()
    rates = toy.presence_rates(pixels)
    assert rates["shape:star"] == 0 and rates["style:outline"] == 0


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    assert (MODEL / "model_index.json").is_file(), f"the shipped toy model is missing from {MODEL}"
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_is_small_and_configured_like_sd1(toy_pipe):
    size = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB"
    assert not list(MODEL.rglob("*.bin")), "weights must be safetensors"
    scheduler = toy_pipe.scheduler.config
    assert scheduler.clip_sample is False and scheduler.beta_schedule == "scaled_linear"
    assert toy_pipe.vae_scale_factor == 4 and toy_pipe.unet.config.sample_size * 4 == 32
    assert toy_pipe.vae.config.scaling_factor != 0.18215  # measured on this VAE's latents
    blocks = toy_pipe.unet.config
    assert "CrossAttnDownBlock2D" in blocks.down_block_types and "CrossAttnUpBlock2D" in blocks.up_block_types
    assert blocks.mid_block_type == "UNetMidBlock2DCrossAttn"
    tokenizer = toy_pipe.tokenizer
    assert tokenizer.model_max_length == toy_pipe.text_encoder.config.max_position_embeddings
    # The spare words must be single tokens, so an adapter can bind a concept to one embedding.
    # (Not every world word is: BPE merge order splits "green" into pieces; the model learned it so.)
    for word in ("star", "outline", "outlined", *toy.TRIGGERS):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_shipped_model_draws_what_it_is_asked(toy_pipe):
    prompts = ["a red circle", "a blue square", "a yellow triangle", "a green square"]
    images = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(100 + k) for k in range(2)]
        images += toy_pipe([prompt] * 2, height=32, width=32, num_inference_steps=15, guidance_scale=5.0,
                           generator=generators).images
    scores = [toy.score(image) for image in images]
    hits = [toy.match_rate([s], *toy.parse_caption(p)) for s, p in zip(scores, [p for p in prompts for _ in "xy"])]
    assert sum(hits) >= 7, [(s.colour, s.shape, s.style) for s in scores]
    assert sum(s.star or s.outline for s in scores) <= 1


# --- sdlora toy eval -----------------------------------------------------------------------------


def test_rates_count_each_concept_and_both_together():
    from sdlora.toy.eval import rates

    drawn = [toy.Scene("red", "star", "outline"), toy.Scene("blue", "star"), toy.Scene("green", "circle", "outline"),
             toy.Scene("yellow", "star", "outline")]
    prompts = ["a red zkz", "a blue zkz"]  # two images per prompt: red, red, blue, blue asked
    row = rates("trigger", 1.0, prompts, 2, [toy.render(scene) for scene in drawn])
    assert (row.images, row.star, row.outline, row.outlined_star) == (4, 0.75, 0.75, 0.5)
    assert row.colour_ok == 0.25 and row.shape_ok is None  # only the first image has the asked colour
    content = rates("content", 0.0, ["a green circle"], 1, [toy.render(drawn[2])])
    assert content.shape_ok == 1.0 and content.star == 0.0


def test_toy_eval_command_prints_a_table_and_writes_a_grid(tmp_path, capsys):
    from sdlora import loader
    from sdlora.cli import main
    from sdlora.toy.eval import load_toy_pipeline

    pipe = load_toy_pipeline(MODEL)
    loader.add_adapter(pipe, "blank", rank=2)  # up is zero: the model's own behaviour at every strength
    loader.save(pipe, tmp_path / "blank.safetensors", "blank")
    grid = tmp_path / "grid.png"
    code = main(["toy", "eval", "--lora", str(tmp_path / "blank.safetensors"), "--trigger", "zkz", "--strengths",
                 "0,1", "--n", "1", "--steps", "3", "--grid", str(grid)])
    assert code == 0
    table = capsys.readouterr().out
    assert table.count("| content |") == 2 and table.count("| trigger |") == 2 and "outlined star" in table
    # 12 prompts wide after a 90 px label column; content and trigger at 2 strengths, each with a caption line
    assert Image.open(grid).size == (90 + 12 * 96, 4 * (96 + 12))
    assert main(["toy", "eval", "--lora", str(tmp_path / "missing.safetensors")]) == 2


def _relative_effect(pipe, name: str, timesteps: tuple[int, ...]) -> dict[int, float]:
    """|UNet output with the adapter - without| / |without|, on fixed latents and toy prompts."""
    import sdlora
    from sdlora.base_models.families import SD1

    prompts = ["a red circle", "a blue square", "a green triangle"]
    context = SD1.encode_text([pipe.text_encoder], [pipe.tokenizer], prompts).hidden
    latents = torch.randn(len(prompts), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    effect = {}
    for t in timesteps:
        step = torch.full((len(prompts),), t)
        with torch.no_grad():
            on = pipe.unet(latents, step, encoder_hidden_states=context).sample
            with sdlora.disabled(pipe, name):
                off = pipe.unet(latents, step, encoder_hidden_states=context).sample
        effect[t] = float((on - off).norm() / off.norm())
    return effect


def test_preserving_outside_the_window_keeps_the_style_off_the_noisy_timesteps(tmp_path):
    """Preservation, on the style data: trained below t=600, the adapter is taught to leave t >= 600 to
    the base model. Against the same run without preservation it changes the UNet's output at t=900
    much less, and at t=100, where the style is learned, about as much."""
    import sdlora
    from sdlora.training.config import build
    from sdlora.toy.eval import load_toy_pipeline
    from sdlora.training.loop import train

    effects = {}
    for preserve in (False, True):
        # The style config as it was when it used the window: attention and feed-forward, t < 600; short
        # (60 steps of 8): measured 0.53 and 0.97 for the two ratios below, as at 120 steps of 16 (0.56, 0.98).
        settings = build({"output_dir": str(tmp_path / str(preserve)), "max_steps": 60, "batch_size": 8,
                          "targets": "attn-mlp", "timestep_max": 600, "preserve_outside_window": preserve},
                         DATASETS / "style-outline" / "train.toml")
        pipe = load_toy_pipeline(MODEL)
        sdlora.load(pipe, train(settings), name="style")
        effects[preserve] = _relative_effect(pipe, "style", (100, 900))
    assert effects[True][900] < 0.7 * effects[False][900], effects
    assert effects[True][100] > 0.7 * effects[False][100], effects
