"""Rectified flow (MirrorMe §3.1, Eq. 2-3): linear noising, velocity targets, shifted timesteps, Euler sampling.

Conventions (SD3 / LTX-Video): ``t = 0`` is data and ``t = 1`` is noise,

    x_t = (1 - t) x0 + t eps            (Eq. 2)
    u_t = d x_t / d t = eps - x0        (the velocity target of Eq. 3)
    x0  = x_t - t v                     (one-step estimate)

Timesteps are floats in ``[0, 1]``. The *shift* ``s`` maps ``t -> s t / (1 + (s - 1) t)``, which moves mass toward
high noise (MirrorMe §4.1 trains with ``s = 17``). The shift a clip needs grows with its token count (more tokens
average the noise over more values, so a given ``t`` destroys less; SD3 §5.3.2, LTX-Video): with ``shift_tokens``
set, the training shift for ``n`` tokens is ``s * sqrt(n / shift_tokens)`` (SD3's resolution-dependent rule; shifts
compose by multiplication), so the paper's value stays the one anchor and a 192-token CPU clip trains at about 3
instead of 17. Sampling integrates the ODE from ``t = 1`` to ``0`` with Euler
steps on the same shifted grid, with classifier-free guidance through the shared :func:`apply_cfg`.

With ``prediction_type="sample"`` the network predicts ``x0`` (x-prediction, Li & He 2025, as in
:mod:`halfbody.models.schedulers`) and :meth:`RectifiedFlow.as_velocity` turns it into ``v = (x_t - x0_hat) / t``
(``t`` clamped at 0.05): a 128-wide token cannot carry the noise of a 1536-value patch-autoencoder token, but it can
carry the clean image.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from halfbody.models.schedulers import PREDICTION_TYPES, X_PREDICTION_MIN_SIGMA, DenoiseFn, apply_cfg

__all__ = ["RectifiedFlow", "shift_timesteps", "token_shift"]


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """``s t / (1 + (s - 1) t)``: the SD3 / LTX resolution-dependent shift (identity for ``s = 1``)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@functools.lru_cache(maxsize=64)
def _host_sigmas(num_steps: int, shift: float) -> tuple[float, ...]:
    """:meth:`RectifiedFlow.sigmas` as host floats, computed once per (steps, shift): a long video's later clips
    sample without touching a tensor outside the loop either."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be >= 1")
    return tuple(shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).tolist())


def token_shift(shift: float, num_tokens: int, anchor_tokens: int) -> float:
    """SD3's resolution-dependent shift (§5.3.2: ``alpha = sqrt(m / n)`` for ``m`` tokens against the ``n`` the shift was
    chosen for), composed with the anchor's shift: ``shift * sqrt(num_tokens / anchor_tokens)``."""
    if num_tokens < 1 or anchor_tokens < 1:
        raise ValueError(f"token counts must be >= 1, got {num_tokens} and {anchor_tokens}")
    return float(shift) * math.sqrt(num_tokens / anchor_tokens)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must be (B,) with B = {like.shape[0]}, got shape {tuple(t.shape)}")
    return t.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


