"""Loss and timestep options, each checked against its formula recomputed plainly here."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from sdlora import cli, read_adapter
from sdlora.training.config import ConfigError, TrainConfig, validate
from sdlora.training.loop import run_training, setup_run
from sdlora.training.loss import Draws, TimestepSampling, diffusion_loss, pixel_loss, sample_timesteps

SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)  # SD's schedule
ALPHAS = SCHEDULER.alphas_cumprod.double().numpy()


class FixedUNet:
    """Predicts a fixed tensor and remembers what it was asked."""

    def __init__(self, prediction: torch.Tensor):
        self.prediction = prediction
        self.seen = {}

    def __call__(self, noisy, timesteps, encoder_hidden_states):
        self.seen["noisy"], self.seen["timesteps"] = noisy, timesteps
        return SimpleNamespace(sample=self.prediction)


def run_loss(prediction: torch.Tensor, seed: int = 0, **options):
    """The loss of zero latents under a UNet that predicts `prediction`, with the noise and timesteps drawn."""
    unet = FixedUNet(prediction)
    latents = torch.zeros(prediction.shape)
    loss = diffusion_loss(unet, SCHEDULER, latents, {"encoder_hidden_states": None},
                          torch.Generator().manual_seed(seed), **{"prediction_type": "epsilon", **options})
    timesteps = unet.seen["timesteps"].numpy()
    # From zero latents, noisy = sqrt(1 - alpha_bar) * noise
    noise = unet.seen["noisy"].double().numpy() / np.sqrt(1 - ALPHAS[timesteps]).reshape(-1, 1, 1, 1)
    return loss, noise, timesteps


def prediction(batch: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 3, 3, generator=torch.Generator().manual_seed(seed)) * 1.5


# -- the loss


def old_diffusion_loss(unet, scheduler, latents, unet_inputs, generator, *, prediction_type, noise_offset=0.0,
                       min_snr_gamma=None, timestep_range=(0, 1000)):
    """The loss as it was before these options, without preservation, kept here as the reference."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(batch, latents.shape[1], 1, 1, generator=generator)
    timesteps = torch.randint(*timestep_range, (batch,), generator=generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    predicted = unet(noisy, timesteps, **unet_inputs).sample
    loss = F.mse_loss(predicted.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = scheduler.alphas_cumprod[timesteps]
        snr = alphas / (1 - alphas)
        loss = loss * snr.clamp(max=min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    return loss.mean()


@pytest.mark.parametrize("options", [
    {},
    {"prediction_type": "v_prediction", "min_snr_gamma": 5.0, "noise_offset": 0.1},
    {"min_snr_gamma": 1.0, "timestep_range": (200, 700)},
])
def test_default_options_give_exactly_the_old_loss(options):
    latents = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    unet = FixedUNet(prediction(8))
    settings = {"prediction_type": "epsilon", **options}
    new = diffusion_loss(unet, SCHEDULER, latents, {"encoder_hidden_states": None}, torch.Generator().manual_seed(5),
                         **settings)
    old = old_diffusion_loss(unet, SCHEDULER, latents, {"encoder_hidden_states": None},
                             torch.Generator().manual_seed(5), **settings)
    assert torch.equal(new, old)


def expected_huber_c(timesteps: np.ndarray, huber_c: float, schedule: str) -> np.ndarray:
    alphas = ALPHAS[timesteps]
    if schedule == "constant":
        return np.full(len(timesteps), huber_c)
    if schedule == "exponential":  # kohya: exp(-alpha t), alpha = -ln(huber_c) / T
        return np.exp(math.log(huber_c) / 1000 * timesteps)
    sigma = np.sqrt((1 - alphas) / alphas)
    return (1 - huber_c) / (1 + sigma) ** 2 + huber_c


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_losses_follow_their_formula(loss_type, schedule):
    predicted = prediction()
    loss, noise, timesteps = run_loss(predicted, loss_type=loss_type, huber_c=0.2, huber_schedule=schedule)
    c = expected_huber_c(timesteps, 0.2, schedule).reshape(-1, 1, 1, 1)
    difference = predicted.double().numpy() - noise
    excess = np.sqrt(difference ** 2 + c ** 2) - c
    elementwise = 2 * c * excess if loss_type == "huber" else 2 * excess
    expected = elementwise.mean(axis=(1, 2, 3)).mean()  # per sample over pixels, then over the batch
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    mse, _, _ = run_loss(predicted)
    assert abs(loss.item() - mse.item()) > 0.01  # the option changed the loss


def test_huber_c_schedules_run_from_l2_like_to_robust():
    early, late = np.array([0]), np.array([999])
    for schedule in ("exponential", "snr"):
        assert expected_huber_c(early, 0.1, schedule)[0] > 0.9  # almost 1: about L2 at low noise
        assert expected_huber_c(late, 0.1, schedule)[0] == pytest.approx(0.1, abs=0.01)
    # and the loss itself: quadratic for errors well below c, 2c|d| (huber) or 2|d| (smooth L1) far above
    small, large = torch.full((1, 1, 1, 1), 1e-3), torch.full((1, 1, 1, 1), 50.0)
    c = torch.tensor([0.1])
    for error, huber, smooth in ((small, 1e-6, 1e-5), (large, 2 * 0.1 * 50, 2 * 50)):
        assert pixel_loss(error, torch.zeros_like(error), "huber", c).item() == pytest.approx(huber, rel=0.01)
        assert pixel_loss(error, torch.zeros_like(error), "smooth_l1", c).item() == pytest.approx(smooth, rel=0.01)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("min_snr_gamma", [None, 5.0])
def test_debiased_estimation_weights_each_sample(prediction_type, min_snr_gamma):
    zero = torch.zeros(64, 4, 3, 3)
    loss, noise, timesteps = run_loss(zero, prediction_type=prediction_type, min_snr_gamma=min_snr_gamma,
                                      debiased_estimation=True)
    alphas = ALPHAS[timesteps]
    # The model predicts 0: the per-sample loss is the mean square of the target (v = sqrt(alpha_bar) noise here)
    target = noise if prediction_type == "epsilon" else np.sqrt(alphas).reshape(-1, 1, 1, 1) * noise
    plain = (target ** 2).mean(axis=(1, 2, 3))
    snr = alphas / (1 - alphas)
    capped = np.minimum(snr, 1000)
    weight = 1 / np.sqrt(capped) if prediction_type == "epsilon" else 1 / (capped + 1)
    if min_snr_gamma:
        weight = weight * np.minimum(snr, min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert loss.item() == pytest.approx((plain * weight).mean(), rel=1e-5)


def test_debiased_estimation_caps_the_snr_at_1000():
    zero = torch.zeros(16, 4, 3, 3)
    assert ALPHAS[0] / (1 - ALPHAS[0]) > 1000  # SD's first timestep is past the cap
    loss, noise, _ = run_loss(zero, timestep_range=(0, 1), debiased_estimation=True)
    assert loss.item() == pytest.approx((noise ** 2).mean() / math.sqrt(1000), rel=1e-5)


# -- timestep sampling


def draws(kind: str, n: int = 20000, low: int = 100, high: int = 600, seed: int = 0, **settings) -> np.ndarray:
    timesteps = sample_timesteps(TimestepSampling(kind, **settings), low, high,
                                 Draws.whole(torch.Generator().manual_seed(seed), n))
    assert timesteps.dtype == torch.int64
    return timesteps.numpy()


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def logit_normal_error(timesteps: np.ndarray, low: int, high: int, mean: float, std: float) -> float:
    """Largest gap between the draws' CDF and sigmoid(mean + std z) floored onto the window (a KS distance)."""
    width = high - low
    steps = np.arange(1, width)
    # t < low + j  <=>  fraction < j / width  <=>  z < (logit(j / width) - mean) / std
    expected = normal_cdf((np.log(steps / (width - steps)) - mean) / std)
    observed = np.searchsorted(np.sort(timesteps), low + steps, side="left") / len(timesteps)
    return float(np.abs(observed - expected).max())


@pytest.mark.parametrize("kind, settings", [("uniform", {}), ("logit_normal", {"logit_mean": 1.5, "logit_std": 2.0}),
                                             ("sigmoid", {"sigmoid_scale": 3.0})])
def test_sampled_timesteps_stay_in_the_window(kind, settings):
    timesteps = draws(kind, low=100, high=600, **settings)
    assert timesteps.min() == 100 and timesteps.max() == 599  # wide draws reach both ends, never past them
    again = draws(kind, low=100, high=600, **settings)
    assert np.array_equal(timesteps, again)  # the generator alone decides


def test_uniform_sampling_is_todays_draw():
    expected = torch.randint(100, 600, (50,), generator=torch.Generator().manual_seed(4)).numpy()
    assert np.array_equal(draws("uniform", n=50, seed=4), expected)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1.0, 1.0), (-0.5, 0.5)])
def test_logit_normal_sampling_has_its_distribution(mean, std):
    timesteps = draws("logit_normal", logit_mean=mean, logit_std=std)
    assert logit_normal_error(timesteps, 100, 600, mean, std) < 0.015  # KS 0.1% critical value at n=20000: 0.0138
    median_fraction = 1 / (1 + math.exp(-mean))
    assert np.median(timesteps) == pytest.approx(100 + 500 * median_fraction, abs=5)


def test_sigmoid_sampling_is_logit_normal_around_the_centre_and_its_scale_spreads_it():
    spreads = []
    for scale in (0.5, 1.0, 2.0):
        timesteps = draws("sigmoid", sigmoid_scale=scale)
        assert logit_normal_error(timesteps, 100, 600, 0.0, scale) < 0.015
        # the median's standard error is about 1.1 * scale timesteps at 20000 draws
        assert np.median(timesteps) == pytest.approx(350, abs=5 * scale)
        spreads.append(np.percentile(timesteps, 75) - np.percentile(timesteps, 25))
        # the same draws as SD3's logit-normal with mean 0 and std = scale
        assert np.array_equal(timesteps, draws("logit_normal", logit_std=scale))
    assert spreads[0] < spreads[1] < spreads[2]
    assert spreads[0] < 0.5 * 250  # a uniform draw's interquartile range is half the window


def test_preservation_keeps_the_windows_share_and_samples_only_inside_it():
    # Window [0, 400) of 1000: 40% of draws land in it as with uniform sampling; inside, logit-normal
    # (median 200); outside, uniform over [400, 1000) (mean 699.5, standard deviation 173).
    zero = torch.zeros(20000, 1, 1, 1)
    _, _, timesteps = run_loss(zero, timestep_range=(0, 400), timestep_sampling=TimestepSampling("logit_normal"),
                               base_prediction=lambda noisy, t, rows: torch.zeros_like(noisy))
    inside, outside = timesteps[timesteps < 400], timesteps[timesteps >= 400]
    assert len(inside) / len(timesteps) == pytest.approx(0.4, abs=0.015)
    assert logit_normal_error(inside, 0, 400, 0.0, 1.0) < 0.025
    assert outside.mean() == pytest.approx(699.5, abs=5) and outside.std() == pytest.approx(173.2, abs=3)


# -- the config


def valid(tmp_path, **overrides) -> TrainConfig:
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True, exist_ok=True)
    (model / "model_index.json").write_text("{}")
    (tmp_path / "data").mkdir(exist_ok=True)
    return TrainConfig(model=str(model), data=str(tmp_path / "data"), output_dir=str(tmp_path / "out"), **overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": "mse"}, "loss_type must be one of l2, huber, smooth_l1, got 'mse'"),
    ({"loss_type": "huber", "huber_c": 0.0}, r"huber_c must be in \(0, 1\], got 0.0"),
    ({"loss_type": "huber", "huber_c": 1.5}, r"huber_c must be in \(0, 1\], got 1.5"),
    ({"loss_type": "huber", "huber_schedule": "cosine"}, "huber_schedule must be one of constant, exponential, snr"),
    ({"timestep_sampling": "logit_normal", "logit_std": 0.0}, "logit_std must be > 0, got 0.0"),
    ({"timestep_sampling": "sigmoid", "sigmoid_scale": -1.0}, "sigmoid_scale must be > 0, got -1.0"),
    ({"timestep_sampling": "normal"}, "timestep_sampling must be one of uniform, logit_normal, sigmoid"),
    ({"huber_c": 0.2}, "huber_c is set but acts only with loss_type huber or smooth_l1"),
    ({"logit_mean": 0.5}, "logit_mean is set but acts only with timestep_sampling logit_normal"),
    ({"timestep_sampling": "logit_normal", "sigmoid_scale": 2.0}, "sigmoid_scale is set but acts only with"),
])
def test_bad_values_are_rejected_with_the_value_and_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        validate(valid(tmp_path, **overrides))
    assert "\n" not in str(error.value)


