"""Plain Python copies of configuration values."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def to_plain(value: Any) -> Any:
    """Mappings -> dict, other iterables (tuples, OmegaConf ListConfig, ...) -> list, recursively; strings, bytes,
    paths and scalars unchanged. Turns Hydra containers into the plain values that libraries and JSON accept,
    without importing omegaconf."""
    if value is None or isinstance(value, (str, bytes, os.PathLike)):
        return value
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if hasattr(value, "__iter__") and not hasattr(value, "shape"):  # not arrays / tensors
        return [to_plain(v) for v in value]
    return value
