"""Masked loss: masks are checked at scan time, follow their image's crop and flip, and weigh the loss
as sum(w * l) / sum(w) per sample, checked against recomputations written out here."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdlora import cli
from sdlora.errors import DataError
from sdlora.training.caching import latent_mask
from sdlora.training.data import ImageCaptionDataset, attach_masks, find_images, load_mask, mask_path
from sdlora.training.loop import run_training, setup_run, train
from sdlora.training.loss import diffusion_loss, masked_mean
from test_train import assert_adapters_close, config


def naive_masked_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The formula in docs/options.md, one sample and one number at a time."""
    out = []
    for b in range(loss.shape[0]):
        numerator = denominator = 0.0
        for c in range(loss.shape[1]):
            for y in range(loss.shape[2]):
                for x in range(loss.shape[3]):
                    numerator += float(weight[b, 0, y, x]) * float(loss[b, c, y, x])
                    denominator += float(weight[b, 0, y, x])
        out.append(numerator / denominator if denominator else 0.0)
    return torch.tensor(out)


def test_masked_mean_is_the_weighted_mean_of_each_sample():
    generator = torch.Generator().manual_seed(0)
    loss = torch.rand(3, 4, 5, 6, generator=generator)
    weight = torch.rand(3, 1, 5, 6, generator=generator)
    weight[1] = 0.0  # an all-zero mask: that sample's loss is 0, never NaN
    weight[2, :, :, 3:] = 0.0
    got = masked_mean(loss, weight)
    torch.testing.assert_close(got, naive_masked_mean(loss, weight), rtol=1e-5, atol=1e-6)
    assert got[1] == 0
    # A uniform mask, whatever its level, is the plain mean: only relative weights matter.
    torch.testing.assert_close(masked_mean(loss, torch.full((3, 1, 5, 6), 0.3)), loss.mean(dim=(1, 2, 3)))


def recording_unet(prediction: torch.Tensor, seen: dict):
    def unet(noisy, timesteps, encoder_hidden_states):
        seen["noisy"], seen["timesteps"] = noisy, timesteps
        return SimpleNamespace(sample=prediction)

    return unet


def test_diffusion_loss_with_a_mask_matches_a_recomputation():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    generator = torch.Generator().manual_seed(1)
    latents = torch.zeros(3, 4, 4, 4)
    prediction = torch.randn(3, 4, 4, 4, generator=generator, requires_grad=True)
    weight = torch.rand(3, 1, 4, 4, generator=generator)
    weight[0] = 0.0
    seen = {}
    loss = diffusion_loss(recording_unet(prediction, seen), scheduler, latents, {"encoder_hidden_states": None},
                          torch.Generator().manual_seed(0), prediction_type="epsilon", weight=weight)
    # From zero latents, noisy = sqrt(1 - alpha_bar) * noise: the target is recovered from what the UNet saw.
    noise = seen["noisy"] / (1 - scheduler.alphas_cumprod[seen["timesteps"]]).sqrt().view(-1, 1, 1, 1)
    squared = (prediction.detach() - noise) ** 2
    torch.testing.assert_close(loss.detach(), naive_masked_mean(squared, weight).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert torch.isfinite(prediction.grad).all() and prediction.grad[0].abs().max() == 0  # all-zero mask: no NaN


def test_without_a_mask_the_loss_is_the_plain_mean_bit_for_bit():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    prediction = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    seen = {}
    loss = diffusion_loss(recording_unet(prediction, seen), scheduler, torch.zeros(2, 4, 4, 4),
                          {"encoder_hidden_states": None}, torch.Generator().manual_seed(0), prediction_type="epsilon")
    noise = seen["noisy"] / (1 - scheduler.alphas_cumprod[seen["timesteps"]]).sqrt().view(-1, 1, 1, 1)
    assert torch.equal(loss, F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)).mean())


def test_the_loss_ignores_the_prediction_where_the_mask_is_zero():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(3))
    weight = torch.ones(2, 1, 4, 6)
    weight[..., 3:] = 0.0  # the right half is masked out

    def loss_of(prediction: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(recording_unet(prediction, {}), scheduler, latents, {"encoder_hidden_states": None},
                              torch.Generator().manual_seed(0), prediction_type="epsilon", weight=weight)

    prediction = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(4), requires_grad=True)
    base = loss_of(prediction)
    base.backward()
    assert prediction.grad[..., 3:].abs().max() == 0 and prediction.grad[..., :3].abs().min() > 0
    right, left = prediction.detach().clone(), prediction.detach().clone()
    right[..., 3:] += 5.0
    left[..., :3] += 5.0
    assert torch.equal(loss_of(right), base.detach())
    assert loss_of(left) > base.detach() + 1


