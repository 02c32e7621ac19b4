"""The hand-region loss (``model.hand_loss_weight``, phase ``losses: {hand: lambda}``) of both families, on a batch of
real shards: the datamodule's ``mask_hands`` marks the latent cells the term averages over."""

from __future__ import annotations

import hydra
import pytest
import torch
from config_utils import compose_train
from hydra.errors import InstantiationException

from halfbody.data.datamodule import HalfBodyDataModule
from halfbody.phases.spec import PhaseSpec

FAMILIES = ("echomimic_v2", "mirrorme")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from data_pipelines.synthetic_world import generate_shards

    shards = generate_shards(tmp_path_factory.mktemp("hand_world"), num_clips=2, num_frames=20, resolution=64,
                             workers=0, headshot_fraction=0)
    dm = HalfBodyDataModule([str(p) for p in shards], num_frames=9, resolution=64, batch_size=2, num_workers=0,
                            batches_per_epoch=1, val_samples=2)
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def _model(family: str, weight: float):
    overrides = [f"family={family}", f"model.hand_loss_weight={weight}"]
    if family == "mirrorme":
        overrides.append("model.face_loss_weight=0")  # the MSE term alone beside the hand term
    torch.manual_seed(0)
    return hydra.utils.instantiate(compose_train(overrides).model)


def _loss(model, batch):  # training=False: no condition dropout, motion frames or PhD loss, the same noise each call
    return model.diffusion_loss(batch, generator=torch.Generator().manual_seed(3), training=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_loss_is_the_error_inside_the_hand_cells(family, batch):
    base = "latent" if family == "echomimic_v2" else "mse"
    model = _model(family, 0.5)
    assert 0 < batch["mask_hands"].mean() < 0.2  # two gloves in a half-body frame
    loss, logs = _loss(model, batch)
    assert logs["hand"] != logs[base] and torch.allclose(loss, logs[base] + 0.5 * logs["hand"])
    whole = dict(batch, mask_hands=torch.ones_like(batch["mask_hands"]))  # hands = the whole valid frame
    loss_whole, logs_whole = _loss(model, whole)
    assert torch.allclose(logs_whole["hand"], logs_whole[base]) and torch.allclose(loss_whole, 1.5 * logs_whole[base])
    model.hand_loss_weight = 0.0
    loss_off, logs_off = _loss(model, batch)
    assert "hand" not in logs_off and torch.allclose(loss_off, logs[base])


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_loss_phases_and_errors(family, batch):
    model = _model(family, 0.5)
    with pytest.raises(KeyError, match="mask_hands"):
        _loss(model, {k: v for k, v in batch.items() if k != "mask_hands"})
    spec = PhaseSpec.from_config({"name": "hands", "steps": 1, "trainable": ["all"], "losses": {"hand": 2}})
    model.check_phase_losses(spec)
    model.configure_phase_losses(spec.losses)
    assert model.hand_loss_weight == 2.0
    model.configure_phase_losses({"hand": None})
    assert model.hand_loss_weight == 0.0
    model.configure_phase_losses({})  # a phase without the key: the configured weight
    assert model.hand_loss_weight == 0.5
    bad = PhaseSpec.from_config({"name": "bad", "steps": 1, "trainable": ["all"], "losses": {"hand": -1}})
    with pytest.raises(ValueError, match="losses.hand=-1"):
        model.check_phase_losses(bad)
    with pytest.raises(InstantiationException, match="model.hand_loss_weight=-1 must be a number >= 0"):
        _model(family, -1)
