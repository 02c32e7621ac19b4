"""MirrorMePipeline: MirrorMe sampling in one place (the diffusers pattern), used by validation
(``MirrorMeModule.generate``), long videos (``MirrorMeModule.generate_long``), ``python -m halfbody.generate`` and the
tests alike.

- **One clip** (§4.1): rectified-flow Euler steps on the causal video VAE's latents (15 steps), CFG 2.5 with the
  conditional and unconditional branches as one batch; the unconditional branch zeroes reference, audio and hand pose.
  The timestep-independent condition features (``a_glo`` / ``a_loc`` of the causal audio encoder, the hand guider's
  pose features) are encoded once per clip, for both branches, and reused by every step; the reference latent is
  encoded once per video.
- **Long videos** (§3.2, last paragraph): clip by clip on motion frames. Clip ``c > 0`` starts with the last
  ``1 + tf (m - 1)`` frames of the video so far, re-encoded as its ``m`` clean (t = 0) motion latent frames, and adds
  ``clip_frames - (1 + tf (m - 1))`` new frames. The audio features are computed once over the whole audio (the
  frozen encoder hears the whole context) and sliced per clip; each slice carries the ``tf - 1`` frames of real
  audio before the clip, which the causal audio encoder's first group reads (§3.3, Figure 3a: causal, so past audio
  only) instead of copies of the clip's first frame. Training windows get the same past from their audio context
  (:meth:`MirrorMeModule.audio_inputs`), so clips sampled here see what training showed the model.
- **Inference face mask** (§3.4): the enlarged static box around the face over the whole video gates the audio.

No host synchronisation inside the loop: timesteps are host floats, conditions stay on the device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from halfbody.mirrorme.face_mask import latent_face_mask, static_face_mask
from halfbody.models.flow_matching import RectifiedFlow

__all__ = ["MirrorMePipeline", "long_video_clips", "audio_past_frames"]


def long_video_clips(num_frames: int, clip_frames: int, overlap: int) -> list[tuple[int, int]]:
    """``[(first_frame, end_frame), ...]`` of the clips that cover ``num_frames`` frames: ``clip_frames`` each, every
    clip after the first starting ``overlap`` frames before the previous one's end."""
    step = clip_frames - overlap
    if step < 1:
        raise ValueError(f"clip_frames={clip_frames} must exceed the motion-frame overlap ({overlap} frames)")
    n_clips = 1 + max(0, math.ceil((num_frames - clip_frames) / step))
    return [(c * step, c * step + clip_frames) for c in range(n_clips)]


def audio_past_frames(network: nn.Module) -> int:
    """Frames of real past audio the network's audio encoder reads before a clip (the causal encoder's ``tf - 1``;
    0 for the cross-attention baseline, which reads the clip's own frames only)."""
    return int(getattr(getattr(network, "audio_encoder", None), "past_frames", 0) or 0)


