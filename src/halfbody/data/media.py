"""Video and audio I/O on PyAV (bundled FFmpeg with libx264 and AAC) and plain RIFF/WAVE parsing.

Every reader takes bytes (a webdataset field) or a path; every writer writes to a temporary name and
renames when complete, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from math import gcd
from pathlib import Path

import av
from av.video.reformatter import VideoReformatter
import numpy as np
from scipy.signal import resample_poly

from halfbody.utils.io import atomic_output

AUDIO_SAMPLE_RATE = 16_000  # every loader works at 16 kHz mono (shared/DESIGN.md §1)


class MediaError(ValueError):
    """A media payload that cannot be decoded; the message names what is wrong."""


def _as_file(data: bytes | str | os.PathLike):
    return io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else str(data)


# --------------------------------------------------------------------------------------------- video
class RGBConverter:
    """Decoded video frames to uint8 ``(H, W, 3)`` RGB arrays, through a colour converter that belongs to this object.

    ``frame.to_ndarray(format="rgb24")`` shares one swscale context per thread (PyAV >= 18.1.1), with a pool of
    worker threads. A forked DataLoader worker inherits the parent's context but not its threads, so its first
    conversion waits for them forever; it happens whenever the parent converted a frame before the fork (a
    validation sample, the synthetic world). One converter per decode call, scaling on one thread (the frames are
    small, and each DataLoader worker is a process of its own), is fork-safe."""

    def __init__(self) -> None:
        self._reformatter = VideoReformatter()

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        return self._reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


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
            to_rgb = RGBConverter()
            frames = [to_rgb(f) for f in container.decode(stream)]
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


@dataclass
class WavAudio:
    """A parsed WAVE file: mono float32 ``samples`` at ``rate`` Hz, and ``notes``: what was repaired on the way
    (an unfinished header, stereo channels that cancel on downmix), one line each."""

    samples: np.ndarray
    rate: int
    channels: int
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.rate


@dataclass
class WavHeader:
    """What a WAVE header says, read without decoding: ``frames`` from the data size (or, for an unfinished
    header, from the bytes the file holds)."""

    format_tag: int
    channels: int
    rate: int
    block_align: int
    bits: int
    frames: int
    payload: bytes
    unfinished: str | None  # why the data size was not trusted (None: a finalised header)

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


_UNSET_SIZES = (0, 0xFFFFFFFF)  # what streaming writers leave in a header they never finalised
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000  # outside: a broken header, not audio
CANCEL_RATIO = 0.05  # a downmix below 5 % of its loudest channel's RMS (-26 dB) is channels cancelling


def parse_wav_header(data: bytes | str | os.PathLike) -> WavHeader:
    """Parse the RIFF/WAVE chunks (no sample decoding). A data chunk whose size was never finalised (0 or
    0xFFFFFFFF, as a writer killed before closing leaves it) or runs past the end of the file covers the bytes
    the file holds. Raises ``MediaError`` naming what is wrong."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        data = Path(data).read_bytes()
    data = bytes(data)
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise MediaError("not a RIFF/WAVE file")
    riff_size = struct.unpack("<I", data[4:8])[0]
    pos, fmt, payload, unfinished = 12, None, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if cid == b"data" and (size in _UNSET_SIZES or pos + 8 + size > len(data)):
            payload = data[pos + 8 :]
            if size in _UNSET_SIZES:
                unfinished = f"unfinished WAVE header (data size {size:#x}, RIFF size {riff_size:#x})"
            else:
                unfinished = f"WAVE data chunk cut short ({len(payload)} of {size} bytes)"
            break
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
    if channels < 1 or block_align < 1:
        raise MediaError(f"bad WAVE header: channels={channels} block_align={block_align}")
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(f"bad WAVE header: sample rate {rate} Hz (expected {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE})")
    frames = len(payload) // block_align
    return WavHeader(tag, channels, rate, block_align, bits, frames, payload[: frames * block_align], unfinished)


