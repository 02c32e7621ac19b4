"""Sampling of the audio-to-pose model (used by validation and by ``generate pose=auto`` alike).

Long sequences are made window by window on a *motion prefix* (MirrorMe's motion frames, §3.2, on keypoints; the
overlapping-window "seed pose" of DiffGesture §3.3 and Audio2Photoreal's pose diffusion): window ``c`` holds the last
``prefix_frames`` generated frames clean and samples the remaining ``window - prefix_frames``. The first window's
prefix is one frame, the reference's own pose, so frame 0 of every sequence is the reference pose. Each window
integrates the rectified flow with Euler steps and classifier-free guidance on audio: the unconditional branch
replaces the audio tokens with the learned null embedding and keeps the reference and the prefix.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from halfbody.audio2pose import keypoint_sequence as ks
from halfbody.models.flow_matching import RectifiedFlow
from halfbody.utils.errors import UserError

log = logging.getLogger(__name__)


def windows(num_frames: int, window: int, prefix_frames: int) -> list[tuple[int, int]]:
    """``(start, prefix)`` per window: the window covers ``[start, start + window)`` (clamped to ``num_frames``)
    and its first ``prefix`` frames are already generated. The first window has a 1-frame prefix (the reference)."""
    if window < 2 or not 1 <= prefix_frames < window:
        raise ValueError(f"window={window} must be >= 2 and prefix_frames={prefix_frames} in [1, window)")
    out, end = [(0, 1)], min(window, num_frames)
    while end < num_frames:
        start = max(0, min(end - prefix_frames, num_frames - window))
        out.append((start, end - start))
        end = min(start + window, num_frames)
    return out


class Audio2PosePipeline:
    """
    Args:
        network: a :class:`~halfbody.audio2pose.motion_transformer.MotionTransformer`.
        flow: the rectified-flow sampler.
        motion_scale: frame-width units per motion unit (``keypoint_sequence.encode``).
        window / prefix_frames: frames per window and clean prefix frames carried into the next.
        num_inference_steps / guidance_scale: Euler steps and audio CFG.
    """

    def __init__(self, network: torch.nn.Module, flow: RectifiedFlow, motion_scale: float, window: int,
                 prefix_frames: int, num_inference_steps: int = 10, guidance_scale: float = 2.0) -> None:
        self.network, self.flow = network, flow
        self.motion_scale, self.window, self.prefix_frames = float(motion_scale), int(window), int(prefix_frames)
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)

    @torch.no_grad()
    def sample_window(self, audio: torch.Tensor | None, reference: torch.Tensor, prefix_motion: torch.Tensor,
                      frames: int, steps: int, guidance_scale: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Motion ``(B, frames, 92)`` of one window whose first ``m = prefix_motion.shape[1]`` frames are held."""
        net = self.network
        b, m = reference.shape[0], prefix_motion.shape[1]
        flag = torch.zeros(b, frames, dtype=torch.bool, device=reference.device)
        flag[:, :m] = True
        cond = net.encode_audio(audio, b, frames)
        uncond = net.encode_audio(None, b, frames)

        def hold(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([prefix_motion.to(x.dtype), x[:, m:]], dim=1)

        def denoise_fn(x_t: torch.Tensor, t: torch.Tensor, with_uncond: bool):
            x_t = hold(x_t)
            if not with_uncond:
                return net(x_t, t, None, reference, flag, audio_tokens=cond)
            v = net(torch.cat([x_t, x_t]), torch.cat([t, t]), None, torch.cat([reference, reference]),
                    torch.cat([flag, flag]), audio_tokens=torch.cat([cond, uncond]))
            return v.chunk(2)

        x = self.flow.euler_sample(denoise_fn, (b, frames, ks.POSE_DIM), num_steps=steps,
                                   guidance_scale=guidance_scale, generator=generator, device=reference.device)
        return hold(x)

    @torch.no_grad()
    def __call__(self, audio_feats: torch.Tensor | None, ref_kpts: torch.Tensor, num_frames: int, *,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None,
                 callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Keypoints ``(B, num_frames, 133, 3)`` from per-frame audio features ``(B, >= num_frames, K, D)`` (None:
        unconditional) and the reference pose ``(B, 133, 3)``; frame 0 is the reference pose."""
        steps = int(num_inference_steps or self.num_inference_steps)
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        ref = ref_kpts.float()
        reference = ks.reference_features(ref)
        b = ref.shape[0]
        motion = torch.zeros(b, num_frames, ks.POSE_DIM, device=ref.device)
        plan = windows(num_frames, self.window, self.prefix_frames)
        for c, (start, m) in enumerate(plan):
            end = min(start + self.window, num_frames)
            feats = None if audio_feats is None else audio_feats[:, start:end]
            motion[:, start:end] = self.sample_window(feats, reference, motion[:, start:start + m], end - start,
                                                      steps, scale, generator)
            if callback is not None:
                callback(c, len(plan))
        return ks.decode(motion, ref, self.motion_scale)


# ------------------------------------------------------------------------------------------ generation helpers
def reference_person(people: np.ndarray | None) -> np.ndarray | None:
    """The person ``(133, 3)`` of ``people`` (``(133, 3)`` or ``(persons, 133, 3)``) that a generated sequence starts
    from: the most confident one whose head, shoulders, hips and arms are visible on average (mean score of those
    points >= ``keypoint_sequence.SCORE_THRESHOLD``); None when there is no such person."""
    if people is None:
        return None
    people = np.asarray(people, np.float32).reshape(-1, 133, 3)
    score = people[:, ks.CONTEXT_POINTS + (7, 8, 9, 10), 2].mean(1) if people.size else np.zeros(0)
    if not (score >= ks.SCORE_THRESHOLD).any():
        return None
    return people[int(np.argmax(score))]


def reference_pose(model: Any, ref_kpts: np.ndarray | None = None, image: np.ndarray | None = None,
                   extractor: Callable[[np.ndarray], np.ndarray] | None = None, where: str = "ref") -> np.ndarray:
    """The reference pose ``(133, 3)`` (x, y in ``[0, 1]`` of the reference frame) that a generated sequence starts
    from: ``ref_kpts`` (``(133, 3)`` or ``(persons, 133, 3)``) when given, else what ``extractor(image)`` finds
    (``(persons, 133, 3)``); the person :func:`reference_person` picks.
    **Fallback** (one log line): when no keypoints are given, the extractor cannot run (it raises
    ``generation.inputs.ExtractorUnavailable``: rtmlib not installed, an ONNX file or the sidecar missing), or the
    keypoints show no such person, the sequence starts from the model's mean training reference pose
    (``Audio2PoseModule.mean_reference``, saved in the checkpoint)."""
    from halfbody.generation.inputs import ExtractorUnavailable

    people, source = None, ""
    if ref_kpts is not None:
        people, source = np.asarray(ref_kpts, np.float32), "in its keypoints"
    elif extractor is not None and image is not None:
        try:
            people, source = np.asarray(extractor(image), np.float32), "by the keypoint extractor"
        except ExtractorUnavailable as e:
            log.warning("%s: the reference image's keypoints cannot be extracted (%s); the hand sequence starts from "
                        "the pose model's mean reference pose (pose=auto fallback)", where, e)
            return model.mean_reference.detach().float().cpu().numpy()
    if people is not None:
        person = reference_person(people)
        if person is not None:
            return person
        log.warning("%s: no person detected in the reference image (%s); the hand sequence starts from the pose "
                    "model's mean reference pose (pose=auto fallback)", where, source)
    else:
        log.warning("%s: no reference keypoints (ref_keypoints=<(133, 3) .npy>); the hand sequence starts from the "
                    "pose model's mean reference pose (pose=auto fallback)", where)
    return model.mean_reference.detach().float().cpu().numpy()


@torch.no_grad()
def sample_pose(model: Any, audio: np.ndarray | torch.Tensor, fps: float, num_frames: int, *,
                ref_kpts: np.ndarray | None = None, image: np.ndarray | None = None,
                extractor: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                num_inference_steps: int | None = None, guidance_scale: float | None = None,
                where: str = "ref") -> np.ndarray:
    """``pose=auto``: a hand-and-arm keypoint sequence ``(num_frames, 133, 3)`` (x, y in ``[0, 1]`` of the
    reference frame, every non-generated point held at the reference pose) for 16 kHz mono ``audio`` ``(S,)``,
    sampled by an :class:`~halfbody.audio2pose.module.Audio2PoseModule`. The audio encoder hears the whole audio
    (``data.audio_context=clip``)."""
    device = next(model.parameters()).device
    ref = torch.as_tensor(reference_pose(model, ref_kpts, image, extractor, where), dtype=torch.float32)
    if ref.shape != (133, 3):
        raise UserError(f"{where}: reference keypoints must be (133, 3), got {tuple(ref.shape)}")
    a = torch.as_tensor(np.asarray(audio, np.float32)).reshape(1, -1).to(device)
    samples = round(num_frames / fps * model.audio_encoder.sample_rate)
    a = torch.nn.functional.pad(a, (0, max(0, samples - a.shape[1])))
    feats = model.audio_encoder(a, num_frames=num_frames, fps=float(fps))
    g = torch.Generator(device=device).manual_seed(int(seed))
    kpts = model.pipeline(feats, ref[None].to(device), num_frames, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, generator=g)
    return kpts[0].float().cpu().numpy()


def load_pose_model(ckpt_path: str, key: str = "pose_model", device: torch.device | str = "cpu") -> Any:
    """An :class:`~halfbody.audio2pose.module.Audio2PoseModule` from a training run's checkpoint
    (``<run>/checkpoints/*.ckpt``; the model config is the run's ``<run>/.hydra/config.yaml``), weights loaded with
    ``torch.load(weights_only=True)``. A missing file or a checkpoint of another family is one line naming ``key``."""
    import hydra
    from omegaconf import OmegaConf

    from halfbody.audio2pose.module import Audio2PoseModule

    p = Path(ckpt_path)
    if not p.is_file():
        raise UserError(f"{key}={ckpt_path!r} does not exist: expected an audio2pose run's checkpoint "
                        "(logs/<run>/checkpoints/last.ckpt of `python -m halfbody.train experiment=audio2pose`)")
    run_cfg = p.parent.parent / ".hydra" / "config.yaml"
    if not run_cfg.is_file():
        raise UserError(f"{key}={ckpt_path!r}: no run config at {run_cfg} (the checkpoint must stay in its run "
                        "directory, <run>/checkpoints/*.ckpt)")
    cfg = OmegaConf.load(run_cfg)
    if str(OmegaConf.select(cfg, "model._target_")) != f"{Audio2PoseModule.__module__}.{Audio2PoseModule.__name__}":
        raise UserError(f"{key}={ckpt_path!r} is a {OmegaConf.select(cfg, 'model._target_')} checkpoint, not an "
                        "audio-to-pose one (family=audio2pose)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)["state_dict"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{key}={ckpt_path!r} is not a readable Lightning checkpoint ({type(e).__name__})") from None
    model = hydra.utils.instantiate(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith(("audio_encoder.", "autoencoder."))] + list(unexpected)
    if bad:
        raise UserError(f"{key}={ckpt_path!r}: weights do not fit the run's model config ({bad[:3]} ...)")
    return model.eval().to(device)


class AutoPose:
    """``generate pose=auto`` (conf/generate.yaml ``pose_model``): an audio2pose run's checkpoint, loaded at the first
    call, as a function ``(audio 16 kHz (S,), fps, num_frames, *, ref_kpts, image, extractor, seed, where) ->
    (num_frames, 133, 3)`` keypoints in ``[0, 1]`` of the reference frame (see :func:`sample_pose`).

    Args:
        ckpt_path: ``<run>/checkpoints/*.ckpt`` of ``python -m halfbody.train experiment=audio2pose``.
        steps / guidance_scale: override the model's Euler steps and audio CFG scale.
        key: the config key named in errors.
    """

    def __init__(self, ckpt_path: str | None, steps: int | None = None, guidance_scale: float | None = None,
                 device: str = "cpu", key: str = "pose_model.ckpt_path") -> None:
        self.ckpt_path, self.steps, self.guidance_scale = ckpt_path, steps, guidance_scale
        self.device, self.key = device, key
        self.model: Any = None

    def load(self) -> Any:
        if self.model is None:
            if not self.ckpt_path:
                raise UserError(f"{self.key} is not set: pose=auto samples the hand sequence with an audio-to-pose "
                                "checkpoint (python -m halfbody.train experiment=audio2pose)")
            self.model = load_pose_model(str(self.ckpt_path), self.key, self.device)
        return self.model

    def __call__(self, audio: np.ndarray | torch.Tensor, fps: float, num_frames: int, *,
                 ref_kpts: np.ndarray | None = None, image: np.ndarray | None = None,
                 extractor: Callable[[np.ndarray], np.ndarray] | None = None, seed: int = 0,
                 where: str = "ref") -> np.ndarray:
        return sample_pose(self.load(), audio, fps, num_frames, ref_kpts=ref_kpts, image=image, extractor=extractor,
                           seed=seed, num_inference_steps=self.steps, guidance_scale=self.guidance_scale, where=where)
