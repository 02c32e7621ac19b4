"""``python -m halfbody.evaluate`` and the EMTD metrics (halfbody.metrics), with known answers.

Networks load tiny random stand-ins saved in each real weight format (tests/metric_weights.py) through the real
loading code: the tests prove loading, pre-processing, the offset search, the statistics and the bookkeeping, not
what the published networks would measure (docs/EVALUATION.md, "What the tests prove").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from halfbody.data import media
from halfbody.evaluate import evaluate
from halfbody.metrics import frame_quality as fq
from halfbody.metrics.frechet import frechet_distance
from halfbody.metrics.hands import hand_keypoint_confidence, hand_keypoint_variance
from halfbody.metrics.sync import mfcc, sync_scores
from halfbody.utils.errors import UserError
from config_utils import compose_config
from metric_weights import save_metric_weights

NO_WEIGHTS = ["logger=none", "metrics.fid.weights=null", "metrics.fvd.weights=null", "metrics.lpips.backbone_path=null",
              "metrics.sync.weights=null", "metrics.csim.weights=null", "metrics.keypoints.det_model=null"]


compose_entry = compose_config  # conf/<config>.yaml with overrides, writing under out


def compose_evaluate(overrides: list[str], out: Path):
    return compose_entry("evaluate", overrides, out)


def _frames(seed: int, n: int = 8, size: int = 48) -> np.ndarray:
    """Smooth random frames (a blurred noise field that drifts), uint8 ``(n, size, size, 3)``."""
    rng = np.random.default_rng(seed)
    base = rng.random((size // 8 + 2, size // 8 + 2, 3))
    img = np.array(Image.fromarray((base * 255).astype(np.uint8)).resize((size + 16, size + 16), Image.BICUBIC))
    return np.stack([img[i % 16:i % 16 + size, :size] for i in range(n)])


def session_weights(tmp_path_factory, which) -> dict[str, str]:
    """The stand-in files in one folder per test session (written once, shared by the test modules)."""
    return save_metric_weights(tmp_path_factory.getbasetemp() / "metric_weights", which=which)


@pytest.fixture(scope="module")
def fid_lpips_weights(tmp_path_factory) -> dict[str, str]:
    return session_weights(tmp_path_factory, ("fid", "lpips"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Real H.264 mp4s: ``gt/``, ``gen/`` (noisy copies with AAC audio, plus an unmatched ``extra.mp4``) and
    ``same/`` (the ground truth written again: identical after decoding)."""
    d = tmp_path_factory.mktemp("videos")
    for sub in ("gen", "gt", "same"):
        (d / sub).mkdir()
    rng = np.random.default_rng(1)
    t = np.arange(int(0.4 * 16000)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for i in range(2):
        real = _frames(i, 10, 48)
        fake = np.clip(real.astype(int) + rng.integers(-25, 26, real.shape), 0, 255).astype(np.uint8)
        media.write_video(d / "gt" / f"clip{i}.mp4", real, 25.0)
        media.write_video(d / "gen" / f"clip{i}.mp4", fake, 25.0, audio, 16000)
        media.write_video(d / "same" / f"clip{i}.mp4", real, 25.0)
    media.write_video(d / "gen" / "extra.mp4", _frames(9, 4, 48), 25.0)
    return d


# ------------------------------------------------------------------------------------------ known answers
def test_frechet_distance_known_answers_and_torchmetrics_agreement():
    """Identical sets: 0; two Gaussians whose means differ by 3 along one axis: ~9; the low-rank trace path (fewer
    samples than dimensions) and the sqrtm path both equal torchmetrics' FID formula."""
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) + np.array([3.0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(9.0, abs=0.3)
    for n in (6, 60):  # n < D: Gram path; n > D: sqrtm path
        x, y = rng.normal(size=(n, 20)), 1.5 * rng.normal(size=(n + 3, 20)) + 0.2
        ref = _compute_fid(*(torch.tensor(v) for v in (x.mean(0), np.cov(x, rowvar=False), y.mean(0),
                                                        np.cov(y, rowvar=False))))
        assert frechet_distance(x, y) == pytest.approx(float(ref), rel=1e-6)


def test_identical_frames_give_fid_zero_ssim_one_capped_psnr_lpips_zero(fid_lpips_weights):
    from halfbody.metrics.fid import fid_network, frechet_inception_distance

    x = torch.from_numpy(_frames(3, 4, 48)).permute(0, 3, 1, 2).float() / 255
    assert fq.ssim(x, x).numpy() == pytest.approx(1.0, abs=1e-6)
    assert fq.psnr(x, x, cap=100.0).tolist() == [100.0] * 4
    lp = fq.LPIPSMetric(fid_lpips_weights["metrics.lpips.backbone_path"])
    assert lp(x, x).abs().max() < 1e-6
    net = fid_network(fid_lpips_weights["metrics.fid.weights"], resize=75)
    assert frechet_inception_distance(net, [x], [x]) == pytest.approx(0.0, abs=1e-6)
    y = torch.from_numpy(_frames(4, 4, 48)).permute(0, 3, 1, 2).float() / 255
    assert frechet_inception_distance(net, [x], [y]) > 1e-3


def _sweep(kind: str):
    """A clip and its degradations of growing strength (noise: std; blur: box width 2k+1)."""
    x = torch.from_numpy(_frames(5, 3, 48)).permute(0, 3, 1, 2).float() / 255
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))

    def degrade(level: float) -> torch.Tensor:
        if kind == "noise":
            return (x + level * noise).clamp(0, 1)
        k = int(level)
        return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (k,) * 4, mode="replicate"), 2 * k + 1, 1)

    levels = [0.03, 0.08, 0.2, 0.4] if kind == "noise" else [1, 2, 4, 7]
    return x, [degrade(level) for level in levels]


