"""Logs the datamodule's bad-sample counts (skipped samples, by reason) to the experiment loggers.

Workers log each skipped sample with its key and reason where it happens; the datamodule aggregates the records of
all workers in the main process (``HalfBodyDataModule.bad_ledger``) and stops the run when most samples are bad.
This callback only turns those totals into metrics: ``data/bad_samples``, ``data/bad_fraction``, ``data/bad/<reason>``.
"""

from __future__ import annotations

import lightning as L


class BadSampleMonitor(L.Callback):
    def __init__(self, every_n_steps: int = 25) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "bad_sample_summary") or trainer.global_step % self.every_n_steps:
            return
        summary = dm.bad_sample_summary()
        total = summary["good"] + summary["bad"]
        metrics = {"data/bad_samples": float(summary["bad"]), "data/bad_fraction": summary["bad"] / max(total, 1)}
        metrics.update({f"data/bad/{reason.replace(' ', '_')}": float(n) for reason, n in summary["by_reason"].items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
