"""Model sources, all offline: shipped configs, the CLIP tokenizer, folders, hub ids, single files."""

from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from sdlora.base_models import architectures
from sdlora.base_models.checkpoints import open_clip_to_original, pipeline_to_original
from sdlora.base_models.clip_tokenizer import clip_tokenizer
from sdlora.base_models.single_file import load_tokenizer, read_ckpt
from sdlora.base_models.families import SD2, family_of_architecture
from sdlora.errors import ModelSourceError, UnknownArchitecture
from sdlora.base_models.sources import load_pipeline
from sdlora.toy.pipelines import save_tiny_pipeline, tiny_sdxl_pipeline

TOY = Path(__file__).resolve().parents[1] / "models" / "toy-sd1"

# -- the CLIP tokenizer


@pytest.mark.parametrize("prompt, ids", [
    ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
    # The next two are the ids Apple's Stable Diffusion port tests its CLIP BPE tokenizer against:
    # apple/ml-stable-diffusion, swift/StableDiffusionTests/StableDiffusionTests.swift (testBPETokenizer).
    ("a photo of an astronaut riding a horse on mars",
     [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]),
    ("Apple CoreML developer tools on a Macbook Air are fast",
     [49406, 3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953, 49407]),
])
def test_clip_tokenizer_gives_the_real_ids(prompt, ids):
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49_408
    assert tokenizer(prompt).input_ids == ids


@pytest.mark.parametrize("name, subfolder, pad_id", [
    ("sd15", "tokenizer", 49407), ("sd21-base", "tokenizer", 0), ("sd21-v", "tokenizer", 0),
    ("sdxl-base", "tokenizer", 49407), ("sdxl-base", "tokenizer_2", 0),
])
def test_shipped_tokenizers_pad_like_the_models(name, subfolder, pad_id):
    tokenizer = load_tokenizer(architectures.config_folder(name), subfolder)
    ids = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {pad_id}


# -- the shipped configs, at full size on the meta device

# The real models' parameter counts (what `sum(p.numel())` gives for the released weights).
PARAMETERS = {
    "unet": {"sd15": 859_520_964, "sd21-base": 865_910_724, "sd21-v": 865_910_724, "sdxl-base": 2_567_463_684},
    "vae": dict.fromkeys(architectures.ARCHITECTURES, 83_653_863),
    "text_encoder": {"sd15": 123_060_480, "sd21-base": 340_387_840, "sd21-v": 340_387_840,
                     "sdxl-base": 123_060_480},
    "text_encoder_2": {"sdxl-base": 694_659_840},
}


@pytest.fixture(scope="module")
def meta_models():
    """Each architecture's models built from the shipped configs, with no memory behind them."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    built = {}
    for name in architectures.ARCHITECTURES:
        folder = architectures.config_folder(name)
        with init_empty_weights():
            models = {
                "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
            }
        for part in ("text_encoder", "text_encoder_2"):
            if (folder / part).is_dir():
                config = CLIPTextConfig.from_pretrained(folder / part)
                text_class = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
                with torch.device("meta"):
                    models[part] = text_class(config)
        built[name] = models
    return built


@pytest.mark.parametrize("name", architectures.ARCHITECTURES)
def test_shipped_configs_build_the_real_models(meta_models, name):
    counts = {part: sum(p.numel() for p in model.parameters()) for part, model in meta_models[name].items()}
    assert counts == {part: PARAMETERS[part][name] for part in counts}
    assert all(p.device.type == "meta" for model in meta_models[name].values() for p in model.parameters())


def _original_shapes(models: dict, name: str) -> dict[str, tuple[int, ...]]:
    """The parameter shapes a released single file of this architecture has (via our writer)."""
    state = pipeline_to_original(SimpleNamespace(**models), family_of_architecture(name))
    return {key: tuple(value.shape) for key, value in state.items()}


@pytest.mark.parametrize("name", architectures.ARCHITECTURES)
def test_architecture_is_detected_from_full_size_shapes(meta_models, name):
    shapes = _original_shapes(meta_models[name], name)
    expected = "sd21-v" if name == "sd21-base" else name  # SD 2.x weights alone say nothing of v vs eps
    assert architectures.detect(shapes) == expected
    assert architectures.detect(shapes, prediction_type="epsilon") == name.replace("sd21-v", "sd21-base")
    assert architectures.missing_components(shapes, name) == []


def _without_text_model(state: dict) -> dict:
    return {key.removeprefix("text_model."): value for key, value in state.items()}


@pytest.mark.parametrize("name", ["sd15", "sd21-v", "sdxl-base"])
def test_full_size_original_layout_is_what_diffusers_reads(meta_models, name):
    """Our writer and diffusers' readers agree on the real layouts, not only on toy ones."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    models = meta_models[name]
    state = pipeline_to_original(SimpleNamespace(**models), family_of_architecture(name))
    readers = {
        "unet": lambda: convert_ldm_unet_checkpoint(dict(state), models["unet"].config),
        "vae": lambda: convert_ldm_vae_checkpoint(dict(state), models["vae"].config),
        "text_encoder": (lambda: convert_open_clip_checkpoint(models["text_encoder"], state)) if name.startswith("sd21")
        else (lambda: convert_ldm_clip_checkpoint(state)),
    }
    if name == "sdxl-base":
        readers["text_encoder_2"] = lambda: convert_open_clip_checkpoint(models["text_encoder_2"], state,
                                                                         prefix="conditioner.embedders.1.model.")
    for part, read in readers.items():
        back = _without_text_model(read())
        reference = _without_text_model(models[part].state_dict())
        assert set(back) == set(reference), part
        assert all(back[key].shape == reference[key].shape for key in reference), part


