"""generate, merge, resize and extract on tiny pipelines, against independent formulas and diffusers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sdlora
from sdlora.files.safetensors import read_adapter
from sdlora.cli import main
from sdlora.base_models.families import SD1, SDXL, detect_family
from sdlora.images import label_height
from sdlora.base_models.module_keys import module_key
from sdlora.files.names import kohya_name
from sdlora.adapters.lora import AdaptedLayer
from sdlora.base_models.parts import components
from sdlora.base_models.sgm import unet_module_map
from sdlora.toy.pipelines import save_tiny_pipeline
from conftest import make_adapter_file, randomize, te_out, unet_out

PROMPT = "a red circle"


# ---------------------------------------------------------------- independent oracles


def file_deltas(path) -> dict[str, torch.Tensor]:
    """kohya module name -> up @ down * alpha / rank in fp64, straight from the file's tensors."""
    tensors = load_file(path)
    deltas = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            down, up = tensors[key].double(), tensors[f"{name}.lora_up.weight"].double()
            rank = down.shape[0]
            alpha = tensors[f"{name}.alpha"].item() if f"{name}.alpha" in tensors else rank
            deltas[name] = (up.flatten(1) @ down.flatten(1)) * alpha / rank
    return deltas


def weighted(*pairs) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for deltas, weight in pairs:
        for name, delta in deltas.items():
            total[name] = total.get(name, 0) + weight * delta
    return total


def run(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def printed(pattern: str, text: str) -> list[float]:
    match = re.search(pattern, text)
    assert match, text
    return [float(group) for group in match.groups()]


def peft_layers(pipe) -> int:
    return sum(1 for model in components(pipe).values() for name, _ in model.named_modules()
               if name.endswith("lora_A.default_0") or name.endswith("lora_A.ref"))


def check_in_diffusers(folder, path, pipe_class=None):
    """diffusers' load_lora_weights takes every module of the file and gives our loader's outputs."""
    from diffusers import StableDiffusionPipeline

    pipe_class = pipe_class or StableDiffusionPipeline
    ours = pipe_class.from_pretrained(folder)
    sdlora.load(ours, path)
    reference = pipe_class.from_pretrained(folder)
    reference.load_lora_weights(str(path), adapter_name="ref")
    modules = {key.removesuffix(".lora_down.weight") for key in load_file(path) if key.endswith("lora_down.weight")}
    assert peft_layers(reference) == len(modules)
    torch.testing.assert_close(model_outputs(reference), model_outputs(ours), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def model_outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs, for SD 1.x and SDXL."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    kwargs = {"encoder_hidden_states": torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)}
    if detect_family(components(pipe)) is SDXL:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=generator),
                                       "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    out = {"unet": pipe.unet(sample, torch.tensor([10, 500]), **kwargs).sample}
    ids = torch.tensor([[pipe.tokenizer.bos_token_id, 5, 17, 42, pipe.tokenizer.eos_token_id]])
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            out[name] = getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def two_files(pipe, tmp_path):
    """A: rank 4 on attention (UNet and text encoder); B: rank 3 on the UNet convs (3x3 LoCon) and the
    text encoder's attention and MLP. They share the text encoder's attention; the rest is in one only."""
    a = make_adapter_file(pipe, tmp_path / "a.safetensors", name="a", seed=1, rank=4, alpha=2.0, targets="attn")
    b = make_adapter_file(pipe, tmp_path / "b.safetensors", name="b", seed=2, rank=3, alpha=6.0, targets="convs")
    return a, b


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("xl") / "pipe", family="sdxl")


# ---------------------------------------------------------------- merge


def test_merge_by_concatenation_equals_loading_both(pipe, tiny_dir, two_files, tmp_path, capsys):
    a, b = two_files
    out = tmp_path / "merged.safetensors"
    run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "-o", out, "--model", tiny_dir)

    sdlora.load(pipe, a, strength=0.7)
    sdlora.load(pipe, b, strength=0.3)
    expected_unet, expected_te = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, out)
    torch.testing.assert_close(unet_out(pipe), expected_unet, atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), expected_te, atol=1e-5, rtol=0)

    # every module of either file is kept; shared ones hold both ranks; one alpha for all (the largest rank)
    merged, deltas_a, deltas_b = file_deltas(out), file_deltas(a), file_deltas(b)
    assert merged.keys() == deltas_a.keys() | deltas_b.keys()
    assert deltas_a.keys() & deltas_b.keys() and deltas_a.keys() - deltas_b.keys() and deltas_b.keys() - deltas_a.keys()
    tensors = load_file(out)
    shared = next(iter(deltas_a.keys() & deltas_b.keys()))
    assert tensors[f"{shared}.lora_down.weight"].shape[0] == 7
    assert {t.item() for k, t in tensors.items() if k.endswith(".alpha")} == {7.0}
    assert read_adapter(out)[1]["ss_base_model_version"] == "sd_v1"


