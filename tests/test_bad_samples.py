"""Bad shard samples are skipped, counted and logged with their key and reason; mostly-bad data stops clearly."""

from __future__ import annotations

import csv
import logging
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from shard_utils import (
    BREAKAGES,
    broken_sample,
    make_sample,
    person_keypoints,
    repaired_sample,
    tone_burst,
    truncate_within_last_member,
    truncate_within_member_header,
    unfinished_wav,
    write_shard,
)

from halfbody.callbacks.bad_samples import BadSampleMonitor
from halfbody.data.datamodule import HalfBodyDataModule
from halfbody.data.dataset import (
    BadSampleLedger,
    ClipConfig,
    SampleBuilder,
    TrainShardDataset,
    ValShardDataset,
    collate_samples,
    read_shard,
)
from halfbody.data.keypoints import unnormalised_keypoints
from halfbody.data.transforms import BadSample
from halfbody.utils.errors import UserError

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


# ------------------------------------------------------------------------------------------ issue 9 regressions
def _records_of(shard) -> tuple[list[str], list[tuple[str, str]]]:
    ledger = BadSampleLedger(log_records=False)
    keys = [raw["__key__"] for raw in read_shard(str(shard), ledger)]
    return keys, ledger.take_pending()


@pytest.mark.parametrize("member, into", [(5, 100), (8, 0), (8, 511)])
def test_shard_cut_inside_a_member_header_is_counted(tmp_path, member, into):
    """tarfile ends an archive silently at a header cut short: the samples after it were lost uncounted."""
    shard = write_shard(tmp_path / "cut.tar", [make_sample(f"k{i}", num_frames=4, height=16, width=16) for i in range(4)])
    truncate_within_member_header(shard, member, into)  # 4 members per sample: member 5 is k1's 2nd, 8 is k2's 1st
    keys, records = _records_of(shard)
    assert keys == (["k0"] if member == 5 else ["k0", "k1"])
    ended = [r for r in records if r[1].startswith("shard ended early:")]
    assert len(ended) == 1 and ended[0][0] == "cut.tar", records
    assert "cut.tar" in ended[0][1] and f"last key {keys[-1]!r}" in ended[0][1]
    if member == 5:  # k1 was cut between its members: recorded under its key, not yielded half-read
        assert records[0][0] == "k1" and records[0][1].startswith("tar error: truncated in cut.tar")
    assert len(records) == (2 if member == 5 else 1)


def test_complete_shards_and_gzipped_shards_do_not_end_early(tmp_path):
    import gzip

    shard = write_shard(tmp_path / "ok.tar", [make_sample(f"k{i}", num_frames=4, height=16, width=16) for i in range(2)])
    gz = tmp_path / "ok.tar.gz"
    gz.write_bytes(gzip.compress(shard.read_bytes()))
    for path in (shard, gz):
        assert _records_of(path) == (["k0", "k1"], [])


def test_pixel_unit_keypoints_are_found_by_one_shared_check():
    k = person_keypoints(6)
    assert unnormalised_keypoints(k) is None
    k_out = k.copy()
    k_out[:, 91:112, 0] += 0.6  # a hand partly outside the frame is still normalised
    k_out[:, 0, 2] = 0.0
    k_out[:, 0, :2] = 700.0  # a keypoint that was not found (score 0) may hold anything
    assert unnormalised_keypoints(k_out) is None
    px = k.copy()
    px[..., 0] *= 640
    px[..., 1] *= 480
    why = unnormalised_keypoints(px, 640, 480)
    assert why is not None and "pixel coordinates of a 640x480 frame" in why and "expected x, y in [0, 1]" in why


def _build(sample, **clip):
    return SampleBuilder(ClipConfig(**{"num_frames": F, "height": 32, "width": 32, **clip})).build(sample, None)


def _reason(sample) -> str:
    with pytest.raises(BadSample) as exc:
        _build(sample)
    return exc.value.reason


def test_wav_header_duration_is_checked_before_resampling():
    """A 16 Hz header made one sample cost 22 s and 4 GB; an 8 kHz header on 16 kHz samples trained on wrong audio."""
    t0 = time.perf_counter()
    why = _reason(broken_sample("a", "absurd_rate_wav"))
    assert why.startswith("undecodable wav: bad WAVE header: sample rate 16 Hz") and time.perf_counter() - t0 < 2
    why = _reason(broken_sample("b", "mislabelled_rate_wav"))
    assert why.startswith("audio duration mismatch: the wav holds 1.280 s (10240 samples at 8000 Hz)"), why
    assert "the clip is 0.640 s (16 frames at 25 fps)" in why
    why = _reason(broken_sample("c", "audio_short"))
    assert why.startswith("audio too short: the wav holds 0.160 s")


@pytest.mark.parametrize("size", [0, 0xFFFFFFFF])
def test_unfinished_wav_header_reads_what_the_file_holds(size):
    good = make_sample("g", tone_frame=5)
    fixed = _build({**good, "wav": unfinished_wav(good["wav"], size=size)})
    assert torch.equal(fixed["audio"], _build(good)["audio"])
    assert [c for _, c in fixed["repairs"]] == [f"unfinished wav header: unfinished WAVE header (data size {size:#x}, RIFF size {size:#x})"]
    assert _build(good)["repairs"] == []
    why = _reason({**good, "wav": unfinished_wav(good["wav"], size=size, keep_samples=False)})
    assert why.startswith("audio too short: the wav holds 0.000 s") and "unfinished WAVE header" in why


