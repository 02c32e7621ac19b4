"""MirrorMeModule: the MirrorMe DiT family as a LightningModule (MirrorMe §3, Figure 2).

Training step (§3.1-3.4): rectified flow with velocity prediction on the causal video VAE's latents, timesteps
shifted toward noise, the reference latent and the motion frames clean (timestep 0, outside the loss), independent
dropout of reference, audio and hand pose for CFG, and ``L_total = L_MSE + lambda L_face`` (Eq. 8-9).
Validation: the loss, plus Euler/CFG samples (§4.1: 15 steps, CFG 2.5, unconditional = reference, audio and pose
zeroed) with the enlarged static face mask, which ``SampleVideoWriter`` turns into mp4s and oracle metrics.
Sampling (validation, long videos on motion frames, ``halfbody.generate``) lives in
:class:`~halfbody.mirrorme.pipeline.MirrorMePipeline`; :meth:`generate` and :meth:`generate_long` wrap it.

Phase-facing attributes (set through :meth:`apply_phase`, never by phase name): the trainable / muted module groups
(``transformer``, ``audio_encoder``, ``audio_adapter``, ``pose_encoder``), ``audio_region`` (``off`` | ``face``: audio
attention gated by the face mask | ``global``), pose dropout and ``losses: {face: lambda}``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from halfbody.mirrorme.face_mask import latent_face_mask, static_face_mask, to_latent_grid
from halfbody.mirrorme.pipeline import MirrorMePipeline, audio_past_frames
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
        hand_loss_weight: ``lambda_hand`` of the hand-region loss (not in the paper; 0: off), as the face loss over the
            hands' cells (``AnimationModule.hand_loss``); a phase's ``losses: {hand: lambda}`` overrides.
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
    # ``face``: lambda of Eq. 9 for the phase (null or 0: no face loss); ``hand``: lambda_hand (AnimationModule).
    PHASE_LOSS_KEYS = ("face", "hand")

    def __init__(self, network: Callable[..., nn.Module], autoencoder: Autoencoder, audio_encoder: AudioEncoder,
                 optimizer: Callable[..., torch.optim.Optimizer], flow: RectifiedFlow,
                 lr_scheduler: Callable[..., Any] | None = None, audio_region: str = "face",
                 condition_dropout: Mapping[str, float] | None = None, face_loss_weight: float = 1.0,
                 motion_frames: Mapping[str, float] | None = None, inference_face_enlarge: float = 1.5,
                 num_inference_steps: int = 15, guidance_scale: float = 2.5, num_sample_batches: int = 1,
                 init_checkpoint: str | None = None, hand_loss_weight: float = 0.0) -> None:
        super().__init__(autoencoder, audio_encoder, optimizer, lr_scheduler, audio_region, condition_dropout,
                         num_sample_batches, hand_loss_weight)
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

    # ----------------------------------------------------------------------------------------------- parallelism
    def parallelize_network(self, settings, mesh) -> dict[str, int]:
        """``configure_model``'s family hook: :func:`halfbody.mirrorme.parallelize.parallelize_mirrorme`."""
        from halfbody.mirrorme.parallelize import parallelize_mirrorme

        return parallelize_mirrorme(self.network, settings, mesh)

    # ----------------------------------------------------------------------------------------------- phases
    def check_phase_losses(self, spec: PhaseSpec) -> None:
        super().check_phase_losses(spec)
        lam = spec.losses.get("face")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
            raise ValueError(f"phase {spec.name!r}: losses.face={lam!r} must be a number >= 0 (lambda of Eq. 9)")

    def configure_phase_losses(self, losses: Mapping[str, Any]) -> None:
        """``losses.face``: missing -> ``model.face_loss_weight``; null -> 0; a number -> that ``lambda``."""
        super().configure_phase_losses(losses)
        self.face_loss_weight = float(losses.get("face") or 0.0) if "face" in losses else self._configured["face"]

    # ----------------------------------------------------------------------------------------------- conditions
    @property
    def factors(self) -> tuple[int, int]:
        return self.autoencoder.spatial_factor, self.autoencoder.temporal_factor

    @torch.no_grad()
    def audio_features(self, batch: dict[str, Any], num_frames: int | None = None) -> torch.Tensor:
        """Per-frame audio features; with an audio context (and the causal audio encoder) preceded by the ``tf - 1``
        frames of real audio before the window, which the encoder's first group reads (§3.3; as long videos give each
        later clip its past, :mod:`halfbody.mirrorme.pipeline`). Frames before the context's start clamp to it."""
        past = audio_past_frames(self.network)
        if not past or batch.get("audio_feats") is not None or "audio_context" not in batch:
            return super().audio_features(batch, num_frames)
        num_frames = num_frames or batch["video"].shape[1]
        fps = self.batch_fps(batch)
        shift = past * self.audio_encoder.sample_rate / fps
        offsets = [o - shift for o in self.host_values(batch, "audio_context_offset")]  # host numbers: no read-back
        feats = self.audio_encoder(batch["audio_context"], num_frames=past + num_frames, fps=fps, offsets=offsets,
                                   lengths=self.host_values(batch, "audio_context_length"))
        return feats.to(batch["video"].dtype)

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
        rng = self.host_rng(generator)  # the count sets shapes: drawn on the host, no device read-back
        u = (rng.random(), rng.random())
        limit = min(self.max_motion_frames, latent_frames - 1)
        if limit < 1 or u[0] >= self.motion_probability:
            return 0
        return 1 + min(int(u[1] * limit), limit - 1)

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
        t = self.flow.sample_timesteps(b, generator=generator, device=x0.device,
                                       num_tokens=fl * x0.shape[-2] * x0.shape[-1])  # token-dependent shift (§4.1)
        xt = self.flow.add_noise(x0, noise, t)
        motion = self.draw_motion_frames(fl, generator) if training else 0
        if motion:
            xt = torch.cat([x0[:, :motion], xt[:, motion:]], dim=1)  # §3.2: clean ground-truth first frames
        keeps = self.condition_keep_masks(b, generator) if training else {}
        target = self.flow.velocity_target(x0, noise, t)
        pred = self.network(xt, t, ref, feats, self.pose_input(batch), fps=self.batch_fps(batch), face_mask=face_gate,
                            clean_latent_frames=motion, **keeps)
        pred = self.flow.as_velocity(pred, xt, t)
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
        if self.hand_loss_weight > 0:
            hand_loss = self.hand_loss(err, weight, batch, lambda m: latent_face_mask(m, *self.factors))
            logs["hand"] = hand_loss.detach()
            loss = loss + self.hand_loss_weight * hand_loss
        return loss, logs

    # ----------------------------------------------------------------------------------------------- sampling
    # Sampling lives in :class:`~halfbody.mirrorme.pipeline.MirrorMePipeline`; these are thin wrappers that hand it
    # this module's components and phase state (audio region, muted pose encoder).
    PIPELINE = MirrorMePipeline

    @property
    def pipeline(self) -> MirrorMePipeline:
        """The sampling pipeline over this module's network, flow, autoencoder and audio encoder."""
        return MirrorMePipeline(self.network, self.flow, self.autoencoder, self.audio_encoder,
                                inference_face_enlarge=self.inference_face_enlarge,
                                max_motion_frames=self.max_motion_frames,
                                num_inference_steps=self.hparams.num_inference_steps,
                                guidance_scale=self.hparams.guidance_scale)

    @torch.no_grad()
    def sample_latents(self, ref_latents: torch.Tensor, audio_feats: torch.Tensor | None, pose: torch.Tensor | None,
                       latent_shape: tuple[int, ...], **kwargs: Any) -> torch.Tensor:
        """:meth:`MirrorMePipeline.sample_latents` (Euler/CFG, §4.1)."""
        return self.pipeline.sample_latents(ref_latents, audio_feats, pose, latent_shape, **kwargs)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """One clip per batch element, the length of ``batch["video"]``: ``(B, F, 3, H, W)`` in ``[-1, 1]``, the
        batch's padding painted (:meth:`paint_padding`)."""
        feats, face = self.audio_inputs(batch, training_mask=False)
        video = self.pipeline(batch["ref"], feats, self.pose_input(batch), batch["video"].shape[1],
                              fps=self.batch_fps(batch), face_mask=face, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, generator=generator)
        return self.paint_padding(video, batch)

    @torch.no_grad()
    def generate_long(self, ref: torch.Tensor, audio: torch.Tensor, fps: float, num_frames: int, *,
                      clip_frames: int, motion_latent_frames: int = 1, pose: torch.Tensor | None = None,
                      face_mask: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        """A long video, clip by clip on motion frames (§3.2): :meth:`MirrorMePipeline.generate_long` with this
        module's audio region and pose encoder (muted: no pose). Returns its dict (``video``, ``clips``,
        ``audio_feats``, ``audio_past``)."""
        return self.pipeline.generate_long(
            ref, audio, fps, num_frames, clip_frames=clip_frames, motion_latent_frames=motion_latent_frames,
            pose=None if "pose_encoder" in self.muted_groups else pose, face_mask=face_mask,
            audio_region=self.audio_region, **kwargs)

    @torch.no_grad()
    def generate_video(self, conditions: dict[str, Any], num_frames: int, *, clip_frames: int,
                       motion_latent_frames: int = 1, **kwargs: Any) -> torch.Tensor:
        """``halfbody.generate``'s family-agnostic call: ``conditions`` holds ``ref`` ``(B, 3, H, W)``, ``audio``
        ``(B, S)`` 16 kHz, ``fps``, optional ``pose`` and the ``mask_face`` ``(B, T, 1, H, W)``; returns
        ``(B, num_frames, 3, H, W)`` in ``[-1, 1]``, any length (motion frames)."""
        return self.generate_long(conditions["ref"], conditions["audio"], self.batch_fps(conditions), num_frames,
                                  clip_frames=clip_frames, motion_latent_frames=motion_latent_frames,
                                  pose=conditions.get("pose"), face_mask=conditions.get("mask_face"),
                                  **kwargs)["video"]
