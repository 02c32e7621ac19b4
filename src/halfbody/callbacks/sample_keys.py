"""Records which sample keys each rank trained on (a data audit: are DDP/FSDP ranks seeing different data?)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L


class SampleKeyRecorder(L.Callback):
    """Writes ``<dirpath>/rank<R>.json`` with the keys of every training (and validation) sample the rank saw."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.keys: dict[str, list[str]] = {"train": [], "val": []}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys["train"].extend(str(k) for k in batch["key"])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.keys["val"].extend(str(k) for k in batch["key"])

    def on_fit_end(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.keys))
        os.replace(tmp, path)