def test_detection_refuses_what_it_cannot_place():
    unet = "model.diffusion_model."
    with pytest.raises(UnknownArchitecture, match="no UNet"):
        architectures.detect({"lora_unet_x.lora_down.weight": (4, 320)})
    with pytest.raises(UnknownArchitecture, match="9 input channels"):
        architectures.detect({unet + "input_blocks.0.0.weight": (320, 9, 3, 3)})
    with pytest.raises(UnknownArchitecture, match="2560"):
        architectures.detect({unet + "label_emb.0.0.weight": (1536, 2560)})
    with pytest.raises(UnknownArchitecture, match="width 64"):
        architectures.detect({unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 64)})
    shapes = {unet + "x": (1,), "cond_stage_model.transformer.text_model.x": (1,)}
    assert architectures.missing_components(shapes, "sd15") == ["VAE"]


# -- loading


@pytest.fixture(scope="module")
def toy():
    return load_pipeline(str(TOY))


def _outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet, VAE (both ways) and text encoder(s) on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    unet, vae = pipe.unet, pipe.vae
    size = unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=generator)
    context = torch.randn(1, 16, unet.config.cross_attention_dim, generator=generator)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = pipe.text_encoder_2.config.projection_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=generator),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    image = torch.rand(1, 3, vae.config.sample_size, vae.config.sample_size, generator=generator) * 2 - 1
    with torch.no_grad():
        out = {
            "unet": unet(latents, torch.tensor([10]), encoder_hidden_states=context, **kwargs).sample,
            "vae.decode": vae.decode(latents).sample,
            "vae.encode": vae.encode(image).latent_dist.mean,
        }
        for part in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, part, None)
            if encoder is not None:
                ids = getattr(pipe, "tokenizer_2" if part == "text_encoder_2" else "tokenizer")("a red circle",
                                                                                                 return_tensors="pt")
                out[part] = encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
    return out


def _assert_same_outputs(pipe, reference):
    got, expected = _outputs(pipe), _outputs(reference)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=key)


def test_diffusers_folder(toy):
    from diffusers import StableDiffusionPipeline

    assert type(toy) is StableDiffusionPipeline and toy.safety_checker is None
    assert not any(p.requires_grad for p in toy.unet.parameters())
    half = load_pipeline(str(TOY), dtype=torch.float16)
    assert half.unet.dtype == half.text_encoder.dtype == torch.float16


def test_writer_round_trips_through_diffusers_converters(toy):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    state = pipeline_to_original(toy)
    readers = {
        "unet": lambda s: convert_ldm_unet_checkpoint(s, toy.unet.config),
        "vae": lambda s: convert_ldm_vae_checkpoint(s, toy.vae.config),
        "text_encoder": lambda s: {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(s).items()},
    }
    for part, read in readers.items():
        back, reference = read(dict(state)), getattr(toy, part).state_dict()
        assert set(back) == set(reference), part
        assert all(torch.equal(back[key], reference[key]) for key in reference), part
    open_clip = open_clip_to_original(toy.text_encoder.state_dict(), "cond_stage_model.model.")
    back = convert_open_clip_checkpoint(toy.text_encoder, open_clip)
    back = {k.removeprefix("text_model."): v for k, v in back.items()}
    reference = toy.text_encoder.state_dict()
    assert set(back) == set(reference) and all(torch.equal(back[k], reference[k]) for k in reference)


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".ckpt":
        torch.save(state, path)  # a plain dict of tensors, as most released .ckpt files are
    else:
        save_file({key: value.contiguous() for key, value in state.items()}, path)
    return path