class RectifiedFlow:
    """Training maths and the Euler/CFG sampler of a rectified-flow model.

    Args:
        shift: timestep shift used when drawing training timesteps (MirrorMe §4.1: 17).
        sample_shift: shift of the Euler sampling grid (the paper gives only the training shift; ``None``: the
            training shift). A large shift crowds a short grid near ``t = 1`` and leaves one long last step
            (shift 17, 15 steps: the last step goes from ``t = 0.55`` to 0), so presets use an SD3 / LTX-like 3.
        t_min: smallest training timestep (keeps the loss finite-weighted near data; 0 allows exact data).
        shift_tokens: the token count (latent frames x height x width) ``shift`` was chosen for; when set, training
            timesteps for ``n`` tokens use :func:`token_shift` (MirrorMe §4.1: shift 17 at 121 x 768 x 512 through
            LTX-Video's VAE, 16 x 24 x 16 = 6144 tokens). ``None``: ``shift`` at every size.
        prediction_type: what the network outputs: ``"v_prediction"`` (the velocity, the paper) or ``"sample"``
            (x-prediction, turned into the velocity by :meth:`as_velocity`).
    """

    def __init__(self, shift: float = 17.0, sample_shift: float | None = None, t_min: float = 0.0,
                 shift_tokens: int | None = None, prediction_type: str = "v_prediction") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} must be one of {PREDICTION_TYPES}")
        self.prediction_type = prediction_type
        if not shift > 0:
            raise ValueError(f"shift={shift!r} must be > 0")
        if sample_shift is not None and not sample_shift > 0:
            raise ValueError(f"sample_shift={sample_shift!r} must be > 0")
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"t_min={t_min!r} must lie in [0, 1)")
        self.shift = float(shift)
        self.sample_shift = self.shift if sample_shift is None else float(sample_shift)
        self.t_min = float(t_min)
        if shift_tokens is not None and int(shift_tokens) < 1:
            raise ValueError(f"shift_tokens={shift_tokens!r} must be >= 1 (or None)")
        self.shift_tokens = None if shift_tokens is None else int(shift_tokens)

    def training_shift(self, num_tokens: int | None = None) -> float:
        """The training shift for a clip of ``num_tokens`` tokens (``shift`` itself without a token rule)."""
        if self.shift_tokens is None or num_tokens is None:
            return self.shift
        return token_shift(self.shift, num_tokens, self.shift_tokens)

    # ------------------------------------------------------------------------------------------ training
    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None, num_tokens: int | None = None) -> torch.Tensor:
        """Shifted uniform timesteps ``(batch,)`` in ``[t_min, 1)``, float32 (drawn on the generator's device);
        ``num_tokens``: the clip's token count, for the token-dependent shift (:meth:`training_shift`)."""
        draw_device = generator.device if generator is not None else "cpu"
        u = torch.rand(batch, generator=generator, device=draw_device)
        t = shift_timesteps(u, self.training_shift(num_tokens))
        t = self.t_min + (1.0 - self.t_min) * t
        return t.to(device) if device is not None else t

    @staticmethod
    def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eq. 2: ``x_t = (1 - t) x0 + t eps``; ``t`` ``(B,)``."""
        tt = _expand(t, x0)
        return ((1.0 - tt) * x0.float() + tt * noise.float()).to(x0.dtype)

    @staticmethod
    def velocity_target(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """``u_t = eps - x0`` (independent of ``t`` for the linear path)."""
        return (noise.float() - x0.float()).to(x0.dtype)

    def as_velocity(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output as the velocity: itself, or for x-prediction ``(x_t - x0_hat) / max(t, 0.05)``."""
        if self.prediction_type == "v_prediction":
            return model_output
        v = (x_t.float() - model_output.float()) / _expand(t, x_t).clamp_min(X_PREDICTION_MIN_SIGMA)
        return v.to(model_output.dtype)

    @staticmethod
    def predict_x0(x_t: torch.Tensor, v_pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0_hat = x_t - t v``."""
        return (x_t.float() - _expand(t, x_t) * v_pred.float()).to(x_t.dtype)

    # ------------------------------------------------------------------------------------------ sampling
    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``num_steps + 1`` descending noise levels from 1 to 0 on the shifted grid."""
        if num_steps < 1:
            raise ValueError(f"num_steps={num_steps!r} must be >= 1")
        return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), self.sample_shift)

    @torch.no_grad()
    def euler_sample(self, denoise_fn: DenoiseFn, shape: tuple[int, ...], num_steps: int = 15,
                     guidance_scale: float = 2.5, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                     latents: torch.Tensor | None = None,
                     callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Integrate ``dx/dt = v`` from pure noise (``t = 1``) to data with ``num_steps`` Euler steps and CFG.

        ``denoise_fn(x_t, t, with_uncond)`` gets float timesteps ``(B,)`` in ``[0, 1]`` and returns ``v_cond`` or
        ``(v_cond, v_uncond)`` (see :data:`~halfbody.models.schedulers.DenoiseFn`). MirrorMe §4.1: 15 steps, CFG 2.5.
        """
        if latents is None:
            gen_device = generator.device if generator is not None else "cpu"
            latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        x = latents.to(device=device if device is not None else latents.device, dtype=dtype)
        sigmas = _host_sigmas(num_steps, float(self.sample_shift))  # host floats: nothing read back in the loop
        with_uncond = guidance_scale != 1.0
        for i in range(num_steps):
            t, t_next = sigmas[i], sigmas[i + 1]
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
            out = denoise_fn(x, t_batch, with_uncond)
            if with_uncond:
                if not isinstance(out, (tuple, list)) or len(out) != 2:
                    raise TypeError("denoise_fn(x_t, t, with_uncond=True) must return (v_cond, v_uncond)")
                v = apply_cfg(out[0], out[1], guidance_scale)
            else:
                v = out
            x = (x.float() + (t_next - t) * v.float()).to(dtype)
            if callback is not None:
                callback(i, t_next, x)
        return x
