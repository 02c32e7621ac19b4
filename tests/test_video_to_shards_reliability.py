"""video_to_shards reliability (issue 9): the pipeline never deletes or rewrites a shard it cannot prove it wrote,
rebuilds a lost or damaged manifest (and journals) from the shards themselves, converts or rejects sidecar
keypoints in pixel units with a reason, and stops within seconds on Ctrl-C with any number of workers."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from shard_utils import leave_pyav_graph_garbage, make_sample, person_keypoints, write_shard

from data_pipelines.video_to_shards import load_config, run, writer
from data_pipelines.video_to_shards.synthetic import talker_video

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["crop.size=64", "scenes.min_clip_seconds=0.8", "scenes.max_clip_seconds=2", "video.max_side=256",
             "shards.clips_per_shard=1", "filters.min_scene_seconds=0.8"]
CANVAS = (256, 144)
NAMES = ("ann", "ben", "cat")


def _cfg(*extra: str):
    return load_config(None, OVERRIDES + list(extra))


def _files(d: Path) -> dict[str, tuple[int, bytes]]:
    """Every shard of a folder: name -> (mtime, bytes)."""
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(d.glob("*.tar"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2s_rel")
    src = root / "in"
    src.mkdir()
    for i, name in enumerate(NAMES):
        talker_video(src / f"{name}.mp4", index=i, seconds=1.0, canvas=CANVAS)
    report = run(src, root / "out", _cfg(), workers=1, progress=False)
    assert report.clips == 3 and len(report.shards_written) == 3
    return root, report


def _copy(made, tmp_path) -> tuple[Path, Path, dict]:
    root, _ = made
    shutil.copytree(root / "in", tmp_path / "in")
    shutil.copytree(root / "out", tmp_path / "out")
    return tmp_path / "in", tmp_path / "out", json.loads((root / "out" / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------ nothing is deleted
@pytest.mark.parametrize("damage", ["deleted", "truncated", "garbage", "other shape"])
def test_lost_manifest_is_rebuilt_and_no_shard_is_touched(made, tmp_path, damage):
    src, out, manifest = _copy(made, tmp_path)
    before = _files(out)
    m = out / "manifest.json"
    if damage == "deleted":
        m.unlink()
    elif damage == "truncated":
        m.write_bytes(m.read_bytes()[: m.stat().st_size // 2])
    elif damage == "garbage":
        m.write_bytes(b"\x00\xffnot json")
    else:
        m.write_text(json.dumps({"shards": []}))
    rep = run(src, out, _cfg(), workers=1, progress=False)
    assert (rep.processed, rep.skipped, rep.shards_written) == (0, 3, [])
    assert _files(out) == before  # same shards, same bytes, same mtimes
    assert json.loads(m.read_text()) == manifest  # the same record as the run that wrote the shards
    assert rep.rebuilt and "manifest.json" in rep.rebuilt
    assert any("manifest rebuilt" in line for line in rep.lines())


def test_foreign_shard_named_like_ours_survives_and_is_reported(made, tmp_path):
    src, out, manifest = _copy(made, tmp_path)
    foreign = write_shard(out / "clips-000777.tar", [make_sample("x0", num_frames=4)])
    squatter = out / "clips-000003.tar"  # the name the next shard would get
    squatter.write_bytes(b"someone else's file")
    keep = {p.name: p.read_bytes() for p in (foreign, squatter)}
    before = _files(out)
    rep = run(src, out, _cfg(), workers=1, progress=False)
    assert _files(out) == before and rep.rebuilt is None
    assert {n for n, _ in rep.untouched} == {"clips-000003.tar", "clips-000777.tar"}
    text = "\n".join(rep.lines())
    assert "left untouched" in text and "clips-000777.tar" in text and "configuration" in text
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]
    # A new source: its shard takes the next free name; the files that are not ours stay as they were.
    talker_video(src / "dan.mp4", index=5, seconds=1.0, canvas=CANVAS)
    more = run(src, out, _cfg(), workers=1, progress=False)
    assert more.shards_written == ["clips-000004.tar"]
    assert all(p.read_bytes() == keep[p.name] for p in (foreign, squatter))
    m = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in m["shards"]] == [f"clips-{i:06d}.tar" for i in (0, 1, 2, 4)]
    assert m["shard_pattern"] is None and m["num_clips"] == 4
    assert {u["name"] for u in m["untouched"]} == {"clips-000003.tar", "clips-000777.tar"}


def test_interrupted_pack_is_adopted_not_redone(made, tmp_path, monkeypatch):
    """A crash after the shards were written but before the manifest named them: the next run adopts them (no
    duplicate, nothing deleted) and removes the packed parts."""
    root, _ = made
    shutil.copytree(root / "in", tmp_path / "in")
    src, out = tmp_path / "in", tmp_path / "out"
    real = writer._write_json

    def crash_on_manifest(path, obj):
        if Path(path).name == "manifest.json":
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(writer, "_write_json", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        run(src, out, _cfg(), workers=1, progress=False)
    monkeypatch.setattr(writer, "_write_json", real)
    assert not (out / "manifest.json").exists() and len(list((out / "_sources").glob("*.tar"))) == 3
    before = _files(out)
    assert len(before) == 3
    rep = run(src, out, _cfg(), workers=1, progress=False)
    assert (rep.processed, rep.shards_written) == (0, [])
    assert _files(out) == before
    assert not list((out / "_sources").glob("*.tar"))
    assert json.loads((out / "manifest.json").read_text()) == json.loads((root / "out" / "manifest.json").read_text())


def test_lost_journals_are_rebuilt_from_the_shards(made, tmp_path):
    """Journals gone (e.g. ``_sources/`` deleted): sources whose clips are in the shards are not redone (no
    duplicate samples); their journals are rebuilt from the shards' json."""
    src, out, manifest = _copy(made, tmp_path)
    before = _files(out)
    shutil.rmtree(out / "_sources")
    (out / "_sources").mkdir()
    rep = run(src, out, _cfg(), workers=1, progress=False)
    assert (rep.processed, rep.skipped, rep.shards_written) == (0, 3, [])
    assert sorted(rep.restored) == list(NAMES) and _files(out) == before
    m = json.loads((out / "manifest.json").read_text())
    assert (m["num_clips"], m["identities"], m["total_hours"]) == (3, manifest["identities"], manifest["total_hours"])
    j = writer.read_journal(out, "ann")
    assert j["restored_from_shards"] and [c["key"] for c in j["clips"]] == ["ann_0000"]


