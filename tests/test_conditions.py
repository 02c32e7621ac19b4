"""Pose maps, region masks, valid masks and ConditionSpec (halfbody.data.conditions)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halfbody.data.conditions import (
    ConditionSpec,
    PoseRenderer,
    boxes_to_masks,
    region_masks,
    render_pose,
    to_latent_resolution,
    valid_mask,
)
from halfbody.data.keypoints import FACE, LEFT_HAND, LIPS, POSE_PRESETS, RIGHT_HAND

S = 256
# Disjoint screen areas, one per keypoint group, so a group's drawing can be found by where it lands.
AREAS = {
    "body": (25, 95, 115, 235),  # x0, y0, x1, y1
    "head": (170, 0, 250, 70),  # the face ring (nose/eyes/ears sit top-left, see below)
    "head_points": (40, 20, 100, 50),
    "lips": (170, 95, 250, 135),
    "left_hand": (140, 170, 200, 250),
    "right_hand": (205, 170, 255, 250),
}


def _layout() -> np.ndarray:
    k = np.zeros((133, 3), np.float32)
    k[5], k[6] = (100, 100, 1), (40, 100, 1)  # shoulders -> neck (70, 100)
    k[7], k[8] = (100, 160, 1), (40, 160, 1)
    k[9], k[10] = (100, 220, 1), (40, 220, 1)
    k[0] = (70, 40, 1)  # nose
    k[1], k[2], k[3], k[4] = (80, 35, 1), (60, 35, 1), (90, 40, 1), (50, 40, 1)
    face_no_lips = [i for i in FACE if i not in LIPS]
    a = np.linspace(0, 2 * np.pi, len(face_no_lips), endpoint=False)
    k[face_no_lips, 0], k[face_no_lips, 1], k[face_no_lips, 2] = 210 + 30 * np.cos(a), 35 + 25 * np.sin(a), 1
    a = np.linspace(0, 2 * np.pi, len(LIPS), endpoint=False)
    k[list(LIPS), 0], k[list(LIPS), 1], k[list(LIPS), 2] = 210 + 30 * np.cos(a), 115 + 12 * np.sin(a), 1
    for hand, x0 in ((LEFT_HAND, 150), (RIGHT_HAND, 215)):
        k[list(hand), 0] = x0 + (np.arange(21) % 5) * 8
        k[list(hand), 1] = 180 + (np.arange(21) // 5) * 15
        k[list(hand), 2] = 1
    return k


def _drawn(img: np.ndarray, area) -> int:
    x0, y0, x1, y1 = area
    return int((img[y0:y1, x0:x1].sum(-1) > 0).sum())


@pytest.mark.parametrize("preset", sorted(POSE_PRESETS))
def test_pose_presets_draw_only_their_groups(preset):
    img = PoseRenderer(preset).draw(_layout(), S, S)
    groups = POSE_PRESETS[preset]
    assert img.shape == (S, S, 3) and img.dtype == np.uint8
    for group in ("body", "head", "lips", "left_hand", "right_hand"):
        n = _drawn(img, AREAS[group])
        assert (n > 20) == (group in groups), f"{preset}: {group} area has {n} drawn pixels"
    assert (_drawn(img, AREAS["head_points"]) > 0) == ("head" in groups)
    # Nothing outside the group areas (the neck-nose limb runs inside the body/head-point columns).
    mask = np.zeros((S, S), bool)
    for x0, y0, x1, y1 in AREAS.values():
        mask[y0:y1, x0:x1] = True
    mask[:, 25:115] = True
    assert (img.sum(-1)[~mask] > 0).sum() == 0


def test_pose_drawing_style():
    img = render_pose(_layout()[None], S, S, "full")[0].permute(1, 2, 0).numpy()
    assert img.min() >= 0 and img.max() <= 1
    u8 = (img * 255).round().astype(int)
    # Face and lips: white dots only.
    x0, y0, x1, y1 = AREAS["head"]
    face = u8[y0:y1, x0:x1].reshape(-1, 3)
    face = face[face.sum(1) > 0]
    assert len(face) > 50 and np.all(face == 255)
    # Hands: rainbow edges -> many distinct hues, plus blue joints.
    x0, y0, x1, y1 = AREAS["left_hand"]
    hand = {tuple(c) for c in u8[y0:y1, x0:x1].reshape(-1, 3) if c.sum() > 0}
    assert len(hand) >= 8 and (0, 0, 255) in hand
    # Body: limbs at 60 % of OpenPose colours, joints at full colour (left shoulder->elbow limb is (85,255,0)*0.6 ...)
    body = {tuple(c) for c in u8[95:235, 25:115].reshape(-1, 3) if c.sum() > 0}
    assert (255, 85, 0) in body  # OpenPose joint 2 (right shoulder) colour at full strength
    assert any(max(c) == 153 for c in body)  # 0.6 * 255: limb fill


def test_low_scores_are_not_drawn_and_widths_scale():
    k = _layout()
    k[list(LEFT_HAND), 2] = 0.2
    img = PoseRenderer("hands", score_threshold=0.3).draw(k, S, S)
    assert _drawn(img, AREAS["left_hand"]) == 0 and _drawn(img, AREAS["right_hand"]) > 20
    small = PoseRenderer("full").draw(k, S, S)
    big = PoseRenderer("full").draw(k * np.array([2, 2, 1], np.float32), 2 * S, 2 * S)
    ratio = (big.sum(-1) > 0).sum() / max(1, (small.sum(-1) > 0).sum())
    assert ratio > 2.6  # twice the side: ~3-4x the drawn area when strokes scale, <= 2x with fixed-width strokes


def test_region_masks_cover_their_keypoints():
    k = _layout()
    masks = region_masks(k[None], S, S, margins={"lips": 0.0, "face": 0.0, "head": 0.0})
    for region, idx in (("lips", LIPS), ("face", FACE), ("head", tuple(range(5)) + FACE)):
        m = masks[f"mask_{region}"][0, 0].numpy()
        assert m.shape == (S, S) and set(np.unique(m)) <= {0.0, 1.0}
        pts = k[list(idx)]
        xs, ys = np.clip(pts[:, 0].astype(int), 0, S - 1), np.clip(pts[:, 1].astype(int), 0, S - 1)
        assert m[ys, xs].min() == 1.0, region
    lips = masks["mask_lips"][0, 0].numpy()
    assert lips[60, 210] == 0 and lips[200, 60] == 0  # not the face ring, not the body
    wider = region_masks(k[None], S, S, margins={"lips": 0.5})["mask_lips"]
    assert wider.sum() > 1.5 * masks["mask_lips"].sum()


def test_hand_mask_is_one_box_per_visible_hand():
    k = _layout()
    hands = region_masks(k[None], S, S, margins={"hands": 0.0})["mask_hands"][0, 0].numpy()
    for idx in (LEFT_HAND, RIGHT_HAND):
        pts = k[list(idx)]
        assert hands[pts[:, 1].astype(int), pts[:, 0].astype(int)].min() == 1.0
    assert hands[200, 198] == 0  # between the hands: two boxes, not one spanning both
    assert hands.sum() == 2 * 33 * 61  # each hand's keypoints span 32 x 60 pixels (the edge pixels count)
    k[list(LEFT_HAND), 2] = 0.0  # a hand that is not visible has no box
    right = region_masks(k[None], S, S, margins={"hands": 0.0})["mask_hands"][0, 0].numpy()
    assert right.sum() == 33 * 61 and right[200, 160] == 0


def test_region_masks_empty_and_head_box_fallback():
    k = _layout()
    k[:, 2] = 0.0
    box = np.array([10.5, 20.5, 49.5, 69.5], np.float32)
    masks = region_masks(k[None], S, S, head_box=box)
    assert masks["mask_lips"].sum() == 0 and masks["mask_face"].sum() == 0
    head = masks["mask_head"][0, 0]
    assert head.sum() == 40 * 50 and head[20:70, 10:50].min() == 1
    valid = valid_mask(S, S, (0, 0, 30, S))
    clipped = region_masks(k[None], S, S, head_box=box, valid=valid)["mask_head"][0, 0]
    assert clipped.sum() == 20 * 50


def test_to_latent_resolution_keeps_small_regions():
    m = boxes_to_masks(np.array([[10.2, 10.2, 10.8, 10.8], [np.nan] * 4], np.float32), 32, 32)
    assert m.shape == (2, 1, 32, 32) and m[0].sum() == 1 and m[1].sum() == 0
    lat = to_latent_resolution(m, 8)
    assert lat.shape == (2, 1, 4, 4) and lat[0, 0, 1, 1] == 1 and lat[0].sum() == 1
    batched = to_latent_resolution(m[None].repeat(3, 1, 1, 1, 1), 8)
    assert batched.shape == (3, 2, 1, 4, 4)
    assert to_latent_resolution(torch.ones(1, 30, 30), 8).shape == (1, 4, 4)  # ceil mode


def test_valid_mask():
    v = valid_mask(10, 20, (5, 2, 15, 8))
    assert v.shape == (1, 10, 20) and v.sum() == 60 and v[0, 2, 5] == 1 and v[0, 1, 5] == 0
    assert valid_mask(4, 4).sum() == 16


def test_condition_spec_validation():
    spec = ConditionSpec.from_any({"pose_groups": ["body", "left_hand"], "pose_dropout": 0.2,
                                   "mask_margins": {"lips": [0.1, 0.2]}, "headshot": "keep"})
    assert spec.groups == ("body", "left_hand") and spec.pose_dropout == 0.2
    assert spec.mask_margins["lips"] == (0.1, 0.2, 0.1, 0.2) and len(spec.mask_margins["head"]) == 4
    assert ConditionSpec.from_any(None).groups == POSE_PRESETS["full"]
    with pytest.raises(ValueError, match="unknown pose preset 'no_body'"):
        ConditionSpec(pose_groups="no_body")
    with pytest.raises(ValueError, match="pose_dropout"):
        ConditionSpec(pose_dropout=1.5)
    with pytest.raises(ValueError, match="headshot='crop'"):
        ConditionSpec(headshot="crop")
    with pytest.raises(ValueError, match="unknown region 'eyes'"):
        ConditionSpec(mask_margins={"eyes": 0.1})
    with pytest.raises(ValueError, match="unknown key"):
        ConditionSpec.from_any({"pose_group": "full"})
    with pytest.raises(ValueError, match="kinds"):
        ConditionSpec(kinds=["selfie"])