def test_merge_by_svd(pipe, tiny_dir, two_files, tmp_path, capsys):
    a, b = two_files
    target = weighted((file_deltas(a), 0.7), (file_deltas(b), 0.3))

    exact = tmp_path / "r7.safetensors"
    text = run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "-o", exact, "--rank", 7, "--model", tiny_dir)
    assert printed(r"overall ([\d.e-]+)", text)[0] < 1e-4
    sdlora.load(pipe, a, strength=0.7)
    sdlora.load(pipe, b, strength=0.3)
    expected = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, exact)
    torch.testing.assert_close(unet_out(pipe), expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(te_out(pipe), expected[1], atol=1e-4, rtol=0)

    low = tmp_path / "r2.safetensors"
    text = run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "-o", low, "--rank", 2, "--model", tiny_dir)
    overall, worst = printed(r"overall ([\d.e-]+), worst ([\d.e-]+)", text)
    got = file_deltas(low)
    assert got.keys() == target.keys()
    errors = {name: float((got[name] - target[name]).norm() / target[name].norm()) for name in target}
    total = math.sqrt(sum(float((got[n] - target[n]).norm() ** 2) for n in target)
                      / sum(float(target[n].norm() ** 2) for n in target))
    assert overall == pytest.approx(total, abs=1e-6) and overall > 1e-3
    assert worst == pytest.approx(max(errors.values()), abs=1e-6)
    assert max(errors, key=errors.get) in text


def test_merge_and_resize_read_diffusers_peft_files(pipe, tiny_dir, two_files, tmp_path, capsys, reference_client):
    """A file diffusers wrote (PEFT names, alphas in the header) pairs with a kohya file module by module."""
    from test_reference import diffusers_written_file

    peft = diffusers_written_file(tiny_dir, tmp_path, rank=4, alpha=8, te_alpha=2)
    a, _ = two_files
    merged, resized = tmp_path / "m.safetensors", tmp_path / "r.safetensors"
    run(capsys, "merge", f"{peft}:0.5", f"{a}:0.5", "-o", merged, "--model", tiny_dir)
    run(capsys, "resize", peft, "--rank", 4, "-o", resized, "--model", tiny_dir)
    sdlora.load(pipe, peft, strength=0.5)
    sdlora.load(pipe, a, strength=0.5)
    expected = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, merged)
    torch.testing.assert_close(unet_out(pipe), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), expected[1], atol=1e-5, rtol=0)
    # the two files name the text encoder's attention alike: those modules were concatenated
    assert max(t.shape[0] for k, t in load_file(merged).items() if k.endswith("down.weight")) == 8

    sdlora.unload(pipe)
    sdlora.load(pipe, peft)
    expected = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, resized)
    torch.testing.assert_close(unet_out(pipe), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), expected[1], atol=1e-5, rtol=0)


