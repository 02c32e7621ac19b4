"""Generation inputs, decoded and checked: the reference image, the audio, and the pose (a keypoint ``.npy`` or a
driving video whose keypoints the data pipeline's extractor reads). Every problem is one ``UserError`` line that
names the config key (or the batch row) and the file."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from halfbody.data import media
from halfbody.utils.errors import UserError

__all__ = ["IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "load_image", "load_audio", "load_keypoints", "load_pose",
           "driving_video_pose", "reference_image_keypoints", "keypoint_extractor", "ExtractorUnavailable",
           "existing_file"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def existing_file(path: str, key: str) -> Path:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise UserError(f"{key}={str(path)!r} does not exist")
    if p.is_dir():
        raise UserError(f"{key}={str(path)!r} is a directory, expected a file")
    return p


_exists = existing_file


def load_image(path: str, key: str = "ref") -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` image; a file that is not an image is a one-line ``UserError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = _exists(path, key)
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: upright as displayed
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            img = np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{key}={str(path)!r} is not an image PIL can read (png, jpg, webp): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise UserError(f"{key}={str(path)!r}: image is {img.shape[1]}x{img.shape[0]} pixels, too small")
    return img


def load_audio(path: str, key: str, silence_dbfs: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``(16 kHz mono, mono at the file's rate, rate)``; undecodable, empty or silent audio is a ``UserError``."""
    p = _exists(path, key)
    try:
        audio16, samples, rate = media.load_audio_file_16k(p)
    except media.MediaError as e:
        msg = str(e)
        if "no samples" in msg or "is empty" in msg:
            raise UserError(f"{key}={str(path)!r} has no audio samples (zero-length audio)") from None
        raise UserError(f"{key}={str(path)!r}: not decodable audio ({msg})") from None
    if samples.size == 0 or audio16.size == 0:
        raise UserError(f"{key}={str(path)!r} has no audio samples (zero-length audio)")
    if not np.all(np.isfinite(samples)):
        raise UserError(f"{key}={str(path)!r}: audio samples are not finite")
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
    if dbfs < silence_dbfs:
        raise UserError(f"{key}={str(path)!r} is silent ({dbfs:.0f} dBFS RMS over {samples.size / rate:.2f} s, below "
                        f"silence_dbfs={silence_dbfs:g})")
    return audio16, samples, int(rate)


def load_keypoints(path: str, key: str, width: int, height: int, single: bool = False) -> np.ndarray:
    """``(T, 133, 3)`` (``single``: one frame, ``(133, 3)`` or ``(1, 133, 3)``) keypoints in ``[0, 1]``."""
    from halfbody.data.keypoints import NUM_KEYPOINTS, unnormalised_keypoints

    p = _exists(path, key)
    if p.suffix.lower() in VIDEO_SUFFIXES:
        raise UserError(f"{key}={str(path)!r} is a video, expected a keypoint .npy here")
    try:
        k = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{key}={str(path)!r} is not a .npy array ({type(e).__name__}: {e})") from None
    if single and k.ndim == 2:
        k = k[None]
    want = "(133, 3) or (1, 133, 3)" if single else "(T, 133, 3)"
    if k.ndim != 3 or k.shape[1:] != (NUM_KEYPOINTS, 3) or k.shape[0] < 1 or (single and k.shape[0] != 1):
        raise UserError(f"{key}={str(path)!r} has shape {tuple(k.shape)}, expected {want} COCO-WholeBody keypoints")
    if not (np.issubdtype(k.dtype, np.floating) or np.issubdtype(k.dtype, np.integer)):
        raise UserError(f"{key}={str(path)!r} has dtype {k.dtype}, expected float keypoints")
    k = k.astype(np.float32)
    if not np.all(np.isfinite(k)):
        raise UserError(f"{key}={str(path)!r} holds {int((~np.isfinite(k)).sum())} non-finite values")
    units = unnormalised_keypoints(k, width, height)
    if units is not None:
        raise UserError(f"{key}={str(path)!r}: {units}")
    return k




