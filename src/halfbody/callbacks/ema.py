"""Exponential moving average (EMA) of the network weights, used for sampling (both families).

Diffusion models are usually sampled from an EMA of their weights (DDPM, LDM, SD; LTX-Video's trainer keeps one):
the average removes the step-to-step jitter that a few thousand noisy small-batch updates leave, which on a short
CPU run is the difference between a clean and a grainy sample. :class:`EMAWeights` keeps, for every trainable
parameter of ``pl_module.network``,

    ema <- decay_t * ema + (1 - decay_t) * param,   decay_t = min(decay, (1 + n) / (10 + n))

after each optimizer step ``n`` (the warm-up of ``decay_t``, as in TensorFlow's ExponentialMovingAverage, lets a
short run's average forget its random initial weights). Frozen parameters are averaged too when they train later
(a curriculum phase unfreezing a group): the average of a parameter that has not changed is itself.

- **Validation samples** (and the oracle metrics) use the EMA weights: they are swapped in for the validation loop
  and swapped back afterwards, so training continues on the raw weights.
- **Checkpoints hold the EMA weights as the model's weights** (``state_dict``), so every reader of a checkpoint
  (``generate``, the learning check, ``init_checkpoint``) samples from the average without knowing about it; the raw
  training weights are kept in this callback's state and put back on resume, so a resumed run continues exactly.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class EMAWeights(L.Callback):
    """Args:
        decay: the EMA decay (0.999: an average over roughly the last 1000 steps).
        warmup: use the ``(1 + n) / (10 + n)`` warm-up of the decay.
        every_n_steps: update every this many optimizer steps (the decay is applied per update).
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, every_n_steps: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay!r} must lie in [0, 1)")
        if every_n_steps < 1:
            raise ValueError(f"callbacks.ema.every_n_steps={every_n_steps!r} must be >= 1")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.every_n_steps = int(every_n_steps)
        self.updates = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self.swapped = False  # True while the module holds the EMA weights (and ``ema`` the raw ones)
        self._resume_raw: dict[str, torch.Tensor] | None = None  # training weights read from a checkpoint

    # ------------------------------------------------------------------------------------------ helpers
    @staticmethod
    def _params(pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {f"network.{k}": v for k, v in pl_module.network.state_dict(keep_vars=True).items()
                if torch.is_floating_point(v)}

    def _init(self, pl_module: L.LightningModule) -> None:
        self.ema = {k: v.detach().clone() for k, v in self._params(pl_module).items()}

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the module's network weights with the EMA ones (called in pairs)."""
        if self.ema is None:
            return
        params = self._params(pl_module)
        for k, p in params.items():
            tmp = p.detach().clone()
            p.copy_(self.ema[k])
            self.ema[k] = tmp

    # ------------------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ema is None:
            self._init(pl_module)

    @torch.no_grad()
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._resume_raw is not None:  # the checkpoint's state_dict held the EMA weights: train on the raw ones
            for k, p in self._params(pl_module).items():
                if k in self._resume_raw:
                    p.copy_(self._resume_raw[k])
            self._resume_raw = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if self.ema is None:
            self._init(pl_module)
        d = self.current_decay()
        for k, p in self._params(pl_module).items():
            e = self.ema[k]
            if e.device != p.device:
                e = self.ema[k] = e.to(p.device)
            e.lerp_(p.detach(), 1.0 - d)
        self.updates += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and self.ema is not None and not self.swapped:
            self._swap(pl_module)
            self.swapped = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.swapped:
            self._swap(pl_module)
            self.swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """The checkpoint's model weights become the EMA weights; the raw ones go into this callback's state."""
        if self.ema is None:
            return
        state = checkpoint["state_dict"]
        swapped = self.swapped  # saved during validation: the module holds the EMA weights now
        raw, avg = {}, {}
        for k in self.ema:
            if k in state:
                module_value = state[k].detach().clone()
                other = self.ema[k].detach().clone()
                raw[k], avg[k] = (other, module_value) if swapped else (module_value, other)
        state.update(avg)
        checkpoint["ema_raw_weights"] = raw

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        raw = checkpoint.get("ema_raw_weights")
        if raw:
            self.ema = {k: v.detach().clone() for k, v in checkpoint["state_dict"].items() if k in raw}
            self._resume_raw = {k: v.detach().clone() for k, v in raw.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict.get("updates", 0))
