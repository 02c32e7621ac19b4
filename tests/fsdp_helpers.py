"""Callbacks the FSDP tests add to real training runs (``+callbacks.<name>._target_=fsdp_helpers.<Class>``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch


def _save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StepRecorder(L.Callback):
    """Writes ``<dirpath>/rank<R>_step<G>.pt`` per training step: the batch as this rank received it, the seed of
    the step's generator, the loss, and what FSDP did to the module (sharded network, frozen groups' gradients and
    optimizer state)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.current: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        keep = {k: v for k, v in batch.items() if torch.is_tensor(v) or k in ("key", "host")}
        self.current = {"step": int(trainer.global_step), "batch": keep,
                        "seed": int(pl_module.step_generator().initial_seed())}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from torch.distributed.fsdp import FSDPModule

        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        opt = trainer.optimizers[0]
        groups = pl_module.module_groups()
        frozen = {name: [p for m in mods for p in m.parameters()] for name, mods in groups.items()
                  if not any(p.requires_grad for m in mods for p in m.parameters())}
        params = list(pl_module.network.parameters())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
        self.current.update(
            loss=float(loss.detach()), sharded=isinstance(pl_module.network, FSDPModule),
            local_numel=int(local), numel=int(sum(p.numel() for p in params)),
            frozen={name: {"grads": sum(p.grad is not None for p in ps), "states": sum(p in opt.state for p in ps)}
                    for name, ps in frozen.items()},
            trainable=sorted(name for name, mods in groups.items()
                             if any(p.requires_grad for m in mods for p in m.parameters())),
            param_dtype=str(next(iter(pl_module.network.parameters())).dtype))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        _save(self.current, self.dirpath / f"rank{trainer.global_rank}_step{self.current['step']}.pt")


class KillAt(L.Callback):
    """SIGKILL the whole process group (every rank) once ``global_step`` reaches ``step``, after all ranks have
    finished the step: a hard kill, as a lost node or a pre-empted job."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.strategy.barrier()
            if trainer.global_rank == 0:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            trainer.strategy.barrier()  # the other ranks wait here for the signal


def load_steps(dirpath: Path) -> dict[tuple[int, int], dict]:
    """``{(rank, step): record}`` of a :class:`StepRecorder` directory."""
    out = {}
    for p in Path(dirpath).glob("rank*_step*.pt"):
        rank, step = p.stem[4:].split("_step")
        out[int(rank), int(step)] = torch.load(p, map_location="cpu", weights_only=True)
    return out