def test_scan_shard_proves_authorship(made, tmp_path):
    root, _ = made
    cfg = _cfg()
    shard = root / "out" / "clips-000000.tar"
    assert [k for k, _ in writer.scan_shard(shard, cfg.fingerprint())] == ["ann_0000"]
    with pytest.raises(writer.NotOurs, match="configuration"):
        writer.scan_shard(shard, _cfg("crop.size=96").fingerprint())
    with tarfile.open(shard) as tf:
        last = tf.getmembers()[-1]
        end = tf.offset
    cut = tmp_path / "clips-000000.tar"
    cut.write_bytes(shard.read_bytes()[:end])  # every member complete, the end-of-archive blocks gone
    with pytest.raises(writer.NotOurs, match="end-of-archive"):
        writer.scan_shard(cut, cfg.fingerprint())
    cut.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])
    with pytest.raises(writer.NotOurs):
        writer.scan_shard(cut, cfg.fingerprint())


# ------------------------------------------------------------------------------------------ Ctrl-C never hangs
INTERRUPTED = "interrupted: finished sources are kept; run the same command again to continue"
NUM_CC = 8  # sources of the Ctrl-C runs, one clip each


@pytest.fixture(scope="module")
def cc_inputs(tmp_path_factory):
    src = tmp_path_factory.mktemp("v2s_cc") / "in"
    src.mkdir()
    for i in range(NUM_CC):
        talker_video(src / f"s{i}.mp4", index=i, seconds=1.0, canvas=CANVAS)
    return src