def decode_wav(data: bytes | str | os.PathLike | WavHeader) -> WavAudio:
    """Decode a RIFF/WAVE file (integer PCM 8/16/24/32 bit or IEEE float 32/64) to mono float32.

    Repairs, each noted in ``notes``: an unfinished header (the samples the file holds are read); channels that
    cancel on downmix (one inverted: the mix is near-silent while the channels are not) -> the loudest channel.
    A header whose data chunk holds no samples raises ``MediaError`` saying so.
    """
    h = data if isinstance(data, WavHeader) else parse_wav_header(data)
    notes = [h.unfinished] if h.unfinished else []
    if h.frames == 0:
        raise MediaError(f"{h.unfinished}: the file holds no samples" if h.unfinished else "WAVE data chunk is empty")
    payload, channels, width, tag = h.payload, h.channels, h.bits // 8, h.format_tag
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
        raise MediaError(f"unsupported WAVE encoding: format tag {tag}, {h.bits} bits")
    if x.size % channels:
        raise MediaError(f"bad WAVE header: {x.size} samples do not divide into {channels} channels")
    x = x.reshape(-1, channels)
    if not np.all(np.isfinite(x)):
        raise MediaError("WAVE samples are not finite")
    mono = x.mean(axis=1)
    if channels > 1:
        ch_rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=0))
        loudest = int(np.argmax(ch_rms))
        mix_rms = float(np.sqrt(np.mean(np.square(mono, dtype=np.float64))))
        if ch_rms[loudest] > 1e-4 and mix_rms < CANCEL_RATIO * ch_rms[loudest]:
            db = 20 * np.log10(max(mix_rms, 1e-12) / ch_rms[loudest])
            notes.append(f"stereo channels cancel on downmix (mix at {db:.0f} dB of channel {loudest}): "
                         f"used channel {loudest} of {channels}")
            mono = x[:, loudest]
    return WavAudio(np.ascontiguousarray(mono, dtype=np.float32), int(h.rate), channels, notes)


def read_wav(data: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Parse a RIFF/WAVE file (integer PCM 8/16/24/32 bit or IEEE float 32/64), downmixed to mono float32.

    Returns ``(samples, sample_rate)``. See :func:`decode_wav` for the repairs it makes (and reports there).
    """
    wav = decode_wav(data)
    return wav.samples, wav.rate


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


# --------------------------------------------------------------------------------------------- any audio file
def read_audio(data: bytes | str | os.PathLike) -> tuple[np.ndarray, int]:
    """Any audio PyAV decodes (wav, mp3, flac, m4a / aac, ogg, the audio track of an mp4 / mov / mkv ...), downmixed
    to mono float32 at its own rate: ``(samples, sample_rate)``.

    RIFF/WAVE payloads go through :func:`decode_wav` (with its repairs); everything else through PyAV
    (:func:`read_video_audio`). Raises ``MediaError`` naming what is wrong (no audio stream, undecodable, no samples).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        head = bytes(data[:12])
    else:
        try:
            with open(data, "rb") as fh:
                head = fh.read(12)
        except OSError as e:
            raise MediaError(f"cannot be read ({type(e).__name__}: {e})") from e
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return read_wav(data)
    samples, rate = read_video_audio(data)
    try:  # a codec's last frame is padded (AAC: to 1024 samples): keep the stream's own duration when it has one
        with av.open(_as_file(data), mode="r") as container:
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                n = int(round(float(stream.duration * stream.time_base) * rate))
                if 0 < n < samples.shape[0]:
                    samples = samples[:n]
    except (av.error.FFmpegError, OSError, ValueError, IndexError):
        pass
    return samples, rate


def load_audio_file_16k(data: bytes | str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`read_audio`, plus the 16 kHz mono copy the audio encoders take: ``(samples_16k, samples, rate)``."""
    samples, rate = read_audio(data)
    return resample_audio(samples, rate, AUDIO_SAMPLE_RATE), samples, rate
