"""Video and audio I/O on PyAV (bundled FFmpeg with libx264 and AAC) and plain RIFF/WAVE parsing.

Every reader takes bytes (a webdataset field) or a path; every writer writes to a temporary name and
renames when complete, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import io
import os
import struct
from fractions import Fraction
from math import gcd
from pathlib import Path

import av
import numpy as np
from scipy.signal import resample_poly

from halfbody.utils.io import atomic_output

AUDIO_SAMPLE_RATE = 16_000  # every loader works at 16 kHz mono (shared/DESIGN.md §1)


class MediaError(ValueError):
    """A media payload that cannot be decoded; the message names what is wrong."""


def _as_file(data: bytes | str | os.PathLike):
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)


# --------------------------------------------------------------------------------------------- video
def read_video(data: bytes | str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode every frame of a video.

    Returns:
        frames: uint8 array ``(T, H, W, 3)`` RGB.
        fps: the stream's average frame rate.
    """
    try:
        with av.open(_as_file(data), mode="r") as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except MediaError:
        raise
    except (av.error.FFmpegError, EOFError, OSError, ValueError) as e:  # PyAV raises a zoo of types
        raise MediaError(f"undecodable video: {type(e).__name__}: {e}") from e
    if not frames:
        raise MediaError("video has no decodable frames")
    if rate is None or float(rate) <= 0:
        raise MediaError("video has no frame rate")
    return np.stack(frames), float(rate)


def encode_video(
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = AUDIO_SAMPLE_RATE,
    crf: int = 18,
) -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames as H.264 mp4 bytes, optionally muxing mono float audio as AAC."""
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w + (w % 2), h + (h % 2)  # yuv420p needs even sizes
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "tune": "zerolatency"}
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate)
            astream.layout = "mono"
        for frame in frames:
            if (h % 2) or (w % 2):
                frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if astream is not None:
            pcm = np.clip(np.asarray(audio, dtype=np.float32).reshape(1, -1), -1.0, 1.0)
            chunk = 1024
            for start in range(0, pcm.shape[1], chunk):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start : start + chunk]), format="fltp", layout="mono")
                af.sample_rate = sample_rate
                af.pts = start
                container.mux(astream.encode(af))
            container.mux(astream.encode())
    return buf.getvalue()


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, audio: np.ndarray | None = None,
                sample_rate: int = AUDIO_SAMPLE_RATE) -> Path:
    """Write an mp4 atomically (temporary name, then rename)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(encode_video(frames, fps, audio, sample_rate))
    return Path(path)


def read_video_audio(data: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of a media file to mono float32. Returns ``(samples, sample_rate)``."""
    try:
        with av.open(_as_file(data), mode="r") as container:
            if not container.streams.audio:
                raise MediaError("no audio stream")
            stream = container.streams.audio[0]
            chunks, rate = [], stream.rate
            for frame in container.decode(stream):
                arr = frame.to_ndarray()
                if frame.format.is_planar:
                    arr = arr.mean(axis=0)
                else:
                    arr = arr.reshape(-1, len(frame.layout.channels)).mean(axis=1)
                if arr.dtype.kind in "iu":
                    arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
                chunks.append(arr.astype(np.float32))
    except MediaError:
        raise
    except (av.error.FFmpegError, EOFError, OSError, ValueError) as e:
        raise MediaError(f"undecodable audio: {type(e).__name__}: {e}") from e
    if not chunks:
        raise MediaError("audio stream has no samples")
    return np.concatenate(chunks), int(rate)


# --------------------------------------------------------------------------------------------- audio
_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(data: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Parse a RIFF/WAVE file (integer PCM 8/16/24/32 bit or IEEE float 32/64), downmixed to mono float32.

    Returns ``(samples, sample_rate)``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = Path(data).read_bytes()
    data = bytes(data)
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MediaError("not a RIFF/WAVE file")
    pos, fmt, payload = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = data[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            if len(body) < 16:
                raise MediaError("truncated WAVE fmt chunk")
            fmt = struct.unpack("<HHIIHH", body[:16])
            if fmt[0] == _WAVE_FORMAT_EXTENSIBLE and len(body) >= 26:
                fmt = (struct.unpack("<H", body[24:26])[0],) + fmt[1:]
        elif cid == b"data":
            payload = body
        pos += 8 + size + (size & 1)
    if fmt is None or payload is None:
        raise MediaError("WAVE file without fmt or data chunk")
    tag, channels, rate, _, block_align, bits = fmt
    if channels < 1 or rate < 1 or block_align < 1:
        raise MediaError(f"bad WAVE header: channels={channels} rate={rate}")
    n = len(payload) // block_align
    payload = payload[: n * block_align]
    width = bits // 8
    if tag == _WAVE_FORMAT_PCM and width in (1, 2, 4):
        dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        x = np.frombuffer(payload, dtype=dtype).astype(np.float32)
        x = (x - 128.0) / 128.0 if width == 1 else x / float(np.iinfo(dtype).max)
    elif tag == _WAVE_FORMAT_PCM and width == 3:
        b = np.frombuffer(payload, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        x = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16))
        x = np.where(x >= 1 << 23, x - (1 << 24), x).astype(np.float32) / float(1 << 23)
    elif tag == _WAVE_FORMAT_FLOAT and width in (4, 8):
        x = np.frombuffer(payload, dtype=np.float32 if width == 4 else np.float64).astype(np.float32)
    else:
        raise MediaError(f"unsupported WAVE encoding: format tag {tag}, {bits} bits")
    x = x.reshape(-1, channels).mean(axis=1)
    if not np.all(np.isfinite(x)):
        raise MediaError("WAVE samples are not finite")
    return np.ascontiguousarray(x, dtype=np.float32), int(rate)


def encode_wav(samples: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """Mono float samples in [-1, 1] -> 16-bit PCM WAVE bytes."""
    pcm = (np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, _WAVE_FORMAT_PCM, 1,
                         sample_rate, sample_rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int = AUDIO_SAMPLE_RATE) -> Path:
    """Write a 16-bit PCM WAVE file atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(encode_wav(samples, sample_rate))
    return Path(path)


def resample_audio(samples: np.ndarray, source_rate: int, target_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of mono audio (anti-aliased)."""
    if source_rate == target_rate:
        return np.asarray(samples, dtype=np.float32)
    g = gcd(int(source_rate), int(target_rate))
    return resample_poly(samples, target_rate // g, source_rate // g).astype(np.float32)


def load_audio_16k(data: bytes | str | os.PathLike) -> np.ndarray:
    """A WAVE payload -> mono float32 at 16 kHz."""
    samples, rate = read_wav(data)
    return resample_audio(samples, rate, AUDIO_SAMPLE_RATE)
