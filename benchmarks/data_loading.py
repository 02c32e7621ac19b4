"""Data-loading throughput of HalfBodyDataModule: samples/s with mp4 decoding, fps/audio alignment, resize/crop
and pose/mask rendering, on dataloader workers (default 2), plus a per-stage breakdown in one process.

    python benchmarks/data_loading.py                       # writes temporary shards, 2 workers
    python benchmarks/data_loading.py --shards 'data/train-{000000..000009}.tar' --resolution 512

Without ``--shards`` it writes clips with tests/shard_utils.py (real H.264 + WAV, textured moving frames).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _textured_frames(t: int, h: int, w: int, seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        p = i * 0.2 + seed
        out[i, ..., 0] = 127 + 100 * np.sin(xx / 17 + p)
        out[i, ..., 1] = 127 + 100 * np.sin(yy / 23 - p)
        out[i, ..., 2] = 127 + 100 * np.sin((xx + yy) / 31 + 2 * p)
    return out


def write_bench_shards(directory: Path, clips: int, frames: int, height: int, width: int, fps: float) -> list[str]:
    from shard_utils import make_sample, person_keypoints, tone_burst, write_shards

    def make(i: int) -> dict:
        return make_sample(f"bench{i:04d}", num_frames=frames, fps=fps, height=height, width=width,
                           frames=_textured_frames(frames, height, width, i), kpts=person_keypoints(frames),
                           audio=tone_burst(frames, fps, 44100, frames // 2, channels=2), audio_rate=44100,
                           head_box=None)

    return [str(p) for p in write_shards(directory, make, clips, max(1, clips // 4), prefix="bench")]


def stage_breakdown(shards: list[str], args) -> dict[str, float]:
    """Milliseconds per sample for each stage, measured in this process on the first shard's samples."""
    import io

    from halfbody.data import media
    from halfbody.data.conditions import PoseRenderer, region_masks
    from halfbody.data.dataset import decode_frames, read_shard, BadSampleLedger
    from halfbody.data.transforms import audio_window, crop_geometry, sample_window

    rng = np.random.default_rng(0)
    times = {"decode mp4": 0.0, "wav + resample + window": 0.0, "resize/crop": 0.0, "pose render": 0.0, "masks": 0.0}
    n = 0
    renderer = PoseRenderer("full")
    for raw in read_shard(shards[0], BadSampleLedger()):
        kpts = np.load(io.BytesIO(raw["kpts.npy"]))
        import json

        meta = json.loads(raw["json"])
        start, idx = sample_window(meta["num_frames"], args.frames, meta["fps"], args.fps, rng)
        t0 = time.perf_counter()
        frames = decode_frames(raw["mp4"], idx)
        t1 = time.perf_counter()
        audio_window(media.load_audio_16k(raw["wav"]), start, meta["fps"], args.frames, args.fps)
        t2 = time.perf_counter()
        stack = np.stack([frames[int(i)] for i in idx])
        geom = crop_geometry(stack.shape[2], stack.shape[1], args.resolution, args.resolution, rng)
        geom.apply_frames(stack)
        k = geom.apply_keypoints(kpts[idx])
        t3 = time.perf_counter()
        renderer.render(k, args.resolution, args.resolution)
        t4 = time.perf_counter()
        region_masks(k, args.resolution, args.resolution)
        t5 = time.perf_counter()
        for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            times[name] += dt
        n += 1
    return {k: 1000 * v / max(n, 1) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default=None, help="shard pattern/dir/list (default: temporary generated shards)")
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--batches", type=int, default=40, help="timed batches (after one warm-up batch per worker)")
    ap.add_argument("--frames", type=int, default=12, help="clip length F")
    ap.add_argument("--fps", type=float, default=25.0, help="target fps")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--clips", type=int, default=16, help="generated clips")
    ap.add_argument("--source-fps", type=float, default=30.0, help="generated clips' fps (differs -> resampling)")
    ap.add_argument("--source-size", default="384x512", help="generated clips' HxW")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    from halfbody.data.datamodule import HalfBodyDataModule, expand_shards

    tmp = None
    if args.shards is None:
        tmp = tempfile.TemporaryDirectory(prefix="halfbody-bench-")
        h, w = (int(v) for v in args.source_size.split("x"))
        t0 = time.perf_counter()
        shards = write_bench_shards(Path(tmp.name), args.clips, int(args.source_fps * 3), h, w, args.source_fps)
        print(f"wrote {args.clips} clips ({h}x{w}, {args.source_fps:g} fps, 3 s) in {time.perf_counter() - t0:.1f} s")
    else:
        shards = expand_shards(args.shards, "--shards")

    dm = HalfBodyDataModule(shards, num_frames=args.frames, fps=args.fps, resolution=args.resolution,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            batches_per_epoch=args.batches + max(1, args.num_workers), val_samples=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(max(1, args.num_workers)):  # warm-up: worker start and first sample of each worker
        next(it)
    t0 = time.perf_counter()
    samples = 0
    for batch in it:
        samples += len(batch["key"])
    dt = time.perf_counter() - t0
    cmd = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    print(f"command: {cmd}")
    print(f"config: F={args.frames} @ {args.fps:g} fps, {args.resolution}x{args.resolution}, batch {args.batch_size}, "
          f"{args.num_workers} workers, pose 'full' + 3 masks")
    print(f"warm-up (worker start + first batches): {t0 - t_start:.2f} s")
    print(f"throughput: {samples / dt:.2f} samples/s ({samples} samples in {dt:.2f} s, "
          f"{samples * args.frames / dt:.0f} frames/s)")
    stages = stage_breakdown(shards, args)
    print("per-sample stages in one process (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
