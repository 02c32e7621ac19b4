"""The learning checks' scoring path (benchmarks/learning_check.py, issue 11) on a 2-step checkpoint of each family:
the real experiment configs (EMA weights), the real Trainer, the run's saved
config, checkpoints loaded with weights_only, own-audio and other-clip's-audio rows, the JSON rows and the PNG plot.
The checks themselves (45 min of CPU training) stay out of the test suite."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from config_utils import compose_train
from halfbody.metrics.oracle import ORACLE_METRICS
from halfbody.train import train

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("learning_check", ROOT / "benchmarks" / "learning_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lc_data")


FAST = ["logger=none", "data.prepare.train_clips=2", "data.prepare.val_clips=2", "data.prepare.num_frames=20",
        "data.prepare.resolution=64", "data.prepare.workers=0", "data.val_samples=2", "data.batch_size=2",
        "data.val_batch_size=2", "data.num_workers=0", "trainer.max_time=null",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=0"]


@pytest.mark.parametrize("experiment", ["learning_check", "learning_check_mirrorme"])
def test_scoring_path_on_a_two_step_checkpoint(tmp_path, data_dir, experiment):
    run = tmp_path / "run"
    cfg = compose_train([f"experiment={experiment}", f"paths.data_dir={data_dir}", *FAST], run)
    assert "ema" in cfg.callbacks
    train(cfg)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra's launcher writes for a real run
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "ema_raw_weights" in ckpt  # the checkpoint holds the EMA weights as the model's

    lc = _script()
    rows = lc.evaluate(run, guidance_scales=(1.0, 2.5), steps=2, max_batches=1)
    assert [(r["step"], r["cfg"], r["audio"]) for r in rows] == [
        (2, 1.0, "own"), (2, 2.5, "own"), (2, 1.0, "other clip"), (2, 2.5, "other clip")]
    for r in rows:
        assert r["clips"] == 2 and set(ORACLE_METRICS) <= set(r) and r["minutes"] >= 0
        assert 0.0 <= r["identity_distance"] < 1.0
    lc.save_rows(run, rows)
    assert json.loads((run / "learning_check.json").read_text()) == rows
    png = lc.plot({experiment: rows}, run / "learning_check.png")
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (820, 420)
    # the command-line plot of several runs reads the saved rows
    assert lc.main(["--plot", str(tmp_path / "both.png"), str(run)]) == 0 and (tmp_path / "both.png").is_file()


def test_other_clip_audio_rolls_every_audio_input_and_nothing_else():
    lc = _script()
    batch = {"audio": torch.arange(3.0)[:, None].expand(3, 5), "audio_context": torch.arange(3.0)[:, None] * 10,
             "audio_context_offset": torch.tensor([1, 2, 3]), "audio_context_length": torch.tensor([7, 8, 9]),
             "video": torch.arange(3.0), "fps": torch.tensor(25.0)}
    out = lc.other_clip_audio(batch)
    assert out["audio"][:, 0].tolist() == [2.0, 0.0, 1.0]
    assert out["audio_context"][:, 0].tolist() == [20.0, 0.0, 10.0]
    assert out["audio_context_offset"].tolist() == [3, 1, 2] and out["audio_context_length"].tolist() == [9, 7, 8]
    assert out["video"] is batch["video"] and out["fps"] is batch["fps"]
