"""What every halfbody model family shares as a LightningModule (docs/ARCHITECTURE.md).

:class:`AnimationModule` owns the frozen autoencoder and audio encoder, the optimizer (one parameter group per
module group, so a phase that unfreezes a group needs no new optimizer), step randomness as a function of
(seed, step, rank) for exact resumption, the training / validation steps, validation samples for
``SampleVideoWriter``, the phase bookkeeping (trainable and muted groups, the audio region, phase losses, pose dropout),
and ``init_checkpoint`` (start from an earlier stage's weights).

A family implements ``diffusion_loss(batch, generator, training) -> (loss, logs)``, ``generate(batch, generator=...)
-> (B, F, 3, H, W)``, builds ``self.network`` (with ``module_groups()``), and sets the class attributes
``AUDIO_REGIONS``, ``MUTABLE_GROUPS``, ``AUDIO_GROUPS``, ``CONDITIONS`` and ``PHASE_LOSS_KEYS``.
"""

from __future__ import annotations

import abc
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import torch
from torch import nn

from halfbody.models.audio_encoders import AudioEncoder
from halfbody.models.autoencoders import Autoencoder
from halfbody.phases.spec import PhaseSpec, check_group_names, set_trainable_groups


class AnimationModule(L.LightningModule, metaclass=abc.ABCMeta):
    """Base LightningModule of an audio-driven animation family.

    Args:
        autoencoder: frozen video/image autoencoder.
        audio_encoder: frozen audio encoder.
        optimizer: partial optimizer, called with the parameter groups.
        lr_scheduler: optional partial LR scheduler (stepped every step).
        audio_region: where audio acts (one of ``AUDIO_REGIONS``).
        condition_dropout: per-sample drop probabilities, keys from ``CONDITIONS``.
        num_sample_batches: validation batches that are also sampled.
        hand_loss_weight: ``lambda_hand`` of the hand-region loss (:meth:`hand_loss`), added to the family's loss;
            0 (the default, as in both papers) switches it off. A phase's ``losses: {hand: lambda}`` overrides.
        init_checkpoint: start the network from this Lightning checkpoint (``weights_only=True``).
    """

    AUDIO_REGIONS: tuple[str, ...] = ("off", "global")
    MUTABLE_GROUPS: tuple[str, ...] = ()
    AUDIO_GROUPS: tuple[str, ...] = ()  # muting all of these means audio_region "off"
    FAMILY: str = ""  # the family's name (family=...), named in errors
    TITLE: str = ""  # the family as the papers name it, for messages
    NETWORK_KEY_PREFIXES: tuple[str, ...] = ()  # state-dict prefixes that identify the family's checkpoints
    VIDEO_AUTOENCODER: bool = False  # True: a causal video autoencoder (temporal factor > 1); False: an image one
    CONDITIONS: tuple[str, ...] = ("ref", "audio", "pose")
    UNCOND_CONDITIONS: tuple[str, ...] = ("ref", "audio")  # what an ``uncond`` dropout drops together
    PHASE_LOSS_KEYS: tuple[str, ...] = ("hand",)  # a family adds its own

    network: nn.Module

    def __init__(self, autoencoder: Autoencoder, audio_encoder: AudioEncoder,
                 optimizer: Callable[..., torch.optim.Optimizer], lr_scheduler: Callable[..., Any] | None = None,
                 audio_region: str = "global", condition_dropout: Mapping[str, float] | None = None,
                 num_sample_batches: int = 1, hand_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.autoencoder = autoencoder.requires_grad_(False)  # frozen; stays in eval mode (its train() override)
        self.audio_encoder = audio_encoder.requires_grad_(False)
        self.num_sample_batches = int(num_sample_batches)
        self.condition_dropout = {k: 0.0 for k in self.CONDITIONS}
        for k, v in (condition_dropout or {}).items():
            if k not in self.CONDITIONS:
                raise ValueError(f"model.condition_dropout has unknown key {k!r}; known: {list(self.CONDITIONS)}")
            self.condition_dropout[str(k)] = float(v)
        self.audio_region = audio_region
        self.validation_samples: list[dict[str, Any]] = []
        # phase state; a phase field left unset (None) falls back to these configured values
        self._configured: dict[str, Any] = {"audio_region": audio_region,
                                            "pose_dropout": self.condition_dropout.get("pose", 0.0)}
        self.muted_groups: frozenset[str] = frozenset()
        self.phase_losses: dict[str, Any] = {}
        if isinstance(hand_loss_weight, bool) or not float(hand_loss_weight) >= 0:
            raise ValueError(f"model.hand_loss_weight={hand_loss_weight!r} must be a number >= 0")
        self.hand_loss_weight = self._configured["hand"] = float(hand_loss_weight)

    # ----------------------------------------------------------------------------------------------- family API
    @abc.abstractmethod
    def diffusion_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                       training: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training objective on a batch; returns the loss and its components (detached) for logging."""

    @abc.abstractmethod
    def generate(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample clips for a batch: ``(B, F, 3, H, W)`` in ``[-1, 1]``."""

    def configure_phase_losses(self, losses: Mapping[str, Any]) -> None:
        """Apply a phase's ``losses`` mapping (validated by :meth:`check_phase_losses`). ``hand``: missing ->
        ``model.hand_loss_weight``; null -> 0; a number -> that ``lambda_hand``. A family extends this for its keys."""
        self.hand_loss_weight = float(losses.get("hand") or 0.0) if "hand" in losses else self._configured["hand"]

    def check_phase_losses(self, spec: PhaseSpec) -> None:
        bad = sorted(set(spec.losses) - set(self.PHASE_LOSS_KEYS))
        if bad:
            raise ValueError(f"phase {spec.name!r}: losses key(s) {bad} are not supported by {type(self).__name__} "
                             f"(supported: {list(self.PHASE_LOSS_KEYS)})")
        lam = spec.losses.get("hand")
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
            raise ValueError(f"phase {spec.name!r}: losses.hand={lam!r} must be a number >= 0 (lambda_hand)")

    def hand_loss(self, err: torch.Tensor, weight: torch.Tensor, batch: dict[str, Any],
                  to_latent: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The hand-region loss: the mean of the per-cell error ``err`` over the latent cells the hands cover (not
        in either paper; shaped as MirrorMe's face loss, Eq. 8). The gloves / hands are a few percent of a half-body
        frame, so the frame-mean loss hardly sees them; ``lambda_hand`` weighs their mean error as a term of its own.

        Args:
            err: per-cell squared error, any shape the family's loss uses.
            weight: the family's per-cell loss weight (valid pixels; 0 on cells the loss leaves out), as ``err``.
            batch: the training batch; its ``mask_hands`` ``(B, F, 1, H, W)`` (pixel union of the hand boxes).
            to_latent: the family's pixel-mask -> latent-cell map (any hand pixel marks the cell), shaped as ``err``.
        """
        if "mask_hands" not in batch:
            raise KeyError(f"model.hand_loss_weight={self.hand_loss_weight} needs the batch's 'mask_hands' "
                           "(B, F, 1, H, W) (rendered by the datamodule from the hand keypoints)")
        hands = to_latent(batch["mask_hands"]).to(err.dtype) * weight
        return (err * hands).sum() / hands.sum().clamp_min(1.0)

    # ----------------------------------------------------------------------------------------------- phases
    @property
    def audio_region(self) -> str:
        return self._audio_region

    @audio_region.setter
    def audio_region(self, region: str) -> None:
        if region not in self.AUDIO_REGIONS:
            raise ValueError(f"audio_region must be one of {self.AUDIO_REGIONS}, got {region!r}")
        self._audio_region = region

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return self.network.module_groups()

    def _audio_muted(self, muted: frozenset[str] | tuple[str, ...]) -> bool:
        return bool(self.AUDIO_GROUPS) and any(g in muted for g in self.AUDIO_GROUPS)

    def check_phase(self, spec: PhaseSpec) -> None:
        """Raise, naming the phase and the bad value, when ``spec`` does not fit this module."""
        check_group_names(spec, self.module_groups(), self.MUTABLE_GROUPS, type(self).__name__)
        if spec.audio_region is not None and spec.audio_region not in self.AUDIO_REGIONS:
            raise ValueError(f"phase {spec.name!r}: audio_region={spec.audio_region!r} is not one of "
                             f"{self.AUDIO_REGIONS}")
        if self._audio_muted(spec.muted) and spec.audio_region not in (None, "off"):
            muted = ", ".join(g for g in self.AUDIO_GROUPS if g in spec.muted)
            raise ValueError(f"phase {spec.name!r}: audio_region={spec.audio_region!r} contradicts muted {muted} "
                             "(muted audio means audio_region 'off')")
        self.check_phase_losses(spec)

    def apply_phase(self, spec: PhaseSpec, step_in_phase: int = 0) -> None:
        """Train as ``spec`` says: freeze every group outside ``spec.trainable`` (requires_grad False, grad None),
        mute ``spec.muted``, set the audio region, the phase losses and the scheduled values."""
        self.check_phase(spec)
        set_trainable_groups(self.module_groups(), spec.trainable)
        self.muted_groups = frozenset(spec.muted)
        if self._audio_muted(self.muted_groups):
            self.audio_region = "off"
        else:
            self.audio_region = spec.audio_region if spec.audio_region is not None else self._configured["audio_region"]
        self.phase_losses = dict(spec.losses)
        self.configure_phase_losses(self.phase_losses)
        self.set_phase_step(spec, step_in_phase)

    def set_phase_step(self, spec: PhaseSpec, step_in_phase: int) -> dict[str, float]:
        """Update the values ``spec`` schedules within its phase; returns them (for logging)."""
        p = spec.pose_dropout_at(step_in_phase)
        self.condition_dropout["pose"] = float(self._configured["pose_dropout"] if p is None else p)
        return {"pose_dropout": self.condition_dropout["pose"]}

    # ----------------------------------------------------------------------------------------------- parallelism
    parallelism: Any = None  # cfg.parallelize (halfbody.models.parallel.Parallelism), set by the training entry point

    def parallelize_network(self, settings: Any, mesh: Any) -> dict[str, int]:
        """The family hook of :meth:`configure_model`: apply ``settings`` (activation checkpointing, compile, and FSDP2
        when ``mesh`` is given) to ``self.network`` through the family's parallelize function."""
        from halfbody.utils.errors import UserError

        raise UserError(f"parallelize.* / trainer=fsdp: {type(self).__name__} has no parallelize function (activation "
                        "checkpointing, compile and FSDP2 are not available for this family)")

    def configure_model(self) -> None:
        """Apply the run's parallelism to the network, once (docs/ARCHITECTURE.md "Parallelism").

        Lightning calls this under every strategy before it wraps (DDP) or after it set up the device mesh
        (``ModelParallelStrategy``, ``trainer=fsdp``): activation checkpointing and compile apply everywhere, FSDP2
        ``fully_shard`` only with the mesh. The frozen autoencoder and audio encoder are never sharded.
        """
        if getattr(self, "_parallelized", False):
            return
        from halfbody.models.parallel import Parallelism, is_sharded

        settings = Parallelism.from_config(self.parallelism)
        mesh = self.device_mesh
        if mesh is not None:
            names = mesh.mesh_dim_names or ()
            if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
                raise ValueError(f"the device mesh has tensor_parallel size {mesh['tensor_parallel'].size()}: only "
                                 "data-parallel sharding (FSDP2) is supported; use trainer=fsdp")
            mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        if mesh is not None or settings.activation_checkpointing or settings.compile:
            self.parallelize_network(settings, mesh)
            if mesh is not None and not is_sharded(self.network):
                raise RuntimeError(f"{type(self).__name__}.parallelize_network did not shard the network")
        self._parallelized = True

    # ----------------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        # a precomputed feature field must come from this model's audio encoder (shared/DESIGN.md §1: stale caches)
        field = getattr(getattr(self.trainer, "datamodule", None), "audio_feats_field", None)
        if field and self.audio_encoder.identity.lower() not in field.lower():  # webdataset lower-cases field names
            raise ValueError(f"data.audio_feats_field={field!r} was not computed by this model's audio encoder: "
                             f"its name must contain {self.audio_encoder.identity!r}")
        # an autoencoder fitted on the training data on first use (CompactAutoencoder) fits now: the datamodule has
        # prepared its data (e.g. generated the synthetic world), the network only needed the latent shape
        prepare = getattr(self.autoencoder, "prepare", None)
        if callable(prepare):
            prepare()

    def configure_callbacks(self):
        """Callbacks every family needs whatever the callbacks config holds: the ``data/*`` bad-sample counters
        (a configured ``BadSampleMonitor`` is kept; Lightning replaces same-type callbacks with these)."""
        from halfbody.callbacks.bad_samples import BadSampleMonitor

        trainer = getattr(self, "_trainer", None)
        configured = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, BadSampleMonitor)]
        return configured[:1] or [BadSampleMonitor()]

    def on_fit_start(self) -> None:
        self._base_seed = torch.initial_seed()  # what seed_everything set: the same in a run and its resumption

    def host_rng(self, generator: torch.Generator | None) -> random.Random:
        """The step's host-side randomness (Python ``random``), seeded from ``generator``'s seed, which the host holds:
        decisions that set shapes or branches (condition dropout, motion frames, timestep bands) are drawn here, so
        the step never reads a device tensor back (no host synchronisation). One stream per generator (a step's
        draws are independent of each other); ``None``: from Python's global RNG (seeded by ``seed_everything``)."""
        if generator is None:
            return random.Random(random.getrandbits(63))
        cached = getattr(self, "_host_rng", None)
        if cached is None or cached[0] is not generator:
            cached = (generator, random.Random(generator.initial_seed() * 2 + 1))
            self._host_rng = cached
        return cached[1]

    def step_generator(self) -> torch.Generator:
        """The training step's randomness as a function of (seed, global step, rank): ranks draw differently, and a
        resumed run draws exactly what the uninterrupted run drew."""
        seed = (getattr(self, "_base_seed", 0) * 1_000_003 + self.global_step * 8191 + self.global_rank) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    # ----------------------------------------------------------------------------------------------- helpers
    # Batch values the training step needs on the host, read while the batch is still in host memory (no
    # read-back from the device per step): batch["host"] = {"fps": float, "audio_context_offset": [int],
    # "audio_context_length": [int]}.
    HOST_KEYS = ("audio_context_offset", "audio_context_length")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "host" not in batch and torch.is_tensor(batch.get("fps")):
            fps = batch["fps"].detach().cpu()  # before the transfer: host memory, no synchronisation
            host: dict[str, Any] = {"fps": float(fps.reshape(-1)[0]) if fps.numel() else None}
            for k in self.HOST_KEYS:
                if torch.is_tensor(batch.get(k)):
                    host[k] = [int(v) for v in batch[k].detach().cpu().tolist()]
            batch["host"] = host
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @staticmethod
    def batch_fps(batch: dict[str, Any]) -> float:
        host = batch.get("host")
        if isinstance(host, dict) and host.get("fps") is not None:
            return host["fps"]
        fps = batch["fps"]
        return float(fps[0]) if torch.is_tensor(fps) and fps.ndim else float(fps)

    @staticmethod
    def host_values(batch: dict[str, Any], key: str) -> list | None:
        """``batch[key]`` as a list of host numbers: as :meth:`transfer_batch_to_device` read them (no device
        read-back), else read from the tensor (outside training, e.g. ``generate``)."""
        host = batch.get("host")
        if isinstance(host, dict) and key in host:
            return host[key]
        value = batch.get(key)
        return None if value is None else value.tolist() if torch.is_tensor(value) else list(value)

    @staticmethod
    def paint_padding(video: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        """``video`` ``(B, F, 3, H, W)`` with the batch's padding (``valid`` 0: HPA, letterbox) set to ``pad_value``.

        The loss leaves padding out (``valid``), so what a network draws there is arbitrary; a clip generated for a
        batch has that batch's frame geometry, padding included. A batch without ``valid`` or ``pad_value`` leaves
        ``video`` as it is; a video longer or shorter than the batch's frames takes the first frame's padding.
        """
        valid, fill = batch.get("valid"), batch.get("pad_value")
        if valid is None or fill is None:
            return video
        if valid.shape[0] != video.shape[0] or valid.shape[-2:] != video.shape[-2:]:
            raise ValueError(f"batch['valid'] {tuple(valid.shape)} does not match the generated video "
                             f"{tuple(video.shape)} (B, F, 3, H, W)")
        if valid.shape[1] != video.shape[1]:
            valid = valid[:, :1]
        fill = torch.as_tensor(fill, dtype=video.dtype, device=video.device).reshape(-1, 1, 1, 1, 1)
        return torch.where(valid.to(video.device) > 0.5, video, fill)

    @torch.no_grad()
    def audio_features(self, batch: dict[str, Any], num_frames: int | None = None) -> torch.Tensor:
        """``(B, F, K, D)`` per-frame audio features: the batch's precomputed ones, else the frozen audio encoder run on
        the batch's audio context (``data.audio_context``) when it has one, on the window's audio otherwise."""
        feats = batch.get("audio_feats")
        if feats is None:
            num_frames = num_frames or batch["video"].shape[1]
            if "audio_context" in batch:
                feats = self.audio_encoder(batch["audio_context"], num_frames=num_frames, fps=self.batch_fps(batch),
                                           offsets=self.host_values(batch, "audio_context_offset"),
                                           lengths=self.host_values(batch, "audio_context_length"))
            else:
                feats = self.audio_encoder(batch["audio"], num_frames=num_frames, fps=self.batch_fps(batch))
        return feats.to(batch["video"].dtype)

    def condition_keep_masks(self, batch_size: int, generator: torch.Generator | None = None
                             ) -> dict[str, torch.Tensor | None]:
        """Independent per-sample condition dropout for CFG training (``{name}_keep`` bool ``(B,)``, or None when
        nothing is dropped). An ``uncond`` probability, when the family has one, drops ``UNCOND_CONDITIONS`` together.
        Drawn on the host (:meth:`host_rng`): whether anything is dropped is known without a device read-back."""
        p = self.condition_dropout
        rng = self.host_rng(generator)
        uncond = [rng.random() < p["uncond"] for _ in range(batch_size)] if "uncond" in p else None
        keeps = {}
        for name in ("ref", "audio", "pose"):
            drop = [rng.random() < p.get(name, 0.0) for _ in range(batch_size)]
            if uncond is not None and name in self.UNCOND_CONDITIONS:
                drop = [d or u for d, u in zip(drop, uncond)]
            keep = torch.tensor([not d for d in drop], dtype=torch.bool).to(self.device, non_blocking=True)
            keeps[f"{name}_keep"] = keep if any(drop) else None  # None: no mask (faster kernels)
        return keeps

    # ----------------------------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, parts = self.diffusion_loss(batch, generator=self.step_generator())
        b = batch["video"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, batch_size=b)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], batch_size=b)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(1234 + batch_idx)
        loss, _ = self.diffusion_loss(batch, generator=g, training=False)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["video"].shape[0])
        if batch_idx < self.num_sample_batches:
            generated = self.generate(batch, generator=torch.Generator(device=self.device).manual_seed(batch_idx))
            self.validation_samples.append({
                "generated": generated, "video": batch["video"], "ref": batch["ref"], "audio": batch["audio"],
                "kpts": batch["kpts"], "fps": batch["fps"], "key": batch["key"],
            })

    def on_validation_epoch_start(self) -> None:
        self.validation_samples = []

    def load_network_weights(self, path: str) -> None:
        """Initialise the network from a Lightning checkpoint of an earlier stage (``model.init_checkpoint``)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"model.init_checkpoint={str(p)!r} does not exist: expected a Lightning .ckpt of "
                                    "an earlier stage (e.g. <run>/checkpoints/last.ckpt)")
        state = torch.load(p, map_location="cpu", weights_only=True)["state_dict"]
        prefix = "network."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise ValueError(f"model.init_checkpoint={str(p)!r} holds no {type(self).__name__} network weights")
        self.network.load_state_dict(weights, strict=True)

    # ----------------------------------------------------------------------------------------------- optim
    def configure_optimizers(self):
        """One parameter group per module group, holding every network parameter: a phase that unfreezes a group
        later trains it without rebuilding the optimizer (parameters without gradients are skipped by the step)."""
        groups = [{"params": [p for m in mods for p in m.parameters()], "name": name}
                  for name, mods in self.module_groups().items()]
        optimizer = self.optimizer_factory(params=[g for g in groups if g["params"]])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
