"""Speech-like audio whose loudness envelope is known exactly.

The audio is a pitched carrier (the identity's f0 with a few harmonics, slight vibrato and a slow
intonation drift) multiplied by a syllable envelope ``e(t)`` in ``[0, 1]``: one ``sin(pi x)`` bump per
syllable at 3-6 syllables per second with random timing, amplitude and pauses. ``e(t)`` is the ground
truth that drives the mouth (``opening = e(t_frame)``, see ``render.py``) and, low-passed, the head sway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from halfbody.data.media import AUDIO_SAMPLE_RATE

from .identity import Identity

AUDIO_GAIN = 0.6  # peak amplitude of the voiced carrier at e = 1
NOISE_FLOOR = 0.002  # std of the background hiss (keeps silence from being digitally exact)
SWAY_TIME_CONSTANT = 0.3  # seconds, one-pole low-pass of e(t) that drives the head sway


@dataclass(frozen=True)
class Syllables:
    """Syllable bumps: ``e(t) = sum_i amp_i * sin(pi (t - start_i) / dur_i)`` on ``[start_i, start_i + dur_i]``."""

    start: np.ndarray
    dur: np.ndarray
    amp: np.ndarray

    def envelope(self, t: np.ndarray) -> np.ndarray:
        """``e(t)`` in ``[0, 1]`` at arbitrary times (seconds)."""
        t = np.asarray(t, dtype=np.float64)
        out = np.zeros_like(t)
        for s, d, a in zip(self.start, self.dur, self.amp):
            x = (t - s) / d
            inside = (x > 0) & (x < 1)
            out[inside] += a * np.sin(np.pi * x[inside])
        return np.clip(out, 0.0, 1.0)


def sample_syllables(rng: np.random.Generator, duration: float, rate: float) -> Syllables:
    """Random syllable timing: per-syllable rate jittered in 3-6 Hz around ``rate``; ~12 % pauses of 0.15-0.5 s (never two in a row)."""
    starts, durs, amps = [], [], []
    t = rng.uniform(0.0, 0.2)
    paused = False
    while t < duration:
        if not paused and rng.random() < 0.12:  # a pause, never two in a row
            t += rng.uniform(0.15, 0.5)
            paused = True
            continue
        paused = False
        period = 1.0 / float(np.clip(rate * rng.uniform(0.75, 1.3), 3.0, 6.0))
        starts.append(t)
        durs.append(period * rng.uniform(0.65, 0.95))  # shorter than the period: bumps never overlap
        amps.append(rng.uniform(0.5, 1.0))
        t += period
    return Syllables(np.asarray(starts), np.asarray(durs), np.asarray(amps))


def synthesize_voice(identity: Identity, syllables: Syllables, num_samples: int, rng: np.random.Generator,
                     sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 audio in ``[-1, 1]``: ``AUDIO_GAIN * e(t) * carrier(t) + hiss``."""
    t = np.arange(num_samples, dtype=np.float64) / sample_rate
    drift = 0.06 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t + rng.uniform(0, 2 * np.pi))
    vibrato = identity.vibrato_depth * np.sin(2 * np.pi * identity.vibrato_rate * t + rng.uniform(0, 2 * np.pi))
    f = identity.f0 * (1.0 + drift + vibrato)
    phase = 2 * np.pi * np.cumsum(f) / sample_rate
    carrier = sum(a * np.sin((k + 1) * phase) for k, a in enumerate(identity.harmonics))
    carrier /= sum(identity.harmonics)  # |carrier| <= 1
    audio = AUDIO_GAIN * syllables.envelope(t) * carrier + NOISE_FLOOR * rng.standard_normal(num_samples)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def sway_signal(syllables: Syllables, times: np.ndarray, tau: float = SWAY_TIME_CONSTANT) -> np.ndarray:
    """Causal one-pole low-pass of ``e(t)`` (time constant ``tau``) evaluated at ``times``; in ``[0, 1]``."""
    times = np.asarray(times, dtype=np.float64)
    dt = 0.005
    grid = np.arange(0.0, float(times.max(initial=0.0)) + 2 * dt, dt)
    e = syllables.envelope(grid)
    alpha = dt / (tau + dt)
    s = lfilter([alpha], [1.0, alpha - 1.0], e)  # s[n] = s[n-1] + alpha (e[n] - s[n-1]), s[-1] = 0
    return np.interp(times, grid, s)
