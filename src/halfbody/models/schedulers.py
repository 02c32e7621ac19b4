"""The EchoMimicV2 diffusion schedule: v-prediction, zero-terminal-SNR betas, trailing DDIM, classifier-free guidance.

EchoMimicV2 (like Moore-AnimateAnyone, whose backbone it reuses) trains and samples with diffusers' ``DDIMScheduler``
set to ``prediction_type="v_prediction"``, ``rescale_betas_zero_snr=True``, ``timestep_spacing="trailing"`` and
``clip_sample=False`` (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.1-3.4).
We reuse that scheduler for all the maths and add the training helpers and the sampling loop around it.

Latents are ``(B, F, C, h, w)`` (any trailing shape works), timesteps are integer tensors of shape ``(B,)`` in
``[0, num_train_timesteps)``.

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps           (forward process)
    v   = sqrt(abar_t) eps - sqrt(1 - abar_t) x0           (velocity target, Salimans & Ho 2022)
    x0  = sqrt(abar_t) x_t - sqrt(1 - abar_t) v            (one-step estimate)

With zero-terminal SNR, ``abar_{T-1} = 0``: the last timestep is pure noise and ``x0 = -v`` there.

The network may instead predict the clean sample (``prediction_type="sample"``, *x-prediction*; Li & He 2025, "Back
to Basics: Let Denoising Generative Models Denoise", arXiv 2511.13720): :meth:`VPredictionDDIM.as_velocity` turns its
output into the velocity, ``v = (sqrt(abar_t) x_t - x0_hat) / sqrt(1 - abar_t)``, so the loss, classifier-free
guidance and the sampler stay in velocity space. A network narrower than its latent tokens (the CPU presets: 192
patch channels into a 32-channel UNet) cannot carry the noise a velocity or epsilon target contains and leaves
residual noise in every sample; the clean image it can predict (Li & He §3).
"""

from __future__ import annotations

import copy
from typing import Callable, Literal, Union

import torch

#: x-prediction's smallest denominator ``sqrt(1 - abar_t)`` (Li & He 2025 clip the noise level at 0.05 likewise)
X_PREDICTION_MIN_SIGMA = 0.05
PREDICTION_TYPES = ("v_prediction", "sample")

__all__ = ["VPredictionDDIM", "apply_cfg", "ddim_sample", "DenoiseFn", "alpha_bar_at", "x0_from_velocity",
           "pseudo_velocity"]

