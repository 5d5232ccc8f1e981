"""SD 2.x (v-prediction) and SDXL on tiny offline pipelines: the trainer learns on each, the files
load in diffusers with the same outputs as our loader, carry the names A1111 and ComfyUI read, and
an adapter of another family is refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdlora
from sdlora.errors import FamilyMismatch
from sdlora.base_models.families import SD1, SD2, SDXL, TextOptions, chunked_token_ids, detect_family
from sdlora.base_models.parts import components
from sdlora.files.names import kohya_name
from sdlora.training.config import TrainConfig
from sdlora.training.loop import run_training, setup_run
from sdlora.toy.pipelines import save_tiny_pipeline
from conftest import randomize

FAMILY_OF = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL}


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def family_dir(request, tmp_path_factory):
    return request.param, save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "pipe", family=request.param)


def load_pipe(folder: Path):
    from sdlora.base_models.sources import load_pipeline

    return load_pipeline(str(folder))


def sdxl_inputs(pipe, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    width = pipe.unet.config.cross_attention_dim
    return {"encoder_hidden_states": torch.randn(2, 77, width, generator=generator),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=generator),
                                  "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16], [20, 12, 2, 0, 16, 16]])}}


@torch.no_grad()
def outputs(pipe) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs on fixed inputs, for any family."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    if detect_family(components(pipe)) is SDXL:
        inputs = sdxl_inputs(pipe)
    else:
        inputs = {"encoder_hidden_states": torch.randn(2, 77, pipe.unet.config.cross_attention_dim,
                                                       generator=generator)}
    result = {"unet": pipe.unet(sample, torch.tensor([10, 500]), **inputs).sample}
    ids = torch.tensor([[pipe.tokenizer.bos_token_id, 5, 17, 42, 99, 3, pipe.tokenizer.eos_token_id]])
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            result[name] = getattr(pipe, name)(ids, output_hidden_states=True).hidden_states[-2]
    return result


def test_families_are_told_apart(family_dir):
    name, folder = family_dir
    pipe = load_pipe(folder)
    assert detect_family(components(pipe)) is FAMILY_OF[name]
    if name == "sd2":
        assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_training_lowers_the_loss_and_writes_the_runs_facts(family_dir, images, tmp_path):
    name, folder = family_dir
    config = TrainConfig(model=str(folder), data=str(images), output_dir=str(tmp_path), batch_size=4,
                         max_steps=30, lr=1e-2, rank=4, seed=7, targets="attn-mlp", save_dtype="fp32",
                         train_text_encoder=True, train_text_encoder_2=name == "sdxl")
    run = setup_run(config, quiet=True)
    assert run.model.resolution == 16  # the model's own: sample size 8 x the VAE's 2
    assert run.model.prediction_type == ("v_prediction" if name == "sd2" else "epsilon")
    before = run.fixed_noise_loss()
    path = run_training(run)
    after = run.fixed_noise_loss()
    assert after < 0.9 * before, (before, after)

    metadata = sdlora.read_adapter(path)[1]
    assert metadata["modelspec.resolution"] == "16x16"
    if name == "sd2":
        assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
        assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
        assert metadata["modelspec.prediction_type"] == "v"
    else:
        assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_v2"] == "False"
        assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert metadata["modelspec.prediction_type"] == "epsilon"


def test_files_load_in_diffusers_with_our_outputs(family_dir, tmp_path, reference_client):
    name, folder = family_dir
    pipe = load_pipe(folder)
    parts = ("unet", "text_encoder", "text_encoder_2") if name == "sdxl" else ("unet", "text_encoder")
    sdlora.add_adapter(pipe, "a", rank=4, alpha=2, targets="attn-mlp", components_to_adapt=parts)
    randomize(pipe, "a", seed=3)
    path = sdlora.save(pipe, tmp_path / "a.safetensors", "a", dtype="fp32")
    ours = outputs(pipe)

    names = list(load_file(path))
    if name == "sdxl":  # the names A1111 and ComfyUI read for SDXL
        assert any(n.startswith("lora_unet_input_blocks_") for n in names)
        assert any(n.startswith("lora_unet_output_blocks_") for n in names)
        assert not any(n.startswith("lora_unet_down_blocks_") for n in names)
        assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    else:
        assert any(n.startswith("lora_te_") for n in names)

    reference = load_pipe(folder)
    base = outputs(reference)
    state_dict, alphas = reference.lora_state_dict(str(path))
    # converted out of the kohya layout, nothing dropped: a down and an up per module, and each module's alpha
    file_modules = {n.rsplit(".", 2)[0] for n in names if n.endswith("lora_down.weight")}
    assert all(key.startswith(tuple(f"{part}." for part in parts)) for key in state_dict)
    assert len(state_dict) == 2 * len(file_modules) and len(alphas) == len(file_modules)
    reference.load_lora_weights(str(path))
    theirs = outputs(reference)
    for part in ours:
        assert not torch.allclose(ours[part], base[part], atol=1e-4), part  # the adapter does something
        torch.testing.assert_close(ours[part], theirs[part], atol=1e-4, rtol=1e-4, msg=part)
    # every tensor of the file reached a layer: as many LoRA layers as modules in the file
    modules = {n.rsplit(".", 2)[0] for n in names if n.endswith("lora_down.weight")}
    loaded = sum(1 for component in parts for path_, _ in getattr(reference, component).named_modules()
                 if path_.endswith("lora_A.default_0"))
    assert loaded == len(modules)


def diffusers_sdxl_file(folder: Path, out: Path, text_modules=("q_proj", "k_proj", "v_proj", "out_proj")):
    """A LoRA file as diffusers writes it for SDXL (PEFT names, alphas in the header), and the outputs of
    the pipeline that made it (diffusers' own, through PEFT)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = load_pipe(folder)
    theirs.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=False))
    theirs.text_encoder_2.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(text_modules),
                                                 init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(theirs.unet),
        text_encoder_2_lora_layers=get_peft_model_state_dict(theirs.text_encoder_2),
        unet_lora_adapter_metadata=theirs.unet.peft_config["default"].to_dict(),
        text_encoder_2_lora_adapter_metadata=theirs.text_encoder_2.peft_config["default"].to_dict())
    return out / "pytorch_lora_weights.safetensors", outputs(theirs)


