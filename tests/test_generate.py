"""``python -m halfbody.generate``: train each family for 2 steps through the real ``train()``, then generate from the
checkpoint with a real png and real audio files (wav, and an m4a written with PyAV), in single and batch mode, and
check the one-line errors of bad inputs (in-process, and once through the real CLI)."""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from halfbody.data import media
from halfbody.generate import generate
from halfbody.utils.errors import UserError, exit_on_user_error
from halfbody.utils.hydra import REPO_ROOT
from config_utils import compose_config, compose_train
from shard_utils import person_keypoints
from test_pretrained_presets import pretrained_dir  # noqa: F401  (fixture: tiny pretrained parts on disk)

TRAIN = ["logger=none", "~callbacks.sample_videos", "trainer.max_steps=2", "trainer.val_check_interval=2",
         "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=1",
         "data.prepare.train_clips=2", "data.prepare.val_clips=1", "data.prepare.num_frames=20",
         "data.prepare.workers=1", "data.prepare.resolution=64"]
FAST = ["steps=1", "progress=false", "resolution=32"]  # 32 x 32: a few seconds of CPU per video


_compose = compose_config  # conf/<config>.yaml with overrides, writing under out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-step checkpoint of each family. The EchoMimicV2 run trains at 20 fps and keeps its config where Hydra
    writes it (``<run>/.hydra/config.yaml``); the MirrorMe run has none (its model config is composed at generation)."""
    from hydra.core.global_hydra import GlobalHydra

    from halfbody.train import train

    data = tmp_path_factory.mktemp("data")
    out = {}
    for family, extra in (("echomimic_v2", ["data.fps=20"]), ("mirrorme", [])):
        GlobalHydra.instance().clear()
        run = tmp_path_factory.mktemp(family)
        cfg = compose_train(TRAIN + extra + [f"family={family}", f"paths.data_dir={data}"], run)
        train(cfg)
        if family == "echomimic_v2":
            (run / ".hydra").mkdir()
            OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        out[family] = run / "checkpoints" / "last.ckpt"
        assert out[family].is_file()
    GlobalHydra.instance().clear()
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A non-square png, a 0.4 s stereo 22.05 kHz wav, a 0.4 s stereo 44.1 kHz AAC m4a, poses, and bad files."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(d / "ref.png")
    t = np.arange(int(0.4 * 22050)) / 22050
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 4 * t)) / 2).astype(np.float32)
    stereo = np.stack([tone, 0.5 * tone], axis=1)
    pcm = (stereo * 32767).astype("<i2").tobytes()
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1, 2, 22050, 22050 * 4, 4,
                         16, b"data", len(pcm))
    (d / "talk.wav").write_bytes(header + pcm)
    with av.open(str(d / "talk.m4a"), "w", format="mp4") as c:
        s = c.add_stream("aac", rate=44100)
        s.layout = "stereo"
        t44 = np.arange(int(0.4 * 44100)) / 44100
        x = (0.3 * np.sin(2 * np.pi * 300 * t44)).astype(np.float32)
        planes = np.stack([x, 0.5 * x])
        for i in range(0, planes.shape[1], 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes[:, i:i + 1024]), format="fltp", layout="stereo")
            f.sample_rate, f.pts = 44100, i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    media.write_wav(d / "silent.wav", np.zeros(8000, np.float32), 16000)
    media.write_wav(d / "empty.wav", np.zeros(0, np.float32), 16000)
    (d / "not_image.png").write_text("this is not a png\n")
    np.save(d / "pose.npy", person_keypoints(10))
    np.save(d / "pose_short.npy", person_keypoints(4))
    media.write_video(d / "driving.mp4", np.zeros((2, 16, 16, 3), np.uint8), 25.0)
    return d


def _audio_seconds(path: Path) -> float:
    samples, rate = media.read_audio(path)
    return samples.size / rate


def _check_mp4(path: Path, seconds: float, fps: float, size: int = 32) -> None:
    """H.264 + AAC, at ``fps``, video and audio streams as long as the input audio (within a frame)."""
    assert path.is_file() and not list(path.parent.glob(f".{path.name}.*.tmp"))
    frames, got_fps = media.read_video(path)
    assert got_fps == pytest.approx(fps)
    assert frames.shape[1:] == (size, size, 3)
    assert abs(frames.shape[0] / fps - seconds) <= 0.5 / fps + 1e-6
    with av.open(str(path)) as c:
        (v,) = c.streams.video
        (a,) = c.streams.audio
        assert v.codec_context.name == "h264" and a.codec_context.name == "aac"
        assert abs(float(a.duration * a.time_base) - seconds) <= 1 / fps


def _run(overrides: list[str], out: Path, capsys) -> tuple[int, list[str]]:
    """``main``'s error handling in-process: (exit code, stderr lines)."""
    cfg = _compose("generate", overrides, out)
    code = 0
    try:
        with exit_on_user_error():
            summary = generate(cfg)
        code = 2 if summary["failed"] else 0
    except SystemExit as e:
        code = int(e.code)
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_echomimic_v2_from_a_train_checkpoint_with_its_run_config(runs, inputs, tmp_path, capsys):
    """EchoMimicV2 with pose: the run's .hydra/config.yaml gives the model and its 20 fps; wav at 22.05 kHz stereo;
    CFG on; the progress bar counts the network passes (1 context window x 1 step)."""
    out = tmp_path / "e.mp4"
    cfg = _compose("generate", FAST + [f"ckpt_path={runs['echomimic_v2']}", f"ref={inputs / 'ref.png'}",
                                       f"audio={inputs / 'talk.wav'}", f"pose={inputs / 'pose.npy'}", f"output={out}",
                                       "progress=true"], tmp_path)
    summary = generate(cfg)
    assert summary["generated"] == [str(out)]
    _check_mp4(out, _audio_seconds(inputs / "talk.wav"), fps=20.0)
    assert "1/1" in capsys.readouterr().err


