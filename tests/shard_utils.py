"""Writes schema-following (shared/DESIGN.md §1) and deliberately broken samples into real tar shards.

Video is real H.264 mp4 (media.encode_video), audio real RIFF/WAVE at any rate and channel count, keypoints
a plausible half-body or headshot layout. Frames can carry their source index in their grey level
(``index_level``/``decode_index``) so tests can tell which source frame ended up where.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from halfbody.data import media


# ------------------------------------------------------------------------------------------ frames
def index_level(i: int) -> int:
    """Grey level that encodes source frame ``i`` (survives H.264 and resizing: flat frames)."""
    return 20 + 5 * (i % 46)


def decode_index(pixels) -> int:
    """Source frame index of a flat output frame/region given in ``[-1, 1]``."""
    level = (float(np.asarray(pixels, dtype=np.float64).mean()) + 1.0) * 127.5
    return int(round((level - 20) / 5))


def index_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    return np.stack([np.full((height, width, 3), index_level(i), np.uint8) for i in range(num_frames)])


def dot_frames(num_frames: int, height: int, width: int, xy: tuple[int, int], radius: int = 1) -> np.ndarray:
    """Dark frames with a white square dot centred on pixel ``xy``."""
    frames = np.full((num_frames, height, width, 3), 30, np.uint8)
    x, y = xy
    frames[:, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = 255
    return frames


# ------------------------------------------------------------------------------------------ keypoints
def _face68(cx: float, cy: float, fw: float, fh: float) -> np.ndarray:
    """68 iBUG-ordered face points around a face centre (normalised units)."""
    pts = np.zeros((68, 2), np.float32)
    t = np.linspace(np.pi, 0, 17)
    pts[0:17] = np.stack([cx - np.cos(t) * fw / 2, cy + np.sin(t) * fh / 2 * 0.9], 1)  # jaw (lower arc)
    pts[17:27] = np.stack([np.linspace(cx - 0.4 * fw, cx + 0.4 * fw, 10), np.full(10, cy - 0.3 * fh)], 1)  # brows
    pts[27:36] = np.stack([np.full(9, cx), np.linspace(cy - 0.2 * fh, cy + 0.1 * fh, 9)], 1)  # nose
    pts[36:42] = np.stack([cx - 0.2 * fw + 0.05 * fw * np.cos(np.linspace(0, 6.28, 6)), np.full(6, cy - 0.15 * fh)], 1)
    pts[42:48] = np.stack([cx + 0.2 * fw + 0.05 * fw * np.cos(np.linspace(0, 6.28, 6)), np.full(6, cy - 0.15 * fh)], 1)
    a = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    pts[48:68] = np.stack([cx + 0.2 * fw * np.cos(a), cy + 0.25 * fh + 0.06 * fh * np.sin(a)], 1)  # lips
    return pts


def _hand21(wx: float, wy: float, size: float, direction: float = -1.0) -> np.ndarray:
    pts = [(wx, wy)]
    for f in range(5):
        dx = (f - 2) * size * 0.15
        for j in range(1, 5):
            pts.append((wx + dx * j * 0.5, wy + direction * size * 0.2 * j))
    return np.asarray(pts, np.float32)


def person_keypoints(num_frames: int, kind: str = "halfbody", sway: float = 0.01) -> np.ndarray:
    """``(T, 133, 3)`` float32 normalised keypoints of a plausible half-body or headshot layout."""
    k = np.zeros((133, 3), np.float32)
    if kind == "headshot":
        cx, cy, fw, fh = 0.5, 0.5, 0.45, 0.55
    else:
        cx, cy, fw, fh = 0.5, 0.22, 0.16, 0.2
    face = _face68(cx, cy, fw, fh)
    k[23:91, :2], k[23:91, 2] = face, 0.9
    k[0, :2] = (cx, cy)  # nose
    k[1, :2], k[2, :2] = (cx + 0.1 * fw, cy - 0.15 * fh), (cx - 0.1 * fw, cy - 0.15 * fh)  # eyes (left = image right)
    k[3, :2], k[4, :2] = (cx + 0.5 * fw, cy - 0.05 * fh), (cx - 0.5 * fw, cy - 0.05 * fh)  # ears
    k[0:5, 2] = 0.9
    if kind == "halfbody":
        k[5, :2], k[6, :2] = (0.7, 0.45), (0.3, 0.45)  # shoulders
        k[7, :2], k[8, :2] = (0.78, 0.68), (0.22, 0.68)  # elbows
        k[9, :2], k[10, :2] = (0.66, 0.85), (0.34, 0.85)  # wrists
        k[5:11, 2] = 0.9
        k[91:112, :2], k[91:112, 2] = _hand21(0.66, 0.85, 0.12), 0.8
        k[112:133, :2], k[112:133, 2] = _hand21(0.34, 0.85, 0.12), 0.8
    out = np.repeat(k[None], num_frames, axis=0)
    out[..., 0] += sway * np.sin(np.arange(num_frames) / 3.0)[:, None] * (out[..., 2] > 0)
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------ audio
def encode_wav_any(samples: np.ndarray, sample_rate: int) -> bytes:
    """``(S,)`` or ``(S, C)`` float in [-1, 1] -> 16-bit PCM WAVE with C channels."""
    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 1:
        x = x[:, None]
    ch = x.shape[1]
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, ch, sample_rate,
                         sample_rate * 2 * ch, 2 * ch, 16, b"data", len(pcm))
    return header + pcm


def tone_burst(num_frames: int, fps: float, sample_rate: int, frame: int | None, channels: int = 1,
               freq: float = 1000.0, seconds: float | None = None) -> np.ndarray:
    """Silence with a sine burst exactly over source frame ``frame`` (``[frame/fps, (frame+1)/fps)``)."""
    n = int(round((seconds if seconds is not None else num_frames / fps) * sample_rate))
    x = np.zeros(n, np.float32)
    if frame is not None:
        a, b = int(round(frame / fps * sample_rate)), int(round((frame + 1) / fps * sample_rate))
        t = np.arange(b - a) / sample_rate
        x[a:b] = 0.8 * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


# ------------------------------------------------------------------------------------------ samples
def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def make_sample(
    key: str,
    *,
    num_frames: int = 16,
    fps: float = 25.0,
    height: int = 48,
    width: int = 64,
    kind: str = "halfbody",
    identity: str | None = None,
    frames: np.ndarray | None = None,
    kpts: np.ndarray | None = None,
    audio: np.ndarray | None = None,
    audio_rate: int = 16000,
    tone_frame: int | None = 3,
    head_box: Sequence[float] | None = None,
    ref: np.ndarray | None = None,
    extra: dict[str, bytes] | None = None,
) -> dict:
    """One schema-following sample as ``{"__key__", "mp4", "wav", "kpts.npy", "json", ...}`` of bytes."""
    frames = index_frames(num_frames, height, width) if frames is None else frames
    kpts = person_keypoints(num_frames, kind) if kpts is None else kpts
    audio = tone_burst(num_frames, fps, audio_rate, tone_frame) if audio is None else audio
    meta = {"fps": fps, "num_frames": num_frames, "width": width, "height": height, "kind": kind,
            "identity": identity or f"id_{key}", "source": "tests/shard_utils"}
    if head_box is not None:
        meta["head_box"] = [float(v) for v in head_box]
    sample = {
        "__key__": key,
        "mp4": media.encode_video(frames, fps),
        "wav": encode_wav_any(audio, audio_rate),
        "kpts.npy": npy_bytes(np.asarray(kpts, np.float32)),
        "json": json.dumps(meta).encode(),
    }
    if ref is not None:
        sample["ref.png"] = png_bytes(ref)
    sample.update(extra or {})
    return sample


# Each breaks one thing; the value is the reason category the loader must report.
BREAKAGES: dict[str, str] = {
    "missing_field": "missing field",
    "bad_json": "bad json",
    "json_missing_key": "bad json",
    "nan_kpts": "NaN keypoints",
    "wrong_shape": "wrong array shape",
    "undecodable_mp4": "undecodable mp4",
    "audio_short": "audio too short",
    "empty_mp4": "undecodable mp4",
    "pixel_kpts": "pixel-unit keypoints",
    "absurd_rate_wav": "undecodable wav",  # a 16 Hz header: refused before anything is resampled
    "mislabelled_rate_wav": "audio duration mismatch",  # 16 kHz samples under an 8 kHz header: twice too long
    "empty_wav": "undecodable wav",
    "unfinished_empty_wav": "audio too short",  # a header never finalised, and no samples after it
}

# Each makes a sample that still trains after a repair; the value is the repair's reason category.
REPAIRS: dict[str, str] = {
    "unfinished_wav": "unfinished wav header",
    "stereo_cancel": "stereo cancels",
}


def unfinished_wav(wav: bytes, size: int = 0, keep_samples: bool = True) -> bytes:
    """A WAVE file whose writer never finalised the header: RIFF and data sizes left at ``size`` (0 or
    0xFFFFFFFF), with its samples after the header (``keep_samples``) or none."""
    riff = bytearray(wav)
    pos = riff.index(b"data")
    riff[4:8] = struct.pack("<I", size)
    riff[pos + 4 : pos + 8] = struct.pack("<I", size)
    return bytes(riff if keep_samples else riff[: pos + 8])


def with_wav_rate(wav: bytes, rate: int) -> bytes:
    """The same samples under a header that claims another sample rate."""
    out = bytearray(wav)
    ch, bits = struct.unpack("<H", out[22:24])[0], struct.unpack("<H", out[34:36])[0]
    out[24:28] = struct.pack("<I", rate)
    out[28:32] = struct.pack("<I", rate * ch * bits // 8)
    return bytes(out)


def broken_sample(key: str, how: str, **kw) -> dict:
    """A sample broken in one way (``BREAKAGES``)."""
    s = make_sample(key, **kw)
    n = kw.get("num_frames", 16)
    if how == "missing_field":
        del s["wav"]
    elif how == "bad_json":
        s["json"] = b'{"fps": 25, "num_frames": '
    elif how == "json_missing_key":
        meta = json.loads(s["json"])
        del meta["fps"]
        s["json"] = json.dumps(meta).encode()
    elif how == "nan_kpts":
        k = person_keypoints(n)
        k[2, 5, 0] = np.nan
        s["kpts.npy"] = npy_bytes(k)
    elif how == "wrong_shape":
        s["kpts.npy"] = npy_bytes(np.zeros((n, 17, 3), np.float32))
    elif how == "undecodable_mp4":
        s["mp4"] = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8
    elif how == "audio_short":
        fps = kw.get("fps", 25.0)
        s["wav"] = encode_wav_any(tone_burst(n, fps, 16000, None, seconds=n / fps / 4), 16000)
    elif how == "empty_mp4":
        s["mp4"] = b""
    elif how == "pixel_kpts":
        k = person_keypoints(n)
        k[..., 0] *= kw.get("width", 64)
        k[..., 1] *= kw.get("height", 48)
        s["kpts.npy"] = npy_bytes(k)
    elif how == "absurd_rate_wav":
        s["wav"] = with_wav_rate(s["wav"], 16)
    elif how == "mislabelled_rate_wav":
        s["wav"] = with_wav_rate(s["wav"], kw.get("audio_rate", 16000) // 2)
    elif how == "empty_wav":
        s["wav"] = b""
    elif how == "unfinished_empty_wav":
        s["wav"] = unfinished_wav(s["wav"], keep_samples=False)
    else:
        raise ValueError(f"unknown breakage {how!r}; known: {sorted(BREAKAGES)}")
    return s


def repaired_sample(key: str, how: str, **kw) -> dict:
    """A sample with a defect the loader repairs (``REPAIRS``)."""
    if how == "stereo_cancel":  # the right channel is the left one inverted: a plain downmix is silence
        fps, n, rate = kw.get("fps", 25.0), kw.get("num_frames", 16), kw.get("audio_rate", 16000)
        left = tone_burst(n, fps, rate, kw.pop("tone_frame", 3))
        return make_sample(key, audio=np.stack([left, -left], axis=1), **kw)
    s = make_sample(key, **kw)
    if how == "unfinished_wav":
        s["wav"] = unfinished_wav(s["wav"], size=0)
    else:
        raise ValueError(f"unknown repair {how!r}; known: {sorted(REPAIRS)}")
    return s


def write_shard(path: str | Path, samples: Sequence[dict]) -> Path:
    """Write samples (bytes fields) into a tar shard with webdataset's TarWriter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    return path


