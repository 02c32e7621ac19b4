"""data_pipelines.video_to_shards on real videos: synthetic talkers written with PyAV (with sidecar keypoints) and
the bad inputs of issue 5, through the real pipeline, into shards the shared datamodule loads; plus the inspector."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from shard_utils import broken_sample, write_shard

from data_pipelines.video_to_shards import ConfigError, load_config, pipeline, run, writer
from data_pipelines.video_to_shards import inspect as inspector
from data_pipelines.video_to_shards.__main__ import main as cli_main
from data_pipelines.video_to_shards.decode import Frame, VideoReader, decode_audio
from data_pipelines.video_to_shards.keypoints import make_extractor
from data_pipelines.video_to_shards.scenes import ClipCutter
from data_pipelines.video_to_shards.sources import list_sources, parse_timecode
from data_pipelines.video_to_shards.synthetic import talker_video, write_mp4
from halfbody.data.datamodule import HalfBodyDataModule, expand_shards
from halfbody.data.media import AUDIO_SAMPLE_RATE, read_video, read_video_audio, read_wav, write_wav

ROOT = Path(__file__).resolve().parents[1]
S = 128  # half-body crop size
OVERRIDES = ["crop.size=128", "crop.headshot=true", "crop.headshot_size=64", "scenes.min_clip_seconds=0.8",
             "scenes.max_clip_seconds=2", "video.max_side=256", "shards.clips_per_shard=4",
             "filters.min_scene_seconds=0.8"]
CANVAS = (256, 144)
DOT = (17, 0.24, 0.22)  # a foot keypoint moved beside the head (not used for the crop box), drawn as a dot

# source -> the rejection categories it must give (empty: accepted as a whole)
EXPECTED = {
    "alice.mp4": set(),
    "bob.mp4": set(),  # a real camera cut at 2 s: two clips
    "cuts.mp4": {"too-fast camera cuts"},
    "silent.mp4": {"audio silent"},
    "noaudio.mp4": {"no audio"},
    "sepaudio.mp4": set(),  # no audio track, but sepaudio.wav next to it
    "short.mp4": {"clip too short"},
    "rotated.mp4": set(),  # portrait phone video (display rotation 90)
    "big.mp4": set(),  # 3840x2160
    "vfr.mp4": set(),
    "nosidecar.mp4": {"missing sidecar"},
    "twopeople.mp4": {"more than one person"},
    "faceless.mp4": {"face not visible"},
    "lowconf.mp4": {"low keypoint confidence"},
    "truncated.mp4": {"undecodable video"},  # moov atom at the end: nothing decodes
    "halfcut.mp4": {"truncated video"},  # moov atom first: the first part decodes and is used
    "junk.mkv": {"undecodable video"},
}
CLIPS = {"alice": 2, "bob": 2, "halfcut": 1, "sepaudio": 1, "rotated": 1, "big": 1, "vfr": 1}  # half-body clips per source


def _cfg(*extra: str):
    return load_config(None, OVERRIDES + list(extra))


def _make_inputs(d: Path) -> dict:
    d.mkdir(parents=True)
    info = {}
    info["alice"] = talker_video(d / "alice.mp4", index=0, seconds=3.0, canvas=CANVAS, dot=DOT)
    talker_video(d / "bob.mp4", index=1, seconds=4.0, canvas=CANVAS, shot_seconds=2.0)
    talker_video(d / "cuts.mp4", index=2, seconds=2.0, canvas=CANVAS, shot_seconds=0.4)
    talker_video(d / "silent.mp4", index=3, seconds=1.2, canvas=CANVAS, audio="silent")
    talker_video(d / "noaudio.mp4", index=4, seconds=1.2, canvas=CANVAS, audio=None)
    sep = talker_video(d / "sepaudio.mp4", index=5, seconds=1.2, canvas=CANVAS, audio=None)
    write_wav(d / "sepaudio.wav", sep["audio"])
    talker_video(d / "short.mp4", index=6, seconds=0.5, canvas=CANVAS)
    info["rotated"] = talker_video(d / "rotated.mp4", index=7, seconds=1.2, canvas=(144, 256), person=144,
                                   rotation=90, dot=DOT)
    info["big"] = talker_video(d / "big.mp4", index=8, seconds=1.0, fps=8, canvas=(3840, 2160), person=720,
                               dot=DOT, dot_radius=20)
    talker_video(d / "vfr.mp4", index=9, seconds=1.2, canvas=CANVAS, vfr=True)
    talker_video(d / "nosidecar.mp4", index=10, seconds=1.2, canvas=CANVAS, sidecar=False)
    talker_video(d / "twopeople.mp4", index=11, seconds=1.2, canvas=(320, 144), person=144, people=2)
    # Copies of alice with edited sidecars, and broken files.
    for name in ("faceless", "lowconf"):
        shutil.copy(d / "alice.mp4", d / f"{name}.mp4")
    k = np.load(d / "alice.npy")
    face = k.copy()
    face[:, 23:91, 2] = 0.0
    np.save(d / "faceless.npy", face)
    low = k.copy()
    low[..., 2] *= 0.4
    np.save(d / "lowconf.npy", low)
    data = (d / "alice.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) // 2])
    shutil.copy(d / "alice.npy", d / "truncated.npy")
    (d / "junk.mkv").write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 16)
    with av.open(str(d / "alice.mp4")) as src, av.open(str(d / "halfcut.mp4"), "w", options={"movflags": "faststart"}) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for pkt in src.demux():
            if pkt.dts is not None:
                pkt.stream = streams[pkt.stream.index]
                dst.mux(pkt)
    data = (d / "halfcut.mp4").read_bytes()
    (d / "halfcut.mp4").write_bytes(data[: int(len(data) * 0.6)])
    shutil.copy(d / "alice.npy", d / "halfcut.npy")
    return info


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2s")
    info = _make_inputs(root / "in")
    report = run(root / "in", root / "out", _cfg(), workers=2, progress=False)  # worker processes
    return root, info, report


def _read_tars(paths) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                key, fld = m.name.split(".", 1)
                out.setdefault(key, {})[fld] = tf.extractfile(m).read()
    return out


def _mtimes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ the main run
def test_rejection_reasons(made):
    root, _, report = made
    got: dict[str, set] = {label: set() for label in EXPECTED}
    for label, where, reason in report.rejections:
        assert "\n" not in reason and reason.split(":", 1)[0] in reason, reason
        got[label].add(reason.split(":", 1)[0])
    assert got == EXPECTED
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    assert manifest["rejections"]["total"] == len(report.rejections)
    assert manifest["sources"] == {"total": len(EXPECTED), "with_clips": len(CLIPS), "without_clips": len(EXPECTED) - len(CLIPS)}
    # Reasons name their threshold's config key.
    reasons = {r[2] for r in report.rejections}
    for key in ("filters.min_scene_seconds", "filters.min_audio_dbfs", "scenes.min_clip_seconds",
                "filters.min_single_person_fraction", "filters.min_face_fraction", "filters.min_keypoint_confidence"):
        assert any(key in r for r in reasons), key


def test_shards_and_manifest(made):
    root, _, report = made
    out = root / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    shards = expand_shards(str(out), "out")
    assert [Path(s).name for s in shards] == [s["name"] for s in manifest["shards"]]
    assert all(s["num_samples"] <= 4 for s in manifest["shards"])  # shards.clips_per_shard
    samples = _read_tars(shards)
    n_half = sum(CLIPS.values())
    assert len(samples) == manifest["num_clips"] == 2 * n_half  # a headshot per half-body clip
    assert manifest["kinds"] == {"halfbody": n_half, "headshot": n_half}
    assert manifest["identities"] == {k: 2 * v for k, v in CLIPS.items()}
    # Deterministic order: input order (sorted paths), clips in time order.
    keys = [k for p in shards for k in _read_tars([p])]
    assert keys == sorted(keys, key=lambda k: (sorted(CLIPS).index(k.split("_")[0]), k))
    secs = 0.0
    for key, s in samples.items():
        meta = json.loads(s["json"])
        kpts = np.load(io.BytesIO(s["kpts.npy"]))
        assert "." not in key and set(s) == {"mp4", "wav", "kpts.npy", "json"}
        assert meta["kind"] == ("headshot" if key.endswith("_head") else "halfbody")
        size = 64 if key.endswith("_head") else S
        assert (meta["width"], meta["height"], meta["fps"]) == (size, size, 25.0)
        assert kpts.dtype == np.float32 and kpts.shape == (meta["num_frames"], 133, 3)
        assert np.isfinite(kpts).all() and kpts.min() >= 0 and kpts.max() <= 1
        frames, fps = read_video(s["mp4"])
        assert frames.shape == (meta["num_frames"], size, size, 3) and fps == 25.0
        audio, rate = read_wav(s["wav"])
        assert rate == AUDIO_SAMPLE_RATE and abs(audio.shape[0] - round(meta["num_frames"] / 25 * rate)) <= 1
        assert 0 <= meta["head_box"][0] < meta["head_box"][2] <= 1
        secs += meta["num_frames"] / 25.0
    assert manifest["total_hours"] == pytest.approx(secs / 3600, abs=1e-5)
    vfr = json.loads(samples["vfr_0000"]["json"])
    assert vfr["num_frames"] in (29, 30)  # 1.12 s + the last frame's duration of variable-rate video at 25 fps
    assert json.loads(samples["big_0000"]["json"])["crop"]["source_size"] == [3840, 2160]
    assert json.loads(samples["rotated_0000"]["json"])["crop"]["source_size"] == [144, 256]  # portrait as displayed
    assert not list((out / "_sources").glob("*.tar"))  # parts are removed once packed


def test_shards_load_in_datamodule(made):
    root, _, _ = made
    dm = HalfBodyDataModule(str(root / "out"), num_frames=8, resolution=64, batch_size=2, batches_per_epoch=2,
                            num_workers=0, val_samples=None, shuffle_buffer=2)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2 and train[0]["video"].shape == (2, 8, 3, 64, 64)
    keys, kinds = [], set()
    for b in dm.val_dataloader():
        assert b["bad_samples"] == []
        assert b["pose"].amax() > 0 and b["mask_lips"].sum() > 0
        keys += b["key"]
        kinds |= set(b["kind"])
    assert len(keys) == 2 * sum(CLIPS.values()) and kinds == {"halfbody", "headshot"}
    assert dm.bad_ledger.num_bad == 0


def _dot_centre(frame: np.ndarray, near: tuple[float, float], radius: int = 8) -> tuple[float, float, int]:
    """Greenness-weighted centre of the pure-green dot within ``radius`` px of ``near`` (gloves are far away)."""
    f = frame.astype(np.float64)
    g = np.clip(f[..., 1] - np.maximum(f[..., 0], f[..., 2]) - 60, 0, None)
    ys, xs = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    g[(np.abs(xs + 0.5 - near[0]) > radius) | (np.abs(ys + 0.5 - near[1]) > radius)] = 0
    if g.sum() == 0:
        return float("nan"), float("nan"), 0
    return float((g * (xs + 0.5)).sum() / g.sum()), float((g * (ys + 0.5)).sum() / g.sum()), int((g > 0).sum())


@pytest.mark.parametrize("name", ["alice", "rotated", "big"])
def test_keypoint_dot_lands_on_its_pixel(made, name):
    """A dot drawn on the source frame at a keypoint is at that keypoint in the cropped clip (landscape, portrait
    with a display rotation, and 4K downscaled while decoding)."""
    root, _, _ = made
    samples = _read_tars(expand_shards(str(root / "out"), "out"))
    for key in (f"{name}_0000", f"{name}_0000_head"):
        s = samples[key]
        frames, _ = read_video(s["mp4"])
        kpts = np.load(io.BytesIO(s["kpts.npy"]))
        size = frames.shape[1]
        for t in (0, len(frames) // 2, len(frames) - 1):
            kx, ky, score = kpts[t, DOT[0]]
            x, y, area = _dot_centre(frames[t], (kx * size, ky * size))
            assert score == 1.0 and 2 <= area <= 80, (key, t, area, score)
            assert abs(x - kx * size) <= 1.0 and abs(y - ky * size) <= 1.0, (key, t, (x, y), (kx * size, ky * size))


def test_rerun_is_a_noop_and_new_sources_append(made, tmp_path):
    root, _, _ = made
    shutil.copytree(root / "in", tmp_path / "in")
    shutil.copytree(root / "out", tmp_path / "out")
    before = _mtimes(tmp_path / "out")
    again = run(tmp_path / "in", tmp_path / "out", _cfg(), workers=1, progress=False)
    assert (again.processed, again.skipped, again.shards_written) == (0, len(EXPECTED), [])
    assert _mtimes(tmp_path / "out") == before
    # A new video: only it is processed, into a new shard after the existing ones.
    talker_video(tmp_path / "in" / "zoe.mp4", index=20, seconds=1.2, canvas=CANVAS)
    more = run(tmp_path / "in", tmp_path / "out", _cfg(), workers=1, progress=False)
    assert more.processed == 1 and more.clips == 2
    after = _mtimes(tmp_path / "out")
    old_shards = [n for n in before if n.endswith(".tar")]
    assert all(after[n] == before[n] for n in old_shards)
    assert more.shards_written == [f"clips-{len(old_shards):06d}.tar"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["identities"]["zoe"] == 2 and manifest["num_clips"] == 2 * sum(CLIPS.values()) + 2
    # A second run on a folder in use is refused at once.
    with writer.exclusive(tmp_path / "out"), pytest.raises(ConfigError, match="in use by another run"):
        run(tmp_path / "in", tmp_path / "out", _cfg(), workers=1, progress=False)
    # Another configuration on the same folder is refused, naming the key.
    with pytest.raises(ConfigError, match=r"crop\.size"):
        run(tmp_path / "in", tmp_path / "out", _cfg("crop.size=96"), workers=1, progress=False)


def test_interrupted_run_loses_nothing_finished(made, tmp_path, monkeypatch):
    """Ctrl-C mid-run keeps finished sources; the next run does only the rest, and the shards equal those of the
    uninterrupted run (which used worker processes; this one runs in-process)."""
    root, _, _ = made
    src = tmp_path / "in"
    src.mkdir()
    for name in ("alice", "bob", "vfr"):
        shutil.copy(root / "in" / f"{name}.mp4", src)
        shutil.copy(root / "in" / f"{name}.npy", src)
    real = pipeline.process_source

    def crash_on_vfr(source, *a, **kw):
        if source.sid == "vfr":
            raise KeyboardInterrupt
        return real(source, *a, **kw)

    monkeypatch.setattr(pipeline, "process_source", crash_on_vfr)
    with pytest.raises(KeyboardInterrupt):
        run(src, tmp_path / "out", _cfg(), workers=1, progress=False)
    journals = sorted(p.name for p in (tmp_path / "out" / "_sources").glob("*.json") if p.name != "config.json")
    assert journals == ["alice.json", "bob.json"] and not list((tmp_path / "out").glob("*.tar"))
    (tmp_path / "out" / ".clips-000000.tar.abc.tmp").write_bytes(b"half a shard")  # left by a killed packer
    monkeypatch.setattr(pipeline, "process_source", real)
    resumed = run(src, tmp_path / "out", _cfg(), workers=1, progress=False)
    assert (resumed.processed, resumed.skipped) == (1, 2)
    assert not list((tmp_path / "out").glob(".*.tmp"))
    got = _read_tars(expand_shards(str(tmp_path / "out"), "out"))
    want = {k: v for k, v in _read_tars(expand_shards(str(root / "out"), "out")).items()
            if k.split("_")[0] in ("alice", "bob", "vfr")}
    assert list(got) == list(want)
    assert all(got[k]["kpts.npy"] == want[k]["kpts.npy"] and got[k]["json"] == want[k]["json"] for k in got)


# ------------------------------------------------------------------------------------------ list files, decoding
def test_list_file_segments(made, tmp_path):
    root, info, _ = made
    listing = tmp_path / "emtd.txt"
    listing.write_text(
        "# url-or-path start end [identity]\n"
        "alice.mp4 00:00:01.2 00:00:02.8 speaker_a\n"
        "https://www.youtube.com/watch?v=alice 0 1.0\n"
        "alice.mp4 5 9\n"
        "alice.mp4 2.0 9.0\n"
        "gone.mp4 0 1\n"
        "alice.mp4 1:xx 2\n"
        "alice.mp4 2 1\n")
    cfg = _cfg("crop.headshot=false", f"input.video_dir={root / 'in'}")
    rep = run(listing, tmp_path / "out", cfg, workers=1, progress=False)
    reasons = {label: reason for label, _, reason in rep.rejections}
    assert reasons["emtd.txt:4"].startswith("timecodes outside video: segment 5.00-9.00 s")
    assert reasons["emtd.txt:5"].startswith("timecodes outside video: segment 2.00-9.00 s")
    assert reasons["emtd.txt:6"].startswith("video not found: 'gone.mp4'")
    assert reasons["emtd.txt:7"].startswith("bad list entry: bad timecode '1:xx'")
    assert reasons["emtd.txt:8"].startswith("bad list entry: end 1 is not after start 2")
    samples = _read_tars(expand_shards(str(tmp_path / "out"), "out"))
    assert sorted(samples) == ["alice_000000000_000001000_0000", "alice_000001200_000002800_0000"]
    s = samples["alice_000001200_000002800_0000"]
    meta = json.loads(s["json"])
    assert meta["identity"] == "speaker_a" and meta["num_frames"] == 40
    assert meta["source"] == "emtd.txt:2@1.200-2.800"
    # Frame indexing after a seek: the clip's keypoints are the sidecar's frames 30.. through the crop.
    sidecar = np.load(root / "in" / "alice.npy")
    x0, y0, x1, y1 = meta["crop"]["box"]
    kpts = np.load(io.BytesIO(s["kpts.npy"]))
    want = sidecar[30:70].copy()
    want[..., 0] = (want[..., 0] - x0) / (x1 - x0)
    want[..., 1] = (want[..., 1] - y0) / (y1 - y0)
    vis = kpts[..., 2] > 0
    np.testing.assert_allclose(kpts[vis][:, :2], want[vis][:, :2], atol=2e-3)
    # Audio alignment: the clip's audio is the source voice from 1.2 s (AAC-coded; peak of the cross-correlation).
    clip_audio, _ = read_wav(s["wav"])
    voice = info["alice"]["audio"]
    a0 = int(1.2 * AUDIO_SAMPLE_RATE)
    lags = range(-160, 161, 4)
    corr = [float(np.dot(clip_audio[400:-400], voice[a0 + 400 + lag : a0 + 400 + lag + clip_audio.size - 800])) for lag in lags]
    assert abs(list(lags)[int(np.argmax(corr))]) <= 16  # within 1 ms


def test_parse_timecode_and_list_columns(tmp_path):
    assert parse_timecode("75") == 75 and parse_timecode("01:15.5") == 75.5 and parse_timecode("1:00:00") == 3600
    for bad in ("1:75", "-3", "a", "1::2"):
        with pytest.raises(ValueError, match="bad timecode"):
            parse_timecode(bad)
    (tmp_path / "abc.mp4").write_bytes(b"")
    (tmp_path / "l.txt").write_text("abc.mp4 1 2 3 4\nhttps://youtu.be/abc 0 5  # a comment\n")
    a, b = list_sources(tmp_path / "l.txt", _cfg())
    assert a.error.startswith("bad list entry: expected 'path start end [identity]', got 5 column(s)")
    assert b.error is None and Path(b.video).name == "abc.mp4" and (b.start, b.end) == (0.0, 5.0)


def test_variable_frame_rate_is_resampled_by_time(tmp_path):
    """Frames with grey level = source index, at irregular times: output frame j shows the source frame nearest to
    j / fps, and carries its source index (what sidecar keypoints are indexed by)."""
    times = np.array([0.0, 0.03, 0.06, 0.13, 0.2, 0.21, 0.3, 0.41, 0.44, 0.5])
    frames = np.stack([np.full((32, 48, 3), 20 + 20 * i, np.uint8) for i in range(len(times))])
    write_mp4(tmp_path / "v.mp4", frames, 25.0, times=times, crf=0)
    got = list(VideoReader(str(tmp_path / "v.mp4"), 25.0, 64, need_src_index=True))
    assert len(got) == 14  # up to 0.5 s + the last frame's duration (1/25 s), at 25 fps
    for f in got:
        t = f.index / 25.0
        want = int(np.argmin(np.abs(times - t)))
        assert f.src_index == want, (f.index, f.src_index, want)
        assert abs(int(f.image.mean()) - (20 + 20 * want)) <= 2


def test_clip_cutting_and_fast_cuts():
    """Scenes of 2.5, 0.5, 0.3, 4.5 and 1.2 s at 10 fps, clips of 1-2 s, scenes under 0.8 s are too-fast cuts."""
    cutter = ClipCutter(10.0, 1.0, 2.0, 0.8)
    cuts = []
    for n in (25, 5, 3, 45, 12):
        cuts += [True] + [False] * (n - 1)
    cuts[0] = False
    segs = [s for i, cut in enumerate(cuts) for s in cutter.push(Frame(i, i / 10, i, np.zeros((2, 2, 3), np.uint8)), cut)]
    segs += cutter.flush()
    got = [(s.start_index, s.num_frames, (s.rejection or "").split(":")[0]) for s in segs]
    assert got == [(0, 12, ""), (12, 13, ""), (25, 8, "too-fast camera cuts"), (33, 20, ""), (53, 12, ""),
                   (65, 13, ""), (78, 12, "")]
    assert "2 scenes of 0.40 s" in segs[2].rejection
    assert all(len(s.frames) == s.num_frames for s in segs if not s.rejection)


def test_audio_alignment_of_the_video_track(tmp_path):
    """A tone burst in the video's own AAC track decodes at its time (AAC priming handled)."""
    rate = AUDIO_SAMPLE_RATE
    audio = np.zeros(rate, np.float32)
    audio[int(0.5 * rate) : int(0.6 * rate)] = 0.5 * np.sin(2 * np.pi * 800 * np.arange(int(0.1 * rate)) / rate)
    write_mp4(tmp_path / "a.mp4", np.zeros((25, 32, 32, 3), np.uint8), 25.0, audio)
    a = decode_audio(str(tmp_path / "a.mp4"), 0.25, 0.9)
    env = np.abs(a) > 0.1
    onset = np.argmax(env) / rate
    assert abs(onset - 0.25) < 0.003 and a.size == int(0.65 * rate)


