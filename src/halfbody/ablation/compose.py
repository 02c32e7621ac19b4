"""Hydra compose helpers: the other entry points' configs composed in-process, a path as an override value."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Sequence

import hydra
from omegaconf import DictConfig, open_dict

from halfbody.utils.errors import UserError
from halfbody.utils.hydra import CONFIG_DIR

__all__ = ["compose_entry", "hydra_value"]


def hydra_value(value: str) -> str:
    """A path as a Hydra override value (quoted when it holds characters Hydra's grammar would read)."""
    if re.fullmatch(r"[\w/.\-+~@]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@contextlib.contextmanager
def _compose_context() -> Iterator[None]:
    """Hydra's compose API: inside ``@hydra.main`` (already initialised on conf/) or standalone."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            yield


def compose_entry(config_name: str, overrides: Sequence[str], output_dir: Path, key: str,
                  where: str | None = None, keep_hydra: bool = False) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides`` (a bad one is a UserError naming ``where``, by default
    ``key=<overrides>``), its outputs under ``output_dir`` (Hydra's own keys dropped: only its launcher resolves
    them)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with _compose_context():
            cfg = hydra.compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise UserError(f"{where or f'{key}={list(overrides)}'}: {str(e).splitlines()[0]}") from e
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
        if not keep_hydra:
            del cfg.hydra
    return cfg