def test_the_command_line_rejects_a_bad_loss_in_one_line(tmp_path, capsys):
    config = valid(tmp_path)
    toml = tmp_path / "train.toml"
    toml.write_text('loss_type = "huber"\nhuber_c = 0\n')
    code = cli.main(["train", "--config", str(toml), "--model", config.model, "--data", config.data,
                     "--output-dir", config.output_dir])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "huber_c must be in (0, 1], got 0.0" in err
    with pytest.raises(SystemExit):  # a flag outside the fixed set is argparse's error
        cli.main(["train", "--loss-type", "mse"])
    assert "invalid choice: 'mse'" in capsys.readouterr().err


# -- training


@pytest.mark.parametrize("options", [
    {"debiased_estimation": True, "min_snr_gamma": 5.0},
    {"loss_type": "huber"},
    {"loss_type": "smooth_l1", "huber_schedule": "exponential", "huber_c": 0.2},
    {"timestep_sampling": "logit_normal", "logit_mean": 0.5},
    {"timestep_sampling": "sigmoid", "sigmoid_scale": 2.0, "timestep_max": 600, "preserve_outside_window": True},
    {"loss_type": "huber", "debiased_estimation": True, "timestep_sampling": "logit_normal",
     "prediction_type": "v_prediction", "mixed_precision": "bf16"},
])
def test_a_short_run_with_each_option_lowers_its_loss(tiny_dir, images, tmp_path, options):
    """40 steps on the tiny model, each option alone and all together, as the tiny model's other runs do."""
    config = TrainConfig(model=str(tiny_dir), data=str(images), output_dir=str(tmp_path), resolution=16,
                         batch_size=4, max_steps=40, lr=1e-2, rank=4, seed=7, targets="attn-mlp", **options)
    run = setup_run(config, quiet=True)
    before = run.fixed_noise_loss()  # under the run's own loss and timestep sampling
    path = run_training(run)
    after = run.fixed_noise_loss()
    assert after < 0.9 * before, (before, after)  # measured: 0.69 to 0.83 of the start
    header = read_adapter(path)[1]
    assert header["ss_loss_type"] == config.loss_type and header["ss_huber_c"] == str(config.huber_c)
    assert header["ss_debiased_estimation"] == str(config.debiased_estimation)
