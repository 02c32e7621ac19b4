"""Conditions rendered on the fly from COCO-WholeBody keypoints: pose maps, region masks, valid masks.

* Pose maps are drawn the way EchoMimicV2 (§3.1, §3.2.1) draws its DWPose keypoint maps: an OpenPose-18
  body (neck = mid-shoulders) with limbs as filled ellipses at 60 % of their colour and full-colour joint
  dots, hand skeletons with one HSV rainbow colour per edge and blue joint dots, face points as small white
  dots. Only the keypoint groups of the configured preset are drawn (Pose Sampling, §3.2.1: P_init,
  P-lips, P-head, P_hands). Feet are not drawn (DWPose's 18-point body has no feet).
* Region masks (lips / face / head) are the spatial masks A_lips / A_head of the partial audio attention
  (§3.2.2) and of the HPA headshot augmentation (§3.3): keypoint boxes enlarged by margins.
* The valid mask is 0 on padding (HPA padding, letterboxing).

All keypoints here are in *output pixel* coordinates ``(..., 133, 3)``: ``x, y`` in pixels, then a score.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from halfbody.data.keypoints import (
    FACE,
    KEYPOINT_GROUPS,
    LEFT_HAND,
    LIPS,
    NUM_KEYPOINTS,
    REGION_KEYPOINTS,
    RIGHT_HAND,
    resolve_pose_groups,
)
from halfbody.utils.containers import to_plain

REGIONS = ("lips", "face", "head", "hands")
# A region's mask is the union of its parts' boxes (the hands: one box per hand, not one box spanning both).
REGION_PARTS: dict[str, tuple[str, ...]] = {"hands": ("left_hand", "right_hand")}
HEADSHOT_MODES = ("pad", "keep", "drop")
FRAMINGS = ("full", "face")
KINDS = ("halfbody", "headshot")

# Margins as fractions of the keypoint box's width/height: (left, top, right, bottom). The head box is built
# from face + nose/eyes/ears keypoints, which stop at the brows, so its top margin covers the hair.
DEFAULT_MASK_MARGINS: dict[str, tuple[float, float, float, float]] = {
    "lips": (0.25, 0.35, 0.25, 0.35),
    "face": (0.1, 0.15, 0.1, 0.1),
    "head": (0.25, 0.6, 0.25, 0.15),
    "hands": (0.3, 0.3, 0.3, 0.3),
}


def _margin4(region: str, value) -> tuple[float, float, float, float]:
    if isinstance(value, (int, float)):
        vals = (float(value),) * 4
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (2, 4):
        vals = tuple(float(v) for v in value)
        if len(vals) == 2:  # (horizontal, vertical)
            vals = (vals[0], vals[1], vals[0], vals[1])
    else:
        raise ValueError(f"ConditionSpec.mask_margins[{region!r}]={value!r}: expected a number, [h, v] or [l, t, r, b]")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise ValueError(f"ConditionSpec.mask_margins[{region!r}]={value!r}: margins must be finite and >= 0")
    return vals  # type: ignore[return-value]


@dataclass
class ConditionSpec:
    """What the datamodule renders as conditions; a phase callback may swap it at runtime (DESIGN.md §2).

    Attributes:
        pose_groups: a preset of ``keypoints.POSE_PRESETS`` (``full``, ``no_lips``, ``no_head``, ``hands``) or
            an explicit list of ``keypoints.KEYPOINT_GROUPS`` names (EchoMimicV2 §3.2.1 Spatial Pose Sampling).
        pose_dropout: probability, per training sample, that the pose map is zeroed (§3.2.1 Iterative Pose
            Sampling; the schedule lives in the phase callback, which sets a new spec).
        mask_margins: per region (``lips``, ``face``, ``head``, ``hands``): a number, ``[h, v]`` or ``[l, t, r, b]``
            fractions of the keypoint box size added on each side. Missing regions keep their default.
        headshot: what happens to clips whose json ``kind`` is ``headshot``: ``pad`` (HPA, §3.3: pad into
            half-body geometry, padding marked invalid), ``keep`` (crop like half-body clips) or ``drop``.
        kinds: the clip kinds that are used at all (e.g. ``[headshot]`` for the HPA step that §3.3 runs
            before half-body data is introduced).
        framing: ``full`` (the clip's own crop) or ``face``: every clip cropped to its head box (json ``head_box``,
            else the face keypoints enlarged by the ``head`` margins), grown to the output aspect ratio: the face
            close-up crops of MirrorMe's first training phase (§3.4).
    """

    pose_groups: str | Sequence[str] = "full"
    pose_dropout: float = 0.0
    mask_margins: Mapping[str, object] = field(default_factory=dict)
    headshot: str = "pad"
    kinds: Sequence[str] = KINDS
    framing: str = "full"

    def __post_init__(self) -> None:
        if not isinstance(self.pose_groups, str):
            self.pose_groups = tuple(self.pose_groups)
        resolve_pose_groups(self.pose_groups)  # raises with the known names
        p = float(self.pose_dropout)
        if not (0.0 <= p <= 1.0):
            raise ValueError(f"ConditionSpec.pose_dropout={self.pose_dropout!r}: must be in [0, 1]")
        self.pose_dropout = p
        margins = dict(DEFAULT_MASK_MARGINS)
        for region, value in dict(self.mask_margins or {}).items():
            if region not in REGIONS:
                raise ValueError(f"ConditionSpec.mask_margins has unknown region {region!r}; known: {list(REGIONS)}")
            margins[region] = _margin4(region, value)
        self.mask_margins = margins
        if self.headshot not in HEADSHOT_MODES:
            raise ValueError(f"ConditionSpec.headshot={self.headshot!r}: expected one of {list(HEADSHOT_MODES)}")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"ConditionSpec.kinds={list(kinds)!r}: expected a non-empty subset of {list(KINDS)}")
        self.kinds = kinds
        if self.framing not in FRAMINGS:
            raise ValueError(f"ConditionSpec.framing={self.framing!r}: expected one of {list(FRAMINGS)}")

    @property
    def groups(self) -> tuple[str, ...]:
        return resolve_pose_groups(self.pose_groups)

    @classmethod
    def from_any(cls, spec: ConditionSpec | Mapping | None) -> ConditionSpec:
        """A ConditionSpec, a mapping of its fields (Hydra config), or None (defaults)."""
        if spec is None:
            return cls()
        if isinstance(spec, ConditionSpec):
            return spec
        if isinstance(spec, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"condition spec has unknown key(s) {unknown}; known: {sorted(known)}")
            return cls(**{k: to_plain(v) for k, v in spec.items()})
        raise TypeError(f"condition spec must be a ConditionSpec or a mapping, got {type(spec).__name__}")


# ------------------------------------------------------------------------------------------ pose maps
# OpenPose-18 joint order built from COCO-17 (index 1, the neck, is the mid-point of the shoulders).
_OP_FROM_COCO = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
# OpenPose limbs (0-based OpenPose indices); DWPose draws the first 17.
_OP_LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
_OP_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
_HAND_EDGES = tuple((0 if k % 4 == 0 else k, k + 1) for k in range(20))  # wrist->finger roots, then chains
_HAND_COLORS = tuple(tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(i / len(_HAND_EDGES), 1.0, 1.0))
                     for i in range(len(_HAND_EDGES)))
_FACE_NO_LIPS = tuple(i for i in FACE if i not in LIPS)
_ELLIPSE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24, endpoint=False)),
                     np.sin(np.linspace(0, 2 * np.pi, 24, endpoint=False))], axis=1)


def _sizes(height: int, width: int) -> dict[str, int]:
    """DWPose's pixel sizes at 512 px, scaled with the resolution (at least 1 px)."""
    s = min(height, width) / 512.0
    return {
        "stick": max(1, round(4 * s)),
        "joint": max(1, round(4 * s)),
        "hand_line": max(1, round(2 * s)),
        "hand_joint": max(1, round(4 * s)),
        "face": max(1, round(3 * s)),
    }


