"""HalfBodyDataModule: the one webdataset datamodule both families train on.

Training: resampled shards with explicit per-(rank, worker, epoch) seeding and a fixed number of batches per
epoch, so Lightning epochs end and DDP/FSDP ranks and dataloader workers see different data. Validation:
shards in order, split over ranks and workers, deterministic windows, at most ``val_samples`` samples.

The condition settings (pose groups, pose dropout, mask margins, headshot handling) are a ``ConditionSpec``
that a phase callback swaps with ``set_condition_spec`` (shared/DESIGN.md §2: phases are data). The spec is
read when each sample is built. In-process loading (``num_workers=0``) sees a change at the next sample;
worker processes get a copy of the dataset when the dataloader starts iterating, so with workers a change
takes effect at the next epoch, and with ``persistent_workers=True`` only when the dataloaders are rebuilt
(``Trainer(reload_dataloaders_every_n_epochs=1)``).

``apply_phase(spec)`` maps a phase's data-side fields (``pose_groups``, ``data.kinds`` / ``headshot`` /
``mask_margins``, ``num_frames``) onto the configured condition spec and clip length; unset fields keep the
configured values. Pose dropout is not data-side in a phase: the model draws it per sample.

Bad samples are skipped in the workers; the main process aggregates their ``(key, reason)`` records from each
batch's ``bad_samples`` list in ``on_before_batch_transfer`` (``bad_sample_summary()``).

Precomputed audio features: ``audio_feats_field`` names a shard field ``(num_frames_source, K, D)`` aligned to
the source video frames, e.g. ``whisper-tiny.feats.npy``. The name must carry the encoder's identity (model
name, and a version when it can change), so that a stale cache is never mistaken for a fresh one (DESIGN §1).
"""

from __future__ import annotations

import gc
import glob
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import braceexpand
import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from halfbody.data.conditions import ConditionSpec
from halfbody.data.dataset import (
    DEFAULT_TARGET_HEAD_BOX,
    BadSampleLedger,
    ClipConfig,
    SampleBuilder,
    TrainShardDataset,
    ValShardDataset,
    collate_samples,
)
from halfbody.data.transforms import parse_resolution
from halfbody.utils.containers import to_plain
from halfbody.utils.errors import UserError

log = logging.getLogger(__name__)

# The training dataset's __len__ is exact: every (rank, worker) yields its own whole-batch share of the epoch.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined", category=UserWarning)


class ShardPathError(UserError, FileNotFoundError):
    """A shard path, pattern or directory (``data.train_shards`` / ``data.val_shards``) that gives no shards."""