#: ``denoise_fn(x_t, t, with_uncond)``: ``x_t`` ``(B, ...)``, ``t`` ``(B,)`` long. Returns ``v_cond`` when
#: ``with_uncond`` is False, else ``(v_cond, v_uncond)``, so a caller can run both branches as one batch of 2B.
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, bool], Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, ..., 1)`` float32 on ``like``'s device, broadcastable against ``like``."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def apply_cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, guidance_scale: float,
              guidance_rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance ``v_uncond + s (v_cond - v_uncond)``, optionally rescaled.

    ``guidance_rescale = phi`` mixes in the guided prediction rescaled to the per-sample std of ``v_cond``
    (Lin et al. 2024, §3.4, Eq. 15-16), which counters over-exposure at high scales with zero-SNR schedules.
    With ``guidance_scale == 1`` or no ``v_uncond`` the result is ``v_cond`` itself.
    """
    if v_uncond is None or guidance_scale == 1.0:
        return v_cond
    v = v_uncond + guidance_scale * (v_cond - v_uncond)
    if guidance_rescale > 0:
        dims = tuple(range(1, v.ndim))
        rescaled = v * (v_cond.std(dim=dims, keepdim=True) / v.std(dim=dims, keepdim=True).clamp_min(1e-12))
        v = guidance_rescale * rescaled + (1.0 - guidance_rescale) * v
    return v


class VPredictionDDIM:
    """v-prediction DDIM with zero-terminal-SNR betas and trailing spacing (EchoMimicV2's sampler and training maths).

    Args:
        num_train_timesteps: ``T``.
        beta_start, beta_end, beta_schedule: SD1.5's betas. ``"scaled_linear"`` is SD1.5's native schedule and
            Moore-AnimateAnyone's *training* scheduler; the EchoMimicV2 release's ``noise_scheduler_kwargs``
            (``configs/inference/inference_v2.yaml``) say ``"linear"``, which the EchoMimicV2 presets follow.
        rescale_betas_zero_snr: rescale so ``abar_{T-1} = 0`` (Lin et al. 2024, Alg. 1).
        timestep_spacing: ``"trailing"`` starts sampling at ``T - 1`` (Lin et al. 2024, §3.3).
        steps_offset, clip_sample, set_alpha_to_one: diffusers ``DDIMScheduler`` settings (the release: 1, False,
            diffusers' default True: the last DDIM step lands on ``abar = 1``).
        prediction_type: what the network outputs: ``"v_prediction"`` (the release) or ``"sample"`` (x-prediction,
            turned into the velocity by :meth:`as_velocity`).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: Literal["linear", "scaled_linear"] = "scaled_linear",
                 rescale_betas_zero_snr: bool = True,
                 timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing",
                 steps_offset: int = 1, prediction_type: Literal["v_prediction", "sample"] = "v_prediction",
                 clip_sample: bool = False, set_alpha_to_one: bool = True) -> None:
        from diffusers import DDIMScheduler

        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} must be one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        if beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
        self.scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, clip_sample=bool(clip_sample), set_alpha_to_one=bool(set_alpha_to_one),
            steps_offset=steps_offset, prediction_type="v_prediction", timestep_spacing=timestep_spacing,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )
        self.num_train_timesteps = int(num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)  # (T,) abar_t, float64 for accuracy

    # ------------------------------------------------------------------------------------------ training helpers

    def _coefs(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))``, each ``(B, 1, ..., 1)`` like ``like``."""
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"t must be (B,) with B = {like.shape[0]}, got shape {tuple(t.shape)}")
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return _expand(abar.sqrt(), like), _expand((1.0 - abar).sqrt(), like)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t`` for integer timesteps ``t`` (any shape), float32 on ``t``'s device."""
        return self.alphas_cumprod.to(t.device)[t.long()].to(torch.float32)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` (0 at the zero-SNR terminal step), float32."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return (abar / (1.0 - abar)).to(torch.float32)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``x0``, ``noise`` ``(B, F, C, h, w)``, ``t`` ``(B,)``."""
        a, s = self._coefs(t, x0)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0``, shape of ``x0``."""
        a, s = self._coefs(t, x0)
        return (a * noise.float() - s * x0.float()).to(x0.dtype)

    def as_velocity(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as the velocity: itself for ``"v_prediction"``; for ``"sample"`` (x-prediction)
        ``v = (sqrt(abar_t) x_t - x0_hat) / max(sqrt(1 - abar_t), 0.05)``. Shapes of ``x_t``, ``t`` ``(B,)``."""
        if self.prediction_type == "v_prediction":
            return model_output
        a, s = self._coefs(t, x_t)
        v = (a * x_t.float() - model_output.float()) / s.clamp_min(X_PREDICTION_MIN_SIGMA)
        return v.to(model_output.dtype)

    def predict_x0(self, x_t: torch.Tensor, v_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One-step ``x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v_pred`` (used by EchoMimicV2's PhD loss)."""
        a, s = self._coefs(t, x_t)
        return (a * x_t.float() - s * v_pred.float()).to(x_t.dtype)

    def predict_noise(self, x_t: torch.Tensor, v_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``eps_hat = sqrt(1 - abar_t) x_t + sqrt(abar_t) v_pred``."""
        a, s = self._coefs(t, x_t)
        return (s * x_t.float() + a * v_pred.float()).to(x_t.dtype)

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, t_min: int = 0,
                         t_max: int | None = None) -> torch.Tensor:
        """Uniform integer timesteps ``(batch,)`` in ``[t_min, t_max)`` (default the full ``[0, T)``).

        The range lets a phase restrict a loss term to a timestep band. Drawn on ``generator``'s device when a
        generator is given (so a CUDA generator works), then moved to ``device``.
        """
        t_max = self.num_train_timesteps if t_max is None else int(t_max)
        if not 0 <= t_min < t_max <= self.num_train_timesteps:
            raise ValueError(f"need 0 <= t_min < t_max <= {self.num_train_timesteps}, got t_min={t_min}, t_max={t_max}")
        draw_device = generator.device if generator is not None else "cpu"
        t = torch.randint(t_min, t_max, (batch,), generator=generator, device=draw_device)
        return t.to(device) if device is not None else t

    # ------------------------------------------------------------------------------------------ sampling

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """The ``num_steps`` sampling timesteps, descending (trailing spacing starts at ``T - 1``)."""
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(num_steps)
        return sched.timesteps.clone()

    @torch.no_grad()
    def ddim_sample(self, denoise_fn: DenoiseFn, shape: tuple[int, ...], num_steps: int = 30,
                    guidance_scale: float = 2.5, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    latents: torch.Tensor | None = None, eta: float = 0.0, guidance_rescale: float = 0.0,
                    callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Sample ``x0`` latents of ``shape`` (e.g. ``(B, F, C, h, w)``) with DDIM and classifier-free guidance.

        Args:
            denoise_fn: see :data:`DenoiseFn`. Called with ``with_uncond = guidance_scale != 1``; it returns
                ``v_cond`` or ``(v_cond, v_uncond)``. Batching both branches into one forward is up to the caller.
            shape: latent shape; ignored when ``latents`` is given.
            num_steps: DDIM steps.
            guidance_scale: CFG scale ``s``; 1 runs the conditional branch only.
            generator: for the initial noise (and ``eta > 0`` noise); sampled on the generator's device.
            latents: optional initial ``x_T`` (default: standard normal noise).
            eta: DDIM stochasticity (0 = deterministic DDIM).
            guidance_rescale: ``phi`` of :func:`apply_cfg`.
            callback: ``callback(step_index, t, x_t)`` after each step.

        Returns:
            ``x0`` latents, ``shape``, in ``dtype``.
        """
        sched = copy.deepcopy(self.scheduler)
        sched.set_timesteps(num_steps)
        if latents is None:
            gen_device = generator.device if generator is not None else "cpu"
            latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        x = latents.to(device=device if device is not None else latents.device, dtype=dtype)
        with_uncond = guidance_scale != 1.0
        for i, t in enumerate(sched.timesteps):
            t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            out = denoise_fn(x, t_batch, with_uncond)
            if with_uncond:
                if not isinstance(out, (tuple, list)) or len(out) != 2:
                    raise TypeError("denoise_fn(x_t, t, with_uncond=True) must return (v_cond, v_uncond)")
                v = apply_cfg(out[0], out[1], guidance_scale, guidance_rescale)
            else:
                v = out[0] if isinstance(out, (tuple, list)) else out
            x = sched.step(v.to(x.dtype), int(t), x, eta=eta, generator=generator).prev_sample
            if callback is not None:
                callback(i, int(t), x)
        return x


# ---------------------------------------------------------------------------------------------- the release's step
# EchoMimicV2's accelerated pipeline (``pipeline_echomimicv2_acc.py`` with ``step_func.py``) converts each window's
# v-prediction into an ``x0`` estimate and back into the *pseudo-velocity* that carries ``x_t`` onto a given state
# ``x_s`` in one DDIM step; it does so towards ``s = -1`` (``abar = 1``, the clean sample). Timesteps below 0 read
# ``abar = 1``. Written from the maths:
#
#     x_s = (a_s a_t + b_s b_t) x_t + (b_s a_t - a_s b_t) v        (one deterministic DDIM step, a = sqrt(abar),
#     v   = (x_s - (a_s a_t + b_s b_t) x_t) / (b_s a_t - a_s b_t)   b = sqrt(1 - abar))


def alpha_bar_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``abar_t`` for integer timesteps ``t`` ``(B,)``; ``t < 0`` gives 1 (the clean end), ``t >= T`` gives 0."""
    t = t.long().to(alphas_cumprod.device)
    abar = alphas_cumprod[t.clamp(0, alphas_cumprod.shape[0] - 1)]
    abar = torch.where(t < 0, torch.ones_like(abar), abar)
    return torch.where(t >= alphas_cumprod.shape[0], torch.zeros_like(abar), abar)


def x0_from_velocity(v: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x0 = a_t x_t - b_t v``; ``v``, ``x_t`` ``(B, ...)``, ``t`` ``(B,)`` (or one timestep for all)."""
    t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
    abar = _expand(alpha_bar_at(alphas_cumprod, t), x_t).to(x_t.dtype)
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v


def pseudo_velocity(x_t: torch.Tensor, x_s: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor,
                    s: torch.Tensor) -> torch.Tensor:
    """The velocity whose deterministic DDIM step from ``(x_t, t)`` lands exactly on ``x_s`` at timestep ``s``
    (``s = -1``: ``x_s`` is the clean sample). Shapes as :func:`x0_from_velocity`."""
    t = t.reshape(-1).expand(x_t.shape[0]) if t.numel() == 1 else t
    s = s.reshape(-1).expand(x_t.shape[0]) if s.numel() == 1 else s
    abar_t = _expand(alpha_bar_at(alphas_cumprod, t), x_t).to(x_t.dtype)
    abar_s = _expand(alpha_bar_at(alphas_cumprod, s), x_t).to(x_t.dtype)
    a_t, b_t, a_s, b_s = abar_t.sqrt(), (1 - abar_t).sqrt(), abar_s.sqrt(), (1 - abar_s).sqrt()
    return (x_s - (a_s * a_t + b_s * b_t) * x_t) / (b_s * a_t - a_s * b_t)


def ddim_sample(denoise_fn: DenoiseFn, shape: tuple[int, ...], num_steps: int = 30, guidance_scale: float = 2.5,
                generator: torch.Generator | None = None, schedule: VPredictionDDIM | None = None,
                **kwargs) -> torch.Tensor:
    """:meth:`VPredictionDDIM.ddim_sample` with ``schedule`` (default: a fresh EchoMimicV2 schedule)."""
    schedule = schedule if schedule is not None else VPredictionDDIM()
    return schedule.ddim_sample(denoise_fn, shape, num_steps=num_steps, guidance_scale=guidance_scale,
                                generator=generator, **kwargs)
