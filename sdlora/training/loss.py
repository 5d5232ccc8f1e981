"""The diffusion loss of one batch and its options, as pure functions of their inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def rows_of(inputs, rows: torch.Tensor):
    """The given batch rows of every tensor in a (nested) dict of UNet inputs."""
    if isinstance(inputs, dict):
        return {key: rows_of(value, rows) for key, value in inputs.items()}
    return inputs[rows] if isinstance(inputs, torch.Tensor) else inputs


@dataclass(frozen=True)
class Draws:
    """The random numbers of some rows of a global batch: every draw is made for the whole batch, from
    one generator, and these rows are kept.

    Each image's noise, timestep and latent sample so depend on its place in the optimizer step's
    global batch, not on which process or micro-batch holds it: two processes of batch b draw what
    one process of batch 2b does. Drawing the whole batch on every process costs a few random numbers
    per image, nothing beside the UNet. Every holder of rows of one batch must make the same calls in
    the same order.
    """

    generator: torch.Generator
    rows: range
    size: int  # images in the global batch

    @classmethod
    def whole(cls, generator: torch.Generator, size: int) -> "Draws":
        return cls(generator, range(size), size)

    def __len__(self) -> int:
        return len(self.rows)

    def _keep(self, values: torch.Tensor) -> torch.Tensor:
        return values[self.rows.start : self.rows.stop]

    def normal(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws, [rows, *shape]."""
        return self._keep(torch.randn((self.size, *shape), generator=self.generator, dtype=dtype))

    def integers(self, low: int, high: int) -> torch.Tensor:
        """One integer in [low, high) per row."""
        return self._keep(torch.randint(low, high, (self.size,), generator=self.generator))


def draws_of(source: "Draws | torch.Generator", batch: int) -> Draws:
    """A batch's draws: given, or all of them from a bare generator."""
    return source if isinstance(source, Draws) else Draws.whole(source, batch)


@dataclass(frozen=True)
class TimestepSampling:
    """How training timesteps are spread over the window: uniform, logit-normal or sigmoid of a normal."""

    kind: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    sigmoid_scale: float = 1.0


def window_fractions(sampling: TimestepSampling, draws: Draws) -> torch.Tensor:
    """Positions in (0, 1) across the timestep window, one per sample: sigmoid of a normal draw.

    logit_normal is SD3's (Esser et al. 2024): sigmoid(mean + std * z); sigmoid is kohya's flux option,
    sigmoid(scale * z). Both put most draws mid-window; a larger std or scale spreads them towards the ends.
    """
    z = draws.normal(dtype=torch.float64)
    if sampling.kind == "logit_normal":
        return torch.sigmoid(sampling.logit_mean + sampling.logit_std * z)
    if sampling.kind == "sigmoid":
        return torch.sigmoid(sampling.sigmoid_scale * z)
    raise ValueError(f"unknown timestep sampling {sampling.kind!r}")


def sample_timesteps(sampling: TimestepSampling, low: int, high: int, draws: Draws) -> torch.Tensor:
    """Integer timesteps in [low, high), one per row of `draws`."""
    if sampling.kind == "uniform":
        return draws.integers(low, high)
    fractions = window_fractions(sampling, draws)
    # sigmoid can round to exactly 1.0 in floating point: keep the top timestep inside the window
    return (low + (fractions * (high - low)).floor().long()).clamp(low, high - 1)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str):
    """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for ε targets, / (SNR + 1) for v targets."""
    alphas = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    return snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)


