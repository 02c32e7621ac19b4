"""The synthetic talker world: real shards in the public schema, and ground truth that holds on decoded files."""

from __future__ import annotations

import io
import json
import math
import tarfile
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from data_pipelines.synthetic_world import WorldConfig, generate_shards, make_identity, render_clip
from data_pipelines.synthetic_world.__main__ import main as cli_main
from data_pipelines.synthetic_world.identity import MOUTH_COLOR, palette_problems
from halfbody.data.keypoints import LEFT_HAND, LIPS, RIGHT_HAND
from halfbody.data.media import read_video, read_wav
from halfbody.metrics import oracle

NUM_CLIPS, NUM_FRAMES, FPS, RES = 10, 50, 25.0, 128
JSON_KEYS = {"fps", "num_frames", "width", "height", "kind", "identity", "source", "head_box", "synthetic"}


def _read_tars(paths) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    order = []
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                key, field = m.name.split(".", 1)
                if key not in samples:
                    order.append(key)
                samples[key][field] = tf.extractfile(m).read()
    return {k: samples[k] for k in order}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_world")
    paths = generate_shards(out, num_clips=NUM_CLIPS, seed=3, num_identities=4, resolution=RES, fps=FPS,
                            num_frames=NUM_FRAMES, clips_per_shard=4, workers=1)
    return out, paths


@pytest.fixture(scope="module")
def decoded(shard_dir):
    _, paths = shard_dir
    out = {}
    for key, s in _read_tars(paths).items():
        frames, fps = read_video(s["mp4"])
        audio, sr = read_wav(s["wav"])
        kpts = np.load(io.BytesIO(s["kpts.npy"]), allow_pickle=False)
        ref = np.asarray(Image.open(io.BytesIO(s["ref.png"])).convert("RGB")) if "ref.png" in s else None
        out[key] = dict(frames=frames, fps=fps, audio=audio, sr=sr, kpts=kpts, ref=ref, meta=json.loads(s["json"]),
                        fields=set(s))
    return out


def test_shards_follow_the_schema(shard_dir, decoded):
    out, paths = shard_dir
    assert [p.name for p in paths] == ["synthetic-00000.tar", "synthetic-00001.tar", "synthetic-00002.tar"]
    assert len(decoded) == NUM_CLIPS
    for key, d in decoded.items():
        assert "." not in key
        assert {"mp4", "wav", "kpts.npy", "json"} <= d["fields"] <= {"mp4", "wav", "kpts.npy", "json", "ref.png"}
        meta = d["meta"]
        assert JSON_KEYS <= set(meta)
        assert meta["source"] == "synthetic_world" and meta["kind"] in ("halfbody", "headshot")
        assert isinstance(meta["fps"], float) and isinstance(meta["num_frames"], int)
        assert (meta["width"], meta["height"], meta["num_frames"]) == (RES, RES, NUM_FRAMES)
        x0, y0, x1, y1 = meta["head_box"]
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        syn = meta["synthetic"]
        assert {"seed", "clip_index", "identity", "has_ref", "mouth_opening"} <= set(syn)
        assert set(syn["identity"]["palette"]) >= {"skin", "hair", "shirt", "background", "glove_left", "glove_right"}
        assert syn["has_ref"] == ("ref.png" in d["fields"])
        # video / audio
        assert d["frames"].shape == (NUM_FRAMES, RES, RES, 3) and d["frames"].dtype == np.uint8
        assert d["fps"] == pytest.approx(FPS)
        assert d["sr"] == 16000 and abs(len(d["audio"]) - NUM_FRAMES / FPS * 16000) <= 16000 / FPS
        # keypoints
        k = d["kpts"]
        assert k.dtype == np.float32 and k.shape == (NUM_FRAMES, 133, 3)
        assert np.isfinite(k).all() and (k >= 0).all() and (k <= 1).all()
        assert set(np.unique(k[..., 2])) <= {0.0, 1.0}
        assert (k[:, 13:23, 2] == 0).all(), "legs and feet are below the frame"
        assert (k[:, list(LIPS), 2] == 1).all(), "lips are always visible"
        if meta["kind"] == "halfbody":
            assert (k[:, list(LEFT_HAND) + list(RIGHT_HAND), 2] == 1).all()
            assert (k[:, 5:7, 2] == 1).all(), "shoulders are visible in a half-body crop"
        if d["ref"] is not None:
            assert d["ref"].shape == (RES, RES, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_clips"] == NUM_CLIPS
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4, 2]
    kinds = [d["meta"]["kind"] for d in decoded.values()]
    assert manifest["kinds"] == {"halfbody": kinds.count("halfbody"), "headshot": kinds.count("headshot")}
    assert kinds.count("headshot") == 2  # floor((i + 1) * 0.2) stratification: clips 4 and 9
    assert manifest["with_ref"] == NUM_CLIPS // 2
    assert manifest["identities"] == sorted({d["meta"]["identity"] for d in decoded.values()})
    assert len(manifest["identities"]) == 4
    # both kinds with and without ref.png
    assert {(d["meta"]["kind"], d["ref"] is not None) for d in decoded.values()} == {
        ("halfbody", True), ("halfbody", False), ("headshot", True), ("headshot", False)}