def test_mirrorme_without_pose_from_m4a(runs, inputs, tmp_path):
    """MirrorMe needs no pose; an AAC m4a (44.1 kHz stereo) drives it; clips on motion frames cover the audio."""
    out = tmp_path / "m.mp4"
    cfg = _compose("generate", FAST + ["family=mirrorme", f"ckpt_path={runs['mirrorme']}", f"ref={inputs / 'ref.png'}",
                                       f"audio={inputs / 'talk.m4a'}", f"output={out}", "guidance_scale=1.0"], tmp_path)
    generate(cfg)
    assert _audio_seconds(inputs / "talk.m4a") == pytest.approx(0.4, abs=1e-4)  # AAC's end padding is not audio
    _check_mp4(out, 0.4, fps=25.0)


def test_batch_mode_skips_a_bad_row_and_finished_outputs(runs, inputs, tmp_path, capsys, monkeypatch):
    """Bad rows are one line each, the good one is written (in the background writer's thread, so that the next row
    samples meanwhile), and a re-run skips it."""
    import threading

    writers = []
    write_video = media.write_video

    def spy(*args, **kwargs):
        writers.append(threading.current_thread().name)
        return write_video(*args, **kwargs)

    monkeypatch.setattr(media, "write_video", spy)
    listing = inputs / "list.txt"
    listing.write_text("# image audio pose ground-truth\n"
                       "ref.png talk.wav pose.npy gt_clip.mp4\n"
                       "not_image.png talk.wav pose.npy\n"
                       "ref.png\n")
    out_dir = tmp_path / "outs"
    args = FAST + [f"ckpt_path={runs['echomimic_v2']}", f"list={listing}", f"output_dir={out_dir}",
                   "guidance_scale=1.0"]
    code, err = _run(args, tmp_path, capsys)
    assert code == 2
    good = out_dir / "gt_clip.mp4"  # named after the row's ground-truth video
    _check_mp4(good, _audio_seconds(inputs / "talk.wav"), fps=20.0)
    assert any("row 3 of list.txt" in ln and "not_image.png" in ln and "not an image" in ln for ln in err), err
    assert any("row 4 of list.txt" in ln and "expected 2-4 columns" in ln for ln in err), err
    assert err[-1] == "generated 1, skipped 0 (already done), failed 2"
    assert len(writers) == 1 and writers[0].startswith("mp4-writer"), writers
    mtime = good.stat().st_mtime_ns
    code, err = _run(args, tmp_path, capsys)  # re-run: the finished row is skipped, the bad rows fail again
    assert code == 2 and err[-1] == "generated 0, skipped 1 (already done), failed 2"
    assert good.stat().st_mtime_ns == mtime
    assert (out_dir / "summary.json").is_file()


