"""``python -m halfbody.ablate``: a 2-row table end to end with the real ``halfbody.train`` (a subprocess), the real
``generate`` and ``evaluate`` on a tiny synthetic world; row order, each row's checkpoint / config / commit / wall
time recorded, a re-run that skips finished rows, and a failing row reported while the others stay in the table.
The test-list exporter (``halfbody.data.test_set``) writes real png / wav / npy / mp4 files from real shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict

from halfbody.ablate import ablate
from halfbody.ablation import failure_line
from halfbody.data import media
from halfbody.data.test_set import export_test_set
from halfbody.utils.errors import UserError
from halfbody.utils.hydra import CONFIG_DIR

# a tiny world (2 training clips, 1 held-out half-body clip of 12 frames) shared by the table and its rows' runs
WORLD = ["data.prepare.train_clips=2", "data.prepare.val_clips=1", "data.prepare.num_frames=12",
         "data.prepare.workers=1", "data.prepare.resolution=64", "data.prepare.headshot_fraction=0"]
TRAIN = ["logger=none", "~callbacks.sample_videos", "callbacks.curriculum.max_steps_per_phase=1",
         "trainer.val_check_interval=1", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
         "data.batch_size=1", *WORLD]
GENERATE = ["steps=1", "resolution=32"]
EVALUATE = ["protocol.resolution=32", "metrics.lpips.enabled=false", "metrics.fid.enabled=false",
            "metrics.fvd.enabled=false", "metrics.sync.enabled=false", "metrics.csim.enabled=false",
            "metrics.hands.enabled=false"]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="ablate", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        del cfg.hydra
    return cfg


def _table_cfg(tmp: Path, rows: list[dict]):
    def hydra_list(items: list[str]) -> str:
        return "[" + ",".join(f"'{x}'" for x in items) + "]"

    cfg = _compose([f"paths.data_dir={tmp / 'data'}", f"paths.log_dir={tmp / 'logs'}", f"output_dir={tmp / 'table'}",
                    "train_preset=tiny_cpu", "logger=none", f"train_overrides={hydra_list(TRAIN)}",
                    f"generate_overrides={hydra_list(GENERATE)}", f"evaluate_overrides={hydra_list(EVALUATE)}",
                    *WORLD])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "table")
        cfg.table.rows = rows
    return cfg


def test_two_row_table_end_to_end_rerun_and_failing_row(tmp_path):
    full = {"id": "full", "name": "EchoMimicV2", "experiment": "apdh_stage1"}  # one phase: cheap
    ckpt = tmp_path / "table" / "rows" / "full" / "run" / "checkpoints" / "last.ckpt"
    # row 2 collects a run made elsewhere: here row 1's, which exists by the time row 2's turn comes
    rows = [full, {"id": "collected", "name": "w/o Initial Pose (collected)", "checkpoint": str(ckpt)}]
    table = ablate(_table_cfg(tmp_path, rows))
    assert [r["name"] for r in table["rows"]] == ["EchoMimicV2", "w/o Initial Pose (collected)"]
    one, two = table["rows"]
    assert one["mode"] == "trained" and one["checkpoint"] == str(ckpt) and ckpt.is_file()
    assert two["mode"] == "collected" and two["checkpoint"] == str(ckpt)
    assert not one["skipped"] and not two["skipped"]
    for r in table["rows"]:
        assert r["status"] == "ok", r
        assert Path(r["config"]).is_file() and Path(r["config"]).name == "config.yaml"  # the run's Hydra config
        assert OmegaConf.load(r["config"]).task_name == "apdh_stage1"
        assert r["commit"] is None or len(r["commit"].split("+")[0]) == 40
        assert r["metrics"]["SSIM"] <= 1.0 and np.isfinite(r["metrics"]["PSNR"])
        assert r["wall_s"] > 0
    assert "experiment=apdh_stage1" in one["command"] and "preset=tiny_cpu" in one["command"]
    gen = sorted((tmp_path / "table" / "rows" / "collected" / "generated").glob("*.mp4"))
    assert len(gen) == 1 and media.read_video(gen[0])[0].shape[1:] == (32, 32, 3)
    md = (tmp_path / "table" / "table.md").read_text()
    assert "tiny-model numbers" in md and md.index("| EchoMimicV2 |") < md.index("| w/o Initial Pose (collected) |")
    assert "SSIM↑" in md and "FID↓" in md and "## As published" in md
    assert json.loads((tmp_path / "table" / "table.json").read_text())["rows"][1]["checkpoint"] == str(ckpt)

    # a re-run with a failing row in the middle: the finished rows are skipped (nothing trains or generates again),
    # the bad rows are in the table with one line each, and the good rows around them stay
    train_log = (tmp_path / "table" / "rows" / "full" / "train.log").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (ckpt, *gen)}
    bad = {"id": "bad", "name": "w/o Something", "experiment": "apdh_ablation_does_not_exist"}
    other = {"id": "other", "name": "MirrorMe", "experiment": "mirrorme_full"}  # the other family's experiment
    table = ablate(_table_cfg(tmp_path, [rows[0], bad, rows[1], other]))
    assert [r["id"] for r in table["rows"]] == ["full", "bad", "collected", "other"]
    assert table["rows"][0]["skipped"] and table["rows"][2]["skipped"]
    assert table["rows"][0]["status"] == table["rows"][2]["status"] == "ok"
    failed = table["rows"][1]
    assert failed["status"] == "failed" and "apdh_ablation_does_not_exist" in failed["error"]
    assert "\n" not in failed["error"]
    assert table["rows"][3]["status"] == "failed" and "trains the mirrorme family" in table["rows"][3]["error"]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (tmp_path / "table" / "rows" / "full" / "train.log").read_text() == train_log
    md = (tmp_path / "table" / "table.md").read_text()
    assert "| w/o Something |" in md and "failed (config)" in md
    assert md.index("| EchoMimicV2 |") < md.index("| w/o Something |") < md.index("| w/o Initial Pose (collected) |")


def test_failure_line_picks_the_error():
    out = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA out of memory\n"
    assert failure_line(out, 1) == "RuntimeError: CUDA out of memory"
    line = failure_line("warn\nerror: data.train_shards='x': no such file\n", 2)
    assert line == "data.train_shards='x': no such file"
    assert failure_line("", -9) == "killed by signal 9"


def test_export_test_set_writes_real_files_and_skips_bad_samples(tmp_path):
    """Real shards (one good half-body clip, one headshot, one without keypoints) -> the list's real files."""
    import webdataset as wds
    from shard_utils import person_keypoints

    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 32, 3), dtype=np.uint8)
    audio = media.encode_wav(np.zeros(int(0.4 * 16000), np.float32) + 0.1, 16000)

    def sample(key: str, kind: str, kpts: bool = True) -> dict:
        s = {"__key__": key, "mp4": media.encode_video(frames, 25.0), "wav": audio,
             "json": json.dumps({"fps": 25.0, "num_frames": 10, "width": 32, "height": 32, "kind": kind,
                                 "identity": "p0"}).encode()}
        if kpts:
            import io

            buf = io.BytesIO()
            np.save(buf, person_keypoints(10, kind))
            s["kpts.npy"] = buf.getvalue()
        return s

    shards = tmp_path / "val"
    shards.mkdir()
    with wds.TarWriter(str(shards / "val-000000.tar")) as w:
        for s in (sample("c0", "halfbody"), sample("c1", "headshot"), sample("c2", "halfbody", kpts=False)):
            w.write(s)
    lst = export_test_set(shards, tmp_path / "ts", max_seconds=0.2)
    rows = [r.split() for r in lst.read_text().splitlines() if not r.startswith("#")]
    assert rows == [["c0.ref.png", "c0.wav", "c0.kpts.npy", "c0.mp4"]]
    got, fps = media.read_video(tmp_path / "ts" / "c0.mp4")
    assert got.shape == (5, 32, 32, 3) and fps == 25.0  # cut to 0.2 s
    assert np.load(tmp_path / "ts" / "c0.kpts.npy").shape == (5, 133, 3)
    assert np.load(tmp_path / "ts" / "c0.ref.kpts.npy").shape == (1, 133, 3)  # the first frame is the reference
    assert json.loads((tmp_path / "ts" / "c0.json").read_text())["num_frames"] == 5
    samples, rate = media.read_wav(tmp_path / "ts" / "c0.wav")
    assert rate == 16000 and samples.size == 3200
    manifest = json.loads((tmp_path / "ts" / "test_set.json").read_text())
    assert any("c2" in s and "kpts.npy" in s for s in manifest["skipped"])
    with pytest.raises(UserError, match="no usable clip"):
        export_test_set(shards, tmp_path / "ts2", kinds=["nonexistent"])