def masked_mean(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each sample's mean of `loss` [B, C, h, w] weighted by `weight` [B, 1, h, w]: sum(w * l) / sum(w).

    Dividing by the weights' sum keeps every image's loss on the scale of an unmasked one, whatever
    the masked area; an all-zero mask gives 0 (sum(w * l) is 0, and the denominator is kept above 0).
    """
    weight = weight.to(loss).expand_as(loss)
    return (loss * weight).sum(dim=(1, 2, 3)) / weight.sum(dim=(1, 2, 3)).clamp(min=1e-12)


def debiased_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str):
    """Debiased estimation (Yu et al. 2023, kohya's form): 1 / sqrt(SNR) for ε targets, 1 / (SNR + 1) for v.

    SNR is capped at 1000: at the first timesteps it is in the thousands and the weight would vanish.
    """
    alphas = alphas_cumprod.to(timesteps.device)[timesteps]
    snr = (alphas / (1 - alphas)).clamp(max=1000)
    return 1 / snr.sqrt() if prediction_type == "epsilon" else 1 / (snr + 1)


def huber_threshold(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, huber_c: float, schedule: str):
    """The Huber loss's c per sample (kohya's scheduled pseudo-Huber, Khrapov et al. 2024).

    constant: huber_c. exponential: huber_c ** (t / T), 1 at t = 0 falling to huber_c at t = T.
    snr: (1 - huber_c) / (1 + sigma_t)^2 + huber_c with sigma_t = sqrt((1 - alpha_bar) / alpha_bar),
    near 1 (almost L2) at low noise and near huber_c (robust) at high noise.
    """
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c, device=timesteps.device)
    if schedule == "exponential":
        return huber_c ** (timesteps.float() / len(alphas_cumprod))
    if schedule != "snr":
        raise ValueError(f"unknown Huber schedule {schedule!r}")
    alphas = alphas_cumprod.to(timesteps.device)[timesteps]
    sigmas = ((1 - alphas) / alphas).sqrt()
    return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c


def pixel_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: str,
               huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element: squared error, or pseudo-Huber with per-sample c.

    huber: 2c (sqrt(d^2 + c^2) - c), about d^2 for |d| << c and 2c|d| beyond;
    smooth_l1: 2 (sqrt(d^2 + c^2) - c), the same curve divided by c, so about 2|d| beyond c.
    """
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss type {loss_type!r}")
    c = huber_c.to(prediction).view(-1, *[1] * (prediction.dim() - 1))
    excess = ((prediction - target) ** 2 + c ** 2).sqrt() - c
    return 2 * c * excess if loss_type == "huber" else 2 * excess


def diffusion_loss(unet, scheduler, latents: torch.Tensor, unet_inputs: dict, draws: Draws | torch.Generator, *,
                   prediction_type: str, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                   debiased_estimation: bool = False, loss_type: str = "l2", huber_c: float = 0.1,
                   huber_schedule: str = "snr", timestep_range: tuple[int, int] = (0, 1000),
                   timestep_sampling: TimestepSampling = TimestepSampling(),
                   base_prediction: Callable | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The noise-prediction loss of one batch, the mean of its images'; all randomness from `draws`
    (a generator: the batch is all of its global batch).

    `unet_inputs` are the UNet's keyword arguments for the batch (the family's conditioning).
    Timesteps are drawn from `timestep_range` as `timestep_sampling` says. With `base_prediction` (a
    function of the noisy latents, their timesteps and their rows in the batch, returning the model's
    output with the adapter off), timesteps are drawn uniformly from the whole schedule instead, those
    inside the range are redrawn there as `timestep_sampling` says (so the share of the window is the
    same whatever the sampling), and those outside are trained towards that output: the adapter learns
    to leave them alone. With `weight` (each sample's mask at the latents' size, [B, 1, h, w]), each
    sample's loss is `masked_mean`.
    """
    draws = draws_of(draws, latents.shape[0])
    noise = draws.normal(*latents.shape[1:])
    if noise_offset:
        noise = noise + noise_offset * draws.normal(latents.shape[1], 1, 1)
    low, high = timestep_range
    if base_prediction is None:
        timesteps = sample_timesteps(timestep_sampling, low, high, draws)
    else:
        timesteps = draws.integers(0, scheduler.config.num_train_timesteps)
        if timestep_sampling.kind != "uniform":  # uniform draws inside the window are uniform there already
            inside = (timesteps >= low) & (timesteps < high)
            timesteps = torch.where(inside, sample_timesteps(timestep_sampling, low, high, draws), timesteps)
    # non_blocking: a copy from the host that waits for the GPU would be a sync in every step
    noise, timesteps = noise.to(latents.device, non_blocking=True), timesteps.to(latents.device, non_blocking=True)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if base_prediction is not None:
        outside = ((timesteps < low) | (timesteps >= high)).nonzero().flatten()
        if len(outside):
            target = target.clone()
            target[outside] = base_prediction(noisy[outside], timesteps[outside], outside).to(target.dtype)
    prediction = unet(noisy, timesteps, **unet_inputs).sample  # autocast picks the dtype
    threshold = None
    if loss_type != "l2":
        threshold = huber_threshold(scheduler.alphas_cumprod, timesteps, huber_c, huber_schedule)
    loss = pixel_loss(prediction.float(), target.float(), loss_type, threshold)
    loss = loss.mean(dim=(1, 2, 3)) if weight is None else masked_mean(loss, weight)
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler.alphas_cumprod, timesteps, min_snr_gamma, prediction_type)
    if debiased_estimation:
        loss = loss * debiased_weight(scheduler.alphas_cumprod, timesteps, prediction_type)
    return loss.mean()