class PoseRenderer:
    """Draws pose maps of a fixed set of keypoint groups (cached index sets, so per-frame work is drawing only)."""

    def __init__(self, groups: str | Sequence[str], score_threshold: float = 0.3):
        self.groups = resolve_pose_groups(groups if isinstance(groups, str) else tuple(groups))
        self.score_threshold = float(score_threshold)
        selected = {i for g in self.groups for i in KEYPOINT_GROUPS[g]}
        # OpenPose joints that are selected (the neck needs both shoulders).
        self._op_selected = [(c in selected) if c >= 0 else (5 in selected and 6 in selected) for c in _OP_FROM_COCO]
        self._limbs = [(i, a, b) for i, (a, b) in enumerate(_OP_LIMBS) if self._op_selected[a] and self._op_selected[b]]
        self._joints = [j for j in range(18) if self._op_selected[j]]
        self._hands = [h for name, h in (("left_hand", LEFT_HAND), ("right_hand", RIGHT_HAND)) if name in self.groups]
        face = [i for i in _FACE_NO_LIPS if i in selected] + [i for i in LIPS if i in selected]
        self._face = np.asarray(face, dtype=np.int64)

    def draw(self, kpts: np.ndarray, height: int, width: int) -> np.ndarray:
        """One frame: ``kpts (133, 3)`` in output pixels -> uint8 ``(H, W, 3)`` RGB pose map on black."""
        kpts = np.asarray(kpts, dtype=np.float32)
        if kpts.shape != (NUM_KEYPOINTS, 3):
            raise ValueError(f"keypoints must be (133, 3), got {kpts.shape}")
        size = _sizes(height, width)
        img = Image.new("RGB", (width, height))
        draw = ImageDraw.Draw(img)
        thr = self.score_threshold
        # OpenPose-18 body: coordinates and visibility.
        op = np.zeros((18, 3), dtype=np.float32)
        for j, c in enumerate(_OP_FROM_COCO):
            if c >= 0:
                op[j] = kpts[c]
            else:
                ls, rs = kpts[5], kpts[6]
                op[j] = ((ls[0] + rs[0]) / 2, (ls[1] + rs[1]) / 2, min(ls[2], rs[2]))
        vis = op[:, 2] >= thr
        stick = size["stick"]
        for i, a, b in self._limbs:
            if not (vis[a] and vis[b]):
                continue
            (x0, y0), (x1, y1) = op[a, :2], op[b, :2]
            length = math.hypot(x1 - x0, y1 - y0)
            ang = math.atan2(y1 - y0, x1 - x0)
            ca, sa = math.cos(ang), math.sin(ang)
            ex, ey = _ELLIPSE[:, 0] * (length / 2), _ELLIPSE[:, 1] * stick
            px = (x0 + x1) / 2 + ex * ca - ey * sa
            py = (y0 + y1) / 2 + ex * sa + ey * ca
            color = tuple(int(c * 0.6) for c in _OP_COLORS[i])
            draw.polygon(list(zip(px.tolist(), py.tolist())), fill=color)
        r = size["joint"]
        for j in self._joints:
            if vis[j]:
                x, y = float(op[j, 0]), float(op[j, 1])
                draw.ellipse((x - r, y - r, x + r, y + r), fill=_OP_COLORS[j])
        # Hands: rainbow edges, blue joints.
        lw, hr = size["hand_line"], size["hand_joint"]
        for hand in self._hands:
            pts = kpts[list(hand)]
            hv = pts[:, 2] >= thr
            for e, (a, b) in enumerate(_HAND_EDGES):
                if hv[a] and hv[b]:
                    draw.line((float(pts[a, 0]), float(pts[a, 1]), float(pts[b, 0]), float(pts[b, 1])),
                              fill=_HAND_COLORS[e], width=lw)
            for p in pts[hv]:
                x, y = float(p[0]), float(p[1])
                draw.ellipse((x - hr, y - hr, x + hr, y + hr), fill=(0, 0, 255))
        # Face (and lips): small white dots.
        if self._face.size:
            fr = size["face"]
            pts = kpts[self._face]
            for p in pts[pts[:, 2] >= thr]:
                x, y = float(p[0]), float(p[1])
                draw.ellipse((x - fr, y - fr, x + fr, y + fr), fill=(255, 255, 255))
        return np.asarray(img)

    def render(self, kpts: np.ndarray, height: int, width: int) -> torch.Tensor:
        """``kpts (F, 133, 3)`` output pixels -> float32 ``(F, 3, H, W)`` in ``[0, 1]``."""
        maps = np.stack([self.draw(k, height, width) for k in np.asarray(kpts)])
        return torch.from_numpy(maps).permute(0, 3, 1, 2).float().div_(255.0)


