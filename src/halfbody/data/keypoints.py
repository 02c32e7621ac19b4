"""COCO-WholeBody-133 keypoint layout (DWPose / RTMW order) and the keypoint groups of the pose conditions.

The index ranges are the public shard contract (shared/DESIGN.md §1). The groups are what EchoMimicV2's
Pose Sampling removes step by step (§3.2.1): P_init (full), P-lips, P-head, P_hands.
"""

from __future__ import annotations

import numpy as np

NUM_KEYPOINTS = 133

BODY = tuple(range(0, 17))  # COCO-17
FEET = tuple(range(17, 23))
FACE = tuple(range(23, 91))  # 68 iBUG points
LIPS = tuple(range(71, 91))  # iBUG 48-67
LEFT_HAND = tuple(range(91, 112))
RIGHT_HAND = tuple(range(112, 133))

# Body points that belong to the head (nose, eyes, ears).
BODY_HEAD = (0, 1, 2, 3, 4)
FACE_WITHOUT_LIPS = tuple(i for i in FACE if i not in LIPS)

# Named groups a pose condition is assembled from.
KEYPOINT_GROUPS: dict[str, tuple[int, ...]] = {
    "body": tuple(i for i in BODY if i not in BODY_HEAD) + FEET,
    "head": BODY_HEAD + FACE_WITHOUT_LIPS,
    "lips": LIPS,
    "left_hand": LEFT_HAND,
    "right_hand": RIGHT_HAND,
}

# EchoMimicV2 §3.2.1 pose conditions, as group lists.
POSE_PRESETS: dict[str, tuple[str, ...]] = {
    "full": ("body", "head", "lips", "left_hand", "right_hand"),  # P_init
    "no_lips": ("body", "head", "left_hand", "right_hand"),  # P-lips
    "no_head": ("body", "left_hand", "right_hand"),  # P-head
    "hands": ("left_hand", "right_hand"),  # P_hands
}

# Keypoints that define the region masks used by partial attention and region losses.
REGION_KEYPOINTS: dict[str, tuple[int, ...]] = {
    "lips": LIPS,
    "face": FACE,
    "head": BODY_HEAD + FACE,
    "left_hand": LEFT_HAND,
    "right_hand": RIGHT_HAND,
}


def resolve_pose_groups(groups: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A preset name (``"no_lips"``) or an explicit list of group names -> a tuple of group names."""
    if isinstance(groups, str):
        if groups not in POSE_PRESETS:
            raise ValueError(f"unknown pose preset {groups!r}; known: {sorted(POSE_PRESETS)}")
        return POSE_PRESETS[groups]
    groups = tuple(groups)
    unknown = [g for g in groups if g not in KEYPOINT_GROUPS]
    if unknown:
        raise ValueError(f"unknown keypoint group(s) {unknown}; known: {sorted(KEYPOINT_GROUPS)}")
    return groups


def indices_of(groups: tuple[str, ...]) -> tuple[int, ...]:
    """All keypoint indices of the given groups, sorted."""
    return tuple(sorted({i for g in groups for i in KEYPOINT_GROUPS[g]}))


# Normalised keypoints may stray a little outside the frame (a hand leaving the picture); pixel coordinates are
# tens to thousands. A found keypoint (score > 0) outside this range is not in frame units.
NORMALISED_RANGE = (-1.0, 2.0)


def unnormalised_keypoints(kpts, width: int | None = None, height: int | None = None) -> str | None:
    """Why ``(T, 133, 3)`` keypoints are not ``x, y`` in ``[0, 1]`` of the frame (shared/DESIGN.md §1), else None.

    Keypoints in pixel coordinates would render an empty pose map and empty region masks without any error. Only
    found keypoints (score > 0) count; the check fails when more than half of them lie outside
    ``NORMALISED_RANGE``. One function for the loader (reason ``pixel-unit keypoints``) and the pipeline's
    inspector. ``width``/``height`` (the frame's) only make the message more helpful.
    """
    k = np.asarray(kpts)
    found = k[..., 2] > 0
    n = int(found.sum())
    if n == 0:
        return None
    xy = k[..., :2][found]
    lo, hi = NORMALISED_RANGE
    outside = ((xy < lo) | (xy > hi)).any(axis=-1)
    if outside.sum() * 2 <= n:
        return None
    x_max, y_max = float(xy[:, 0].max()), float(xy[:, 1].max())
    frame = f" of a {width}x{height} frame" if width and height else ""
    looks = " (pixel coordinates" + frame + "?)" if x_max > hi or y_max > hi else ""
    return (f"{int(outside.sum())} of {n} found keypoints outside [{lo:g}, {hi:g}]: x up to {x_max:.4g}, "
            f"y up to {y_max:.4g}, expected x, y in [0, 1] of the frame{looks}")
