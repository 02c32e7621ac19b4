"""Logs the datamodule's bad-sample counts (skipped and repaired samples, by reason) to the experiment loggers.

The datamodule aggregates the records of all dataloader workers in the main process (``HalfBodyDataModule.bad_ledger``),
logs each one there as one line with its key and reason, and stops the run when most samples are bad. This
callback turns those totals into metrics on every logging step (``trainer.log_every_n_steps``), after every
validation and at the end of training, so the last value logged equals the lines printed:

- ``data/bad_samples``: skipped reads (a sample read again in a later epoch or validation counts again);
- ``data/bad_unique``: distinct keys skipped; ``data/bad_fraction``: skipped reads / all reads;
- ``data/bad/<reason>`` and ``data/bad_unique/<reason>``: the same by reason category;
- ``data/repaired_samples``, ``data/repaired/<reason>``: samples that trained after a repair;
- ``data/good_samples``: reads that became training or validation samples.

In a distributed run the counts are summed over the ranks (every rank reaches the same logging points).

Every family gets it from the shared ``AnimationModule.configure_callbacks``, whatever the callbacks config says.
See docs/BAD_DATA.md for the cases and their reasons.
"""

from __future__ import annotations

import lightning as L
import torch


def _name(reason: str) -> str:
    return reason.replace(" ", "_")


def bad_sample_metrics(summary: dict) -> dict[str, float]:
    """A ``BadSampleLedger.summary()`` -> ``data/*`` metrics."""
    total = summary["good"] + summary["bad"]
    metrics = {
        "data/good_samples": float(summary["good"]),
        "data/bad_samples": float(summary["bad"]),
        "data/bad_unique": float(summary.get("bad_unique", 0)),
        "data/bad_fraction": summary["bad"] / max(total, 1),
        "data/repaired_samples": float(summary.get("repaired", 0)),
    }
    metrics.update({f"data/bad/{_name(r)}": float(n) for r, n in summary["by_reason"].items()})
    metrics.update({f"data/bad_unique/{_name(r)}": float(n) for r, n in summary.get("by_reason_unique", {}).items()})
    metrics.update({f"data/repaired/{_name(r)}": float(n) for r, n in summary.get("repaired_by_reason", {}).items()})
    return metrics


class BadSampleMonitor(L.Callback):
    """Args:
        every_n_steps: log every this many optimizer steps (None: the trainer's ``log_every_n_steps``).
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r}: expected an integer >= 1 or null")
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self._last_logged: tuple[int, dict] | None = None

    def log_counts(self, trainer: L.Trainer, force: bool = False) -> dict[str, float] | None:
        """Log the current counts at the current step (once per step and state; ``force`` logs regardless)."""
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "bad_sample_summary"):
            return None
        metrics = bad_sample_metrics(dm.bad_sample_summary(all_ranks=True))  # every rank calls this at the same step
        state = (trainer.global_step, metrics)
        if not force and self._last_logged == state:
            return metrics
        self._last_logged = state
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        # also in callback_metrics, so `train()` returns them and sweeps/checkpoints can monitor them
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if trainer.global_step % n == 0:
            self.log_counts(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.log_counts(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_counts(trainer)
