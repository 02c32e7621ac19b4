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
                         "callbacks=none", "trainer.max_steps=1", "trainer.limit_val_batches=0",
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
    assert seen == [] and len(steps) == 1 and all(np.isfinite(steps))


def test_whisper_log_mel_on_the_device_equals_the_feature_extractor():
    """``mel: transformers`` computes WhisperFeatureExtractor's log-mel with torch ops on the encoder's device."""
    from halfbody.models.audio_encoders import WhisperAudioEncoder

    enc = WhisperAudioEncoder(None, random_config=dict(
        d_model=16, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_mel_bins=80, max_source_positions=1500))
    audio = torch.randn(3, 24000, generator=torch.Generator().manual_seed(0)) * 0.1
    audio[1, 9000:] = 0.0  # a padded context: its own floor
    audio[2] *= 30.0
    ours = enc.log_mel(audio)
    reference = enc.feature_extractor([a for a in audio.numpy()], sampling_rate=16000, return_tensors="pt",
                                      padding="max_length", max_length=enc.window_samples).input_features
    assert ours.shape == reference.shape == (3, 80, 3000)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_phd_bands_from_host_timesteps_give_the_same_loss():
    """The PhD loss picks the decoded samples and each band's samples from host integers exactly as from the tensor."""
    from halfbody.losses.phd import PhDLoss
    from halfbody.models.autoencoders import PatchAutoencoder
    from halfbody.models.schedulers import VPredictionDDIM

    torch.manual_seed(0)
    phd = PhDLoss.tiny(schedule={"S1": ["pose", 0.1], "S2": ["detail", 0.1], "S3": ["low", 0.1]})
    ae = PatchAutoencoder(patch_size=4)
    sched = VPredictionDDIM(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    video = torch.rand(4, 2, 3, 32, 32) * 2 - 1
    x_t = ae.encode(video) + 0.1 * torch.randn(4, 2, ae.latent_channels, 8, 8)
    v = torch.randn_like(x_t)
    t_host = [950, 500, 100, 20]  # S1, S2, S3, S3
    t = torch.tensor(t_host)
    a = phd(x_t, v, t, video, decode=ae.decode, scheduler=sched)
    b = phd(x_t, v, t, video, decode=ae.decode, scheduler=sched, t_host=t_host)
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    assert a.decoded == b.decoded == 4 and a.logs.keys() == b.logs.keys()
    for k in a.logs:
        torch.testing.assert_close(a.logs[k], b.logs[k], rtol=0, atol=0)
    with pytest.raises(ValueError, match="t_host"):
        phd(x_t, v, t, video, decode=ae.decode, scheduler=sched, t_host=[1000, 0, 0, 0])