@pytest.mark.slow
def test_cli_row_crashing_in_its_train_subprocess(tmp_path):
    """Through ``python -m halfbody.ablate``: a row whose train subprocess exits with an error is in the table with
    that error's line, the next row still trains, the command ends with exit code 2, and the table is in the offline
    W&B run (the default logger)."""
    import subprocess
    import sys

    def hydra_list(items: list[str]) -> str:
        return "[" + ",".join(f"'{x}'" for x in items) + "]"

    rows = ("table.rows=[{id: crash, name: Crash, experiment: apdh_stage1, overrides: ['data.max_bad_fraction=2']},"
            " {id: ok, name: OK, experiment: apdh_stage1}]")
    cmd = [sys.executable, "-m", "halfbody.ablate", f"paths.data_dir={tmp_path / 'data'}",
           f"paths.log_dir={tmp_path / 'logs'}", f"output_dir={tmp_path / 'table'}", "train_preset=tiny_cpu",
           f"train_overrides={hydra_list(TRAIN)}", f"generate_overrides={hydra_list(GENERATE)}",
           f"evaluate_overrides={hydra_list(EVALUATE)}", rows, *WORLD]
    import os

    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    table = json.loads((tmp_path / "table" / "table.json").read_text())
    crash, ok = table["rows"]
    assert crash["status"] == "failed" and crash["stage"] == "train"
    assert crash["error"].startswith("data.max_bad_fraction=2")
    assert ok["status"] == "ok" and Path(ok["checkpoint"]).is_file()
    assert "error: Crash: train: data.max_bad_fraction=2" in proc.stderr
    tables = [t for t in (tmp_path / "table" / "wandb").glob("offline-run-*/files/media/table/table/*.table.json")
              if "_runs" not in t.name]
    assert tables, "no W&B table in the offline run"
    logged = json.loads(tables[0].read_text())
    assert [r[0] for r in logged["data"]] == ["Crash", "OK"] and "SSIM↑" in logged["columns"]


