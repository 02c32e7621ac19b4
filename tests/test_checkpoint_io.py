"""Checkpoint saves survive a kill mid-save; unusable checkpoints are named in one line (halfbody.utils.checkpoint_io)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.io import TorchCheckpointIO

from halfbody.utils.checkpoint_io import (AtomicCheckpointIO, check_checkpoint_family, checkpoint_family,
                                          inspect_checkpoint, previous_good_checkpoint)
from halfbody.utils.errors import UserError
from halfbody.utils.hydra import CONFIG_DIR


def _state(step: int, n: int = 50_000) -> dict:
    """A Lightning-shaped checkpoint (~n floats) of the EchoMimicV2 family."""
    g = torch.Generator().manual_seed(step)
    return {"epoch": 0, "global_step": step, "pytorch-lightning_version": "2.6.6",
            "state_dict": {"network.denoising_unet.w": torch.randn(n, generator=g),
                           "network.reference_net.w": torch.randn(8, generator=g)},
            "loops": {}, "optimizer_states": [], "lr_schedulers": [], "callbacks": {}}


def _load_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def _simulate_other_filesystem(monkeypatch):
    """Renames between two directories fail with EXDEV (as across filesystems), so ``shutil.move`` copies; the
    copy is killed halfway through (what a SIGKILL during the copy leaves)."""
    real_rename, real_replace = os.rename, os.replace

    def cross_device(real):
        def rename(src, dst, *a, **kw):
            if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
                raise OSError(errno.EXDEV, "Invalid cross-device link", src)
            return real(src, dst, *a, **kw)
        return rename

    def killed_copy(src, dst, *a, **kw):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt("killed mid-copy")

    monkeypatch.setattr(os, "rename", cross_device(real_rename))
    monkeypatch.setattr(os, "replace", cross_device(real_replace))
    monkeypatch.setattr(shutil, "copyfile", killed_copy)


def test_lightning_default_io_truncates_last_ckpt_across_filesystems(tmp_path, monkeypatch):
    """The bug this plugin fixes: Lightning's writer stages in the system temp dir, so the final move is a copy."""
    last = tmp_path / "last.ckpt"
    TorchCheckpointIO().save_checkpoint(_state(1), last)
    _simulate_other_filesystem(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        TorchCheckpointIO().save_checkpoint(_state(2), last)
    with pytest.raises(UserError, match="truncated"):
        inspect_checkpoint(last, "ckpt_path")


def test_kill_during_copy_keeps_previous_last_ckpt(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_state(1), last)
    _simulate_other_filesystem(monkeypatch)
    io.save_checkpoint(_state(2), last)  # never crosses a filesystem: the temporary file is next to last.ckpt
    assert _load_step(last) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_writer_failing_mid_write_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_state(1), last)
    real_save = torch.save

    def half_then_fail(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint(_state(2), last)
    monkeypatch.setattr(torch, "save", real_save)
    assert _load_step(last) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    io.save_checkpoint(_state(3), last)
    assert _load_step(last) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert (last.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's 0600


def test_interrupted_save_temporaries_are_removed_by_the_next_save(tmp_path, caplog):
    last = tmp_path / "last.ckpt"
    stale = tmp_path / ".last.ckpt.k1ll3d.tmp"  # what a save killed by SIGKILL leaves
    stale.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    other = tmp_path / ".step_0000003.ckpt.abc.tmp"  # another file's save: not ours to remove
    other.write_bytes(b"x")
    AtomicCheckpointIO().save_checkpoint(_state(1), last)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "last.ckpt"]
    assert "interrupted save of last.ckpt" in caplog.text


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


_KILLED_WRITER = r"""
import sys, time, torch
from halfbody.utils.checkpoint_io import AtomicCheckpointIO
class Slow:  # pickled slowly, so the parent can SIGKILL the writer while the temporary file is being written
    def __reduce__(self):
        print("writing", flush=True); time.sleep(60); return (int, (0,))
state = torch.load(sys.argv[1], weights_only=True)
state["slow"] = Slow()
AtomicCheckpointIO().save_checkpoint(state, sys.argv[1])
"""


@pytest.mark.slow  # a Python start-up with torch + lightning (~4 s)
def test_sigkill_during_save_keeps_previous_last_ckpt(tmp_path):
    last = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_state(1), last)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(last)], stdout=subprocess.PIPE, text=True,
                            env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert any(p.name.startswith(".last.ckpt.") for p in tmp_path.iterdir())  # the temporary file, mid-write
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
    assert _load_step(last) == 1