def load_pose(path: str, key: str, width: int, height: int, fps: float,
              extractor: Mapping[str, Any] | None) -> tuple[np.ndarray, float | None]:
    """The pose sequence ``pose=`` names: ``(keypoints (T, 133, 3) in [0, 1], their fps)``. A keypoint ``.npy`` is
    read as given (its fps: ``pose_fps``, returned as None); a driving video (mp4, mov, mkv, webm, avi) goes through
    :func:`driving_video_pose` at the output ``fps``."""
    p = existing_file(path, key)
    if p.suffix.lower() in VIDEO_SUFFIXES:
        return driving_video_pose(path, key, fps, extractor or {}), float(fps)
    return load_keypoints(path, key, width, height), None


#: ``pose_extractor`` keys (conf/generate.yaml) -> ``data_pipelines.video_to_shards`` ``keypoints.*`` keys
EXTRACTOR_KEYS = ("extractor", "det_model", "pose_model", "sidecar_suffix", "det_input_size", "pose_input_size",
                  "det_score", "device")


class ExtractorUnavailable(UserError):
    """The configured keypoint extractor cannot run here: ``rtmlib`` / ``onnxruntime`` not installed (the optional
    ``[pose]`` extra), a DWPose ONNX file missing, or no sidecar next to the file. ``pose=auto`` falls back on it;
    a driving video cannot."""


def keypoint_extractor(extractor: Mapping[str, Any], purpose: str):
    """The data pipeline's extractor (``data_pipelines.video_to_shards.keypoints.make_extractor``) configured by
    ``pose_extractor`` (conf/generate.yaml): ``(extractor, its PipelineConfig)``. An unknown key or kind is a
    ``UserError``; an extractor that cannot run here (see :class:`ExtractorUnavailable`) names its key and
    ``purpose`` (what the keypoints are needed for)."""
    from data_pipelines.video_to_shards.config import ConfigError, KeypointsConfig, PipelineConfig
    from data_pipelines.video_to_shards.keypoints import make_extractor

    opts = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in dict(extractor).items() if v is not None}
    unknown = sorted(set(opts) - set(EXTRACTOR_KEYS))
    if unknown:
        raise UserError(f"pose_extractor has unknown key(s) {unknown}; known: {', '.join(EXTRACTOR_KEYS)}")
    kind = str(opts.get("extractor", "rtmlib"))
    if kind not in ("rtmlib", "sidecar"):
        raise UserError(f"pose_extractor.extractor={kind!r}: expected rtmlib (DWPose ONNX files) or sidecar "
                        "(<stem>.npy keypoints next to the file)")
    if kind == "rtmlib":
        for name in ("det_model", "pose_model"):
            model = opts.get(name)
            if not model or not Path(os.path.expanduser(str(model))).is_file():
                raise ExtractorUnavailable(f"pose_extractor.{name}={model!r}: ONNX file not found (needed to extract "
                                           f"the keypoints of {purpose}; put the DWPose model there or set the key; "
                                           "nothing is downloaded)")
            opts[name] = str(Path(os.path.expanduser(str(model))))
    try:
        cfg = PipelineConfig(keypoints=KeypointsConfig(**opts))
        return make_extractor(cfg), cfg
    except (ConfigError, TypeError, ValueError) as e:
        msg = f"pose_extractor: {str(e).replace('config keypoints.', 'pose_extractor.')}"
        if isinstance(e.__cause__, ImportError):  # rtmlib / onnxruntime missing: the optional [pose] extra
            raise ExtractorUnavailable(msg.replace("keypoints.extractor=", "pose_extractor.extractor=")) from None
        raise UserError(msg) from None


