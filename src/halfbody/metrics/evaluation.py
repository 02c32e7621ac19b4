"""The EMTD evaluation: generated videos (and their ground truth, reference image and audio) -> the metrics of
EchoMimicV2 §4.1 / MirrorMe §4.1, under a pinned protocol (``conf/evaluate.yaml`` ``protocol.*``, docs/EVALUATION.md).

:func:`run_evaluation` takes a list of :class:`VideoPair` and the evaluation config and returns
``{"metrics": {name: float}, "skipped": {name: reason}, "per_video": {stem: {...}}, "protocol": {...}}``.

Every video is read whole, resampled to ``protocol.fps`` by frame index (the training loader's rule), cut to the
first ``protocol.num_frames`` frames (default: the shorter of the pair) and resized + centre-cropped to
``protocol.resolution`` squared (the training crop, :func:`halfbody.data.transforms.crop_geometry`). Then:

==========  ==========================================  =============================================  ==================
metric      what                                        needs                                          module
==========  ==========================================  =============================================  ==================
FID         Inception pool features, all frames         ground truth, ``metrics.fid.weights``          :mod:`.fid`
FVD         I3D logits of 16-frame clips                ground truth, ``metrics.fvd.weights``          :mod:`.fvd`
SSIM, PSNR  per frame pair, mean                        ground truth                                   :mod:`.frame_quality`
LPIPS       per frame pair, mean                        ground truth, ``metrics.lpips.backbone_path``  :mod:`.frame_quality`
Sync-C/D    SyncNet offset search on face crops + audio audio, ``metrics.sync.weights``                 :mod:`.sync`
HKC, HKV    hand keypoints measured on generated frames DWPose ONNX files or keypoint sidecars         :mod:`.hands`
CSIM        ArcFace cosine, reference face vs frames    face keypoints, ``metrics.csim.weights``       :mod:`.csim`
oracle/*    synthetic-world oracle metrics              synthetic data (``protocol.synthetic``)         :mod:`.oracle`
gesture/*   beat alignment (+ shuffled-audio control),  ``<stem>.pose.npy`` beside the generated video  :mod:`.gestures`
            diversity, keypoint FD, jitter of the       (generate pose=auto), the ground truth's
            generated hand keypoint sequence            keypoint sidecar, audio
==========  ==========================================  =============================================  ==================

A metric whose weights are missing is skipped with one line naming the config key; the others still run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from halfbody.data import media

from .weights import MissingWeights

log = logging.getLogger(__name__)

__all__ = ["METRIC_ORDER", "VideoPair", "load_video", "run_evaluation"]

# the column order of the papers' tables (EchoMimicV2 Table 2), LPIPS after the low-level group
METRIC_ORDER = ("FID", "FVD", "SSIM", "PSNR", "LPIPS", "E-FID", "Sync-D", "Sync-C", "HKC", "HKV", "CSIM")
HIGHER_IS_BETTER = {"FID": False, "FVD": False, "SSIM": True, "PSNR": True, "LPIPS": False, "E-FID": False,
                    "Sync-D": False, "Sync-C": True, "HKC": True, "HKV": True, "CSIM": True}
PAIRWISE = ("FID", "FVD", "SSIM", "PSNR", "LPIPS")
POSE_SUFFIX = ".pose.npy"  # generate pose=auto writes the sampled keypoints beside the mp4 as <stem>.pose.npy
#: halfbody.metrics.gestures.GESTURE_METRICS that evaluate reports (as gesture/<name>): one draw per video, so no
#: sample_diversity; beat_alignment_mismatched is the shuffled-audio control (each video's motion vs the next's audio)
GESTURES = ("beat_alignment", "beat_alignment_mismatched", "gt_beat_alignment", "diversity", "gt_diversity",
            "fd_pose", "fd_kinematic", "jitter", "gt_jitter")
HIGHER_IS_BETTER.update({"gesture/beat_alignment": True, "gesture/fd_pose": False, "gesture/fd_kinematic": False})


@dataclass
class VideoPair:
    """One generated video and what it is compared with. ``name``: the file stem both sides share."""

    name: str
    generated: Path
    ground_truth: Path | None = None
    reference: Path | None = None  # the reference image (a list's first column)
    audio: Path | None = None  # the driving audio (a list's second column); else the generated mp4's own track
    pose: Path | None = None  # the driving pose (face-box fallback only)
    notes: list[str] = field(default_factory=list)


@dataclass
class Video:
    """A video under the protocol: uint8 ``(F, R, R, 3)`` frames, keypoints normalised to them (or None)."""

    frames: np.ndarray
    fps: float
    kpts: np.ndarray | None
    kpts_source: str | None
    source_fps: float | None = None  # the file's frame rate and displayed size, before the protocol
    source_size: tuple[int, int] | None = None  # (width, height)

    def tensor(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``(F, 3, R, R)`` float in ``[0, 1]``."""
        x = torch.from_numpy(np.ascontiguousarray(self.frames[start:stop]))
        return x.permute(0, 3, 1, 2).float().div_(255.0)


