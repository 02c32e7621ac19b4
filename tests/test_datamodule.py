"""HalfBodyDataModule on real tar shards with real mp4/wav (tests/shard_utils.py)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from shard_utils import (
    decode_index,
    dot_frames,
    leave_pyav_graph_garbage,
    make_sample,
    npy_bytes,
    person_keypoints,
    tone_burst,
    write_shard,
    write_shards,
)

from halfbody.data.conditions import ConditionSpec
from halfbody.data.datamodule import HalfBodyDataModule, expand_shards
from halfbody.data.dataset import ClipConfig, SampleBuilder, TrainShardDataset, ValShardDataset, collate_samples

F = 8
SAMPLE_KEYS = {"video", "ref", "audio", "pose", "mask_lips", "mask_head", "mask_face", "mask_hands", "valid", "pad_value", "kpts",
               "fps", "key", "identity", "kind", "bad_samples", "repairs", "audio_context", "audio_context_offset",
               "audio_context_length"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """6 half-body clips (25 fps, 16 frames, 48x64, frame index in the grey level) in 2 shards."""
    d = tmp_path_factory.mktemp("clips")
    write_shards(d, lambda i: make_sample(f"clip{i:03d}", identity=f"person{i % 3}"), 6, 3)
    return d


def _train(shards, *, rank=0, world_size=1, spec=None, batch_size=1, batches=6, seed=0, **clip):
    clip = {"num_frames": F, "height": 32, "width": 32, **clip}
    builder = SampleBuilder(ClipConfig(**clip), spec)
    return TrainShardDataset([str(s) for s in shards], builder, batch_size=batch_size, batches_per_epoch=batches,
                             seed=seed, rank=rank, world_size=world_size, shuffle_buffer=2)


def _val(shards, *, rank=0, world_size=1, spec=None, val_samples=None, **clip):
    clip = {"num_frames": F, "height": 32, "width": 32, **clip}
    builder = SampleBuilder(ClipConfig(**clip), spec)
    return ValShardDataset([str(s) for s in shards], builder, val_samples=val_samples, rank=rank, world_size=world_size)


def _starts(samples):
    return [(s["key"], decode_index(s["video"][0])) for s in samples]


# ------------------------------------------------------------------------------------------ contract
def test_sample_contract_and_epoch_length(clips):
    dm = HalfBodyDataModule(str(clips), num_frames=F, resolution=[32, 40], batch_size=2, batches_per_epoch=3,
                            num_workers=0, val_samples=4)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == 3 and len(batches) == 3
    b = batches[0]
    assert set(b) == SAMPLE_KEYS
    S = round(F / 25 * 16000)
    shapes = {"video": (2, F, 3, 32, 40), "ref": (2, 3, 32, 40), "audio": (2, S), "pose": (2, F, 3, 32, 40),
              "mask_lips": (2, F, 1, 32, 40), "mask_head": (2, F, 1, 32, 40), "mask_face": (2, F, 1, 32, 40),
              "mask_hands": (2, F, 1, 32, 40), "valid": (2, F, 1, 32, 40), "kpts": (2, F, 133, 3), "fps": (2,), "pad_value": (2,)}
    for k, shape in shapes.items():
        assert tuple(b[k].shape) == shape, k
        assert b[k].dtype == torch.float32, k
    assert -1 <= b["video"].min() and b["video"].max() <= 1 and -1 <= b["ref"].min() and b["ref"].max() <= 1
    assert 0 <= b["pose"].min() and b["pose"].max() == 1
    for k in ("mask_lips", "mask_head", "mask_face", "mask_hands", "valid"):
        assert set(b[k].unique().tolist()) <= {0.0, 1.0}, k
    assert b["mask_lips"].sum() > 0 and (b["mask_lips"] <= b["mask_face"]).all() and (b["mask_face"] <= b["mask_head"]).all()
    assert (b["valid"] == 1).all() and torch.all(b["fps"] == 25.0) and torch.all(b["pad_value"] == -1.0)
    assert all(k.startswith("clip") for k in b["key"]) and b["kind"] == ["halfbody"] * 2
    assert [f"person{int(k[4:]) % 3}" for k in b["key"]] == b["identity"]
    assert b["bad_samples"] == []

    val = [list(dm.val_dataloader()), list(dm.val_dataloader())]
    assert [x["key"] for x in val[0]] == [x["key"] for x in val[1]] == [["clip000", "clip001"], ["clip002", "clip003"]]
    assert torch.equal(val[0][0]["video"], val[1][0]["video"]) and torch.equal(val[0][0]["pose"], val[1][0]["pose"])
    assert decode_index(val[0][0]["video"][0, 0]) == 0  # validation windows start at frame 0


@pytest.mark.parametrize("fps_src,fps_tgt", [(50.0, 25.0), (30.0, 25.0), (25.0, 25.0)])
def test_fps_resampling_picks_source_frames_by_index(tmp_path, fps_src, fps_tgt):
    shard = write_shard(tmp_path / "s.tar", [make_sample("a", num_frames=20, fps=fps_src)])
    expected = lambda s: np.floor(s + np.arange(F) * fps_src / fps_tgt + 0.5).astype(int)  # noqa: E731
    val = list(_val([shard], fps=fps_tgt))[0]
    assert [decode_index(f) for f in val["video"]] == expected(0).tolist()
    starts = set()
    for s in list(_train([shard], fps=fps_tgt, batches=6)):
        got = [decode_index(f) for f in s["video"]]
        assert got == expected(got[0]).tolist()
        starts.add(got[0])
    assert len(starts) > 1  # random windows


@pytest.mark.parametrize("fps_src,rate,channels", [(25.0, 44100, 2), (50.0, 16000, 1)])
def test_audio_window_is_aligned_with_video(tmp_path, fps_src, rate, channels):
    n = int(fps_src * 0.8)  # 0.8 s clips
    k = n // 2 + 2  # source frame that carries the tone burst
    audio = tone_burst(n, fps_src, rate, k, channels=channels)
    shard = write_shard(tmp_path / "a.tar", [make_sample("a", num_frames=n, fps=fps_src, audio=audio, audio_rate=rate)])
    seen_in, seen_out = 0, 0
    for s in _train([shard], batches=12, seed=3):
        start = decode_index(s["video"][0])
        a = s["audio"].numpy()
        assert a.shape == (F * 640,)
        energy = (a.reshape(F, 640) ** 2).sum(1)
        j = int(np.floor((k - start) * 25 / fps_src + 1e-6))  # target frame whose span holds the burst
        if 0 <= j < F:
            seen_in += 1
            assert int(energy.argmax()) == j and energy[j] > 10 * np.delete(energy, j).max()
        else:
            seen_out += 1
            assert energy.max() < 0.5
    assert seen_in > 0 and seen_out > 0


@pytest.mark.parametrize("resolution", [32, [24, 40], 96])
def test_resize_crop_keeps_keypoints_on_their_pixels(tmp_path, resolution):
    x, y = 37, 21
    kpts = person_keypoints(16)
    kpts[:, 0] = ((x + 0.5) / 64, (y + 0.5) / 48, 1.0)
    shard = write_shard(tmp_path / "d.tar", [make_sample("d", frames=dot_frames(16, 48, 64, (x, y)), kpts=kpts)])
    h, w = (resolution, resolution) if isinstance(resolution, int) else resolution
    samples = list(_train([shard], batches=6, height=h, width=w, scale_jitter=0.3)) + list(_val([shard], height=h, width=w))
    checked = 0
    for s in samples:
        kx, ky = s["kpts"][0, 0, 0].item() * w, s["kpts"][0, 0, 1].item() * h
        r = 2.5 * max(h / 48, w / 64, 1)  # the dot's output radius (+ filter support): skip dots cut by the crop
        if not (r <= kx <= w - r and r <= ky <= h - r):
            continue
        img = s["video"][0].mean(0).numpy()
        wgt = np.clip(img - np.median(img), 0, None)
        wgt[wgt < 0.2 * wgt.max()] = 0
        ys, xs = np.mgrid[0:h, 0:w] + 0.5
        cx, cy = (wgt * xs).sum() / wgt.sum(), (wgt * ys).sum() / wgt.sum()
        assert abs(cx - kx) < 0.25 and abs(cy - ky) < 0.25, (cx, cy, kx, ky)
        checked += 1
        # the pose map draws the nose joint on the same spot
        pose = s["pose"][0].sum(0).numpy()
        assert pose[int(ky), int(kx)] > 0
    assert checked >= 3


def test_reference_from_field_or_outside_the_window(tmp_path):
    red = np.zeros((48, 64, 3), np.uint8)
    red[..., 0] = 255
    shard = write_shard(tmp_path / "r.tar", [
        make_sample("withref", num_frames=20, ref=red),
        make_sample("noref", num_frames=20),
        make_sample("exact", num_frames=F),
    ])
    by_key: dict[str, list] = {}
    for s in _train([shard], batches=18, seed=1):
        by_key.setdefault(s["key"], []).append(s)
    for s in by_key["withref"]:
        assert s["ref"][0].mean() > 0.95 and s["ref"][1:].mean() < -0.95
    for s in by_key["noref"]:
        start, ref = decode_index(s["video"][0]), decode_index(s["ref"])
        assert not (start <= ref <= start + F - 1)
    for s in by_key["exact"]:  # no frame outside the window: fallback to a frame inside it
        assert 0 <= decode_index(s["ref"]) <= F - 1
    val = {s["key"]: s for s in _val([shard])}
    assert decode_index(val["noref"]["ref"]) == 19  # deterministic: the clip's last frame
    assert val["withref"]["ref"][0].mean() > 0.95


def test_headshot_padding_hpa(tmp_path):
    head_box = [0.3125, 0.2, 0.6875, 0.8]  # 24 x 28.8 px on 64 x 48: the target box's pixel aspect at 32 x 32
    kpts = person_keypoints(16, "headshot")
    kpts[:, 23] = (head_box[0], head_box[1], 1.0)
    kpts[:, 24] = (head_box[2], head_box[3], 1.0)
    frames = np.full((16, 48, 64, 3), 200, np.uint8)
    shard = write_shard(tmp_path / "h.tar", [
        make_sample("head", kind="headshot", frames=frames, kpts=kpts, head_box=head_box),
        make_sample("half"),
    ])
    target = np.array([0.375, 0.05, 0.625, 0.35]) * 32
    s = {x["key"]: x for x in _val([shard], spec={"headshot": "pad"})}["head"]
    valid = s["valid"][0, 0]
    assert 0 < valid.sum() < 32 * 32
    ys, xs = torch.nonzero(valid, as_tuple=True)
    # expected: scale 1/3, the image spans x 5.3..26.7 and y -1.6..14.4 on the 32 x 32 canvas
    assert (xs.min().item(), xs.max().item() + 1, ys.min().item(), ys.max().item() + 1) == (5, 27, 0, 14)
    video = s["video"][0]
    assert torch.all(video[:, valid == 0] == -1.0) and torch.all(video[:, valid == 1] > 0.4)
    assert s["pad_value"].item() == -1.0  # what generate(batch) paints there
    corners = np.concatenate([s["kpts"][0, 23, :2].numpy(), s["kpts"][0, 24, :2].numpy()]) * 32
    np.testing.assert_allclose(corners, target, atol=1.0)
    assert torch.all(s["mask_head"] <= s["valid"]) and s["mask_head"].sum() > 0
    assert torch.all(s["ref"][:, valid == 0] == -1.0)  # the reference is padded the same way

    kept = {x["key"]: x for x in _val([shard], spec={"headshot": "keep"})}
    assert kept["head"]["valid"].min() == 1 and set(kept) == {"head", "half"}
    assert [x["key"] for x in _val([shard], spec={"headshot": "drop"})] == ["half"]
    assert [x["key"] for x in _val([shard], spec={"kinds": ["headshot"]})] == ["head"]


def test_headshot_head_box_from_face_keypoints(tmp_path):
    shard = write_shard(tmp_path / "h.tar", [make_sample("head", kind="headshot")])  # no json head_box
    s = list(_val([shard]))[0]
    assert 0 < s["valid"].sum() < s["valid"].numel()
    face = s["kpts"][0, 23:91].numpy()
    cx = face[:, 0].mean()
    assert abs(cx - 0.5) < 0.05 and face[:, 1].max() < 0.5  # face placed top-centre like a half-body head


# ------------------------------------------------------------------------------------------ splitting
def test_ranks_get_different_training_data_and_seeding_is_explicit(clips):
    shards = sorted(clips.glob("*.tar"))
    r0 = _starts(_train(shards, rank=0, world_size=2))
    r1 = _starts(_train(shards, rank=1, world_size=2))
    assert r0 != r1
    assert _starts(_train(shards, rank=0, world_size=2)) == r0  # same (seed, rank, world, worker, epoch)
    ds = _train(shards, rank=0, world_size=2)
    ds.set_epoch(1)
    assert _starts(ds) != r0


@pytest.mark.parametrize("num_shards,world", [(2, 2), (1, 3)])
def test_validation_is_split_over_ranks(tmp_path, num_shards, world):
    shards = write_shards(tmp_path, lambda i: make_sample(f"v{i}"), 6, 6 // num_shards)
    keys = [[s["key"] for s in _val(shards, rank=r, world_size=world)] for r in range(world)]
    flat = [k for ks in keys for k in ks]
    assert sorted(flat) == [f"v{i}" for i in range(6)] and all(keys)
    capped = [[s["key"] for s in _val(shards, rank=r, world_size=world, val_samples=4)] for r in range(world)]
    assert sum(map(len, capped)) == 4 and len({k for ks in capped for k in ks}) == 4


def test_two_workers_read_different_data(clips):
    dm = HalfBodyDataModule([str(p) for p in sorted(clips.glob("*.tar"))], num_frames=F, resolution=32, batch_size=1,
                            batches_per_epoch=4, num_workers=2, val_samples=6, seed=5)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = [(b["key"][0], decode_index(b["video"][0, 0])) for b in loader]
    epoch1 = [(b["key"][0], decode_index(b["video"][0, 0])) for b in loader]
    assert len(epoch0) == len(epoch1) == 4
    assert epoch0[0::2] != epoch0[1::2]  # batches alternate between worker 0 and worker 1
    assert epoch0 != epoch1  # the epoch is part of the seed
    val = [b["key"] for b in dm.val_dataloader()]
    assert sorted(k for ks in val for k in ks) == [f"clip{i:03d}" for i in range(6)]


# ------------------------------------------------------------------------------------------ features, specs, config
def test_precomputed_audio_features_are_sliced_like_the_video(tmp_path):
    feats = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 2, 3)).copy()
    shard = write_shard(tmp_path / "f.tar", [
        make_sample("f", num_frames=20, fps=50.0, extra={"whisper-tiny.feats.npy": npy_bytes(feats)}),
        make_sample("nofeat", num_frames=20, fps=50.0),
    ])
    samples = list(_train([shard], batches=4, audio_feats_field="whisper-tiny.feats.npy"))
    assert samples and all(s["key"] == "f" for s in samples)
    for s in samples:
        assert s["audio_feats"].shape == (F, 2, 3)
        assert s["audio_feats"][:, 0, 0].long().tolist() == [decode_index(f) for f in s["video"]]
    assert any(r == ("nofeat", "missing field: 'whisper-tiny.feats.npy' (configured audio_feats_field)")
               for s in samples for r in s["bad_samples"])
    batch = collate_samples(samples[:2])
    assert batch["audio_feats"].shape == (2, F, 2, 3)


def test_condition_spec_changes_at_runtime(clips):
    dm = HalfBodyDataModule(str(clips), num_frames=F, resolution=64, batch_size=1, batches_per_epoch=2,
                            num_workers=0, val_samples=1, condition={"pose_groups": "full"})
    dm.setup("fit")
    white = lambda b: int((b["pose"][0, 0].sum(0) >= 2.99).sum())  # noqa: E731  face dots are white
    full = next(iter(dm.val_dataloader()))
    assert white(full) > 0
    dm.set_condition_spec(ConditionSpec(pose_groups="hands", mask_margins={"lips": 1.0}))
    hands = next(iter(dm.val_dataloader()))
    assert white(hands) == 0 and 0 < hands["pose"].sum() < full["pose"].sum()
    assert hands["mask_lips"].sum() > full["mask_lips"].sum()
    dm.set_condition_spec({"pose_dropout": 1.0})
    assert all(b["pose"].abs().sum() == 0 for b in dm.train_dataloader())


def test_shard_specs_prepare_and_errors(tmp_path, clips):
    paths = sorted(str(p) for p in clips.glob("*.tar"))
    assert expand_shards(str(clips)) == paths
    assert expand_shards(str(clips / "shard-{000000..000001}.tar")) == paths
    assert expand_shards([paths[0], str(clips / "*001.tar")]) == paths
    with pytest.raises(FileNotFoundError, match="train_shards=.*nope.tar.*does not exist"):
        expand_shards(str(tmp_path / "nope.tar"), "train_shards")

    target = tmp_path / "generated"
    calls = []

    def prepare():
        calls.append(1)
        if not target.exists():
            write_shards(target, lambda i: make_sample(f"g{i}"), 2, 2)

    dm = HalfBodyDataModule(str(target), num_frames=F, resolution=32, batches_per_epoch=1, num_workers=0, prepare=prepare)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [1] and next(iter(dm.train_dataloader()))["key"][0] in {"g0", "g1"}
    with pytest.raises(ValueError, match="data.samples_per_epoch=.*or data.batches_per_epoch"):
        HalfBodyDataModule(str(clips), samples_per_epoch=4, batches_per_epoch=2)
    with pytest.raises(ValueError, match="resolution"):
        HalfBodyDataModule(str(clips), resolution=[32])
    assert HalfBodyDataModule(str(clips), samples_per_epoch=5, batch_size=2).batches_per_epoch == 3


class _Probe(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen += batch["key"]
        return (batch["video"].mean() - self.w) ** 2

    def validation_step(self, batch, batch_idx):
        self.log("val", batch["video"].mean(), batch_size=len(batch["key"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_fit_epochs_end(clips):
    dm = HalfBodyDataModule(str(clips), num_frames=4, resolution=16, batch_size=2, batches_per_epoch=2,
                            num_workers=0, val_samples=2)
    model = _Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4 and len(model.seen) == 8
    assert dm.bad_sample_summary()["good"] == 8 + 2 * 2  # train + two validation passes, via on_before_batch_transfer


def test_face_framing_crops_every_clip_to_its_head(tmp_path):
    """``framing: face`` (MirrorMe's face close-up phase): the head box, grown to the output aspect, fills the frame."""
    from data_pipelines.synthetic_world import generate_shards

    shards = [str(p) for p in generate_shards(tmp_path / "w", num_clips=2, num_frames=12, resolution=96, workers=0,
                                              headshot_fraction=0)]
    widths = {}
    for framing in ("full", "face"):
        dm = HalfBodyDataModule(shards, num_frames=4, resolution=[64, 48], batch_size=2, num_workers=0,
                                batches_per_epoch=1, val_samples=2, condition={"framing": framing})
        dm.setup("fit")
        batch = next(iter(dm.val_dataloader()))
        face = batch["kpts"][:, :, 23:91]  # normalised to the output frame
        widths[framing] = float((face[..., 0].amax(-1) - face[..., 0].amin(-1)).mean())
        centre = face[..., :2].mean(dim=(1, 2))
        if framing == "face":
            assert batch["video"].shape[-2:] == (64, 48)
            assert torch.all((centre - 0.5).abs() < 0.15)  # the face sits in the middle of the close-up
    assert widths["face"] > 1.3 * widths["full"]  # the face at a higher pixel resolution


def _decode_in_child(data: bytes, queue) -> None:
    from halfbody.data.dataset import decode_frames

    queue.put({i: f.shape for i, f in decode_frames(data, range(0, 10, 3)).items()})


def test_loader_workers_forked_beside_pyav_garbage_do_not_hang(clips, monkeypatch):
    """PyAV filter graphs are reference cycles; an audio resampler's holds a thread pool. A DataLoader worker forked
    while one was uncollected garbage in the main process, and collecting it, waited forever on threads it does not
    have (timed out here); the loaders collect the main process's garbage before their workers fork."""
    import gc

    read = TrainShardDataset.__iter__

    def collecting_iter(self):  # the worker's first collection finds what it inherited
        gc.enable()
        gc.collect()
        yield from read(self)

    monkeypatch.setattr(TrainShardDataset, "__iter__", collecting_iter)  # workers are forked: they see the patch
    dm = HalfBodyDataModule(str(clips), num_frames=F, resolution=32, batch_size=1, batches_per_epoch=2,
                            num_workers=1, val_samples=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.timeout = 30  # a hung worker fails the test instead of hanging the suite
    gc.disable()  # keep the garbage until the fork, as a busy training process between collections would
    try:
        leave_pyav_graph_garbage()
        batches = list(loader)
    finally:
        gc.enable()
    assert len(batches) == 2


def test_decoding_in_a_forked_worker_after_the_parent_converted_frames(tmp_path):
    """DataLoader workers are forked. PyAV (>= 18.1.1) shares one threaded colour converter per thread, which a forked
    child inherits without its threads: ``frame.to_ndarray(format="rgb24")`` there waits forever once the parent has
    converted a frame. ``decode_frames`` must finish in the child all the same."""
    import io
    import multiprocessing as mp

    import av

    from halfbody.data import media

    frames = np.random.default_rng(0).integers(0, 255, (10, 64, 64, 3), dtype=np.uint8)
    data = media.write_video(tmp_path / "clip.mp4", frames, 25.0).read_bytes()
    with av.open(io.BytesIO(data)) as container:  # the parent converts a frame the library's default way
        next(container.decode(video=0)).to_ndarray(format="rgb24")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_decode_in_child, args=(data, queue))
    child.start()
    child.join(30)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung, "decode_frames hung in a forked process"
    assert queue.get(timeout=10) == {0: (64, 64, 3), 3: (64, 64, 3), 6: (64, 64, 3), 9: (64, 64, 3)}
