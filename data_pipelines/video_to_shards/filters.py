"""Clip filters. Each returns None (keep) or a one-line reason ``category: detail`` that names its threshold key.

The categories (``exactly one person`` is two: ``no person`` / ``more than one person``; ``face not visible``;
``low keypoint confidence``; ``audio silent``) are what the manifest counts. Clip length and camera cuts are
decided while cutting (``scenes.py``).
"""

from __future__ import annotations

import numpy as np

from halfbody.data.keypoints import FACE
from halfbody.data.media import AUDIO_SAMPLE_RATE

from .config import FilterConfig

CONFIDENCE_POINTS = (0, 1, 2, 3, 4, 5, 6)  # nose, eyes, ears, shoulders (COCO-17)


def _db(x: float) -> float:
    return float(20.0 * np.log10(max(x, 1e-10)))


def audio_reason(audio: np.ndarray, f: FilterConfig, sample_rate: int = AUDIO_SAMPLE_RATE) -> str | None:
    """Silent (overall RMS level) or nearly silent (too few active 100 ms windows) audio."""
    a = np.asarray(audio, dtype=np.float64)
    if a.size == 0:
        return "audio silent: no samples"
    level = _db(float(np.sqrt(np.mean(a * a))))
    if level < f.min_audio_dbfs:
        return f"audio silent: RMS {level:.1f} dBFS (< filters.min_audio_dbfs={f.min_audio_dbfs:g})"
    win = sample_rate // 10
    n = a.size // win
    if n >= 1:
        rms = np.sqrt(np.mean(a[: n * win].reshape(n, win) ** 2, axis=1))
        active = float(np.mean(20.0 * np.log10(np.maximum(rms, 1e-10)) >= f.active_dbfs))
        if active < f.min_active_fraction:
            return (f"audio silent: {active:.0%} of 100 ms windows reach filters.active_dbfs={f.active_dbfs:g} "
                    f"(< filters.min_active_fraction={f.min_active_fraction:g})")
    return None


def people_reason(persons: np.ndarray, f: FilterConfig) -> str | None:
    """Exactly one person in at least ``min_single_person_fraction`` of the frames."""
    p = np.asarray(persons)
    one = float(np.mean(p == 1)) if p.size else 0.0
    if one >= f.min_single_person_fraction:
        return None
    none, many = float(np.mean(p == 0)), float(np.mean(p > 1))
    thr = f"filters.min_single_person_fraction={f.min_single_person_fraction:g}"
    if many >= none:
        return (f"more than one person: up to {int(p.max())} people, several in {many:.0%} of frames, one person in "
                f"{one:.0%} (< {thr})")
    return f"no person: none in {none:.0%} of frames, one person in {one:.0%} (< {thr})"


def face_reason(kpts: np.ndarray, f: FilterConfig) -> str | None:
    """The face (at least ``min_face_points`` of 68 face points visible) in ``min_face_fraction`` of the frames."""
    vis = (np.asarray(kpts)[:, list(FACE), 2] >= f.score_threshold).sum(1)
    frac = float(np.mean(vis >= f.min_face_points)) if vis.size else 0.0
    if frac < f.min_face_fraction:
        return (f"face not visible: in {frac:.0%} of frames (>= filters.min_face_points={f.min_face_points} of 68 "
                f"points; < filters.min_face_fraction={f.min_face_fraction:g})")
    return None


def confidence_reason(kpts: np.ndarray, f: FilterConfig) -> str | None:
    """Mean score of nose, eyes, ears and shoulders over the clip."""
    s = float(np.mean(np.asarray(kpts)[:, list(CONFIDENCE_POINTS), 2])) if len(kpts) else 0.0
    if s < f.min_keypoint_confidence:
        return (f"low keypoint confidence: mean score {s:.2f} of nose/eyes/ears/shoulders "
                f"(< filters.min_keypoint_confidence={f.min_keypoint_confidence:g})")
    return None


def keypoint_reason(kpts: np.ndarray, persons: np.ndarray, f: FilterConfig) -> str | None:
    """The keypoint filters in order: people, face, confidence."""
    return people_reason(persons, f) or face_reason(kpts, f) or confidence_reason(kpts, f)
