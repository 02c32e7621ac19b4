"""Whole-body keypoint extractors (COCO-WholeBody-133, the DWPose / RTMW order of shared/DESIGN.md §1).

An extractor turns the frames of one clip into ``(T, 133, 3)`` float32 keypoints (``x, y`` normalised to the
frame, score in ``[0, 1]``; not found = score 0, always finite) of the main person, and ``(T,)`` person counts
(for the exactly-one-person filter). Two implementations:

- ``SidecarKeypoints`` reads ``<video stem><keypoints.sidecar_suffix>`` next to the video: ``(T_src, 133, 3)``
  (one person) or ``(T_src, P, 133, 3)`` (P person slots; a slot with fewer than 3 visible body points is
  empty), one row per source frame in presentation order, ``x, y`` normalised to the source frame *as
  displayed* (after any rotation). Users who already ran a pose model use it; the tests use it. A sidecar in
  pixel coordinates (the raw output of most pose tools) would otherwise give clips with an empty pose map: it is
  detected (found points, score > 0, mostly outside ``[-1, 2]``: the loader's ``NORMALISED_RANGE`` rule) and, when every found
  point lies inside the displayed frame (10 % margin), converted (``x / width``, ``y / height``) with a logged
  warning and a note in the source's journal; otherwise (points beyond the frame, or frames in both units) the
  source is rejected as ``bad sidecar`` naming the file.
- ``RtmlibWholeBody`` runs DWPose / RTMW through the ``rtmlib`` package on onnxruntime: a YOLOX person detector
  (``keypoints.det_model``) then the whole-body pose model (``keypoints.pose_model``) on the largest person.
  Both are local ONNX files; a missing one fails at start-up naming its key. ``rtmlib`` is imported lazily:
  it is the optional ``[pose]`` extra.
"""

from __future__ import annotations

import abc
import inspect
import logging
from pathlib import Path

import numpy as np

from halfbody.data.keypoints import BODY, NORMALISED_RANGE, NUM_KEYPOINTS

from .config import ConfigError, PipelineConfig
from .decode import Frame, SourceError, VideoInfo
from .sources import Source


log = logging.getLogger(__name__)

PIXEL_MARGIN = 0.1  # pixel-unit points may stray this fraction of the frame outside it and still be converted


def sidecar_units(arr: np.ndarray, width: int, height: int, name: str, chunk: int = 2048) -> tuple[str | None, str | None]:
    """Whether sidecar keypoints ``(T, [P,] 133, 3)`` are normalised or in pixels of a ``width x height`` frame.

    Returns ``(None, None)`` for normalised keypoints, ``("pixels", note)`` for pixel coordinates that fit the
    frame (convert by dividing by the frame size). Raises ``SourceError("bad sidecar", ...)`` naming the file when
    the units cannot be told or trusted: pixel-like values beyond the frame, or frames in both units.
    """
    lo, hi = NORMALISED_RANGE
    norm_frames = pix_frames = 0
    x_max = y_max = -np.inf
    x_min = y_min = np.inf
    first_pix = first_norm = None
    for s in range(0, arr.shape[0], chunk):
        k = np.asarray(arr[s : s + chunk], dtype=np.float32)
        if k.ndim == 3:
            k = k[:, None]  # (t, person slots, 133, 3)
        ok = np.all(np.isfinite(k), axis=-1) & (k[..., 2] > 0)
        n = ok.sum(-1)
        outside = (((k[..., :2] < lo) | (k[..., :2] > hi)).any(-1) & ok).sum(-1)
        pix = ((n >= 3) & (outside * 2 > n)).any(-1)  # per frame: a person slot in pixel-like values
        norm = ((n >= 3) & (outside == 0)).any(-1)  # a person slot entirely in frame units
        if pix.any() and first_pix is None:
            first_pix = s + int(np.argmax(pix))
        if norm.any() and first_norm is None:
            first_norm = s + int(np.argmax(norm))
        pix_frames += int(pix.sum())
        norm_frames += int(norm.sum())
        if ok.any():
            xy = k[..., :2][ok]
            x_max, y_max = max(x_max, float(xy[:, 0].max())), max(y_max, float(xy[:, 1].max()))
            x_min, y_min = min(x_min, float(xy[:, 0].min())), min(y_min, float(xy[:, 1].min()))
    if pix_frames == 0:
        return None, None
    if norm_frames:
        raise SourceError("bad sidecar", f"{name} mixes units: frame {first_norm} has x, y in [0, 1] of the frame, "
                          f"frame {first_pix} pixel-like values (x up to {x_max:.4g}, y up to {y_max:.4g}); "
                          f"expected x, y normalised to the {width}x{height} frame throughout")
    mx, my = PIXEL_MARGIN * width, PIXEL_MARGIN * height
    if x_max > width + mx or y_max > height + my or x_min < -mx or y_min < -my:
        raise SourceError("bad sidecar", f"{name} is not in [0, 1] frame units (found points x in [{x_min:.4g}, "
                          f"{x_max:.4g}], y in [{y_min:.4g}, {y_max:.4g}]) and does not fit the {width}x{height} "
                          f"frame as pixel coordinates either; expected x, y normalised to the frame as displayed")
    note = (f"{name}: keypoints in pixel coordinates (x up to {x_max:.4g}, y up to {y_max:.4g}) converted to frame "
            f"units by the {width}x{height} frame size as displayed")
    return "pixels", note