def test_interrupted_run_resumes_and_a_run_of_other_settings_is_refused(tmp_path):
    """A run folder with a ``last.ckpt`` but no finished train record is resumed (``ckpt_path=`` on the train command
    line); a run trained with another command line is refused in one line instead of being mixed into the table.
    The train command is echoed (``python=/bin/echo``): only the command ablate builds is under test here."""
    from halfbody.ablation import Row, RowFailed, TableRunner

    cfg = _table_cfg(tmp_path, [{"id": "full", "name": "EchoMimicV2", "experiment": "apdh_stage1"}])
    with open_dict(cfg):
        cfg.python = "/bin/echo"
    runner = TableRunner(cfg)
    row = Row(index=0, id="full", name="EchoMimicV2", experiment="apdh_stage1")
    row_dir = tmp_path / "table" / "rows" / "full"
    last = row_dir / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"stand-in: an interrupted run's checkpoint")
    (row_dir / "train.json").write_text(json.dumps({"argv": runner.train_argv(row), "returncode": None}))
    info = runner.train(row, row_dir)
    assert info["mode"] == "resumed" and info["checkpoint"] == str(last)
    assert f"ckpt_path={last}" in (row_dir / "train.log").read_text()
    assert json.loads((row_dir / "train.json").read_text())["returncode"] == 0

    (row_dir / "train.json").write_text(json.dumps({"argv": ["experiment=apdh_full"], "returncode": 0}))
    with pytest.raises(RowFailed, match="trained with other settings"):
        runner.train(row, row_dir)
