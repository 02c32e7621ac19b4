"""A job's conditions: the decoded inputs in the model's frame (reference pixels, 16 kHz audio, pose keypoints in
output pixels, region masks), and the condition tensors a family's ``generate_video`` takes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from halfbody.data import media
from halfbody.generation.inputs import (ExtractorUnavailable, load_audio, load_image, load_keypoints, load_pose,
                                        reference_image_keypoints)
from halfbody.generation.model import Settings
from halfbody.utils.errors import UserError

if TYPE_CHECKING:
    from halfbody.generation.jobs import Job

__all__ = ["Conditions", "prepare", "condition_tensors", "AAC_RATES"]

AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass
class Conditions:
    """A job's inputs, decoded and checked: pixels, 16 kHz audio, keypoints in output pixels."""

    ref: torch.Tensor  # (3, H, W) in [-1, 1]
    audio16: np.ndarray  # (S,) 16 kHz mono
    audio_out: np.ndarray  # mono at audio_rate, for the mp4
    audio_rate: int
    num_frames: int
    pose_kpts: np.ndarray | None = None  # (F, 133, 3) output pixels
    ref_kpts: np.ndarray | None = None  # (1, 133, 3) output pixels
    valid: torch.Tensor | None = None  # (1, H, W)
    auto_pose: np.ndarray | None = None  # pose=auto: the sampled (F, 133, 3) keypoints, [0, 1] of the reference image
    notes: list[str] = field(default_factory=list)


def _geometry(img: np.ndarray, ref_kpts: np.ndarray | None, s: Settings, job: Job, extracted: bool = False):
    from halfbody.data.transforms import Geometry, crop_geometry

    src_h, src_w = img.shape[:2]
    mode = s.crop if s.crop != "auto" else ("keypoints" if ref_kpts is not None else "center")
    if mode == "center":
        return crop_geometry(src_w, src_h, s.width, s.height, None)
    if ref_kpts is None:
        raise UserError(f"{job.key('crop')}=keypoints needs ref_keypoints (the image's (133, 3) keypoints .npy)")
    from data_pipelines.video_to_shards.config import CropConfig
    from data_pipelines.video_to_shards.crops import halfbody_box
    from data_pipelines.video_to_shards.decode import SourceError

    try:
        x0, y0, x1, y1 = halfbody_box(ref_kpts, src_w, src_h, CropConfig(score_threshold=s.score_threshold))
    except SourceError as e:
        if extracted:  # pose=auto: the keypoints pose_extractor found in the reference image
            raise UserError(f"{job.key('ref')}={job.ref!r}: no half-body crop from the keypoints pose_extractor found "
                            f"in it ({e}); give ref_keypoints or crop=center") from None
        raise UserError(f"{job.key('ref_keypoints')}={job.ref_keypoints!r}: no half-body crop ({e})") from None
    bw, bh = x1 - x0, y1 - y0
    aspect = s.width / s.height
    if bw / bh < aspect:  # grow the square box to the output's aspect about its centre
        grow = int(round(bh * aspect)) - bw
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    elif bw / bh > aspect:
        grow = int(round(bw / aspect)) - bh
        y0, y1 = y0, y1 + grow  # keep the head at the top
    return Geometry(src_w, src_h, s.width, s.height, (x0, y0, x1, y1))


