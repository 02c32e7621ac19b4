"""Precomputed audio features: written into real shards, read back by the datamodule, accepted by the model,
and equal to what the model computes on the fly."""

from __future__ import annotations

import torch

from data_pipelines.precompute_audio_features import main
from data_pipelines.synthetic_world import generate_shards
from halfbody.data.datamodule import HalfBodyDataModule


def test_precompute_then_train_reads_the_field(tmp_path, capsys):
    src = generate_shards(tmp_path / "world", num_clips=3, num_frames=20, resolution=64, workers=0,
                          headshot_fraction=0.0)
    assert main(["--shards", str(tmp_path / "world"), "--out", str(tmp_path / "feats"),
                 "--encoder", "whisper_random_tiny"]) == 0
    field = capsys.readouterr().out.split("audio feature field: ")[1].split()[0]
    assert field.endswith(".audio_feats.npy") and "whisper" in field

    from halfbody.data.datamodule import expand_shards

    assert [p.split("/")[-1] for p in expand_shards(str(tmp_path / "feats"))] == [p.name for p in src]

    kw = dict(num_frames=8, resolution=64, batch_size=1, num_workers=0, val_samples=3, train_crop="center")
    with_feats = HalfBodyDataModule(str(tmp_path / "feats"), audio_feats_field=field, **kw)
    with_feats.setup("fit")
    batch = next(iter(with_feats.val_dataloader()))
    assert batch["audio_feats"].shape[:2] == (1, 8)

    # the cache holds the encoder's features of the whole clip, sliced to the window (validation starts at frame 0)
    import webdataset as wds

    from data_pipelines.precompute_audio_features import build_encoder
    from halfbody.data.media import load_audio_16k

    wav = {s["__key__"]: s["wav"] for s in wds.WebDataset([str(p) for p in src], shardshuffle=False)}[batch["key"][0]]
    enc = build_encoder("whisper_random_tiny")
    full = enc(torch.from_numpy(load_audio_16k(wav))[None], num_frames=20, fps=25.0)
    torch.testing.assert_close(batch["audio_feats"], full[:, :8], atol=2e-2, rtol=2e-2)  # float16 cache

    # a re-run skips finished shards
    assert main(["--shards", str(tmp_path / "world"), "--out", str(tmp_path / "feats"),
                 "--encoder", "whisper_random_tiny"]) == 0