def _like_a_release(state: dict) -> dict:
    """Add what released SD 1.x files carry besides the weights, which loading must skip."""
    return {**state, "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
            "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(16)[None]}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_like_the_folder(toy, tmp_path, suffix):
    path = _save(_like_a_release(pipeline_to_original(toy)), tmp_path / f"toy{suffix}")
    pipe = load_pipeline(str(path), model_config=str(TOY))
    assert type(pipe) is type(toy) and pipe.safety_checker is None
    assert pipe.tokenizer("a red circle").input_ids == toy.tokenizer("a red circle").input_ids
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    _assert_same_outputs(pipe, toy)


def test_single_file_with_open_clip_text_encoder(toy, tmp_path):
    """SD 2.x keeps its text encoder in OpenCLIP's layout; the toy one stands in for it here."""
    state = pipeline_to_original(toy, SD2)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in state
    pipe = load_pipeline(str(_save(state, tmp_path / "toy.safetensors")), model_config=str(TOY))
    _assert_same_outputs(pipe, toy)


def test_sdxl_single_file_loads_like_the_folder(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    reference = load_pipeline(str(folder))
    assert type(reference) is StableDiffusionXLPipeline
    state = pipeline_to_original(reference)
    assert "conditioner.embedders.1.model.text_projection" in state
    pipe = load_pipeline(str(_save(state, tmp_path / "tiny-sdxl.safetensors")), model_config=str(folder))
    assert type(pipe) is StableDiffusionXLPipeline
    _assert_same_outputs(pipe, reference)


def test_single_file_dtype_and_prediction_type(toy, tmp_path):
    path = _save(pipeline_to_original(toy), tmp_path / "toy.safetensors")
    pipe = load_pipeline(str(path), dtype=torch.float16, model_config=str(TOY), prediction_type="v_prediction")
    assert {p.dtype for part in (pipe.unet, pipe.vae, pipe.text_encoder) for p in part.parameters()} == {torch.float16}
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert load_pipeline(str(TOY), prediction_type="v_prediction").scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ModelSourceError, match="'v-pred' is not one of"):
        load_pipeline(str(TOY), prediction_type="v-pred")


# -- clear errors


def test_hub_id_not_cached_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    with pytest.raises(ModelSourceError) as caught:
        load_pipeline("someone/some-model")
    message = str(caught.value)
    assert "'someone/some-model'" in message and "not in the local Hugging Face cache" in message
    assert str(tmp_path / "hf" / "hub") in message and "offline" in message
    assert "--model /path/to/folder" in message and ".safetensors" in message


def test_hub_unreachable_without_offline_setting(tmp_path, monkeypatch):
    """Online mode tries the hub; when it cannot be reached, the same advice (no network used here)."""
    from diffusers import DiffusionPipeline

    calls = []

    def no_network(repo_id, **kwargs):
        calls.append(kwargs)
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as error:
            raise OSError(f"Cannot load model {repo_id}: the model is not fully cached locally") from error

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(DiffusionPipeline, "download", no_network)
    with pytest.raises(ModelSourceError, match=r"not in the local Hugging Face cache .* cannot be reached .*offline"
                                               r".*--model /path/to/folder"):
        load_pipeline("someone/some-model")
    assert calls == [{"cache_dir": str(tmp_path / "hf" / "hub"), "local_files_only": False}]


def test_hub_id_in_the_cache_loads_offline(tmp_path, monkeypatch):
    """A model in the hub cache layout (refs/main -> snapshots/<commit>) loads with no network."""
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--someone--toy"
    shutil.copytree(TOY, repo / "snapshots" / commit, ignore=shutil.ignore_patterns("*.md", "*report*"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    pipe = load_pipeline("someone/toy")
    assert pipe.unet.config.cross_attention_dim == 64


def test_missing_path_and_unknown_suffix(tmp_path):
    from sdlora.errors import ModelError, SdloraError

    assert issubclass(ModelSourceError, ModelError) and issubclass(ModelSourceError, (SdloraError, ValueError))
    with pytest.raises(ModelSourceError, match="nope/model.safetensors: no such file or folder"):
        load_pipeline(str(tmp_path / "nope" / "model.safetensors"))
    weird = tmp_path / "model.bin"
    weird.write_bytes(b"\0" * 16)
    with pytest.raises(ModelSourceError, match=r"model\.bin: unknown model file type '\.bin'"):
        load_pipeline(str(weird))
    not_a_model = tmp_path / "folder"
    not_a_model.mkdir()
    with pytest.raises(ModelSourceError, match="no model_index.json"):
        load_pipeline(str(not_a_model))
    with pytest.raises(ModelSourceError, match="single-file checkpoints only"):
        load_pipeline(str(TOY), model_config=str(TOY))


class Payload:
    """Would touch a file when unpickled, if unpickling were allowed to call functions."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_ckpt_with_python_objects_is_refused(toy, tmp_path):
    marker = tmp_path / "ran"
    state = pipeline_to_original(toy)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callback": Payload(marker)}, path)
    with pytest.raises(ModelSourceError, match=r"evil\.ckpt: refused to load this \.ckpt: it holds pickled Python"
                                                r".*Unsupported global: GLOBAL"):
        load_pipeline(str(path), model_config=str(TOY))
    assert not marker.exists()
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(ModelSourceError, match=r"garbage\.ckpt: not a readable PyTorch checkpoint \(Unsupported"):
        load_pipeline(str(garbage))
    # The same weights without the object load, from the nested "state_dict" training checkpoints use.
    torch.save({"state_dict": state, "global_step": 1000}, path)
    assert set(read_ckpt(path)) == set(state)


def test_single_file_missing_weights(toy, tmp_path):
    state = pipeline_to_original(toy)
    without_conv_out = {k: v for k, v in state.items() if k != "model.diffusion_model.out.2.weight"}
    path = _save(without_conv_out, tmp_path / "a.safetensors")
    with pytest.raises(ModelSourceError, match=r"a\.safetensors: could not be loaded .*lacks some of the weights"):
        load_pipeline(str(path), model_config=str(TOY))
    path = _save({k: v for k, v in state.items() if not k.startswith("first_stage_model.")}, tmp_path / "b.safetensors")
    with pytest.raises(ModelSourceError, match=r"b\.safetensors: could not be loaded .*AutoencoderKL.*missing"):
        load_pipeline(str(path), model_config=str(TOY))


def test_single_file_of_an_unknown_model_says_what_to_pass(toy, tmp_path):
    path = _save(pipeline_to_original(toy), tmp_path / "toy.safetensors")
    with pytest.raises(ModelSourceError, match=r"cannot tell which model this is: .*width 64.*--model-config"):
        load_pipeline(str(path))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelSourceError, match="not a readable .safetensors file"):
        load_pipeline(str(damaged))


def test_package_data_is_declared():
    """Every shipped config file matches a package-data pattern, so the wheel carries it."""
    import fnmatch

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    root = Path(architectures.__file__).parent
    patterns = tomllib.loads((TOY.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = patterns["sdlora.base_models"]
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix != ".py"
             and "__pycache__" not in p.parts]
    assert files and all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)
    for name in architectures.ARCHITECTURES:
        index = json.loads((root / "configs" / name / "model_index.json").read_text())
        for part, (library, _class) in ((k, v) for k, v in index.items() if isinstance(v, list)):
            if library is not None and part != "scheduler":
                assert (root / "configs" / name / part).is_dir(), f"{name}/{part}"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_training_from_a_single_file(tmp_path, images, family):
    """`sdlora train --model file.safetensors --model-config DIR` trains, as on the folder it came from."""
    from sdlora.cli import main
    from sdlora.training.loop import train
    from sdlora.training.config import TrainConfig
    from test_train import assert_adapters_close

    folder = save_tiny_pipeline(tmp_path / "folder", family=family)
    checkpoint = _save(pipeline_to_original(load_pipeline(str(folder))), tmp_path / "model.safetensors")
    args = ["--data", str(images), "--max-steps", "3", "--rank", "2", "--batch-size", "4", "--save-dtype", "fp32",
            "--train-text-encoder", "--quiet"]
    assert main(["train", "--model", str(checkpoint), "--model-config", str(folder), "--output-dir",
                 str(tmp_path / "from-file"), *args]) == 0
    from_folder = train(TrainConfig(model=str(folder), data=str(images), output_dir=str(tmp_path / "from-folder"),
                                    max_steps=3, rank=2, batch_size=4, save_dtype="fp32", train_text_encoder=True),
                        quiet=True)
    assert_adapters_close(tmp_path / "from-file" / "lora.safetensors", from_folder, atol=1e-5)
