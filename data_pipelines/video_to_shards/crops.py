"""Crop boxes from keypoints, and applying a crop to frames and keypoints with one shared ``Geometry``.

Half-body crop (EchoMimicV2 §4.1: half-body speech clips, EMTD's "clear, front-facing half-body speech segments"):
one square box per clip, from above the head (the top head keypoint minus ``crop.head_top_margin`` face heights,
for the hair the keypoints do not reach) down to the lowest body keypoint (``crop.bottom_keypoints``, plus the
hands) with ``crop.bottom_margin``, at least as wide as every keypoint plus ``crop.side_margin``. Per-side extents
are 2nd/98th percentiles over the clip, so one bad keypoint frame does not blow up the box. The box is moved
into the frame where it fits. A box larger than the frame (a person filling a portrait frame) is shrunk to the
frame's shorter side keeping the head at the top (``crop.fit: shrink``, the default), or kept and padded with
``crop.pad_value`` (``crop.fit: pad``).

Headshot crop (EchoMimicV2 §3.3 headshot data, for HPA and the DiT family's face phase): a tight square around the
head keypoints (hair included) with ``crop.headshot_margin``.

Frames and keypoints go through the same ``halfbody.data.transforms.Geometry`` the training loader uses, so a
keypoint lands on the pixel it marks in the cropped clip. Keypoints that leave the crop get score 0.
"""

from __future__ import annotations

import math

import numpy as np

from halfbody.data.conditions import DEFAULT_MASK_MARGINS
from halfbody.data.keypoints import BODY_HEAD, FACE, LEFT_HAND, REGION_KEYPOINTS, RIGHT_HAND
from halfbody.data.transforms import Geometry, keypoint_box

from .config import CropConfig
from .decode import SourceError

HEAD_POINTS = tuple(BODY_HEAD) + tuple(FACE)


