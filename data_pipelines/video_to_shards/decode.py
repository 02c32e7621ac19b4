"""Decoding a source: frames at the target frame rate (variable-rate sources included) and 16 kHz mono audio.

Frames are streamed, never held for a whole video. Each decoded frame is converted only when it is picked, and it
is downscaled during the colour conversion (swscale), so a 4K source costs a 4K *decode* but nothing else at 4K. A display-matrix rotation (phone videos) is applied, so portrait videos come out portrait.

Resampling to the target rate is by presentation time: output frame ``j`` shows at ``t0 + j / fps`` and is the
source frame whose timestamp is nearest (a tie goes to the later frame). This is exact for constant-rate sources
and handles variable-rate ones (and dropped frames) without assuming a nominal rate.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from halfbody.data.media import AUDIO_SAMPLE_RATE


class SourceError(Exception):
    """A source (or one clip of it) that cannot be used. ``str(e)`` is the one-line reason ``category: detail``."""

    def __init__(self, category: str, detail: str = ""):
        self.category, self.detail = category, detail
        super().__init__(f"{category}: {detail}" if detail else category)


END_SLACK = 0.5  # seconds a list entry's end may pass the video's end (then the segment stops at the video's end)
_AV_ERRORS = (av.error.FFmpegError, EOFError, OSError, ValueError, IndexError, RuntimeError)


def _first_line(e: BaseException) -> str:
    """``Type: message`` on one line (FFmpeg errors without their errno and file name)."""
    text = getattr(e, "strerror", None) if isinstance(e, av.error.FFmpegError) else None
    msg = (text or str(e)).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip(": ")


@dataclass
class Frame:
    """One output frame: output index ``j``, its time (seconds from the segment start), the index of the source
    frame shown (presentation order from the start of the file), and the RGB image at working size."""

    index: int
    time: float
    src_index: int
    image: np.ndarray
    thumb: np.ndarray | None = None  # a small float32 RGB thumbnail (content-change measure), when asked for


@dataclass
class VideoInfo:
    width: int  # displayed size (after rotation), source pixels
    height: int
    work_width: int  # after the early downscale (video.max_side)
    work_height: int
    rotation: int  # degrees counter-clockwise applied to the stored frames
    duration: float | None  # seconds, when the container knows it
    origin: float  # presentation time (s) of the video's start: timecodes are relative to it

    @property
    def scale(self) -> float:
        return self.work_width / self.width


def _rotation_of(frame) -> int:
    try:
        rot = int(round(float(getattr(frame, "rotation", 0) or 0)))
    except (TypeError, ValueError):
        rot = 0
    return rot % 360 if rot % 90 == 0 else 0


def _frame_time(frame, stream, fallback_index: int, fallback_rate: float) -> float:
    if frame.pts is not None:
        tb = frame.time_base or stream.time_base
        if tb is not None:
            return float(frame.pts * tb)
    return fallback_index / fallback_rate


def _presentation_pts(path: str) -> list[int] | None:
    """Sorted packet timestamps of the first video stream (demux only, no decoding), or None when any is missing."""
    with av.open(path, mode="r") as c:
        s = c.streams.video[0]
        pts = []
        for pkt in c.demux(s):
            if pkt.size == 0:
                continue
            if pkt.pts is None:
                return None
            pts.append(int(pkt.pts))
    pts.sort()
    return pts


class VideoReader:
    """Streams the frames of ``path`` at ``fps`` over ``[start, end)`` seconds (None: the whole video).

    ``need_src_index``: report each frame's presentation index from the file start (sidecar keypoints are
    indexed by it); costs one demux pass over the file. Raises ``SourceError`` (``undecodable video``,
    ``timecodes outside video``).
    """

    def __init__(self, path: str, fps: float, max_side: int, start: float | None = None, end: float | None = None,
                 need_src_index: bool = False, thumb_width: int | None = None):
        self.path, self.fps, self.max_side = str(path), float(fps), int(max_side)
        self.thumb_width = thumb_width
        self._scaler, self._thumbs = VideoReformatter(), VideoReformatter()
        self.start, self.end = start, end
        self.need_src_index = need_src_index
        self.info: VideoInfo | None = None
        self.frames_emitted = 0
        self.video_end: float | None = None  # presentation end of the last decoded frame (segment-relative)
        self.truncated: tuple[float, float] | None = None  # (decoded end, declared duration) of a cut-off file
        self._open_info()

    def _open_info(self) -> None:
        try:
            with av.open(self.path, mode="r") as c:
                if not c.streams.video:
                    raise SourceError("undecodable video", "no video stream")
                s = c.streams.video[0]
                duration = None
                if s.duration is not None and s.time_base is not None:
                    duration = float(s.duration * s.time_base)
                elif c.duration is not None:
                    duration = c.duration / 1e6
                origin = float(s.start_time * s.time_base) if s.start_time is not None and s.time_base else 0.0
                rate = s.average_rate or s.guessed_rate
                self._nominal_rate = float(rate) if rate else 25.0
                first = next(c.decode(s), None)
                if first is None:
                    raise SourceError("undecodable video", "no decodable frames")
                rot = _rotation_of(first)
                w, h = (first.height, first.width) if rot in (90, 270) else (first.width, first.height)
        except SourceError:
            raise
        except _AV_ERRORS as e:
            raise SourceError("undecodable video", _first_line(e)) from e
        scale = min(1.0, self.max_side / max(w, h))
        ww, wh = max(2, int(round(w * scale))), max(2, int(round(h * scale)))
        self.info = VideoInfo(w, h, ww, wh, rot, duration, origin)
        if self.start is not None and duration is not None:
            if self.start >= duration or (self.end is not None and self.end > duration + END_SLACK):
                raise SourceError("timecodes outside video", f"segment {self.start:.2f}-{self.end:.2f} s but the "
                                  f"video lasts {duration:.2f} s")

    def _convert(self, frame) -> tuple[np.ndarray, np.ndarray | None]:
        """A decoded frame -> (RGB at working size, thumbnail or None), both as displayed."""
        info = self.info
        rot = info.rotation
        rw, rh = (info.work_height, info.work_width) if rot in (90, 270) else (info.work_width, info.work_height)
        thumb = None
        if self.thumb_width:  # its own swscale context (a shared one would be rebuilt at every size switch)
            tw = max(2, min(self.thumb_width, frame.width))
            th = max(2, int(round(frame.height * tw / frame.width)))
            thumb = self._thumbs.reformat(frame, tw, th, "rgb24", interpolation="FAST_BILINEAR").to_ndarray()
            thumb = np.rot90(thumb, k=rot // 90).astype(np.float32) if rot else thumb.astype(np.float32)
        img = self._scaler.reformat(frame, rw, rh, "rgb24", interpolation="AREA").to_ndarray()  # anti-aliased
        if rot:
            img = np.ascontiguousarray(np.rot90(img, k=rot // 90))
        return img, thumb

    def __iter__(self) -> Iterator[Frame]:
        info = self.info
        step = 1.0 / self.fps
        seg_start = info.origin + (self.start or 0.0)
        seg_end = math.inf if self.end is None else info.origin + self.end
        pts_list = None
        try:
            if self.need_src_index:
                pts_list = _presentation_pts(self.path)
            with av.open(self.path, mode="r") as c:
                s = c.streams.video[0]
                s.thread_type = "AUTO"
                # Seek near the segment start when frame indices do not need counting from the file start.
                if (self.start or 0.0) > 1.0 and (pts_list is not None or not self.need_src_index) and s.time_base:
                    c.seek(int((seg_start - 1.0) / s.time_base), stream=s, backward=True, any_frame=False)
                j = 0
                target = seg_start
                prev = prev_t = prev_img = prev_thumb = None
                prev_idx = -1

                def emit(limit: float) -> Iterator[Frame]:
                    """The output frames at target times before ``limit``, all showing ``prev``."""
                    nonlocal j, target, prev_img, prev_thumb
                    while target < limit:
                        if prev_img is None:
                            prev_img, prev_thumb = self._convert(prev)
                        yield Frame(j, target - seg_start, prev_idx, prev_img, prev_thumb)
                        j += 1
                        self.frames_emitted = j
                        target = seg_start + j * step

                last_dur = 1.0 / self._nominal_rate
                count = 0
                for frame in c.decode(s):
                    t = _frame_time(frame, s, count, self._nominal_rate)
                    idx = (bisect.bisect_left(pts_list, frame.pts) if (pts_list is not None and frame.pts is not None)
                           else count)
                    count += 1
                    if frame.duration and frame.time_base:
                        last_dur = float(frame.duration * frame.time_base)
                    if prev is not None and t <= prev_t:
                        continue  # non-increasing timestamp: a broken or duplicated frame
                    if prev is not None:  # the previous frame covers the targets up to the midpoint
                        yield from emit(min((prev_t + t) / 2, seg_end - 1e-9))
                    if target >= seg_end - 1e-9:
                        break
                    prev, prev_t, prev_img, prev_thumb, prev_idx = frame, t, None, None, idx
                if prev is not None:
                    end = min(seg_end, prev_t + last_dur)
                    self.video_end = prev_t + last_dur - seg_start
                    yield from emit(end - 1e-6)
        except SourceError:
            raise
        except _AV_ERRORS as e:
            raise SourceError("undecodable video", f"after {self.frames_emitted} frames: {_first_line(e)}") from e
        if self.end is not None and self.frames_emitted == 0:
            raise SourceError("timecodes outside video", f"segment {self.start:.2f}-{self.end:.2f} s has no frames")
        if self.end is not None and self.video_end is not None:  # the same 0.5 s slack as the up-front check
            if self.video_end < (self.end - (self.start or 0.0)) - END_SLACK:
                raise SourceError("timecodes outside video", f"segment {self.start:.2f}-{self.end:.2f} s but the video "
                                  f"ends at {(self.start or 0.0) + self.video_end:.2f} s")
        if self.frames_emitted == 0:
            raise SourceError("undecodable video", "no decodable frames in the segment")
        if self.end is None and info.duration and self.video_end is not None:
            if self.video_end < info.duration - (self.start or 0.0) - END_SLACK:
                self.truncated = (self.video_end, info.duration)


def decode_audio(path: str, start: float = 0.0, end: float | None = None, origin: float = 0.0) -> np.ndarray:
    """Mono float32 audio at 16 kHz covering ``[start, end)`` seconds of ``path`` (relative to ``origin``, the
    video's start time, for a video's own track; 0 for a separate audio file). Sample 0 is at ``start``; a part
    the file does not cover is missing at the end (the caller decides whether the audio is long enough).

    Raises ``SourceError("no audio")`` when the file has no audio stream, ``SourceError("undecodable audio")``.
    """
    seg_start = origin + start
    seg_end = math.inf if end is None else origin + end
    chunks: list[np.ndarray] = []
    first_t = None
    try:
        with av.open(str(path), mode="r") as c:
            if not c.streams.audio:
                raise SourceError("no audio", "no audio track")
            s = c.streams.audio[0]
            if start > 2.0 and s.time_base:
                c.seek(int((seg_start - 1.0) / s.time_base), stream=s, backward=True, any_frame=False)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_SAMPLE_RATE)
            n = 0
            for frame in c.decode(s):
                if first_t is None:
                    tb = frame.time_base or s.time_base
                    first_t = float(frame.pts * tb) if (frame.pts is not None and tb) else origin
                for out in resampler.resample(frame):
                    arr = out.to_ndarray().reshape(-1).astype(np.float32)
                    chunks.append(arr)
                    n += arr.size
                if first_t + n / AUDIO_SAMPLE_RATE > seg_end + 0.5:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32))
    except SourceError:
        raise
    except _AV_ERRORS as e:
        raise SourceError("undecodable audio", _first_line(e)) from e
    if first_t is None or not chunks:
        raise SourceError("no audio", "the audio track has no samples")
    audio = np.concatenate(chunks)
    a0 = int(round((seg_start - first_t) * AUDIO_SAMPLE_RATE))
    if a0 < 0:  # the audio starts after the segment start: pad its beginning with silence
        audio = np.concatenate([np.zeros(-a0, np.float32), audio])
        a0 = 0
    out = audio[a0:]
    if end is not None:
        out = out[: int(round((seg_end - seg_start) * AUDIO_SAMPLE_RATE))]
    if not np.all(np.isfinite(out)):
        raise SourceError("undecodable audio", "non-finite samples")
    return np.ascontiguousarray(out, dtype=np.float32)

