"""Pipeline configuration: nested dataclasses, loadable from YAML, every threshold a named key.

``load_config(path, overrides)`` reads a YAML file (see ``example.yaml``) and ``section.key=value`` overrides
(values parsed as YAML). Unknown keys and bad values fail with one line naming the key and the value, e.g.
``config crop.size=-3: must be an even integer >= 16``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value or file; the message names the key (or file) and the value."""


@dataclass
class InputConfig:
    """Where sources come from (the input folder or list file itself is a CLI argument)."""

    video_extensions: list[str] = field(default_factory=lambda: ["mp4", "mov", "mkv", "webm"])
    audio_extensions: list[str] = field(default_factory=lambda: ["wav", "mp3", "m4a", "aac", "flac", "ogg", "opus"])
    # A separate audio file per video: ``<audio_dir>/<video stem>.<audio ext>``, else next to the video. It is
    # used instead of the video's own audio track (time 0 of the audio file = time 0 of the video).
    audio_dir: str | None = None
    # List files: the folder where the listed videos (URLs or relative paths) were downloaded. Default: the
    # list file's folder. A URL entry is matched by its YouTube id (``v=...``, ``youtu.be/...``) or last path part.
    video_dir: str | None = None
    # Identity of a folder source: ``auto`` = the first sub-folder under the input root when there is one, else
    # the video's stem; ``stem``; ``folder`` (the video's parent folder name).
    identity: str = "auto"
    recursive: bool = True


@dataclass
class VideoConfig:
    fps: float = 25.0  # output frame rate (24 or 25 for the two families); variable-rate sources are resampled
    max_side: int = 1024  # frames are downscaled while decoding so the longer side is at most this (4K inputs)


@dataclass
class ScenesConfig:
    """Scene splitting by content change (MirrorMe §4.1) and cutting scenes into clips."""

    cut_threshold: float = 30.0  # mean |RGB difference| (0..255) of consecutive thumbnails that marks a cut
    thumb_width: int = 64  # thumbnail width for the content-change measure
    min_clip_seconds: float = 2.0  # shorter clips are rejected ("clip too short")
    max_clip_seconds: float = 10.0  # longer scenes are cut into clips of at most this length


@dataclass
class KeypointsConfig:
    """Whole-body keypoints (COCO-WholeBody-133). ``extractor``: ``sidecar`` or ``rtmlib``."""

    extractor: str = "sidecar"
    # sidecar: ``<video stem><sidecar_suffix>`` next to the video: float (T_src, 133, 3) or (T_src, P, 133, 3),
    # x, y normalised to the source frame as displayed, score in [0, 1]; one row per decoded source frame.
    sidecar_suffix: str = ".npy"
    # rtmlib (DWPose / RTMW on onnxruntime): local ONNX files, nothing is downloaded.
    det_model: str = "pretrained/dwpose/yolox_l.onnx"
    pose_model: str = "pretrained/dwpose/dw-ll_ucoco_384.onnx"
    det_input_size: list[int] = field(default_factory=lambda: [640, 640])  # [h, w] of the detector
    pose_input_size: list[int] = field(default_factory=lambda: [288, 384])  # [w, h] of the pose model
    det_score: float = 0.5  # a detection at or above this score counts as a person
    device: str = "cpu"  # onnxruntime device: cpu | cuda | cuda:N


@dataclass
class CropConfig:
    """The half-body crop (EchoMimicV2 §4.1) and the optional headshot crop (§3.3 headshot data)."""

    size: int = 512  # square output side
    score_threshold: float = 0.3  # keypoints at or above this score define the box
    # The box runs from above the head (top face/head keypoint minus head_top_margin x face height) down to the
    # lowest body keypoint (bottom_keypoints, plus hands when include_hands) plus bottom_margin x box height.
    head_top_margin: float = 0.8
    bottom_keypoints: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9, 10, 11, 12])
    include_hands: bool = True
    bottom_margin: float = 0.05
    side_margin: float = 0.1  # added left and right of the widest keypoint extent, fraction of its width
    fit: str = "shrink"  # a box larger than the frame: shrink (to the frame's shorter side) or pad
    pad_value: int = 0  # padding where the box leaves the frame (0..255), crop.fit=pad
    headshot: bool = False  # also write a tight head crop of each clip, tagged kind: headshot
    headshot_size: int = 512
    headshot_margin: float = 0.35  # added on each side of the head box, fraction of its larger side


