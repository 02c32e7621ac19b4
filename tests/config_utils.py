"""Entry configs composed as ``python -m halfbody.<entry>`` composes them (tests compose with Hydra's API)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from halfbody.utils.hydra import CONFIG_DIR


def compose_config(config_name: str, overrides: list[str], out: Path | None = None) -> DictConfig:
    """``conf/<config_name>.yaml`` (``train``, ``generate``, ``evaluate``, ...) with ``overrides``; with ``out``, a config
    ready for the entry's function that writes there (Hydra's own keys, which only its launcher resolves, are
    dropped)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=out is not None)
    if out is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.log_dir = str(out)
            del cfg.hydra
    return cfg


def compose_train(overrides: list[str], out: Path | None = None) -> DictConfig:
    """``conf/train.yaml`` as ``python -m halfbody.train`` composes it (see ``compose_config``)."""
    return compose_config("train", overrides, out)
