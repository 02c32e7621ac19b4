"""HKC and HKV: hand keypoint confidence and variance (EchoMimicV2 §4.1, MirrorMe §4.1; introduced by CyberHost).

The papers define them in one sentence each ("HKC (Hand Keypoint Confidence) averages is adopted to evaluate hand
quality ..., HKV (Hand Keypoint Variance) is calculated to indicate the richness of hand movements") and publish no
script, so the protocol pins them (docs/EVALUATION.md):

- **HKC** = the mean DWPose confidence of the 42 hand keypoints (COCO-WholeBody 91-132) over all frames of a
  generated video: a pose estimator is confident on well-formed hands and unsure on smeared ones.
- **HKV** = the temporal variance of the hand keypoint positions: for each of the 42 hand keypoints, the variance
  over the frames where it is found (score >= ``protocol.keypoint_score``, at least 2 such frames) of its x and y in
  pixels of the protocol frame (``protocol.resolution``), summed over x and y; then the mean over keypoints.
  A hand that never moves scores 0.

Both are per-video values averaged over videos. The keypoints are measured on the generated frames (DWPose through
``data_pipelines.video_to_shards``' extractor, or a keypoint sidecar written beside the video), never taken from the
driving pose.
"""

from __future__ import annotations

import numpy as np

__all__ = ["HANDS", "hand_keypoint_confidence", "hand_keypoint_variance"]

HANDS = slice(91, 133)


def _check(kpts) -> np.ndarray:
    k = np.asarray(kpts, np.float64)
    if k.ndim != 3 or k.shape[1:] != (133, 3):
        raise ValueError(f"keypoints must be (T, 133, 3), got shape {k.shape}")
    return k


def hand_keypoint_confidence(kpts) -> float:
    """HKC of one video: mean score of the 42 hand keypoints over all frames."""
    return float(_check(kpts)[:, HANDS, 2].mean())


def hand_keypoint_variance(kpts, size: float, score: float = 0.3) -> float:
    """HKV of one video: mean over hand keypoints of ``var(x) + var(y)`` (pixels of a ``size``-pixel frame) over the
    frames where the keypoint is found; ``nan`` when no keypoint is found in 2 frames."""
    h = _check(kpts)[:, HANDS]
    values = []
    for j in range(h.shape[1]):
        ok = h[:, j, 2] >= score
        if ok.sum() >= 2:
            xy = h[ok, j, :2] * size
            values.append(float(xy.var(axis=0).sum()))
    return float(np.mean(values)) if values else float("nan")
