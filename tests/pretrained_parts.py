"""Tiny random stand-ins of pretrained parts, saved with ``save_pretrained`` so tests load them through the real code."""

from __future__ import annotations

import torch


def save_tiny_ltx_vae(path, timestep_conditioning: bool = False) -> None:
    """A 4-level ``AutoencoderKLLTXVideo`` (8x time with a causal first frame, 32x space, 8 channels) with non-trivial
    per-channel latent statistics, so the normalisation is exercised."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, True, False),
                                decoder_spatio_temporal_scaling=(True, True, True, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=timestep_conditioning)
    vae.latents_mean.copy_(torch.linspace(-0.5, 0.5, 8))
    vae.latents_std.copy_(torch.linspace(0.5, 2.0, 8))
    vae.save_pretrained(path)
