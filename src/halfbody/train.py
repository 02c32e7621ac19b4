"""Training entry point: ``python -m halfbody.train [experiment=...] [overrides]``.

It only composes, instantiates and runs (lightning-hydra-template style); all model logic lives in the
LightningModules, all data logic in the datamodule and all phase logic in callbacks. The config is checked first
(``halfbody.utils.startup_checks``): a user mistake ends the run in one line, ``error: <key>=<value>: ...``, with exit
code 2 and no traceback (``HYDRA_FULL_ERROR=1`` shows it).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from halfbody.utils.checkpoint_io import save_final_last
from halfbody.utils.errors import exit_on_user_error
from halfbody.utils.hydra import CONFIG_DIR, instantiate_group, quote_brace_patterns
from halfbody.utils.startup_checks import check_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate datamodule, model, callbacks, loggers and trainer from ``cfg``, then fit.

    Returns the trainer's callback metrics (floats), so sweeps can optimise ``cfg.optimized_metric``.
    Raises ``halfbody.utils.errors.UserError`` for a bad config value, before any heavy work.
    """
    check_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    if cfg.get("float32_matmul_precision"):
        torch.set_float32_matmul_precision(cfg.float32_matmul_precision)

    log.info("datamodule <%s>", cfg.data._target_)
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    log.info("model <%s>", cfg.model._target_)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    if cfg.get("parallelize") is not None:  # applied by the model's configure_model: checkpointing, compile, FSDP2
        model.parallelism = hydra.utils.instantiate(cfg.parallelize)
    callbacks = instantiate_group(cfg.get("callbacks"), "callback")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]

    if cfg.get("train", True):
        trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        save_final_last(trainer)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        log.info("best checkpoint: %s", best or "(none)")
    return {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    with exit_on_user_error():
        metrics = train(cfg)
    name = cfg.get("optimized_metric")
    if name:
        if name not in metrics:
            raise KeyError(f"optimized_metric {name!r} was not logged; logged metrics: {sorted(metrics)}")
        return metrics[name]
    return None


if __name__ == "__main__":
    sys.argv = quote_brace_patterns(sys.argv)  # data.train_shards='/data/train-{000000..000099}.tar' as documented
    main()