def test_masks_are_averaged_over_each_latent_pixel():
    masks = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(5))
    got = latent_mask(masks, (2, 3))
    expected = torch.tensor([[[[masks[b, 0, 8 * y:8 * y + 8, 8 * x:8 * x + 8].mean() for x in range(3)]
                               for y in range(2)]] for b in range(2)])
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- files and geometry


def write_pair(folder: Path, name: str, values: np.ndarray) -> Path:
    """An RGB image whose grey level is `values` (uint8), and the same values as its L mask."""
    folder.mkdir(parents=True, exist_ok=True)
    image = folder / f"{name}.png"
    Image.fromarray(np.stack([values] * 3, axis=-1)).save(image)
    Image.fromarray(values).save(mask_path(image))
    return image


def test_the_mask_is_cropped_and_flipped_with_its_image(tmp_path):
    """Noise as the image and as its mask: any shift or mirror between them shows at once."""
    values = np.random.default_rng(0).integers(0, 256, (16, 32), dtype=np.uint8)
    write_pair(tmp_path / "data", "wide", values)
    write_pair(tmp_path / "data", "tall", np.ascontiguousarray(values.T))
    scan = attach_masks(find_images(tmp_path / "data"))
    assert scan.mask_files == 2 and len(scan.items) == 2  # masks are not training images
    dataset = ImageCaptionDataset(scan, 16, min_side=16, max_side=16, flip_prob=0.5, random_crop=True, seed=3)
    crops, flips = set(), set()
    for epoch in range(12):
        for index in range(len(dataset)):
            sample = dataset[(epoch, index)]
            mask = dataset.mask(index, epoch)
            grey = (sample["pixel_values"][0] + 1) * 127.5 / 255  # no resizing: the same numbers
            torch.testing.assert_close(mask[0], grey, atol=1e-5, rtol=0)
            crops.add(sample["crop_top_left"])
            flips.add(sample["flipped"])
    assert len(crops) > 4 and flips == {False, True}


def test_a_resized_mask_stays_on_its_image(tmp_path):
    """Downscaled 4x (the image with Lanczos, the mask by area), blocks of noise still line up."""
    blocks = np.random.default_rng(1).integers(0, 2, (6, 12), dtype=np.uint8) * 255
    values = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))  # 96 x 48
    write_pair(tmp_path / "data", "a", values)
    scan = attach_masks(find_images(tmp_path / "data"))
    assert scan.items[0].mask == mask_path(scan.items[0].path)
    dataset = ImageCaptionDataset(scan, 16, min_side=16, max_side=16, flip_prob=1.0)
    mask = dataset.mask(0)[0].flatten()
    grey = ((dataset[(0, 0)]["pixel_values"][0] + 1) / 2).flatten()
    assert 0 <= mask.min() and mask.max() <= 1
    assert torch.corrcoef(torch.stack([mask, grey]))[0, 1] > 0.95
    unflipped = ImageCaptionDataset(scan, 16, min_side=16, max_side=16).mask(0)[0].flatten()
    assert torch.corrcoef(torch.stack([unflipped, grey]))[0, 1] < 0.5  # a mirror would be noticed


def test_grey_masks_in_other_modes_are_read_as_weights(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, mask in [("rgb", Image.new("RGB", (8, 8), (128, 128, 128))),
                       ("sixteen", Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))),
                       ("bilevel", Image.new("1", (8, 8), 1))]:
        Image.new("RGB", (8, 8), "red").save(folder / f"{name}.png")
        mask.save(folder / f"{name}.mask.png")
    items = {item.path.stem: item for item in attach_masks(find_images(folder)).items}
    expected = {"rgb": 128 / 255, "sixteen": 32768 / 65535, "bilevel": 1.0}
    for name, value in expected.items():
        np.testing.assert_allclose(np.asarray(load_mask(items[name])), value, rtol=1e-6)


