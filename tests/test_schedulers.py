"""The v-prediction / zero-terminal-SNR / trailing DDIM schedule and its CFG sampling loop."""

from __future__ import annotations

import pytest
import torch

from halfbody.models.schedulers import VPredictionDDIM, apply_cfg, ddim_sample


@pytest.fixture(scope="module")
def sched() -> VPredictionDDIM:
    return VPredictionDDIM()


def _latents(seed: int, shape=(3, 2, 4, 5, 6)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_noise_velocity_x0_consistency(sched: VPredictionDDIM) -> None:
    x0, noise = _latents(0), _latents(1)
    t = torch.tensor([0, 500, 999])
    xt = sched.add_noise(x0, noise, t)
    v = sched.velocity_target(x0, noise, t)
    torch.testing.assert_close(sched.predict_x0(xt, v, t), x0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.predict_noise(xt, v, t), noise, rtol=1e-5, atol=1e-5)
    # matches diffusers' own maths
    torch.testing.assert_close(xt, sched.scheduler.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v, sched.scheduler.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)
    # at the terminal (zero-SNR) step, x_t is pure noise and x0 = -v
    torch.testing.assert_close(xt[2], noise[2])
    torch.testing.assert_close(v[2], -x0[2])


def test_zero_terminal_snr_and_trailing(sched: VPredictionDDIM) -> None:
    assert sched.alphas_cumprod[-1].item() == 0.0
    assert sched.snr(torch.tensor([999])).item() == 0.0
    assert 0 < sched.alpha_bar(torch.tensor([0])).item() < 1
    ts = sched.timesteps(4)
    assert ts.tolist() == [999, 749, 499, 249]
    assert sched.timesteps(30)[0].item() == 999
    cfg = sched.scheduler.config
    assert cfg.prediction_type == "v_prediction" and cfg.rescale_betas_zero_snr and not cfg.clip_sample


def test_sample_timesteps(sched: VPredictionDDIM) -> None:
    t = sched.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert t.shape == (1000,) and t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    t2 = sched.sample_timesteps(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)
    band = sched.sample_timesteps(64, t_min=200, t_max=400)
    assert band.min() >= 200 and band.max() < 400
    with pytest.raises(ValueError, match="t_min"):
        sched.sample_timesteps(4, t_min=10, t_max=5)


@pytest.mark.parametrize("num_steps", [1, 4, 10])
def test_oracle_sampling_recovers_x0(sched: VPredictionDDIM, num_steps: int) -> None:
    x0 = _latents(3, (2, 3, 4, 4, 4))

    def oracle(x_t: torch.Tensor, t: torch.Tensor, with_uncond: bool):
        # the exact velocity for x0: v = (sqrt(abar) x_t - x0) / sqrt(1 - abar)
        abar = sched.alpha_bar(t).view(-1, 1, 1, 1, 1)
        v = (abar.sqrt() * x_t - x0) / (1 - abar).sqrt()
        return (v, torch.zeros_like(v)) if with_uncond else v

    out = sched.ddim_sample(oracle, x0.shape, num_steps=num_steps, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)


def test_cfg_arithmetic_and_branches(sched: VPredictionDDIM) -> None:
    vc, vu = _latents(4), _latents(5)
    assert torch.equal(apply_cfg(vc, vu, 1.0), vc)
    assert torch.equal(apply_cfg(vc, None, 3.0), vc)
    torch.testing.assert_close(apply_cfg(vc, vu, 3.0), vu + 3.0 * (vc - vu))
    # full rescale: the guided prediction takes the per-sample std of the conditional one
    r = apply_cfg(vc, vu, 5.0, guidance_rescale=1.0)
    torch.testing.assert_close(r.flatten(1).std(1), vc.flatten(1).std(1), rtol=1e-4, atol=1e-5)

    calls: list[bool] = []

    def fn(x_t, t, with_uncond):
        calls.append(with_uncond)
        assert t.shape == (x_t.shape[0],) and t.dtype == torch.long
        # one batched forward for both branches, as a real caller would do
        both = torch.cat([x_t, x_t]) * torch.cat([torch.full_like(x_t, 0.1), torch.full_like(x_t, -0.2)])
        v_cond, v_uncond = both.chunk(2)
        return (v_cond, v_uncond) if with_uncond else v_cond

    shape = (2, 2, 4, 4, 4)
    g1 = ddim_sample(fn, shape, num_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                     schedule=sched)
    assert calls == [False] * 3
    calls.clear()
    # guidance 1 equals the conditional branch only, whatever the unconditional branch returns
    g1b = sched.ddim_sample(lambda x, t, u: fn(x, t, False), shape, num_steps=3, guidance_scale=1.0,
                            generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(g1, g1b)
    calls.clear()
    g3 = sched.ddim_sample(fn, shape, num_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert calls == [True] * 3
    assert g3.shape == shape and not torch.allclose(g1, g3)
    with pytest.raises(TypeError, match="v_cond, v_uncond"):
        sched.ddim_sample(lambda x, t, u: x, shape, num_steps=2, guidance_scale=2.0)