# ------------------------------------------------------------------------------------------ configuration
def test_config_errors_are_one_line_and_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['crop.sise'\]"):
        load_config(None, ["crop.sise=3"])
    with pytest.raises(ConfigError, match=r"config crop.size=-3: must be an even integer >= 16"):
        load_config(None, ["crop.size=-3"])
    with pytest.raises(ConfigError, match=r"scenes.max_clip_seconds=1.0: must be >= scenes.min_clip_seconds=2"):
        load_config(None, ["scenes.min_clip_seconds=2", "scenes.max_clip_seconds=1"])
    (tmp_path / "c.yaml").write_text("video:\n  fps: [25\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "c.yaml")
    cfg = load_config(ROOT / "data_pipelines" / "video_to_shards" / "example.yaml")
    assert cfg.video.fps == 25.0 and cfg.keypoints.extractor == "rtmlib"
    # The pose extractor's model files are checked before any work; the error names the key.
    cfg = _cfg("keypoints.extractor=rtmlib", f"keypoints.det_model={tmp_path / 'nope.onnx'}")
    with pytest.raises(ConfigError, match=r"keypoints.det_model=.*nope.onnx.*not found"):
        make_extractor(cfg)
    (tmp_path / "det.onnx").write_bytes(b"x")
    cfg = _cfg("keypoints.extractor=rtmlib", f"keypoints.det_model={tmp_path / 'det.onnx'}",
               f"keypoints.pose_model={tmp_path / 'pose.onnx'}")
    with pytest.raises(ConfigError, match=r"keypoints.pose_model=.*pose.onnx.*not found"):
        make_extractor(cfg)


class _FakeRtmlib:
    """Stands in for the ``rtmlib`` package (its YOLOX / RTMPose call conventions) to test the adapter alone."""

    class YOLOX:
        def __init__(self, onnx_model, model_input_size, det_mode, score_thr, backend, device):
            assert det_mode == "multiclass" and backend == "onnxruntime"

        def __call__(self, bgr):
            h, w = bgr.shape[:2]
            boxes = np.array([[0.2 * w, 0.1 * h, 0.5 * w, 0.9 * h], [0.6 * w, 0.3 * h, 0.7 * w, 0.5 * h],
                              [0, 0, 5, 5]], np.float32)
            return boxes, np.array([0, 0, 56])  # two people and a chair

    class RTMPose:
        def __init__(self, onnx_model, model_input_size, backend, device):
            self.calls = []

        def __call__(self, bgr, bboxes):
            (x0, y0, x1, y1), = bboxes
            kp = np.tile(np.array([[(x0 + x1) / 2, (y0 + y1) / 2]], np.float32), (1, 133, 1))
            return kp, np.full((1, 133), 1.7, np.float32)  # SimCC scores can exceed 1


def test_rtmlib_extractor_adapter(tmp_path, monkeypatch):
    det, pose = tmp_path / "det.onnx", tmp_path / "pose.onnx"
    det.write_bytes(b"x")
    pose.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "rtmlib", _FakeRtmlib)
    ex = make_extractor(_cfg("keypoints.extractor=rtmlib", f"keypoints.det_model={det}", f"keypoints.pose_model={pose}"))
    frames = [Frame(i, i / 25, i, np.zeros((100, 200, 3), np.uint8)) for i in range(3)]
    kpts, persons = ex.extract(frames)
    assert persons.tolist() == [2, 2, 2]  # the chair is not a person
    np.testing.assert_allclose(kpts[:, :, 0], (70 + 0.5) / 200)  # the larger person's box centre, normalised
    np.testing.assert_allclose(kpts[:, :, 1], (50 + 0.5) / 100)
    assert kpts[..., 2].max() == 1.0  # scores clipped to [0, 1]


