"""Gesture metrics on keypoint sequences (co-speech gesture literature), beside the pixel oracle metrics.

All of them take COCO-WholeBody keypoints ``(T, 133, 3)`` (x, y in ``[0, 1]`` of the frame, score) and look at the
*arm and hand* points that the audio-to-pose model generates (:data:`ARM_HAND_POINTS`: elbows, wrists, 2 x 21
hand points); points whose score is below :data:`SCORE_THRESHOLD` are left out.

- **Beat alignment** (:func:`beat_alignment`): the Beat Align Score of AI Choreographer (Li et al. 2021, §5.1),
  used for co-speech gestures by BEAT (Liu et al. 2022, §5) and DiffGesture (Zhu et al. 2023, §4):
  ``BA = 1/|B_m| sum_{m in B_m} exp(-min_{a in B_a} (m - a)^2 / (2 sigma^2))`` over the *motion beats* ``B_m``
  (local minima of the hands' speed, i.e. stroke apexes and holds, with a prominence threshold so that jitter does
  not count as a beat) against the *audio beats* ``B_a`` (onsets: peaks of the rising RMS envelope). ``sigma``
  defaults to 0.05 s (syllables here come at 3-6 Hz, so the 0.3 s of dance beats would score anything as aligned).
  The control is the same motion against *another* clip's audio (``beat_alignment_mismatched`` of
  :func:`gesture_metrics`).
- **Diversity**: how much the hands move (mean over points of the temporal standard deviation of their position,
  frame-width units; 0 for a static pose; the "Diversity" of BEAT / DiffGesture is a distance between motion
  features, this is its per-clip keypoint form), and the distance between two samples for the same audio
  (:func:`sample_diversity`: gestures are many-to-one, a regressor to the mean has 0).
- **Keypoint FID** (:func:`frechet_distance`): the Fréchet distance between Gaussians fitted to generated and
  ground-truth features, on static poses (``fd_pose``) and on velocities (``fd_kinematic``): Audio2Photoreal's
  FD_g / FD_k (Ng et al. 2024, §5), on keypoints instead of a learned gesture encoder (FGD, Yoon et al. 2020).
- **Jitter**: mean magnitude of the third time derivative (jerk), frame-width units / s^3.

:func:`gesture_metrics` computes them for a batch (validation of ``family=audio2pose`` logs them as
``val/gesture/*``; ``python -m halfbody.evaluate`` reports them as ``gesture/*`` for generated videos with a
``<stem>.pose.npy`` from ``generate pose=auto`` against the ground truth's keypoints, ``metrics/evaluation.py``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import find_peaks

from halfbody.data.keypoints import LEFT_HAND, RIGHT_HAND
from halfbody.data.media import AUDIO_SAMPLE_RATE

ARM_HAND_POINTS = (7, 8, 9, 10) + LEFT_HAND + RIGHT_HAND  # elbows, wrists, 2 x 21 hand points
SCORE_THRESHOLD = 0.3
BEAT_SIGMA = 0.05  # seconds
BEAT_PROMINENCE = 0.05  # frame widths / s: a speed minimum must be this far below its neighbouring maxima ...
BEAT_RELATIVE = 0.5  # ... and this fraction of the clip's 90th-percentile speed
GESTURE_METRICS = ("beat_alignment", "beat_alignment_mismatched", "gt_beat_alignment", "diversity", "gt_diversity",
                   "sample_diversity", "fd_pose", "fd_kinematic", "jitter", "gt_jitter")


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def arm_hand_tracks(kpts, visible=None) -> tuple[np.ndarray, np.ndarray]:
    """``(T, P, 2)`` positions of the arm and hand points and a ``(P,)`` mask of the points visible in every frame
    (``visible``: ``(133,)`` scores to decide with instead, e.g. the ground truth's)."""
    k = _np(kpts)
    if k.ndim != 3 or k.shape[1:] != (133, 3):
        raise ValueError(f"gestures: keypoints must be (T, 133, 3), got {k.shape}")
    pts = k[:, ARM_HAND_POINTS]
    scores = pts[..., 2].min(0) if visible is None else _np(visible)[list(ARM_HAND_POINTS)]
    return pts[..., :2], scores >= SCORE_THRESHOLD


def hand_speed(kpts, fps: float, visible=None) -> np.ndarray:
    """``(T - 1,)`` mean speed of the visible arm and hand points, frame widths per second."""
    pos, ok = arm_hand_tracks(kpts, visible)
    if not ok.any() or pos.shape[0] < 2:
        return np.zeros(max(pos.shape[0] - 1, 0))
    v = np.linalg.norm(np.diff(pos[:, ok], axis=0), axis=-1) * fps
    return v.mean(1)


def motion_beats(kpts, fps: float, prominence: float = BEAT_PROMINENCE, relative: float = BEAT_RELATIVE,
                 visible=None) -> np.ndarray:
    """Times (seconds) of the kinematic beats: local minima of the hands' speed whose prominence is at least
    ``max(prominence, relative * p90)`` (``p90``: the clip's 90th-percentile speed), so that jitter and wobbles
    within a movement are not beats."""
    speed = hand_speed(kpts, fps, visible)
    if speed.size < 3:
        return np.zeros(0)
    idx, _ = find_peaks(-speed, prominence=max(prominence, relative * float(np.percentile(speed, 90))))
    return (idx + 0.5) / fps  # speed[i] is measured between frames i and i + 1


def audio_onsets(audio, hop_s: float = 0.01, win_s: float = 0.02, min_gap_s: float = 0.1,
                 rel_height: float = 0.1) -> np.ndarray:
    """Onset times (seconds) of 16 kHz mono audio: peaks of the positive slope of its RMS envelope."""
    a = _np(audio).reshape(-1)
    hop, win = int(round(hop_s * AUDIO_SAMPLE_RATE)), int(round(win_s * AUDIO_SAMPLE_RATE))
    n = 1 + max(0, (a.size - win) // hop)
    if a.size < win or n < 3:
        return np.zeros(0)
    c = np.concatenate([[0.0], np.cumsum(a * a)])
    starts = np.arange(n) * hop
    rms = np.sqrt(np.maximum(c[starts + win] - c[starts], 0.0) / win)
    rise = np.maximum(np.diff(rms), 0.0)
    if rise.max(initial=0.0) <= 1e-6:
        return np.zeros(0)
    idx, _ = find_peaks(rise, height=rel_height * rise.max(), distance=max(1, int(min_gap_s / hop_s)))
    return (idx * hop + win / 2 + hop / 2) / AUDIO_SAMPLE_RATE


def beat_alignment(motion_times, audio_times, sigma: float = BEAT_SIGMA) -> float:
    """The Beat Align Score over motion beats (see the module docstring); nan without beats on either side."""
    m, a = np.asarray(motion_times, np.float64), np.asarray(audio_times, np.float64)
    if m.size == 0 or a.size == 0:
        return float("nan")
    d = np.abs(m[:, None] - a[None]).min(1)
    return float(np.exp(-d ** 2 / (2 * sigma ** 2)).mean())


def diversity(kpts, visible=None) -> float:
    """Mean over the visible arm / hand points of their position's temporal standard deviation (0 when static)."""
    pos, ok = arm_hand_tracks(kpts, visible)
    if not ok.any():
        return float("nan")
    return float(np.linalg.norm(pos[:, ok] - pos[:, ok].mean(0), axis=-1).mean())


def sample_diversity(kpts_a, kpts_b, visible=None) -> float:
    """Mean distance between two samples' arm / hand points, frame by frame (two draws for the same audio)."""
    pa, ok = arm_hand_tracks(kpts_a, visible)
    pb, _ = arm_hand_tracks(kpts_b, visible)
    if not ok.any():
        return float("nan")
    return float(np.linalg.norm(pa[:, ok] - pb[:, ok], axis=-1).mean())


def jitter(kpts, fps: float, visible=None) -> float:
    """Mean jerk magnitude of the visible arm / hand points (frame widths / s^3)."""
    pos, ok = arm_hand_tracks(kpts, visible)
    if not ok.any() or pos.shape[0] < 4:
        return float("nan")
    return float(np.linalg.norm(np.diff(pos[:, ok], n=3, axis=0), axis=-1).mean() * fps ** 3)


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``x`` ``(N, D)`` and ``y`` ``(M, D)``."""
    from scipy import linalg

    x, y = _np(x), _np(y)
    if x.shape[0] < 2 or y.shape[0] < 2:
        return float("nan")
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean, _ = linalg.sqrtm(cx @ cy, disp=False)
    if not np.isfinite(covmean).all():  # a singular product: regularise (as the FID reference code does)
        eps = 1e-6 * np.eye(cx.shape[0])
        covmean = linalg.sqrtm((cx + eps) @ (cy + eps))
    covmean = np.real(covmean)
    return float(((mx - my) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.trace(covmean))


def _features(seqs, fps: float, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pose, kin = [], []
    for k in seqs:
        pos, _ = arm_hand_tracks(k)
        p = pos[:, ok].reshape(pos.shape[0], -1)
        pose.append(p)
        kin.append(np.diff(p, axis=0) * fps)
    return np.concatenate(pose), np.concatenate(kin)


def gesture_metrics(generated, target, audio, fps: float, second_sample=None) -> dict[str, float]:
    """The gesture metrics of a batch: ``generated`` / ``target`` ``(B, T, 133, 3)`` keypoints (or lists of ``B``
    ``(T_i, 133, 3)`` sequences, clip ``i``'s two of equal length), ``audio`` ``(B, S)`` (or a list) 16 kHz audio of
    the clips (frame ``f`` at ``f / fps`` seconds), ``second_sample`` optional ``(B, T, 133, 3)`` other draws for
    the same audio (``sample_diversity``). Points are those visible in the target's first frame.

    ``beat_alignment_mismatched`` is the control: each clip's motion against the next clip's audio beats (needs
    ``B >= 2``). Keys: :data:`GESTURE_METRICS` (nan where not measurable)."""
    gen, tgt = [_np(g) for g in generated], [_np(t) for t in target]
    b = len(gen)
    onsets = [audio_onsets(audio[i]) for i in range(b)]
    out = {k: [] for k in GESTURE_METRICS}
    for i in range(b):
        vis = tgt[i][0, :, 2]
        beats = motion_beats(gen[i], fps, visible=vis)
        out["beat_alignment"].append(beat_alignment(beats, onsets[i]))
        if b > 1:
            out["beat_alignment_mismatched"].append(beat_alignment(beats, onsets[(i + 1) % b]))
        out["gt_beat_alignment"].append(beat_alignment(motion_beats(tgt[i], fps, visible=vis), onsets[i]))
        out["diversity"].append(diversity(gen[i], vis))
        out["gt_diversity"].append(diversity(tgt[i], vis))
        if second_sample is not None:
            out["sample_diversity"].append(sample_diversity(gen[i], _np(second_sample[i]), vis))
        out["jitter"].append(jitter(gen[i], fps, vis))
        out["gt_jitter"].append(jitter(tgt[i], fps, vis))
    ok = np.stack([t[0, list(ARM_HAND_POINTS), 2] >= SCORE_THRESHOLD for t in tgt]).all(0)
    result = {k: _nanmean(v) for k, v in out.items()}
    if ok.any():
        gp, gk = _features(gen, fps, ok)
        tp, tk = _features(tgt, fps, ok)
        result["fd_pose"], result["fd_kinematic"] = frechet_distance(gp, tp), frechet_distance(gk, tk)
    return result


def _nanmean(values) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return float(v.mean()) if v.size else float("nan")
