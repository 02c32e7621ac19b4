"""EMA weights for sampling (issue 11): the average follows the documented recursion, validation samples from it,
checkpoints hold it as the model's weights, and a resumed run trains on the raw weights exactly as before."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from halfbody.callbacks.ema import EMAWeights


class _Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.network = nn.Linear(3, 2)
        self.seen_in_validation: list[torch.Tensor] = []
        self.trajectory: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self.network(x) - y).pow(2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.trajectory.append(self.network.weight.detach().clone())

    def validation_step(self, batch, batch_idx):
        self.seen_in_validation.append(self.network.weight.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g)
    return DataLoader(TensorDataset(x, x[:, :2] * 3.0), batch_size=2)


def _trainer(tmp_path, max_steps: int, ema: EMAWeights | None, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, callbacks=[ema] if ema else [], logger=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                     val_check_interval=max_steps, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                     accelerator="cpu",
                     enable_checkpointing=False, **kw)


def _expected_ema(initial: torch.Tensor, trajectory: list[torch.Tensor], decay: float) -> torch.Tensor:
    e = initial.clone()
    for n, w in enumerate(trajectory):
        d = min(decay, (1 + n) / (10 + n))
        e = d * e + (1 - d) * w
    return e


def test_ema_recursion_validation_and_checkpoint(tmp_path):
    module = _Module()
    initial = module.network.weight.detach().clone()
    ema = EMAWeights(decay=0.9)
    trainer = _trainer(tmp_path, 4, ema)
    trainer.fit(module, _data(), _data())
    expected = _expected_ema(initial, module.trajectory, 0.9)
    raw = module.trajectory[-1]
    assert not torch.allclose(expected, raw, atol=1e-4)  # the average differs from the last weights
    # validation sampled with the EMA weights, and training got its raw weights back afterwards
    assert torch.allclose(module.seen_in_validation[-1], expected, atol=1e-6)
    assert torch.allclose(module.network.weight, raw)
    # the checkpoint's model weights are the EMA ones; the raw ones travel with it
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.allclose(state["state_dict"]["network.weight"], expected, atol=1e-6)
    assert torch.allclose(state["ema_raw_weights"]["network.weight"], raw)
    assert torch.allclose(module.network.weight, raw)  # saving does not touch the module


def test_resume_trains_on_the_raw_weights_exactly(tmp_path):
    """A run with EMA resumed from its checkpoint (model weights = the average) trains exactly as the same run without
    EMA resumed from its own checkpoint: the raw weights come back, the average goes on from its saved value."""
    finals = {}
    for use_ema in (False, True):
        first = _Module()
        t1 = _trainer(tmp_path / f"a{use_ema}", 4, EMAWeights(decay=0.9) if use_ema else None)
        t1.fit(first, _data())
        t1.save_checkpoint(tmp_path / f"half{use_ema}.ckpt")
        resumed = _Module()
        ema = EMAWeights(decay=0.9) if use_ema else None
        _trainer(tmp_path / f"b{use_ema}", 8, ema).fit(resumed, _data(), ckpt_path=tmp_path / f"half{use_ema}.ckpt")
        finals[use_ema] = (resumed.network.weight.detach().clone(), resumed.trajectory)
    assert len(finals[True][1]) == 4
    for a, b in zip(finals[False][1], finals[True][1]):
        assert torch.equal(a, b)
    assert ema.updates == 8


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="callbacks.ema.decay=1.5"):
        EMAWeights(decay=1.5)
