"""The audio-to-hand-pose family (issue 14): gesture metrics, the gesture world, the model, its sampling windows,
training through the real Trainer, and ``generate pose=auto``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from config_utils import compose_train
from halfbody.metrics import gestures as gm

FPS = 25.0


# ------------------------------------------------------------------------------------------ metrics
def _bursts(onsets_s, seconds: float) -> np.ndarray:
    """16 kHz audio: a 200 Hz tone in 0.12 s sin-shaped bursts starting at ``onsets_s``."""
    t = np.arange(int(seconds * 16000)) / 16000
    env = np.zeros_like(t)
    for s in onsets_s:
        x = (t - s) / 0.12
        inside = (x > 0) & (x < 1)
        env[inside] = np.sin(np.pi * x[inside])
    return (0.5 * env * np.sin(2 * np.pi * 200 * t)).astype(np.float32)


def _strokes(apexes_s, frames: int) -> np.ndarray:
    """Keypoints whose arm / hand points loop between apexes with an ease-in-out clock (stops only at apexes)."""
    from data_pipelines.synthetic_world.gestures import beat_cycle

    t = np.arange(frames) / FPS
    _, phi = beat_cycle(t, np.asarray(apexes_s, np.float64))
    k = np.zeros((frames, 133, 3), np.float32)
    k[..., :2], k[..., 2] = 0.5, 1.0
    k[:, gm.ARM_HAND_POINTS, 0] += (0.05 * np.sin(2 * np.pi * phi))[:, None]
    k[:, gm.ARM_HAND_POINTS, 1] -= (0.1 * np.sin(np.pi * phi))[:, None]
    return k


def test_audio_onsets_and_motion_beats_find_what_was_put_there():
    onsets = [0.3, 0.9, 1.5, 2.2]
    got = gm.audio_onsets(_bursts(onsets, 3.0))
    assert len(got) == 4 and np.abs(got - onsets).max() < 0.03
    beats = gm.motion_beats(_strokes(onsets, 75), FPS)
    inner = [b for b in beats if 0.2 < b < 2.9]
    assert len(inner) >= 2 and all(np.abs(np.asarray(onsets) - b).min() <= 0.06 for b in inner)


def test_beat_alignment_diversity_fd_and_jitter():
    assert gm.beat_alignment([1.0, 2.0], [1.0, 2.0]) == pytest.approx(1.0)
    assert gm.beat_alignment([1.0], [1.1]) == pytest.approx(np.exp(-0.01 / (2 * gm.BEAT_SIGMA ** 2)))
    assert np.isnan(gm.beat_alignment([], [1.0]))
    moving = _strokes([0.3, 0.9, 1.5, 2.2], 75)
    static = np.repeat(moving[:1], 75, axis=0)
    assert gm.diversity(static) == 0.0 and gm.diversity(moving) > 0.01
    assert gm.sample_diversity(moving, moving) == 0.0 and gm.sample_diversity(moving, static) > 0.01
    linear = static.copy()
    linear[:, gm.ARM_HAND_POINTS, 0] += (0.002 * np.arange(75))[:, None]
    assert gm.jitter(linear, FPS) == pytest.approx(0.0, abs=0.01) and gm.jitter(moving, FPS) > 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3))
    assert gm.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert gm.frechet_distance(x, x + 1.0) == pytest.approx(3.0, abs=1e-3)  # mean shift of 1 in 3 dims
    bad = np.zeros((5, 17, 3))
    with pytest.raises(ValueError, match=r"\(T, 133, 3\)"):
        gm.diversity(bad)


# ------------------------------------------------------------------------------------------ the world
def test_gesture_world_strokes_follow_syllable_onsets_with_per_identity_style():
    """Ground-truth strokes are at stressed syllable onsets (+ the identity's lag), the ground truth's beat alignment
    is far above the mismatched-audio control, styles differ between identities, and the default world does not
    change (no gestures in its manifest parameters: its shards stay complete)."""
    from data_pipelines.synthetic_world import WorldConfig, render_clip
    from data_pipelines.synthetic_world.generate import _params
    from data_pipelines.synthetic_world.gestures import gesture_style

    cfg = WorldConfig(gestures=True, resolution=16, num_frames=75)
    clips = [render_clip(cfg, i, kind="halfbody") for i in range(5)]
    g = clips[0].meta["synthetic"]["gestures"]
    style = g["style"]
    onsets = np.asarray(g["syllable_onsets"])
    for s in g["stroke_times"]:
        assert np.abs(onsets + style["lag"] - s).min() < 1e-3
    m = gm.gesture_metrics(np.stack([c.kpts for c in clips]), np.stack([c.kpts for c in clips]),
                           np.stack([c.audio for c in clips]), FPS)
    assert m["gt_beat_alignment"] > m["beat_alignment_mismatched"] + 0.2
    assert len({gesture_style(0, i).to_json().__repr__() for i in range(8)}) == 8
    assert "gestures" not in _params(WorldConfig(), 4, 4) and _params(cfg, 4, 4)["gestures"] is True
    plain = render_clip(WorldConfig(resolution=16, num_frames=75), 0, kind="halfbody")
    assert "gestures" not in plain.meta["synthetic"]
    np.testing.assert_array_equal(plain.audio, clips[0].audio)  # the same speech: only the hands change


# ------------------------------------------------------------------------------------------ model and sampling
def _tiny_model(window: int = 12, prefix: int = 4):
    import hydra

    cfg = compose_train(["family=audio2pose", f"data.num_frames={window}", f"model.prefix_frames={prefix}",
                         "model.num_inference_steps=2", "model.network.dim=32", "model.network.depth=1",
                         "model.network.heads=2"])
    return hydra.utils.instantiate(cfg.model).eval()


def test_parallelism_for_a_family_without_a_parallelize_function_is_one_line():
    from halfbody.utils.errors import UserError

    model = _tiny_model()
    model.parallelism = {"activation_checkpointing": True}
    with pytest.raises(UserError, match=r"^parallelize\.\* / trainer=fsdp: Audio2PoseModule has no parallelize"):
        model.configure_model()


def test_windows_carry_a_motion_prefix_and_start_from_the_reference():
    from data_pipelines.synthetic_world import WorldConfig, render_clip

    from halfbody.audio2pose.pipeline import windows

    assert windows(30, 12, 4) == [(0, 1), (8, 4), (16, 4), (18, 10)]
    assert windows(5, 12, 4) == [(0, 1)]
    model = _tiny_model()
    with torch.no_grad():
        for p in model.network.out.parameters():  # a non-zero output layer, so that windows really move
            p.normal_(0, 0.5)
    ref = torch.from_numpy(render_clip(WorldConfig(resolution=32, num_frames=2), 0, "halfbody").kpts[0])
    seen = []
    orig = model.pipeline.sample_window

    def spy(audio, reference, prefix_motion, frames, *a, **k):
        seen.append(prefix_motion.clone())
        out = orig(audio, reference, prefix_motion, frames, *a, **k)
        assert torch.equal(out[:, :prefix_motion.shape[1]], prefix_motion)  # the prefix is held exactly
        return out

    model.pipeline.sample_window = spy
    feats = torch.randn(1, 30, model.audio_encoder.tokens_per_frame, model.audio_encoder.feature_dim)
    kpts = model.pipeline(feats, ref[None], 30, generator=torch.Generator().manual_seed(0))
    assert kpts.shape == (1, 30, 133, 3) and len(seen) == 4
    assert torch.allclose(kpts[0, 0], ref)  # frame 0 is the reference's own pose
    from halfbody.audio2pose.keypoint_sequence import POSE_POINTS

    others = [i for i in range(133) if i not in POSE_POINTS]
    assert torch.equal(kpts[0, :, others], ref[None, others].expand(30, -1, -1))  # the rest is held
    assert (kpts[0, 1:, list(POSE_POINTS), :2] - ref[list(POSE_POINTS), :2]).abs().max() > 1e-3


def test_checkpoint_family_is_recognised_and_bad_values_name_the_key():
    from halfbody.utils.checkpoint_io import checkpoint_family

    model = _tiny_model()
    assert checkpoint_family({"state_dict": {f"network.{k}": v for k, v in model.network.state_dict().items()}}) \
        == "audio2pose"
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"model.prefix_frames=12 must be in \[1, model.window=12\)"):
        _tiny_model(window=12, prefix=12)


# ------------------------------------------------------------------------------------------ training + generation
TINY = ["model.num_inference_steps=2", "model.network.dim=32", "model.network.depth=1", "model.network.heads=2"]


@pytest.fixture(scope="module")
def pose_run(tmp_path_factory) -> Path:
    """An audio2pose run directory as training leaves it (``<run>/checkpoints/last.ckpt`` with a Lightning
    ``state_dict``, ``<run>/.hydra/config.yaml``), its weights random and its mean reference pose a gesture-world
    frame (what training accumulates), without the cost of training (the slow test trains for real)."""
    import hydra

    from data_pipelines.synthetic_world import WorldConfig, render_clip

    run = tmp_path_factory.mktemp("a2p_run")
    cfg = compose_train(["family=audio2pose", "data.num_frames=12", "model.prefix_frames=4", *TINY], run)
    model = hydra.utils.instantiate(cfg.model)
    model.mean_reference.copy_(torch.from_numpy(render_clip(WorldConfig(resolution=32, num_frames=1), 0,
                                                            "halfbody").kpts[0]))
    model.mean_reference_count.fill_(1.0)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict(), "global_step": 0}, run / "checkpoints" / "last.ckpt")
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return run / "checkpoints" / "last.ckpt"


def test_auto_pose_samples_any_length_and_falls_back_without_a_person(pose_run, tmp_path, caplog):
    """``AutoPose`` (``generate pose=auto``) loads the run with ``weights_only=True`` and samples 30 frames (several
    windows); from given reference keypoints frame 0 is that pose; a reference image in which the extractor finds no
    person falls back to the checkpoint's mean training reference pose, with one log line; a missing checkpoint or
    another family's run is one line naming the key."""
    from halfbody.audio2pose.pipeline import AutoPose
    from halfbody.utils.errors import UserError

    auto = AutoPose(str(pose_run))
    audio = _bursts([0.2, 0.6, 1.0], 1.2)
    ref = auto.load().mean_reference.numpy().copy()
    ref[:, 0] += 0.01
    kpts = auto(audio, FPS, 30, ref_kpts=ref)
    assert kpts.shape == (30, 133, 3) and np.isfinite(kpts).all()
    np.testing.assert_allclose(kpts[0], ref, atol=1e-6)
    kpts = auto(audio, FPS, 30, image=np.zeros((8, 8, 3), np.uint8), extractor=lambda im: np.zeros((0, 133, 3)))
    np.testing.assert_allclose(kpts[0], auto.model.mean_reference.numpy(), atol=1e-6)
    assert sum("no person detected" in r.getMessage() for r in caplog.records) == 1
    np.testing.assert_allclose(auto(audio, FPS, 5, ref_kpts=np.zeros((133, 3), np.float32))[0],
                               auto.model.mean_reference.numpy(), atol=1e-6)  # keypoints without a person: the same
    assert sum("no person detected" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(UserError, match="pose_model.ckpt_path=.*does not exist"):
        AutoPose(str(tmp_path / "missing.ckpt"))(audio, FPS, 4)
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    torch.save({"state_dict": {}}, other / "last.ckpt")
    (other.parent / ".hydra").mkdir()
    OmegaConf.save(compose_train([]), other.parent / ".hydra" / "config.yaml")
    with pytest.raises(UserError, match="not an audio-to-pose one"):
        AutoPose(str(other / "last.ckpt")).load()


@pytest.mark.slow
def test_training_on_the_gesture_world_logs_gesture_metrics_and_pose_videos(tmp_path):
    """Two steps through the real Trainer on a 4-clip gesture world: checkpoint, ``val/gesture/*`` (no pixel oracle
    metrics on pose maps), pose-map sample videos, and the mean reference pose accumulated from the clips."""
    from halfbody.audio2pose.pipeline import load_pose_model
    from halfbody.train import train

    out = tmp_path / "run"
    cfg = compose_train(["family=audio2pose", "data=synthetic_world_gestures", "logger=none", "trainer.max_steps=2",
                         "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "data.num_workers=0",
                         "data.batch_size=2", "data.num_frames=16", "data.val_samples=2", *TINY,
                         f"paths.data_dir={tmp_path / 'data'}", "data.prepare.train_clips=2",
                         "data.prepare.val_clips=2", "data.prepare.num_frames=20", "data.prepare.resolution=64",
                         "data.prepare.workers=1"], out)
    metrics = train(cfg)
    assert {"val/gesture/diversity", "val/gesture/sample_diversity", "val/gesture/jitter"} <= set(metrics)
    assert not any(k.startswith("val/oracle/") for k in metrics)
    assert list((out / "samples").glob("*.mp4"))
    (out / ".hydra").mkdir()
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    model = load_pose_model(str(out / "checkpoints" / "last.ckpt"))
    assert float(model.mean_reference_count) >= 2 and float(model.mean_reference[9, 2]) == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["echomimic_v2", "mirrorme"])
def test_generate_pose_auto_from_image_and_audio(family, pose_run, tmp_path, caplog):
    """``generate pose=auto``: image + audio -> mp4 for each family (tiny presets, their own random weights), the hand
    sequence sampled by the audio2pose run and saved beside the mp4 as ``.pose.npy`` (one row per video frame,
    reusable as ``pose=``); without reference keypoints one line names the mean-reference fallback."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from PIL import Image

    from halfbody.data import media
    from halfbody.generate import generate
    from halfbody.utils.hydra import CONFIG_DIR

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "me.png")
    media.write_wav(tmp_path / "talk.wav", _bursts([0.1, 0.3], 0.4), 16000)
    out = tmp_path / "out.mp4"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[
            f"family={family}", f"ref={tmp_path / 'me.png'}", f"audio={tmp_path / 'talk.wav'}", "pose=auto",
            f"pose_model.ckpt_path={pose_run}", f"output={out}", "steps=1", "progress=false", "resolution=32",
            "guidance_scale=1.0"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    assert generate(cfg)["generated"] == [str(out)]
    frames, fps = media.read_video(out)
    kpts = np.load(tmp_path / "out.pose.npy")
    assert kpts.shape == (frames.shape[0], 133, 3) and frames.shape[1:] == (32, 32, 3)
    assert sum("mean reference pose" in r.getMessage() for r in caplog.records) == 1


def _generate_pose_auto(tmp_path: Path, pose_run: Path, *overrides: str) -> np.ndarray:
    """``generate pose=auto`` (EchoMimicV2 tiny, 32 x 32) of a 32 x 32 image ``me.png`` and 0.4 s of audio; the
    sampled ``.pose.npy``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict
    from PIL import Image

    from halfbody.data import media
    from halfbody.generate import generate
    from halfbody.utils.hydra import CONFIG_DIR

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "me.png")
    media.write_wav(tmp_path / "talk.wav", _bursts([0.1, 0.3], 0.4), 16000)
    out = tmp_path / "out.mp4"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=[
            "family=echomimic_v2", f"ref={tmp_path / 'me.png'}", f"audio={tmp_path / 'talk.wav'}", "pose=auto",
            f"pose_model.ckpt_path={pose_run}", f"output={out}", "steps=1", "progress=false", "resolution=32",
            "guidance_scale=1.0", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        del cfg.hydra
    assert generate(cfg)["generated"] == [str(out)]
    return np.load(tmp_path / "out.pose.npy")


@pytest.mark.parametrize("case", ["person", "no_person", "no_onnx"])
def test_generate_pose_auto_starts_from_the_reference_images_keypoints(case, pose_run, tmp_path, caplog):
    """``generate pose=auto`` without ref_keypoints extracts the reference image's keypoints with ``pose_extractor``
    (here its ``<ref stem>.npy`` sidecar): (person) the sampled sequence starts at that person's pose and holds its
    non-generated points (the crop follows it, as with ref_keypoints); (no_person) a sidecar with a zero-confidence
    person, or (no_onnx) rtmlib with a missing ONNX file, is one log line and the pose model's mean reference pose
    (the 32 x 32 image is centre-cropped as is, so the sequence is in the model's frame)."""
    from data_pipelines.synthetic_world import WorldConfig, render_clip
    from halfbody.audio2pose.keypoint_sequence import POSE_POINTS
    from halfbody.audio2pose.pipeline import load_pose_model

    person = render_clip(WorldConfig(resolution=32, num_frames=1), 3, "halfbody").kpts[:1]  # (1, 133, 3)
    person[0, :, 0] = 0.9 * person[0, :, 0] + 0.04  # not the mean reference pose
    if case == "person":
        np.save(tmp_path / "me.npy", person)
        kpts = _generate_pose_auto(tmp_path, pose_run, "pose_extractor.extractor=sidecar")
        others = [i for i in range(133) if i not in POSE_POINTS]
        np.testing.assert_allclose(kpts[0], person[0], atol=1e-4)
        np.testing.assert_allclose(kpts[:, others], np.broadcast_to(person[:, others], kpts[:, others].shape),
                                   atol=1e-4)
        assert not any("mean reference pose" in r.getMessage() for r in caplog.records)
        assert np.abs(kpts[0] - load_pose_model(str(pose_run)).mean_reference.numpy()).max() > 1e-2
        return
    if case == "no_person":
        person[..., 2] = 0.0
        np.save(tmp_path / "me.npy", person)
        kpts = _generate_pose_auto(tmp_path, pose_run, "pose_extractor.extractor=sidecar")
        said = "no person detected in the reference image (by the keypoint extractor)"
    else:
        kpts = _generate_pose_auto(tmp_path, pose_run, "pose_extractor.extractor=rtmlib",
                                   f"pose_extractor.det_model={tmp_path / 'yolox_l.onnx'}")
        said = "pose_extractor.det_model="
    lines = [r.getMessage() for r in caplog.records if "mean reference pose" in r.getMessage()]
    assert len(lines) == 1 and said in lines[0], lines
    if case == "no_onnx":
        assert "ONNX file not found" in lines[0]
    mean = load_pose_model(str(pose_run)).mean_reference.numpy()
    np.testing.assert_allclose(kpts[0], mean, atol=1e-4)


def test_reference_image_keypoints_through_the_pipelines_extractor(tmp_path):
    """The reference image's keypoints come from the data pipeline's extractor: a sidecar in the image's pixels is
    normalised, a multi-person sidecar gives its largest person, a missing sidecar or an rtmlib that cannot run
    (ONNX missing; rtmlib not installed) is ``ExtractorUnavailable`` naming the key, a bad sidecar a ``UserError``."""
    import importlib.util

    from halfbody.generation.inputs import ExtractorUnavailable, reference_image_keypoints
    from halfbody.utils.errors import UserError

    img = np.zeros((20, 10, 3), np.uint8)
    for name in ("me.png", "two.png", "none.png"):
        (tmp_path / name).write_bytes(b"")  # only the image's path and stem are read here
    k = np.zeros((1, 133, 3), np.float32)
    k[0, :, :2], k[0, :, 2] = (5.0, 10.0), 1.0
    np.save(tmp_path / "me.npy", k)
    got = reference_image_keypoints(img, str(tmp_path / "me.png"), "ref", {"extractor": "sidecar"})
    assert got.shape == (1, 133, 3) and np.allclose(got[0, :, :2], 0.5)
    two = np.zeros((1, 2, 133, 3), np.float32)
    two[0, :, :, 2] = 1.0
    two[0, 1, :, :2] = np.random.default_rng(0).uniform(0.1, 0.9, (133, 2))  # the larger person
    two[0, 0, :, :2] = 0.5 + 0.01 * np.random.default_rng(1).uniform(size=(133, 2))
    np.save(tmp_path / "two.npy", two)
    got = reference_image_keypoints(img, str(tmp_path / "two.png"), "ref", {"extractor": "sidecar"})
    np.testing.assert_allclose(got[0], two[0, 1])
    with pytest.raises(ExtractorUnavailable, match=r"pose_extractor.extractor=sidecar: none.npy not found"):
        reference_image_keypoints(img, str(tmp_path / "none.png"), "ref", {"extractor": "sidecar"})
    with pytest.raises(ExtractorUnavailable, match=r"pose_extractor.pose_model=.*ONNX file not found .*reference"):
        reference_image_keypoints(img, str(tmp_path / "me.png"), "ref", {
            "extractor": "rtmlib", "det_model": str(tmp_path / "me.npy"), "pose_model": str(tmp_path / "no.onnx")})
    if importlib.util.find_spec("rtmlib") is None:
        with pytest.raises(ExtractorUnavailable, match=r"pose_extractor.extractor=rtmlib needs the optional packages"):
            reference_image_keypoints(img, str(tmp_path / "me.png"), "ref", {
                "extractor": "rtmlib", "det_model": str(tmp_path / "me.npy"), "pose_model": str(tmp_path / "me.npy")})
    np.save(tmp_path / "me.npy", np.zeros((133, 3), np.float32))
    with pytest.raises(UserError, match=r"ref=.*me.png.*bad sidecar: me.npy has shape \(133, 3\)") as e:
        reference_image_keypoints(img, str(tmp_path / "me.png"), "ref", {"extractor": "sidecar"})
    assert not isinstance(e.value, ExtractorUnavailable)