def clean_keypoints(kpts: np.ndarray) -> np.ndarray:
    """Non-finite points become not-found (score 0, at 0, 0); scores are clipped to [0, 1]."""
    k = np.array(kpts, dtype=np.float32, copy=True)
    bad = ~np.all(np.isfinite(k), axis=-1)
    k[bad] = 0.0
    k[..., 2] = np.clip(k[..., 2], 0.0, 1.0)
    return k


class KeypointExtractor(abc.ABC):
    """Per-source keypoints. ``open`` is called once per source, ``extract`` once per clip."""

    name: str = "extractor"
    needs_src_index: bool = False  # whether frames must carry their presentation index from the file start

    def open(self, source: Source, info: VideoInfo) -> None:  # noqa: B027 (optional hook)
        """Prepare for one source (load a sidecar, reset state). Raises ``SourceError``."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release per-source state."""

    @abc.abstractmethod
    def extract(self, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray]:
        """``frames`` (RGB at working size) -> keypoints ``(T, 133, 3)`` normalised, persons ``(T,)`` int."""


def _person_present(kpts: np.ndarray, score_threshold: float) -> np.ndarray:
    """``(..., 133, 3)`` -> bool: at least 3 body points visible."""
    return (kpts[..., list(BODY), 2] >= score_threshold).sum(-1) >= 3


def _extent(kpts: np.ndarray, score_threshold: float) -> np.ndarray:
    """Area of the visible keypoints' bounding box, ``(..., 133, 3)`` -> ``(...)`` (0 when fewer than 2 visible)."""
    vis = kpts[..., 2] >= score_threshold
    big = np.float32(1e9)
    x0 = np.where(vis, kpts[..., 0], big).min(-1)
    x1 = np.where(vis, kpts[..., 0], -big).max(-1)
    y0 = np.where(vis, kpts[..., 1], big).min(-1)
    y1 = np.where(vis, kpts[..., 1], -big).max(-1)
    area = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    return np.where(vis.sum(-1) >= 2, area, 0.0)


class SidecarKeypoints(KeypointExtractor):
    name = "sidecar"
    needs_src_index = True

    def __init__(self, cfg: PipelineConfig):
        self.suffix = cfg.keypoints.sidecar_suffix
        self.score_threshold = cfg.filters.score_threshold
        self._arr: np.ndarray | None = None
        self._path = ""
        self._scale: tuple[float, float] | None = None  # divide x, y by these (pixel-unit sidecars)
        self.notes: list[str] = []  # per source, e.g. a unit conversion (kept in the journal)

    def open(self, source: Source, info: VideoInfo) -> None:
        self.notes, self._scale = [], None
        path = Path(source.sidecar)
        self._path = str(path)
        if not path.is_file():
            raise SourceError("missing sidecar", f"{path.name} not found next to the video "
                              f"(keypoints.extractor=sidecar, keypoints.sidecar_suffix={self.suffix!r})")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/OSError/EOFError/... on junk
            raise SourceError("bad sidecar", f"{path.name}: {type(e).__name__}: {e}") from e
        if arr.ndim not in (3, 4) or arr.shape[-2:] != (NUM_KEYPOINTS, 3) or arr.shape[0] < 1:
            raise SourceError("bad sidecar", f"{path.name} has shape {arr.shape}, expected (T, 133, 3) or (T, P, 133, 3)")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise SourceError("bad sidecar", f"{path.name} has dtype {arr.dtype}")
        units, note = sidecar_units(arr, info.width, info.height, path.name)
        if units == "pixels":
            log.warning("%s", note)
            self._scale = (float(info.width), float(info.height))
            self.notes.append(note)
        self._arr = arr

    def close(self) -> None:
        self._arr = None
        self._scale = None
        self.notes = []

    def extract(self, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray]:
        arr = self._arr
        if arr is None:
            raise RuntimeError("SidecarKeypoints.extract before open")
        idx = np.asarray([f.src_index for f in frames], dtype=np.int64)
        if idx.size and int(idx.max()) >= arr.shape[0]:
            raise SourceError("bad sidecar", f"{Path(self._path).name} has {arr.shape[0]} frames, the video has at "
                              f"least {int(idx.max()) + 1}")
        k = np.array(arr[idx], dtype=np.float32)
        if self._scale is not None:
            k[..., 0] /= self._scale[0]
            k[..., 1] /= self._scale[1]
        k = clean_keypoints(k)
        if k.ndim == 3:
            persons = _person_present(k, self.score_threshold).astype(np.int64)
            return k, persons
        present = _person_present(k, self.score_threshold)  # (T, P)
        persons = present.sum(1).astype(np.int64)
        main = np.argmax(np.where(present, _extent(k, self.score_threshold), -1.0), axis=1)  # the largest person
        return k[np.arange(k.shape[0]), main], persons


