"""The training step never reads a device tensor back to the host (issue 13 §4: no host synchronisations).

On a GPU, ``tensor.item()``, ``float(tensor)``, ``int(tensor)``, ``bool(tensor)``, ``.tolist()``, ``.cpu()``,
``.numpy()`` and ``nonzero`` wait for every queued kernel. CPU runs cannot see a synchronisation, so the check is
structural: during ``training_step`` of both families (the real Trainer, tiny presets, real shards), every such
read-back raises. Host values the step needs (the fps, the audio-context offsets and lengths) are read in
``transfer_batch_to_device`` while the batch is still in host memory; random decisions that set shapes or branches
(condition dropout, MirrorMe's motion frames, EchoMimicV2's timesteps for the PhD bands) are drawn on the host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from config_utils import compose_train
from shard_utils import make_sample, write_shards

_READ_BACKS = ("item", "tolist", "numpy", "cpu", "nonzero", "__float__", "__int__", "__bool__", "__index__")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def forbid_read_backs(seen: list[str]) -> Iterator[None]:
    """Every tensor -> host read raises (and is recorded) inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in _READ_BACKS}

    def guard(name: str):
        def raiser(self, *args, **kwargs):
            seen.append(name)
            raise HostRead(f"torch.Tensor.{name} in the training step (a device read-back)")
        return raiser

    for name in _READ_BACKS:
        setattr(torch.Tensor, name, guard(name))
    saved_nonzero = torch.nonzero
    torch.nonzero = guard("torch.nonzero")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = saved_nonzero


def test_the_guard_catches_the_old_per_step_fps_read():
    batch = {"fps": torch.full((2,), 25.0)}
    seen: list[str] = []
    with forbid_read_backs(seen), pytest.raises(HostRead):
        float(batch["fps"][0])  # what batch_fps did every step
    assert seen == ["__float__"]
    assert float(batch["fps"][0]) == 25.0  # restored


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sync_shards")
    write_shards(root, lambda i: make_sample(f"s{i}", num_frames=12, height=64, width=64), num_samples=4,
                 per_shard=4)
    return root


@pytest.mark.parametrize("family,extra", [
    # PhD loss on (tiny stand-ins), every band active; condition dropout drawn per sample
    ("echomimic_v2", ["model.condition_dropout.ref=0.5", "model.condition_dropout.uncond=0.5", "data.num_frames=4"]),
    # motion frames always, face-gated audio through the causal audio encoder's past context
    ("mirrorme", ["model.motion_frames.probability=1", "model.condition_dropout.ref=0.5"]),
])
def test_training_step_reads_nothing_back(tmp_path, shards, family, extra):
    import lightning as L
    import hydra

    cfg = compose_train([f"family={family}", "data=shards", f"data.train_shards={shards}", "data.val_shards=null",
                         "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=0", "logger=none",
                         "callbacks=none", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                         "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
                         "trainer.log_every_n_steps=1", *extra], tmp_path)
    L.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, callbacks=[])
    seen: list[str] = []
    steps: list[float] = []
    step = model.training_step

    def guarded(batch, batch_idx):
        assert batch["host"]["fps"] == 25.0 and len(batch["host"]["audio_context_length"]) == 2
        with forbid_read_backs(seen):
            loss = step(batch, batch_idx)
        steps.append(float(loss.detach()))
        return loss

    model.training_step = guarded
    trainer.fit(model, datamodule=datamodule)
    assert seen == [] and len(steps) == 2 and all(np.isfinite(steps))