def test_merge_refuses_two_families(pipe, sdxl_dir, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    sd1 = make_adapter_file(pipe, tmp_path / "sd1.safetensors")
    xl = make_adapter_file(StableDiffusionXLPipeline.from_pretrained(sdxl_dir), tmp_path / "xl.safetensors")
    capsys.readouterr()
    assert main(["merge", str(sd1), str(xl), "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "sd1.safetensors" in err and "xl.safetensors" in err and "Stable Diffusion XL" in err
    assert not (tmp_path / "m.safetensors").exists()


def lora_tensors(name: str, out: int, width: int, rank: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(name) + width)
    return {f"{name}.lora_down.weight": torch.randn(rank, width, generator=generator),
            f"{name}.lora_up.weight": torch.randn(out, rank, generator=generator)}


@pytest.mark.parametrize("case", ["sdxl", "sd1", "refiner"])
def test_merge_pairs_modules_by_the_layer_whatever_the_unet_naming(tmp_path, capsys, case):
    """One file names UNet modules by the original layout, another by diffusers' blocks. Both are read against
    their family's standard architecture, so the two pair up by the layer they adapt, and the merge is written
    under kohya's names for the family (the original layout for SDXL, diffusers' blocks for SD 1.x). A file
    that does not fit the standard model (the SDXL refiner reads 1280-wide text, base 2048) is refused in one
    line that says to give the model."""
    from safetensors.torch import save_file

    width = {"sdxl": 2048, "sd1": 768, "refiner": 1280}[case]
    header = {"ss_base_model_version": "sd_v1" if case == "sd1" else "sdxl_base_v1-0"}
    save_file({**lora_tensors("lora_unet_input_blocks_4_1_proj_in", 640, 640),
               **lora_tensors("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, width)},
              tmp_path / "sgm.safetensors", metadata=header)
    save_file({**lora_tensors("lora_unet_down_blocks_1_attentions_0_proj_in", 640, 640),
               **lora_tensors("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", 640, width)},
              tmp_path / "diffusers.safetensors", metadata=header)
    out = tmp_path / "m.safetensors"
    code = main(["merge", str(tmp_path / "sgm.safetensors"), str(tmp_path / "diffusers.safetensors"), "-o", str(out)])
    if case == "refiner":
        assert code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "sgm.safetensors" in err and "[640, 1280]" in err
        assert "--model" in err and not out.exists()
        return
    assert code == 0
    old, new = ("down_blocks_1_attentions_0", "input_blocks_4_1") if case == "sdxl" else \
        ("input_blocks_4_1", "down_blocks_1_attentions_0")
    merged = file_deltas(out)
    assert set(merged) == {f"lora_unet_{new}_proj_in", f"lora_unet_{new}_transformer_blocks_0_attn2_to_k"}
    renamed = {"sgm": {}, "diffusers": {}}
    for source in renamed:
        renamed[source] = {n.replace(old, new): d for n, d in file_deltas(tmp_path / f"{source}.safetensors").items()}
    expected = weighted((renamed["sgm"], 1.0), (renamed["diffusers"], 1.0))
    for name, delta in expected.items():
        torch.testing.assert_close(merged[name].flatten(1), delta.flatten(1), atol=1e-5, rtol=1e-5)


def test_a_file_for_another_model_is_refused_without_it(pipe, tmp_path, capsys):
    """A file for a model unlike its family's standard one (here a tiny test model) names layers that model
    does not have: merge and resize say, in one line, to give the model, and write nothing."""
    a = make_adapter_file(pipe, tmp_path / "a.safetensors")
    capsys.readouterr()
    for argv in (["merge", str(a), "-o", str(tmp_path / "m.safetensors")],
                 ["resize", str(a), "--rank", "2", "-o", str(tmp_path / "m.safetensors")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "a.safetensors" in err and "pass --model" in err
        assert not (tmp_path / "m.safetensors").exists()


def test_merge_into_a_model_folder_and_a_checkpoint(pipe, tiny_dir, two_files, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline
    from sdlora.base_models.sources import load_pipeline

    a, b = two_files
    sdlora.load(pipe, a, strength=0.7)
    sdlora.load(pipe, b, strength=0.3)
    expected = unet_out(pipe), te_out(pipe)

    folder = tmp_path / "baked"
    run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "--into", tiny_dir, "-o", folder, "--dtype", "fp32")
    baked = StableDiffusionPipeline.from_pretrained(folder)
    torch.testing.assert_close(unet_out(baked), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(baked), expected[1], atol=1e-5, rtol=0)

    checkpoint = tmp_path / "baked.safetensors"
    run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "--into", tiny_dir, "-o", checkpoint, "--dtype", "fp32")
    single = load_pipeline(str(checkpoint), model_config=str(tiny_dir))
    torch.testing.assert_close(unet_out(single), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(single), expected[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- resize


def test_resize_full_rank_is_exact_and_lower_rank_reports_its_energy(pipe, tiny_dir, tmp_path, capsys):
    source = make_adapter_file(pipe, tmp_path / "a.safetensors", seed=3, rank=4, alpha=2.0, targets="full")
    full = tmp_path / "r4.safetensors"
    run(capsys, "resize", source, "--rank", 4, "-o", full, "--model", tiny_dir)
    sdlora.load(pipe, source, name="source")
    expected = unet_out(pipe), te_out(pipe)
    sdlora.unload(pipe)
    sdlora.load(pipe, full)
    torch.testing.assert_close(unet_out(pipe), expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(te_out(pipe), expected[1], atol=1e-5, rtol=0)

    text = run(capsys, "resize", source, "--rank", 2, "-o", tmp_path / "r2.safetensors", "--model", tiny_dir)
    spectra = {name: torch.linalg.svdvals(delta) ** 2 for name, delta in file_deltas(source).items()}
    kept = sum(float(s[:2].sum()) for s in spectra.values()) / sum(float(s.sum()) for s in spectra.values())
    assert printed(r"overall\s+([\d.]+)", text)[0] == pytest.approx(kept, abs=1e-6)
    for group in ("down", "mid", "up", "text_encoder"):  # the block words inspect prints too
        assert re.search(rf"^  {group} +[\d.]+$", text, re.M), group
    assert all(t.shape[0] == 2 for k, t in load_file(tmp_path / "r2.safetensors").items() if k.endswith("down.weight"))

    # by energy: per module the smallest rank reaching the fraction, and "Dynamic" when ranks differ
    dynamic = tmp_path / "e.safetensors"
    run(capsys, "resize", source, "--energy", 0.8, "-o", dynamic, "--model", tiny_dir)
    tensors, metadata = read_adapter(dynamic)
    ranks = {}
    for name, s in spectra.items():
        fractions = torch.cumsum(s, 0) / s.sum()
        ranks[name] = int((fractions < 0.8).sum()) + 1
        assert tensors[f"{name}.lora_down.weight"].shape[0] == ranks[name], name
    assert len(set(ranks.values())) > 1 and metadata["ss_network_dim"] == "Dynamic"


# ---------------------------------------------------------------- extract


def tune(folder, out, rank, seed, targets="attn-mlp"):
    """A 'fine-tune': the base plus a known rank-`rank` delta on the targeted layers; returns the deltas."""
    from sdlora.base_models.sources import load_pipeline

    tuned = load_pipeline(str(folder))
    sdlora.add_adapter(tuned, "t", rank=rank, targets=targets)
    randomize(tuned, "t", seed=seed, std=0.1)
    sdlora.fuse(tuned)
    deltas = {}
    for component, model in components(tuned).items():
        for path, layer in list(model.named_modules()):
            if isinstance(layer, AdaptedLayer):
                deltas[module_key(component, path)] = layer.adapters["t"].delta_weight().detach().double()
                layer._original_weight = None  # keep the fused weights when the wrappers go
    sdlora.unload(tuned)
    tuned.save_pretrained(out)
    return deltas


def test_extract_recovers_a_known_delta(tiny_dir, tmp_path, capsys, reference_client):
    tuned_dir = tmp_path / "tuned"
    known = tune(tiny_dir, tuned_dir, rank=3, seed=4)
    out = tmp_path / "x.safetensors"
    text = run(capsys, "extract", "--base", tiny_dir, "--tuned", tuned_dir, "--rank", 3, "-o", out, "--dtype", "fp32")
    assert printed(r"overall ([\d.e-]+)", text)[0] < 1e-4
    got = file_deltas(out)
    assert set(got) == {kohya_name(SD1, key) for key in known}
    for key, delta in known.items():
        extracted = got[kohya_name(SD1, key)]
        assert float((extracted - delta.flatten(1)).norm() / delta.norm()) < 1e-4, key
    assert read_adapter(out)[1]["ss_network_dim"] == "3"
    check_in_diffusers(tiny_dir, out)


def test_extract_sdxl_uses_original_names_and_loads_in_diffusers(sdxl_dir, tmp_path, capsys, reference_client):
    from diffusers import StableDiffusionXLPipeline

    tuned_dir = tmp_path / "tuned"
    known = tune(sdxl_dir, tuned_dir, rank=2, seed=5)
    out = tmp_path / "x.safetensors"
    run(capsys, "extract", "--base", sdxl_dir, "--tuned", tuned_dir, "--rank", 2, "-o", out, "--dtype", "fp32",
        "--components", "unet,text_encoder_2")
    tuned = StableDiffusionXLPipeline.from_pretrained(tuned_dir)
    original = unet_module_map(dict(tuned.unet.config))
    names = set(file_deltas(out))
    assert names == {kohya_name(SDXL, key, original) for key in known if not key.startswith("text_encoder.")}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    sdlora.load(base, out)
    expected, got = model_outputs(tuned), model_outputs(base)
    for part in ("unet", "text_encoder_2"):
        torch.testing.assert_close(got[part], expected[part], atol=1e-4, rtol=1e-4)
    check_in_diffusers(sdxl_dir, out, StableDiffusionXLPipeline)


def test_merged_and_resized_files_load_in_diffusers(tiny_dir, two_files, tmp_path, capsys, reference_client):
    a, b = two_files
    run(capsys, "merge", f"{a}:0.7", f"{b}:0.3", "-o", tmp_path / "m.safetensors", "--model", tiny_dir)
    run(capsys, "resize", a, "--energy", 0.9, "-o", tmp_path / "r.safetensors", "--model", tiny_dir)
    check_in_diffusers(tiny_dir, tmp_path / "m.safetensors")
    check_in_diffusers(tiny_dir, tmp_path / "r.safetensors")


# ---------------------------------------------------------------- generate


def base_images(folder, seeds, steps=3):
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(folder)
    base.set_progress_bar_config(disable=True)
    return [np.asarray(base(prompt=PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=7.5,
                            generator=torch.Generator().manual_seed(seed)).images[0]) for seed in seeds]


def test_generate_at_strength_zero_is_the_base_image(pipe, tiny_dir, tmp_path, capsys):
    a = make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4, targets="attn-mlp")
    out = tmp_path / "img.png"
    run(capsys, "generate", "--model", tiny_dir, "--lora", f"{a}:0", "--prompt", PROMPT, "--steps", 3,
        "--seed", 5, "--num", 2, "-o", out)
    expected = base_images(tiny_dir, [5, 6])
    for j in range(2):
        image = Image.open(tmp_path / f"img-{j}.png")
        assert image.size == (16, 16)  # the model's native size
        assert np.array_equal(np.asarray(image), expected[j])
        assert "Seed: " + str(5 + j) in image.text["parameters"]


def test_generate_compare_grid(pipe, tiny_dir, tmp_path, capsys):
    a = make_adapter_file(pipe, tmp_path / "a.safetensors", rank=4, targets="attn-mlp")
    out = tmp_path / "grid.png"
    run(capsys, "generate", "--model", tiny_dir, "--lora", a, "--prompt", PROMPT, "--steps", 3, "--seed", 5,
        "--num", 2, "--compare", "--fuse", "-o", out)
    band = label_height(16)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape == (band + 2 * 16, 5 * 16, 3)  # a column per strength, a row per seed, labels above

    def cell(row, column):
        return sheet[band + 16 * row:band + 16 * (row + 1), 16 * column:16 * (column + 1)]

    expected = base_images(tiny_dir, [5, 6])
    for row in range(2):
        assert np.array_equal(cell(row, 0), expected[row])  # strength 0: the base model's images
        assert not np.array_equal(cell(row, 4), expected[row])  # strength 1: the adapter shows
    assert (sheet[:band] < 128).any()  # the labels are drawn


@pytest.mark.parametrize("problem", ["missing", "family"])
def test_generate_errors_are_one_line(tiny_dir, sdxl_dir, tmp_path, capsys, problem):
    from diffusers import StableDiffusionXLPipeline

    if problem == "missing":
        lora = tmp_path / "missing.safetensors"
    else:
        lora = make_adapter_file(StableDiffusionXLPipeline.from_pretrained(sdxl_dir), tmp_path / "xl.safetensors",
                                 components_to_adapt=("unet", "text_encoder", "text_encoder_2"))
    capsys.readouterr()
    code = main(["generate", "--model", str(tiny_dir), "--lora", str(lora), "--prompt", PROMPT, "--steps", "2",
                 "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("sdlora: error:") and lora.name in err
    if problem == "family":
        assert "Stable Diffusion XL" in err
    assert not (tmp_path / "x.png").exists()