# ================================================================================================ inputs
def sidecar(path: Path, suffixes) -> Path | None:
    """``<stem><suffix>`` next to ``path`` for the first suffix that exists (``.kpts.npy``, ``.npy``)."""
    for suffix in suffixes:
        p = path.with_name(path.stem + str(suffix))
        if p.is_file() and p != path:
            return p
    return None


def _resample_indices(total: int, fps_src: float, fps_tgt: float | None) -> np.ndarray:
    from halfbody.data.transforms import frame_indices

    if not fps_tgt or abs(fps_src - fps_tgt) < 1e-6:
        return np.arange(total)
    n = max(1, int(math.floor(total * fps_tgt / fps_src + 1e-6)))
    return np.clip(frame_indices(0, n, fps_src, fps_tgt), 0, total - 1)


def load_keypoints(path: Path, width: int, height: int) -> np.ndarray:
    """A ``(T, 133, 3)`` sidecar (or ``(T, P, 133, 3)``: the first slot), normalised; pixel units are converted."""
    from halfbody.data.keypoints import NUM_KEYPOINTS

    k = np.load(path, allow_pickle=False).astype(np.float32)
    if k.ndim == 4:
        k = k[:, 0]
    if k.ndim == 2:
        k = k[None]
    if k.ndim != 3 or k.shape[1:] != (NUM_KEYPOINTS, 3):
        raise ValueError(f"keypoint sidecar {str(path)!r} has shape {k.shape}, expected (T, 133, 3)")
    k = np.nan_to_num(k, nan=0.0, posinf=0.0, neginf=0.0)
    found = k[..., 2] > 0
    if found.any() and np.abs(k[..., :2][found]).max() > 2.0:  # pixels -> normalised
        k[..., 0] /= width
        k[..., 1] /= height
    return k


def load_video(path: Path, protocol: DictConfig, suffixes=()) -> Video:
    """A video file under the protocol (fps, crop), with its keypoint sidecar when there is one."""
    from halfbody.data.transforms import crop_geometry

    frames, fps = media.read_video(path)
    idx = _resample_indices(frames.shape[0], fps, protocol.get("fps"))
    frames = frames[idx]
    h, w = frames.shape[1:3]
    r = int(protocol.resolution)
    geo = crop_geometry(w, h, r, r)
    out = geo.apply_frames_uint8(frames)
    kpts, source = None, None
    side = sidecar(path, suffixes) if suffixes else None
    if side is not None:
        kpts, source = protocol_keypoints(load_keypoints(side, w, h), w, h, fps, protocol), f"sidecar {side.name}"
    return Video(out, float(protocol.get("fps") or fps), kpts, source, float(fps), (w, h))


def protocol_keypoints(k: np.ndarray, width: int, height: int, fps: float, protocol: DictConfig) -> np.ndarray:
    """Keypoints ``(T, 133, 3)`` normalised to a ``width x height`` frame at ``fps`` -> the protocol's frame rate
    and crop (as :func:`load_video` maps the frames), normalised to the protocol frame."""
    from halfbody.data.transforms import crop_geometry

    r = int(protocol.resolution)
    k = k[np.clip(_resample_indices(k.shape[0], fps, protocol.get("fps")), 0, k.shape[0] - 1)]
    px = crop_geometry(width, height, r, r).apply_keypoints(k)
    px[..., 0] /= r
    px[..., 1] /= r
    return px


