"""Bad shard samples are skipped, counted and logged with their key and reason; mostly-bad data stops clearly."""

from __future__ import annotations

import logging

import pytest
from shard_utils import BREAKAGES, broken_sample, make_sample, truncate_within_last_member, write_shard

from halfbody.data.datamodule import HalfBodyDataModule
from halfbody.data.dataset import ClipConfig, SampleBuilder, TrainShardDataset, ValShardDataset, collate_samples

F = 8


def _builder() -> SampleBuilder:
    return SampleBuilder(ClipConfig(num_frames=F, height=32, width=32))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Shard 0: good samples interleaved with one of each breakage. Shard 1: two good samples, then a third cut
    off in the middle of its mp4 (a truncated shard). Shard 2: not a tar at all."""
    d = tmp_path_factory.mktemp("mixed")
    samples = []
    for i, how in enumerate(sorted(BREAKAGES)):
        samples += [make_sample(f"good{i}"), broken_sample(f"bad_{how}", how)]
    s0 = write_shard(d / "s0.tar", samples)
    s1 = write_shard(d / "s1.tar", [make_sample("tgood0"), make_sample("tgood1"), make_sample("cut")])
    truncate_within_last_member(s1, "mp4")
    s2 = d / "s2.tar"
    s2.write_bytes(b"this is not a tar file" * 100)
    goods = [f"good{i}" for i in range(len(BREAKAGES))] + ["tgood0", "tgood1"]
    return [str(s0), str(s1), str(s2)], goods


def _run_val(shards, **kw):
    ds = ValShardDataset(shards, _builder(), max_bad_fraction=0.9, **kw)
    samples = list(ds)
    records = [r for s in samples for r in s["bad_samples"]]
    return samples, records


def test_each_kind_of_bad_sample_is_skipped_counted_and_logged(mixed, caplog):
    shards, goods = mixed
    with caplog.at_level(logging.WARNING, logger="halfbody.data.dataset"):
        samples, records = _run_val(shards)
    assert [s["key"] for s in samples] == goods
    reasons = dict(records)
    for how, category in BREAKAGES.items():
        assert reasons[f"bad_{how}"].startswith(category + ":"), (how, reasons[f"bad_{how}"])
    assert reasons["cut"].startswith("tar error: truncated in s1.tar")
    assert reasons["s2.tar"].startswith("tar error: ReadError")  # after the last good sample: rides on it
    assert samples[-1]["bad_samples"] == [("cut", reasons["cut"]), ("s2.tar", reasons["s2.tar"])]
    assert len(records) == len(BREAKAGES) + 2
    for key in reasons:
        assert any(key in r.getMessage() and "skipping bad sample" in r.getMessage() for r in caplog.records), key


def test_unreadable_shard_is_recorded_and_iteration_goes_on(mixed):
    shards, goods = mixed
    samples, records = _run_val([shards[2], shards[1]])
    assert [s["key"] for s in samples] == ["tgood0", "tgood1"]
    assert records[0][0] == "s2.tar" and records[0][1].startswith("tar error: ReadError")


def test_training_stream_skips_bad_samples_and_carries_records(mixed):
    shards, goods = mixed
    ds = TrainShardDataset(shards, _builder(), batch_size=2, batches_per_epoch=12, shuffle_buffer=4,
                           max_bad_fraction=0.9)
    samples = list(ds)
    assert len(samples) == 24 and {s["key"] for s in samples} <= set(goods)
    batches = [collate_samples(samples[i : i + 2]) for i in range(0, 24, 2)]
    records = [r for b in batches for r in b["bad_samples"]]
    assert records and sum(len(s["bad_samples"]) for s in samples) == len(records)
    categories = {reason.split(":")[0] for _, reason in records}
    assert categories <= set(BREAKAGES.values()) | {"tar error"} and len(categories) >= 3


def test_mostly_bad_data_raises_a_clear_error(tmp_path):
    shard = write_shard(tmp_path / "bad.tar", [make_sample("ok")] + [
        broken_sample(f"nan{i}", "nan_kpts") for i in range(4)] + [broken_sample("nojson", "bad_json")])
    ds = TrainShardDataset([str(shard)], _builder(), batch_size=1, batches_per_epoch=100,
                           max_bad_fraction=0.5, min_samples_for_bad_check=12)
    with pytest.raises(RuntimeError) as exc:
        list(ds)
    msg = str(exc.value)
    assert "too many bad samples" in msg and "max_bad_fraction=0.5" in msg
    assert "%)" in msg and "'NaN keypoints':" in msg and "'bad json':" in msg and "e.g. key 'nan" in msg


def test_all_shards_empty_or_unreadable_stops(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00" * 10)
    ds = TrainShardDataset([str(junk)], _builder(), batch_size=1, batches_per_epoch=2, min_samples_for_bad_check=1000)
    with pytest.raises(RuntimeError, match="shards in a row gave no samples"):
        list(ds)


def test_main_process_aggregates_records_across_workers(mixed):
    shards, goods = mixed
    dm = HalfBodyDataModule(shards[:2], num_frames=F, resolution=32, batch_size=2, batches_per_epoch=2,
                            num_workers=2, val_samples=None, max_bad_fraction=0.9)
    dm.setup("fit")
    n = 0
    for batch in dm.val_dataloader():
        dm.on_before_batch_transfer(batch, 0)
        n += len(batch["key"])
    summary = dm.bad_sample_summary()
    assert n == len(goods) and summary["good"] == len(goods)
    assert summary["bad"] == len(BREAKAGES) + 1
    assert summary["by_reason"]["bad json"] == 2 and summary["by_reason"]["tar error"] == 1


def test_a_spec_that_filters_out_everything_stops(tmp_path):
    shard = write_shard(tmp_path / "half.tar", [make_sample("h0"), make_sample("h1")])
    builder = SampleBuilder(ClipConfig(num_frames=F, height=32, width=32), {"kinds": ["headshot"]})
    ds = TrainShardDataset([str(shard)], builder, batch_size=1, batches_per_epoch=2, max_consecutive_skips=20)
    with pytest.raises(RuntimeError, match=r"filters out every sample .*kinds=\['headshot'\]"):
        list(ds)