@pytest.mark.skipif(importlib.util.find_spec("rtmlib") is None or importlib.util.find_spec("onnx") is None,
                    reason="needs the [pose] extra (rtmlib, onnxruntime) and onnx to export stand-in models")
def test_rtmlib_extractor_on_onnxruntime(tmp_path):
    """The real rtmlib + onnxruntime path with stand-in ONNX models (a person and a chair; all keypoints at the
    centre of the pose model's input)."""
    import torch

    class Det(torch.nn.Module):
        def forward(self, x):
            n = sum((640 // s) ** 2 for s in (8, 16, 32))
            out = torch.zeros(1, n, 85) + 0 * x.mean()
            for i, cls, wh in ((30 * 80 + 40, 0, 200.0), (10 * 80 + 10, 56, 60.0)):  # grid cells of stride 8
                out[0, i, 2:4] = float(np.log(wh / 8))
                out[0, i, 4] = 1.0
                out[0, i, 5 + cls] = 1.0
            return out

    class Pose(torch.nn.Module):
        def forward(self, x):
            sx, sy = torch.zeros(1, 133, 576) + 0 * x.mean(), torch.zeros(1, 133, 768) + 0 * x.mean()
            sx[0, :, 288], sy[0, :, 384] = 0.9, 0.8
            return sx, sy

    torch.onnx.export(Det(), (torch.zeros(1, 3, 640, 640),), str(tmp_path / "det.onnx"), dynamo=False)
    torch.onnx.export(Pose(), (torch.zeros(1, 3, 384, 288),), str(tmp_path / "pose.onnx"), dynamo=False)
    ex = make_extractor(_cfg("keypoints.extractor=rtmlib", f"keypoints.det_model={tmp_path / 'det.onnx'}",
                             f"keypoints.pose_model={tmp_path / 'pose.onnx'}"))
    kpts, persons = ex.extract([Frame(0, 0.0, 0, np.full((144, 256, 3), 90, np.uint8))])
    assert persons.tolist() == [1]
    # The person box is 200 px around (320, 240) of the 640-px letterboxed input: (128, 96) in the frame.
    np.testing.assert_allclose(kpts[0, :, :2], [[128.5 / 256, 96.5 / 144]] * 133, atol=2 / 256)
    np.testing.assert_allclose(kpts[0, :, 2], 0.85, atol=1e-5)


def test_cli_reports_and_fails_in_one_line(made, tmp_path, capsys):
    root, _, _ = made
    assert cli_main([str(root / "in"), "--out", str(tmp_path / "o"), "--set", "crop.size=7", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "crop.size=7" in err
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(root / "in" / "short.mp4", src)
    shutil.copy(root / "in" / "short.npy", src)
    shutil.copy(root / "in" / "noaudio.mp4", src)
    shutil.copy(root / "in" / "noaudio.npy", src)
    assert cli_main([str(src), "--out", str(tmp_path / "o2"), "--no-progress", "--workers", "1", *sum(
        (["--set", o] for o in OVERRIDES), [])]) == 0
    out = capsys.readouterr().out
    assert "2 sources: 2 processed" in out and "short.mp4 [0.00-0.48 s]: clip too short" in out
    assert "noaudio.mp4 [source]: no audio" in out


# ------------------------------------------------------------------------------------------ inspector
def test_inspector_summary(made, tmp_path):
    root, _, _ = made
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    s = inspector.summarize(str(root / "out"))
    assert s["clips"] == manifest["num_clips"] and s["kinds"] == manifest["kinds"]
    assert s["identities"] == manifest["identities"]
    assert s["hours"] == pytest.approx(manifest["total_hours"], abs=1e-5) and s["bad_samples"] == []
    face = s["keypoint_scores"]["face"]
    assert face["visible_fraction"] > 0.9 and face["p50"] >= 0.9 and sum(face["histogram"]) > 0
    # Bad samples of a hand-broken shard are listed with the loader's reasons.
    shutil.copytree(root / "out", tmp_path / "out", ignore=shutil.ignore_patterns("_sources"))
    write_shard(tmp_path / "out" / "zz-broken.tar", [broken_sample("b0", "nan_kpts"), broken_sample("b1", "missing_field"),
                                                    broken_sample("b2", "undecodable_mp4")])
    s2 = inspector.summarize(str(tmp_path / "out"))
    assert s2["clips"] == s["clips"]
    assert {(b["key"], b["reason"].split(":")[0]) for b in s2["bad_samples"]} == {
        ("b0", "NaN keypoints"), ("b1", "missing field"), ("b2", "undecodable mp4")}
    text = inspector.format_summary(s2)
    assert f"{s['clips']} clips" in text and "b2: undecodable mp4" in text


def test_inspector_preview_has_video_and_audio(made, tmp_path):
    root, _, _ = made
    out = inspector.render_preview(str(root / "out"), "bob_0001", tmp_path / "p.mp4")
    frames, fps = read_video(out)
    audio, rate = read_video_audio(out)
    assert frames.shape == (50, S, 2 * S, 3) and fps == 25.0
    assert abs(audio.shape[0] / rate - 2.0) < 0.1 and np.abs(audio).max() > 0.01
    right = frames[:, :, S:].astype(int)
    assert (right.max(-1) > 60).mean() > 0.01  # the pose map is drawn
    with av.open(str(out)) as c:
        assert c.streams.audio and c.streams.video


@pytest.mark.slow
def test_cli_modules_run_as_scripts(made, tmp_path):
    """The two commands as a user runs them (fresh processes, worker pool, progress bar on stderr)."""
    root, _, _ = made
    sets = sum((["--set", o] for o in OVERRIDES), [])
    cmd = [sys.executable, "-m", "data_pipelines.video_to_shards", str(root / "in"), "--out", str(tmp_path / "o"),
           "--workers", "2", *sets]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{len(EXPECTED)} sources: {len(EXPECTED)} processed" in r.stdout and "video_to_shards" in r.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert f"0 processed, {len(EXPECTED)} already done" in again.stdout
    r = subprocess.run([sys.executable, "-m", "data_pipelines.video_to_shards.inspect", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and f"{2 * sum(CLIPS.values())} clips" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_pipelines.video_to_shards.inspect", str(tmp_path / "o"),
                        "--preview", "alice_0000", "--out", str(tmp_path / "p.mp4")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and read_video(tmp_path / "p.mp4")[0].shape[2] == 2 * S
