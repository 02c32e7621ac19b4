"""Loading pretrained parts from local directories (nothing downloads at run time; shared/DESIGN.md §4).

Every pretrained path comes from a config key. When the directory is missing or incomplete, the error names
that key and the layout that was expected, in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from halfbody.utils.errors import UserError

T = TypeVar("T")


class PretrainedNotFoundError(UserError, FileNotFoundError):
    """A pretrained directory named by a config key is missing or incomplete (reported by the entry points as one
    line naming the key)."""


def require_pretrained_dir(path: str | os.PathLike | None, key: str, expected: str,
                           required_files: tuple[str, ...] = ("config.json",)) -> Path:
    """Check that ``path`` (the value of config key ``key``) is a directory holding ``required_files``.

    Args:
        path: directory from the config; ``None`` or empty counts as missing.
        key: the dotted config key, e.g. ``model.pretrained.unet``, quoted in the error.
        expected: a short description of the expected layout, e.g. ``"a diffusers UNet2DConditionModel
            directory (config.json + diffusion_pytorch_model.safetensors), e.g. SD1.5's unet/ folder"``.
        required_files: files that must exist inside the directory.
    """
    if not path:
        raise PretrainedNotFoundError(f"config key {key!r} is not set: expected {expected}")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_dir():
        raise PretrainedNotFoundError(f"config key {key!r} points to {str(p)!r}, which is not a directory: expected {expected}")
    missing = [f for f in required_files if not (p / f).exists()]
    if missing:
        raise PretrainedNotFoundError(f"config key {key!r} points to {str(p)!r}, which lacks {missing}: expected {expected}")
    return p


def load_pretrained(cls: type[T], path: str | os.PathLike | None, key: str, expected: str, **kwargs: Any) -> T:
    """``cls.from_pretrained(path, local_files_only=True, **kwargs)`` after :func:`require_pretrained_dir`.

    Works for diffusers models and transformers models alike (both accept ``local_files_only``).
    """
    p = require_pretrained_dir(path, key, expected)
    return cls.from_pretrained(str(p), local_files_only=True, **kwargs)  # type: ignore[attr-defined]
