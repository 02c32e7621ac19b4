"""Reference points for the synthetic world's oracle metrics, on the validation windows a model is scored on.

    python benchmarks/oracle_calibration.py [--num-frames 8] [--clips 16] [--resolution 64]

Scores four "generators" on the same validation windows (through the real datamodule, exactly as validation sees
them): the ground truth, the ground truth with another clip's audio, the reference image held still, and Gaussian
noise. A trained model's numbers (benchmarks/learning_check.py) read against these.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from data_pipelines.synthetic_world import generate_world
from halfbody.data.datamodule import HalfBodyDataModule
from halfbody.metrics.oracle import ORACLE_METRICS, oracle_metrics

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data" / "synthetic_world_256"))
    ap.add_argument("--num-frames", type=int, default=8)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()

    generate_world(args.data, train_clips=256, val_clips=16, workers=2)  # the learning check's world (no-op if there)
    dm = HalfBodyDataModule(train_shards=f"{args.data}/train", val_shards=f"{args.data}/val", num_frames=args.num_frames,
                            resolution=args.resolution, batch_size=1, num_workers=0, val_samples=args.clips,
                            target_head_box=[0.23, 0.01, 0.75, 0.56])
    dm.setup("fit")
    clips = list(dm.val_dataloader())
    g = torch.Generator().manual_seed(0)
    rows: dict[str, list[dict[str, float]]] = {"ground truth": [], "ground truth, other clip's audio": [],
                                               "reference held still": [], "Gaussian noise": []}
    for i, b in enumerate(clips):
        video, ref, kpts, audio, fps = b["video"][0], b["ref"][0], b["kpts"][0], b["audio"][0], b["fps"][0]
        other_audio = clips[(i + 1) % len(clips)]["audio"][0]
        rows["ground truth"].append(oracle_metrics(video, ref, kpts, audio, fps))
        rows["ground truth, other clip's audio"].append(oracle_metrics(video, ref, kpts, other_audio, fps))
        rows["reference held still"].append(oracle_metrics(ref.expand_as(video), ref, kpts, audio, fps))
        noise = torch.randn(video.shape, generator=g).clamp(-1, 1)
        rows["Gaussian noise"].append(oracle_metrics(noise, ref, kpts, audio, fps))

    print(f"{len(clips)} validation clips, {args.num_frames} frames, {args.resolution}x{args.resolution} "
          f"(mean over clips; nan-aware)\n")
    print("| generator | " + " | ".join(ORACLE_METRICS) + " |")
    print("|---|" + "---:|" * len(ORACLE_METRICS))
    for name, ms in rows.items():
        vals = [np.nanmean([m[k] for m in ms]) for k in ORACLE_METRICS]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
