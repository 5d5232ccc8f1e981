"""The diffusion loss of one batch and its options, as pure functions of their inputs."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def rows_of(inputs, rows: torch.Tensor):
    """The given batch rows of every tensor in a (nested) dict of UNet inputs."""
    if isinstance(inputs, dict):
        return {key: rows_of(value, rows) for key, value in inputs.items()}
    return inputs[rows] if isinstance(inputs, torch.Tensor) else inputs


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


def diffusion_loss(unet, scheduler, latents: torch.Tensor, unet_inputs: dict, generator: torch.Generator, *,
                   prediction_type: str, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                   timestep_range: tuple[int, int] = (0, 1000),
                   base_prediction: Callable | None = None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The noise-prediction loss of one batch; all randomness from `generator`.

    `unet_inputs` are the UNet's keyword arguments for the batch (the family's conditioning).
    Timesteps are drawn from `timestep_range`. With `base_prediction` (a function of the noisy
    latents, their timesteps and their rows in the batch, returning the model's output with the
    adapter off), timesteps are drawn from the whole schedule instead, and those outside the range
    are trained towards that output: the adapter learns to leave them alone. With `weight` (each
    sample's mask at the latents' size, [B, 1, h, w]), each sample's loss is `masked_mean`.
    """
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(batch, latents.shape[1], 1, 1, generator=generator)
    low, high = timestep_range
    if base_prediction is not None:
        low, high = 0, scheduler.config.num_train_timesteps
    timesteps = torch.randint(low, high, (batch,), generator=generator)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    if base_prediction is not None:
        outside = ((timesteps < timestep_range[0]) | (timesteps >= timestep_range[1])).nonzero().flatten()
        if len(outside):
            target = target.clone()
            target[outside] = base_prediction(noisy[outside], timesteps[outside], outside).to(target.dtype)
    prediction = unet(noisy, timesteps, **unet_inputs).sample  # autocast picks the dtype
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    loss = loss.mean(dim=(1, 2, 3)) if weight is None else masked_mean(loss, weight)
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler.alphas_cumprod, timesteps, min_snr_gamma, prediction_type)
    return loss.mean()
