"""Oracle metrics for the synthetic talker world (``data_pipelines.synthetic_world``).

Every quantity is measured from generated pixels; the driving keypoints are used only to say *where* to
look (the mouth region) or what the target is (hand positions), never as the measurement itself.
The world's colour rules make this possible (see ``data_pipelines/synthetic_world/identity.py``):

- the mouth interior is :data:`MOUTH_COLOR` for every identity, and the mouth opening is a known
  function of the audio envelope (``opening[f] = e(f / fps)``), so the opening measured from pixels must
  correlate with the audio's per-frame RMS (lip sync, as in EchoMimicV2 §4's Sync-C spirit but exact);
- the two gloves are the only saturated bright colours, so their colours can be read off the reference
  image and their pixels located in every frame;
- identity is a fixed palette, compared as colour sets between frames and the reference;
- the background and torso never move, so any change there between frames is flicker.

Inputs (all functions):
    frames: a torch tensor ``(F, 3, H, W)`` in ``[-1, 1]`` (the training/sampling layout), or a numpy
        array ``(F, H, W, 3)`` uint8 (decoded video) or float in ``[0, 1]``. A leading batch dim of 1 is
        accepted. :func:`as_frames` is the converter.
    reference: the same, for one image (``(3, H, W)`` tensor or ``(H, W, 3)`` array).
    kpts: ``(F, 133, 3)`` driving keypoints in the frames' geometry, normalised x, y and score.
    audio: mono 16 kHz float samples covering the clip.
Results are plain Python floats (``nan`` where a quantity is undefined, e.g. hands in a headshot).
"""

from __future__ import annotations

import math

import numpy as np

AUDIO_SAMPLE_RATE = 16_000
MOUTH_COLOR = (0.50, 0.04, 0.10)  # == data_pipelines.synthetic_world.identity.MOUTH_COLOR (tested)
MOUTH_TOLERANCE = 0.2  # unit-RGB distance at which a pixel stops counting as mouth interior
GLOVE_TOLERANCE = 0.25
GLOVE_MIN_SATURATION, GLOVE_MIN_VALUE = 0.7, 0.6
MIN_SYNC_FRAMES = 8
MISSING_HAND_ERROR = 0.5  # normalised error charged when a driven hand has no glove pixels at all
LIPS = slice(71, 91)
FACE = slice(23, 91)
HANDS = {"left": slice(91, 112), "right": slice(112, 133)}
ARMS = ((5, 7), (7, 9), (6, 8), (8, 10))  # shoulder-elbow, elbow-wrist per side (COCO-17)


# ------------------------------------------------------------------------------------------ converters
def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().to("cpu")
        x = x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)


def as_frames(video) -> np.ndarray:
    """Frames in any supported layout -> float32 ``(F, H, W, 3)`` in ``[0, 1]``.

    uint8 arrays are ``(F, H, W, 3)``; float arrays/tensors with 3 channels on axis 1 are ``(F, 3, H, W)``
    in ``[-1, 1]``; float arrays with 3 channels last are taken to be in ``[0, 1]``.
    """
    x = _numpy(video)
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 4:
        raise ValueError(f"oracle: frames must be (F, 3, H, W) or (F, H, W, 3), got shape {x.shape}")
    if x.dtype == np.uint8:
        if x.shape[-1] != 3:
            raise ValueError(f"oracle: uint8 frames must be (F, H, W, 3), got shape {x.shape}")
        return x.astype(np.float32) / 255.0
    if x.shape[1] == 3 and x.shape[-1] != 3:
        return np.clip((x.transpose(0, 2, 3, 1).astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)
    if x.shape[-1] == 3:
        return np.clip(x.astype(np.float32), 0.0, 1.0)
    raise ValueError(f"oracle: cannot tell the channel axis of frames with shape {x.shape}")


def as_image(image) -> np.ndarray:
    """One image (``(3, H, W)`` in ``[-1, 1]`` or ``(H, W, 3)`` uint8 / ``[0, 1]``) -> float32 ``(H, W, 3)``."""
    x = _numpy(image)
    while x.ndim > 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"oracle: reference must be one image (3, H, W) or (H, W, 3), got shape {x.shape}")
    return as_frames(x[None])[0]