def test_trainer_configs_use_atomic_checkpoint_io():
    import hydra

    for name in ("default", "cpu", "gpu", "ddp"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"trainer={name}", "logger=none"])
        targets = [p["_target_"] for p in cfg.trainer.plugins]
        assert targets == ["halfbody.utils.checkpoint_io.AtomicCheckpointIO"], name
    trainer = hydra.utils.instantiate(cfg.trainer, accelerator="cpu", devices=2, logger=False, callbacks=[],
                                      default_root_dir=None)  # ddp on CPU: the strategy takes the plugin
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_trainer_writes_last_ckpt_through_the_plugin(tmp_path, monkeypatch):
    """``ModelCheckpoint(save_last=True)`` writes last.ckpt via Trainer.save_checkpoint -> the plugin."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.network = torch.nn.Linear(2, 1)

        def training_step(self, batch, idx):
            return self.network(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    saved: list[str] = []
    real = AtomicCheckpointIO.save_checkpoint

    def recording(self, checkpoint, path, storage_options=None):
        saved.append(os.path.basename(path))
        return real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", recording)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    ckpt_dir = tmp_path / "checkpoints"
    trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)])
    trainer.fit(Tiny(), data)
    assert "last.ckpt" in saved
    assert _load_step(ckpt_dir / "last.ckpt") == 2
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("case", ["empty", "cut", "text", "dir", "missing", "weights_only", "pickle"])
def test_unusable_checkpoint_is_one_line_naming_the_file(tmp_path, case):
    good = tmp_path / "step_0000003.ckpt"
    torch.save(_state(3), good)
    bad = tmp_path / "last.ckpt"
    data = good.read_bytes()
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "cut":
        bad.write_bytes(data[: len(data) // 3])
    elif case == "text":
        bad.write_text("not a checkpoint\n")
    elif case == "dir":
        bad.mkdir()
    elif case == "weights_only":
        state = _state(4)
        del state["optimizer_states"], state["loops"]
        torch.save(state, bad)
    elif case == "pickle":
        torch.save({"state_dict": {}, "obj": Path("x")}, bad)  # a non-allowlisted class
    with pytest.raises(UserError) as err:
        inspect_checkpoint(bad, "ckpt_path", resume=True)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"ckpt_path={str(bad)!r}")
    expected = {"empty": "is empty", "cut": "is truncated", "text": "not a Lightning checkpoint",
                "dir": "is a directory", "missing": "does not exist", "weights_only": "model.init_checkpoint",
                "pickle": "refuses"}[case]
    assert expected in msg
    if case in ("empty", "cut"):  # points to the newest checkpoint that loads
        assert f"newest good checkpoint in that folder is {str(good)!r}" in msg


def test_previous_good_checkpoint_skips_broken_ones(tmp_path):
    old, newer, broken = tmp_path / "step_1.ckpt", tmp_path / "step_2.ckpt", tmp_path / "last.ckpt"
    torch.save(_state(1), old)
    time.sleep(0.01)
    newer.write_bytes(old.read_bytes()[:100])  # newer, but truncated
    os.utime(newer, (time.time() + 5, time.time() + 5))
    broken.write_bytes(b"")
    assert previous_good_checkpoint(broken) == old


def test_family_is_told_from_state_dict_keys():
    emv = _state(1)
    mm = {"state_dict": {"network.transformer.blocks.0.w": torch.zeros(1)}}
    assert checkpoint_family(emv) == "echomimic_v2" and checkpoint_family(mm) == "mirrorme"
    check_checkpoint_family(emv, "a.ckpt", "ckpt_path", "halfbody.echomimic_v2.module.EchoMimicV2Module")
    with pytest.raises(UserError, match=r"model.init_checkpoint='a.ckpt' is a checkpoint of family echomimic_v2, .* family mirrorme"):
        check_checkpoint_family(emv, "a.ckpt", "model.init_checkpoint", "halfbody.mirrorme.module.MirrorMeModule")
    with pytest.raises(UserError, match="no halfbody network weights"):
        check_checkpoint_family({"state_dict": {"w": torch.zeros(1)}}, "a.ckpt", "ckpt_path",
                                "halfbody.mirrorme.module.MirrorMeModule")
