"""MirrorMeModule: the MirrorMe DiT family as a LightningModule (MirrorMe §3, Figure 2).

Training step (§3.1-3.4): rectified flow with velocity prediction on the causal video VAE's latents, timesteps
shifted toward noise, the reference latent and the motion frames clean (timestep 0, outside the loss), independent
dropout of reference, audio and hand pose for CFG, and ``L_total = L_MSE + lambda L_face`` (Eq. 8-9).
Validation: the loss, plus Euler/CFG samples (§4.1: 15 steps, CFG 2.5, unconditional = reference, audio and pose
zeroed) with the enlarged static face mask, which ``SampleVideoWriter`` turns into mp4s and oracle metrics.
Long videos: :meth:`generate_long`, clip by clip on motion frames (§3.2, last paragraph).

Phase-facing attributes (set through :meth:`apply_phase`, never by phase name): the trainable / muted module groups
(``transformer``, ``audio_encoder``, ``audio_adapter``, ``pose_encoder``), ``audio_region`` (``off`` | ``face``: audio
attention gated by the face mask | ``global``), pose dropout and ``losses: {face: lambda}``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from halfbody.mirrorme.face_mask import latent_face_mask, static_face_mask, to_latent_grid
from halfbody.models.audio_encoders import AudioEncoder
from halfbody.models.autoencoders import Autoencoder
from halfbody.models.flow_matching import RectifiedFlow
from halfbody.models.lightning_base import AnimationModule
from halfbody.phases.spec import PhaseSpec


class MirrorMeModule(AnimationModule):
    """
    Args:
        network: builds the :class:`~halfbody.mirrorme.transformer.MirrorMeTransformer`; called with
            ``latent_channels``, ``audio_feature_dim``, ``spatial_factor`` and ``temporal_factor`` derived from the
            autoencoder and the audio encoder (a Hydra partial of ``MirrorMeTransformer.tiny`` or
            ``MirrorMeTransformer.from_pretrained_parts``).
        autoencoder: frozen *causal video* autoencoder (LTX-Video's VAE, or the patch autoencoder with
            ``temporal_patch > 1``).
        audio_encoder: frozen audio encoder (wav2vec2, §3.3).
        optimizer: partial optimizer (§4.1: Adam, lr 4e-6).
        flow: the rectified-flow maths and sampler (§4.1: training shift 17).
        lr_scheduler: optional partial LR scheduler.
        audio_region: ``face`` (audio attention gated by the face mask, §3.4), ``global`` or ``off``.
        condition_dropout: independent per-sample dropout of ``ref``, ``audio``, ``pose`` (§4.1: 10 % each).
        face_loss_weight: ``lambda`` of Eq. 9 (not given in the paper); a phase's ``losses: {face: lambda}`` overrides.
        motion_frames: ``{probability, max_latent_frames}``: how often a training clip starts with clean ground-truth
            latent frames, and at most how many (§3.2).
        inference_face_enlarge: scale of the static inference face mask about its centre (§3.4).
        num_inference_steps / guidance_scale: validation sampling (§4.1: 15 / 2.5).
        num_sample_batches: validation batches that are also sampled.
        init_checkpoint: start the network from an earlier stage's Lightning checkpoint (``weights_only=True``).
    """

    AUDIO_REGIONS = ("off", "face", "global")
    MUTABLE_GROUPS = ("audio_encoder", "audio_adapter", "pose_encoder")
    AUDIO_GROUPS = ("audio_encoder", "audio_adapter")
    FAMILY, TITLE = "mirrorme", "MirrorMe"
    NETWORK_KEY_PREFIXES = ("network.transformer.",)
    VIDEO_AUTOENCODER = True  # the LTX-style causal video latent space
    CONDITIONS = ("ref", "audio", "pose")
    # ``face``: lambda of Eq. 9 for the phase (null or 0: no face loss).
    PHASE_LOSS_KEYS = ("face",)

    def __init__(self, network: Callable[..., nn.Module], autoencoder: Autoencoder, audio_encoder: AudioEncoder,
                 optimizer: Callable[..., torch.optim.Optimizer], flow: RectifiedFlow,
                 lr_scheduler: Callable[..., Any] | None = None, audio_region: str = "face",
                 condition_dropout: Mapping[str, float] | None = None, face_loss_weight: float = 1.0,
                 motion_frames: Mapping[str, float] | None = None, inference_face_enlarge: float = 1.5,
                 num_inference_steps: int = 15, guidance_scale: float = 2.5, num_sample_batches: int = 1,
                 init_checkpoint: str | None = None) -> None:
        super().__init__(autoencoder, audio_encoder, optimizer, lr_scheduler, audio_region, condition_dropout,
                         num_sample_batches)
        # plain values only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(logger=False, ignore=["network", "autoencoder", "audio_encoder", "flow", "optimizer",
                                                        "lr_scheduler", "condition_dropout", "motion_frames"])
        if autoencoder.temporal_factor == 1:
            raise ValueError("model.autoencoder: MirrorMe denoises causal video latents; it needs a video autoencoder "
                             "with temporal_factor > 1 (LTX-Video's VAE, or PatchAutoencoder(temporal_patch=8))")
        self.network = network(latent_channels=autoencoder.latent_channels,
                               audio_feature_dim=audio_encoder.feature_dim * audio_encoder.tokens_per_frame,
                               spatial_factor=autoencoder.spatial_factor, temporal_factor=autoencoder.temporal_factor)
        if init_checkpoint:
            self.load_network_weights(init_checkpoint)
        self.flow = flow
        if not face_loss_weight >= 0:
            raise ValueError(f"model.face_loss_weight={face_loss_weight!r} must be >= 0")
        self.face_loss_weight = float(face_loss_weight)
        self._configured["face"] = self.face_loss_weight
        mf = {"probability": 0.0, "max_latent_frames": 1, **dict(motion_frames or {})}
        unknown = set(mf) - {"probability", "max_latent_frames"}
        if unknown:
            raise ValueError(f"model.motion_frames has unknown key(s) {sorted(unknown)}; known: probability, "
                             "max_latent_frames")
        if not 0.0 <= float(mf["probability"]) <= 1.0 or int(mf["max_latent_frames"]) < 1:
            raise ValueError(f"model.motion_frames={mf}: probability must be in [0, 1], max_latent_frames >= 1")
        self.motion_probability, self.max_motion_frames = float(mf["probability"]), int(mf["max_latent_frames"])
        if not inference_face_enlarge >= 1.0:
            raise ValueError(f"model.inference_face_enlarge={inference_face_enlarge!r} must be >= 1")
        self.inference_face_enlarge = float(inference_face_enlarge)

    # ----------------------------------------------------------------------------------------------- phases
    def check_phase_losses(self, spec: PhaseSpec) -> None:
        super().check_phase_losses(spec)
        lam = spec.losses.get("face")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
            raise ValueError(f"phase {spec.name!r}: losses.face={lam!r} must be a number >= 0 (lambda of Eq. 9)")

    def configure_phase_losses(self, losses: Mapping[str, Any]) -> None:
        """``losses.face``: missing -> ``model.face_loss_weight``; null -> 0; a number -> that ``lambda``."""
        self.face_loss_weight = float(losses.get("face") or 0.0) if "face" in losses else self._configured["face"]

    # ----------------------------------------------------------------------------------------------- conditions
    @property
    def factors(self) -> tuple[int, int]:
        return self.autoencoder.spatial_factor, self.autoencoder.temporal_factor

    def audio_inputs(self, batch: dict[str, Any], training_mask: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Audio features and the latent face mask that gates them (``face``: dynamic in training, enlarged static
        at inference, §3.4); ``(None, None)`` when audio is off."""
        if self.audio_region == "off":
            return None, None
        feats = self.audio_features(batch)
        if self.audio_region == "global":
            return feats, None
        mask = batch["mask_face"] if training_mask else static_face_mask(batch["mask_face"], self.inference_face_enlarge)
        return feats, latent_face_mask(mask, *self.factors)

    def pose_input(self, batch: dict[str, Any]) -> torch.Tensor | None:
        return None if "pose_encoder" in self.muted_groups else batch["pose"]

    # ----------------------------------------------------------------------------------------------- loss
    def draw_motion_frames(self, latent_frames: int, generator: torch.Generator | None) -> int:
        """Motion frames for this training step (§3.2): 0, or 1..max_latent_frames leading clean latent frames."""
        u = torch.rand(2, generator=generator, device=generator.device if generator is not None else "cpu")
        limit = min(self.max_motion_frames, latent_frames - 1)
        if limit < 1 or float(u[0]) >= self.motion_probability:
            return 0
        return 1 + min(int(float(u[1]) * limit), limit - 1)

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                       training: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``L_MSE + lambda L_face`` (Eq. 3, 8, 9) over the video latents that are denoised (reference and motion
        frames excluded), with padding (HPA, letterbox) excluded by the valid mask."""
        with torch.no_grad():
            x0 = self.autoencoder.encode(batch["video"])
            ref = self.autoencoder.encode_image(batch["ref"])
            feats, face_gate = self.audio_inputs(batch, training_mask=True)
        b, fl = x0.shape[:2]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.flow.sample_timesteps(b, generator=generator, device=x0.device)
        xt = self.flow.add_noise(x0, noise, t)
        motion = self.draw_motion_frames(fl, generator) if training else 0
        if motion:
            xt = torch.cat([x0[:, :motion], xt[:, motion:]], dim=1)  # §3.2: clean ground-truth first frames
        keeps = self.condition_keep_masks(b, generator) if training else {}
        target = self.flow.velocity_target(x0, noise, t)
        pred = self.network(xt, t, ref, feats, self.pose_input(batch), fps=self.batch_fps(batch), face_mask=face_gate,
                            clean_latent_frames=motion, **keeps)
        err = (pred.float() - target.float()).pow(2).mean(dim=2)  # (B, F', h, w), mean over channels
        weight = to_latent_grid(batch["valid"], *self.factors, reduce="mean")  # padding excluded
        if motion:
            weight = torch.cat([torch.zeros_like(weight[:, :motion]), weight[:, motion:]], dim=1)
        mse = (err * weight).sum() / weight.sum().clamp_min(1.0)
        logs = {"mse": mse.detach(), "motion_frames": torch.tensor(float(motion))}
        loss = mse
        if self.face_loss_weight > 0:  # Eq. 8: the velocity error inside the face mask, at latent resolution
            face = latent_face_mask(batch["mask_face"], *self.factors) * weight
            face_loss = (err * face).sum() / face.sum().clamp_min(1.0)
            logs["face"] = face_loss.detach()
            loss = loss + self.face_loss_weight * face_loss
        return loss, logs

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, ref_latents: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                       latent_shape: tuple[int, ...], *, fps: float, face_mask: torch.Tensor | None = None,
                       motion_latents: torch.Tensor | None = None, num_inference_steps: int | None = None,
                       guidance_scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Euler/CFG sampling of ``(B, F', C, h, w)`` latents (§4.1). The unconditional branch zeroes reference, audio
        and pose; both branches run as one batch. ``motion_latents`` ``(B, m, C, h, w)`` are held clean (t = 0) as the
        first ``m`` latent frames."""
        steps = num_inference_steps or self.hparams.num_inference_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        b = latent_shape[0]
        m = 0 if motion_latents is None else motion_latents.shape[1]

        def hold(x: torch.Tensor) -> torch.Tensor:
            return x if not m else torch.cat([motion_latents.to(x.dtype), x[:, m:]], dim=1)

        ones = torch.ones(b, dtype=torch.bool, device=self.device)
        keep2 = torch.cat([ones, ~ones])
        twice = (lambda v: None if v is None else torch.cat([v, v]))

        # audio and pose features do not depend on x_t or t: encode them once for all steps
        net = self.network
        if scale == 1.0:
            cond1 = net.encode_conditions(audio_feats, pose)
        else:
            cond2 = net.encode_conditions(twice(audio_feats), twice(pose), audio_keep=keep2, pose_keep=keep2)

        def denoise_fn(x_t: torch.Tensor, t: torch.Tensor, with_uncond: bool):
            x_t = hold(x_t)
            if not with_uncond:
                return net(x_t, t, ref_latents, None, fps=fps, face_mask=face_mask, clean_latent_frames=m,
                           conditions=cond1)
            v = net(torch.cat([x_t, x_t]), torch.cat([t, t]), twice(ref_latents), None, fps=fps,
                    face_mask=twice(face_mask), clean_latent_frames=m, ref_keep=keep2, audio_keep=keep2,
                    conditions=cond2)
            return v.chunk(2)

        latents = self.flow.euler_sample(denoise_fn, tuple(latent_shape), num_steps=steps, guidance_scale=scale,
                                         generator=generator, device=self.device, dtype=ref_latents.dtype)
        return hold(latents)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """One clip per batch element, the length of ``batch["video"]``: ``(B, F, 3, H, W)`` in ``[-1, 1]``."""
        video = batch["video"]
        b, f, _, h, w = video.shape
        s = self.autoencoder.spatial_factor
        shape = (b, self.autoencoder.latent_num_frames(f), self.autoencoder.latent_channels, h // s, w // s)
        ref = self.autoencoder.encode_image(batch["ref"])
        feats, face = self.audio_inputs(batch, training_mask=False)
        latents = self.sample_latents(ref, feats, self.pose_input(batch), shape, fps=self.batch_fps(batch),
                                      face_mask=face, num_inference_steps=num_inference_steps,
                                      guidance_scale=guidance_scale, generator=generator)
        return self.autoencoder.decode(latents).clamp(-1, 1)

    @torch.no_grad()
    def generate_long(self, ref: torch.Tensor, audio: torch.Tensor, fps: float, num_frames: int, *,
                      clip_frames: int, motion_latent_frames: int = 1, pose: torch.Tensor | None = None,
                      face_mask: torch.Tensor | None = None, num_inference_steps: int | None = None,
                      guidance_scale: float | None = None, generator: torch.Generator | None = None) -> dict[str, Any]:
        """A long video, clip by clip on motion frames (§3.2).

        Each clip has ``clip_frames = 1 + k tf`` frames; clip ``c > 0`` starts with the last
        ``1 + tf (m - 1)`` frames of the video so far, re-encoded as its ``m`` clean motion latent frames, and adds
        ``clip_frames - (1 + tf (m - 1))`` new frames. Audio features are computed once over the whole audio and
        sliced per clip, so clip ``c`` hears exactly the audio of its frames.

        Args:
            ref: ``(B, 3, H, W)``; audio: ``(B, S)`` 16 kHz (zero-padded when shorter than the video);
            pose: ``(B, >= num_frames, 3, H, W)`` hand-keypoint maps or None; face_mask: ``(B, T, 1, H, W)`` pixel
            face masks whose enlarged static box gates the audio (``audio_region = face``).
        Returns:
            ``{"video": (B, num_frames, 3, H, W), "clips": [(first_frame, end_frame), ...],
            "audio_feats": (B, T_total, K, D)}``.
        """
        ae = self.autoencoder
        tf, m = ae.temporal_factor, int(motion_latent_frames)
        fl = ae.latent_num_frames(clip_frames)
        if not 1 <= m < fl:
            raise ValueError(f"motion_latent_frames={m} must be in [1, {fl - 1}] for {clip_frames}-frame clips")
        if m > self.max_motion_frames:
            warnings.warn(f"generate_long: motion_latent_frames={m} exceeds what training used "
                          f"(model.motion_frames.max_latent_frames={self.max_motion_frames})", stacklevel=2)
        overlap = 1 + tf * (m - 1)
        step = clip_frames - overlap
        n_clips = 1 + max(0, math.ceil((num_frames - clip_frames) / step))
        total = clip_frames + (n_clips - 1) * step
        samples = round(total / fps * self.audio_encoder.sample_rate)
        audio = F.pad(audio, (0, max(0, samples - audio.shape[1])))[:, :samples]
        feats_all = self.audio_encoder(audio, num_frames=total, fps=fps)
        if pose is not None and pose.shape[1] < total:  # hold the last pose over the padded tail
            pose = torch.cat([pose, pose[:, -1:].expand(-1, total - pose.shape[1], -1, -1, -1)], dim=1)
        b, _, h, w = ref.shape
        s = ae.spatial_factor
        ref_latents = ae.encode_image(ref)
        face = None
        if self.audio_region == "face":
            if face_mask is None:
                raise ValueError("generate_long: audio_region='face' needs face_mask (B, T, 1, H, W)")
            static = static_face_mask(face_mask, self.inference_face_enlarge)[:, :1].expand(b, clip_frames, 1, h, w)
            face = latent_face_mask(static, s, tf)
        video, clips = None, []
        for c in range(n_clips):
            start = c * step
            motion = None if video is None else ae.encode(video[:, -overlap:])
            feats = None if self.audio_region == "off" else feats_all[:, start:start + clip_frames]
            latents = self.sample_latents(
                ref_latents, feats, None if pose is None or "pose_encoder" in self.muted_groups
                else pose[:, start:start + clip_frames], (b, fl, ae.latent_channels, h // s, w // s), fps=fps,
                face_mask=face, motion_latents=motion, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, generator=generator)
            clip = ae.decode(latents).clamp(-1, 1)
            video = clip if video is None else torch.cat([video, clip[:, overlap:]], dim=1)
            clips.append((start, start + clip_frames))
        return {"video": video[:, :num_frames], "clips": clips, "audio_feats": feats_all}
