"""The research loop of issue 12, end to end on real files: train (2 steps, the real Trainer) -> export a held-out
clip as a test list (real png, wav, pose npy, ground-truth mp4 + keypoint / json sidecars) -> generate from the
checkpoint (batch mode) -> evaluate (every metric network from a tiny random stand-in saved in its real format).

Checks: the mp4 is as long as the audio (within a frame), and metrics.json holds every metric whose weights were
given plus SSIM / PSNR and the synthetic world's oracle metrics, while each metric without weights is skipped naming
its key (HKC / HKV: no DWPose files and no sidecars for generated videos: ``metrics.keypoints``). The loop runs in the
fast suite for both families with the cheap networks' stand-ins (LPIPS, SyncNet, ArcFace; FID and FVD then skipped
naming their keys); a slow run of EchoMimicV2 gets all five (Inception and I3D too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from halfbody.data import media
from config_utils import compose_train
from test_evaluate import compose_entry, compose_evaluate, session_weights

TRAIN = ["logger=none", "~callbacks.sample_videos", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=1",
         "data.prepare.train_clips=2", "data.prepare.val_clips=1", "data.prepare.num_frames=20",
         "data.prepare.workers=1", "data.prepare.resolution=64"]
GENERATE = ["steps=1", "progress=false", "resolution=32"]
PROTOCOL = ["protocol.resolution=32", "protocol.fid_resize=75", "protocol.fvd_resize=32", "protocol.fvd_clip_frames=4"]
ALL_NETWORKS = ("fid", "fvd", "lpips", "sync", "csim")
METRICS_OF = {"fid": ("FID",), "fvd": ("FVD",), "lpips": ("LPIPS",), "sync": ("Sync-C", "Sync-D"), "csim": ("CSIM",)}
KEY_OF = {"fid": "metrics.fid.weights", "fvd": "metrics.fvd.weights", "lpips": "metrics.lpips.backbone_path",
          "sync": "metrics.sync.weights", "csim": "metrics.csim.weights"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder for the synthetic-world shards (written by the first training run's data preparation)."""
    return tmp_path_factory.mktemp("data")


def _loop(family: str, world: Path, tmp_path: Path, tmp_path_factory, networks: tuple[str, ...]) -> None:
    from halfbody.data.test_set import export_test_set
    from halfbody.evaluate import evaluate
    from halfbody.generate import generate

    # 1. train two steps
    GlobalHydra.instance().clear()
    run = tmp_path / "run"
    from halfbody.train import train

    train(compose_train(TRAIN + [f"family={family}", f"paths.data_dir={world}"], run))
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    # 2. a held-out clip as real files: ref png, wav, pose npy, ground-truth mp4 with keypoint and json sidecars
    test_list = export_test_set(world / "synthetic_world" / "val", tmp_path / "test_set", max_clips=1,
                                max_seconds=0.32)  # 8 frames: 3 SyncNet windows, 2 FVD clips
    (row,) = [ln.split() for ln in test_list.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    audio = test_list.parent / row[1]
    # 3. generate from the checkpoint
    GlobalHydra.instance().clear()
    out = tmp_path / "generated"
    summary = generate(compose_entry("generate", GENERATE + [f"family={family}", f"ckpt_path={ckpt}", f"list={test_list}",
                                                        f"output_dir={out}"], tmp_path / "gen_run"))
    assert not summary["failed"], summary["failed"]
    (video,) = [Path(p) for p in summary["generated"]]
    frames, fps = media.read_video(video)
    samples, rate = media.read_audio(audio)
    assert abs(frames.shape[0] / fps - samples.size / rate) <= 0.5 / fps + 1e-6
    # 4. evaluate with the weights of ``networks`` given (random stand-ins in the real formats), the others absent
    GlobalHydra.instance().clear()
    weights = session_weights(tmp_path_factory, networks)  # (shared with test_evaluate in one session)
    given = [f"{KEY_OF[n]}={weights[KEY_OF[n]]}" for n in networks]
    absent = [f"{KEY_OF[n]}={tmp_path / 'absent' / n}" for n in ALL_NETWORKS if n not in networks]
    cfg = compose_evaluate(["logger=none", f"list={test_list}", f"generated={out}", "metrics.keypoints.det_model=null",
                            f"metrics.csim.layers={weights['metrics.csim.layers']}"] + PROTOCOL + given + absent,
                           tmp_path / "eval")
    result = evaluate(cfg)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    weighted = ["SSIM", "PSNR"] + [m for n in networks for m in METRICS_OF[n]]
    assert set(weighted) <= set(saved["metrics"]), saved["skipped"]
    assert all(saved["metrics"][m] == pytest.approx(result["metrics"][m]) for m in weighted)
    for n in set(ALL_NETWORKS) - set(networks):
        assert all(f"{KEY_OF[n]}=" in saved["skipped"][m] for m in METRICS_OF[n])
    assert "metrics.keypoints" in saved["skipped"]["HKC"] and "metrics.keypoints" in saved["skipped"]["HKV"]
    assert "E-FID" in saved["skipped"]
    assert {"oracle/mouth_sync", "oracle/identity_distance"} <= set(saved["metrics"])  # the synthetic world
    (per,) = saved["per_video"].values()
    assert per["frames"] == frames.shape[0] and per["face_boxes"].startswith("ground truth's sidecar")
    assert "| SSIM↑ | PSNR↑ |" in (tmp_path / "eval" / "metrics.md").read_text()


CHEAP_NETWORKS = ("lpips", "sync", "csim")


@pytest.mark.parametrize("family", ["mirrorme", "echomimic_v2"])
def test_train_generate_evaluate(family, world, tmp_path, tmp_path_factory):
    _loop(family, world, tmp_path, tmp_path_factory, networks=CHEAP_NETWORKS)


@pytest.mark.slow
def test_train_generate_evaluate_with_every_metric_network(world, tmp_path, tmp_path_factory):
    _loop("echomimic_v2", world, tmp_path, tmp_path_factory, networks=ALL_NETWORKS)