def prepare(job: Job, s: Settings) -> Conditions:
    """Decode and check a job's inputs (before any sampling)."""
    from halfbody.data.conditions import valid_mask
    from halfbody.data.transforms import frame_indices

    img = load_image(job.ref, job.key("ref"))
    audio16, samples, rate = load_audio(job.audio, job.key("audio"), s.silence_dbfs)
    seconds = samples.size / rate
    num_frames = int(round(seconds * s.fps))
    if num_frames < 1:
        raise UserError(f"{job.key('audio')}={job.audio!r} is {seconds * 1000:.1f} ms long, shorter than half a frame "
                        f"at fps={s.fps:g}")
    src_h, src_w = img.shape[:2]
    ref_kpts = None
    if job.ref_keypoints:
        ref_kpts = load_keypoints(job.ref_keypoints, job.key("ref_keypoints"), src_w, src_h, single=True)
    pose, pose_fps = None, None
    auto = job.pose == "auto"  # sampled by the pose model (below, in the model's frame)
    if auto and s.pose_model is None:
        raise UserError(f"{job.key('pose')}=auto needs pose_model (an audio-to-pose checkpoint: pose_model.ckpt_path)")
    if job.pose and not auto:  # a keypoint .npy (at pose_fps), or a driving video (its keypoints at the output fps)
        pose, pose_fps = load_pose(job.pose, job.key("pose"), src_w, src_h, s.fps, s.pose_extractor)
    elif not auto and s.pipeline.POSE_REQUIRED:
        raise UserError(f"{job.key('pose')} is not set: {s.pipeline.MISSING_POSE}")
    # pose=auto without ref_keypoints: the reference image's keypoints from pose_extractor, used as ref_keypoints
    # (crop=auto framing, the pose model's starting pose) when they show a person; otherwise the pose model falls back
    # to its mean reference pose with one log line (audio2pose.pipeline.reference_pose)
    extracted: np.ndarray | ExtractorUnavailable | None = None
    if auto and ref_kpts is None:
        from halfbody.audio2pose.pipeline import reference_person

        try:
            extracted = reference_image_keypoints(img, job.ref, job.key("ref"), s.pose_extractor)
        except ExtractorUnavailable as e:
            extracted = e
        else:
            person = reference_person(extracted)
            ref_kpts = None if person is None else person[None]
    geom = _geometry(img, ref_kpts, s, job, extracted=ref_kpts is not None and not job.ref_keypoints)
    ref = geom.apply_frames(img[None], s.pad_value)[0]
    notes: list[str] = []
    pose_px = None
    if pose is not None:
        pose_fps = float(pose_fps or s.pose_fps or s.fps)
        have = pose.shape[0] / pose_fps
        idx = frame_indices(0, num_frames, pose_fps, s.fps)
        short = int(idx[-1]) - (pose.shape[0] - 1)
        if short > 0:
            missing_s = seconds - have
            if s.pose_policy == "refuse" and short > 1:
                raise UserError(f"{job.key('pose')}={job.pose!r} has {pose.shape[0]} frames at {pose_fps:g} fps "
                                f"({have:.2f} s), shorter than the audio {job.audio!r} ({seconds:.2f} s, "
                                f"{num_frames} frames): give a pose as long as the audio, or pose_policy=hold to hold "
                                "its last pose")
            notes.append(f"pose {job.pose}: {missing_s:.2f} s shorter than the audio, last pose held")
        pose_px = geom.apply_keypoints(pose[np.clip(idx, 0, pose.shape[0] - 1)])
    auto_pose = None
    if auto:  # sampled in the model's frame (as it trained), kept in the reference image's frame (as pose= reads it)
        scale = np.array([s.width, s.height, 1.0], np.float32)
        ref_out = None if ref_kpts is None else geom.apply_keypoints(ref_kpts).reshape(133, 3) / scale

        def extractor(_image: np.ndarray) -> np.ndarray:  # the keypoints extracted above, in the model's frame
            if isinstance(extracted, Exception):
                raise extracted
            return geom.apply_keypoints(extracted) / scale

        pose_px = scale * s.pose_model(audio16, s.fps, num_frames, ref_kpts=ref_out, image=img,
                                       extractor=None if extracted is None else extractor, seed=s.seed,
                                       where=job.key("ref"))
        lo, hi = geom.apply_keypoints(np.array([[0, 0, 1], [1, 1, 1]], np.float32))[:, :2]
        auto_pose = pose_px.copy()
        auto_pose[..., :2] = (pose_px[..., :2] - lo) / (hi - lo)
    audio_rate = rate if rate in AAC_RATES else media.AUDIO_SAMPLE_RATE
    audio_out = samples if audio_rate == rate else audio16
    return Conditions(ref=ref, audio16=audio16, audio_out=audio_out, audio_rate=audio_rate, num_frames=num_frames,
                      pose_kpts=pose_px,
                      ref_kpts=None if ref_kpts is None else geom.apply_keypoints(ref_kpts),
                      valid=valid_mask(s.height, s.width, geom.valid_rect() if geom.is_padded else None), notes=notes,
                      auto_pose=auto_pose)


def face_masks(c: Conditions, s: Settings) -> dict[str, torch.Tensor]:
    """Region masks ``(F or 1, 1, H, W)`` from the pose (else the reference's keypoints); without keypoints the head
    sits where training crops put it (``data.target_head_box``)."""
    from halfbody.data.conditions import region_masks

    kpts = c.pose_kpts if c.pose_kpts is not None else c.ref_kpts
    if kpts is not None:
        return region_masks(kpts, s.height, s.width, s.mask_margins, s.score_threshold, valid=c.valid)
    x0, y0, x1, y1 = s.target_head_box
    m = torch.zeros(1, 1, s.height, s.width)
    m[..., int(y0 * s.height):int(math.ceil(y1 * s.height)), int(x0 * s.width):int(math.ceil(x1 * s.width))] = 1
    return {"mask_lips": m, "mask_face": m, "mask_head": m}


# ================================================================================================ sampling


def condition_tensors(c: Conditions, s: Settings, device: torch.device) -> dict[str, Any]:
    """What a family's ``generate_video`` takes: ``ref`` ``(1, 3, H, W)``, ``audio`` ``(1, S)`` 16 kHz, ``fps``,
    ``pose`` ``(1, F, 3, H, W)`` when there is one (the configured keypoint groups), region masks
    ``mask_lips`` / ``mask_head`` / ``mask_face`` ``(1, F, 1, H, W)`` (views when static)."""
    from halfbody.data.conditions import PoseRenderer

    out: dict[str, Any] = {
        "ref": c.ref[None].to(device),
        "audio": torch.from_numpy(np.ascontiguousarray(c.audio16))[None].to(device),
        "fps": torch.tensor([s.fps]),
    }
    if c.pose_kpts is not None:
        pose = PoseRenderer(s.pose_groups, s.score_threshold).render(c.pose_kpts, s.height, s.width)
        out["pose"] = pose[None].to(device)
    for k, v in face_masks(c, s).items():
        out[k] = v[None].to(device).expand(1, c.num_frames, *v.shape[1:])
    return out