BAD = {
    "not an image": (["ref={d}/not_image.png"], "ref='{d}/not_image.png' is not an image"),
    "silent audio": (["audio={d}/silent.wav"], "audio='{d}/silent.wav' is silent"),
    "zero-length audio": (["audio={d}/empty.wav"], "audio='{d}/empty.wav' has no audio samples (zero-length audio)"),
    "undecodable audio": (["audio={d}/not_image.png"], "audio='{d}/not_image.png': not decodable audio"),
    "pose shorter than the audio": (["pose={d}/pose_short.npy"], "pose='{d}/pose_short.npy' has 4 frames"),
    "driving video without the pose model": (["pose={d}/driving.mp4", "pose_extractor.det_model={d}/nothing/yolox.onnx"],
                                             "pose_extractor.det_model='{d}/nothing/yolox.onnx': ONNX file not found"),
    "no pose for EchoMimicV2": (["pose=null"], "or pose=auto with pose_model.ckpt_path"),
    "checkpoint of the other family": (["ckpt_path={mirrorme}", "run_config=null"],
                                       "is a checkpoint of family mirrorme, but this run builds family echomimic_v2"),
    "resolution the autoencoder cannot take": (["resolution=30"], "resolution=[30, 30]: the model's autoencoder needs"),
    "MirrorMe clip length": (["family=mirrorme", "ckpt_path={mirrorme}", "clip_frames=12"],
                             "clip_frames=12: MirrorMe's causal autoencoder needs 1 + k*8 frames"),
    "checkpoint that does not fit the model config": (["run_config=null", "model/audio_encoder=whisper_random_tiny_release"],
                                                       "its weights do not fit the model config"),
    "missing weights directory": (["ckpt_path=null", "model=echomimic_v2", "paths.pretrained_dir={d}/nothing"],
                                  "model.autoencoder.path"),
}


def test_driving_video_pose_through_the_pipelines_extractor(runs, inputs, tmp_path):
    """pose=<driving video>: its keypoints come from the data pipeline's extractor (the sidecar route: one row per
    source frame next to the video), resampled by presentation time to the output fps (the run's 20 fps from a
    30 fps video), and drive EchoMimicV2 to an mp4 as long as the audio."""
    from halfbody.generation.inputs import driving_video_pose

    n_src = 15  # 0.5 s at 30 fps: covers the 0.4 s audio
    media.write_video(tmp_path / "drive.mp4", np.zeros((n_src, 16, 16, 3), np.uint8), 30.0)
    side = np.repeat(person_keypoints(1), n_src, axis=0)
    side[:, :, 0] = 0.1 + 0.01 * np.arange(n_src)[:, None]  # x tells which source frame a row came from
    np.save(tmp_path / "drive.npy", side)
    kpts = driving_video_pose(str(tmp_path / "drive.mp4"), "pose", 20.0, {"extractor": "sidecar"})
    assert kpts.shape == (10, 133, 3)
    shown = np.round((kpts[:, 0, 0] - 0.1) / 0.01)
    for j, src in enumerate(shown):  # output frame j at j / 20 s shows the source frame nearest in time
        assert src in (np.floor(j * 1.5), np.ceil(j * 1.5)), (j, src)
    out = tmp_path / "driven.mp4"
    cfg = _compose("generate", FAST + [f"ckpt_path={runs['echomimic_v2']}", f"ref={inputs / 'ref.png'}",
                                       f"audio={inputs / 'talk.wav'}", f"pose={tmp_path / 'drive.mp4'}",
                                       "pose_extractor.extractor=sidecar", f"output={out}", "guidance_scale=1.0"],
                   tmp_path)
    assert generate(cfg)["generated"] == [str(out)]
    _check_mp4(out, _audio_seconds(inputs / "talk.wav"), fps=20.0)


