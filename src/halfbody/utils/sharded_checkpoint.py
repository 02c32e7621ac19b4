"""Sharded checkpoints under ``trainer=fsdp``: the strategy, atomic sharded saves, inspection and consolidation.

A sharded checkpoint is a directory named like the file it replaces (``<run>/checkpoints/last.ckpt/``), written by
Lightning's ``ModelParallelStrategy`` through ``torch.distributed.checkpoint`` (DCP):

- ``.metadata`` and ``__<rank>_0.distcp``: the model's and the optimizer's tensors, each process writing its shards
  (keys ``state_dict.<module key>`` and ``optimizer_0.state.<param>.<exp_avg|...>``);
- ``meta.pt``: everything else of the Lightning checkpoint (global step, loops with the data position, callback
  states with the curriculum phase, LR schedulers, hyperparameters), loadable with ``torch.load(weights_only=True)``.

:class:`FSDPStrategy` writes it into ``.<name>.<token>.tmp/`` beside the target (every process its shards, rank 0
``meta.pt`` last, fsynced) and then swaps it into place with one atomic ``renameat2(RENAME_EXCHANGE)``: a kill
during a save leaves the previous checkpoint complete (on a filesystem without the exchange, two renames, with the
previous directory kept at ``.<name>.old.tmp`` until the new one is in place). DCP re-shards on load, so a checkpoint
saved by N processes resumes with M.

:func:`consolidate` gathers a sharded checkpoint into one safetensors file, the format ``generate`` reads
(:func:`load_consolidated`, through ``halfbody.utils.checkpoint_io.inspect_checkpoint``):

- tensors: the LightningModule's full state dict, keys as in a Lightning ``.ckpt``'s ``state_dict``
  (``network.*``, ``autoencoder.*``, ``audio_encoder.*``), float32 as trained (no optimizer state);
- safetensors metadata ``{"format": "halfbody.consolidated/1", "checkpoint": <JSON>}``, the JSON holding
  ``global_step``, ``epoch``, ``hyper_parameters`` and ``callbacks`` (the curriculum phase generate applies), i.e. a
  Lightning checkpoint without ``optimizer_states`` / ``loops``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.pytorch.strategies import ModelParallelStrategy

from halfbody.utils.errors import UserError
from halfbody.utils.io import atomic_output, fsync_dir

log = logging.getLogger(__name__)

CONSOLIDATED_FORMAT = "halfbody.consolidated/1"
DCP_METADATA = ".metadata"
_KEEP_META = ("global_step", "epoch", "hyper_parameters", "callbacks", "pytorch-lightning_version")


# ------------------------------------------------------------------------------------------------------ detection
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A ``torch.distributed.checkpoint`` directory written by Lightning (``meta.pt`` or DCP ``.metadata`` inside)."""
    p = Path(path)
    return p.is_dir() and ((p / _METADATA_FILENAME).is_file() or (p / DCP_METADATA).is_file())


