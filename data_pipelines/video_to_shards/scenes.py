"""Scene splitting by content change, then cutting scenes into clips of a configured length range.

MirrorMe §4.1 builds its training set from YouTube speech videos through "a meticulous scene segmentation
process"; EchoMimicV2 §4.1 curates half-body speech clips from internet videos. Here a cut is a frame whose
thumbnail differs from the previous one by more than ``scenes.cut_threshold`` (mean absolute RGB difference on a
``scenes.thumb_width``-wide box-averaged thumbnail, 0..255): a talking person moves a few levels per frame, a
camera cut changes most pixels.

Everything is streaming: ``ClipCutter`` holds at most ``max_clip + min_clip`` frames. A scene of length ``L``
becomes clips of at most ``scenes.max_clip_seconds`` (a long scene gives full-length clips and a last part of at
least ``min_clip``, split evenly when it is longer than ``max_clip``). Rejected here, with a reason:

- a scene shorter than ``filters.min_scene_seconds`` next to a cut: ``too-fast camera cuts``;
- a clip shorter than ``scenes.min_clip_seconds``: ``clip too short``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decode import Frame


def thumbnail(image: np.ndarray, width: int) -> np.ndarray:
    """Box-averaged float32 thumbnail about ``width`` pixels wide (aspect kept)."""
    h, w = image.shape[:2]
    b = max(1, w // width)
    hh, ww = (h // b) * b, (w // b) * b
    if hh == 0 or ww == 0:
        return image.astype(np.float32)
    x = image[:hh, :ww].astype(np.float32).reshape(hh, ww // b, b, 3).sum(2)
    return x.reshape(hh // b, b, ww // b, 3).sum(1) / float(b * b)


class CutDetector:
    """Online content-change detector: ``score(image)`` is the change from the previous frame (0..255)."""

    def __init__(self, threshold: float, thumb_width: int = 64):
        self.threshold = float(threshold)
        self.thumb_width = int(thumb_width)
        self._prev: np.ndarray | None = None

    def score(self, image: np.ndarray, thumb: np.ndarray | None = None) -> float:
        """Change from the previous frame; ``thumb`` (e.g. made by the decoder) saves computing it here."""
        t = thumb if thumb is not None else thumbnail(image, self.thumb_width)
        prev, self._prev = self._prev, t
        if prev is None or prev.shape != t.shape:
            return 0.0
        return float(np.abs(t - prev).mean())

    def is_cut(self, image: np.ndarray, thumb: np.ndarray | None = None) -> bool:
        return self.score(image, thumb) > self.threshold


@dataclass
class Segment:
    """A clip candidate: consecutive output frames of one scene, or a rejected stretch (``rejection`` set, no frames)."""

    scene: int
    start_index: int  # output frame index of the first frame
    num_frames: int
    fps: float
    frames: list[Frame] = field(default_factory=list)
    rejection: str | None = None

    @property
    def start(self) -> float:
        return self.start_index / self.fps

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps

    def where(self, offset: float = 0.0) -> str:
        return f"{offset + self.start:.2f}-{offset + self.start + self.seconds:.2f} s"


class ClipCutter:
    """Feeds frames (with the cut flags of a ``CutDetector``), returns finished ``Segment``s."""

    def __init__(self, fps: float, min_clip_seconds: float, max_clip_seconds: float, min_scene_seconds: float):
        self.fps = float(fps)
        self.min_frames = max(1, int(round(min_clip_seconds * fps)))
        self.max_frames = max(self.min_frames, int(round(max_clip_seconds * fps)))
        self.min_scene_frames = int(round(min_scene_seconds * fps))
        self.min_clip_seconds, self.min_scene_seconds = min_clip_seconds, min_scene_seconds
        self.scene = -1
        self._buf: list[Frame] = []
        self._scene_len = 0
        self._scene_started_by_cut = False
        self._fast: Segment | None = None  # consecutive too-short scenes, reported as one stretch
        self._fast_scenes = 0

    def push(self, frame: Frame, cut: bool) -> list[Segment]:
        out: list[Segment] = []
        if cut or self.scene < 0:
            if self.scene >= 0:
                out += self._merge_fast(self._close(ended_by_cut=True))
            self.scene += 1
            self._buf, self._scene_len = [], 0
            self._scene_started_by_cut = cut
        self._buf.append(frame)
        self._scene_len += 1
        if len(self._buf) >= self.max_frames + self.min_frames:  # a full clip, and at least a short one after it
            out += self._emit_fast() + [self._clip(self._buf[: self.max_frames])]
            self._buf = self._buf[self.max_frames :]
        return out

    def flush(self) -> list[Segment]:
        out = self._merge_fast(self._close(ended_by_cut=False)) if self.scene >= 0 else []
        out += self._emit_fast()
        self._buf = []
        return out

    def _merge_fast(self, segs: list[Segment]) -> list[Segment]:
        """Collect consecutive too-fast scenes into one rejected stretch; pass everything else on."""
        if len(segs) == 1 and segs[0].rejection == "fast":
            s = segs[0]
            if self._fast is None:
                self._fast, self._fast_scenes = s, 1
            else:
                self._fast.num_frames = s.start_index + s.num_frames - self._fast.start_index
                self._fast_scenes += 1
            return []
        return self._emit_fast() + segs

    def _emit_fast(self) -> list[Segment]:
        if self._fast is None:
            return []
        s, n = self._fast, self._fast_scenes
        self._fast = None
        s.rejection = (f"too-fast camera cuts: {n} scene{'s' if n > 1 else ''} of {s.seconds / n:.2f} s on average "
                       f"between cuts (< filters.min_scene_seconds={self.min_scene_seconds:g})")
        return [s]

    def _clip(self, frames: list[Frame]) -> Segment:
        return Segment(self.scene, frames[0].index, len(frames), self.fps, frames)

    def _reject(self, frames: list[Frame], reason: str) -> Segment:
        return Segment(self.scene, frames[0].index, len(frames), self.fps, [], reason)

    def _close(self, ended_by_cut: bool) -> list[Segment]:
        buf = self._buf
        if not buf:
            return []
        near_cut = self._scene_started_by_cut or ended_by_cut
        if self._scene_len < self.min_scene_frames and near_cut:
            return [self._reject(buf, "fast")]  # reason filled in by _emit_fast
        n = len(buf)
        if n <= self.max_frames:
            parts = [buf]
        elif n // 2 >= self.min_frames:
            parts = [buf[: n // 2], buf[n // 2 :]]
        else:
            parts = [buf[: self.max_frames], buf[self.max_frames :]]
        out = []
        for p in parts:
            if len(p) < self.min_frames:
                out.append(self._reject(p, f"clip too short: {len(p) / self.fps:.2f} s (< scenes.min_clip_seconds="
                                           f"{self.min_clip_seconds:g})"))
            else:
                out.append(self._clip(p))
        return out