def test_the_generation_package_names_no_family():
    """generate knows no family by name: what differs comes from the family's pipeline class (pose required, sampler
    variants, long-video options), so no code (docstrings and comments aside) in halfbody.generation or the entry
    names a family, its module class or its sampling call."""
    import ast

    root = REPO_ROOT / "src" / "halfbody"
    names = ("echomimic", "mirrorme", "EchoMimicV2", "MirrorMe", "generate_long")
    for path in [root / "generate.py", *sorted((root / "generation").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            text = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings else node.id if isinstance(node, ast.Name)
                    else node.attr if isinstance(node, ast.Attribute) else None)
            if text:
                assert not any(n.lower() in text.lower() for n in names), (path.name, node.lineno, text)


def test_a_sharded_checkpoint_directory_loads_its_shards(runs, inputs, tmp_path):
    """ckpt_path=<a trainer=fsdp checkpoint directory> (torch.distributed.checkpoint shards + Lightning's meta.pt,
    written here in one process): generate reads its tensors through halfbody.utils.sharded_checkpoint, finds the
    run's config beside it, and builds exactly the model the .ckpt gives."""
    import torch
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from halfbody.generation.model import build_model, plan_model

    src = runs["echomimic_v2"]
    run = src.parent.parent
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    sharded = run / "checkpoints" / "sharded.ckpt"
    dcp.save({"state_dict": ckpt["state_dict"]}, storage_writer=dcp.FileSystemWriter(str(sharded)), no_dist=True)
    torch.save({k: v for k, v in ckpt.items() if k not in ("state_dict", "optimizer_states")},
               sharded / _METADATA_FILENAME)
    base = FAST + ["guidance_scale=1.0"]
    want = build_model(plan_model(_compose("generate", base + [f"ckpt_path={src}"], tmp_path))).state_dict()
    plan = plan_model(_compose("generate", base + [f"ckpt_path={sharded}"], tmp_path))
    assert plan.settings.fps == 20.0  # the run's config, found from the directory as from a .ckpt
    got = build_model(plan).state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    (sharded / ".metadata").unlink()  # an interrupted copy: one line
    with pytest.raises(UserError, match="is an incomplete sharded checkpoint"):
        plan_model(_compose("generate", base + [f"ckpt_path={sharded}"], tmp_path))


@pytest.mark.parametrize("family", ["echomimic_v2", "mirrorme"])
def test_sampling_encodes_conditions_once_and_reads_nothing_back(family):
    """What generate runs per video (the module's generate_video on the family's pipeline, CFG on): the reference,
    the audio features and (EchoMimicV2) the pose residuals are encoded once per video / clip and reused by every
    step and by the unconditional branch; and from the first network pass to the decoded video nothing is read back
    from the device (the structural check of test_hot_path_syncs: every read-back raises)."""
    import hydra
    import torch
    from test_hot_path_syncs import forbid_read_backs

    torch.manual_seed(0)
    extra = ["model.phd_loss=null"] if family == "echomimic_v2" else []  # a training loss: not needed to sample
    model = hydra.utils.instantiate(compose_train([f"family={family}", *extra]).model).eval()
    net = model.network
    calls = {"passes": 0, "audio": 0, "ref": 0, "pose": 0, "conditions": 0}
    guard = contextlib.ExitStack()
    seen: list[str] = []

    def on_pass(*_):
        calls["passes"] += 1
        if calls["passes"] == 1:  # from the first network pass on, every device read-back raises
            guard.enter_context(forbid_read_backs(seen))

    net.register_forward_hook(on_pass)
    model.audio_encoder.register_forward_hook(lambda *_: calls.__setitem__("audio", calls["audio"] + 1))
    encode_image = model.autoencoder.encode_image
    model.autoencoder.encode_image = lambda x: calls.__setitem__("ref", calls["ref"] + 1) or encode_image(x)
    if family == "echomimic_v2":
        frames, options = 13, {}  # two 12-frame context windows
        encode_pose = net.encode_pose
        net.encode_pose = lambda *a, **k: calls.__setitem__("pose", calls["pose"] + 1) or encode_pose(*a, **k)
        net.pose_encoder.register_forward_hook(lambda *_: calls.__setitem__("conditions", calls["conditions"] + 1))
    else:
        frames, options = 10, {"clip_frames": 9, "motion_latent_frames": 1}  # two clips on motion frames
        encode_conditions = net.encode_conditions
        net.encode_conditions = lambda *a, **k: calls.__setitem__("conditions", calls["conditions"] + 1) \
            or encode_conditions(*a, **k)
    g, size = torch.Generator().manual_seed(0), 32
    mask = torch.zeros(1, 1, 1, size, size)
    mask[..., 4:12, 10:22] = 1
    cond = {"ref": torch.rand(1, 3, size, size, generator=g) * 2 - 1, "fps": torch.tensor([25.0]),
            "audio": torch.randn(1, 8000, generator=g) * 0.1, "pose": torch.rand(1, frames, 3, size, size, generator=g),
            **{k: mask.expand(1, frames, 1, size, size) for k in ("mask_lips", "mask_head", "mask_face")}}
    steps = 2
    with torch.no_grad(), guard:
        video = model.generate_video(cond, frames, **options, num_inference_steps=steps, guidance_scale=2.5,
                                     generator=torch.Generator().manual_seed(0))
    assert seen == [] and video.shape == (1, frames, 3, size, size)
    assert calls["audio"] == 1 and calls["ref"] == 1  # once per video
    # windows x steps (EchoMimicV2) or clips x steps (MirrorMe), the CFG branches in one batch
    assert calls["passes"] == model.pipeline.network_passes(frames, steps, **options) == 2 * steps
    if family == "echomimic_v2":
        assert calls["pose"] == 1 and calls["conditions"] == 1  # the pose encoder once per clip (13 frames < 16)
    else:
        assert calls["conditions"] == 2  # once per clip (audio and hand pose), for both CFG branches


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(case, runs, inputs, tmp_path, capsys):
    extra, expected = BAD[case]
    fill = {"d": inputs, "mirrorme": runs["mirrorme"]}
    args = FAST + [f"ckpt_path={runs['echomimic_v2']}", f"ref={inputs / 'ref.png'}", f"audio={inputs / 'talk.wav'}",
                   f"pose={inputs / 'pose.npy'}", f"output={tmp_path / 'x.mp4'}"] + [a.format(**fill) for a in extra]
    code, err = _run(args, tmp_path, capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected.format(**fill) in err[0], err
    assert not (tmp_path / "x.mp4").exists()


def test_pose_policy_hold_and_bf16(runs, inputs, tmp_path):
    out = tmp_path / "h.mp4"
    cfg = _compose("generate", FAST + [f"ckpt_path={runs['echomimic_v2']}", f"ref={inputs / 'ref.png'}",
                                       f"audio={inputs / 'talk.wav'}", f"pose={inputs / 'pose_short.npy'}",
                                       "pose_policy=hold", f"output={out}", "guidance_scale=1.0",
                                       "precision=bf16-mixed"], tmp_path)  # bf16 autocast (CPU here), fp32 audio encoder
    generate(cfg)
    _check_mp4(out, _audio_seconds(inputs / "talk.wav"), fps=20.0)


def test_cli_bad_image_one_line_exit_2(runs, inputs, tmp_path):
    """The real entry point: a file that is not an image fails in one line with exit code 2, before the model."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "halfbody.generate", f"ckpt_path={runs['echomimic_v2']}",
         f"ref={inputs / 'not_image.png'}", f"audio={inputs / 'talk.wav'}", f"pose={inputs / 'pose.npy'}",
         f"output={tmp_path / 'x.mp4'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ref=") and "is not an image" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_keypoint_crop_frames_the_reference_like_a_training_clip(runs, inputs, tmp_path):
    """crop=auto with ref_keypoints: the half-body box of the image's keypoints (video_to_shards' crop) becomes the
    canvas; a centre crop of the same tall image cuts the person elsewhere. Pose keypoints share the geometry."""
    from halfbody.generation.conditions import prepare
    from halfbody.generation.jobs import Job
    from halfbody.generation.model import plan_model

    kpts = person_keypoints(1)
    kpts[0, :, 1] = 0.1 + 0.4 * kpts[0, :, 1]  # the person in the top half of a tall 100 x 300 image
    np.save(tmp_path / "ref_kpts.npy", kpts[0])
    Image.fromarray(np.full((300, 100, 3), 128, np.uint8)).save(tmp_path / "tall.jpg")
    cfg = _compose("generate", FAST + [f"ckpt_path={runs['echomimic_v2']}"], tmp_path)
    settings = plan_model(cfg).settings
    np.save(tmp_path / "pose10.npy", np.repeat(kpts, 10, axis=0))
    job = Job(ref=str(tmp_path / "tall.jpg"), audio=str(inputs / "talk.wav"), pose=str(tmp_path / "pose10.npy"),
              ref_keypoints=str(tmp_path / "ref_kpts.npy"), output=tmp_path / "x.mp4")
    c = prepare(job, settings)
    face = c.ref_kpts[0, 23:91, :2]
    assert c.ref.shape == (3, 32, 32)
    assert 0 < face[:, 1].min() and face[:, 1].max() < 32 * 0.6  # the head in the upper part of the canvas
    body = c.ref_kpts[0, :17][c.ref_kpts[0, :17, 2] > 0.3]
    assert (body[:, :2] >= -0.5).all() and (body[:, :2] <= 32.5).all()  # every visible body keypoint on the canvas
    np.testing.assert_allclose(c.pose_kpts[0], c.ref_kpts[0], atol=1e-4)  # the pose went through the same crop
    settings.crop = "center"
    centre = prepare(job, settings)
    assert centre.ref_kpts[0, 23:91, 1].max() < 0  # the centre square (rows 100-200) is below the face


def test_the_checkpoints_curriculum_phase_sets_pose_groups_and_audio_region(runs, inputs, tmp_path):
    """A run with a curriculum: generation uses the phase the checkpoint was taken in (its CurriculumCallback state),
    here a lips phase (pose map without lips, audio through the lips mask drawn from the pose keypoints)."""
    import torch

    from halfbody.generation.jobs import jobs_from, run_job
    from halfbody.generation.model import build_model, plan_model

    src = runs["echomimic_v2"]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["callbacks"] = {"CurriculumCallback": {"phase_index": 0, "phase_name": "lips", "global_step": 2}}
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    run_cfg = OmegaConf.load(src.parent.parent / ".hydra" / "config.yaml")
    run_cfg.callbacks = {"curriculum": {"phases": [
        {"name": "lips", "steps": 1, "trainable": ["denoising_unet"], "pose_groups": "no_lips", "audio_region": "lips"},
        {"name": "hands", "steps": 1, "trainable": ["denoising_unet"], "pose_groups": "hands", "audio_region": "global"},
    ]}}
    (run / ".hydra").mkdir()
    OmegaConf.save(run_cfg, run / ".hydra" / "config.yaml")
    out = tmp_path / "lips.mp4"
    cfg = _compose("generate", FAST + [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"ref={inputs / 'ref.png'}",
                                       f"audio={inputs / 'talk.wav'}", f"pose={inputs / 'pose.npy'}", f"output={out}",
                                       "guidance_scale=1.0"], tmp_path)
    plan = plan_model(cfg)
    assert plan.settings.pose_groups == "no_lips"
    model = build_model(plan)
    assert model.audio_region == "lips"
    (job,), _, _ = jobs_from(cfg)
    run_job(model, job, plan.settings, torch.device("cpu"), cfg)
    _check_mp4(out, _audio_seconds(inputs / "talk.wav"), fps=20.0)


@pytest.mark.slow
def test_generate_from_the_released_weights_without_a_checkpoint(inputs, pretrained_dir, tmp_path):
    """No ckpt_path: model=echomimic_v2 model/network=echomimic_v2_official builds from (tiny, random) files with the
    release's names and layout (denoising_unet.pth, ..., audio_processor/tiny.pt, sd-vae-ft-mse/) and generates."""
    import torch
    from test_echomimic_v2_official import release_files

    from halfbody.echomimic_v2.network import tiny_unet_config

    root = pretrained_dir  # tiny sd-image-variations UNet config, sd-vae-ft-mse, the release's tiny.pt
    files = release_files(seed=7, unet=dict(tiny_unet_config(latent_channels=4)), audio_dim=32,
                          pose_widths=(8, 16, 32))
    for name, sd in files.items():
        torch.save(sd, root / "EchoMimicV2" / name)
    out = tmp_path / "release.mp4"
    cfg = _compose("generate", FAST + ["ckpt_path=null", "model=echomimic_v2", "model/network=echomimic_v2_official",
                                       f"paths.pretrained_dir={root}", f"ref={inputs / 'ref.png'}",
                                       f"audio={inputs / 'talk.wav'}", f"pose={inputs / 'pose.npy'}",
                                       f"output={out}", "sampler=release_acc"], tmp_path)
    generate(cfg)
    _check_mp4(out, _audio_seconds(inputs / "talk.wav"), fps=25.0)
