"""Co-speech beat gestures of the synthetic talker world (a world parameter: ``WorldConfig.gestures``).

Off by default (the default world's hands follow smooth random trajectories, independent of the speech). With
``gestures=True`` the hands make *beat gestures* (McNeill's beats: small rhythmic strokes that mark prosodic
stress), so that a model can learn hand motion from audio (docs/AUDIO2POSE.md):

- **Strokes follow syllable onsets.** Syllable ``i`` (``audio.Syllables``: onset ``s_i``, amplitude ``a_i``) is
  stressed when ``a_i >= style.stress_threshold``; each stressed syllable makes one stroke whose *apex* (the
  lowest point of the beat, where the hands stop) is at ``s_i + style.lag``, ``a_i * style.amplitude`` along the
  stroke direction from the gesture-space centre (rest, raised by ``style.raise_height``).
- **Between two apexes the hands loop** back up (``0.9`` stroke amplitudes) and across (``0.35``) on an
  ease-in / ease-out clock (:func:`beat_cycle`): they stop *only* at the apexes, so the kinematic beats (speed
  minima, the beat alignment metric's motion beats) are the strokes. The fingers open at each apex.
- **Per-identity style** (``gesture_style``, deterministic in ``(seed, identity index)``, a stream separate from the
  identity's and the clip's randomness): dominant hand (left, right or both; the other hand strokes at
  ``style.other_hand`` of the amplitude), amplitude, stroke direction, stress threshold, lag, raise height
  (``width`` is kept for the record).
- A small smooth drift (``0.006`` world units) keeps the hands alive; before the first stroke and after the last
  they hold.

The wrists stay inside the same boxes as the default world's, so the shard schema, the keypoints' visibility and
the renderer are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .audio import Syllables

_GESTURE_STREAM = 0x6E57  # SeedSequence tag: gesture styles draw apart from identities and clips
DRIFT = 0.006  # world units: the smooth drift between strokes
LOOP_LIFT = 0.9  # how far the hand comes back up between strokes, in stroke amplitudes
LOOP_SWING = 0.35  # the loop's width across the stroke axis, in stroke amplitudes
CURL_OPEN = 0.35  # finger curl removed at a stroke's apex
X_BOX = {"left": (0.56, 0.92), "right": (0.08, 0.44)}  # the default world's wrist boxes (world x)
Y_BOX = (0.58, 0.92)


@dataclass(frozen=True)
class GestureStyle:
    """One identity's beat-gesture style."""

    dominant: str  # "left" | "right" | "both"
    other_hand: float  # stroke amplitude of the non-dominant hand, relative
    amplitude: float  # world units at syllable amplitude 1
    direction: float  # stroke direction, radians from straight down, positive = outward
    stress_threshold: float  # syllables at least this loud make a stroke
    lag: float  # seconds from the syllable onset to the stroke apex
    width: float  # seconds, the stroke's Gaussian width
    raise_height: float  # world units the gesture space sits above the rest pose

    def to_json(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def gesture_style(seed: int, identity_index: int) -> GestureStyle:
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _GESTURE_STREAM, int(identity_index)]))
    dominant = str(rng.choice(["left", "right", "both"]))
    return GestureStyle(
        dominant=dominant, other_hand=float(rng.uniform(0.3, 0.6)) if dominant != "both" else 1.0,
        amplitude=float(rng.uniform(0.07, 0.11)), direction=float(rng.uniform(-0.35, 0.6)),
        stress_threshold=float(rng.uniform(0.55, 0.75)), lag=float(rng.uniform(0.0, 0.06)),
        width=float(rng.uniform(0.045, 0.065)), raise_height=float(rng.uniform(0.04, 0.08)))


def stroke_times(syllables: Syllables, style: GestureStyle) -> tuple[np.ndarray, np.ndarray]:
    """Apex times (seconds) and amplitudes of the strokes: one per stressed syllable."""
    stressed = syllables.amp >= style.stress_threshold
    return syllables.start[stressed] + style.lag, syllables.amp[stressed]


def beat_cycle(t: np.ndarray, apex: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stroke index ``i`` and cycle phase ``phi`` in ``[0, 1]`` at times ``t``: between apexes ``i`` and
    ``i + 1``, ``phi = (1 - cos(pi u)) / 2`` with ``u`` the linear fraction of the interval (an ease-in / ease-out
    warp, so the hand stops *only* at an apex). Before the first apex and after the last the phase is 0 (held)."""
    idx = np.clip(np.searchsorted(apex, t, side="right") - 1, 0, max(apex.size - 1, 0))
    phi = np.zeros_like(t)
    inside = (t >= apex[0]) & (t < apex[-1]) if apex.size > 1 else np.zeros(t.shape, bool)
    i = idx[inside]
    u = (t[inside] - apex[i]) / (apex[i + 1] - apex[i])
    phi[inside] = (1.0 - np.cos(np.pi * u)) / 2.0
    return idx, phi


def beat_gestures(syllables: Syllables, style: GestureStyle, rest: dict, t: np.ndarray,
                  rng: np.random.Generator) -> tuple[dict, dict, np.ndarray]:
    """Wrist positions ``{side: (T, 2)}`` (world units) and finger curls ``{side: (T,)}`` at the frame times ``t``,
    and the stroke apex times. ``rest``: the identity's wrist rest positions (``Layout.wrist_rest``)."""
    apex, amp = stroke_times(syllables, style)
    t = np.asarray(t, np.float64)
    if apex.size == 0:  # nothing stressed: hands at rest, drifting
        apex, amp = np.array([t[-1] + 1.0]), np.array([0.0])
    idx, phi = beat_cycle(t, apex)
    nxt = np.minimum(idx + 1, apex.size - 1)
    level = (1.0 - phi) * amp[idx] + phi * amp[nxt]  # the stroke depth, interpolated between apexes
    lift = np.sin(np.pi * phi)  # back up along the stroke axis between two strokes
    swing = np.sin(2 * np.pi * phi)  # and across it: a loop, so the speed is never zero between apexes
    wrists, curls = {}, {}
    for side in ("left", "right"):
        gain = 1.0 if style.dominant in (side, "both") else style.other_hand
        outward = 1.0 if side == "left" else -1.0  # the person's left is the image right (x grows)
        d = np.array([outward * math.sin(style.direction), math.cos(style.direction)])  # y grows downwards
        perp = np.array([-d[1], d[0]])
        drift = np.stack([_smooth(rng, t), _smooth(rng, t)], 1) * DRIFT
        a = gain * style.amplitude
        w = (np.asarray(rest[side])[None] - np.array([0.0, style.raise_height])[None] + drift
             + a * (level - LOOP_LIFT * lift)[:, None] * d[None] + a * LOOP_SWING * swing[:, None] * perp[None])
        w[:, 0] = np.clip(w[:, 0], *X_BOX[side])
        w[:, 1] = np.clip(w[:, 1], *Y_BOX)
        wrists[side] = w
        curls[side] = np.clip(0.4 - CURL_OPEN * gain * (1.0 - lift) * level, 0.0, 1.0)
    return wrists, curls, apex if amp.any() else np.zeros(0)


def _smooth(rng: np.random.Generator, t: np.ndarray, terms: int = 2) -> np.ndarray:
    a = rng.uniform(0.5, 1.0, terms)
    f = rng.uniform(0.1, 0.4, terms)
    ph = rng.uniform(0.0, 2 * np.pi, terms)
    return (a[None] * np.sin(2 * np.pi * f[None] * t[:, None] + ph[None])).sum(1) / a.sum()