def _journals(out: Path) -> dict[str, dict]:
    d = out / "_sources"
    return {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json")) if p.name != "config.json"} \
        if d.is_dir() else {}


def _ctrl_c(src: Path, out: Path, workers: int, moment: str | float) -> None:
    """Start the CLI in its own process group, press Ctrl-C (SIGINT to the group, as a terminal does) at
    ``moment`` (seconds after the start, or ``"first"``: as soon as a source is finished), and check: it ends
    within 10 s with exit code 130 and the one line, no worker survives, finished sources are kept, and the same
    command then completes with every clip exactly once."""
    cmd = [sys.executable, "-m", "data_pipelines.video_to_shards", str(src), "--out", str(out), "--workers",
           str(workers), "--no-progress", *sum((["--set", o] for o in OVERRIDES), [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - t0
            if moment == "first" and _journals(out) or not isinstance(moment, str) and elapsed >= moment:
                break
            assert elapsed < 60, "the run did not get going"
            time.sleep(0.005)
        finished = set(_journals(out))
        try:
            os.killpg(proc.pid, signal.SIGINT)
        except ProcessLookupError:  # the run had already finished
            pass
        t_int = time.monotonic()
        stdout, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - t_int
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    for _ in range(100):  # no worker left behind in the process group
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("worker processes outlived the interrupted run")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    if proc.returncode == 0:  # the run had finished before the key press landed
        assert stderr == "" and f"{NUM_CC} sources" in stdout
    else:
        assert proc.returncode == 130 and stderr.strip() == INTERRUPTED and took < 10, (proc.returncode, stderr, took)
    assert finished <= set(_journals(out))  # finished sources are kept
    rep = run(src, out, _cfg(), workers=1, progress=False)
    assert rep.skipped >= len(finished) and rep.processed + rep.skipped == NUM_CC
    m = json.loads((out / "manifest.json").read_text())
    keys = []
    for s in m["shards"]:
        with tarfile.open(out / s["name"]) as tf:
            keys += [n.name.split(".")[0] for n in tf.getmembers() if n.name.endswith(".json")]
    assert sorted(keys) == [f"s{i}_0000" for i in range(NUM_CC)] and m["num_clips"] == NUM_CC


@pytest.mark.parametrize("moment", [0.3, "first"])
def test_ctrl_c_with_workers_ends_at_once(cc_inputs, tmp_path, moment):
    """During start-up (imports) and as the first source finishes (workers busy)."""
    _ctrl_c(cc_inputs, tmp_path / "out", 2, moment)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 3])
def test_ctrl_c_repeatedly(cc_inputs, tmp_path, workers):
    """Ctrl-C at many moments: during start-up, as the first source finishes, and later in the run."""
    for i, moment in enumerate([0.3, 1.0, "first", "first", "first", 2.0, 2.2, 2.4, 2.6, 3.0]):
        _ctrl_c(cc_inputs, tmp_path / f"out{i}", workers, moment)


# ------------------------------------------------------------------------------------------ pixel-unit keypoints
def test_pixel_unit_sidecars_are_converted_or_rejected(tmp_path):
    """A sidecar in pixel coordinates of the frame is converted (the clip's keypoints equal those of the same
    video with a normalised sidecar), with a note; one that does not fit the frame, or mixes units, is rejected
    naming the file."""
    src = tmp_path / "in"
    src.mkdir()
    talker_video(src / "norm.mp4", index=0, seconds=1.0, canvas=CANVAS)
    k = np.load(src / "norm.npy")
    w, h = CANVAS
    px = k.copy()
    px[..., 0] *= w
    px[..., 1] *= h
    for name, arr in (("pixels", px), ("toobig", px * 4), ("mixed", np.concatenate([px[:10], k[10:]]))):
        shutil.copy(src / "norm.mp4", src / f"{name}.mp4")
        np.save(src / f"{name}.npy", arr)
    rep = run(src, tmp_path / "out", _cfg(), workers=1, progress=False)
    reasons = {label: reason for label, _, reason in rep.rejections}
    assert set(reasons) == {"toobig.mp4", "mixed.mp4"}
    assert reasons["toobig.mp4"].startswith("bad sidecar: toobig.npy is not in [0, 1] frame units")
    assert "does not fit the 256x144 frame" in reasons["toobig.mp4"]
    assert reasons["mixed.mp4"].startswith("bad sidecar: mixed.npy mixes units")
    assert [label for label, _ in rep.notes] == ["pixels.mp4"]
    assert "pixels.npy: keypoints in pixel coordinates" in rep.notes[0][1] and "256x144" in rep.notes[0][1]
    assert any("pixels.npy" in line for line in rep.lines())
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["source"] for r in m["repairs"]] == ["pixels.mp4"]
    got = {}
    for shard in sorted((tmp_path / "out").glob("clips-*.tar")):
        with tarfile.open(shard) as tf:
            for mem in tf.getmembers():
                if mem.name.endswith(".kpts.npy"):
                    got[mem.name.split(".")[0]] = np.load(io.BytesIO(tf.extractfile(mem).read()))
    assert sorted(got) == ["norm_0000", "pixels_0000"]
    assert (got["pixels_0000"][..., 2] > 0.3).sum() > 1000  # a full pose, not an empty one
    np.testing.assert_allclose(got["pixels_0000"], got["norm_0000"], atol=1e-5)


def test_inspector_reports_what_the_loader_rejects(tmp_path):
    """The inspector lists every breakage with the loader's reason, pixel-unit keypoints and wav headers included
    (it counted a shard of pixel-unit keypoints as all good)."""
    from shard_utils import BREAKAGES, broken_sample

    from data_pipelines.video_to_shards import inspect as inspector

    good = make_sample("good", num_frames=8)
    bad = [broken_sample(f"b_{how}", how, num_frames=8) for how in BREAKAGES]
    write_shard(tmp_path / "s-000000.tar", [good, *bad])
    s = inspector.summarize(str(tmp_path))
    assert s["clips"] == 1
    assert {b["key"]: b["reason"].split(":")[0] for b in s["bad_samples"]} == {f"b_{h}": r for h, r in BREAKAGES.items()}
    assert "pixel-unit keypoints" in inspector.format_summary(s)
    assert person_keypoints(8).max() <= 1  # the good sample's keypoints are in frame units


def test_a_worker_that_dies_does_not_hang_the_run(cc_inputs, tmp_path, monkeypatch):
    """A worker killed mid-source (say by the out-of-memory killer): its source is rejected with the reason, a
    new worker takes over, and the run completes (a multiprocessing.Pool waited for it forever)."""
    from data_pipelines.video_to_shards import pipeline

    real = pipeline.process_source

    def oom_on_s2(source, *a, **kw):
        if source.sid == "s2":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(source, *a, **kw)

    monkeypatch.setattr(pipeline, "process_source", oom_on_s2)  # workers are forked: they see the patch
    t0 = time.monotonic()
    rep = run(cc_inputs, tmp_path / "out", _cfg(), workers=2, progress=False)
    assert time.monotonic() - t0 < 60
    assert rep.processed == NUM_CC and rep.clips == NUM_CC - 1
    assert [(label, reason.split(":")[0]) for label, _, reason in rep.rejections] == [("s2.mp4", "worker died")]
    assert "killed by signal 9" in rep.rejections[0][2]
    monkeypatch.setattr(pipeline, "process_source", real)
    again = run(cc_inputs, tmp_path / "out", _cfg(), workers=2, progress=False, retry_rejected=True)
    assert (again.processed, again.clips, again.manifest["num_clips"]) == (1, 1, NUM_CC)


def test_sigterm_to_the_group_stops_like_ctrl_c(cc_inputs, tmp_path):
    """A shutdown or a scheduler's preemption (SIGTERM to every process): the same clean stop, and no source is
    marked as rejected because its worker was stopped."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_pipelines.video_to_shards", str(cc_inputs), "--out", str(out), "--workers",
           "2", "--no-progress", *sum((["--set", o] for o in OVERRIDES), [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.monotonic()
    while proc.poll() is None and not _journals(out):
        assert time.monotonic() - t0 < 60
        time.sleep(0.005)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, stderr = proc.communicate(timeout=10)
    assert "Traceback" not in stderr, stderr
    if proc.returncode != 0:
        assert proc.returncode == 130 and INTERRUPTED in stderr, (proc.returncode, stderr)
    assert all(not j["rejections"] for j in _journals(out).values())  # nothing blamed on the sources
    rep = run(cc_inputs, out, _cfg(), workers=1, progress=False)
    assert rep.manifest["num_clips"] == NUM_CC and not rep.rejections


def test_a_removed_shard_is_reported_and_its_source_can_be_redone(made, tmp_path):
    src, out, manifest = _copy(made, tmp_path)
    (out / "clips-000001.tar").unlink()  # ben's clip
    rep = run(src, out, _cfg(), workers=1, progress=False)
    assert "clips-000001.tar, which is missing" in rep.rebuilt and rep.processed == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_clips"] == 2 and [s["name"] for s in m["shards"]] == ["clips-000000.tar", "clips-000002.tar"]
    (item,) = m["rejections"]["items"]
    assert item["source"] == "ben.mp4" and item["reason"].startswith("clips lost: 1 of its 1 clips")
    assert "_sources/ben.json" in item["reason"]
    (out / "_sources" / "ben.json").unlink()  # as the reason says: the source is redone, into a new shard
    again = run(src, out, _cfg(), workers=1, progress=False)
    assert (again.processed, again.shards_written) == (1, ["clips-000003.tar"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_clips"] == 3 and m["rejections"]["total"] == 0 and m["identities"] == manifest["identities"]


def test_workers_forked_beside_pyav_garbage_do_not_hang(cc_inputs, tmp_path, monkeypatch):
    """PyAV filter graphs (an audio resampler) are reference cycles holding thread pools. A worker forked while one
    is uncollected garbage in the parent, and collecting it, waited forever on threads it does not have; the pool
    collects the parent's garbage before each fork."""
    import gc

    from data_pipelines.video_to_shards import pipeline

    worker = pipeline._worker_main

    def collecting_worker(*a, **kw):  # the child's first collection finds the inherited graphs
        gc.enable()
        gc.collect()
        return worker(*a, **kw)

    monkeypatch.setattr(pipeline, "_worker_main", collecting_worker)  # workers are forked: they see the patch
    gc.disable()  # keep the garbage until the fork, as a busy parent between collections would
    try:
        for _ in range(3):
            leave_pyav_graph_garbage()
        t0 = time.monotonic()
        rep = run(cc_inputs, tmp_path / "out", _cfg(), workers=2, progress=False)
    finally:
        gc.enable()
    assert time.monotonic() - t0 < 60 and rep.processed == NUM_CC
