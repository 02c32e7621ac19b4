"""Timestep bands: EchoMimicV2's three denoising phases as ranges of training timesteps (§3.5, §4.1).

The paper splits *the denoising process* into a pose-dominant phase S1 ("early"), a detail-dominant phase S2
("middle") and a quality-dominant phase S3 ("final"). §4.1: "the scope of S1 is the early 10% timesteps, the scope
of S2 is the following 60% timesteps, and the rest timesteps is divided into S3".

"Early" refers to *sampling* order. Sampling runs from the noisiest timestep ``T - 1`` down to ``0``, so the early
phase is the **high-t** end of the training range:

    S1 (pose,    early 10%):  t in [0.9 T, T)      e.g. T = 1000: 900 ... 999
    S2 (detail,  next 60%):   t in [0.3 T, 0.9 T)  e.g. 300 ... 899
    S3 (quality, last 30%):   t in [0, 0.3 T)      e.g.   0 ... 299

Bands are described by their fractions, listed from the noisiest band down; the boundaries are
``round(T * (1 - cumulative fraction))`` so that float sums such as ``0.1 + 0.6`` give exact integers.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["TimestepBands", "PAPER_BAND_FRACTIONS"]

#: EchoMimicV2 §4.1, noisiest band first.
PAPER_BAND_FRACTIONS: dict[str, float] = {"S1": 0.1, "S2": 0.6, "S3": 0.3}


class TimestepBands:
    """Named, contiguous, non-overlapping timestep ranges covering ``[0, T)``.

    Args:
        num_train_timesteps: ``T`` of the noise scheduler.
        fractions: band name -> fraction of ``T``, **ordered from the noisiest (early sampling) band to the cleanest**;
            positive, summing to 1. Default: the paper's ``{"S1": 0.1, "S2": 0.6, "S3": 0.3}``.
    """

    def __init__(self, num_train_timesteps: int = 1000, fractions: Mapping[str, Any] | None = None) -> None:
        fractions = dict(PAPER_BAND_FRACTIONS if fractions is None else fractions)
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not fractions:
            raise ValueError("TimestepBands needs at least one band")
        values = {str(k): float(v) for k, v in fractions.items()}
        bad = {k: v for k, v in values.items() if not v > 0}
        if bad:
            raise ValueError(f"band fractions must be > 0, got {bad}")
        total = sum(values.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"band fractions must sum to 1, got {values} (sum {total:.6g})")
        self.num_train_timesteps = int(num_train_timesteps)
        self.fractions = values
        T = self.num_train_timesteps
        ranges: dict[str, tuple[int, int]] = {}
        hi, cum = T, 0.0
        for name, frac in values.items():
            cum += frac
            lo = max(0, int(round(T * (1.0 - cum))))
            if lo >= hi:
                raise ValueError(f"band {name!r} (fraction {frac}) is empty for T={T}")
            ranges[name] = (lo, hi)
            hi = lo
        ranges[name] = (0, ranges[name][1])  # the cleanest band always reaches t = 0
        self._ranges = ranges

    @property
    def names(self) -> tuple[str, ...]:
        """Band names, noisiest first."""
        return tuple(self._ranges)

    def ranges(self) -> dict[str, tuple[int, int]]:
        """``{name: (t_min, t_max)}`` with ``t`` in ``[t_min, t_max)``: the arguments of
        ``VPredictionDDIM.sample_timesteps(t_min=..., t_max=...)``."""
        return dict(self._ranges)

    def band_masks(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: bool (B,)}``: which timesteps of ``t`` (integers in ``[0, T)``, shape ``(B,)``) fall in each band."""
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be an integer tensor, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got min {int(t.min())}, "
                             f"max {int(t.max())}")
        return {name: (t >= lo) & (t < hi) for name, (lo, hi) in self._ranges.items()}

    def band_of(self, t: int) -> str:
        """The band name of one integer timestep."""
        masks = self.band_masks(torch.tensor([int(t)]))
        return next(name for name, m in masks.items() if bool(m[0]))

    def describe(self) -> str:
        inner = ", ".join(f"{n}: t in [{lo}, {hi})" for n, (lo, hi) in self._ranges.items())
        return f"TimestepBands(T={self.num_train_timesteps}; {inner})"

    __repr__ = describe
