"""Local weight files of the evaluation networks: loaded safely, and a missing file is a skip reason naming its key.

Every metric network (Inception, I3D, SyncNet, ArcFace, the LPIPS backbone) reads its weights from a local file named
by a config key (``metrics.<name>.weights``); nothing downloads. A missing file raises :class:`MissingWeights`, which
the evaluation turns into one line in ``skipped`` (the other metrics still run). Files are read with
``torch.load(weights_only=True)`` (or safetensors), never by unpickling arbitrary objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["MissingWeights", "load_weights", "load_into"]


class MissingWeights(FileNotFoundError):
    """A metric's weight file is not configured or not on disk; ``str(e)`` is the one-line skip reason."""


def load_weights(path: str | os.PathLike | None, key: str, expected: str) -> dict[str, torch.Tensor]:
    """A flat tensor state dict from ``path`` (the value of config key ``key``).

    ``.safetensors`` via safetensors, anything else via ``torch.load(weights_only=True)``; a ``{"state_dict": ...}``
    or ``{"model": ...}`` wrapper and DataParallel's ``module.`` prefixes are unwrapped. Raises :class:`MissingWeights`
    (not set / not a file) or ``ValueError`` (unreadable, not a state dict), both naming ``key``.
    """
    if not path:
        raise MissingWeights(f"{key} is not set (expected {expected})")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise MissingWeights(f"{key}={str(path)!r} not found (expected {expected}; nothing is downloaded)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised naming the key
        raise ValueError(f"{key}={str(path)!r}: not a readable state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict) and len(sd) <= 3:
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{key}={str(path)!r} does not hold a flat tensor state dict (expected {expected})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], key: str, path: str | os.PathLike,
              ignore: tuple[str, ...] = ("num_batches_tracked",)) -> nn.Module:
    """Copy ``sd`` into ``module`` strictly (every tensor present with its shape; keys ending in ``ignore`` and
    unexpected keys listed in ``ignore`` may be absent / extra). Errors name ``key`` and the first offending keys."""
    own = module.state_dict()
    need = {k for k in own if not k.endswith(ignore)}
    have = {k for k in sd if not k.endswith(ignore)}
    missing = sorted(need - have)
    extra = sorted(k for k in have - need if not any(k.startswith(i) for i in ignore))
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(need & have)
             if sd[k].shape != own[k].shape]
    if missing or extra or wrong:
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 f"shape mismatch {wrong[:3]}" if wrong else ""]
        raise ValueError(f"{key}={str(path)!r} does not fit {type(module).__name__}: "
                         + "; ".join(p for p in parts if p))
    meta = any(t.is_meta for t in own.values())
    module.load_state_dict({k: sd[k].to(own[k].dtype) for k in need}, strict=False, assign=meta)
    if meta:  # built on the meta device: what the file does not hold (e.g. num_batches_tracked) becomes real zeros
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if t.is_meta:
                owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
                leaf = name.rpartition(".")[2]
                if leaf in owner._parameters:
                    owner._parameters[leaf] = nn.Parameter(torch.zeros(t.shape, dtype=t.dtype), requires_grad=False)
                else:
                    owner._buffers[leaf] = torch.zeros(t.shape, dtype=t.dtype)
    return module