def reference_image_keypoints(image: np.ndarray, path: str, key: str, extractor: Mapping[str, Any]) -> np.ndarray:
    """``(1, 133, 3)`` keypoints of the main person in the reference image ``image`` (``(H, W, 3)`` RGB, as
    :func:`load_image` read ``path``), ``x, y`` in ``[0, 1]`` of the image, score 0 where nothing was found.

    The extractor is the one :func:`driving_video_pose` uses (``pose_extractor``): ``rtmlib`` runs DWPose on the
    image; ``sidecar`` reads ``<ref stem><pose_extractor.sidecar_suffix>`` next to the image (the pipeline's sidecar
    format with one frame: ``(1, 133, 3)`` or ``(1, P, 133, 3)``, normalised or in the image's pixels). Raises
    :class:`ExtractorUnavailable` when the extractor cannot run (no sidecar included), ``UserError`` for a bad
    sidecar."""
    from data_pipelines.video_to_shards.decode import Frame, SourceError, VideoInfo
    from data_pipelines.video_to_shards.sources import Source

    p = existing_file(path, key)
    ex, cfg = keypoint_extractor(extractor, f"the reference image {key}={str(path)!r}")
    sidecar = p.with_name(p.stem + cfg.keypoints.sidecar_suffix)
    h, w = image.shape[:2]
    source = Source(sid="reference", video=str(p), audio=None, sidecar=str(sidecar), identity="reference")
    try:
        ex.open(source, VideoInfo(width=w, height=h, work_width=w, work_height=h, rotation=0, duration=None,
                                  origin=0.0))
        try:
            kpts = ex.extract([Frame(index=0, time=0.0, src_index=0, image=np.ascontiguousarray(image))])[0]
        finally:
            ex.close()
    except SourceError as e:
        if e.category == "missing sidecar":
            raise ExtractorUnavailable(f"pose_extractor.extractor=sidecar: {e.detail} (the reference image "
                                       f"{key}={str(path)!r})") from None
        raise UserError(f"{key}={str(path)!r}: reference image keypoints: {e}") from None
    return kpts.astype(np.float32)


def driving_video_pose(path: str, key: str, fps: float, extractor: Mapping[str, Any],
                       max_side: int = 1024, chunk: int = 64) -> np.ndarray:
    """``(T, 133, 3)`` keypoints of the main person in a driving video, one row per output frame at ``fps``.

    The video is decoded by presentation time at ``fps`` (variable frame rates and rotation flags handled; the pose
    is thus resampled to the output's frame rate) and its keypoints come from the extractor of
    ``data_pipelines.video_to_shards`` (``pose_extractor.extractor``, :func:`keypoint_extractor`): ``rtmlib`` runs
    DWPose / RTMW from the local ONNX files ``pose_extractor.det_model`` / ``pose_extractor.pose_model`` (a missing
    file is one line naming its key; nothing is downloaded), ``sidecar`` reads
    ``<video stem><pose_extractor.sidecar_suffix>`` next to the video (keypoints per source frame, as the pipeline's
    sidecar). ``x, y`` are normalised to the video's frame as displayed, which is taken as the reference image's
    frame (a driving video framed like the reference).
    """
    from data_pipelines.video_to_shards.decode import SourceError, VideoReader
    from data_pipelines.video_to_shards.sources import Source

    p = existing_file(path, key)
    ex, cfg = keypoint_extractor(extractor, f"the driving video {key}={str(path)!r}")
    kind = cfg.keypoints.extractor
    source = Source(sid="driving", video=str(p), audio=None,
                    sidecar=str(p.with_name(p.stem + cfg.keypoints.sidecar_suffix)), identity="driving")
    try:
        reader = VideoReader(str(p), fps=float(fps), max_side=max_side if kind == "rtmlib" else 64,
                             need_src_index=ex.needs_src_index)
        ex.open(source, reader.info)
        try:
            parts, frames = [], []
            for frame in reader:
                frames.append(frame)
                if len(frames) == chunk:
                    parts.append(ex.extract(frames)[0])
                    frames = []
            if frames:
                parts.append(ex.extract(frames)[0])
        finally:
            ex.close()
    except SourceError as e:
        raise UserError(f"{key}={str(path)!r}: driving video: {e}") from None
    kpts = np.concatenate(parts).astype(np.float32)
    if not (kpts[..., 2] > 0).any():
        raise UserError(f"{key}={str(path)!r}: no keypoints found in the driving video ({kpts.shape[0]} frames)")
    return kpts
