"""The ``device`` key of the generation and evaluation entries: auto (CUDA when available), cpu, cuda or cuda:N."""

from __future__ import annotations

from typing import Any

import torch

from halfbody.utils.errors import UserError


def device_from(cfg: Any, key: str = "device") -> torch.device:
    """``cfg[key]`` as a torch device; a malformed name or CUDA on a machine without it is one line naming the key."""
    name = str(cfg.get(key, "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key}={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key}={name!r}: no CUDA device is available (use {key}=cpu or {key}=auto)")
    return dev
