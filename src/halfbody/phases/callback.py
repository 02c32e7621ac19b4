"""CurriculumCallback: moves a run through a :class:`~halfbody.phases.spec.Curriculum` by ``global_step``.

The phase of optimizer step ``g`` is ``curriculum.phase_at(g)``: a pure function of the step, so a resumed run is
in the same phase, at the same point of its schedules, as the run that wrote the checkpoint.

Model side (``pl_module.apply_phase(spec, step_in_phase)`` on a phase change, ``pl_module.set_phase_step(spec,
step_in_phase)`` every step): applied at fit start and at each training batch start, before the forward pass of
the step it belongs to. Freezing sets ``requires_grad=False`` and drops ``.grad``; the optimizer keeps every
parameter (one group per module group), so a group unfrozen later trains from its next step, and AdamW skips
frozen parameters (no moment update, no weight-decay drift). A group that trained before, froze, and trains
again resumes with its old Adam moments.

Data side (``trainer.datamodule.apply_phase(spec)``, when a phase changes the data-side fields): a sample is
rendered with the datamodule's spec at the time it is built.

* ``num_workers=0``: the spec of step ``g + 1`` is applied when step ``g`` ends (and the current step's at fit
  and epoch start), so every batch is built with its own step's phase. This relies on Lightning not prefetching
  (it does not when the train dataloader has a length, as ``HalfBodyDataModule``'s has); a loader without a
  length is prefetched one batch ahead and sees data changes one batch late.
* ``num_workers>0``: workers copy the dataset when the dataloader starts iterating, i.e. at each epoch start, and
  the spec of the epoch's first step is applied just before. A data-side change inside an epoch reaches the
  workers at the next epoch start; the callback warns at train start about every phase boundary where this
  happens (make phase lengths multiples of the steps per epoch, e.g. ``data.batches_per_epoch``, for exact
  switches). ``persistent_workers=True`` never restarts workers unless the trainer reloads dataloaders
  (``reload_dataloaders_every_n_epochs=1``); that combination with data-side changes is an error.

The pose dropout of a phase is model-side (per-sample ``pose_keep`` drawn in the model), so its per-step
schedule needs no worker restart.

Logged: ``phase/index``, ``phase/step_in_phase`` and every scheduled value (``phase/pose_dropout``) each step;
on a phase change the phase's index, name, start step and spec as hyperparameters (a W&B config update).
Checkpointed: the current phase's index and name, the global step and the phase names (``state_dict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from halfbody.phases.spec import Curriculum, PhaseSpec


class CurriculumCallback(L.Callback):
    """Applies the phases of a curriculum at step boundaries (see the module docstring).

    Args:
        phases: the ordered phases, each a mapping of :class:`PhaseSpec` fields (Hydra config) or a PhaseSpec.
        max_steps_per_phase: cut every phase to at most this many steps (a smoke run of a paper recipe on CPU:
            same phases and settings, fewer steps); None keeps the recipe's step counts.
        stop_at_end: end training when the last phase's steps are done (the curriculum sets the run length;
            ``trainer.max_steps`` may still end it earlier). False keeps training in the last phase.
    """

    def __init__(self, phases: Sequence[Mapping[str, Any] | PhaseSpec], max_steps_per_phase: int | None = None,
                 stop_at_end: bool = True):
        curriculum = Curriculum(phases)
        if max_steps_per_phase is not None:
            if int(max_steps_per_phase) < 1:
                raise ValueError(f"callbacks.curriculum.max_steps_per_phase={max_steps_per_phase!r}: must be >= 1")
            curriculum = Curriculum([dataclasses.replace(p, steps=min(p.steps, int(max_steps_per_phase)))
                                     for p in curriculum.phases])
        self.curriculum = curriculum
        self.stop_at_end = bool(stop_at_end)
        self.phase_index: int | None = None  # the phase applied to the module
        self._data_index: int | None = None  # the phase whose data-side fields the datamodule renders
        self._restored: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    # ------------------------------------------------------------------------------------------ checks
    def _data_boundaries(self) -> list[int]:
        """Indices of phases whose data-side fields differ from the previous phase's."""
        ph = self.curriculum.phases
        return [i for i in range(1, len(ph)) if ph[i].data_fields() != ph[i - 1].data_fields()]

    @staticmethod
    def _datamodule(trainer: L.Trainer):
        dm = getattr(trainer, "datamodule", None)
        return dm if dm is not None and callable(getattr(dm, "apply_phase", None)) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        for hook in ("apply_phase", "set_phase_step"):
            if not callable(getattr(pl_module, hook, None)):
                raise TypeError(f"callbacks.curriculum: {type(pl_module).__name__} has no {hook}(spec, step_in_phase)")
        check = getattr(pl_module, "check_phase", None)
        for spec in self.curriculum.phases:  # fail before training, not when a late phase starts
            if callable(check):
                check(spec)
        dm = self._datamodule(trainer)
        data_phases = [p.name for p in self.curriculum.phases if any(v is not None for v in p.data_fields().values())]
        if dm is None:
            if data_phases:
                raise ValueError(f"callbacks.curriculum: phase {data_phases[0]!r} sets data-side fields but the "
                                 f"datamodule ({type(getattr(trainer, 'datamodule', None)).__name__}) has no apply_phase")
            return
        for spec in self.curriculum.phases:  # dry run: the datamodule's errors, now (nothing iterates yet)
            dm.apply_phase(spec)
        self._data_index = None
        if (self._data_boundaries() and int(getattr(dm, "num_workers", 0) or 0) > 0
                and getattr(dm, "persistent_workers", False) and not trainer.reload_dataloaders_every_n_epochs):
            name = self.curriculum[self._data_boundaries()[0]].name
            raise ValueError(f"data.persistent_workers=true: dataloader workers never see phase {name!r}'s data-side "
                             f"fields; set data.persistent_workers=false or trainer.reload_dataloaders_every_n_epochs=1")

    # ------------------------------------------------------------------------------------------ applying
    def _enter(self, trainer: L.Trainer, pl_module: L.LightningModule, global_step: int) -> None:
        index, spec, k = self.curriculum.phase_at(global_step)
        pl_module.apply_phase(spec, k)
        self.phase_index = index
        rank_zero_info(f"curriculum: step {global_step}: phase {index} {spec.name!r} (step {k} of {spec.steps}): "
                       f"trainable={list(spec.trainable)}, muted={list(spec.muted)}, "
                       f"audio_region={getattr(pl_module, 'audio_region', None)!r}, pose_groups={spec.pose_groups!r}, "
                       f"data={dict(spec.data)}, num_frames={spec.num_frames}")
        params = {"phase/index": index, "phase/name": spec.name,
                  "phase/start_step": self.curriculum.starts[index], "phase/spec": spec.summary()}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    def _apply_data(self, trainer: L.Trainer, global_step: int) -> None:
        dm = self._datamodule(trainer)
        if dm is None:
            return
        index, spec, _ = self.curriculum.phase_at(global_step)
        if index != self._data_index:
            dm.apply_phase(spec)
            self._data_index = index

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callback state is restored before this hook, the trainer's global_step only after it: a resumed run
        # takes its step from the checkpointed state, so the first batches are already built for the right phase.
        step = int(trainer.global_step)
        restored = self._restored
        if restored is not None and restored.get("global_step") is not None:
            step = int(restored["global_step"])
            names = [p.name for p in self.curriculum.phases]
            if restored.get("phase_names") not in (None, names):
                rank_zero_warn(f"callbacks.curriculum: the checkpoint was trained with phases "
                               f"{restored['phase_names']}, this run has {names}; the phase is recomputed from "
                               f"global_step={step}")
        self._enter(trainer, pl_module, step)
        self._apply_data(trainer, step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = int(trainer.global_step)  # restored by now
        if self.curriculum.phase_at(step)[0] != self.phase_index:
            self._enter(trainer, pl_module, step)
        self._apply_data(trainer, step)
        self._restored = None
        self._warn_mid_epoch_data_changes(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_data(trainer, int(trainer.global_step))  # before workers copy the dataset for this epoch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        index, spec, k = self.curriculum.phase_at(step)
        if index != self.phase_index:
            self._enter(trainer, pl_module, step)
        values = pl_module.set_phase_step(spec, k)
        metrics = {"phase/index": float(index), "phase/step_in_phase": float(k),
                   **{f"phase/{name}": float(v) for name, v in (values or {}).items()}}
        for name, value in metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._apply_data(trainer, int(trainer.global_step))  # the next batch belongs to this (new) global step
        if self.stop_at_end and trainer.global_step >= self.curriculum.total_steps:
            trainer.should_stop = True

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        index = self.phase_index
        return {
            "phase_index": index,
            "phase_name": None if index is None else self.curriculum[index].name,
            "global_step": None if self._trainer is None else int(self._trainer.global_step),
            "phase_names": [p.name for p in self.curriculum.phases],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        self.phase_index = state_dict.get("phase_index")

    # ------------------------------------------------------------------------------------------ workers
    def _warn_mid_epoch_data_changes(self, trainer: L.Trainer) -> None:
        dm = self._datamodule(trainer)
        if dm is None or int(getattr(dm, "num_workers", 0) or 0) == 0:
            return
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:
            return
        per_epoch = max(1, batches // max(1, int(trainer.accumulate_grad_batches)))
        for i in self._data_boundaries():
            start = self.curriculum.starts[i]
            if start % per_epoch:
                at = (start // per_epoch + 1) * per_epoch
                rank_zero_warn(f"callbacks.curriculum: phase {self.curriculum[i].name!r} starts at step {start}, inside "
                               f"an epoch of {per_epoch} steps, and changes data-side fields; with data.num_workers="
                               f"{dm.num_workers} its samples arrive from step {at} (the next epoch's workers). Make "
                               f"phase steps multiples of {per_epoch} for an exact switch")