def render_pose(kpts: np.ndarray, height: int, width: int, groups: str | Sequence[str] = "full",
                score_threshold: float = 0.3) -> torch.Tensor:
    """Pose maps ``(F, 3, H, W)`` in ``[0, 1]`` of keypoints ``(F, 133, 3)`` given in output pixels."""
    return PoseRenderer(groups, score_threshold).render(kpts, height, width)


# ---------------------------------------------------------------------------------------- region masks
def region_boxes(kpts: np.ndarray, region: str, margins, score_threshold: float = 0.3,
                 fallback_box: Sequence[float] | None = None, min_size: float = 2.0) -> np.ndarray:
    """Per-frame pixel boxes ``(F, 4)`` ``[x0, y0, x1, y1]`` of a region's visible keypoints, enlarged by margins.

    ``margins`` is ``(left, top, right, bottom)`` as fractions of the box size. Frames without visible keypoints
    get the ``fallback_box`` (pixels, used as is; e.g. the json ``head_box`` for the head) or NaN (empty mask).
    """
    if region not in REGION_KEYPOINTS:
        raise ValueError(f"unknown region {region!r}; known: {sorted(REGION_KEYPOINTS)}")
    ml, mt, mr, mb = _margin4(region, margins)
    pts = np.asarray(kpts, dtype=np.float32)[:, list(REGION_KEYPOINTS[region])]
    vis = pts[..., 2] >= score_threshold
    any_vis = vis.any(axis=1)
    big = np.float32(np.inf)
    x0 = np.where(vis, pts[..., 0], big).min(axis=1)
    y0 = np.where(vis, pts[..., 1], big).min(axis=1)
    x1 = np.where(vis, pts[..., 0], -big).max(axis=1)
    y1 = np.where(vis, pts[..., 1], -big).max(axis=1)
    x0, y0, x1, y1 = (np.where(any_vis, v, 0.0) for v in (x0, y0, x1, y1))  # no inf arithmetic below
    w, h = np.maximum(x1 - x0, 0), np.maximum(y1 - y0, 0)
    boxes = np.stack([x0 - ml * w, y0 - mt * h, x1 + mr * w, y1 + mb * h], axis=1)
    # A region seen as a single point still gets a few pixels.
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    half = min_size / 2
    boxes[:, 0] = np.minimum(boxes[:, 0], cx - half)
    boxes[:, 2] = np.maximum(boxes[:, 2], cx + half)
    boxes[:, 1] = np.minimum(boxes[:, 1], cy - half)
    boxes[:, 3] = np.maximum(boxes[:, 3], cy + half)
    fb = np.asarray(fallback_box, dtype=np.float32) if fallback_box is not None else np.full(4, np.nan, np.float32)
    return np.where(any_vis[:, None], boxes, fb[None, :]).astype(np.float32)


