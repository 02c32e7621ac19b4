"""Aggregates the datamodule's bad-sample records (skipped samples) in the main process and logs them."""

from __future__ import annotations

import logging
from collections import Counter

import lightning as L

log = logging.getLogger(__name__)


class BadSampleMonitor(L.Callback):
    """Counts skipped samples by reason across all dataloader workers and logs the running totals.

    The dataset attaches ``batch["bad_samples"]``: a list of ``(key, reason)`` records of the samples that
    were skipped in the producing worker since its previous sample. Each is logged once here with its key.
    """

    def __init__(self, log_every_record: bool = True) -> None:
        self.log_every_record = log_every_record
        self.counts: Counter[str] = Counter()

    def _consume(self, pl_module: L.LightningModule, batch, stage: str) -> None:
        records = batch.get("bad_samples") if isinstance(batch, dict) else None
        if not records:
            return
        for key, reason in records:
            category = reason.split(":", 1)[0]
            self.counts[category] += 1
            if self.log_every_record:
                log.warning("skipped bad %s sample %s: %s", stage, key, reason)
        pl_module.log(f"data/{stage}_bad_samples", float(sum(self.counts.values())), on_step=True)
        for category, n in self.counts.items():
            pl_module.log(f"data/bad/{category.replace(' ', '_')}", float(n), on_step=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._consume(pl_module, batch, "train")

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.counts = Counter(state_dict.get("counts", {}))