def _int_arg(key: str, value, minimum: int, *, optional: bool = False) -> int | None:
    """``data.<key>`` as an int >= ``minimum`` (None allowed when ``optional``), else a UserError naming it."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    try:
        n = int(value) if ok else None
        ok = ok and float(value) == n
    except (TypeError, ValueError):
        ok = False
    if not ok or n < minimum:
        raise UserError(f"data.{key}={value!r}: expected an integer >= {minimum}{' or null' if optional else ''}")
    return n


def _float_arg(key: str, value, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``data.<key>`` as a finite number in ``[lo, hi]``, else a UserError naming it."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and lo <= x <= hi):
        raise UserError(f"data.{key}={value!r}: expected a number in [{lo:g}, {hi:g}]")
    return x


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | Sequence[str] | None, name: str = "shards") -> list[str]:
    """A brace pattern, a glob, a directory (all ``*.tar`` in it), or a list of any of these -> shard paths.

    Local paths must exist; the error names the config key and the path.
    """
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        if _is_remote(spec):
            return list(braceexpand.braceexpand(spec))
        if os.path.isdir(spec):
            shards = sorted(glob.glob(os.path.join(spec, "*.tar")))
            if not shards:
                raise ShardPathError(f"{name}={spec!r}: directory has no *.tar shards")
            return shards
        out = []
        for p in braceexpand.braceexpand(spec):
            if any(ch in p for ch in "*?["):
                hits = sorted(glob.glob(p))
                if not hits:
                    raise ShardPathError(f"{name}={spec!r}: pattern {p!r} matches no files")
                out.extend(hits)
            elif not os.path.isfile(p):
                raise ShardPathError(f"{name}={spec!r}: shard {p!r} does not exist")
            else:
                out.append(p)
        return out
    if isinstance(spec, Sequence):
        return [s for item in spec for s in expand_shards(item, name)]
    raise UserError(f"{name}={spec!r}: expected a path, pattern, directory or list, got {type(spec).__name__}")


class _EpochLoader(DataLoader):
    """A DataLoader that, each time it starts iterating, stamps its dataset with the epoch and the rank/world
    size resolved in the main process (torch.distributed when initialised, else the Trainer). Worker processes
    receive that stamped copy.

    Before its workers fork it collects the main process's cyclic garbage: PyAV filter graphs are reference cycles
    (the sample-video writer leaves one behind each time), an audio resampler's holds a thread pool, and a forked
    worker whose garbage collector frees such an inherited graph waits forever for threads it does not have."""

    def __init__(self, dataset, *, stamp: Callable[[Any], None], **kw):
        super().__init__(dataset, **kw)
        self._stamp = stamp

    def __iter__(self):
        self._stamp(self.dataset)
        if self.num_workers > 0:
            gc.collect()
        return super().__iter__()


class HalfBodyDataModule(L.LightningDataModule):
    """Webdataset shards (shared/DESIGN.md §1) -> training samples (docs/ARCHITECTURE.md).

    Args:
        train_shards: brace pattern (``data/train-{000000..000009}.tar``), glob, directory or list of them.
        val_shards: same; None uses the train shards when ``val_from_train``, else no validation.
        num_frames: clip length F at the target ``fps``; source clips at another fps are resampled by frame index.
        resolution: square side or ``[H, W]``.
        batch_size / val_batch_size: per rank.
        num_workers: dataloader workers per rank (0: in-process).
        samples_per_epoch / batches_per_epoch: per rank; give one (samples are rounded up to whole batches).
            Neither: 500 batches.
        val_samples: validation samples over all ranks (None: all).
        condition: a ``ConditionSpec`` or a mapping of its fields.
        train_crop: ``random`` (crop jitter) or ``center``; validation always centres.
        scale_jitter: training zoom-in of up to this fraction (0: none).
        target_head_box: where half-body heads sit, ``[x0, y0, x1, y1]`` normalised output coordinates (HPA).
        pad_value: padding pixel value in 0..255 (HPA).
        score_threshold: keypoints below it are not drawn and do not count for masks.
        audio_feats_field: optional precomputed feature field (see module docstring), yields ``audio_feats``.
        audio_context: what the audio encoder hears around the window: ``"clip"`` (the clip's whole audio, as the
            released EchoMimicV2 encodes it), ``[before_s, after_s]`` seconds around the window (zeros outside the
            clip), or ``None`` (the window alone). Yields ``audio_context`` ``(S_ctx,)`` (zero-padded to the batch's
            longest), ``audio_context_offset`` (the window's first sample in it) and ``audio_context_length``.
        shuffle_buffer: training samples mixed across shards before decoding.
        seed: base seed of the per-(rank, worker, epoch) seeds.
        max_bad_fraction / min_samples_for_bad_check: stop with a RuntimeError when, after at least that many
            samples, more than that fraction was bad.
        rank / world_size: override the distributed rank (tests, custom launchers).
        prepare: called from ``prepare_data()`` (local rank 0 only), e.g. the synthetic-world generator as a
            Hydra ``_partial_``; it must be a no-op when the data exist.
        synthetic: the shards come from the synthetic talker world, so its oracle metrics apply.
    """

    def __init__(
        self,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        num_frames: int = 12,
        fps: float = 25.0,
        resolution: int | Sequence[int] = 512,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        batches_per_epoch: int | None = None,
        val_samples: int | None = 16,
        val_from_train: bool = True,
        condition: ConditionSpec | Mapping | None = None,
        train_crop: str = "random",
        scale_jitter: float = 0.0,
        target_head_box: Sequence[float] = DEFAULT_TARGET_HEAD_BOX,
        pad_value: int = 0,
        score_threshold: float = 0.3,
        audio_feats_field: str | None = None,
        audio_context: str | Sequence[float] | None = "clip",
        shuffle_buffer: int = 16,
        seed: int = 0,
        max_bad_fraction: float = 0.5,
        min_samples_for_bad_check: int = 32,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        rank: int | None = None,
        world_size: int | None = None,
        prepare: Callable[[], Any] | None = None,
        synthetic: bool = False,
    ):
        super().__init__()
        self.synthetic = bool(synthetic)
        self.train_shards_spec = to_plain(train_shards)
        self.val_shards_spec = to_plain(val_shards)
        try:
            self.height, self.width = parse_resolution(to_plain(resolution))
        except (TypeError, ValueError) as e:
            raise UserError(f"data.{e}") from None
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.val_batch_size = _int_arg("val_batch_size", val_batch_size, 1, optional=True) or self.batch_size
        if samples_per_epoch is not None and batches_per_epoch is not None:
            raise UserError(f"data.samples_per_epoch={samples_per_epoch} or data.batches_per_epoch={batches_per_epoch}: "
                            "give one of them, not both")
        if samples_per_epoch is not None:
            self.batches_per_epoch = math.ceil(_int_arg("samples_per_epoch", samples_per_epoch, 1) / self.batch_size)
        else:
            self.batches_per_epoch = _int_arg("batches_per_epoch", batches_per_epoch if batches_per_epoch is not None
                                              else 500, 1)
        self.num_workers = _int_arg("num_workers", num_workers, 0)
        self.val_samples = _int_arg("val_samples", val_samples, 0, optional=True)
        self.val_from_train = bool(val_from_train)
        try:
            self.condition_spec = ConditionSpec.from_any(to_plain(condition))
        except (TypeError, ValueError) as e:
            raise UserError(f"data.condition={to_plain(condition)!r}: {e}") from None
        self._configured_condition_spec = self.condition_spec  # what apply_phase overrides field by field
        try:
            self.clip_kwargs = dict(
                num_frames=_int_arg("num_frames", num_frames, 1), fps=_float_arg("fps", fps, 1e-3),
                height=self.height, width=self.width, crop=train_crop,
                scale_jitter=_float_arg("scale_jitter", scale_jitter, 0.0, 1.0),
                target_head_box=tuple(to_plain(target_head_box)), pad_value=_int_arg("pad_value", pad_value, 0),
                score_threshold=_float_arg("score_threshold", score_threshold, 0.0, 1.0), audio_feats_field=audio_feats_field,
                audio_context=to_plain(audio_context),
            )
            ClipConfig(**self.clip_kwargs)  # validate now: errors name the argument
        except UserError:
            raise
        except (TypeError, ValueError) as e:  # ClipConfig's messages start with the argument's name
            raise UserError(f"data.{e}") from None
        self._configured_num_frames = self.clip_kwargs["num_frames"]
        self.shuffle_buffer = _int_arg("shuffle_buffer", shuffle_buffer, 0)
        self.seed = _int_arg("seed", seed, 0)
        self.max_bad_fraction = _float_arg("max_bad_fraction", max_bad_fraction, 0.0, 1.0)
        self.min_samples_for_bad_check = _int_arg("min_samples_for_bad_check", min_samples_for_bad_check, 1)
        self.persistent_workers = bool(persistent_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = _int_arg("prefetch_factor", prefetch_factor, 1, optional=True)
        self.rank, self.world_size = rank, world_size
        self.prepare = prepare
        self.train_dataset: TrainShardDataset | None = None
        self.val_dataset: ValShardDataset | None = None
        # the one place the records of all workers are counted and logged (the workers' own ledgers stay quiet)
        self.bad_ledger = BadSampleLedger(self.max_bad_fraction, self.min_samples_for_bad_check, where="all workers")
        self._epochs_started = 0

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        if self.prepare is not None:
            self.prepare()

    def setup(self, stage: str | None = None) -> None:
        ds_kw = dict(seed=self.seed, rank=self.rank, world_size=self.world_size, max_bad_fraction=self.max_bad_fraction,
                     min_samples_for_bad_check=self.min_samples_for_bad_check, log_records=False)
        train_shards = expand_shards(self.train_shards_spec, "data.train_shards")
        if not train_shards and stage in (None, "fit"):
            raise ShardPathError(f"data.train_shards={self.train_shards_spec!r}: no shards")
        if stage in (None, "fit") and self.train_dataset is None:
            builder = SampleBuilder(ClipConfig(**self.clip_kwargs), self.condition_spec)
            self.train_dataset = TrainShardDataset(train_shards, builder, batch_size=self.batch_size,
                                                   batches_per_epoch=self.batches_per_epoch,
                                                   shuffle_buffer=self.shuffle_buffer, **ds_kw)
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            val_shards = expand_shards(self.val_shards_spec, "data.val_shards")
            if not val_shards and self.val_from_train:
                val_shards = train_shards
            if val_shards:
                builder = SampleBuilder(ClipConfig(**self.clip_kwargs), self.condition_spec)
                self.val_dataset = ValShardDataset(val_shards, builder, val_samples=self.val_samples, **ds_kw)

    def _loader(self, dataset, batch_size: int) -> DataLoader:
        kw: dict[str, Any] = dict(batch_size=batch_size, num_workers=self.num_workers, collate_fn=collate_samples,
                                  pin_memory=self.pin_memory, stamp=self._stamp)
        if self.num_workers > 0:
            kw.update(persistent_workers=self.persistent_workers, prefetch_factor=self.prefetch_factor)
        return _EpochLoader(dataset, **kw)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.batch_size)

    def val_dataloader(self):
        if self.val_dataset is None:
            self.setup("validate")
        if self.val_dataset is None or self.val_samples == 0:
            return []  # no validation
        return self._loader(self.val_dataset, self.val_batch_size)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Main process: aggregate the workers' bad-sample records (and stop when most data is bad)."""
        if isinstance(batch, dict) and "bad_samples" in batch:
            for key, reason in batch["bad_samples"]:
                self.bad_ledger.record(key, reason)
            for key, reason in batch.get("repairs", ()):
                self.bad_ledger.record_repair(key, reason)
            self.bad_ledger.add_good(len(batch.get("key", ())))
        return batch

    @property
    def audio_feats_field(self) -> str | None:
        """The precomputed audio-feature field read into ``audio_feats`` (None: features computed by the model)."""
        return self.clip_kwargs["audio_feats_field"]

    # ------------------------------------------------------------------ runtime control
    def set_condition_spec(self, spec: ConditionSpec | Mapping) -> None:
        """Swap the condition settings (a phase change). See the module docstring for when workers see it."""
        self.condition_spec = ConditionSpec.from_any(spec)
        for ds in (self.train_dataset, self.val_dataset):
            if ds is not None:
                ds.set_condition_spec(self.condition_spec)

    def apply_phase(self, spec) -> None:
        """Apply a phase's data-side fields (a ``halfbody.phases.PhaseSpec``; see the module docstring).

        Every field the phase leaves unset takes the configured value (``condition``, ``num_frames``), so the
        result depends on this phase alone. The phase's pose dropout is drawn by the model, so a configured
        ``condition.pose_dropout`` > 0 would drop poses twice: that is an error.
        """
        base = self._configured_condition_spec
        if spec.pose_dropout is not None and base.pose_dropout > 0:
            raise ValueError(f"data.condition.pose_dropout={base.pose_dropout} would drop poses on top of phase "
                             f"{spec.name!r}'s pose_dropout (drawn by the model); set data.condition.pose_dropout=0")
        fields = {"pose_groups": base.pose_groups, "pose_dropout": base.pose_dropout,
                  "mask_margins": base.mask_margins, "headshot": base.headshot, "kinds": base.kinds,
                  "framing": base.framing}
        if spec.pose_groups is not None:
            fields["pose_groups"] = spec.pose_groups
        data = {k: v for k, v in dict(spec.data).items() if v is not None}
        if "mask_margins" in data:  # per region: regions the phase leaves out keep their configured margins
            data["mask_margins"] = {**base.mask_margins, **dict(data["mask_margins"])}
        fields.update(data)
        try:
            self.set_condition_spec(ConditionSpec(**fields))
        except ValueError as e:
            raise ValueError(f"phase {spec.name!r}: {e}") from None
        self.set_num_frames(self._configured_num_frames if spec.num_frames is None else spec.num_frames)

    def set_num_frames(self, num_frames: int) -> None:
        """Change the clip length F of the samples built from now on (same timing as ``set_condition_spec``)."""
        num_frames = int(num_frames)
        if num_frames == self.clip_kwargs["num_frames"]:
            return
        self.clip_kwargs["num_frames"] = num_frames
        clip = ClipConfig(**self.clip_kwargs)  # validates
        for ds in (self.train_dataset, self.val_dataset):
            if ds is not None:
                ds.builder.clip = clip

    def bad_sample_summary(self, all_ranks: bool = False) -> dict:
        """``BadSampleLedger.summary()`` over all batches this process has received; ``all_ranks``: summed over the
        ranks of a distributed run (a collective: every rank must call it at the same point)."""
        if all_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list = [None] * dist.get_world_size()
            dist.all_gather_object(states, self.bad_ledger.state())
            return BadSampleLedger.from_states(states).summary()
        return self.bad_ledger.summary()

    def _dist(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return int(self.rank), int(self.world_size)
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        return 0, 1

    def _stamp(self, dataset) -> None:
        dataset.rank, dataset.world_size = self._dist()
        if isinstance(dataset, TrainShardDataset):
            trainer = getattr(self, "trainer", None)
            if trainer is not None:
                # the data epoch follows the optimizer step, not Lightning's epoch counter: a run resumed from a
                # checkpoint taken at an epoch's last batch restarts Lightning's epoch but must see the next one's data
                batches_done = int(trainer.global_step) * int(trainer.accumulate_grad_batches)
                dataset.set_epoch(batches_done // self.batches_per_epoch)
            else:
                dataset.set_epoch(self._epochs_started)
                self._epochs_started += 1