def boxes_to_masks(boxes: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Pixel boxes ``(F, 4)`` (NaN rows = empty) -> float32 masks ``(F, 1, H, W)`` in ``{0, 1}``.

    Pixel ``i`` covers ``[i, i + 1)``; it is inside when the closed box touches that area, so the pixel that
    contains a keypoint on the box edge is always inside.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    ok = np.all(np.isfinite(boxes), axis=1)
    b = np.where(ok[:, None], boxes, 0.0)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    inx = (xs[None, :] + 1 > b[:, 0:1]) & (xs[None, :] <= b[:, 2:3]) & ok[:, None]
    iny = (ys[None, :] + 1 > b[:, 1:2]) & (ys[None, :] <= b[:, 3:4])
    masks = iny[:, :, None] & inx[:, None, :]
    return torch.from_numpy(masks[:, None].astype(np.float32))


def region_masks(kpts: np.ndarray, height: int, width: int, margins: Mapping[str, object] | None = None,
                 score_threshold: float = 0.3, head_box: Sequence[float] | None = None,
                 valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Masks ``{"mask_lips", "mask_face", "mask_head", "mask_hands"}``, each ``(F, 1, H, W)`` float in ``{0, 1}``
    (``mask_hands``: the union of one box per visible hand).

    Args:
        kpts: ``(F, 133, 3)`` keypoints in output pixels.
        margins: per-region margins (see ``ConditionSpec.mask_margins``); defaults for missing regions.
        head_box: pixel box used for the head in frames where no head keypoint is visible (json ``head_box``).
        valid: optional ``(1 or F, 1, H, W)`` valid mask; masks are zeroed on padding.
    """
    margins = {**DEFAULT_MASK_MARGINS, **dict(margins or {})}
    out = {}
    for region in REGIONS:
        fb = head_box if region == "head" else None
        m = torch.stack([boxes_to_masks(region_boxes(kpts, part, margins[region], score_threshold, fallback_box=fb),
                                        height, width)
                         for part in REGION_PARTS.get(region, (region,))]).amax(0)
        if valid is not None:
            m = m * valid
        out[f"mask_{region}"] = m
    return out


def valid_mask(height: int, width: int, rect: Sequence[int] | None = None) -> torch.Tensor:
    """``(1, H, W)`` float mask: 1 inside ``rect = (x0, y0, x1, y1)`` (integer pixels, end exclusive), 0 outside."""
    m = torch.zeros(1, height, width, dtype=torch.float32)
    if rect is None:
        m.fill_(1.0)
    else:
        x0, y0, x1, y1 = (int(v) for v in rect)
        m[:, max(0, y0):max(0, min(height, y1)), max(0, x0):max(0, min(width, x1))] = 1.0
    return m


def to_latent_resolution(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool a mask ``(..., H, W)`` by ``factor`` (ceil mode), so a region never vanishes in latent space."""
    if factor < 1:
        raise ValueError(f"to_latent_resolution: factor must be >= 1, got {factor}")
    if factor == 1:
        return mask
    lead, (h, w) = mask.shape[:-2], mask.shape[-2:]
    flat = mask.reshape(-1, 1, h, w).float()
    pooled = F.max_pool2d(flat, kernel_size=factor, stride=factor, ceil_mode=True)
    return pooled.reshape(*lead, *pooled.shape[-2:]).to(mask.dtype)


__all__ = [
    "ConditionSpec", "DEFAULT_MASK_MARGINS", "PoseRenderer", "boxes_to_masks", "region_boxes",
    "region_masks", "render_pose", "to_latent_resolution", "valid_mask",
]
