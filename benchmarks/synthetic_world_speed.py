"""Synthetic-world generation speed: clips per second, rendering only and end to end (shards on disk).

    python benchmarks/synthetic_world_speed.py [--num-clips 64] [--workers 2] [--resolution 128] [--num-frames 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from data_pipelines.synthetic_world import WorldConfig, generate_shards, render_clip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-clips", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num-frames", type=int, default=50)
    p.add_argument("--fps", type=float, default=25.0)
    a = p.parse_args(argv)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))

    cfg = WorldConfig(resolution=a.resolution, num_frames=a.num_frames, fps=a.fps)
    n_render = max(1, min(a.num_clips, 16))
    t0 = time.perf_counter()
    for i in range(n_render):
        render_clip(cfg, i)
    render_s = time.perf_counter() - t0

    out = tempfile.mkdtemp(prefix="synthetic_world_bench_")
    try:
        t0 = time.perf_counter()
        generate_shards(out, num_clips=a.num_clips, resolution=a.resolution, num_frames=a.num_frames, fps=a.fps,
                        workers=a.workers, clips_per_shard=64)
        total_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate_shards(out, num_clips=a.num_clips, resolution=a.resolution, num_frames=a.num_frames, fps=a.fps,
                        workers=a.workers, clips_per_shard=64)
        noop_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    frames = a.num_clips * a.num_frames
    print(f"render only (1 process): {n_render / render_s:.2f} clips/s ({render_s / n_render * 1000:.0f} ms/clip)")
    print(f"generate_shards ({a.workers} workers, {a.num_clips} clips of {a.num_frames} frames at "
          f"{a.resolution}x{a.resolution}): {total_s:.1f} s = {a.num_clips / total_s:.2f} clips/s, "
          f"{frames / total_s:.0f} frames/s")
    print(f"generate_shards no-op (complete manifest): {noop_s * 1000:.1f} ms")


if __name__ == "__main__":
    main()