def load_reference(path: Path, protocol: DictConfig, suffixes=()) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference image resized + centre-cropped like the frames (uint8 ``(R, R, 3)``), and its keypoints."""
    from halfbody.data.transforms import crop_geometry
    from halfbody.generation.inputs import load_image

    img = load_image(str(path), "reference")
    h, w = img.shape[:2]
    r = int(protocol.resolution)
    geo = crop_geometry(w, h, r, r)
    out = geo.apply_frames_uint8(img[None])[0]
    side = sidecar(path, suffixes) if suffixes else None
    kpts = None
    if side is not None:
        k = load_keypoints(side, w, h)[:1]
        kpts = geo.apply_keypoints(k)
        kpts[..., :2] /= r
    return out, kpts


def load_audio16(pair: VideoPair) -> np.ndarray | None:
    """16 kHz mono: the list's audio file, else the generated video's own track (None when it has none)."""
    for p in (pair.audio, pair.generated):
        if p is None:
            continue
        try:
            return media.load_audio_file_16k(p)[0]
        except (media.MediaError, OSError, ValueError):
            continue
    return None


# ================================================================================================ networks
class Networks:
    """The metric networks that could be built; ``skipped`` holds the one-line reason for each that could not."""

    def __init__(self, cfg: DictConfig, device: torch.device, need_pairwise: bool) -> None:
        self.skipped: dict[str, str] = {}
        self.fid = self.fvd = self.lpips = self.sync = self.csim = None
        self.dwpose = None
        m = cfg.metrics
        p = cfg.protocol

        def build(names: tuple[str, ...], enabled: bool, make):
            if not enabled:
                for n in names:
                    self.skipped[n] = f"disabled (metrics.{_cfg_name(n)}.enabled=false)"
                return None
            if not need_pairwise and any(n in PAIRWISE for n in names):
                for n in names:
                    self.skipped[n] = "no ground-truth videos (ground_truth= or the list's 4th column)"
                return None
            try:
                return make()
            except MissingWeights as e:
                for n in names:
                    self.skipped[n] = str(e)
                return None

        from .csim import csim_network
        from .fid import fid_network
        from .frame_quality import LPIPSMetric
        from .fvd import fvd_network
        from .sync import sync_network

        def dev(net):
            return net.to(device)

        self.fid = build(("FID",), m.fid.enabled, lambda: dev(fid_network(m.fid.weights, resize=int(p.fid_resize))))
        self.fvd = build(("FVD",), m.fvd.enabled, lambda: dev(fvd_network(m.fvd.weights)))
        self.lpips = build(("LPIPS",), m.lpips.enabled,
                           lambda: dev(LPIPSMetric(m.lpips.backbone_path, net=str(m.lpips.get("net", "alex")))))
        self.sync = build(("Sync-D", "Sync-C"), m.sync.enabled, lambda: dev(sync_network(m.sync.weights)))
        self.csim = build(("CSIM",), m.csim.enabled,
                          lambda: dev(csim_network(m.csim.weights, layers=list(m.csim.get("layers", [3, 13, 30, 3])))))
        for name, key in (("SSIM", "ssim"), ("PSNR", "psnr")):
            if not m[key].enabled:
                self.skipped[name] = f"disabled (metrics.{key}.enabled=false)"
            elif not need_pairwise:
                self.skipped[name] = "no ground-truth videos (ground_truth= or the list's 4th column)"
        if not m.efid.get("enabled", False):
            self.skipped["E-FID"] = ("not implemented: E-FID needs a 3D face reconstruction model (expression "
                                     "parameters); see docs/EVALUATION.md")
        else:
            self.skipped["E-FID"] = "metrics.efid.enabled=true but E-FID is not implemented (docs/EVALUATION.md)"
        self.hands_enabled = bool(m.hands.enabled)
        if not self.hands_enabled:
            self.skipped["HKC"] = self.skipped["HKV"] = "disabled (metrics.hands.enabled=false)"
        self.dwpose_reason = None
        if self.hands_enabled or self.sync is not None or self.csim is not None:
            self.dwpose, self.dwpose_reason = _dwpose(m.keypoints)

    def extract_keypoints(self, frames: np.ndarray) -> np.ndarray | None:
        if self.dwpose is None:
            return None
        from data_pipelines.video_to_shards.decode import Frame

        kp, _ = self.dwpose.extract([Frame(index=i, time=float(i), src_index=i, image=f) for i, f in enumerate(frames)])
        return kp


def _cfg_name(metric: str) -> str:
    return {"Sync-D": "sync", "Sync-C": "sync", "HKC": "hands", "HKV": "hands", "E-FID": "efid"}.get(metric,
                                                                                                   metric.lower())


def _dwpose(kcfg: DictConfig):
    """The DWPose extractor of ``data_pipelines.video_to_shards`` when its ONNX files and rtmlib are there."""
    for key in ("det_model", "pose_model"):
        path = kcfg.get(key)
        if not path or not Path(str(path)).is_file():
            return None, (f"metrics.keypoints.{key}={str(path)!r} not found (DWPose ONNX; or give keypoint sidecars "
                          "<video stem>.kpts.npy)")
    try:
        from data_pipelines.video_to_shards.config import PipelineConfig
        from data_pipelines.video_to_shards.keypoints import RtmlibWholeBody

        pc = PipelineConfig()
        k = pc.keypoints
        k.det_model, k.pose_model = str(kcfg.det_model), str(kcfg.pose_model)
        k.det_input_size, k.pose_input_size = list(kcfg.det_input_size), list(kcfg.pose_input_size)
        k.det_score, k.device = float(kcfg.det_score), str(kcfg.device)
        return RtmlibWholeBody(pc), None
    except Exception as e:  # noqa: BLE001 - rtmlib missing (optional extra) or a bad file: the reason is reported
        return None, f"DWPose unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


# ================================================================================================ per video
def _is_synthetic(pair: VideoPair, protocol: DictConfig, suffixes) -> bool:
    flag = protocol.get("synthetic", "auto")
    if isinstance(flag, bool):
        return flag
    if pair.ground_truth is None or sidecar(pair.ground_truth, suffixes) is None:
        return False
    meta = pair.ground_truth.with_suffix(".json")
    try:
        info = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError):
        return False
    from data_pipelines.synthetic_world.generate import SOURCE

    return isinstance(info, dict) and info.get("source") == SOURCE


def _mean(values) -> float:
    v = [float(x) for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def run_evaluation(pairs: list[VideoPair], cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Score every pair; see the module docstring. ``pairs`` must be non-empty."""
    from . import csim as csim_mod
    from . import face as face_mod
    from . import frame_quality as fq
    from . import fvd as fvd_mod
    from . import hands as hands_mod
    from . import sync as sync_mod
    from .fid import inception_features
    from .frechet import frechet_distance
    from .gestures import gesture_metrics
    from .oracle import oracle_metrics

    p = cfg.protocol
    suffixes = list(p.get("keypoint_sidecars") or [])
    need_pairwise = any(pr.ground_truth is not None for pr in pairs)
    nets = Networks(cfg, device, need_pairwise)
    bs = int(cfg.get("batch_size", 16))
    r = int(p.resolution)
    per_video: dict[str, dict[str, Any]] = {}
    fid_real, fid_fake, fvd_real, fvd_fake = [], [], [], []
    reasons: dict[str, list[str]] = {}
    gestures_on = bool(cfg.metrics.get("gestures", {}).get("enabled", True))
    gesture_sets: list[tuple[np.ndarray, np.ndarray, np.ndarray, float]] = []  # (generated, ground truth, audio, fps)

    def note(metric: str, why: str) -> None:
        reasons.setdefault(metric, []).append(why)

    for pair in pairs:
        row: dict[str, Any] = {"generated": str(pair.generated),
                               "ground_truth": str(pair.ground_truth) if pair.ground_truth else None}
        try:
            gen = load_video(pair.generated, p, suffixes)
            gt = load_video(pair.ground_truth, p, suffixes) if pair.ground_truth is not None else None
        except (media.MediaError, ValueError, OSError) as e:
            row["error"] = f"{type(e).__name__}: {e}"
            log.error("%s: %s", pair.name, row["error"])
            per_video[pair.name] = row
            continue
        n = gen.frames.shape[0] if gt is None else min(gen.frames.shape[0], gt.frames.shape[0])
        if p.get("num_frames"):
            n = min(n, int(p.num_frames))
        row["frames"] = n
        g = gen.tensor(0, n)
        # --- pairwise metrics
        if gt is not None:
            t = gt.tensor(0, n)
            if "SSIM" not in nets.skipped:
                row["SSIM"] = float(fq.ssim(g, t, kernel_size=int(p.ssim_kernel)).mean())
            if "PSNR" not in nets.skipped:
                row["PSNR"] = float(fq.psnr(g, t, float(p.psnr_data_range), float(p.psnr_cap)).mean())
            if nets.lpips is not None:
                row["LPIPS"] = float(torch.cat([nets.lpips(g[i:i + bs], t[i:i + bs])
                                                for i in range(0, n, bs)]).mean())
            if nets.fid is not None:
                fid_real.append(inception_features(nets.fid, t, bs))
                fid_fake.append(inception_features(nets.fid, g, bs))
            if nets.fvd is not None:
                clip = int(p.fvd_clip_frames)
                fvd_real.append(fvd_mod.i3d_features(nets.fvd, fvd_mod.video_clips(t, clip), int(p.fvd_resize)))
                fvd_fake.append(fvd_mod.i3d_features(nets.fvd, fvd_mod.video_clips(g, clip), int(p.fvd_resize)))
        elif need_pairwise:
            for m in PAIRWISE:
                note(m, f"{pair.name}: no ground truth")
        # --- keypoints of the generated frames (measured: sidecar, else DWPose)
        gen_kpts, gen_src = gen.kpts, gen.kpts_source
        if gen_kpts is None and nets.dwpose is not None:
            gen_kpts, gen_src = nets.extract_keypoints(gen.frames[:n]), "DWPose"
        if gen_kpts is not None:
            gen_kpts = gen_kpts[:n]
        row["keypoints"] = gen_src
        if nets.hands_enabled:
            if gen_kpts is not None and gen_kpts.shape[0] >= 1:
                row["HKC"] = hands_mod.hand_keypoint_confidence(gen_kpts)
                row["HKV"] = hands_mod.hand_keypoint_variance(gen_kpts, r, float(p.keypoint_score))
            else:
                why = nets.dwpose_reason or "no keypoints"
                note("HKC", why)
                note("HKV", why)
        # --- face boxes: the generated video's own keypoints, else the ground truth's, else the driving pose
        face_kpts, face_src = gen_kpts, gen_src
        if face_kpts is None and gt is not None and gt.kpts is not None:
            face_kpts, face_src = gt.kpts[:n], f"ground truth's {gt.kpts_source}"
        if face_kpts is None and pair.pose is not None:
            try:
                face_kpts, face_src = np.load(pair.pose, allow_pickle=False)[:n].astype(np.float32), "driving pose"
            except (OSError, ValueError):
                face_kpts = None
        if face_kpts is None:
            face_src = f"protocol.face_fallback_box {list(p.face_fallback_box)}"
        row["face_boxes"] = face_src
        boxes = face_mod.face_boxes(face_kpts, n, r, r, float(p.keypoint_score), list(p.face_fallback_box))
        # --- Sync-C / Sync-D
        audio16 = None
        if nets.sync is not None or _synthetic_wanted(cfg):
            audio16 = load_audio16(pair)
        if nets.sync is not None:
            if audio16 is None:
                note("Sync-C", f"{pair.name}: no audio")
                note("Sync-D", f"{pair.name}: no audio")
            else:
                try:
                    crops = face_mod.syncnet_crops(g, boxes, float(p.face_crop_scale))
                    ve, ae = sync_mod.sync_embeddings(nets.sync, crops, audio16, gen.fps, bs)
                    s = sync_mod.sync_scores(ve, ae, int(p.sync_vshift))
                    row["Sync-D"], row["Sync-C"], row["sync_offset"] = s["sync_d"], s["sync_c"], s["offset"]
                except ValueError as e:
                    note("Sync-C", f"{pair.name}: {e}")
                    note("Sync-D", f"{pair.name}: {e}")
        # --- CSIM: the reference image (the list's), else the ground truth's first frame
        if nets.csim is not None:
            row["CSIM"] = _csim(pair, gen, gt, g, face_kpts, boxes, nets, p, suffixes, csim_mod, face_mod, bs, note)
        # --- synthetic-world oracle
        if cfg.metrics.oracle.get("enabled", True) and _is_synthetic(pair, p, suffixes) and gt is not None:
            ref = gt.frames[0]
            if pair.reference is not None:
                ref = load_reference(pair.reference, p, suffixes)[0]
            audio = audio16 if audio16 is not None else load_audio16(pair)
            if audio is None:
                note("oracle", f"{pair.name}: no audio")
            elif gt.kpts is None:
                note("oracle", f"{pair.name}: the ground truth has no keypoint sidecar (<stem>.kpts.npy)")
            else:
                for k, v in oracle_metrics(gen.frames[:n], ref, gt.kpts[:n], audio, gen.fps).items():
                    row[f"oracle/{k}"] = float(v)
        # --- gesture metrics: the sampled keypoints (<stem>.pose.npy of generate pose=auto) vs the ground truth's
        if gestures_on:
            audio = audio16 if audio16 is not None else load_audio16(pair)
            seqs = _gesture_sequences(pair, gen, gt, n, audio, p, note)
            if seqs is not None:
                gesture_sets.append((*seqs, audio, gen.fps))
                one = gesture_metrics([seqs[0]], [seqs[1]], [audio], gen.fps)
                row.update({f"gesture/{k}": float(one[k]) for k in GESTURES if k != "beat_alignment_mismatched"})
        per_video[pair.name] = row

    metrics: dict[str, float] = {}
    skipped = dict(nets.skipped)
    if fid_real:
        fr, ff = np.concatenate(fid_real), np.concatenate(fid_fake)
        if min(len(fr), len(ff)) >= 2:
            metrics["FID"] = frechet_distance(fr, ff)
        else:
            skipped["FID"] = f"fewer than 2 frames ({len(ff)})"
    if fvd_real:
        fr, ff = np.concatenate(fvd_real), np.concatenate(fvd_fake)
        if min(len(fr), len(ff)) >= 2:
            metrics["FVD"] = frechet_distance(fr, ff)
        else:
            skipped["FVD"] = (f"fewer than 2 clips ({len(ff)}: videos of {int(p.fvd_clip_frames)} frames or more "
                              "give one clip each)")
    names = [m for m in METRIC_ORDER if m not in ("FID", "FVD")]
    names += sorted({k for row in per_video.values() for k in row if k.startswith("oracle/")})
    for m in names:
        if m in skipped:
            continue
        values = [row[m] for row in per_video.values() if m in row]
        if values and np.isfinite(_mean(values)):
            metrics[m] = _mean(values)
        elif m in reasons or m in ("HKC", "HKV", "Sync-C", "Sync-D", "CSIM", "SSIM", "PSNR", "LPIPS"):
            why = reasons.get(m) or reasons.get("oracle") or ["no video could be measured"]
            skipped[m] = why[0] + (f" (and {len(why) - 1} more)" if len(why) > 1 else "")
    if not gestures_on:
        skipped["gesture"] = "disabled (metrics.gestures.enabled=false)"
    elif gesture_sets:  # over the set: the shuffled-audio control pairs videos, the FDs pool their frames
        gen_k, gt_k, audios, fps = zip(*gesture_sets)
        if len(set(fps)) > 1:
            log.warning("gesture metrics: videos at different frame rates %s (protocol.fps=null); the set-level "
                        "values use %g fps", sorted(set(fps)), fps[0])
        over = gesture_metrics(list(gen_k), list(gt_k), list(audios), float(fps[0]))
        for k in GESTURES:
            if math.isfinite(over[k]):
                metrics[f"gesture/{k}"] = float(over[k])
            elif k == "beat_alignment_mismatched" and len(gesture_sets) < 2:
                skipped[f"gesture/{k}"] = ("the shuffled-audio control needs 2 or more videos with keypoints "
                                           f"({len(gesture_sets)})")
            else:
                skipped[f"gesture/{k}"] = ("not measurable (no motion or audio beats, no visible arm / hand points, "
                                           "or too few frames)")
        skipped["gesture/sample_diversity"] = ("one sampled sequence per video (needs two draws for the same audio; "
                                               "validation of family=audio2pose reports it)")
    elif "gesture" in reasons:
        why = reasons["gesture"]
        skipped["gesture"] = why[0] + (f" (and {len(why) - 1} more)" if len(why) > 1 else "")
    if "oracle" in reasons and not any(m.startswith("oracle/") for m in metrics):
        skipped["oracle"] = reasons["oracle"][0] + (f" (and {len(reasons['oracle']) - 1} more)"
                                                    if len(reasons["oracle"]) > 1 else "")
    ordered = {m: metrics[m] for m in METRIC_ORDER if m in metrics}
    ordered.update({m: v for m, v in metrics.items() if m not in ordered})
    for m, why in skipped.items():
        log.warning("%s skipped: %s", m, why)
    return {"metrics": ordered, "skipped": {m: skipped[m] for m in sorted(skipped, key=_order_key)},
            "per_video": per_video, "protocol": OmegaConf.to_container(p, resolve=True)}