def _increasing(values) -> bool:
    return all(a < b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_degradation_sweep_is_monotone_in_ssim_psnr_lpips(kind, fid_lpips_weights):
    """More noise (or blur) -> lower SSIM and PSNR, higher LPIPS, at every step of the sweep."""
    x, ys = _sweep(kind)
    lp = fq.LPIPSMetric(fid_lpips_weights["metrics.lpips.backbone_path"])
    ssim_v = [-float(fq.ssim(y, x).mean()) for y in ys]
    psnr_v = [-float(fq.psnr(y, x).mean()) for y in ys]
    lpips_v = [float(lp(y, x).mean()) for y in ys]
    assert _increasing(ssim_v) and _increasing(psnr_v) and _increasing(lpips_v), (ssim_v, psnr_v, lpips_v)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_degradation_sweep_is_monotone_in_fid(kind, fid_lpips_weights):
    """The same sweep in FID (random stand-in Inception at 75 x 75): it grows at every step."""
    from halfbody.metrics.fid import fid_network, frechet_inception_distance

    x, ys = _sweep(kind)
    net = fid_network(fid_lpips_weights["metrics.fid.weights"], resize=75)
    fid_v = [frechet_inception_distance(net, [x], [y]) for y in ys]
    assert _increasing(fid_v), fid_v


def test_sync_offset_search_finds_the_shift_built_into_embeddings():
    """Video window i's embedding is the audio embedding of window i + 4 (plus noise): the offset search finds -4
    (syncnet_python's sign: vshift - argmin), Sync-D is the noise distance, and Sync-C is large; audio embeddings
    unrelated to the video give a small Sync-C."""
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(60, 32, generator=g)
    video = audio[4:44] + 0.05 * torch.randn(40, 32, generator=g)
    s = sync_scores(video, audio[:40], vshift=15)
    assert s["offset"] == -4
    unrelated = sync_scores(torch.randn(40, 32, generator=g), audio[:40], vshift=15)
    assert s["sync_d"] < 0.35 * unrelated["sync_d"]  # (the last 4 windows meet zero padding, as in syncnet_python)
    assert s["sync_c"] > 1.5 * s["sync_d"]
    assert unrelated["sync_c"] < 0.2 * s["sync_c"]
    aligned = sync_scores(audio[:40] + 0.05 * torch.randn(40, 32, generator=g), audio[:40])
    assert aligned["offset"] == 0


def test_mfcc_rate_and_energy_follow_python_speech_features():
    """100 MFCC frames per second (4 per 25 fps video frame), 13 cepstra, c0 = log frame energy (louder -> higher)."""
    t = np.arange(16000) / 16000
    tone = 3000 * np.sin(2 * np.pi * 440 * t)
    m = mfcc(tone)
    assert m.shape == (99, 13)
    assert (mfcc(2 * tone)[:, 0] - m[:, 0]).mean() == pytest.approx(np.log(4), abs=1e-6)


def test_hkc_and_hkv_on_keypoints_with_known_confidence_and_motion():
    """Hands at confidence 0.8 (left) and 0.4 (right) -> HKC 0.6; the left hand circles with radius 10 px over a
    whole period (var x + var y = r^2 = 100 px^2) and the right one stands still but is below the score threshold
    half the time: HKV = mean(100 over 21 left points, 0 over 21 right points) = 50; halving the radius quarters it."""
    t = 40
    k = np.zeros((t, 133, 3), np.float32)
    phase = 2 * np.pi * np.arange(t) / t
    for radius, expect in ((10.0, 50.0), (5.0, 12.5)):
        k[:, 91:112, 0] = (256 + radius * np.cos(phase))[:, None] / 512
        k[:, 91:112, 1] = (256 + radius * np.sin(phase))[:, None] / 512
        k[:, 91:112, 2] = 0.8
        k[:, 112:133, :2] = 0.25
        k[:, 112:133, 2] = np.where(np.arange(t) % 2 == 0, 0.6, 0.2)[:, None]
        assert hand_keypoint_confidence(k) == pytest.approx((0.8 + 0.4) / 2, abs=1e-6)
        assert hand_keypoint_variance(k, size=512, score=0.3) == pytest.approx(expect, rel=1e-4)
    k[..., 2] = 0.0
    assert np.isnan(hand_keypoint_variance(k, size=512))


# ------------------------------------------------------------------------------------------ evaluate()
def test_a_missing_weight_file_skips_that_metric_naming_the_key_and_the_others_run(folders, fid_lpips_weights,
                                                                                   tmp_path):
    cfg = compose_evaluate(NO_WEIGHTS + [f"generated={folders / 'gen'}", f"ground_truth={folders / 'gt'}",
                                         f"metrics.lpips.backbone_path={fid_lpips_weights['metrics.lpips.backbone_path']}",
                                         f"metrics.fid.weights={tmp_path / 'nowhere' / 'inception.pth'}",
                                         "protocol.resolution=48"], tmp_path)
    result = evaluate(cfg)
    assert set(result) >= {"metrics", "skipped", "per_video", "protocol"}
    assert "metrics.fid.weights" in result["skipped"]["FID"] and "nowhere" in result["skipped"]["FID"]
    assert "metrics.fvd.weights" in result["skipped"]["FVD"]
    assert "metrics.sync.weights" in result["skipped"]["Sync-C"]
    assert {"SSIM", "PSNR", "LPIPS"} <= set(result["metrics"])
    assert 0 < result["metrics"]["SSIM"] < 1 and 10 < result["metrics"]["PSNR"] < 40
    assert sorted(result["per_video"]) == ["clip0", "clip1"]  # extra.mp4 has no ground truth
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"] == result["metrics"] and saved["protocol"]["resolution"] == 48
    assert any("extra.mp4" in line for line in saved["problems"])


def test_identical_folders_through_evaluate_give_the_known_answers(folders, tmp_path):
    cfg = compose_evaluate(NO_WEIGHTS + [f"generated={folders / 'same'}", f"ground_truth={folders / 'gt'}",
                                         "protocol.resolution=48", "protocol.psnr_cap=80"], tmp_path)
    m = evaluate(cfg)["metrics"]
    assert m["SSIM"] == pytest.approx(1.0, abs=1e-9) and m["PSNR"] == 80.0


@pytest.mark.parametrize("override, key", [(["generated=/no/such/dir"], "generated="),
                                           (["ground_truth=null"], "ground_truth"),
                                           (["protocol.resolution=8"], "protocol.resolution=8"),
                                           (["protocol.synthetic=maybe"], "protocol.synthetic")])
def test_bad_input_is_one_user_error_naming_the_key(override, key, folders, tmp_path):
    base = [f"generated={folders / 'gen'}", f"ground_truth={folders / 'gt'}"]
    cfg = compose_evaluate(NO_WEIGHTS + base + override, tmp_path)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        evaluate(cfg)


def test_cli_on_two_folders_of_real_mp4s_writes_metrics_json_and_md(folders, tmp_path, monkeypatch):
    """``python -m halfbody.evaluate ...``: the Hydra entry point ``main`` with a command line, in-process."""
    from halfbody.evaluate import main

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["evaluate", f"generated={folders / 'gen'}", f"ground_truth={folders / 'gt'}",
                                      f"output_dir={out}", "protocol.resolution=48", "logger=none",
                                      f"hydra.run.dir={tmp_path / 'hydra'}", "metrics.keypoints.det_model=null",
                                      f"paths.pretrained_dir={tmp_path / 'no_pretrained'}"])
    main()
    saved = json.loads((out / "metrics.json").read_text())
    assert {"SSIM", "PSNR"} <= set(saved["metrics"]) and set(saved["per_video"]) == {"clip0", "clip1"}
    assert "no_pretrained" in saved["skipped"]["FID"]
    table = (out / "metrics.md").read_text()
    assert "| SSIM↑ | PSNR↑ |" in table and "clip0" in table and "FID: metrics.fid.weights=" in table
    assert (tmp_path / "hydra" / "evaluate.log").is_file()