@dataclass
class FilterConfig:
    """Clip filters; each rejection carries a reason naming the threshold's key."""

    score_threshold: float = 0.3  # a keypoint with at least this score is visible
    min_single_person_fraction: float = 0.9  # frames with exactly one person
    min_face_points: int = 34  # of the 68 face points, visible for a frame to show the face
    min_face_fraction: float = 0.8  # frames that show the face
    min_keypoint_confidence: float = 0.5  # mean score of nose, eyes, ears and shoulders (COCO 0-6) over frames
    min_audio_dbfs: float = -45.0  # RMS level of the clip's audio
    min_active_fraction: float = 0.2  # fraction of 100 ms windows that must reach active_dbfs (speech present)
    active_dbfs: float = -40.0  # RMS level of a 100 ms window that counts as active
    min_scene_seconds: float = 1.0  # a scene between cuts shorter than this is "too-fast camera cuts"


@dataclass
class ShardsConfig:
    clips_per_shard: int = 64
    prefix: str = "clips"


@dataclass
class PipelineConfig:
    input: InputConfig = field(default_factory=InputConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    keypoints: KeypointsConfig = field(default_factory=KeypointsConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (all keys)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------ validation
def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config {key}={value!r}: {why}")


def validate(cfg: PipelineConfig) -> None:
    def num(key: str, v, lo=-math.inf, hi=math.inf, lo_open=False, integer=False):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if ok and integer:
            ok = float(v) == int(v)
        if ok:
            ok = (v > lo if lo_open else v >= lo) and v <= hi
        if not ok:
            kind = "an integer" if integer else "a number"
            rng = f"{'>' if lo_open else '>='} {lo:g}" if hi == math.inf else f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise _bad(key, v, f"must be {kind} {rng}")

    i, v, s, k, c, f, sh = cfg.input, cfg.video, cfg.scenes, cfg.keypoints, cfg.crop, cfg.filters, cfg.shards
    for key, val in (("input.audio_dir", i.audio_dir), ("input.video_dir", i.video_dir)):
        if val is not None and not (isinstance(val, str) and val):
            raise _bad(key, val, "expected a folder path or null")
    for key, val in (("keypoints.det_model", k.det_model), ("keypoints.pose_model", k.pose_model),
                     ("keypoints.device", k.device)):
        if not (isinstance(val, str) and val):
            raise _bad(key, val, "expected a non-empty string")
    if i.identity not in ("auto", "stem", "folder"):
        raise _bad("input.identity", i.identity, "expected auto, stem or folder")
    for key, exts in (("input.video_extensions", i.video_extensions), ("input.audio_extensions", i.audio_extensions)):
        if not isinstance(exts, list) or not exts or not all(isinstance(e, str) and e.strip(".") for e in exts):
            raise _bad(key, exts, "expected a non-empty list of file extensions")
    num("video.fps", v.fps, 0, 120, lo_open=True)
    num("video.max_side", v.max_side, 32, integer=True)
    num("scenes.cut_threshold", s.cut_threshold, 0, 255, lo_open=True)
    num("scenes.thumb_width", s.thumb_width, 8, integer=True)
    num("scenes.min_clip_seconds", s.min_clip_seconds, 0, lo_open=True)
    num("scenes.max_clip_seconds", s.max_clip_seconds, 0, lo_open=True)
    if s.max_clip_seconds < s.min_clip_seconds:
        raise _bad("scenes.max_clip_seconds", s.max_clip_seconds,
                   f"must be >= scenes.min_clip_seconds={s.min_clip_seconds}")
    if k.extractor not in ("sidecar", "rtmlib"):
        raise _bad("keypoints.extractor", k.extractor, "expected sidecar or rtmlib")
    if not k.sidecar_suffix:
        raise _bad("keypoints.sidecar_suffix", k.sidecar_suffix, "must not be empty")
    for key, size in (("keypoints.det_input_size", k.det_input_size), ("keypoints.pose_input_size", k.pose_input_size)):
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
            raise _bad(key, size, "expected two positive integers")
    num("keypoints.det_score", k.det_score, 0, 1)
    for key, val in (("crop.size", c.size), ("crop.headshot_size", c.headshot_size)):
        if not (isinstance(val, int) and not isinstance(val, bool) and val >= 16 and val % 2 == 0):
            raise _bad(key, val, "must be an even integer >= 16")
    num("crop.score_threshold", c.score_threshold, 0, 1)
    num("crop.head_top_margin", c.head_top_margin, 0, 5)
    num("crop.bottom_margin", c.bottom_margin, 0, 2)
    num("crop.side_margin", c.side_margin, 0, 2)
    num("crop.pad_value", c.pad_value, 0, 255, integer=True)
    if c.fit not in ("shrink", "pad"):
        raise _bad("crop.fit", c.fit, "expected shrink or pad")
    num("crop.headshot_margin", c.headshot_margin, 0, 5)
    if not (isinstance(c.bottom_keypoints, list) and all(isinstance(x, int) and 0 <= x < 133 for x in c.bottom_keypoints)):
        raise _bad("crop.bottom_keypoints", c.bottom_keypoints, "expected a list of COCO-WholeBody indices 0..132")
    num("filters.score_threshold", f.score_threshold, 0, 1)
    num("filters.min_single_person_fraction", f.min_single_person_fraction, 0, 1)
    num("filters.min_face_points", f.min_face_points, 0, 68, integer=True)
    num("filters.min_face_fraction", f.min_face_fraction, 0, 1)
    num("filters.min_keypoint_confidence", f.min_keypoint_confidence, 0, 1)
    num("filters.min_audio_dbfs", f.min_audio_dbfs, -200, 0)
    num("filters.active_dbfs", f.active_dbfs, -200, 0)
    num("filters.min_active_fraction", f.min_active_fraction, 0, 1)
    num("filters.min_scene_seconds", f.min_scene_seconds, 0)
    num("shards.clips_per_shard", sh.clips_per_shard, 1, integer=True)
    if not (isinstance(sh.prefix, str) and sh.prefix and all(ch.isalnum() or ch in "-_" for ch in sh.prefix)):
        raise _bad("shards.prefix", sh.prefix, "expected letters, digits, - or _")


# ------------------------------------------------------------------------------------------ loading
def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {where or '<root>'}: expected a mapping, got {type(data).__name__} {data!r}")
    fields = {fl.name: fl for fl in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"config has unknown key(s) {[prefix + u for u in unknown]}; known under "
                          f"{where or '<root>'}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, key)
        else:
            kwargs[name] = _coerce(key, value, default if default is not None else fields[name].default)
    obj = cls.__new__(cls)
    for name, fl in fields.items():  # defaults, then given values; validation runs once on the whole config
        if name in kwargs:
            setattr(obj, name, kwargs[name])
        elif fl.default_factory is not dataclasses.MISSING:
            setattr(obj, name, fl.default_factory())
        else:
            setattr(obj, name, fl.default)
    return obj


def _coerce(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _bad(key, value, "expected true or false")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, tuple):
        return list(value)
    if isinstance(default, str) and value is not None and not isinstance(value, str):
        raise _bad(key, value, "expected a string")
    return value


def config_from_dict(data: dict | None) -> PipelineConfig:
    cfg = _build(PipelineConfig, data or {}, "")
    validate(cfg)
    return cfg


def apply_override(data: dict, override: str) -> None:
    """``section.key=value`` (value parsed as YAML) into a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    path, raw = override.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {override!r}: expected section.key=value (e.g. crop.size=256)")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: value is not valid YAML: {e}") from e
    section = data.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {override!r}: {parts[0]} is not a section")
    section[parts[1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """A YAML file (or the defaults when ``path`` is None) plus ``section.key=value`` overrides."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {first}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections, got {type(data).__name__}")
    for o in overrides:
        apply_override(data, o)
    return config_from_dict(data)


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts (``section.key``)."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
