"""The real training entry point: Hydra composition, a short fit, a 2-job multirun and a 2-process CPU DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from config_utils import compose_train
from halfbody.train import train
from halfbody.utils.hydra import REPO_ROOT

# Small-but-real settings shared by the runs below: the tiny preset on a small synthetic world.
FAST = [
    "logger=none",
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "data.num_workers=0",
    "data.batch_size=1",
    "model.num_inference_steps=2",
]


def _world_overrides(world: Path) -> list[str]:
    """A small synthetic world (the default one takes about 15 s to generate), generated on first use."""
    return [f"paths.data_dir={world}", "data.prepare.train_clips=8", "data.prepare.val_clips=2",
            "data.prepare.num_identities=4", "data.prepare.resolution=64", "data.prepare.num_frames=20",
            "data.prepare.workers=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A data dir whose synthetic world the datamodule's prepare step generates on first use."""
    return tmp_path_factory.mktemp("data")


_compose = compose_train


def test_default_config_composes_to_tiny_echomimic_on_synthetic_world(tmp_path):
    cfg = _compose([], tmp_path)
    assert cfg.model._target_.endswith("EchoMimicV2Module")
    assert "tiny" in cfg.model.network._target_
    assert cfg.data.synthetic is True
    assert cfg.logger.wandb.offline is True
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["paths"]["output_dir"] == str(tmp_path)


@pytest.mark.parametrize("family", ["echomimic_v2", "mirrorme"])
def test_short_fit_writes_checkpoint_and_sample_video(tmp_path, world, family):
    """Both families, interchangeably, on the same datamodule and shards: checkpoint, sample mp4s, oracle metrics."""
    cfg = _compose(FAST + _world_overrides(world) + [f"family={family}"], tmp_path)
    assert cfg.model._target_.lower().endswith(f"{family.replace('_', '')}module")
    metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    videos = list((tmp_path / "samples").glob("*.mp4"))
    assert videos, "no sample video written"
    from halfbody.data.media import read_video, read_video_audio

    frames, fps = read_video(videos[0])
    assert frames.shape[2] == 3 * frames.shape[1]  # reference | generated | ground truth
    audio, rate = read_video_audio(videos[0])
    assert audio.size > 0 and rate == 16000
    assert "train/loss" in metrics and "val/loss" in metrics
    assert any(k.startswith("val/oracle/") for k in metrics)


def _run(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HALFBODY_ROOT": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "halfbody.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_cfg_job_prints_resolved_config(tmp_path, monkeypatch, capsys):
    """Hydra's ``--cfg job --resolve`` through the real ``@hydra.main`` entry, in this process."""
    from halfbody.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["halfbody.train", "--cfg", "job", "--resolve"])
    main()
    out = capsys.readouterr().out
    assert "EchoMimicV2Module" in out and "${" not in out
    assert not (tmp_path / "logs").exists()  # printing the config runs nothing


def test_two_job_multirun(tmp_path, world, monkeypatch):
    """A Hydra multirun (``-m``, the basic launcher) through the real ``@hydra.main`` entry, in this process."""
    from halfbody.train import main

    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["halfbody.train", "-m", *FAST, *_world_overrides(world),
                                      "callbacks.sample_videos.oracle_metrics=false", "model.optimizer.lr=1e-4,3e-4",
                                      f"hydra.sweep.dir={sweep}"])
    main()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file()
        lrs.append(OmegaConf.load(job / ".hydra" / "config.yaml").model.optimizer.lr)
    assert lrs == [1e-4, 3e-4]


def test_two_process_cpu_ddp_ranks_see_different_samples(tmp_path, world):
    keys_dir = tmp_path / "keys"
    run_dir = tmp_path / "run"
    _run([*FAST, *_world_overrides(world), "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
          "trainer.max_steps=4", "trainer.val_check_interval=4",
          f"+callbacks.key_recorder._target_=halfbody.callbacks.sample_keys.SampleKeyRecorder",
          f"+callbacks.key_recorder.dirpath={keys_dir}", f"hydra.run.dir={run_dir}"], tmp_path, 300)
    per_rank = {p.stem: json.loads(p.read_text()) for p in keys_dir.glob("rank*.json")}
    assert sorted(per_rank) == ["rank0", "rank1"]
    k0, k1 = per_rank["rank0"]["train"], per_rank["rank1"]["train"]
    assert len(k0) == len(k1) == 4
    assert set(k0) != set(k1), "both ranks trained on the same samples"
    # validation is split across ranks, not duplicated
    assert not set(per_rank["rank0"]["val"]) & set(per_rank["rank1"]["val"])


def test_resume_from_last_checkpoint(tmp_path, world):
    """Checkpoints hold plain hyperparameters only, so resuming loads them with weights_only=True."""
    import torch

    first = tmp_path / "first"
    train(_compose(FAST + _world_overrides(world) + ["callbacks.sample_videos.oracle_metrics=false"], first))
    ckpt = first / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # raises on pickled objects
    assert state["global_step"] == 3
    second = tmp_path / "second"
    train(_compose(FAST + _world_overrides(world) + ["callbacks.sample_videos.oracle_metrics=false",
                                                     "trainer.max_steps=5", "trainer.val_check_interval=4",
                                                     f"ckpt_path={ckpt}"], second))
    # the run stops between checkpoint intervals (4, then 5): last.ckpt still holds its final step
    assert torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