def as_kpts(kpts, num_frames: int | None = None) -> np.ndarray:
    k = _numpy(kpts).astype(np.float32)
    if k.ndim == 4 and k.shape[0] == 1:
        k = k[0]
    if k.ndim != 3 or k.shape[1:] != (133, 3):
        raise ValueError(f"oracle: kpts must be (F, 133, 3), got shape {k.shape}")
    if num_frames is not None and k.shape[0] != num_frames:
        raise ValueError(f"oracle: kpts have {k.shape[0]} frames but the video has {num_frames}")
    return k


def _audio(audio) -> np.ndarray:
    a = _numpy(audio).astype(np.float64)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"oracle: audio must be mono (S,), got shape {a.shape}")
    return a


def pearson(a, b) -> float:
    """Pearson correlation over the frames where both are finite; 0.0 when either side is constant."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 1e-12 else 0.0


# ------------------------------------------------------------------------------------------ mouth sync
def audio_envelope(audio_16k, fps: float, num_frames: int) -> np.ndarray:
    """Per-frame RMS of the audio in a ``1 / fps`` window centred on the frame time ``f / fps``."""
    a = _audio(audio_16k)
    c = np.concatenate([[0.0], np.cumsum(a * a)])
    centre = np.arange(num_frames) / float(fps) * AUDIO_SAMPLE_RATE
    half = 0.5 * AUDIO_SAMPLE_RATE / float(fps)
    lo = np.clip(np.round(centre - half).astype(int), 0, len(a))
    hi = np.clip(np.round(centre + half).astype(int), 0, len(a))
    n = np.maximum(hi - lo, 1)
    return np.sqrt(np.maximum(c[hi] - c[lo], 0.0) / n).astype(np.float32)


def _membership(pixels: np.ndarray, color, tol: float) -> np.ndarray:
    """Soft colour membership ``clip(1 - |rgb - color| / tol, 0, 1)``: blended edge pixels count partly."""
    d = np.sqrt(((pixels - np.asarray(color, np.float32)) ** 2).sum(-1))
    return np.clip(1.0 - d / tol, 0.0, 1.0)


NOSE_TIP = 23 + 30  # iBUG point 30: an anchor on the head that does not move with the mouth


def mouth_opening(frames, kpts, mouth_color=MOUTH_COLOR, tolerance: float = MOUTH_TOLERANCE) -> np.ndarray:
    """Per-frame mouth opening measured from pixels, in fractions of the frame height.

    The measuring box must not itself follow the mouth: the lip keypoints move with the driving audio, so a box
    fitted to them per frame would grow with the opening and correlate with the audio even on pure noise. The box
    therefore has the clip's median lip-box size (grown by 35 % of the mouth width, at least 2 px, on each side)
    and follows the head through the nose tip (the median lip-centre offset from the nose). The opening is the
    mouth-interior-coloured area in it (soft count) divided by the median mouth width in pixels, i.e. the mean
    inner-mouth height. ``nan`` for frames whose lips or nose are not visible.
    """
    x = as_frames(frames)
    k = as_kpts(kpts, x.shape[0])
    n, h, w, _ = x.shape
    out = np.full(n, np.nan, np.float32)
    lips, nose = k[:, LIPS], k[:, NOSE_TIP]
    visible = ((lips[:, :, 2] > 0).sum(1) >= 4) & (nose[:, 2] > 0)
    if not visible.any():
        return out
    boxes, centres = [], []
    for f in np.flatnonzero(visible):
        v = lips[f, lips[f, :, 2] > 0]
        px, py = v[:, 0] * w, v[:, 1] * h
        boxes.append((px.max() - px.min(), py.max() - py.min()))
        centres.append(((px.max() + px.min()) / 2 - nose[f, 0] * w, (py.max() + py.min()) / 2 - nose[f, 1] * h))
    width, height = np.median(np.asarray(boxes), axis=0)
    width = max(float(width), 1.0)
    dx, dy = np.median(np.asarray(centres), axis=0)
    m = max(0.35 * width, 2.0)
    half_w, half_h = width / 2 + m, float(height) / 2 + m
    for f in np.flatnonzero(visible):
        cx, cy = nose[f, 0] * w + dx, nose[f, 1] * h + dy
        x0, x1 = int(max(0, math.floor(cx - half_w))), int(min(w, math.ceil(cx + half_w)))
        y0, y1 = int(max(0, math.floor(cy - half_h))), int(min(h, math.ceil(cy + half_h)))
        if x1 <= x0 or y1 <= y0:
            continue
        out[f] = float(_membership(x[f, y0:y1, x0:x1], mouth_color, tolerance).sum()) / width / h
    return out


def mouth_sync(frames, kpts, audio, fps: float, shifts: tuple[int, ...] | None = None) -> dict[str, float]:
    """Lip sync: Pearson correlation of the measured mouth opening with the driving audio's RMS envelope.

    ``control`` is the same correlation against the envelope circularly shifted by ``shifts`` frames
    (default ``F/5, 2F/5, 3F/5, 4F/5``), averaged: what an unsynchronised mouth would score.
    All ``nan`` below :data:`MIN_SYNC_FRAMES` frames (a correlation over fewer frames is noise).
    """
    opening = mouth_opening(frames, kpts)
    n = len(opening)
    if n < MIN_SYNC_FRAMES:
        return {"sync": float("nan"), "control": float("nan"), "sync_minus_control": float("nan")}
    env = audio_envelope(audio, fps, n)
    if shifts is None:
        shifts = tuple(sorted({int(round(n * j / 5)) for j in range(1, 5)} - {0, n}))
    sync = pearson(opening, env)
    controls = [pearson(opening, np.roll(env, s)) for s in shifts]
    control = float(np.nanmean(controls)) if controls and np.isfinite(controls).any() else float("nan")
    return {"sync": sync, "control": control, "sync_minus_control": sync - control}


# ------------------------------------------------------------------------------------------ hands
def _hsv_sv(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = pixels.max(-1)
    s = np.where(v > 1e-6, (v - pixels.min(-1)) / np.maximum(v, 1e-6), 0.0)
    return s, v


def glove_colors_from_reference(reference) -> dict[str, tuple[float, float, float]]:
    """The two glove colours of a reference image: its saturated bright pixels, split into two colour
    clusters (2-means in RGB); the cluster lying further left in the image is the person's right glove
    (true in the neutral reference pose, where each hand stays on its own side of the midline).
    Empty when the reference shows no gloves (e.g. a headshot)."""
    img = as_image(reference)
    h, w, _ = img.shape
    s, v = _hsv_sv(img)
    ys, xs = np.nonzero((s > GLOVE_MIN_SATURATION) & (v > GLOVE_MIN_VALUE))
    if len(xs) < 4:
        return {}
    cols = img[ys, xs]
    left_half = xs < w / 2
    if left_half.all() or (~left_half).all():
        return {}
    centres = np.stack([cols[left_half].mean(0), cols[~left_half].mean(0)])
    for _ in range(8):
        label = ((cols[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        if (label == 0).all() or (label == 1).all():
            return {}
        centres = np.stack([cols[label == j].mean(0) for j in (0, 1)])
    mean_x = [xs[label == j].mean() for j in (0, 1)]
    right, left = (0, 1) if mean_x[0] < mean_x[1] else (1, 0)
    # the colour itself: the more saturated half of each cluster (edge pixels blended by resizing or
    # chroma subsampling are less saturated and would pull the mean towards the surroundings)
    sat = s[ys, xs]
    pure = [cols[(label == j) & (sat >= np.median(sat[label == j]))].mean(0) for j in (0, 1)]
    return {"left": tuple(map(float, pure[left])), "right": tuple(map(float, pure[right]))}


def hand_placement(frames, kpts, reference=None, glove_colors: dict | None = None,
                   tolerance: float = GLOVE_TOLERANCE) -> dict[str, float]:
    """Distance between each glove's pixel centroid and the centroid of its driving hand keypoints.

    Glove colours come from ``glove_colors`` (``{"left": rgb, "right": rgb}`` in ``[0, 1]``) or from the
    reference (:func:`glove_colors_from_reference`). A hand is scored in a frame when at least 15 of its
    21 keypoints are visible; a scored hand whose glove area is below a quarter of the reference's
    (at least one pixel) counts as missing and costs :data:`MISSING_HAND_ERROR`.

    Returns ``hand_error`` (normalised frame units), ``hand_error_px`` (pixels of these frames),
    ``hand_detect_rate`` (fraction of scored hands with glove pixels) and ``hand_count`` (scored hands).
    """
    x = as_frames(frames)
    k = as_kpts(kpts, x.shape[0])
    nan = {"hand_error": float("nan"), "hand_error_px": float("nan"), "hand_detect_rate": float("nan"),
           "hand_count": 0.0}
    colors = glove_colors if glove_colors is not None else (
        glove_colors_from_reference(reference) if reference is not None else {})
    if not colors:
        return nan
    _, h, w, _ = x.shape
    # a hand counts as present with at least a quarter of its glove area in the reference (>= 1 pixel)
    min_area = {side: 1.0 for side in colors}
    if reference is not None and glove_colors is None:
        ref = as_image(reference)
        for side, c in colors.items():
            share = float(_membership(ref, c, tolerance).mean())
            min_area[side] = max(1.0, 0.25 * share * h * w)
    gx = (np.arange(w, dtype=np.float32) + 0.5) / w
    gy = (np.arange(h, dtype=np.float32) + 0.5) / h
    errs, errs_px, found = [], [], 0
    for f in range(x.shape[0]):
        for side, sl in HANDS.items():
            if side not in colors:
                continue
            hk = k[f, sl]
            vis = hk[:, 2] > 0
            if vis.sum() < 15:
                continue
            target = hk[vis, :2].mean(0)
            m = _membership(x[f], colors[side], tolerance)
            total = float(m.sum())
            if total < min_area[side]:
                errs.append(MISSING_HAND_ERROR)
                errs_px.append(MISSING_HAND_ERROR * math.hypot(w, h) / math.sqrt(2))
                continue
            found += 1
            cx = float((m.sum(0) * gx).sum() / total)
            cy = float((m.sum(1) * gy).sum() / total)
            dx, dy = cx - target[0], cy - target[1]
            errs.append(math.hypot(dx, dy))
            errs_px.append(math.hypot(dx * w, dy * h))
    if not errs:
        return nan
    return {"hand_error": float(np.mean(errs)), "hand_error_px": float(np.mean(errs_px)),
            "hand_detect_rate": found / len(errs), "hand_count": float(len(errs))}


# ------------------------------------------------------------------------------------------ identity
def _palette(pixels: np.ndarray, levels: int = 8, min_share: float = 0.002) -> np.ndarray:
    """Dominant colours: the mean colour of each ``levels^3`` RGB bin holding at least ``min_share`` of the pixels."""
    q = np.minimum((pixels * levels).astype(np.int64), levels - 1)
    idx = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    counts = np.bincount(idx, minlength=levels ** 3).astype(np.float64)
    sums = np.stack([np.bincount(idx, weights=pixels[:, c], minlength=levels ** 3) for c in range(3)], 1)
    keep = counts >= max(1.0, min_share * len(pixels))
    return (sums[keep] / counts[keep, None]).astype(np.float32)


def _to_palette_distance(pixels: np.ndarray, palette: np.ndarray) -> float:
    d = np.full(len(pixels), np.inf, np.float32)
    for c in palette:  # P passes over N pixels: small memory at any resolution
        d = np.minimum(d, ((pixels - c) ** 2).sum(-1))
    return float(np.sqrt(d).mean())


def identity_distance(frames, reference, max_frames: int = 8, max_pixels: int = 65536) -> float:
    """Symmetric colour-set distance (unit RGB) between generated frames and the reference image.

    Mean distance of each frame pixel to the reference's dominant colours, averaged with the mean
    distance of each reference pixel to the frames' dominant colours (so missing colours count too).
    Pose-independent; ~0.01-0.03 for the right identity, several times more for another one.
    """
    x = as_frames(frames)
    ref = as_image(reference).reshape(-1, 3)
    sel = np.unique(np.linspace(0, x.shape[0] - 1, min(max_frames, x.shape[0])).round().astype(int))
    gen = x[sel].reshape(-1, 3)
    gen = gen[:: max(1, len(gen) // max_pixels)]
    ref = ref[:: max(1, len(ref) // max_pixels)]
    return 0.5 * (_to_palette_distance(gen, _palette(ref)) + _to_palette_distance(ref, _palette(gen)))


# ------------------------------------------------------------------------------------------ flicker
def _moving_parts_mask(k: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pixels the person's moving parts (head with hair, arms, hands) may cover in a frame with keypoints ``k``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px, py = (xx + 0.5) / w, (yy + 0.5) / h
    mask = np.zeros((h, w), bool)
    face = k[FACE]
    fv = face[face[:, 2] > 0, :2]
    if len(fv) >= 5:
        # the 68 face points span the jaw width and brows-to-chin; head with hair (and long hair) spans
        # ~1.2x that width and from ~0.75 of that height above the brows to ~0.2 below the chin
        lo, hi = fv.min(0), fv.max(0)
        hw, hh = (hi[0] - lo[0]) / 2, hi[1] - lo[1]
        cx, cy = (lo[0] + hi[0]) / 2, lo[1] + 0.22 * hh
        rx, ry = 1.35 * hw + 2.0 / w, 1.12 * hh + 2.0 / h
        mask |= ((px - cx) / max(rx, 1e-6)) ** 2 + ((py - cy) / max(ry, 1e-6)) ** 2 < 1.0
    for a, b in ARMS:
        if k[a, 2] > 0 and k[b, 2] > 0:
            ax, ay, bx, by = k[a, 0], k[a, 1], k[b, 0], k[b, 1]
            abx, aby = bx - ax, by - ay
            t = np.clip(((px - ax) * abx + (py - ay) * aby) / max(abx * abx + aby * aby, 1e-9), 0, 1)
            mask |= (px - ax - t * abx) ** 2 + (py - ay - t * aby) ** 2 < 0.06 ** 2
    for sl in HANDS.values():
        hv = k[sl][k[sl][:, 2] > 0, :2]
        if len(hv):
            c = hv.mean(0)
            r = float(np.sqrt(((hv - c) ** 2).sum(1)).max()) + 0.05
            mask |= (px - c[0]) ** 2 + (py - c[1]) ** 2 < r * r
    return mask


def background_color(reference) -> np.ndarray:
    """Median colour of the reference's top row and the upper halves of its side columns."""
    img = as_image(reference)
    h = img.shape[0]
    border = np.concatenate([img[0], img[: h // 2, 0], img[: h // 2, -1]])
    return np.median(border, axis=0)


def background_flicker(frames, kpts=None, reference=None, tolerance: float = 0.15) -> float:
    """Mean absolute change (unit intensity) between consecutive frames over static background pixels.

    Static pixels: outside the moving parts given by the keypoints of both frames (when given) and, when
    a reference is given, where the frames' temporal median is within ``tolerance`` of the reference's
    background colour (skipped when that would drop below 2 % of the pixels and below half of the
    keypoint mask, e.g. when the generated background has the wrong colour). ``0.0`` for a repeated
    static frame; ``nan`` for fewer than two frames or when no pixel is static.
    """
    x = as_frames(frames)
    n, h, w, _ = x.shape
    if n < 2:
        return float("nan")
    if kpts is not None:
        k = as_kpts(kpts, n)
        moving = np.stack([_moving_parts_mask(k[f], h, w) for f in range(n)])
        static = ~(moving[:-1] | moving[1:])  # (n - 1, h, w)
    else:
        static = np.ones((n - 1, h, w), bool)
    if reference is not None:
        near_bg = np.sqrt(((np.median(x, axis=0) - background_color(reference)) ** 2).sum(-1)) < tolerance
        gated = static & near_bg[None]
        if gated.mean() >= 0.02 or gated.mean() >= 0.5 * static.mean():
            static = gated
    if not static.any():
        return float("nan")
    diff = np.abs(x[1:] - x[:-1]).mean(-1)  # (n - 1, h, w)
    per_pair = [(d[m].mean() if m.any() else 0.0) for d, m in zip(diff, static)]
    return float(np.mean(per_pair))


# ------------------------------------------------------------------------------------------ all of them
# the keys of :func:`oracle_metrics`, in a fixed order (distributed reductions rely on it)
ORACLE_METRICS = ("mouth_sync", "mouth_sync_control", "mouth_sync_margin", "hand_error", "hand_error_px",
                  "hand_detect_rate", "identity_distance", "flicker")


def oracle_metrics(generated, reference, kpts, audio, fps: float) -> dict[str, float]:
    """All oracle metrics of one clip (a leading batch dim of 1 is accepted on every input).

    Keys: ``mouth_sync``, ``mouth_sync_control``, ``mouth_sync_margin``, ``hand_error``, ``hand_error_px``,
    ``hand_detect_rate``, ``identity_distance``, ``flicker``.
    """
    frames = as_frames(generated)
    k = as_kpts(kpts, frames.shape[0])
    ref = as_image(reference)
    sync = mouth_sync(frames, k, audio, float(_numpy(fps).reshape(-1)[0]))
    hands = hand_placement(frames, k, reference=ref)
    return {
        "mouth_sync": sync["sync"], "mouth_sync_control": sync["control"],
        "mouth_sync_margin": sync["sync_minus_control"],
        "hand_error": hands["hand_error"], "hand_error_px": hands["hand_error_px"],
        "hand_detect_rate": hands["hand_detect_rate"],
        "identity_distance": identity_distance(frames, ref),
        "flicker": background_flicker(frames, k, ref),
    }