def test_webdataset_reads_the_shards(shard_dir):
    import webdataset as wds

    _, paths = shard_dir
    ds = wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert keys == [f"sw3_{i:06d}" for i in range(NUM_CLIPS)]


def test_decoded_mouth_tracks_decoded_audio(decoded):
    for key, d in decoded.items():
        m = oracle.mouth_sync(d["frames"], d["kpts"], d["audio"], d["fps"])
        assert m["sync"] > 0.9, (key, m)
        assert m["sync_minus_control"] > 0.5, (key, m)
        # and the measured opening follows the documented ground-truth law opening = e(t_frame)
        opening = oracle.mouth_opening(d["frames"], d["kpts"])
        assert oracle.pearson(opening, d["meta"]["synthetic"]["mouth_opening"]) > 0.95, key


def test_decoded_gloves_match_hand_keypoints(decoded):
    checked = 0
    for key, d in decoded.items():
        if d["meta"]["kind"] != "halfbody":
            continue
        if d["ref"] is not None:  # glove colours read off the reference image
            res = oracle.hand_placement(d["frames"], d["kpts"], reference=d["ref"])
        else:  # glove colours from the palette in the json
            pal = d["meta"]["synthetic"]["identity"]["palette"]
            colors = {s: tuple(c / 255 for c in pal[f"glove_{s}"]) for s in ("left", "right")}
            res = oracle.hand_placement(d["frames"], d["kpts"], glove_colors=colors)
        assert res["hand_detect_rate"] == 1.0, (key, res)
        assert res["hand_error"] < 0.025, (key, res)
        checked += 1
    assert checked >= 4


def test_oracle_metrics_on_decoded_ground_truth(decoded):
    for key, d in decoded.items():
        if d["ref"] is None:
            continue
        m = oracle.oracle_metrics(d["frames"], d["ref"], d["kpts"], d["audio"], d["fps"])
        assert m["mouth_sync"] > 0.9 and m["identity_distance"] < 0.03 and m["flicker"] < 0.01, (key, m)
        if d["meta"]["kind"] == "halfbody":
            assert m["hand_error"] < 0.025 and m["hand_detect_rate"] == 1.0, (key, m)
        else:
            assert math.isnan(m["hand_error"]), (key, m)  # no gloves in a headshot reference


