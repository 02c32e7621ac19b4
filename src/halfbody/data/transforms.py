"""Clip-window sampling, fps resampling by frame index, audio windows, resize/crop and HPA padding geometry.

Coordinates: a keypoint's normalised ``x`` is the continuous pixel coordinate ``x * W`` (pixel centres at
``i + 0.5``). Every geometric transform here is an axis-aligned scale + offset (``Geometry``) applied
identically to frames, reference images, keypoints and boxes, so conditions always line up with pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from halfbody.data.media import AUDIO_SAMPLE_RATE


class BadSample(Exception):
    """A shard sample that cannot become a training sample. ``category`` groups the counts, ``detail`` says why."""

    def __init__(self, category: str, detail: str = ""):
        self.category, self.detail = category, detail
        super().__init__(f"{category}: {detail}" if detail else category)

    @property
    def reason(self) -> str:
        return str(self)


def _round(x):
    """Round half up (numpy rounds half to even, which would make frame picks depend on parity)."""
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5).astype(np.int64)


# ------------------------------------------------------------------------------------------ windows
def frame_indices(start_frame: int, num_frames: int, fps_src: float, fps_tgt: float) -> np.ndarray:
    """Source frame of each target frame: ``j -> round(start_time * fps_src + j * fps_src / fps_tgt)``.

    ``start_time = start_frame / fps_src``, so the window starts exactly on a source frame.
    """
    return _round(start_frame + np.arange(num_frames) * (fps_src / fps_tgt))


def max_start_frame(total_frames: int, num_frames: int, fps_src: float, fps_tgt: float) -> int:
    """The last source frame a window of ``num_frames`` target frames can start on (-1 if the clip is too short)."""
    span = int(_round((num_frames - 1) * (fps_src / fps_tgt)))
    return total_frames - 1 - span


def sample_window(total_frames: int, num_frames: int, fps_src: float, fps_tgt: float,
                  rng: np.random.Generator | None) -> tuple[int, np.ndarray]:
    """A random window (or the window at frame 0 when ``rng`` is None). Returns ``(start_frame, indices)``."""
    last = max_start_frame(total_frames, num_frames, fps_src, fps_tgt)
    if last < 0:
        raise BadSample("clip too short", f"{total_frames} frames at {fps_src:g} fps < {num_frames} frames at {fps_tgt:g} fps")
    start = 0 if rng is None else int(rng.integers(0, last + 1))
    idx = frame_indices(start, num_frames, fps_src, fps_tgt)
    return start, np.clip(idx, 0, total_frames - 1)


def audio_window(audio: np.ndarray, start_frame: int, fps_src: float, num_frames: int, fps_tgt: float,
                 sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """The audio of a window: ``S = round(num_frames / fps_tgt * sample_rate)`` samples from ``start_frame / fps_src``.

    A shortfall of up to one frame (the longer of a source and a target frame; the schema allows the wav to be
    one frame short) is zero-padded; a longer one raises ``BadSample("audio too short")``.
    """
    n = int(_round(num_frames / fps_tgt * sample_rate))
    a0 = int(_round(start_frame / fps_src * sample_rate))
    seg = np.asarray(audio[a0 : a0 + n], dtype=np.float32)
    missing = n - seg.shape[0]
    if missing > 0:
        tolerance = int(math.ceil(sample_rate / min(fps_src, fps_tgt))) + 1
        if missing > tolerance:
            raise BadSample("audio too short", f"{audio.shape[0]} samples at {sample_rate} Hz, window needs "
                            f"[{a0}, {a0 + n}) (short by {missing} > {tolerance})")
        seg = np.pad(seg, (0, missing))
    return seg


def audio_context(audio: np.ndarray, start_frame: int, fps_src: float, window_samples: int,
                  context: str | tuple[float, float], sample_rate: int = AUDIO_SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """The audio the encoder hears around a window, and the window's offset in it (EchoMimicV2 parity issue §1).

    The release encodes a clip's whole audio and slices each frame's feature window from it, so a frame hears
    the speech before and after it whatever the training window's length. ``context``:

    - ``"clip"``: the clip's whole audio (zero-padded to the window's end when the wav is up to a frame short);
    - ``(before_s, after_s)``: that many seconds before the window's first and after its last sample, zeros where
      they fall outside the clip (constant length for a given window).

    Returns ``(samples (S_ctx,) float32, offset)``: the window ``audio_window(...)`` is ``samples[offset:offset + n]``.
    """
    a0 = int(_round(start_frame / fps_src * sample_rate))
    if context == "clip":
        lo, hi = 0, max(int(audio.shape[0]), a0 + window_samples)
    else:
        before, after = context
        lo = a0 - int(_round(before * sample_rate))
        hi = a0 + window_samples + int(_round(after * sample_rate))
    out = np.zeros(hi - lo, dtype=np.float32)
    s0, s1 = max(lo, 0), min(hi, int(audio.shape[0]))
    if s1 > s0:
        out[s0 - lo : s1 - lo] = audio[s0:s1]
    return out, a0 - lo


def reference_index(total_frames: int, indices: np.ndarray, rng: np.random.Generator | None) -> int:
    """A source frame outside the window ``[indices[0], indices[-1]]`` for the reference image.

    Training (``rng``): uniform over the frames outside the window. Validation (``rng`` None): the last frame
    after the window, else the one just before it. Fallback when the window covers the whole clip: a frame
    inside the window (random for training, the window's middle for validation), i.e. the reference is then
    one of the target frames.
    """
    lo, hi = int(indices[0]), int(indices[-1])
    outside = np.concatenate([np.arange(0, lo), np.arange(hi + 1, total_frames)])
    if outside.size:
        if rng is None:
            return int(total_frames - 1 if hi < total_frames - 1 else lo - 1)
        return int(outside[rng.integers(0, outside.size)])
    if rng is None:
        return int(indices[len(indices) // 2])
    return int(indices[rng.integers(0, len(indices))])


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Geometry:
    """Maps a source frame ``(src_w, src_h)`` onto the output canvas ``(out_w, out_h)``.

    ``box`` is an integer source-pixel box ``(x0, y0, x1, y1)`` that fills the whole canvas; it may reach
    outside the source image, in which case the outside part is padding. The in-image part ``(ix0..ix1)``
    is resized onto the integer canvas rect ``paste = (ox0, oy0, ox1, oy1)``; every mapping (frames, keypoints,
    boxes) uses that same pair of rectangles, so they agree exactly.
    """

    src_w: int
    src_h: int
    out_w: int
    out_h: int
    box: tuple[int, int, int, int]

    @property
    def inner(self) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.box
        return max(x0, 0), max(y0, 0), min(x1, self.src_w), min(y1, self.src_h)

    @property
    def paste(self) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = self.box
        ix0, iy0, ix1, iy1 = self.inner
        sx, sy = self.out_w / (x1 - x0), self.out_h / (y1 - y0)
        ox0, oy0 = int(round((ix0 - x0) * sx)), int(round((iy0 - y0) * sy))
        ox1, oy1 = int(round((ix1 - x0) * sx)), int(round((iy1 - y0) * sy))
        return ox0, oy0, max(ox1, ox0 + 1), max(oy1, oy0 + 1)

    @property
    def is_padded(self) -> bool:
        return self.paste != (0, 0, self.out_w, self.out_h)

    def _affine(self) -> tuple[float, float, float, float]:
        """``out_px = a * src_px + b`` per axis: returns ``(ax, bx, ay, by)``."""
        ix0, iy0, ix1, iy1 = self.inner
        ox0, oy0, ox1, oy1 = self.paste
        ax, ay = (ox1 - ox0) / max(ix1 - ix0, 1), (oy1 - oy0) / max(iy1 - iy0, 1)
        return ax, ox0 - ax * ix0, ay, oy0 - ay * iy0

    def for_size(self, width: int, height: int) -> Geometry:
        """The same normalised crop for a source of another size (e.g. a reference image at another resolution)."""
        if (width, height) == (self.src_w, self.src_h):
            return self
        fx, fy = width / self.src_w, height / self.src_h
        x0, y0, x1, y1 = self.box
        box = (int(round(x0 * fx)), int(round(y0 * fy)), int(round(x1 * fx)), int(round(y1 * fy)))
        return Geometry(width, height, self.out_w, self.out_h, box)

    # -- frames
    def _resized(self, frames: np.ndarray) -> torch.Tensor:
        """The in-image part of uint8 ``(T, H, W, 3)`` frames resized onto the paste rect: uint8 ``(T, 3, h, w)``."""
        frames = np.asarray(frames)
        if frames.shape[1:3] != (self.src_h, self.src_w):
            raise ValueError(f"frames are {frames.shape[1:3]}, geometry expects {(self.src_h, self.src_w)}")
        ix0, iy0, ix1, iy1 = self.inner
        ox0, oy0, ox1, oy1 = self.paste
        # uint8 channels-last antialiased bilinear: several times faster on CPU than the float path.
        crop = torch.from_numpy(np.require(frames[:, iy0:iy1, ix0:ix1], requirements=["C", "W"])).permute(0, 3, 1, 2)
        size = (oy1 - oy0, ox1 - ox0)
        if crop.shape[-2:] != size:
            crop = F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)
        return crop

    def _canvas_slices(self) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
        """``(canvas rows/cols, resized-crop rows/cols)`` of the visible part of the paste rect (it may extend
        beyond the canvas when the box is smaller than the image on one side); None when nothing is visible."""
        ox0, oy0, _, _ = self.paste
        cx0, cy0, cx1, cy1 = self.valid_rect()
        if cx1 <= cx0 or cy1 <= cy0:
            return None
        return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - oy0, cy1 - oy0), slice(cx0 - ox0, cx1 - ox0))

    def apply_frames(self, frames: np.ndarray, pad_value: int = 0) -> torch.Tensor:
        """uint8 ``(T, H, W, 3)`` -> float32 ``(T, 3, out_h, out_w)`` in ``[-1, 1]`` (padding = ``pad_value`` in 0..255)."""
        crop = self._resized(frames).contiguous().float().div_(127.5).sub_(1.0)
        if not self.is_padded:
            return crop
        out = torch.full((crop.shape[0], 3, self.out_h, self.out_w), pad_value / 127.5 - 1.0)
        sl = self._canvas_slices()
        if sl is not None:
            (rows, cols), (crows, ccols) = sl
            out[:, :, rows, cols] = crop[:, :, crows, ccols]
        return out

    def apply_frames_uint8(self, frames: np.ndarray, pad_value: int = 0, chunk: int = 32) -> np.ndarray:
        """uint8 ``(T, H, W, 3)`` -> uint8 ``(T, out_h, out_w, 3)``: the same pixels as :meth:`apply_frames`, kept in
        uint8 end to end (for writing clips), ``chunk`` frames at a time for bounded memory."""
        frames = np.asarray(frames)
        out = np.full((frames.shape[0], self.out_h, self.out_w, 3), pad_value, np.uint8)
        sl = self._canvas_slices()
        if sl is None:
            return out
        (rows, cols), (crows, ccols) = sl
        for s in range(0, frames.shape[0], chunk):
            crop = self._resized(frames[s : s + chunk]).permute(0, 2, 3, 1).numpy()
            out[s : s + chunk, rows, cols] = crop[:, crows, ccols]
        return out

    def valid_rect(self) -> tuple[int, int, int, int]:
        ox0, oy0, ox1, oy1 = self.paste
        return max(ox0, 0), max(oy0, 0), min(ox1, self.out_w), min(oy1, self.out_h)

    # -- points and boxes
    def apply_keypoints(self, kpts: np.ndarray) -> np.ndarray:
        """``(..., 133, 3)`` normalised to the source -> output *pixels* (scores unchanged)."""
        ax, bx, ay, by = self._affine()
        out = np.array(kpts, dtype=np.float32, copy=True)
        out[..., 0] = ax * (out[..., 0] * self.src_w) + bx
        out[..., 1] = ay * (out[..., 1] * self.src_h) + by
        return out

    def apply_box(self, box: Sequence[float]) -> np.ndarray:
        """A normalised source box ``[x0, y0, x1, y1]`` -> output pixel box."""
        ax, bx, ay, by = self._affine()
        x0, y0, x1, y1 = (float(v) for v in box)
        return np.array([ax * x0 * self.src_w + bx, ay * y0 * self.src_h + by,
                         ax * x1 * self.src_w + bx, ay * y1 * self.src_h + by], dtype=np.float32)


def crop_geometry(src_w: int, src_h: int, out_w: int, out_h: int, rng: np.random.Generator | None = None,
                  scale_jitter: float = 0.0) -> Geometry:
    """Resize the shorter side (relative to the output aspect) to cover the canvas, then crop.

    ``rng`` None: centre crop. Otherwise a uniformly random crop position and, with ``scale_jitter > 0``,
    a random zoom-in of up to that fraction.
    """
    s = max(out_w / src_w, out_h / src_h)
    if rng is not None and scale_jitter > 0:
        s *= 1.0 + float(rng.uniform(0.0, scale_jitter))
    bw = min(src_w, max(1, int(round(out_w / s))))
    bh = min(src_h, max(1, int(round(out_h / s))))
    if rng is None:
        x0, y0 = (src_w - bw) // 2, (src_h - bh) // 2
    else:
        x0, y0 = int(rng.integers(0, src_w - bw + 1)), int(rng.integers(0, src_h - bh + 1))
    return Geometry(src_w, src_h, out_w, out_h, (x0, y0, x0 + bw, y0 + bh))


def headshot_geometry(src_w: int, src_h: int, out_w: int, out_h: int, head_box: Sequence[float],
                      target_head_box: Sequence[float]) -> Geometry:
    """HPA padding (EchoMimicV2 §3.3): place a headshot so its head lands where half-body heads sit.

    The headshot is scaled uniformly so that its head box (normalised source coordinates) matches the size of
    ``target_head_box`` (normalised output coordinates; geometric mean of the width and height ratios) and
    its centre lands on the target's centre. Whatever of the canvas the headshot does not cover is padding.
    """
    hx0, hy0, hx1, hy1 = (float(v) for v in head_box)
    tx0, ty0, tx1, ty1 = (float(v) for v in target_head_box)
    hw, hh = (hx1 - hx0) * src_w, (hy1 - hy0) * src_h
    tw, th = (tx1 - tx0) * out_w, (ty1 - ty0) * out_h
    if hw <= 0 or hh <= 0 or tw <= 0 or th <= 0:
        raise BadSample("bad head box", f"head box {list(head_box)} / target {list(target_head_box)} has no area")
    s = math.sqrt((tw / hw) * (th / hh))  # output px per source px
    cx, cy = (hx0 + hx1) / 2 * src_w, (hy0 + hy1) / 2 * src_h
    bw, bh = out_w / s, out_h / s
    x0 = cx - (tx0 + tx1) / 2 * out_w / s
    y0 = cy - (ty0 + ty1) / 2 * out_h / s
    box = (int(round(x0)), int(round(y0)), int(round(x0 + bw)), int(round(y0 + bh)))
    if box[2] <= 0 or box[3] <= 0 or box[0] >= src_w or box[1] >= src_h:
        raise BadSample("bad head box", f"head box {list(head_box)} places the headshot outside the canvas")
    return Geometry(src_w, src_h, out_w, out_h, box)


def face_geometry(src_w: int, src_h: int, out_w: int, out_h: int, head_box: Sequence[float]) -> Geometry:
    """A face close-up (MirrorMe §3.4, first training phase): the head box grown to the output aspect ratio about its
    centre, so the face fills the canvas; parts of the box outside the frame are padding (marked invalid)."""
    hx0, hy0, hx1, hy1 = (float(v) for v in head_box)
    bw, bh = (hx1 - hx0) * src_w, (hy1 - hy0) * src_h
    if bw <= 0 or bh <= 0:
        raise BadSample("bad head box", f"head box {list(head_box)} has no area")
    aspect = out_w / out_h
    if bw / bh < aspect:
        bw = bh * aspect
    else:
        bh = bw / aspect
    cx, cy = (hx0 + hx1) / 2 * src_w, (hy0 + hy1) / 2 * src_h
    box = (int(round(cx - bw / 2)), int(round(cy - bh / 2)), int(round(cx + bw / 2)), int(round(cy + bh / 2)))
    return Geometry(src_w, src_h, out_w, out_h, box)


def keypoint_box(kpts: np.ndarray, indices: Sequence[int], score_threshold: float) -> np.ndarray | None:
    """The normalised box of the visible keypoints ``indices`` over all frames (median per side), or None."""
    pts = np.asarray(kpts, dtype=np.float32)[:, list(indices)]
    boxes = []
    for frame in pts:
        v = frame[frame[:, 2] >= score_threshold]
        if v.shape[0] >= 2:
            boxes.append((v[:, 0].min(), v[:, 1].min(), v[:, 0].max(), v[:, 1].max()))
    if not boxes:
        return None
    box = np.median(np.asarray(boxes, dtype=np.float32), axis=0)
    return box if box[2] > box[0] and box[3] > box[1] else None


def parse_resolution(resolution) -> tuple[int, int]:
    """``512`` or ``[H, W]`` -> ``(H, W)``."""
    if isinstance(resolution, (int, np.integer)):
        h = w = int(resolution)
    elif isinstance(resolution, Sequence) and not isinstance(resolution, str) and len(resolution) == 2:
        h, w = (int(v) for v in resolution)
    else:
        raise ValueError(f"resolution={resolution!r}: expected an int or [H, W]")
    if h < 8 or w < 8:
        raise ValueError(f"resolution={resolution!r}: must be at least 8 pixels per side")
    return h, w