def _visible_px(kpts: np.ndarray, indices, thr: float, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """``(T, n, 2)`` pixel coordinates and ``(T, n)`` visibility of the given keypoints."""
    k = np.asarray(kpts, dtype=np.float32)[:, list(indices)]
    xy = k[..., :2] * np.array([w, h], np.float32)
    return xy, k[..., 2] >= thr


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def _per_frame(xy: np.ndarray, vis: np.ndarray, axis: int, fn) -> np.ndarray:
    """Per-frame min/max of visible coordinates along ``axis`` (frames without visible points dropped)."""
    out = []
    for f in range(xy.shape[0]):
        v = xy[f, vis[f], axis]
        if v.size:
            out.append(fn(v))
    return np.asarray(out, np.float32)


def _place(lo: float, side: int, extent: int) -> int:
    """Start of a window of ``side`` px over ``[0, extent)``: moved inside when it fits, else centred (padding)."""
    if side <= extent:
        return int(min(max(int(math.floor(lo)), 0), extent - side))
    return int(round((extent - side) / 2))


def _fit(side: int, width: int, height: int, c: CropConfig) -> int:
    """``crop.fit``: ``shrink`` keeps the box inside the frame (at most its shorter side), ``pad`` keeps its size."""
    return min(side, width, height) if c.fit == "shrink" else side


def halfbody_box(kpts: np.ndarray, width: int, height: int, c: CropConfig) -> tuple[int, int, int, int]:
    """The clip's square half-body box in pixels of a ``width x height`` frame (may reach outside the frame)."""
    thr = c.score_threshold
    hxy, hvis = _visible_px(kpts, HEAD_POINTS, thr, width, height)
    fxy, fvis = _visible_px(kpts, FACE, thr, width, height)
    bottom_idx = list(c.bottom_keypoints) + (list(LEFT_HAND) + list(RIGHT_HAND) if c.include_hands else [])
    bxy, bvis = _visible_px(kpts, bottom_idx, thr, width, height)
    if not hvis.any():
        raise SourceError("face not visible", "no head keypoint above crop.score_threshold to place the crop")
    tops = _per_frame(hxy, hvis, 1, np.min)
    face_top, face_bot = _per_frame(fxy, fvis, 1, np.min), _per_frame(fxy, fvis, 1, np.max)
    if face_top.size:
        face_h = float(np.median(face_bot - face_top))
    else:  # no face points: the head points' spread
        face_h = float(np.median(_per_frame(hxy, hvis, 1, np.max) - tops))
    face_h = max(face_h, 2.0)
    top = _pct(tops, 2) - c.head_top_margin * face_h
    lows = _per_frame(bxy, bvis, 1, np.max)
    bottom = _pct(lows, 98) if lows.size else _pct(_per_frame(hxy, hvis, 1, np.max), 98) + 2 * face_h
    bottom += c.bottom_margin * (bottom - top)
    axy = np.concatenate([hxy, bxy], axis=1)
    avis = np.concatenate([hvis, bvis], axis=1)
    left, right = _pct(_per_frame(axy, avis, 0, np.min), 2), _pct(_per_frame(axy, avis, 0, np.max), 98)
    span = (right - left) * (1 + 2 * c.side_margin)
    side = _fit(int(math.ceil(max(bottom - top, span, 8.0))), width, height, c)
    cx = (left + right) / 2
    x0 = _place(cx - side / 2, side, width)
    if side <= height:
        y0 = _place(top, side, height)
    else:  # taller than the frame (crop.fit=pad): the head stays at the top, padding below (or above the frame)
        y0 = int(min(max(math.floor(top), height - side), 0))
    return x0, y0, x0 + side, y0 + side


def headshot_box(kpts: np.ndarray, width: int, height: int, c: CropConfig) -> tuple[int, int, int, int]:
    """A square around the head keypoints (hair included) with ``crop.headshot_margin`` on each side."""
    thr = c.score_threshold
    hxy, hvis = _visible_px(kpts, HEAD_POINTS, thr, width, height)
    if not hvis.any():
        raise SourceError("face not visible", "no head keypoint above crop.score_threshold for the headshot")
    x0 = _pct(_per_frame(hxy, hvis, 0, np.min), 2)
    x1 = _pct(_per_frame(hxy, hvis, 0, np.max), 98)
    y0 = _pct(_per_frame(hxy, hvis, 1, np.min), 2)
    y1 = _pct(_per_frame(hxy, hvis, 1, np.max), 98)
    y0 -= c.head_top_margin * max(y1 - y0, 2.0) * 0.5  # hair above the brows
    side = max(x1 - x0, y1 - y0, 4.0)
    side = _fit(int(math.ceil(side * (1 + 2 * c.headshot_margin))), width, height, c)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    bx = _place(cx - side / 2, side, width)
    by = _place(cy - side / 2, side, height)
    return bx, by, bx + side, by + side


def crop_keypoints(kpts: np.ndarray, geom: Geometry) -> np.ndarray:
    """Normalised source keypoints -> normalised crop keypoints; points outside the crop get score 0 (clamped)."""
    px = geom.apply_keypoints(kpts)
    out = px.copy()
    out[..., 0] /= geom.out_w
    out[..., 1] /= geom.out_h
    inside = (out[..., 0] >= 0) & (out[..., 0] <= 1) & (out[..., 1] >= 0) & (out[..., 1] <= 1)
    out[..., 2] = np.where(inside, out[..., 2], 0.0)
    out[..., :2] = np.clip(out[..., :2], 0.0, 1.0)
    return np.ascontiguousarray(out, dtype=np.float32)


def head_box_in_crop(kpts: np.ndarray, geom: Geometry, score_threshold: float) -> list[float] | None:
    """The json ``head_box`` (normalised crop coordinates): the head keypoints' median box with the loader's head
    mask margins, or None when no head is visible."""
    box = keypoint_box(kpts, REGION_KEYPOINTS["head"], score_threshold)
    if box is None:
        return None
    ml, mt, mr, mb = DEFAULT_MASK_MARGINS["head"]
    bw, bh = box[2] - box[0], box[3] - box[1]
    grown = (box[0] - ml * bw, box[1] - mt * bh, box[2] + mr * bw, box[3] + mb * bh)
    px = geom.apply_box(grown)
    norm = [px[0] / geom.out_w, px[1] / geom.out_h, px[2] / geom.out_w, px[3] / geom.out_h]
    norm = [round(float(min(max(v, 0.0), 1.0)), 5) for v in norm]
    if not (norm[0] < norm[2] and norm[1] < norm[3]):
        return None
    return norm
