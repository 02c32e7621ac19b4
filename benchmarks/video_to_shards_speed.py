"""Speed of data_pipelines.video_to_shards without the pose model: clips per minute per core.

    python benchmarks/video_to_shards_speed.py [--num-videos 4] [--seconds 15] [--width 1280] [--height 720]
        [--clip-seconds 5] [--crop 512] [--workers 1 2] [--videos DIR]

Synthetic talking-person source videos (H.264 + AAC, 25 fps, with sidecar keypoints, a camera cut every
``--shot-seconds``) are written first (not timed; ``--videos DIR`` keeps and reuses them), then the pipeline runs
on them once per ``--workers`` value into a fresh output folder, pinned to that many cores (so "per core" means one
core, not one process that spreads its decoder/encoder threads over all of them). Everything except the pose model is measured:
decoding, scene cuts, filters, crops, H.264 encoding of the clips, shard writing. Synthetic frames are flat
cartoons, so decoding them is cheaper than decoding camera footage of the same size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from data_pipelines.video_to_shards import load_config, run
from data_pipelines.video_to_shards.synthetic import talker_video


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num-videos", type=int, default=4)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--shot-seconds", type=float, default=7.5)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--clip-seconds", type=float, default=5.0)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--headshot", action="store_true", help="also write headshot crops")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--videos", default=None, help="keep the source videos here (reused when present)")
    a = p.parse_args(argv)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"cpus: {os.cpu_count()}")

    tmp = Path(tempfile.mkdtemp(prefix="v2s_bench_"))
    videos = Path(a.videos) if a.videos else tmp / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    made = 0
    for i in range(a.num_videos):
        path = videos / f"talk{i:03d}.mp4"
        if not (path.is_file() and path.with_suffix(".npy").is_file()):
            talker_video(path, seed=1, index=10 * i, seconds=a.seconds, canvas=(a.width, a.height),
                         shot_seconds=a.shot_seconds)
            made += 1
    print(f"sources: {a.num_videos} videos of {a.seconds:g} s at {a.width}x{a.height}, 25 fps, a cut every "
          f"{a.shot_seconds:g} s ({made} written in {time.perf_counter() - t0:.1f} s, not timed)")
    cfg = load_config(None, [f"crop.size={a.crop}", f"crop.headshot={str(a.headshot).lower()}",
                             f"scenes.max_clip_seconds={a.clip_seconds}",
                             f"scenes.min_clip_seconds={min(2.0, a.clip_seconds)}", "keypoints.extractor=sidecar"])
    all_cores = os.sched_getaffinity(0)
    try:
        for w in a.workers:
            out = tmp / f"out_w{w}"
            # Pin the run to w cores (decoders, x264 and torch are multi-threaded: unpinned, one process uses all).
            cores = set(sorted(all_cores)[:w]) if w <= len(all_cores) else all_cores
            os.sched_setaffinity(0, cores)
            t = time.perf_counter()
            rep = run(videos, out, cfg, workers=w, progress=False)
            dt = time.perf_counter() - t
            os.sched_setaffinity(0, all_cores)
            w = len(cores)
            clips = rep.manifest["num_clips"]
            video_s = a.num_videos * a.seconds
            print(f"workers={w}: {clips} clips ({rep.manifest['total_hours'] * 3600:.0f} s of clips, crop {a.crop}) in "
                  f"{dt:.1f} s = {clips / dt * 60:.1f} clips/min = {clips / dt * 60 / w:.1f} clips/min/core; "
                  f"{video_s / dt:.2f} s of source video per s ({video_s / dt / w:.2f} per core)")
            if rep.rejections:
                print(f"  rejected: {rep.by_reason}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