def _gesture_sequences(pair: VideoPair, gen: Video, gt: Video | None, n: int, audio: np.ndarray | None,
                       p: DictConfig, note) -> tuple[np.ndarray, np.ndarray] | None:
    """The generated hand keypoint sequence (``<stem>.pose.npy`` beside the generated video, x / y in ``[0, 1]`` of
    the reference image's frame, one row per generated frame) and the ground truth's keypoints, both ``(m, 133, 3)``
    in the protocol's frame and rate; None (the reason noted under ``gesture``) when a side is missing. The pose
    file's frame is the reference image's (the list's), else the ground truth's (generate frames the reference like
    the clip it comes from; ``halfbody.data.test_set`` exports the clip's own first frame or crop)."""
    from halfbody.generation.inputs import load_image

    pose = pair.generated.with_suffix(POSE_SUFFIX)
    if not pose.is_file():
        note("gesture", f"{pair.name}: no {pose.name} beside the generated video (generate pose=auto writes the "
                        "sampled keypoints there)")
        return None
    if gt is None:
        note("gesture", f"{pair.name}: no ground truth (its keypoints are what the sampled ones are compared with)")
        return None
    if gt.kpts is None:
        note("gesture", f"{pair.name}: the ground truth has no keypoint sidecar (<stem>.kpts.npy)")
        return None
    if audio is None:
        note("gesture", f"{pair.name}: no audio (the list's audio column or the generated video's track)")
        return None
    if pair.reference is not None:
        h, w = load_image(str(pair.reference), "reference").shape[:2]
    else:
        w, h = gt.source_size
    try:
        k = protocol_keypoints(load_keypoints(pose, w, h), w, h, gen.source_fps or gen.fps, p)
    except (ValueError, OSError) as e:
        note("gesture", f"{pair.name}: {pose.name}: {type(e).__name__}: {e}")
        return None
    m = min(n, k.shape[0], gt.kpts.shape[0])
    if m < 4:
        note("gesture", f"{pair.name}: {m} frames with keypoints on both sides (jitter needs 4)")
        return None
    return k[:m], gt.kpts[:m]