def test_entry_point_reports_a_bad_input_in_one_line_with_exit_2(tmp_path, capsys):
    """``main``'s wrapper (``exit_on_user_error``) around ``evaluate``: one ``error:`` line on stderr, exit code 2."""
    from halfbody.utils.errors import exit_on_user_error

    cfg = compose_evaluate(NO_WEIGHTS + ["generated=/no/such/dir", "ground_truth=/x"], tmp_path)
    with pytest.raises(SystemExit) as e, exit_on_user_error():
        evaluate(cfg)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: generated='/no/such/dir' does not exist"]


def test_hkc_hkv_through_evaluate_from_sidecars_next_to_the_generated_videos(folders, tmp_path):
    """Keypoints measured on generated videos may come as ``<stem>.kpts.npy`` sidecars (instead of DWPose): HKC and
    HKV per video equal the functions' values on the keypoints mapped into the protocol frame, and the mean over
    videos is the metric; the JSON holds no NaN (written as null)."""
    import shutil

    gen = tmp_path / "gen"
    gen.mkdir()
    expected = []
    for i, conf in enumerate((0.9, 0.5)):
        shutil.copy(folders / "gen" / f"clip{i}.mp4", gen / f"clip{i}.mp4")
        k = np.zeros((10, 133, 3), np.float32)
        k[:, 91:133, 0] = 0.5 + 0.05 * np.sin(np.arange(10) / 3)[:, None]
        k[:, 91:133, 1] = 0.5
        k[:, 91:133, 2] = conf
        np.save(gen / f"clip{i}.kpts.npy", k)
        expected.append((conf, hand_keypoint_variance(k, size=48)))  # 48 x 48 video, protocol 48: the same frame
    cfg = compose_evaluate(NO_WEIGHTS + [f"generated={gen}", f"ground_truth={folders / 'gt'}", "protocol.resolution=48"],
                           tmp_path)
    result = evaluate(cfg)
    assert result["per_video"]["clip0"]["keypoints"] == "sidecar clip0.kpts.npy"
    assert result["metrics"]["HKC"] == pytest.approx(0.7, abs=1e-6)
    assert result["metrics"]["HKV"] == pytest.approx(np.mean([v for _, v in expected]), rel=1e-4)
    assert "NaN" not in (tmp_path / "metrics.json").read_text()