def test_stereo_channels_that_cancel_are_repaired_with_one_channel():
    fixed = _build(repaired_sample("s", "stereo_cancel", tone_frame=2))
    mono = _build(make_sample("m", tone_frame=2))
    assert torch.allclose(fixed["audio"], mono["audio"], atol=1e-3) and fixed["audio"].abs().max() > 0.5
    (key, reason), = fixed["repairs"]
    assert key == "s" and reason.startswith("stereo cancels: stereo channels cancel on downmix") and "channel 0" in reason
    both = tone_burst(16, 25.0, 16000, 2, channels=2)  # ordinary stereo: downmixed, no repair
    assert _build(make_sample("t", audio=both, tone_frame=2))["repairs"] == []


@pytest.mark.parametrize("key, value, expected", [
    ("max_bad_fraction", 2, "expected a number in [0, 1]"),
    ("max_bad_fraction", "lots", "expected a number in [0, 1]"),
    ("num_workers", -1, "expected an integer >= 0"),
    ("batch_size", 0, "expected an integer >= 1"),
    ("val_samples", -3, "expected an integer >= 0 or null"),
    ("fps", "fast", "expected a number in"),
])
def test_datamodule_arguments_are_validated_naming_the_key(mixed, key, value, expected):
    with pytest.raises(UserError) as exc:
        HalfBodyDataModule(mixed[0][:1], **{key: value})
    assert str(exc.value).startswith(f"data.{key}={value!r}: {expected}")


def test_counters_are_per_read_and_per_key_and_match_the_lines_printed(mixed, caplog):
    """Each record is printed once, where it is counted (the main process), and the summary counts reads and keys."""
    shards, goods = mixed
    dm = HalfBodyDataModule(shards[:2], num_frames=F, resolution=32, batch_size=2, batches_per_epoch=2,
                            num_workers=2, val_samples=None, max_bad_fraction=0.9)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # two validation passes read every sample twice
            for batch in dm.val_dataloader():
                dm.on_before_batch_transfer(batch, 0)
    printed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    s = dm.bad_sample_summary()
    per_pass = len(BREAKAGES) + 1  # + the sample cut off in s1.tar, recorded once per pass although 2 workers read it
    assert s["bad"] == len(printed) == 2 * per_pass and s["bad_unique"] == per_pass
    assert s["good"] == 2 * len(goods)
    assert s["by_reason_unique"]["bad json"] == 2 and s["by_reason"]["bad json"] == 4


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch["video"].mean()) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitor_logs_the_counters_on_every_logging_step_and_at_the_end(mixed, tmp_path, caplog):
    """Was: every 25 steps whatever the trainer's log_every_n_steps, nothing after the last multiple of 25."""
    shards, goods = mixed
    dm = HalfBodyDataModule(shards, num_frames=F, resolution=32, batch_size=1, batches_per_epoch=5,
                            num_workers=0, val_samples=None, shuffle_buffer=2, max_bad_fraction=0.9)
    trainer = L.Trainer(max_steps=5, log_every_n_steps=2, val_check_interval=5, limit_val_batches=None,
                        logger=CSVLogger(tmp_path), callbacks=[BadSampleMonitor()], enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    with caplog.at_level(logging.WARNING):
        trainer.fit(_Tiny(), datamodule=dm)
    printed = [r for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("data/bad_samples")]
    steps = sorted({int(r["step"]) for r in logged})
    assert steps[:2] == [2, 4] and steps[-1] == 5
    last = logged[-1]
    s = dm.bad_sample_summary()
    assert float(last["data/bad_samples"]) == s["bad"] == len(printed) > len(BREAKAGES)
    assert float(last["data/bad_unique"]) == s["bad_unique"]
    assert float(last["data/bad/bad_json"]) == s["by_reason"]["bad json"]
    assert trainer.callback_metrics["data/bad_samples"].item() == s["bad"]


def test_every_model_family_brings_the_monitor_whatever_the_callbacks_config():
    """MirrorMe runs logged no data/* metric: the counters must not depend on a callbacks entry."""
    from types import SimpleNamespace

    from halfbody.echomimic_v2.module import EchoMimicV2Module
    from halfbody.mirrorme.module import MirrorMeModule

    for family in (EchoMimicV2Module, MirrorMeModule):
        given = family.configure_callbacks(SimpleNamespace(_trainer=SimpleNamespace(callbacks=[])))
        assert [type(c) for c in given] == [BadSampleMonitor]
        configured = BadSampleMonitor(every_n_steps=3)
        kept = family.configure_callbacks(SimpleNamespace(_trainer=SimpleNamespace(callbacks=[configured])))
        assert kept == [configured]


def _rank_summary(rank: int, shards: list[str], init_file: str, out_dir: str) -> None:
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dm = HalfBodyDataModule(shards, num_frames=4, resolution=32, num_workers=0)
        dm.bad_ledger.log_records = False
        dm.bad_ledger.add_good(10 + rank)
        dm.bad_ledger.record("shared_key", "bad json: not JSON")  # the same sample skipped on both ranks
        dm.bad_ledger.record(f"only_rank{rank}", "undecodable mp4: junk")
        dm.bad_ledger.record_repair(f"stereo{rank}", "stereo cancels: channel 0 used")
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"all": dm.bad_sample_summary(all_ranks=True), "own": dm.bad_sample_summary()}, f)
    finally:
        dist.destroy_process_group()


def test_counters_are_summed_over_ranks_of_a_distributed_run(mixed, tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_rank_summary, args=(mixed[0], str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["own"]["bad"] == 2 and got["own"]["good"] == 10 + rank
        summed = got["all"]
        assert summed["good"] == 21 and summed["bad"] == 4 and summed["bad_unique"] == 3
        assert summed["by_reason"] == {"bad json": 2, "undecodable mp4": 2}
        assert summed["by_reason_unique"] == {"bad json": 1, "undecodable mp4": 2}
        assert summed["repaired"] == 2 and summed["repaired_unique"] == 2
