"""Hydra helpers: the repository root resolver and instantiation of callback / logger groups."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# The config tree lives at the repository root (editable install): src/halfbody/utils/hydra.py -> ../../../conf
REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIG_DIR = REPO_ROOT / "conf"


def repo_root() -> str:
    """``HALFBODY_ROOT`` if set, else the repository this package was installed from."""
    return os.environ.get("HALFBODY_ROOT", str(REPO_ROOT))


if not OmegaConf.has_resolver("hb_root"):
    OmegaConf.register_new_resolver("hb_root", repo_root)


def instantiate_group(cfg: DictConfig | None, what: str) -> list:
    """Instantiate every entry of a config group dict (``callbacks`` or ``logger``) that has a ``_target_``."""
    objs: list = []
    if not cfg:
        return objs
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"config group {what!r} must be a mapping of name -> config, got {type(cfg).__name__}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.info("instantiating %s %s <%s>", what, name, conf._target_)
            objs.append(hydra.utils.instantiate(conf))
    return objs