@pytest.mark.slow
def test_fid_equals_torchmetrics_with_the_fid_inception_as_its_feature_extractor(fid_lpips_weights):
    """The FID Inception plugs into ``torchmetrics.image.fid.FrechetInceptionDistance`` as a custom feature extractor
    (no torch-fidelity, no download), and torchmetrics' value equals ours (its 2048 x 2048 eigenproblem vs our exact
    low-rank trace)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from halfbody.metrics.fid import fid_network, frechet_inception_distance

    net = fid_network(fid_lpips_weights["metrics.fid.weights"], resize=75)
    x = torch.from_numpy(_frames(6, 6, 48)).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(_frames(7, 7, 48)).permute(0, 3, 1, 2).float() / 255
    tm = FrechetInceptionDistance(feature=net, normalize=True)
    tm.update(x, real=True)
    tm.update(y, real=False)
    assert float(tm.compute()) == pytest.approx(frechet_inception_distance(net, [x], [y]), rel=1e-3)


def test_gesture_metrics_through_evaluate_from_pose_npy_beside_the_generated_videos(tmp_path):
    """``generate pose=auto`` writes ``<stem>.pose.npy`` beside the mp4: ``evaluate`` scores it against the ground
    truth's keypoint sidecar with the audio (``gesture/*``). Known answers: the ground truth's own keypoints as the
    generated ones give beat alignment, diversity and jitter equal to the ground truth's (jitter ratio 1) and
    keypoint FDs of 0, the shuffled-audio control is measured over the two videos; without ``.pose.npy`` the
    gesture metrics are listed under ``skipped`` with the reason."""
    from halfbody.metrics.gestures import ARM_HAND_POINTS

    gen, gt, bare = tmp_path / "gen", tmp_path / "gt", tmp_path / "bare"
    for d in (gen, gt, bare):
        d.mkdir()
    fps, frames = 25.0, 40
    t = np.arange(frames) / fps
    for i, period in enumerate((0.4, 0.55)):
        k = np.zeros((frames, 133, 3), np.float32)
        k[..., :2], k[..., 2] = 0.5, 1.0
        offsets = np.linspace(0.5, 1.5, len(ARM_HAND_POINTS))[None]  # points move by different amounts
        k[:, ARM_HAND_POINTS, 0] += 0.05 * offsets * np.sin(2 * np.pi * t / period)[:, None]
        k[:, ARM_HAND_POINTS, 1] += 0.03 * offsets * np.cos(2 * np.pi * t / (2 * period))[:, None]
        s = np.arange(int(frames / fps * 16000)) / 16000
        env = (np.sin(np.pi * s / period) > 0.9).astype(np.float32)  # bursts, one per period
        audio = (0.4 * env * np.sin(2 * np.pi * 200 * s)).astype(np.float32)
        video = _frames(i, frames, 48)
        media.write_video(gt / f"clip{i}.mp4", video, fps)
        np.save(gt / f"clip{i}.kpts.npy", k)
        for d in (gen, bare):
            media.write_video(d / f"clip{i}.mp4", video, fps, audio, 16000)
        np.save(gen / f"clip{i}.pose.npy", k)  # the ground truth's own keypoints, as the generated ones
    cfg = compose_evaluate(NO_WEIGHTS + [f"generated={gen}", f"ground_truth={gt}", "protocol.resolution=48"],
                           tmp_path / "run")
    result = evaluate(cfg)
    m = result["metrics"]
    assert m["gesture/jitter"] > 0 and m["gesture/jitter"] / m["gesture/gt_jitter"] == pytest.approx(1.0, abs=1e-6)
    assert m["gesture/diversity"] == pytest.approx(m["gesture/gt_diversity"], rel=1e-6) and m["gesture/diversity"] > 0
    assert m["gesture/beat_alignment"] == pytest.approx(m["gesture/gt_beat_alignment"], abs=1e-9)
    assert 0 <= m["gesture/beat_alignment_mismatched"] <= 1
    assert abs(m["gesture/fd_pose"]) < 1e-4 and abs(m["gesture/fd_kinematic"]) < 1e-2
    assert result["per_video"]["clip1"]["gesture/jitter"] == pytest.approx(
        result["per_video"]["clip1"]["gesture/gt_jitter"], rel=1e-6)
    assert "one sampled sequence per video" in result["skipped"]["gesture/sample_diversity"]
    assert "gesture/jitter" in (tmp_path / "run" / "metrics.md").read_text()
    cfg = compose_evaluate(NO_WEIGHTS + [f"generated={bare}", f"ground_truth={gt}", "protocol.resolution=48"],
                           tmp_path / "run_bare")
    result = evaluate(cfg)
    assert not any(k.startswith("gesture/") for k in result["metrics"])
    assert "no clip0.pose.npy beside the generated video" in result["skipped"]["gesture"]
    assert "(and 1 more)" in result["skipped"]["gesture"]
