"""Writes validation samples as mp4 (reference | generated | ground truth, with the driving audio) and logs them.

The LightningModule generates the clips in ``validation_step`` and leaves them in
``pl_module.validation_samples`` (a list of dicts, see ``SampleVideoWriter.REQUIRED``); this callback does the
I/O: files under ``dirpath``, W&B videos when a W&B logger is attached, and the synthetic world's oracle
metrics (``halfbody.metrics.oracle``) when ``oracle_metrics`` is on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from halfbody.data.media import AUDIO_SAMPLE_RATE, write_video
from halfbody.metrics.oracle import ORACLE_METRICS, oracle_metrics

log = logging.getLogger(__name__)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``(F, 3, H, W)`` in ``[-1, 1]`` -> ``(F, H, W, 3)`` uint8."""
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def side_by_side(ref: torch.Tensor, generated: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """One clip as ``(F, H, 3W, 3)`` uint8: reference (repeated) | generated | ground truth."""
    f = generated.shape[0]
    return np.concatenate([to_uint8_frames(ref.unsqueeze(0).expand(f, -1, -1, -1)), to_uint8_frames(generated),
                           to_uint8_frames(target)], axis=2)


class SampleVideoWriter(L.Callback):
    REQUIRED = ("ref", "generated", "video", "audio", "kpts", "fps", "key")

    def __init__(self, dirpath: str, oracle_metrics: bool = False, max_videos: int = 4, log_to_wandb: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.oracle_metrics = oracle_metrics
        self.max_videos = max_videos
        self.log_to_wandb = log_to_wandb
        self.last_paths: list[Path] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        samples = getattr(pl_module, "validation_samples", None) or []
        pl_module.validation_samples = []
        sums = torch.zeros(len(ORACLE_METRICS), dtype=torch.float64)
        counts = torch.zeros(len(ORACLE_METRICS), dtype=torch.float64)
        paths: list[Path] = []
        for batch in samples:
            missing = [k for k in self.REQUIRED if k not in batch]
            if missing:
                raise KeyError(f"validation sample lacks {missing}; the module must provide {list(self.REQUIRED)}")
            for i in range(batch["generated"].shape[0]):
                if self.oracle_metrics:
                    m = oracle_metrics(batch["generated"][i], batch["ref"][i], batch["kpts"][i], batch["audio"][i],
                                       float(batch["fps"][i]))
                    for j, name in enumerate(ORACLE_METRICS):
                        if np.isfinite(m[name]):  # nan: not measurable on this clip (e.g. hands on a headshot)
                            sums[j] += m[name]
                            counts[j] += 1
                if trainer.is_global_zero and len(paths) < self.max_videos:
                    grid = side_by_side(batch["ref"][i], batch["generated"][i], batch["video"][i])
                    name = f"step{trainer.global_step:07d}_{len(paths)}_{batch['key'][i]}.mp4"
                    audio = batch["audio"][i].detach().float().cpu().numpy()
                    paths.append(write_video(self.dirpath / name, grid, float(batch["fps"][i]), audio, AUDIO_SAMPLE_RATE))
        if self.oracle_metrics:
            # every rank takes part in the same reductions, whatever its own clips allowed it to measure
            totals = trainer.strategy.reduce(torch.stack([sums, counts]).to(pl_module.device), reduce_op="sum").cpu()
            means = {name: float(totals[0, j] / totals[1, j]) for j, name in enumerate(ORACLE_METRICS)
                     if totals[1, j] > 0}
            for name, value in means.items():
                pl_module.log(f"val/oracle/{name}", value, rank_zero_only=True)
            if trainer.is_global_zero and means:  # the run's first impression in the console, not only in W&B
                log.info("step %d oracle metrics of the samples: %s", trainer.global_step,
                         ", ".join(f"{k} {v:.3f}" for k, v in means.items()))
        self.last_paths = paths
        if paths:
            log.info("wrote %d sample video(s) to %s", len(paths), self.dirpath)
        if trainer.is_global_zero and self.log_to_wandb:
            self._log_wandb(trainer, paths)

    @staticmethod
    def _log_wandb(trainer: L.Trainer, paths: list[Path]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger) and paths:
                import wandb

                lg.experiment.log({"val/samples": [wandb.Video(str(p), format="mp4") for p in paths],
                                   "trainer/global_step": trainer.global_step})
