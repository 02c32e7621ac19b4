"""The windowed sampler blends in the latents' precision when that is float64 (float32 at least), so a float64
parity run against the official pipeline (benchmarks/official_parity.py) compares arithmetic, not rounding."""

from __future__ import annotations

import copy

import torch

from halfbody.echomimic_v2.pipeline import SamplerSettings, sample_with_windows
from halfbody.models.schedulers import VPredictionDDIM, apply_cfg


def test_float64_latents_are_blended_in_float64():
    scheduler = VPredictionDDIM(beta_schedule="linear")  # the release's schedule
    x = torch.randn(1, 16, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoise(x_w, t, frames, with_uncond):  # per-element, so overlapping windows agree exactly
        return x_w / 3.0, x_w / 7.0

    out = sample_with_windows(denoise, scheduler, tuple(x.shape), SamplerSettings(), num_steps=1,
                              guidance_scale=2.5, latents=x, dtype=torch.float64)
    sched = copy.deepcopy(scheduler.scheduler)
    sched.set_timesteps(1)
    expected = sched.step(apply_cfg(x / 3.0, x / 7.0, 2.5), int(sched.timesteps[0]), x).prev_sample
    assert out.dtype == torch.float64
    # a float32 blend buffer leaves ~1e-7 here
    assert (out - expected).abs().max().item() < 1e-13
