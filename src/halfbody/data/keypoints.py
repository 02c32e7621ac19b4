"""COCO-WholeBody-133 keypoint layout (DWPose / RTMW order) and the keypoint groups of the pose conditions.

The index ranges are the public shard contract (shared/DESIGN.md §1). The groups are what EchoMimicV2's
Pose Sampling removes step by step (§3.2.1): P_init (full), P-lips, P-head, P_hands.
"""

from __future__ import annotations

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