def test_diffusers_and_peft_named_sdxl_files_load(tmp_path, reference_client):
    """A file diffusers writes for SDXL (PEFT names, alpha in the header) loads in our loader with its outputs."""
    folder = save_tiny_pipeline(tmp_path / "pipe", family="sdxl")
    path, expected = diffusers_sdxl_file(folder, tmp_path / "peft", text_modules=("q_proj", "v_proj"))
    ours = load_pipe(folder)
    sdlora.load(ours, path)
    got = outputs(ours)
    for part in ("unet", "text_encoder_2"):
        torch.testing.assert_close(got[part], expected[part], atol=1e-4, rtol=1e-4, msg=part)


def test_per_block_strength_on_sdxl_blocks(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "pipe", family="sdxl")
    pipe = load_pipe(folder)
    base = outputs(pipe)["unet"]
    sdlora.add_adapter(pipe, "a", rank=4, targets="attn")
    randomize(pipe, "a", seed=1)
    path = sdlora.save(pipe, tmp_path / "a.safetensors", "a", dtype="fp32")
    sdlora.unload(pipe)
    # the first down and last up levels of SDXL hold no attention: switching the others off is the base
    sdlora.load(pipe, path, strength={"unet": {"down": [1.0, 0.0, 0.0], "mid": 0.0, "up": [0.0, 0.0, 1.0]}})
    torch.testing.assert_close(outputs(pipe)["unet"], base, atol=1e-6, rtol=0)
    sdlora.set_strength(pipe, "a", {"unet": {"down": [0.0, 1.0, 0.0], "mid": 0.0, "up": [0.0, 0.0, 0.0]}})
    assert not torch.allclose(outputs(pipe)["unet"], base, atol=1e-5)


