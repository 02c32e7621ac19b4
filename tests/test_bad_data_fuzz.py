"""Issue 9's "done means": a shard set with ~15 % varied corruption trains both families through the real entry point.

Every bad sample is skipped with its reason (one printed line each), the ``data/*`` counters the run logs equal the
lines printed and the corruption injected (per distinct key), repaired samples train and are counted as repaired,
and the run finishes. Validation reads every sample once (``limit_val_batches=1.0``), so every injected defect is
met whatever the training stream draws.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import pytest
from shard_utils import (
    BREAKAGES,
    REPAIRS,
    broken_sample,
    make_sample,
    repaired_sample,
    truncate_within_last_member,
    truncate_within_member_header,
    write_shard,
)

from config_utils import compose_train
from halfbody.train import train

pytestmark = pytest.mark.slow

SAMPLE = dict(num_frames=12, height=64, width=64)
PER_SHARD = 16
# (shard, position in shard) -> breakage; every kind of BREAKAGES appears once, two shards are cut.
PLAN = {
    0: {2: "undecodable_mp4", 7: "nan_kpts", 12: "bad_json"},
    1: {1: "empty_mp4", 6: "wrong_shape", 11: "pixel_kpts"},
    2: {3: "absurd_rate_wav", 8: "empty_wav", 13: "unfinished_empty_wav"},
    3: {4: "missing_field", 9: "json_missing_key"},
    4: {5: "mislabelled_rate_wav", 10: "audio_short"},
}
REPAIR_PLAN = {(1, 4): "stereo_cancel", (2, 6): "unfinished_wav", (4, 2): "stereo_cancel"}
CUT_MEMBER_SHARD = 3  # its last sample is cut in the middle of its mp4: "tar error" under that sample's key
CUT_HEADER_SHARD = 5  # cut in the header of sample 12's first member: "shard ended early" under the shard's name


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[Path, dict[str, str], dict[str, str], int]:
    """Six shards of 16 samples; returns (dir, bad key -> category, repaired key -> category, samples written)."""
    d = tmp_path_factory.mktemp("fuzz")
    expected: dict[str, str] = {}
    repaired: dict[str, str] = {}
    for shard in range(6):
        samples = []
        for i in range(PER_SHARD):
            key = f"s{shard}k{i:02d}"
            how = PLAN.get(shard, {}).get(i)
            fix = REPAIR_PLAN.get((shard, i))
            if how is not None:
                samples.append(broken_sample(key, how, **SAMPLE))
                expected[key] = BREAKAGES[how]
            elif fix is not None:
                samples.append(repaired_sample(key, fix, **SAMPLE))
                repaired[key] = REPAIRS[fix]
            else:
                samples.append(make_sample(key, identity=f"id{i % 4}", **SAMPLE))
        path = write_shard(d / f"clips-{shard:06d}.tar", samples)
        if shard == CUT_MEMBER_SHARD:
            truncate_within_last_member(path, "mp4")
            expected[f"s{shard}k{PER_SHARD - 1:02d}"] = "tar error"
        if shard == CUT_HEADER_SHARD:
            truncate_within_member_header(path, 4 * 12, 200)  # 4 members per sample (json, kpts.npy, mp4, wav)
            expected[path.name] = "shard ended early"
    total = 6 * PER_SHARD
    assert 0.13 <= (len(expected) + 3) / total <= 0.2  # ~15 %, counting the 4 samples lost after the header cut
    return d, expected, repaired, total


_compose = compose_train


@pytest.mark.parametrize("family, workers", [("echomimic_v2", 2), ("mirrorme", 0)])
def test_both_families_train_on_corrupt_shards_and_count_every_bad_sample(corrupt_shards, tmp_path, caplog, family,
                                                                          workers):
    shards, expected, repaired, total = corrupt_shards
    cfg = _compose([
        f"family={family}", "data=shards", f"data.train_shards={shards}", f"data.val_shards={shards}",
        "data.num_frames=9", "data.resolution=64", "data.batch_size=2", f"data.num_workers={workers}",
        "data.val_samples=null", "data.batches_per_epoch=3", "data.max_bad_fraction=0.5",
        "logger=csv", "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1.0",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "model.num_inference_steps=2",
        "callbacks.sample_videos.oracle_metrics=false",
    ], tmp_path)
    with caplog.at_level(logging.WARNING):
        metrics = train(cfg)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()  # the run finished

    lines = [r.getMessage() for r in caplog.records]
    skipped = [re.match(r"skipping bad sample (\S+): ([^:]+):", m).groups() for m in lines
               if m.startswith("skipping bad sample")]
    fixed = [re.match(r"repaired sample (\S+): ([^:]+):", m).groups() for m in lines if m.startswith("repaired sample")]
    # every injected defect is skipped under its key with its reason, and nothing else is
    assert dict(skipped) == expected
    assert dict(fixed) == repaired
    # the logged counters equal the lines printed (per read) and the corruption injected (per key)
    assert metrics["data/bad_samples"] == len(skipped) >= len(expected)
    assert metrics["data/bad_unique"] == len(expected)
    for category, n in Counter(expected.values()).items():
        assert metrics[f"data/bad_unique/{category.replace(' ', '_')}"] == n, category
        assert metrics[f"data/bad/{category.replace(' ', '_')}"] == sum(c == category for _, c in skipped)
    assert metrics["data/repaired_samples"] == len(fixed) >= len(repaired)
    # the CSV logger holds the same final values
    rows = (tmp_path / "csv").rglob("metrics.csv") if (tmp_path / "csv").exists() else tmp_path.rglob("metrics.csv")
    import csv

    logged = [r for p in rows for r in csv.DictReader(open(p)) if r.get("data/bad_samples")]
    assert logged and float(logged[-1]["data/bad_samples"]) == len(skipped)
    assert "train/loss" in metrics and "val/loss" in metrics
