"""Checkpoints that survive a kill mid-save, and one-line errors for checkpoints that cannot be used.

:class:`AtomicCheckpointIO` is the Lightning ``CheckpointIO`` plugin of every trainer config (``conf/trainer``). It
writes a checkpoint to a temporary file in the checkpoint's own directory, fsyncs it, renames it over the target and
fsyncs the directory. The previous ``last.ckpt`` stays complete until the new one is. (Lightning's default writes
through fsspec, whose local transaction writes into the system temp directory and then ``shutil.move``s the file:
across filesystems that move is a copy straight into ``last.ckpt``, so a kill mid-copy leaves it truncated.)
``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` through the same plugin (``Trainer.save_checkpoint``); only
``save_last="link"`` links instead.

:func:`inspect_checkpoint` reads a checkpoint cheaply (``torch.load(weights_only=True, mmap=True)``: the pickle
only, tensors mapped lazily) and raises a :class:`~halfbody.utils.errors.UserError` naming the config key and the
file when it is missing, empty, truncated, not a Lightning checkpoint or not loadable safely; for a truncated or
unreadable file the message points to the newest loadable checkpoint in the same folder. It also reads a sharded
checkpoint directory (``trainer=fsdp``; its ``meta.pt`` and tensor keys, when ``sharded_ok``) and a consolidated
safetensors file (``python -m halfbody.consolidate``), see :mod:`halfbody.utils.sharded_checkpoint`.
"""

from __future__ import annotations

import glob
import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from halfbody.utils.errors import UserError
from halfbody.utils.io import atomic_output

log = logging.getLogger(__name__)

# Lightning's special ``ckpt_path`` values (resolved by the Trainer, not files).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _temporaries(path: Path) -> list[Path]:
    """Temporary files of saves of ``path`` (``atomic_output``'s names: ``.<name>.<random>.tmp``)."""
    try:
        return [p for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if p.is_file()]
    except OSError:
        return []


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s directory: fsync, rename, fsync the folder.

    Temporary files of earlier saves of the same ``path`` that were killed mid-write (they existed before this save
    began) are removed once this save is complete, each reported in the log.
    """
    path = Path(path)
    stale = _temporaries(path)
    with atomic_output(path, durable=True) as tmp:
        torch.save(obj, tmp)
    for p in stale:
        log.warning("removing %s: the temporary file of an interrupted save of %s", p, path.name)
        p.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable, and whose loads fail in one line.

    Remote paths (``s3://`` ...) keep Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        if _is_local_file_protocol(path):
            inspect_checkpoint(path, "ckpt_path")  # a UserError naming the file, before Lightning's own
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _problem(path: Path) -> tuple[str, dict | None]:
    """``("", checkpoint)`` when ``path`` loads safely, else ``(what is wrong, None)``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        return f"cannot be read ({_first_line(e)})", None
    if size == 0:
        return "is empty (an interrupted save?)", None
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            return f"is truncated ({size} bytes, the end of the archive is missing: an interrupted save?)", None
        if not head.startswith(b"\x80"):  # a legacy (pre-zip) torch pickle starts with the pickle protocol byte
            return "is not a Lightning checkpoint (not a PyTorch checkpoint archive)", None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=head.startswith(b"PK"))
    except pickle.UnpicklingError as e:
        return ("holds pickled objects that safe loading (torch.load weights_only=True) refuses: not a halfbody "
                f"checkpoint, or an unsafe file ({_first_line(e)})"), None
    except Exception as e:  # noqa: BLE001 - any failure to read is reported as what it is
        return f"is corrupt or not a checkpoint ({_first_line(e)})", None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        return "is not a Lightning checkpoint (it has no state_dict)", None
    return "", ckpt


def previous_good_checkpoint(path: str | os.PathLike, limit: int = 20) -> Path | None:
    """The newest other ``*.ckpt`` in ``path``'s folder that loads (at most ``limit`` tried), or None."""
    path = Path(path)
    try:
        others = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()]
    except OSError:
        return None
    others.sort(key=lambda p: (p.stat().st_mtime, p.name), reverse=True)
    for p in others[:limit]:
        if not _problem(p)[0]:
            return p
    return None


