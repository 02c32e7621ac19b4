"""The audio-to-pose model's motion representation: arm and hand keypoints as offsets from the reference pose.

The model generates the COCO-WholeBody points that drive EchoMimicV2's P_hands condition (§3.2.1) and MirrorMe's
hand guider (§3.2), plus the arms that carry them: :data:`POSE_POINTS` = elbows (7, 8), wrists (9, 10), left hand
(91-111) and right hand (112-132): 46 points, 92 numbers per frame. A frame is encoded as its offset from the
reference pose, divided by ``scale`` (frame-width units: 0.1 maps a typical gesture excursion to ~1, the scale of the
flow's noise), so every sequence starts near 0 from the reference's own pose and "no motion" is exactly 0.
"""

from __future__ import annotations

import torch

from halfbody.data.keypoints import LEFT_HAND, NUM_KEYPOINTS, RIGHT_HAND

POSE_POINTS = (7, 8, 9, 10) + LEFT_HAND + RIGHT_HAND
NUM_POSE_POINTS = len(POSE_POINTS)  # 46
POSE_DIM = 2 * NUM_POSE_POINTS  # 92
# what the reference pose tells the model (besides the generated points): nose, eyes, ears, shoulders, hips
CONTEXT_POINTS = (0, 1, 2, 3, 4, 5, 6, 11, 12)
REFERENCE_DIM = 3 * (NUM_POSE_POINTS + len(CONTEXT_POINTS))
SCORE_THRESHOLD = 0.3


def encode(kpts: torch.Tensor, ref: torch.Tensor, scale: float) -> torch.Tensor:
    """``kpts`` ``(B, T, 133, 3)``, ``ref`` ``(B, 133, 3)`` -> motion ``(B, T, 92)``: ``(xy - ref_xy) / scale``."""
    idx = list(POSE_POINTS)
    d = (kpts[..., idx, :2] - ref[:, None, idx, :2]) / scale
    return d.flatten(-2)


def decode(motion: torch.Tensor, ref: torch.Tensor, scale: float) -> torch.Tensor:
    """Motion ``(B, T, 92)`` -> keypoints ``(B, T, 133, 3)``: the generated points at ``ref + scale * motion`` with
    the reference's scores, every other point held at the reference."""
    b, t = motion.shape[:2]
    out = ref[:, None].expand(b, t, NUM_KEYPOINTS, 3).clone()
    idx = list(POSE_POINTS)
    out[..., idx, :2] = ref[:, None, idx, :2] + scale * motion.reshape(b, t, NUM_POSE_POINTS, 2).to(ref.dtype)
    return out


def visibility(kpts: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``(B, T, 92)`` loss weights: 1 where the point is visible both in the frame and in the reference."""
    idx = list(POSE_POINTS)
    ok = (kpts[..., idx, 2] >= SCORE_THRESHOLD) & (ref[:, None, idx, 2] >= SCORE_THRESHOLD)
    return ok.to(kpts.dtype).repeat_interleave(2, dim=-1)


def reference_features(ref: torch.Tensor) -> torch.Tensor:
    """``(B, 133, 3)`` -> ``(B, REFERENCE_DIM)``: the reference's generated and context points, centred
    (``xy - 0.5``), with their scores; invisible points are zeroed."""
    idx = list(POSE_POINTS) + list(CONTEXT_POINTS)
    p = ref[:, idx]
    ok = (p[..., 2:] >= SCORE_THRESHOLD).to(p.dtype)
    return torch.cat([(p[..., :2] - 0.5) * ok, ok], dim=-1).flatten(1)
