"""Precompute audio features into shards, so training reads them instead of running the audio encoder.

    python -m data_pipelines.precompute_audio_features --shards 'data/talk/train-*.tar' --out data/talk_feats \
        --encoder whisper_tiny [--pretrained-dir pretrained]

Every sample of every input shard is copied to a shard of the same name under ``--out`` with one extra field,
``<encoder identity>.audio_feats.npy``: float16 ``(num_frames, K, D)``, the encoder's features for each video frame
of the clip at its own fps. The field name carries the encoder's identity (checkpoint fingerprint included), so a
stale cache can never pass for a fresh one (shared/DESIGN.md §1); training reads it with
``data.audio_feats_field=<that name>`` and the model checks that the name matches its encoder. Shards are written
to a temporary name and renamed when complete; shards already present are skipped, so a re-run resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from halfbody.data.media import MediaError, load_audio_16k
from halfbody.utils.io import atomic_output

log = logging.getLogger("precompute_audio_features")


def build_encoder(name: str, overrides: list[str] = ()):
    """Instantiate ``conf/model/audio_encoder/<name>.yaml`` through the real Hydra config."""
    import hydra
    from hydra import compose, initialize_config_dir

    from halfbody.utils.hydra import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model/audio_encoder={name}", *overrides])
    return hydra.utils.instantiate(cfg.model.audio_encoder)


def feature_field(encoder) -> str:
    return f"{encoder.identity}.audio_feats.npy".lower()


@torch.no_grad()
def clip_features(encoder, wav: bytes, meta: dict) -> np.ndarray:
    audio = torch.from_numpy(load_audio_16k(wav))[None]
    feats = encoder(audio, num_frames=int(meta["num_frames"]), fps=float(meta["fps"]))[0]
    return feats.to(torch.float16).numpy()


def process_shard(src: Path, dst: Path, encoder, field: str) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` adding ``field``; samples whose audio cannot be read are copied without it."""
    import webdataset as wds

    done = skipped = 0
    with atomic_output(dst) as tmp, open(tmp, "wb") as fh:
        writer = wds.TarWriter(fh)
        for sample in wds.WebDataset(str(src), shardshuffle=False, handler=wds.warn_and_continue):
            out = {k: v for k, v in sample.items() if k != "__url__" and not k.startswith("__local")}
            try:
                meta = json.loads(sample["json"])
                buf = io.BytesIO()
                np.save(buf, clip_features(encoder, sample["wav"], meta), allow_pickle=False)
                out[field] = buf.getvalue()
                done += 1
            except (KeyError, ValueError, MediaError) as e:
                log.warning("%s: sample %s copied without features: %s", src.name, sample.get("__key__"), e)
                skipped += 1
            writer.write(out)
        writer.close()
    return done, skipped


def main(argv: list[str] | None = None) -> int:
    from halfbody.data.datamodule import expand_shards

    ap = argparse.ArgumentParser(description="Precompute audio features into webdataset shards.")
    ap.add_argument("--shards", required=True, help="brace pattern, glob or directory of input shards")
    ap.add_argument("--out", required=True, help="output directory (shards keep their names)")
    ap.add_argument("--encoder", default="whisper_tiny", help="a config of conf/model/audio_encoder/")
    ap.add_argument("--pretrained-dir", default=None, help="overrides paths.pretrained_dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    overrides = [f"paths.pretrained_dir={args.pretrained_dir}"] if args.pretrained_dir else []
    encoder = build_encoder(args.encoder, overrides)
    field = feature_field(encoder)
    out = Path(args.out)
    for src in map(Path, expand_shards(args.shards, "--shards")):
        dst = out / src.name
        if dst.exists():
            log.info("%s exists, skipped", dst)
            continue
        done, skipped = process_shard(src, dst, encoder, field)
        log.info("%s: %d samples with features, %d without", dst, done, skipped)
    print(f"audio feature field: {field}\ntrain with: data.audio_feats_field={field}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
