"""EchoMimicV2Module: the EchoMimicV2 family as a LightningModule (EchoMimicV2 §3.1, Figure 2).

Training step: the latent diffusion loss with v-prediction (§3.1 Eq. 1, in its v-parameterised form as the official
code trains with zero-terminal-SNR DDIM), every condition on, with independent condition dropout for CFG.
Validation: the loss at fixed timesteps, plus samples from :class:`EchoMimicV2Pipeline` (the release's sampling:
context windows, blending, CFG without reference, audio and pose; ``model.sampler``) that the ``SampleVideoWriter``
callback turns into mp4s, W&B videos and synthetic-world oracle metrics. :meth:`EchoMimicV2Module.generate` needs the
conditions only (reference, audio, pose) and a frame count, not a ground-truth video.

Phase-facing attributes (set by the curriculum callback through :meth:`apply_phase`, never by phase name):
``audio_region``, the per-group ``requires_grad`` of :meth:`module_groups`, ``muted_groups``, the pose dropout
``condition_dropout["pose"]`` (drawn per sample in :meth:`condition_keep_masks`, so a per-step schedule needs no
dataloader worker restart) and ``phase_losses``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from halfbody.data.conditions import to_latent_resolution
from halfbody.echomimic_v2.pipeline import EchoMimicV2Pipeline, SamplerSettings
from halfbody.models.audio_encoders import AudioEncoder
from halfbody.models.autoencoders import Autoencoder
from halfbody.losses.phd import PhDLoss
from halfbody.models.lightning_base import AnimationModule
from halfbody.models.schedulers import VPredictionDDIM
from halfbody.phases.spec import PhaseSpec

AUDIO_REGIONS = ("off", "lips", "head", "face", "global")
# Module groups a phase can mute: audio_attention -> audio_region "off"; pose_encoder -> no pose condition.
MUTABLE_GROUPS = ("audio_attention", "pose_encoder")


class EchoMimicV2Module(AnimationModule):
    """
    Args:
        network: builds the :class:`EchoMimicV2Network`; called with ``latent_channels``, ``latent_factor``,
            ``audio_dim`` and ``audio_tokens`` derived from the autoencoder and the audio encoder (a Hydra partial
            of ``EchoMimicV2Network.tiny`` or ``EchoMimicV2Network.from_pretrained_parts``).
        autoencoder: frozen image autoencoder (SD VAE or the lossless patch autoencoder).
        audio_encoder: frozen audio encoder (Whisper all-layer features, or wav2vec2).
        optimizer: partial optimizer, called with the trainable parameters.
        lr_scheduler: optional partial LR scheduler, called with the optimizer (stepped every step).
        noise_scheduler: the DDIM v-prediction / zero-terminal-SNR scheduler for training and sampling.
        audio_region: where audio cross-attention acts: off | lips | head | face | global (§3.2.2).
        condition_dropout: per-sample drop probabilities of ``ref``, ``audio`` and ``pose`` (independent), and
            ``uncond``: reference, audio and pose dropped together, which trains the unconditional branch that
            classifier-free guidance extrapolates from (the release's CFG drops all three).
        num_inference_steps / guidance_scale: sampling steps and CFG scale (§4.1: CFG 2.5; the release: 30 steps, or
            6 steps and CFG 1.0 with the accelerated weights); set by the ``model/sampler`` preset.
        sampler: :class:`~halfbody.echomimic_v2.pipeline.SamplerSettings` fields (context windows, step function,
            initial-noise clamp), ``model.sampler``.
        num_sample_batches: validation batches that are also sampled (the rest only give the loss).
        phd_loss: the Phase-specific Denoising Loss (§3.5, Eq. 2-5) added to the latent loss in training, or None.
            A phase's ``losses: {phd: <band schedule> | null}`` reconfigures or switches it off.
        init_checkpoint: start the network from this Lightning checkpoint's weights (the previous training stage;
            loaded with ``weights_only=True``), optimizer and step start fresh.
        hand_loss_weight: ``lambda_hand`` of the hand-region latent loss (not in the paper; 0: off;
            ``AnimationModule.hand_loss``); a phase's ``losses: {hand: lambda}`` overrides.
    """

    def __init__(
        self,
        network: Callable[..., nn.Module],
        autoencoder: Autoencoder,
        audio_encoder: AudioEncoder,
        optimizer: Callable[..., torch.optim.Optimizer],
        noise_scheduler: VPredictionDDIM,
        lr_scheduler: Callable[..., Any] | None = None,
        audio_region: str = "global",
        condition_dropout: dict[str, float] | None = None,
        num_inference_steps: int = 10,
        guidance_scale: float = 2.5,
        num_sample_batches: int = 1,
        phd_loss: PhDLoss | None = None,
        init_checkpoint: str | None = None,
        sampler: SamplerSettings | dict[str, Any] | None = None,
        hand_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(autoencoder, audio_encoder, optimizer, lr_scheduler, audio_region, condition_dropout,
                         num_sample_batches, hand_loss_weight)
        # plain values only: checkpoints must load with torch.load(weights_only=True)
        self.save_hyperparameters(logger=False, ignore=["network", "autoencoder", "audio_encoder", "noise_scheduler",
                                                        "optimizer", "lr_scheduler", "condition_dropout", "phd_loss",
                                                        "sampler"])
        if autoencoder.temporal_factor != 1:
            raise ValueError(f"model.autoencoder: EchoMimicV2 denoises frame by frame and needs an image autoencoder "
                             f"(temporal_factor 1), got temporal_factor={autoencoder.temporal_factor}")
        self.network = network(
            latent_channels=autoencoder.latent_channels,
            latent_factor=autoencoder.spatial_factor,
            audio_dim=audio_encoder.feature_dim,
            audio_tokens=audio_encoder.tokens_per_frame,
        )
        if init_checkpoint:
            self.load_network_weights(init_checkpoint)
        self.noise_scheduler = noise_scheduler
        self.sampler = SamplerSettings.from_config(sampler)
        self.phd_loss = phd_loss
        self._configured["phd"] = None if phd_loss is None else (dict(phd_loss.schedule), phd_loss.enabled)

    # ----------------------------------------------------------------------------------------------- parallelism
    def parallelize_network(self, settings, mesh) -> dict[str, int]:
        """``configure_model``'s family hook: :func:`halfbody.echomimic_v2.parallelize.parallelize_echomimic_v2`."""
        from halfbody.echomimic_v2.parallelize import parallelize_echomimic_v2

        return parallelize_echomimic_v2(self.network, settings, mesh)

    # ----------------------------------------------------------------------------------------------- phases
    AUDIO_REGIONS = AUDIO_REGIONS
    MUTABLE_GROUPS = MUTABLE_GROUPS
    AUDIO_GROUPS = ("audio_attention",)
    FAMILY, TITLE = "echomimic_v2", "EchoMimicV2"
    NETWORK_KEY_PREFIXES = ("network.denoising_unet.", "network.reference_net.")
    VIDEO_AUTOENCODER = False  # frames are denoised as images (temporal modules mix them in latent space)
    CONDITIONS = ("ref", "audio", "pose", "uncond")
    UNCOND_CONDITIONS = ("ref", "audio", "pose")  # the release's unconditional CFG branch has none of them
    # Loss keys a phase's ``losses`` mapping may carry: ``phd`` (a band schedule such as
    # ``{S1: [pose, 0.1], S2: [detail, 0.1], S3: [low, 0.1]}``, or null to switch the PhD loss off) and ``hand``
    # (lambda_hand, AnimationModule).
    PHASE_LOSS_KEYS: tuple[str, ...] = ("phd", "hand")

    def check_phase_losses(self, spec: PhaseSpec) -> None:
        super().check_phase_losses(spec)
        if spec.losses.get("phd"):
            if self.phd_loss is None:
                raise ValueError(f"phase {spec.name!r}: losses.phd is set but model.phd_loss is null")
            try:
                self.phd_loss.validate_schedule(spec.losses["phd"])
            except ValueError as e:
                raise ValueError(f"phase {spec.name!r}: losses.phd: {e}") from None

    def configure_phase_losses(self, losses) -> None:
        """``losses.phd``: missing -> the configured PhD settings; null -> off; a schedule -> on with it."""
        super().configure_phase_losses(losses)
        if self.phd_loss is None:
            return
        if "phd" not in losses:
            schedule, enabled = self._configured["phd"]
            self.phd_loss.configure(schedule=schedule, enabled=enabled)
        elif not losses["phd"]:
            self.phd_loss.configure(enabled=False)
        else:
            self.phd_loss.configure(schedule=losses["phd"], enabled=True)

    # ----------------------------------------------------------------------------------------------- helpers
    @torch.no_grad()
    def encode_conditions(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Frozen encoders: video/reference latents and audio features. Returns latents ``(B, F, C, h, w)``,
        ``ref_latents (B, C, h, w)`` and ``audio_feats (B, F, K, D)``."""
        return {
            "latents": self.autoencoder.encode(batch["video"]),
            "ref_latents": self.autoencoder.encode_image(batch["ref"]),
            "audio_feats": self.audio_features(batch),
        }

    def audio_mask_and_mode(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, str]:
        """Partial attention (§3.2.2): the region mask the audio cross-attention acts through."""
        region = self.audio_region
        if region in ("off", "global"):
            return None, region
        if f"mask_{region}" not in batch:
            raise ValueError(f"audio_region={region!r} needs the batch key 'mask_{region}' (B, F, 1, H, W)")
        return batch[f"mask_{region}"], "masked"

    def denoise(self, noisy_latents, timesteps, cond, batch, ref_keep=None, audio_keep=None, pose_keep=None):
        """One network evaluation, ``(B, F, C, h, w)`` -> predicted velocity of the same shape."""
        audio_mask, audio_mode = self.audio_mask_and_mode(batch)
        pose = None if "pose_encoder" in self.muted_groups else batch["pose"]
        out = self.network(
            noisy_latents, timesteps, cond["ref_latents"], cond["audio_feats"], pose,
            audio_mask=audio_mask, audio_mode=audio_mode, ref_keep=ref_keep, audio_keep=audio_keep, pose_keep=pose_keep,
            reference_bank=cond.get("reference_bank"),
        )
        return self.noise_scheduler.as_velocity(out, noisy_latents, timesteps)

    def loss_weights(self, batch: dict[str, Any], latent_shape: torch.Size) -> torch.Tensor:
        """Valid-pixel weights at latent resolution ``(B, F, 1, h, w)``: padding (HPA, letterbox) is excluded."""
        valid = batch["valid"]
        b, f = valid.shape[:2]
        w = F.adaptive_avg_pool2d(valid.flatten(0, 1), latent_shape[-2:]).view(b, f, 1, *latent_shape[-2:])
        return w

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                       training: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_latent (v-prediction, padding excluded) plus, in training, the PhD loss of each sample's timestep
        band (Eq. 5). Returns the loss and the components to log."""
        cond = self.encode_conditions(batch)
        x0 = cond["latents"]
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        # timesteps drawn on the host (uniform in [0, T), as sample_timesteps): the PhD loss picks the samples to
        # decode from them without reading the device back
        rng = self.host_rng(generator)
        t_host = [rng.randrange(self.noise_scheduler.num_train_timesteps) for _ in range(b)]
        t = torch.tensor(t_host, dtype=torch.long).to(x0.device, non_blocking=True)
        xt = self.noise_scheduler.add_noise(x0, noise, t)
        target = self.noise_scheduler.velocity_target(x0, noise, t)
        keeps = self.condition_keep_masks(b, generator) if training else {}
        pred = self.denoise(xt, t, cond, batch, **keeps)
        w = self.loss_weights(batch, x0.shape)
        err = (pred.float() - target.float()).pow(2).mean(dim=2, keepdim=True)  # mean over channels
        latent = (err * w).sum() / w.sum().clamp_min(1.0)
        logs = {"latent": latent.detach()}
        if self.hand_loss_weight > 0:
            hand = self.hand_loss(err, w, batch, lambda m: to_latent_resolution(m, self.autoencoder.spatial_factor))
            logs["hand"] = hand.detach()
            latent = latent + self.hand_loss_weight * hand
        if not (training and self.phd_loss is not None and self.phd_loss.enabled):
            return latent, logs
        phd = self.phd_loss(xt, pred, t, batch["video"], decode=self.autoencoder.decode,
                            scheduler=self.noise_scheduler, valid=batch["valid"], t_host=t_host)
        logs.update({k: v.detach() for k, v in phd.logs.items()})
        return latent + phd.loss.mean(), logs

    PIPELINE = EchoMimicV2Pipeline  # what halfbody.generate asks of the family (pose required, sampler variants)

    @property
    def pipeline(self) -> EchoMimicV2Pipeline:
        """The sampling pipeline over this module's network, scheduler, sampler settings and autoencoder."""
        return EchoMimicV2Pipeline(self.network, self.noise_scheduler, self.sampler, autoencoder=self.autoencoder)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 num_frames: int | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
        """Animate a reference with audio and pose through :class:`EchoMimicV2Pipeline` (sampling as released).

        Args:
            batch: the conditions only (a training batch works; its ``video`` is not used): ``ref`` ``(B, 3, H, W)``
                in ``[-1, 1]``; ``pose`` ``(B, >= F, C, H, W)`` (unless the pose encoder is muted); the audio as
                ``audio_feats`` ``(B, >= F, K, D)``, or a 16 kHz waveform ``audio`` ``(B, S)`` (or ``audio_context`` with
                ``audio_context_offset`` / ``_length``) with ``fps``; ``mask_<region>`` when the audio region is a
                partial one; with ``valid`` and ``pad_value``, padding is painted (:meth:`paint_padding`).
            num_frames: frames to generate, any number (default: the pose sequence's length).
            latents: optional initial noise ``(B, F, C, h, w)``.

        Returns ``(B, F, 3, H, W)`` in ``[-1, 1]``.
        """
        steps = num_inference_steps or self.hparams.num_inference_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        pose = None if "pose_encoder" in self.muted_groups else batch.get("pose")
        if num_frames is None:
            source = pose if pose is not None else batch.get("audio_feats")
            if source is None:
                raise ValueError("generate: give num_frames (no pose or audio_feats in the batch to count frames)")
            num_frames = source.shape[1]
        num_frames = int(num_frames)
        if pose is None and "pose_encoder" not in self.muted_groups:
            raise ValueError("generate: the batch has no 'pose' (B, F, C, H, W) and the pose encoder is not muted")
        audio_mask, audio_mode = self.audio_mask_and_mode(batch)
        ref = batch["ref"]
        feats = None
        if audio_mode != "off":
            feats = self.audio_features({"video": ref[:, None], **batch}, num_frames=num_frames).to(ref.dtype)
        ref_latents = self.autoencoder.encode_image(ref)
        latents = self.pipeline.sample_latents(
            ref_latents, feats, pose, num_frames, num_inference_steps=steps, guidance_scale=scale,
            audio_mask=audio_mask, audio_mode=audio_mode, generator=generator, latents=latents)
        return self.paint_padding(self.autoencoder.decode(latents).clamp(-1, 1), batch)

    @torch.no_grad()
    def generate_video(self, conditions: dict[str, Any], num_frames: int, **kwargs: Any) -> torch.Tensor:
        """``halfbody.generate``'s family-agnostic call: :meth:`generate` on ``conditions`` (``ref``, 16 kHz ``audio``,
        ``fps``, ``pose``, region masks) for ``num_frames`` frames (context windows: any length)."""
        return self.generate(conditions, num_frames=num_frames, **kwargs)