def sharded_tensor_keys(path: str | os.PathLike) -> list[str]:
    """The tensor keys a sharded checkpoint holds (``state_dict.*``, ``optimizer_0.*``), read from DCP's metadata."""
    from torch.distributed.checkpoint import FileSystemReader

    return list(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def inspect_sharded_checkpoint(path: str | os.PathLike, key: str, resume: bool = False) -> dict:
    """``meta.pt`` of the sharded checkpoint at ``path`` (config key ``key``) plus ``state_dict``: its model keys
    (values None), so family checks read it as a ``.ckpt``. A one-line ``UserError`` when it is incomplete."""
    p = Path(path)
    where = f"{key}={os.fspath(path)!r}"
    missing = [n for n in (DCP_METADATA, _METADATA_FILENAME) if not (p / n).is_file()]
    if missing:
        raise UserError(f"{where} is an incomplete sharded checkpoint (no {', '.join(missing)}): an interrupted copy? "
                        "Completed saves are swapped in whole")
    try:
        meta = torch.load(p / _METADATA_FILENAME, map_location="cpu", weights_only=True)
        keys = sharded_tensor_keys(p)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported as what it is
        raise UserError(f"{where}: the sharded checkpoint cannot be read ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    prefix = "state_dict."
    meta["state_dict"] = {k[len(prefix):]: None for k in keys if k.startswith(prefix)}
    if resume and ("loops" not in meta or not any(k.startswith("optimizer_") for k in keys)):
        raise UserError(f"{where} holds model weights only, no training state to resume")
    return meta


# ------------------------------------------------------------------------------------------------------ atomic swap
def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def replace_path(tmp: Path, target: Path) -> None:
    """Put the complete ``tmp`` (file or directory) at ``target`` atomically and remove what was there."""
    if not target.exists() and not target.is_symlink():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    else:  # two renames: the previous checkpoint stays whole at .<name>.old.tmp until the new one is in place
        old = target.parent / f".{target.name}.old.tmp"
        if old.exists():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    fsync_dir(target.parent)


def stale_temporaries(target: Path) -> list[Path]:
    return [p for p in target.parent.glob(f".{target.name}.*.tmp")]


# ------------------------------------------------------------------------------------------------------ strategy
class FSDPStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` for FSDP2 alone: one data-parallel mesh dimension over every process (no tensor
    parallelism), and sharded checkpoints written atomically (module docstring). Checkpoints load through
    :func:`inspect_sharded_checkpoint` first, so a broken one is one line naming ``ckpt_path``."""

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size="auto",
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Optional[Any] = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported")
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

        target = Path(self.broadcast(str(filepath)))
        token = self.broadcast(secrets.token_hex(4))
        tmp = target.parent / f".{target.name}.{token}.tmp"
        stale = [p for p in stale_temporaries(target) if p != tmp] if self.global_rank == 0 else []
        if self.global_rank == 0:
            tmp.mkdir(parents=True)
        self.barrier("sharded_checkpoint_tmp")
        converted = {"state_dict": checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        _distributed_checkpoint_save(converted, tmp)  # every process its shards; rank 0 the DCP .metadata
        self.barrier("sharded_checkpoint_shards")
        if self.global_rank == 0:
            with atomic_output(tmp / _METADATA_FILENAME, durable=True) as t:
                torch.save(checkpoint, t)
            fsync_dir(tmp)
            replace_path(tmp, target)
            for p in stale:
                log.warning("removing %s: the temporary directory of an interrupted save of %s", p, target.name)
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.barrier("sharded_checkpoint_done")

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        if path.is_dir():
            inspect_sharded_checkpoint(path, "ckpt_path", resume=True)
        return super().load_checkpoint(path, weights_only=True)


# ------------------------------------------------------------------------------------------------------ consolidate
def read_sharded_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, in one process without a process group (plain tensors,
    keys as a ``.ckpt``'s ``state_dict``); optimizer shards are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict  # as torch's dcp_to_torch_save

    keys = {k for k in sharded_tensor_keys(path) if k.startswith("state_dict.")}
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=dcp.FileSystemReader(str(path)),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    flat = state.get("state_dict", {})
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        elif torch.is_tensor(obj):
            out[prefix[:-1]] = obj

    walk("", flat)
    return out


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        if isinstance(obj, dict):
            return {str(k): _jsonable(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [_jsonable(v) for v in obj]
        if torch.is_tensor(obj) and obj.numel() == 1:
            return obj.item()
        return None


def consolidate(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the sharded checkpoint at ``path`` as one safetensors file (module docstring), by default beside it:
    ``<run>/checkpoints/last.ckpt/`` -> ``<run>/checkpoints/last.safetensors`` (so ``generate`` finds the run's
    ``.hydra/config.yaml``). Written to a temporary name and renamed. Returns the file's path."""
    from safetensors.torch import save_file

    src = Path(path)
    meta = inspect_sharded_checkpoint(src, "checkpoint")
    dst = Path(out) if out is not None else src.with_suffix(".safetensors")
    tensors = read_sharded_state_dict(src)
    header = {k: _jsonable(meta[k]) for k in _KEEP_META if k in meta}
    with atomic_output(dst, durable=True) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"format": CONSOLIDATED_FORMAT, "checkpoint": json.dumps(header)})
    return dst


def is_consolidated(path: str | os.PathLike) -> bool:
    """A safetensors file written by :func:`consolidate` (its header says so; nothing else is read)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n < 100_000_000:
                return False
            header = json.loads(fh.read(n))
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and header.get("__metadata__", {}).get("format") == CONSOLIDATED_FORMAT


def load_consolidated(path: str | os.PathLike) -> dict[str, Any]:
    """A consolidated file as a Lightning checkpoint dict: ``state_dict`` (tensors) plus ``global_step``, ``epoch``,
    ``hyper_parameters`` and ``callbacks`` (no training state)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        info = fh.metadata() or {}
    if info.get("format") != CONSOLIDATED_FORMAT:
        raise ValueError(f"{path}: not a halfbody consolidated checkpoint (format {info.get('format')!r})")
    ckpt = json.loads(info.get("checkpoint", "{}"))
    ckpt["state_dict"] = load_file(str(path))
    return ckpt
