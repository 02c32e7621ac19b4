"""Hydra helpers: the repository root resolver and instantiation of callback / logger groups."""

from __future__ import annotations

import logging
import os
import re
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


# A brace-expansion group of a shard pattern: {000000..000099} or {a,b}; Hydra's dicts have a colon ({a: 1}) and
# interpolations a dollar sign (${paths.data_dir}).
_BRACE_GROUP = re.compile(r"(?<!\$)\{[^{}:$]*(?:\.\.|,)[^{}:$]*\}")


def _split_top_level_commas(value: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(value):
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def quote_brace_patterns(args: list[str]) -> list[str]:
    """Quote override values that hold a shard brace pattern, so Hydra's parser reads them as strings.

    ``data.train_shards=/data/train-{000000..000099}.tar`` (what the shell passes for
    ``data.train_shards='/data/train-{000000..000099}.tar'``) becomes ``data.train_shards="/data/train-{...}.tar"``;
    Hydra would otherwise read ``{`` as the start of a dict and fail with ``mismatched input '{'``. Values already
    quoted, Hydra dicts (``{a: 1}``), interpolations (``${...}``), lists, sweep functions (``choice(...)``) and flags
    are left as they are; a comma-separated sweep has each element quoted.
    """
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if (not eq or arg.startswith("-") or not value or value[0] in "'\"[" or "\\" in value
                or re.match(r"\w+\(", value) or not _BRACE_GROUP.search(value)):
            out.append(arg)
            continue
        parts = _split_top_level_commas(value)
        quoted = []
        for part in parts:
            if not _BRACE_GROUP.search(part) or part[:1] in "'\"":
                quoted.append(part)
            elif '"' not in part:
                quoted.append(f'"{part}"')
            elif "'" not in part:
                quoted.append(f"'{part}'")
            else:
                quoted.append(part)
        out.append(f"{key}={','.join(quoted)}")
    return out