def inspect_checkpoint(path: str | os.PathLike, key: str, resume: bool = False, sharded_ok: bool = False) -> dict:
    """The checkpoint at ``path`` (config key ``key``), loaded safely with lazily mapped tensors.

    Raises a one-line ``UserError`` naming ``key`` and ``path`` when the file is missing, a directory, empty,
    truncated, corrupt, not a Lightning checkpoint, refused by safe loading, or (``resume``) holds no training state.
    A sharded checkpoint (``trainer=fsdp``'s directory) is read (its ``meta.pt`` and tensor keys) only when
    ``sharded_ok`` (resuming under a sharded strategy), else refused with the two ways to use it. A consolidated
    safetensors file (``python -m halfbody.consolidate``) reads as a checkpoint without training state.
    """
    from halfbody.utils import sharded_checkpoint as sharded

    p = Path(os.path.expanduser(os.fspath(path)))
    where = f"{key}={os.fspath(path)!r}"
    if not p.exists():
        raise UserError(f"{where} does not exist: expected a Lightning .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    if p.is_dir() and sharded.is_sharded_checkpoint(p):
        if not sharded_ok:
            raise UserError(f"{where} is a sharded checkpoint (a torch.distributed.checkpoint directory written under "
                            "trainer=fsdp): resume it with trainer=fsdp (any number of devices), or consolidate it "
                            f"into one file first: python -m halfbody.consolidate {os.fspath(path)}")
        return sharded.inspect_sharded_checkpoint(p, key, resume=resume)
    if p.is_dir():
        raise UserError(f"{where} is a directory: expected a Lightning .ckpt file (e.g. <run>/checkpoints/last.ckpt)")
    if sharded.is_consolidated(p):
        if resume:
            raise UserError(f"{where} is a consolidated checkpoint (weights only, no training state to resume); to "
                            "resume, give the sharded checkpoint directory with trainer=fsdp")
        try:
            return sharded.load_consolidated(p)
        except Exception as e:  # noqa: BLE001 - any failure to read is reported as what it is
            raise UserError(f"{where}: the consolidated checkpoint cannot be read ({_first_line(e)})") from None
    problem, ckpt = _problem(p)
    if problem:
        hint = ""
        if "truncated" in problem or "empty" in problem or "corrupt" in problem:
            prev = previous_good_checkpoint(p)
            hint = (f"; the newest good checkpoint in that folder is {str(prev)!r}" if prev is not None
                    else "; no other loadable checkpoint in that folder")
        raise UserError(f"{where} {problem}{hint}")
    assert ckpt is not None
    if resume and ("optimizer_states" not in ckpt or "loops" not in ckpt):
        raise UserError(f"{where} holds model weights only, no training state to resume; to start from these "
                        f"weights use model.init_checkpoint={os.fspath(path)!r}")
    return ckpt


def _holds(keys: list[str], prefixes: tuple[str, ...]) -> bool:
    return bool(prefixes) and all(any(k.startswith(pre) for k in keys) for pre in prefixes)


def checkpoint_family(ckpt: dict) -> str | None:
    """The family (``echomimic_v2`` / ``mirrorme``) whose network weights ``ckpt`` holds (each family's
    ``NETWORK_KEY_PREFIXES``), or None."""
    from halfbody.models.families import family_classes

    keys = list(ckpt.get("state_dict", {}))
    return next((cls.FAMILY for cls in family_classes() if _holds(keys, cls.NETWORK_KEY_PREFIXES)), None)


def check_checkpoint_family(ckpt: dict, path: str | os.PathLike, key: str, model_target: str | None) -> None:
    """Raise a one-line ``UserError`` when ``ckpt`` holds another family's network than ``model_target`` builds."""
    from halfbody.models.families import family_class

    cls = family_class(model_target)
    if cls is None:
        return  # a module we do not know: Lightning's strict loading will tell
    expected = (cls.FAMILY, cls.NETWORK_KEY_PREFIXES)
    found = checkpoint_family(ckpt)
    where = f"{key}={os.fspath(path)!r}"
    if found is None:
        raise UserError(f"{where} holds no halfbody network weights (no state_dict keys under "
                        f"{', '.join(expected[1])}): not a checkpoint of this framework's {expected[0]} family")
    if found != expected[0]:
        raise UserError(f"{where} is a checkpoint of family {found}, but this run builds family {expected[0]} "
                        f"({model_target}); use family={found} or a {expected[0]} checkpoint")


def save_final_last(trainer: Any) -> None:
    """A run that stops between checkpoint intervals (``trainer.max_time``, or ``max_steps`` off the interval) still
    ends with ``last.ckpt`` at its final step: ModelCheckpoint saves only every ``every_n_train_steps``. The trainer's
    checkpoint IO plugin writes it atomically."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cb = trainer.checkpoint_callback
    if not isinstance(cb, ModelCheckpoint) or not cb.save_last or cb.dirpath is None or trainer.global_step == 0:
        return
    if trainer.global_step > cb._last_global_step_saved:  # noqa: SLF001 (Lightning keeps it private)
        path = os.path.join(cb.dirpath, f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}")
        trainer.save_checkpoint(path)
        log.info("saved %s at the final step %d", path, trainer.global_step)
