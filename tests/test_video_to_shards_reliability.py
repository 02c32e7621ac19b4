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
from shard_utils import make_sample, person_keypoints, write_shard

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