class RtmlibWholeBody(KeypointExtractor):
    """DWPose / RTMW via rtmlib on onnxruntime; models load on first use (once per worker process)."""

    name = "rtmlib"

    def __init__(self, cfg: PipelineConfig):
        k = cfg.keypoints
        for key, path in (("keypoints.det_model", k.det_model), ("keypoints.pose_model", k.pose_model)):
            if not Path(path).is_file():
                raise ConfigError(f"config {key}={path!r}: ONNX file not found (put the DWPose/RTMW model there or "
                                  f"set {key}; nothing is downloaded)")
        self.det_path, self.pose_path = str(k.det_model), str(k.pose_model)
        self.det_input_size = tuple(k.det_input_size)
        self.pose_input_size = tuple(k.pose_input_size)
        self.det_score, self.device = float(k.det_score), k.device
        self._det = self._pose = None
        _import_rtmlib()  # fail at start-up, not in every worker

    def _load(self) -> None:
        rtmlib = _import_rtmlib()
        # Boxes with class ids, so that only people count (DWPose's yolox_l is a COCO-80 detector). rtmlib 0.0.16
        # renamed YOLOX's ``mode`` to ``det_mode``.
        params = inspect.signature(rtmlib.YOLOX.__init__).parameters
        mode_kw = "det_mode" if "det_mode" in params else "mode"
        self._det = rtmlib.YOLOX(self.det_path, model_input_size=self.det_input_size, **{mode_kw: "multiclass"},
                                 score_thr=self.det_score, backend="onnxruntime", device=self.device)
        self._pose = rtmlib.RTMPose(self.pose_path, model_input_size=self.pose_input_size, backend="onnxruntime",
                                    device=self.device)

    def _people(self, bgr: np.ndarray) -> np.ndarray:
        res = self._det(bgr)
        if isinstance(res, tuple):  # (boxes, class ids): keep people (COCO class 0)
            boxes, cls = res
            boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            cls = np.asarray(cls).reshape(-1)
            boxes = boxes[cls == 0] if cls.size == boxes.shape[0] else boxes
        else:
            boxes = np.asarray(res, dtype=np.float32).reshape(-1, 4)
        return boxes

    def extract(self, frames: list[Frame]) -> tuple[np.ndarray, np.ndarray]:
        if self._det is None:
            self._load()
        out = np.zeros((len(frames), NUM_KEYPOINTS, 3), np.float32)
        persons = np.zeros(len(frames), np.int64)
        for i, f in enumerate(frames):
            h, w = f.image.shape[:2]
            bgr = np.ascontiguousarray(f.image[..., ::-1])
            boxes = self._people(bgr)
            persons[i] = boxes.shape[0]
            if boxes.shape[0] == 0:
                continue
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            box = boxes[int(np.argmax(areas))]
            kp, sc = self._pose(bgr, bboxes=[box.tolist()])
            kp = np.asarray(kp, np.float32).reshape(-1, NUM_KEYPOINTS, 2)[0]
            sc = np.asarray(sc, np.float32).reshape(-1, NUM_KEYPOINTS)[0]
            # Pixel coordinates (pixel centres at i + 0.5 in our convention; rtmlib's are at i) -> normalised.
            out[i, :, 0] = (kp[:, 0] + 0.5) / w
            out[i, :, 1] = (kp[:, 1] + 0.5) / h
            out[i, :, 2] = sc
        return clean_keypoints(out), persons


def _import_rtmlib():
    try:
        import rtmlib  # noqa: PLC0415 (optional dependency)
    except ImportError as e:
        raise ConfigError(f"keypoints.extractor=rtmlib needs the optional packages rtmlib and onnxruntime "
                          f"(pip install -e '.[pose]'): {e}") from e
    return rtmlib


def make_extractor(cfg: PipelineConfig) -> KeypointExtractor:
    """The configured extractor (``keypoints.extractor``). Raises ``ConfigError`` for a missing model file."""
    if cfg.keypoints.extractor == "sidecar":
        return SidecarKeypoints(cfg)
    if cfg.keypoints.extractor == "rtmlib":
        return RtmlibWholeBody(cfg)
    raise ConfigError(f"config keypoints.extractor={cfg.keypoints.extractor!r}: expected sidecar or rtmlib")