def test_generate_is_a_noop_when_complete_and_redoes_on_new_params(tmp_path):
    kw = dict(num_clips=3, seed=5, num_identities=2, resolution=48, num_frames=8, clips_per_shard=1, workers=1)
    paths = generate_shards(tmp_path, **kw)
    stamps = [p.stat().st_mtime_ns for p in paths]
    assert generate_shards(tmp_path, **kw) == paths
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    # a corrupt shard makes the manifest incomplete -> regenerated
    paths[1].write_bytes(b"broken")
    assert generate_shards(tmp_path, **kw) == paths and paths[1].stat().st_size > 100
    # new params: fewer shards, stale ones removed, manifest updated
    kw["num_clips"] = 2
    new = generate_shards(tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [p.name for p in new] == [
        "synthetic-00000.tar", "synthetic-00001.tar"]
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["num_clips"] == 2
    assert not list(tmp_path.glob(".*tmp*"))


def test_deterministic_by_seed_and_across_worker_counts(tmp_path):
    cfg = WorldConfig(seed=11, num_frames=12, resolution=64)
    a, b = render_clip(cfg, 2), render_clip(cfg, 2)
    for field in ("frames", "audio", "kpts", "envelope", "reference"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.meta == b.meta
    c = render_clip(WorldConfig(seed=12, num_frames=12, resolution=64), 2)
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.audio, c.audio)
    kw = dict(num_clips=4, seed=11, resolution=64, num_frames=12, clips_per_shard=4)
    one = _read_tars(generate_shards(tmp_path / "w1", workers=1, **kw))
    two = _read_tars(generate_shards(tmp_path / "w2", workers=2, **kw))
    assert list(one) == list(two)
    for key in one:
        for field in ("wav", "kpts.npy", "json"):
            assert one[key][field] == two[key][field], (key, field)
        np.testing.assert_array_equal(read_video(one[key]["mp4"])[0], read_video(two[key]["mp4"])[0])


def test_identity_palettes_obey_the_colour_rules():
    assert MOUTH_COLOR == oracle.MOUTH_COLOR
    for seed in range(3):
        ids = [make_identity(seed, i) for i in range(12)]
        for ident in ids:
            assert palette_problems(ident) == [], ident.name
            assert 100 <= ident.f0 <= 250 and 3 <= ident.syllable_rate <= 6
        assert len({i.name for i in ids}) == 12
        # consecutive identities have clearly different backgrounds
        bgs = np.array([i.background for i in ids])
        assert np.linalg.norm(bgs[1:] - bgs[:-1], axis=1).min() > 0.05


def test_chibi_proportions_and_headshots():
    cfg = WorldConfig(seed=2, num_frames=25, num_identities=5)
    loud = 0
    for i in range(5):
        clip = render_clip(cfg, i, kind="halfbody")
        jaw = clip.kpts[:, 23:40]  # 17 jaw points span the head's width
        width = float(np.median(jaw[..., 0].max(1) - jaw[..., 0].min(1)))
        assert 0.33 <= width <= 0.46, (i, width)
        # max mouth opening survives downscaling to 64x64: several pixels of mouth interior height
        f = int(np.argmax(clip.envelope))
        small = np.asarray(Image.fromarray(clip.frames[f]).resize((64, 64), Image.BILINEAR))
        dark_red = np.linalg.norm(small / 255.0 - np.asarray(MOUTH_COLOR), axis=-1) < 0.2
        rows = np.nonzero(dark_red.any(1))[0]
        height_px = rows.max() - rows.min() + 1 if len(rows) else 0
        if clip.envelope[f] >= 0.8:
            assert height_px >= 4 and dark_red.sum() >= 12, (i, clip.envelope[f], height_px, dark_red.sum())
            loud += 1
        head = render_clip(cfg, i, kind="headshot")
        hb = head.meta["head_box"]
        assert hb[2] - hb[0] > 0.7, hb  # the head fills most of a headshot
        assert head.meta["identity"] == clip.meta["identity"]
        assert (head.kpts[:, 5:7, 2] == 0).all() or (head.kpts[:, 5:7, 1] > 0.8).all()
    assert loud >= 3


def test_audio_is_pitched_and_drives_head_sway():
    cfg = WorldConfig(seed=4, num_frames=100)
    for i in range(3):
        clip = render_clip(cfg, i, kind="halfbody")
        # pitch: the spectral peak of the voiced audio is the identity's f0 (+-10 % drift/vibrato)
        spec = np.abs(np.fft.rfft(clip.audio * np.hanning(len(clip.audio))))
        freqs = np.fft.rfftfreq(len(clip.audio), 1 / 16000)
        assert abs(freqs[np.argmax(spec)] / clip.identity.f0 - 1) < 0.1
        # the envelope is the syllable law: RMS per frame follows it
        env = oracle.audio_envelope(clip.audio, cfg.fps, cfg.num_frames)
        assert oracle.pearson(env, clip.envelope) > 0.95
        # syllable rate 3-6 Hz: count rising crossings of the envelope
        on = clip.envelope > 0.05
        syllables = int((on[1:] & ~on[:-1]).sum() + on[0])
        assert 3 <= syllables <= 6 * cfg.num_frames / cfg.fps
        # head roll (from the eye keypoints) follows the low-passed envelope
        eyes = clip.kpts[:, 1:3, :2]
        roll = np.abs(np.arctan2(eyes[:, 0, 1] - eyes[:, 1, 1], eyes[:, 0, 0] - eyes[:, 1, 0]))
        lp = np.zeros_like(env)
        for t in range(1, len(env)):
            lp[t] = lp[t - 1] + (1 / cfg.fps) / (0.3 + 1 / cfg.fps) * (clip.envelope[t] - lp[t - 1])
        assert oracle.pearson(roll, lp) > 0.9
        assert math.degrees(roll.max()) < 8.0


def test_bad_parameters_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="resolution=8"):
        WorldConfig(resolution=8)
    with pytest.raises(ValueError, match="headshot_fraction"):
        generate_shards(tmp_path, num_clips=2, headshot_fraction=1.5)
    with pytest.raises(ValueError, match="num_clips=0"):
        generate_shards(tmp_path, num_clips=0)
    with pytest.raises(ValueError, match="kind='full'"):
        render_clip(WorldConfig(num_frames=2), 0, kind="full")


def test_cli_writes_shards(tmp_path, capsys):
    cli_main(["--out", str(tmp_path), "--num-clips", "2", "--num-frames", "6", "--resolution", "32",
              "--workers", "1", "--seed", "7"])
    assert json.loads(capsys.readouterr().out)["shards"] == [str(tmp_path / "synthetic-00000.tar")]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 7 and manifest["params"]["resolution"] == 32


def test_cli_gestures_world_records_strokes_and_keeps_the_schema(tmp_path, capsys):
    """``--gestures``: co-speech beat gestures (a world parameter, off by default): the manifest says so, every
    stroke apex in the json is a syllable onset plus the identity's lag, and the fields are the schema's."""
    cli_main(["--out", str(tmp_path), "--num-clips", "2", "--num-frames", "40", "--resolution", "32",
              "--workers", "1", "--headshot-fraction", "0", "--gestures"])
    capsys.readouterr()
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["gestures"] is True
    samples = _read_tars(sorted(tmp_path.glob("*.tar")))
    for fields in samples.values():
        assert {"mp4", "wav", "kpts.npy", "json"} <= set(fields)
        g = json.loads(fields["json"])["synthetic"]["gestures"]
        onsets = np.asarray(g["syllable_onsets"])
        assert g["stroke_times"] and all(np.abs(onsets + g["style"]["lag"] - s).min() < 1e-3 for s in g["stroke_times"])
    with pytest.raises(ValueError, match="gestures"):
        WorldConfig(gestures="yes")
