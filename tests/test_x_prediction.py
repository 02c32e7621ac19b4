"""x-prediction (issue 11; Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"): a network that
outputs the clean sample, turned into the velocity that the loss, CFG and both samplers use. A perfect x0 gives the
exact velocity target; the EchoMimicV2 DDIM and the MirrorMe rectified flow both accept ``prediction_type``."""

from __future__ import annotations

import pytest
import torch

from halfbody.models.flow_matching import RectifiedFlow
from halfbody.models.schedulers import VPredictionDDIM


def _pair(shape=(4, 2, 3, 5, 5)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_ddim_exact_x0_gives_the_velocity_target():
    sched, x0_sched = VPredictionDDIM(), VPredictionDDIM(prediction_type="sample")
    x0, noise = _pair()
    t = torch.tensor([2, 100, 600, 999])  # sqrt(1 - abar) >= 0.05 (the clamp) from t = 2 on
    xt = sched.add_noise(x0, noise, t)
    v = sched.velocity_target(x0, noise, t)
    torch.testing.assert_close(x0_sched.as_velocity(x0, xt, t), v, rtol=1e-4, atol=1e-4)
    assert sched.as_velocity(v, xt, t) is v  # v-prediction passes the output through
    # the sampler's x0 estimate from that velocity is the network's x0
    torch.testing.assert_close(x0_sched.predict_x0(xt, x0_sched.as_velocity(x0, xt, t), t), x0, rtol=1e-4, atol=1e-4)


def test_flow_exact_x0_gives_the_velocity_target():
    flow, x0_flow = RectifiedFlow(3.0), RectifiedFlow(3.0, prediction_type="sample")
    x0, noise = _pair()
    t = torch.tensor([0.05, 0.3, 0.7, 1.0])
    xt = flow.add_noise(x0, noise, t)
    torch.testing.assert_close(x0_flow.as_velocity(x0, xt, t), flow.velocity_target(x0, noise, t),
                               rtol=1e-4, atol=1e-4)
    # near data the denominator is clamped at 0.05: finite, no blow-up
    small = x0_flow.as_velocity(x0, flow.add_noise(x0, noise, torch.zeros(4)), torch.zeros(4))
    assert torch.isfinite(small).all()


def test_flow_x_prediction_samples_the_predicted_image():
    """An x-predicting denoiser that always returns the same image makes the Euler sampler end exactly on it."""
    x0_flow = RectifiedFlow(3.0, sample_shift=3.0, prediction_type="sample")
    target = torch.randn(2, 1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = x0_flow.euler_sample(lambda x, t, unc: x0_flow.as_velocity(target, x, t), target.shape, num_steps=6,
                               guidance_scale=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, target, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [VPredictionDDIM, RectifiedFlow])
def test_unknown_prediction_type_is_one_line(cls):
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        cls(prediction_type="epsilon")