@pytest.mark.parametrize("file_family, model_family", [("sdxl", "sd1"), ("sd1", "sdxl"), ("sd2", "sd1")])
def test_an_adapter_of_another_family_is_refused_before_anything_changes(tmp_path, file_family, model_family):
    model = load_pipe(save_tiny_pipeline(tmp_path / "model", family=model_family))
    # A file as the real models would have it: SDXL's te1/te2 prefixes, or the text width of the family
    width = {"sd1": 768, "sd2": 1024, "sdxl": 2048}[file_family]
    tensors = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(4, width),
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               torch.zeros(32, 4)}
    if file_family == "sdxl":
        tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 768)
        tensors["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 4)
    save_file(tensors, tmp_path / "other.safetensors")
    before = outputs(model)
    with pytest.raises(FamilyMismatch) as error:
        sdlora.load(model, tmp_path / "other.safetensors")
    message = str(error.value)
    assert FAMILY_OF[file_family].title in message and FAMILY_OF[model_family].title in message
    assert not sdlora.list_adapters(model)
    for part, value in outputs(model).items():
        assert torch.equal(value, before[part])


def test_long_captions_are_read_in_windows_as_a1111_does():
    from sdlora.toy.pipelines import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(("a", "red", "circle"), max_length=8)  # windows of 6 words
    captions = ["a red circle", " ".join(["a red circle"] * 4)]
    one = chunked_token_ids(tokenizer, captions, 1)
    assert len(one) == 1
    torch.testing.assert_close(one[0], tokenizer(captions, padding="max_length", max_length=8, truncation=True,
                                                 return_tensors="pt").input_ids)
    two = chunked_token_ids(tokenizer, captions, 2)
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    words = tokenizer(captions[1], add_special_tokens=False).input_ids
    assert two[0][1].tolist() == [start, *words[:6], end]
    assert two[1][1].tolist() == [start, *words[6:12], end]
    assert two[1][0].tolist() == [start, end] + [pad] * 6  # a short caption's second window is empty


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(tmp_path):
    pipe = load_pipe(save_tiny_pipeline(tmp_path / "pipe"))
    captions = ["a red circle"]
    ids = chunked_token_ids(pipe.tokenizer, captions)[0]
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        last = SD1.encode_text([pipe.text_encoder], [pipe.tokenizer], captions).hidden
        skip2 = SD1.encode_text([pipe.text_encoder], [pipe.tokenizer], captions, TextOptions(clip_skip=2)).hidden
        torch.testing.assert_close(last, pipe.text_encoder(ids)[0])
        torch.testing.assert_close(skip2, pipe.text_encoder.final_layer_norm(hidden[-2]))


def test_sdxl_trains_from_the_command_line(family_dir, images, tmp_path, capsys):
    """The first thing a new user tries: `sdlora train --model <an SDXL folder>` (it used to die in step 1)."""
    from sdlora.cli import main

    name, folder = family_dir
    code = main(["train", "--model", str(folder), "--data", str(images), "--output-dir", str(tmp_path),
                 "--max-steps", "2", "--rank", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "lora.safetensors").is_file()


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe", family="sdxl")


@pytest.mark.parametrize("flags, trained", [
    (["--train-text-encoder"], {"lora_te1_", "lora_te2_"}),  # both, as diffusers' SDXL scripts and kohya
    (["--train-text-encoder", "--no-train-text-encoder-2"], {"lora_te1_"}),
    (["--train-text-encoder-2"], {"lora_te2_"}),
])
def test_sdxl_train_text_encoder_trains_both_unless_one_is_picked(sdxl_dir, images, tmp_path, capsys, flags,
                                                                  trained):
    from sdlora.cli import main

    code = main(["train", "--model", str(sdxl_dir), "--data", str(images), "--output-dir", str(tmp_path),
                 "--max-steps", "2", "--rank", "2", "--quiet", *flags])
    assert code == 0, capsys.readouterr().err
    tensors = load_file(tmp_path / "lora.safetensors")
    assert {key[:len("lora_te1_")] for key in tensors if key.startswith("lora_te")} == trained
    assert any(key.startswith("lora_unet_") for key in tensors)
    for prefix in trained:  # each trained encoder's update moved off its zero start
        assert any(tensor.abs().max() > 0 for key, tensor in tensors.items()
                   if key.startswith(prefix) and "lora_up" in key)


def test_a_resume_must_train_the_text_encoders_its_checkpoint_did(sdxl_dir, images, tmp_path, capsys):
    from sdlora.cli import main

    args = ["train", "--model", str(sdxl_dir), "--data", str(images), "--output-dir", str(tmp_path), "--rank", "2",
            "--quiet", "--train-text-encoder", "--save-every", "1"]
    assert main([*args, "--max-steps", "1", "--no-train-text-encoder-2"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*args, "--max-steps", "2", "--resume", "latest"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(
        f"sdlora: error: cannot resume from {tmp_path / 'checkpoints' / 'step-000001'}: it trained the text encoders "
        "text_encoder, this run trains text_encoder, text_encoder_2: ")
    assert main([*args, "--max-steps", "2", "--resume", "latest", "--no-train-text-encoder-2"]) == 0


def test_sdxl_resume_is_exact(images, tmp_path):
    """Checkpoints of an SDXL run (SGM names, two text encoders) restore exactly."""
    from sdlora.training.loop import train
    from test_train import assert_adapters_close

    folder = save_tiny_pipeline(tmp_path / "pipe", family="sdxl")
    settings = dict(model=str(folder), data=str(images), batch_size=4, max_steps=6, lr=1e-3, rank=2, seed=3,
                    save_every=3, save_dtype="fp32", train_text_encoder=True, train_text_encoder_2=True)
    reference = train(TrainConfig(output_dir=str(tmp_path / "reference"), **settings), quiet=True)
    interrupted = tmp_path / "interrupted"
    train(TrainConfig(output_dir=str(interrupted), **{**settings, "max_steps": 3}), quiet=True)
    (interrupted / "lora.safetensors").unlink()
    resumed = train(TrainConfig(output_dir=str(interrupted), resume="latest", **settings), quiet=True)
    assert_adapters_close(resumed, reference, atol=1e-6)


def test_sdxl_kohya_files_with_diffusers_paths_load_as_with_original_names(tmp_path):
    """Some trainers name SDXL UNet modules by diffusers paths (`lora_unet_down_blocks_1_…`); ComfyUI
    reads both spellings, and so do we: the same tensors give the same model."""
    from sdlora.base_models import sgm

    pipe = load_pipe(save_tiny_pipeline(tmp_path / "pipe", family="sdxl"))
    sdlora.add_adapter(pipe, "a", rank=2, targets="attn-mlp", components_to_adapt=("unet",))
    randomize(pipe, "a", seed=5)
    path = sdlora.save(pipe, tmp_path / "sgm.safetensors", "a", dtype="fp32")
    expected = outputs(pipe)["unet"]
    sdlora.unload(pipe)

    index = {kohya_name(SDXL, f"unet.{module}", mapping): module
             for mapping in [sgm.unet_module_map(pipe.unet.config)] for module in mapping}
    renamed = {}
    for key, tensor in load_file(path).items():
        module, _, role = key.partition(".")
        renamed["lora_unet_" + index[module].replace(".", "_") + "." + role] = tensor
    assert renamed.keys() != load_file(path).keys()
    save_file(renamed, tmp_path / "diffusers-paths.safetensors")
    sdlora.load(pipe, tmp_path / "diffusers-paths.safetensors")
    torch.testing.assert_close(outputs(pipe)["unet"], expected, atol=1e-6, rtol=0)