def truncate_within_last_member(path: str | Path, field: str = "mp4") -> None:
    """Cut a shard in the middle of the last sample's ``field`` member (a download that broke off)."""
    import tarfile

    path = Path(path)
    with tarfile.open(path) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith("." + field)]
    last = members[-1]
    cut = last.offset_data + last.size // 2
    with open(path, "r+b") as f:
        f.truncate(cut)


def truncate_within_member_header(path: str | Path, member: int, into: int = 100) -> int:
    """Cut a shard ``into`` bytes into the header of its ``member``-th member (0: the first): tarfile takes the cut
    for a clean end of archive. Returns the new size."""
    import tarfile

    path = Path(path)
    with tarfile.open(path) as tf:
        offset = tf.getmembers()[member].offset
    with open(path, "r+b") as f:
        f.truncate(offset + into)
    return offset + into


def write_shards(directory: str | Path, make: Callable[[int], dict], num_samples: int, per_shard: int,
                 prefix: str = "shard") -> list[Path]:
    """``num_samples`` samples from ``make(i)`` into shards of ``per_shard`` samples."""
    directory = Path(directory)
    paths = []
    for s, start in enumerate(range(0, num_samples, per_shard)):
        samples = [make(i) for i in range(start, min(num_samples, start + per_shard))]
        paths.append(write_shard(directory / f"{prefix}-{s:06d}.tar", samples))
    return paths


def leave_pyav_graph_garbage() -> None:
    """Leave a PyAV audio resampler, whose filter graph holds a thread pool, as uncollected cyclic garbage (with the
    garbage collector disabled): a process forked now that collects it waits forever on threads it does not have."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
    frame.sample_rate = 44100
    resampler.resample(frame)
    cycle = {"resampler": resampler}
    cycle["self"] = cycle