def _order_key(m: str) -> tuple[int, str]:
    return (METRIC_ORDER.index(m) if m in METRIC_ORDER else len(METRIC_ORDER), m)


def _synthetic_wanted(cfg: DictConfig) -> bool:
    return bool(cfg.metrics.oracle.get("enabled", True)) and cfg.protocol.get("synthetic", "auto") is not False


def _csim(pair, gen, gt, g, face_kpts, boxes, nets, p, suffixes, csim_mod, face_mod, bs, note) -> float | None:
    r = int(p.resolution)
    ref_img, ref_kpts = None, None
    if pair.reference is not None:
        ref_img, ref_kpts = load_reference(pair.reference, p, suffixes)
        if ref_kpts is None and nets.dwpose is not None:
            ref_kpts = nets.extract_keypoints(ref_img[None])
    elif gt is not None:
        ref_img = gt.frames[0]
        ref_kpts = gt.kpts[:1] if gt.kpts is not None else None
    if ref_img is None:
        note("CSIM", f"{pair.name}: no reference image (a list's first column) or ground truth")
        return None

    def aligned(img_t: torch.Tensor, k: np.ndarray | None, box) -> torch.Tensor:
        pts = face_mod.five_points(k, r, r) if k is not None else None
        if pts is None:  # no landmarks: the face box, squared, resized (documented fallback)
            cx, cy, s = box[:3]
            return face_mod._crop(img_t, cx - s, cy - s, cx + s, cy + s, 112, 0.0)
        return face_mod.align_arcface(img_t, pts)

    ref_t = torch.from_numpy(np.ascontiguousarray(ref_img)).permute(2, 0, 1).float() / 255.0
    ref_box = face_mod.face_boxes(ref_kpts, 1, r, r, float(p.keypoint_score), list(p.face_fallback_box))[0] \
        if ref_kpts is not None else boxes[0]
    ref_face = aligned(ref_t, ref_kpts[0] if ref_kpts is not None else None, ref_box)
    faces = torch.stack([aligned(g[i], face_kpts[i] if face_kpts is not None and i < len(face_kpts) else None,
                                 boxes[i]) for i in range(g.shape[0])])
    e_ref = csim_mod.face_embeddings(nets.csim, ref_face[None])
    e = csim_mod.face_embeddings(nets.csim, faces, bs)
    return float((e @ e_ref[0]).mean())