def test_alpha_masks_come_from_the_image(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    alpha = np.zeros((16, 16), dtype=np.uint8)
    alpha[:, :5] = 255  # opaque on the left only
    rgba = np.dstack([np.full((16, 16, 3), 40, dtype=np.uint8), alpha])
    Image.fromarray(rgba, "RGBA").save(folder / "cut.png")
    scan = attach_masks(find_images(folder), alpha=True)
    dataset = ImageCaptionDataset(scan, 16, flip_prob=1.0)
    mask = dataset.mask(0)[0]
    assert torch.equal(mask, torch.from_numpy(alpha[:, ::-1].copy()).float() / 255)  # mirrored with the image
    pixels = dataset[(0, 0)]["pixel_values"]
    assert pixels[:, :, -1].max() < 0 and pixels[:, :, 0].min() == 1  # transparency still composited on white


# ---------------------------------------------------------------- errors, from the command line


def fake_model(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    return model


def grey_image(path: Path, size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, "white" if mode != "RGBA" else (255, 255, 255, 255)).save(path)


@pytest.mark.parametrize("case, flag, message", [
    ("missing", "--masked-loss", "2 of 3 images have no mask NAME.mask.png beside them: b.png, c.png. Add one"),
    ("size", "--masked-loss", "mask a.mask.png is 16x8 but its image a.png is 16x16: a mask must have its "
                              "image's size"),
    ("colour", "--masked-loss", "mask a.mask.png has colour (mode RGB, its channels differ): save it as a grayscale"),
    ("mode", "--masked-loss", "mask a.mask.png has mode LA, not a single grey channel: save it as a grayscale"),
    ("alpha", "--alpha-mask", "3 of 3 images have no alpha channel for --alpha-mask: a.png, b.png, c.png."),
    ("both", "--masked-loss --alpha-mask", "not both"),
])
def test_bad_masks_fail_fast_naming_the_file(tmp_path, capsys, case, flag, message):
    data = tmp_path / "data"
    for name in "abc":
        grey_image(data / f"{name}.png")
    masks = {"missing": Image.new("L", (16, 16), 255), "size": Image.new("L", (16, 8), 255),
             "colour": Image.new("RGB", (16, 16), (255, 0, 0)), "mode": Image.new("LA", (16, 16), (255, 255)),
             "alpha": None, "both": None}
    if masks[case] is not None:
        masks[case].save(data / "a.mask.png")
        if case != "missing":
            for name in "bc":
                Image.new("L", (16, 16), 255).save(data / f"{name}.mask.png")
    started = time.time()
    code = cli.main(["train", "--model", str(fake_model(tmp_path)), "--data", str(data), "--output-dir",
                     str(tmp_path / "out"), *flag.split()])
    assert code == 2 and time.time() - started < 5  # before any model loads
    err = capsys.readouterr().err
    assert err.startswith("sdlora: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


# ---------------------------------------------------------------- training


@pytest.fixture
def masked_images(images, tmp_path) -> Path:
    """The shared discs, each with a mask over its disc (grey at its rim); the last mask is all black."""
    folder = tmp_path / "masked"
    shutil.copytree(images, folder)
    for path in sorted(folder.glob("*.png")):
        pixels = np.asarray(Image.open(path).convert("L"))
        mask = np.where(pixels < 250, 255, 60).astype(np.uint8)
        Image.fromarray(mask if path.stem != "7" else np.zeros_like(mask)).save(mask_path(path))
    return folder


def test_cached_and_uncached_masked_runs_give_the_same_adapter(tiny_dir, masked_images, tmp_path):
    cached = setup_run(config(tiny_dir, masked_images, tmp_path / "cached", flip=0.5, masked_loss=True), quiet=True)
    masks = cached.images.cache.masks
    assert len(masks) == 16 and masks[0, False].shape == (1, 8, 8)  # the VAE's 2x
    cached_path = run_training(cached)
    uncached = train(config(tiny_dir, masked_images, tmp_path / "uncached", flip=0.5, masked_loss=True,
                            cache_latents=False, cache_text=False), quiet=True)
    assert_adapters_close(cached_path, uncached, atol=1e-5)
    plain = train(config(tiny_dir, masked_images, tmp_path / "plain", flip=0.5), quiet=True)
    with pytest.raises(AssertionError):  # and the masks did change what was learnt
        assert_adapters_close(cached_path, plain, atol=1e-5)


def test_an_unreadable_mask_is_named(tmp_path):
    grey_image(tmp_path / "data" / "a.png")
    (tmp_path / "data" / "a.mask.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"mask a.mask.png is unreadable .*: save it as a grayscale PNG"):
        attach_masks(find_images(tmp_path / "data"))
