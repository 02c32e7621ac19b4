"""Face boxes and crops from COCO-WholeBody face keypoints (indices 23-90, iBUG-68 order).

The EMTD metrics that look at the face (Sync-C / Sync-D, CSIM) need a face crop per frame. syncnet_python detects
faces with S3FD; here the face box comes from the 68 face keypoints of the frame (DWPose, or a keypoint sidecar),
which the half-body pipeline has anyway (docs/EVALUATION.md, "face detector"). Boxes are smoothed over time with
a 13-frame median filter and cropped with syncnet_python's geometry (``crop_scale`` 0.4: a square of side
``2 s (1 + cs)`` around the box centre, shifted down by ``s cs``, where ``s`` is half the box's longer side; the
frame is padded with grey 110 where the crop leaves it). ArcFace crops are aligned to the standard 112 x 112
five-point template (eye centres, nose tip, mouth corners) by a least-squares similarity transform.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ARCFACE_TEMPLATE", "align_arcface", "face_boxes", "five_points", "syncnet_crops"]

FACE = slice(23, 91)
# ArcFace's 112 x 112 five-point template (insightface): image-left eye, image-right eye, nose tip, mouth corners
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], np.float64)


def face_boxes(kpts: np.ndarray | None, num_frames: int, width: int, height: int, score: float,
               fallback_box, smooth: int = 13) -> np.ndarray:
    """Per-frame face boxes ``(F, 4)`` as ``(cx, cy, s)`` + validity in pixels (``s``: half the longer side).

    ``kpts`` ``(T, 133, 3)`` normalised; frames whose face has fewer than 5 found points take the nearest found
    frame's box, and a video without any takes ``fallback_box`` (normalised ``x0, y0, x1, y1``). The last column is 1
    where the box was measured in that frame.
    """
    out = np.zeros((num_frames, 4), np.float64)
    found = np.zeros(num_frames, bool)
    if kpts is not None:
        k = np.asarray(kpts, np.float64)
        for i in range(min(num_frames, k.shape[0])):
            f = k[i, FACE]
            ok = f[:, 2] >= score
            if ok.sum() >= 5:
                x, y = f[ok, 0] * width, f[ok, 1] * height
                out[i, :3] = ((x.min() + x.max()) / 2, (y.min() + y.max()) / 2,
                              max(x.max() - x.min(), y.max() - y.min()) / 2)
                found[i] = True
    if not found.any():
        x0, y0, x1, y1 = (float(v) for v in fallback_box)
        out[:, :3] = ((x0 + x1) / 2 * width, (y0 + y1) / 2 * height, max((x1 - x0) * width, (y1 - y0) * height) / 2)
        return out
    idx = np.flatnonzero(found)
    for i in np.flatnonzero(~found):
        out[i, :3] = out[idx[np.argmin(np.abs(idx - i))], :3]
    out[:, 3] = found
    if smooth > 1 and num_frames >= 3:
        from scipy.signal import medfilt

        kernel = min(smooth, num_frames if num_frames % 2 else num_frames - 1)
        for c in range(3):
            out[:, c] = medfilt(out[:, c], kernel_size=kernel)
    return out


def syncnet_crops(frames: torch.Tensor, boxes: np.ndarray, crop_scale: float = 0.4, size: int = 224) -> torch.Tensor:
    """``(F, 3, H, W)`` in ``[0, 1]`` + ``face_boxes`` -> ``(F, 3, size, size)`` crops in ``[0, 1]`` (syncnet_python's
    ``crop_video`` geometry, grey 110 outside the frame)."""
    crops = []
    h, w = frames.shape[-2:]
    for i in range(frames.shape[0]):
        cx, cy, s = boxes[i, :3]
        s = max(float(s), 1.0)
        x0, x1 = cx - s * (1 + crop_scale), cx + s * (1 + crop_scale)
        y0, y1 = cy - s, cy + s * (1 + 2 * crop_scale)
        crops.append(_crop(frames[i], x0, y0, x1, y1, size, 110 / 255))
    return torch.stack(crops)


def _crop(img: torch.Tensor, x0: float, y0: float, x1: float, y1: float, size: int, fill: float) -> torch.Tensor:
    """A box (pixels, may leave the image) resampled to ``size x size`` bilinearly; ``fill`` outside the image."""
    h, w = img.shape[-2:]
    xs = x0 + (torch.arange(size, dtype=torch.float64) + 0.5) * (x1 - x0) / size
    ys = y0 + (torch.arange(size, dtype=torch.float64) + 0.5) * (y1 - y0) / size
    gx = (xs / w * 2 - 1).float()
    gy = (ys / h * 2 - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
    out = F.grid_sample((img[None].float() - fill), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] + fill


def five_points(kpts: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """ArcFace's five landmarks ``(5, 2)`` in pixels from one frame's ``(133, 3)`` keypoints (None when missing)."""
    f = np.asarray(kpts, np.float64)[FACE]
    if (f[[36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 30, 48, 54], 2] <= 0).any():
        return None
    xy = f[:, :2] * (width, height)
    return np.stack([xy[36:42].mean(0), xy[42:48].mean(0), xy[30], xy[48], xy[54]])


def align_arcface(img: torch.Tensor, points: np.ndarray, size: int = 112) -> torch.Tensor:
    """``(3, H, W)`` in ``[0, 1]`` -> ``(3, 112, 112)``: the similarity transform taking ``points`` to the template."""
    src = np.asarray(points, np.float64)
    dst = ARCFACE_TEMPLATE * (size / 112.0)
    # least-squares similarity dst -> src (so each output pixel samples the input): [a -b tx; b a ty]
    a_rows = []
    b_vals = []
    for (u, v), (x, y) in zip(dst, src):
        a_rows += [[u, -v, 1, 0], [v, u, 0, 1]]
        b_vals += [x, y]
    a, b, tx, ty = np.linalg.lstsq(np.array(a_rows), np.array(b_vals), rcond=None)[0]
    h, w = img.shape[-2:]
    u = torch.arange(size, dtype=torch.float64) + 0.5
    uu, vv = torch.meshgrid(u, u, indexing="xy")
    x = a * uu - b * vv + tx
    y = b * uu + a * vv + ty
    grid = torch.stack([(x / w * 2 - 1), (y / h * 2 - 1)], -1).float()[None]
    return F.grid_sample(img[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
