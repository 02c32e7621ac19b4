"""Audio2PoseModule: the audio-to-hand-pose family (issue 14, docs/AUDIO2POSE.md) as a LightningModule.

It trains on the same datamodule and shards as the video families and uses the same frozen audio encoder and
audio context (``AnimationModule.audio_features``), but generates keypoints, not pixels: the arm and hand points
(``keypoint_sequence.POSE_POINTS``) of every frame of the window, as offsets from the reference pose, with rectified
flow (``halfbody.models.flow_matching``; MirrorMe §3.1's objective on a keypoint sequence).

Training step: the window's first frame is the reference pose (the shard schema has no keypoints for ``ref.png``),
its first ``m`` frames (``m`` uniform in ``1..prefix_frames``) are the clean motion prefix and the loss is the
flow's velocity error on the other frames, over the points visible in both the frame and the reference, plus MDM's
velocity (frame-difference) term on the one-step data estimate. Audio is dropped
for CFG with ``condition_dropout.audio``. Validation: the loss, and sequences sampled by the pipeline from the
reference pose alone (frame 0), scored by the gesture metrics (``halfbody.metrics.gestures``, logged as
``val/gesture/*``) and drawn as pose maps for ``SampleVideoWriter`` (reference | sampled pose | ground truth).

``mean_reference`` (a buffer, saved in the checkpoint): the mean reference pose of the training windows, the
documented fallback of ``generate pose=auto`` when the reference image's keypoints are not known.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from halfbody.audio2pose import keypoint_sequence as ks
from halfbody.audio2pose.pipeline import Audio2PosePipeline
from halfbody.data.conditions import PoseRenderer
from halfbody.metrics.gestures import GESTURE_METRICS, gesture_metrics
from halfbody.models.audio_encoders import AudioEncoder
from halfbody.models.autoencoders import Autoencoder
from halfbody.models.flow_matching import RectifiedFlow
from halfbody.models.lightning_base import AnimationModule


class Audio2PoseModule(AnimationModule):
    """
    Args:
        network: builds the :class:`~halfbody.audio2pose.motion_transformer.MotionTransformer`; called with
            ``audio_feature_dim`` (``K * D`` of the audio encoder).
        autoencoder: the base's frozen autoencoder; this family does not encode pixels (the lossless patch one).
        audio_encoder: the frozen audio encoder (the video families' encoders).
        optimizer / lr_scheduler: partial optimizer and optional scheduler.
        flow: rectified-flow maths and Euler/CFG sampler.
        motion_scale: frame-width units per motion unit.
        window: frames per sampling window (the training clip length, ``data.num_frames``).
        prefix_frames: at most this many clean motion-prefix frames (training draws ``1..prefix_frames``; sampling
            carries this many from one window to the next).
        condition_dropout: ``{audio: p}``, the CFG dropout.
        velocity_loss_weight: weight of the motion-velocity term on the one-step data estimate
            ``x0_hat = x_t - t v`` (MDM, Tevet et al. 2023 §3.1, ``lambda_vel = 1``): frame-to-frame differences of
            ``x0_hat`` against the data's; without it the samples jitter (0: off).
        num_inference_steps / guidance_scale: Euler steps and audio CFG of validation and ``pose=auto``.
        pose_groups: keypoint groups of the validation pose-map videos.
        num_sample_batches: validation batches that are also sampled.
        init_checkpoint: start the network from an earlier run's Lightning checkpoint.
    """

    AUDIO_REGIONS = ("off", "global")
    MUTABLE_GROUPS = ()
    AUDIO_GROUPS = ()
    FAMILY, TITLE = "audio2pose", "audio-to-hand-pose"
    NETWORK_KEY_PREFIXES = ("network.motion_in.", "network.blocks.")
    VIDEO_AUTOENCODER = False
    CONDITIONS = ("audio",)
    UNCOND_CONDITIONS = ("audio",)
    PHASE_LOSS_KEYS = ()

    def __init__(self, network: Callable[..., nn.Module], autoencoder: Autoencoder, audio_encoder: AudioEncoder,
                 optimizer: Callable[..., torch.optim.Optimizer], flow: RectifiedFlow,
                 lr_scheduler: Callable[..., Any] | None = None, audio_region: str = "global",
                 condition_dropout: Mapping[str, float] | None = None, motion_scale: float = 0.1, window: int = 64,
                 prefix_frames: int = 8, velocity_loss_weight: float = 1.0, num_inference_steps: int = 20,
                 guidance_scale: float = 2.0,
                 pose_groups: str = "no_head", num_sample_batches: int = 1, init_checkpoint: str | None = None) -> None:
        super().__init__(autoencoder, audio_encoder, optimizer, lr_scheduler, audio_region, condition_dropout,
                         num_sample_batches)
        self.save_hyperparameters(logger=False, ignore=["network", "autoencoder", "audio_encoder", "flow", "optimizer",
                                                        "lr_scheduler", "condition_dropout"])
        if not motion_scale > 0:
            raise ValueError(f"model.motion_scale={motion_scale!r} must be > 0")
        if not 1 <= int(prefix_frames) < int(window):
            raise ValueError(f"model.prefix_frames={prefix_frames!r} must be in [1, model.window={window!r})")
        self.network = network(audio_feature_dim=audio_encoder.feature_dim * audio_encoder.tokens_per_frame)
        if init_checkpoint:
            self.load_network_weights(init_checkpoint)
        self.flow = flow
        self.motion_scale, self.prefix_frames = float(motion_scale), int(prefix_frames)
        if not velocity_loss_weight >= 0:
            raise ValueError(f"model.velocity_loss_weight={velocity_loss_weight!r} must be >= 0")
        self.velocity_loss_weight = float(velocity_loss_weight)
        self.pipeline = Audio2PosePipeline(self.network, flow, motion_scale, int(window), int(prefix_frames),
                                           num_inference_steps, guidance_scale)
        self.renderer = PoseRenderer(pose_groups)
        self.register_buffer("mean_reference", torch.zeros(133, 3))
        self.register_buffer("mean_reference_count", torch.zeros((), dtype=torch.float64))
        self._gesture_batches: list[dict[str, torch.Tensor]] = []

    # ----------------------------------------------------------------------------------------------- loss
    @torch.no_grad()
    def _track_reference(self, ref: torch.Tensor) -> None:
        """Running mean of the training reference poses (points averaged where visible)."""
        vis = (ref[..., 2] >= ks.SCORE_THRESHOLD).to(ref.dtype)[..., None]
        n_new = vis.sum(0)
        if not bool(n_new.any()):
            return
        total = float(self.mean_reference_count) + ref.shape[0]
        mean_new = (ref * vis).sum(0) / n_new.clamp_min(1.0)
        w = (n_new / (n_new + float(self.mean_reference_count))).clamp(0.0, 1.0).to(self.mean_reference.dtype)
        self.mean_reference.copy_(torch.where(n_new > 0, self.mean_reference + w * (mean_new - self.mean_reference),
                                              self.mean_reference))
        self.mean_reference_count.fill_(total)

    def _prefix_length(self, generator: torch.Generator | None) -> int:
        u = torch.rand(1, generator=generator, device=generator.device if generator is not None else "cpu")
        return 1 + min(int(float(u) * self.prefix_frames), self.prefix_frames - 1)

    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                       training: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kpts = batch["kpts"].float()
        ref = kpts[:, 0]
        if training:
            self._track_reference(ref)
        x0 = ks.encode(kpts, ref, self.motion_scale)
        weight = ks.visibility(kpts, ref)
        b, n, _ = x0.shape
        m = min(self._prefix_length(generator), n - 1) if training else min(self.prefix_frames, n - 1)
        feats = None if self.audio_region == "off" else self.audio_features(batch, n).float()
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        t = self.flow.sample_timesteps(b, generator=generator, device=x0.device)
        xt = torch.cat([x0[:, :m], self.flow.add_noise(x0, noise, t)[:, m:]], dim=1)
        prefix = torch.zeros(b, n, dtype=torch.bool, device=x0.device)
        prefix[:, :m] = True
        keeps = self.condition_keep_masks(b, generator) if training else {}
        pred = self.network(xt, t, feats, ks.reference_features(ref), prefix, audio_keep=keeps.get("audio_keep"))
        target = self.flow.velocity_target(x0, noise, t)
        weight = weight * (~prefix)[..., None].to(weight.dtype)
        mse = ((pred.float() - target.float()).pow(2) * weight).sum() / weight.sum().clamp_min(1.0)
        logs = {"mse": mse.detach(), "prefix_frames": torch.tensor(float(m))}
        loss = mse
        if self.velocity_loss_weight > 0:  # MDM's velocity loss on the one-step estimate (prefix -> first target too)
            x0_hat = torch.cat([x0[:, :m], self.flow.predict_x0(xt, pred, t)[:, m:].float()], dim=1)
            vw = weight[:, 1:] * ks.visibility(kpts, ref)[:, :-1]  # pairs ending in a target frame, both visible
            vel = ((x0_hat.diff(dim=1) - x0.float().diff(dim=1)).pow(2) * vw).sum() / vw.sum().clamp_min(1.0)
            logs["velocity"] = vel.detach()
            loss = loss + self.velocity_loss_weight * vel
        return loss, logs

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_keypoints(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                         num_inference_steps: int | None = None, guidance_scale: float | None = None) -> torch.Tensor:
        """``(B, F, 133, 3)`` keypoints for the batch's audio, starting from each window's first frame's pose."""
        kpts = batch["kpts"].float()
        n = kpts.shape[1]
        feats = None if self.audio_region == "off" else self.audio_features(batch, n).float()
        return self.pipeline(feats, kpts[:, 0], n, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, generator=generator)

    def render(self, kpts: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Pose maps ``(B, F, 3, H, W)`` in ``[-1, 1]`` of normalised keypoints ``(B, F, 133, 3)``."""
        k = kpts.detach().float().cpu().numpy().copy()
        k[..., 0] *= width
        k[..., 1] *= height
        maps = torch.stack([self.renderer.render(c, height, width) for c in k])
        return (maps * 2 - 1).to(self.device)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The sampled sequences drawn as pose maps: ``(B, F, 3, H, W)`` in ``[-1, 1]``."""
        h, w = batch["video"].shape[-2:]
        return self.render(self.sample_keypoints(batch, generator), h, w)

    # ----------------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._gesture_batches = []
        for cb in getattr(self.trainer, "callbacks", []):  # the pixel oracle metrics do not apply to pose maps
            if hasattr(cb, "oracle_metrics") and hasattr(cb, "last_paths"):
                cb.oracle_metrics = False

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        loss, _ = self.diffusion_loss(batch, generator=g, training=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["video"].shape[0])
        if batch_idx >= self.num_sample_batches:
            return
        first = self.sample_keypoints(batch, generator=torch.Generator(device=self.device).manual_seed(batch_idx))
        second = self.sample_keypoints(batch,
                                       generator=torch.Generator(device=self.device).manual_seed(10_000 + batch_idx))
        self._gesture_batches.append({"generated": first.cpu(), "second": second.cpu(), "target": batch["kpts"].cpu(),
                                      "audio": batch["audio"].cpu(), "fps": torch.tensor(self.batch_fps(batch))})
        h, w = batch["video"].shape[-2:]
        self.validation_samples.append({
            "generated": self.render(first, h, w), "video": batch["video"], "ref": batch["ref"],
            "audio": batch["audio"], "kpts": batch["kpts"], "fps": batch["fps"], "key": batch["key"],
        })

    def on_validation_epoch_end(self) -> None:
        if not self._gesture_batches:
            return
        cat = {k: torch.cat([b[k] for b in self._gesture_batches]) for k in ("generated", "second", "target", "audio")}
        m = gesture_metrics(cat["generated"], cat["target"], cat["audio"], float(self._gesture_batches[0]["fps"]),
                            second_sample=cat["second"])
        self.last_gesture_metrics = m
        for name in GESTURE_METRICS:
            if np.isfinite(m[name]):
                self.log(f"val/gesture/{name}", float(m[name]), sync_dist=True)
        self._gesture_batches = []
