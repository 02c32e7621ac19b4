"""CLI: ``python -m data_pipelines.synthetic_world --out DIR --num-clips N --seed S [...]``."""

from __future__ import annotations

import argparse
import json
import time

from .generate import generate_shards


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.synthetic_world",
                                description="Write synthetic talker-world webdataset shards (shared/DESIGN.md §1).")
    p.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    p.add_argument("--num-clips", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-identities", type=int, default=8)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--fps", type=float, default=25.0)
    p.add_argument("--num-frames", type=int, default=50)
    p.add_argument("--headshot-fraction", type=float, default=0.2)
    p.add_argument("--ref-fraction", type=float, default=0.5)
    p.add_argument("--clips-per-shard", type=int, default=64)
    p.add_argument("--gestures", action="store_true", help="co-speech beat gestures (strokes at stressed syllables)")
    p.add_argument("--workers", type=int, default=None, help="render processes (default min(4, cpus))")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    shards = generate_shards(a.out, num_clips=a.num_clips, seed=a.seed, num_identities=a.num_identities,
                             resolution=a.resolution, fps=a.fps, num_frames=a.num_frames,
                             headshot_fraction=a.headshot_fraction, clips_per_shard=a.clips_per_shard,
                             workers=a.workers, ref_fraction=a.ref_fraction, gestures=a.gestures)
    dt = time.perf_counter() - t0
    print(json.dumps({"shards": [str(s) for s in shards], "seconds": round(dt, 2)}, indent=2))


if __name__ == "__main__":
    main()