class MirrorMePipeline:
    """Sampling with the MirrorMe transformer (components + ``__call__``).

    Args:
        network: a :class:`~halfbody.mirrorme.transformer.MirrorMeTransformer`.
        flow: the :class:`RectifiedFlow` (sampling shift, Euler steps with CFG).
        autoencoder: the causal video autoencoder (pixels in and out, motion-frame re-encoding).
        audio_encoder: the frozen audio encoder (long videos: features over the whole audio).
        inference_face_enlarge: scale of the static inference face mask about its centre (§3.4).
        max_motion_frames: what training used (``model.motion_frames.max_latent_frames``); more warns.
        num_inference_steps / guidance_scale: defaults (§4.1: 15 / 2.5).
    """

    # --- what ``python -m halfbody.generate`` asks of a family (halfbody.generation.family), without a model
    POSE_REQUIRED = False  # the hand guider's pose is optional: audio alone drives the video
    MISSING_POSE = ""
    SAMPLER_VARIANTS = False  # Euler steps only: steps / guidance_scale are the knobs
    LONG_VIDEO_OPTIONS = ("clip_frames", "motion_latent_frames")

    @staticmethod
    def check_long_video(options: Mapping[str, Any], temporal_factor: int) -> None:
        """``clip_frames`` ``1 + k tf`` (k >= 1) and ``1 <= motion_latent_frames < 1 + k``; ``ValueError`` naming the
        key otherwise."""
        clip, m, tf = int(options["clip_frames"]), int(options["motion_latent_frames"]), int(temporal_factor)
        if clip < 1 + tf or (clip - 1) % tf:
            raise ValueError(f"clip_frames={clip}: MirrorMe's causal autoencoder needs 1 + k*{tf} frames per clip, "
                             f"k >= 1 (e.g. {1 + tf}, {1 + 2 * tf})")
        latent = 1 + (clip - 1) // tf
        if not 1 <= m < latent:
            raise ValueError(f"motion_latent_frames={m}: expected 1 to {latent - 1} for {clip}-frame clips")

    def __init__(self, network: nn.Module, flow: RectifiedFlow, autoencoder: nn.Module,
                 audio_encoder: nn.Module | None = None, inference_face_enlarge: float = 1.5,
                 max_motion_frames: int | None = None, num_inference_steps: int = 15, guidance_scale: float = 2.5):
        self.network, self.flow, self.autoencoder, self.audio_encoder = network, flow, autoencoder, audio_encoder
        self.inference_face_enlarge = float(inference_face_enlarge)
        self.max_motion_frames = max_motion_frames
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def network_passes(self, num_frames: int, num_inference_steps: int | None = None, *, clip_frames: int,
                       motion_latent_frames: int = 1, **_: Any) -> int:
        """Network evaluations a video takes (one per clip and step; the CFG branches are one batch)."""
        overlap = 1 + self.autoencoder.temporal_factor * (int(motion_latent_frames) - 1)
        steps = num_inference_steps or self.num_inference_steps
        return len(long_video_clips(num_frames, clip_frames, overlap)) * steps

    def static_face_gate(self, face_mask: torch.Tensor, clip_frames: int) -> torch.Tensor:
        """``(B, T, 1, H, W)`` pixel face masks -> the latent gate ``(B, F', h, w)`` of the enlarged static box (§3.4)
        over every frame of the masks, for ``clip_frames``-frame clips."""
        b, _, _, h, w = face_mask.shape
        static = static_face_mask(face_mask, self.inference_face_enlarge)[:, :1].expand(b, clip_frames, 1, h, w)
        return latent_face_mask(static, self.autoencoder.spatial_factor, self.autoencoder.temporal_factor)

    # ----------------------------------------------------------------------------------------------- latents
    @torch.no_grad()
    def sample_latents(self, ref_latents: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                       latent_shape: tuple[int, ...], *, fps: float, face_mask: torch.Tensor | None = None,
                       motion_latents: torch.Tensor | None = None, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, generator: torch.Generator | None = None,
                       callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Euler/CFG sampling of ``(B, F', C, h, w)`` latents (§4.1).

        Args:
            ref_latents: ``(B, C, h, w)`` clean reference latents.
            audio_feats: ``(B, F, K, D)`` per-frame features of the clip (``F = 1 + k tf``), or ``(B, tf - 1 + F, K,
                D)`` with the real past in front (long videos, training windows); None: no audio.
            pose: ``(B, F, 3, H, W)`` hand-pose maps or None.
            face_mask: the latent audio gate ``(B, F', h, w)`` or None (global audio).
            motion_latents: ``(B, m, C, h, w)`` held clean (t = 0) as the first ``m`` latent frames.
        """
        steps = num_inference_steps or self.num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        b = latent_shape[0]
        m = 0 if motion_latents is None else motion_latents.shape[1]
        device = ref_latents.device

        def hold(x: torch.Tensor) -> torch.Tensor:
            return x if not m else torch.cat([motion_latents.to(x.dtype), x[:, m:]], dim=1)

        net = self.network
        twice = (lambda v: None if v is None else torch.cat([v, v]))  # noqa: E731
        # audio and pose features do not depend on x_t or t: encode them once for all steps (both CFG branches)
        if scale == 1.0:
            cond1 = net.encode_conditions(audio_feats, pose)
        else:
            ones = torch.ones(b, dtype=torch.bool, device=device)
            keep2 = torch.cat([ones, ~ones])
            cond2 = net.encode_conditions(twice(audio_feats), twice(pose), audio_keep=keep2, pose_keep=keep2)
            ref2, face2 = twice(ref_latents), twice(face_mask)

        def denoise_fn(x_t: torch.Tensor, t: torch.Tensor, with_uncond: bool):
            x_t = hold(x_t)
            if not with_uncond:
                out = net(x_t, t, ref_latents, None, fps=fps, face_mask=face_mask, clean_latent_frames=m,
                          conditions=cond1)
                return self.flow.as_velocity(out, x_t, t)
            x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
            out = net(x2, t2, ref2, None, fps=fps, face_mask=face2, clean_latent_frames=m, ref_keep=keep2,
                      audio_keep=keep2, conditions=cond2)
            return self.flow.as_velocity(out, x2, t2).chunk(2)

        latents = self.flow.euler_sample(denoise_fn, tuple(latent_shape), num_steps=steps, guidance_scale=scale,
                                         generator=generator, device=device, dtype=ref_latents.dtype,
                                         callback=callback)
        return hold(latents)

    # ----------------------------------------------------------------------------------------------- one clip
    @torch.no_grad()
    def __call__(self, ref: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                 num_frames: int, *, fps: float, face_mask: torch.Tensor | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """One clip of ``num_frames = 1 + k tf`` frames: ``ref`` ``(B, 3, H, W)`` in ``[-1, 1]`` ->
        ``(B, num_frames, 3, H, W)`` in ``[-1, 1]``. ``face_mask``: the latent audio gate (or None)."""
        ae = self.autoencoder
        b, _, h, w = ref.shape
        s = ae.spatial_factor
        shape = (b, ae.latent_num_frames(int(num_frames)), ae.latent_channels, h // s, w // s)
        ref_latents = ae.encode_image(ref)
        latents = self.sample_latents(ref_latents, audio_feats, pose, shape, fps=fps, face_mask=face_mask,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      generator=generator)
        return ae.decode(latents).clamp(-1, 1)

    # ----------------------------------------------------------------------------------------------- long videos
    def whole_audio_features(self, audio: torch.Tensor, fps: float, num_frames: int, past: int) -> torch.Tensor:
        """``(B, past + num_frames, K, D)``: the features of ``num_frames`` frames from ``audio`` ``(B, S)`` 16 kHz
        (zero-padded to the frames), preceded by ``past`` frames before frame 0 (clamped to the audio's start)."""
        enc = self.audio_encoder
        samples = round(num_frames / fps * enc.sample_rate)
        audio = F.pad(audio, (0, max(0, samples - audio.shape[1])))[:, :samples]
        if not past:
            return enc(audio, num_frames=num_frames, fps=fps)
        b = audio.shape[0]
        offsets = torch.full((b,), -past * enc.sample_rate / fps, dtype=torch.float64)  # frame -past
        lengths = torch.full((b,), samples, dtype=torch.long)
        return enc(audio, num_frames=past + num_frames, fps=fps, offsets=offsets, lengths=lengths)

    @torch.no_grad()
    def generate_long(self, ref: torch.Tensor, audio: torch.Tensor | None, fps: float, num_frames: int, *,
                      clip_frames: int, motion_latent_frames: int = 1, pose: torch.Tensor | None = None,
                      face_mask: torch.Tensor | None = None, audio_region: str = "face",
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      generator: torch.Generator | None = None,
                      on_clip: Callable[[int, torch.Tensor], None] | None = None) -> dict[str, Any]:
        """A video of ``num_frames`` frames, clip by clip on motion frames (§3.2).

        Args:
            ref: ``(B, 3, H, W)``; audio: ``(B, S)`` 16 kHz (zero-padded when shorter than the video), unused with
                ``audio_region="off"``; pose: ``(B, >= num_frames, 3, H, W)`` hand-keypoint maps or None (the last
                pose is held over the padded tail); face_mask: ``(B, T, 1, H, W)`` pixel face masks whose enlarged
                static box gates the audio (``audio_region="face"``).
            on_clip: ``on_clip(index, clip pixels)`` after each clip is decoded.
        Returns:
            ``{"video": (B, num_frames, 3, H, W), "clips": [(first_frame, end_frame), ...],
            "audio_feats": (B, T_total, K, D)`` (None without audio), ``"audio_past": tf - 1 or 0}``.
        """
        ae = self.autoencoder
        tf, m = ae.temporal_factor, int(motion_latent_frames)
        fl = ae.latent_num_frames(clip_frames)
        if not 1 <= m < fl:
            raise ValueError(f"motion_latent_frames={m} must be in [1, {fl - 1}] for {clip_frames}-frame clips")
        if self.max_motion_frames is not None and m > self.max_motion_frames:
            warnings.warn(f"generate_long: motion_latent_frames={m} exceeds what training used "
                          f"(model.motion_frames.max_latent_frames={self.max_motion_frames})", stacklevel=3)
        overlap = 1 + tf * (m - 1)
        clips = long_video_clips(num_frames, clip_frames, overlap)
        total = clips[-1][1]
        past = audio_past_frames(self.network)
        feats_all = None
        if audio_region != "off":
            feats_all = self.whole_audio_features(audio, fps, total, past)  # frame i is row past + i
        if pose is not None and pose.shape[1] < total:  # hold the last pose over the padded tail
            pose = torch.cat([pose, pose[:, -1:].expand(-1, total - pose.shape[1], -1, -1, -1)], dim=1)
        b, _, h, w = ref.shape
        s = ae.spatial_factor
        ref_latents = ae.encode_image(ref)  # once per video
        gate = None
        if audio_region == "face":
            if face_mask is None:
                raise ValueError("generate_long: audio_region='face' needs face_mask (B, T, 1, H, W)")
            gate = self.static_face_gate(face_mask, clip_frames)
        video = None
        for c, (start, end) in enumerate(clips):
            motion = None if video is None else ae.encode(video[:, -overlap:])
            feats = None if feats_all is None else feats_all[:, start:past + end]  # the past, then the clip
            latents = self.sample_latents(
                ref_latents, feats, None if pose is None else pose[:, start:end],
                (b, fl, ae.latent_channels, h // s, w // s), fps=fps, face_mask=gate, motion_latents=motion,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generator)
            clip = ae.decode(latents).clamp(-1, 1)
            video = clip if video is None else torch.cat([video, clip[:, overlap:]], dim=1)
            if on_clip is not None:
                on_clip(c, clip)
        return {"video": video[:, :num_frames], "clips": clips, "audio_feats": feats_all, "audio_past": past}
