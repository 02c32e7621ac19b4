"""Inspect a shard set: a summary, and a preview video of one sample with its conditions drawn over it.

    python -m data_pipelines.video_to_shards.inspect shards/                       # summary
    python -m data_pipelines.video_to_shards.inspect 'shards/clips-{000000..000003}.tar' --deep --json
    python -m data_pipelines.video_to_shards.inspect shards/ --preview alice_0003 --out alice_0003.mp4

Works on any shard set that follows shared/DESIGN.md §1, not only this tool's. The summary counts clips, hours,
identities and kinds, gives the keypoint score distribution per keypoint group, and lists the bad samples with
the loader's reasons (``category: detail``, as ``halfbody.data.dataset`` reports them). ``--deep`` also decodes
every video. The preview shows, side by side, the clip with the region masks (head blue, face green, lips red)
and the keypoints drawn over it, and the pose map the model is conditioned on (``halfbody.data.conditions``),
with the clip's audio.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from pathlib import Path

import av
import numpy as np

from halfbody.data import media
from halfbody.data.conditions import PoseRenderer, region_masks
from halfbody.data.datamodule import expand_shards
from halfbody.data.dataset import REQUIRED_FIELDS, BadSampleLedger, load_clip_audio, parse_meta, read_shard
from halfbody.data.keypoints import FACE, FEET, LEFT_HAND, NUM_KEYPOINTS, RIGHT_HAND, unnormalised_keypoints
from halfbody.data.transforms import BadSample

SCORE_GROUPS = {
    "body": tuple(range(0, 17)),
    "feet": FEET,
    "face": FACE,
    "left_hand": LEFT_HAND,
    "right_hand": RIGHT_HAND,
}
_BINS = np.linspace(0.0, 1.0, 21)  # 0.05-wide score bins


def _fields(raw: dict) -> dict:
    return {str(k).lower(): v for k, v in raw.items()}


def check_sample(raw: dict, deep: bool = False) -> tuple[dict, np.ndarray]:
    """Validate one raw shard sample like the loader does. Returns ``(meta, kpts)``; raises ``BadSample``."""
    fields = _fields(raw)
    for f in REQUIRED_FIELDS:
        if f not in fields:
            raise BadSample("missing field", f"{f!r} (has {sorted(k for k in fields if not k.startswith('__'))})")
    meta = parse_meta(fields["json"])
    try:
        kpts = np.load(io.BytesIO(fields["kpts.npy"]), allow_pickle=False)
    except Exception as e:  # numpy raises many types on junk
        raise BadSample("bad array", f"kpts.npy: {type(e).__name__}: {e}") from e
    if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3) or kpts.shape[0] != meta["num_frames"]:
        raise BadSample("wrong array shape", f"kpts.npy is {kpts.shape}, json num_frames={meta['num_frames']}")
    if not np.issubdtype(kpts.dtype, np.floating) and not np.issubdtype(kpts.dtype, np.integer):
        raise BadSample("wrong array shape", f"kpts.npy dtype {kpts.dtype}")
    kpts = kpts.astype(np.float32)
    if not np.all(np.isfinite(kpts)):
        raise BadSample("NaN keypoints", f"{int((~np.isfinite(kpts)).sum())} non-finite values in kpts.npy")
    units = unnormalised_keypoints(kpts, meta["width"], meta["height"])  # the loader's own check
    if units is not None:
        raise BadSample("pixel-unit keypoints", f"kpts.npy: {units}")
    load_clip_audio(fields["wav"], meta["num_frames"], float(meta["fps"]))  # header vs clip duration, then decode
    try:
        with av.open(io.BytesIO(fields["mp4"]), mode="r") as c:
            if not c.streams.video:
                raise BadSample("undecodable mp4", "no video stream")
            s = c.streams.video[0]
            if s.frames and s.frames != meta["num_frames"]:
                raise BadSample("frame count mismatch", f"mp4 has {s.frames} frames, json num_frames={meta['num_frames']}")
            if deep:
                n = sum(1 for _ in c.decode(s))
                if n != meta["num_frames"]:
                    raise BadSample("frame count mismatch", f"decoded {n} frames, json num_frames={meta['num_frames']}")
    except BadSample:
        raise
    except (av.error.FFmpegError, EOFError, OSError, ValueError) as e:
        raise BadSample("undecodable mp4", f"{type(e).__name__}: {e}") from e
    return meta, kpts


def summarize(shards, deep: bool = False) -> dict:
    """Summary of a shard set (a directory, brace pattern, glob or list). See the module docstring."""
    paths = expand_shards(shards, "shards")
    if not paths:
        raise FileNotFoundError(f"shards={shards!r}: no shards")
    ledger = BadSampleLedger(max_bad_fraction=1.0, min_samples=1 << 60, log_records=False)  # count, never stop
    kinds: Counter[str] = Counter()
    identities: Counter[str] = Counter()
    seconds = 0.0
    frames = 0
    hist = {g: np.zeros(len(_BINS) - 1, np.int64) for g in SCORE_GROUPS}
    visible = {g: 0 for g in SCORE_GROUPS}
    totals = {g: 0 for g in SCORE_GROUPS}
    sums = {g: 0.0 for g in SCORE_GROUPS}
    bad: list[dict] = []
    per_shard = []
    for url in paths:
        n_good = 0
        before = len(ledger.pending)
        for raw in read_shard(url, ledger):
            key = str(raw.get("__key__", "?"))
            try:
                meta, kpts = check_sample(raw, deep)
            except BadSample as e:
                ledger.record(key, e.reason)
                continue
            ledger.add_good()
            n_good += 1
            kinds[meta["kind"]] += 1
            identities[meta["identity"]] += 1
            seconds += meta["num_frames"] / meta["fps"]
            frames += meta["num_frames"]
            for g, idx in SCORE_GROUPS.items():
                sc = kpts[:, list(idx), 2].reshape(-1)
                hist[g] += np.histogram(np.clip(sc, 0, 1), bins=_BINS)[0]
                visible[g] += int((sc >= 0.3).sum())
                totals[g] += sc.size
                sums[g] += float(sc.sum())
        for key, reason in ledger.pending[before:]:
            bad.append({"shard": Path(url).name, "key": key, "reason": reason})
        per_shard.append({"name": Path(url).name, "good": n_good})
    ledger.take_pending()

    def pct(h: np.ndarray, q: float) -> float:
        total = h.sum()
        if total == 0:
            return float("nan")
        i = int(np.searchsorted(np.cumsum(h), q * total, side="left"))
        return float(_BINS[min(i + 1, len(_BINS) - 1)])

    scores = {g: {"mean": round(sums[g] / totals[g], 4) if totals[g] else None,
                  "visible_fraction": round(visible[g] / totals[g], 4) if totals[g] else None,
                  "p10": pct(hist[g], 0.1), "p50": pct(hist[g], 0.5), "p90": pct(hist[g], 0.9),
                  "histogram": hist[g].tolist()} for g in SCORE_GROUPS}
    return {
        "shards": len(paths), "clips": ledger.good, "frames": frames, "hours": round(seconds / 3600.0, 6),
        "seconds": round(seconds, 3), "identities": dict(identities.most_common()), "kinds": dict(sorted(kinds.items())),
        "keypoint_scores": scores, "score_bins": [round(float(b), 2) for b in _BINS],
        "bad_samples": bad, "bad_by_reason": dict(ledger.bad), "per_shard": per_shard,
    }


def format_summary(s: dict, max_identities: int = 10, max_bad: int = 30) -> str:
    ids = s["identities"]
    top = ", ".join(f"{k} {v}" for k, v in list(ids.items())[:max_identities])
    lines = [
        f"{s['shards']} shards: {s['clips']} clips, {s['frames']} frames, {s['hours']:.3f} h ({s['seconds']:.1f} s)",
        f"kinds: {s['kinds']}",
        f"identities: {len(ids)} ({top}{' ...' if len(ids) > max_identities else ''})",
        "keypoint scores (mean / share >= 0.3 / p10 p50 p90, as upper edges of 0.05-wide bins):",
    ]
    for g, v in s["keypoint_scores"].items():
        if v["mean"] is None:
            continue
        lines.append(f"  {g:<11} {v['mean']:.3f} / {v['visible_fraction']:.1%} / {v['p10']:.2f} {v['p50']:.2f} {v['p90']:.2f}")
    lines.append(f"bad samples: {len(s['bad_samples'])} {s['bad_by_reason'] if s['bad_samples'] else ''}".rstrip())
    for b in s["bad_samples"][:max_bad]:
        lines.append(f"  {b['shard']} {b['key']}: {b['reason']}")
    if len(s["bad_samples"]) > max_bad:
        lines.append(f"  ... {len(s['bad_samples']) - max_bad} more (--json lists all)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ preview
def find_sample(shards, which: str | int = 0) -> dict:
    """The raw sample with key ``which`` (str), or the ``which``-th sample (int) of the shard set."""
    ledger = BadSampleLedger(max_bad_fraction=1.0, min_samples=1 << 60, log_records=False)
    i = 0
    for url in expand_shards(shards, "shards"):
        for raw in read_shard(url, ledger):
            if (isinstance(which, str) and raw.get("__key__") == which) or (isinstance(which, int) and i == which):
                return raw
            i += 1
    raise KeyError(f"no sample {which!r} in {shards!r} ({i} samples)")


_MASK_COLORS = {"mask_head": (40, 90, 255), "mask_face": (40, 220, 60), "mask_lips": (255, 40, 40)}


def preview_frames(raw: dict, groups: str = "full", score_threshold: float = 0.3) -> tuple[np.ndarray, float, np.ndarray]:
    """``(frames (T, H, 2W, 3) uint8, fps, audio 16 kHz)``: left the clip with masks and keypoints, right the pose map."""
    meta, kpts = check_sample(raw)
    fields = _fields(raw)
    video, _ = media.read_video(fields["mp4"])
    t = min(video.shape[0], kpts.shape[0])
    h, w = meta["height"], meta["width"]
    video = video[:t, :h, :w]
    px = kpts[:t].copy()
    px[..., 0] *= w
    px[..., 1] *= h
    pose = (PoseRenderer(groups, score_threshold).render(px, h, w).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    head_box = meta.get("head_box")
    hb = [head_box[0] * w, head_box[1] * h, head_box[2] * w, head_box[3] * h] if head_box else None
    masks = region_masks(px, h, w, score_threshold=score_threshold, head_box=hb)
    left = video.astype(np.float32)
    for name in ("mask_head", "mask_face", "mask_lips"):  # outer to inner
        m = masks[name][:, 0].numpy()[..., None]
        left = left * (1 - 0.3 * m) + np.asarray(_MASK_COLORS[name], np.float32) * (0.3 * m)
    drawn = pose.max(axis=-1, keepdims=True) > 0
    left = np.where(drawn, pose, left.round().clip(0, 255).astype(np.uint8))
    audio = media.load_audio_16k(fields["wav"])
    return np.concatenate([left, pose], axis=2), float(meta["fps"]), audio


def render_preview(shards, which: str | int, out: str | Path, groups: str = "full") -> Path:
    """Write the preview mp4 (H.264 + AAC) of one sample; see ``preview_frames``."""
    frames, fps, audio = preview_frames(find_sample(shards, which), groups)
    return media.write_video(out, frames, fps, audio)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.video_to_shards.inspect",
                                description="Summarise a webdataset shard set; render a preview of one sample.")
    p.add_argument("shards", help="a folder of .tar shards, a brace pattern or a glob")
    p.add_argument("--deep", action="store_true", help="also decode every video")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--preview", default=None, metavar="KEY_OR_INDEX", help="render this sample (a key or an index)")
    p.add_argument("--out", default=None, help="preview mp4 path (default: <key>.preview.mp4)")
    p.add_argument("--groups", default="full", help="pose keypoint groups of the preview (full, no_lips, no_head, hands)")
    a = p.parse_args(argv)
    try:
        if a.preview is not None:
            which: str | int = int(a.preview) if a.preview.isdigit() else a.preview
            raw = find_sample(a.shards, which)
            out = Path(a.out or f"{raw['__key__']}.preview.mp4")
            frames, fps, audio = preview_frames(raw, a.groups)
            media.write_video(out, frames, fps, audio)
            print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, {fps:g} fps, with audio)")
            return 0
        s = summarize(a.shards, deep=a.deep)
    except (FileNotFoundError, KeyError, BadSample, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s, indent=1) if a.json else format_summary(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
