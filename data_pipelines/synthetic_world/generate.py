"""Clips of the synthetic talker world, in memory and as webdataset shards (shared/DESIGN.md §1).

Ground truth per clip (all exact, all deterministic in ``(seed, clip index)``):

- ``envelope[f] = e(f / fps)``: the syllable envelope of the audio at the frame's time (``audio.py``).
- ``mouth_opening[f] = envelope[f]``: the mouth interior is an ellipse of half-height
  ``mouth_opening * identity.mouth_max_open`` (head-local units), drawn in the shared dark red.
- Head sway: roll ``= +-7 deg * s(t)`` about the neck base and a nod of ``0.03 * head_ry * s(t)``, where
  ``s`` is ``e`` through a causal one-pole low-pass (0.3 s).
- Hands: smooth random wrist trajectories; the gloves are drawn from the 21 hand keypoints per hand.
  With ``WorldConfig.gestures`` (off by default) the hands make co-speech beat gestures instead: strokes at
  stressed syllable onsets with a per-identity style (``gestures.py``), and the stroke apex times are recorded in
  the ``json`` field (``synthetic.gestures``).

Clip ``i`` is a headshot when ``floor((i + 1) h) > floor(i h)`` for ``h = headshot_fraction`` and carries a
``ref.png`` when the same holds for ``ref_fraction``: the fractions are exact and evenly spread, so even a
tiny shard set has both kinds and both reference paths.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from halfbody.data.media import AUDIO_SAMPLE_RATE, encode_video, encode_wav

from .audio import sample_syllables, sway_signal, synthesize_voice
from .gestures import _GESTURE_STREAM, beat_gestures, gesture_style
from .identity import Identity, make_identity
from .render import (SIDES, FrameState, draw_frame, halfbody_camera, head_box, headshot_camera, keypoints_of,
                     layout_of, neutral_state, pose_of, static_layer)

GENERATOR_VERSION = 1  # bump whenever the pixels, audio or keypoints of a (seed, index) change
SOURCE = "synthetic_world"
MANIFEST = "manifest.json"
SHARD_PREFIX = "synthetic-"
_CLIP_STREAM = 0xC1


@dataclass(frozen=True)
class WorldConfig:
    """Everything that determines a clip besides its index."""

    seed: int = 0
    num_identities: int = 8
    resolution: int = 128
    fps: float = 25.0
    num_frames: int = 50
    headshot_fraction: float = 0.2
    ref_fraction: float = 0.5
    gestures: bool = False  # co-speech beat gestures (gestures.py) instead of speech-independent hand motion

    def __post_init__(self):
        checks = {
            "num_identities": self.num_identities >= 1,
            "resolution": 16 <= self.resolution <= 2048,
            "fps": 1.0 <= self.fps <= 120.0,
            "num_frames": self.num_frames >= 1,
            "headshot_fraction": 0.0 <= self.headshot_fraction <= 1.0,
            "ref_fraction": 0.0 <= self.ref_fraction <= 1.0,
            "gestures": isinstance(self.gestures, bool),
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"synthetic_world: bad {key}={getattr(self, key)!r}")


@dataclass
class Clip:
    """One rendered clip.

    Attributes:
        frames: uint8 ``(T, H, W, 3)``.
        audio: float32 ``(S,)`` mono 16 kHz, ``S = round(T / fps * 16000)``.
        kpts: float32 ``(T, 133, 3)`` normalised COCO-WholeBody keypoints with scores.
        envelope: float32 ``(T,)``, ``e(f / fps)`` in ``[0, 1]``.
        mouth_opening: float32 ``(T,)``, equal to ``envelope`` (the documented mouth law).
        reference: uint8 ``(H, W, 3)``: the identity in the neutral pose, same camera (always rendered;
            written to the shard only when ``has_ref``).
        meta: the sample's ``json`` field.
    """

    key: str
    frames: np.ndarray
    audio: np.ndarray
    kpts: np.ndarray
    envelope: np.ndarray
    mouth_opening: np.ndarray
    reference: np.ndarray
    has_ref: bool
    identity: Identity
    meta: dict = field(default_factory=dict)


def _stratified(index: int, fraction: float) -> bool:
    return math.floor((index + 1) * fraction + 1e-9) > math.floor(index * fraction + 1e-9)


def clip_kind(config: WorldConfig, index: int) -> str:
    return "headshot" if _stratified(index, config.headshot_fraction) else "halfbody"


def clip_key(config: WorldConfig, index: int) -> str:
    return f"sw{config.seed}_{index:06d}"


def _smooth(rng: np.random.Generator, t: np.ndarray, fmin: float, fmax: float, terms: int = 3) -> np.ndarray:
    """Sum of a few random sinusoids, normalised to ``[-1, 1]``: a smooth random trajectory."""
    a = rng.uniform(0.5, 1.0, terms)
    f = rng.uniform(fmin, fmax, terms)
    ph = rng.uniform(0.0, 2 * np.pi, terms)
    return (a[None] * np.sin(2 * np.pi * f[None] * t[:, None] + ph[None])).sum(1) / a.sum()


def _blinks(rng: np.random.Generator, t: np.ndarray, duration: float) -> np.ndarray:
    """1 = open; blinks of 0.16 s (triangle) at Poisson times, ~1 every 3 s."""
    out = np.ones_like(t)
    s = rng.exponential(3.0) * rng.random()
    while s < duration:
        out = np.minimum(out, np.clip(np.abs(t - s) / 0.08, 0.0, 1.0))
        s += 0.3 + rng.exponential(3.0)
    return out


def render_clip(config: WorldConfig, index: int, kind: str | None = None) -> Clip:
    """Render clip ``index`` of the world ``config`` in memory (see the module docstring for the ground truth)."""
    kind = kind or clip_kind(config, index)
    if kind not in ("halfbody", "headshot"):
        raise ValueError(f"synthetic_world: bad kind={kind!r} (halfbody or headshot)")
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), _CLIP_STREAM, int(index)]))
    identity = make_identity(config.seed, index % config.num_identities)
    layout = layout_of(identity)
    res, T, fps = config.resolution, config.num_frames, float(config.fps)
    cam = headshot_camera(rng, layout, res) if kind == "headshot" else halfbody_camera(rng, res)

    duration = T / fps
    syllables = sample_syllables(rng, duration, identity.syllable_rate)
    audio = synthesize_voice(identity, syllables, int(round(duration * AUDIO_SAMPLE_RATE)), rng)
    t = np.arange(T) / fps
    envelope = syllables.envelope(t).astype(np.float32)
    sway = sway_signal(syllables, t)
    sway_sign = float(rng.choice([-1.0, 1.0]))
    blink = _blinks(rng, t, duration)
    gesture = rng.uniform(0.4, 1.2)
    wrists, flex, curl = {}, {}, {}
    for s in SIDES:
        rest = layout.wrist_rest[s]
        xlo, xhi = (0.56, 0.92) if s == "left" else (0.08, 0.44)
        x = np.clip(rest[0] + gesture * 0.12 * _smooth(rng, t, 0.2, 0.9), xlo, xhi)
        y = np.clip(rest[1] + gesture * 0.08 * _smooth(rng, t, 0.2, 0.9) - 0.02 * gesture, 0.64, 0.90)
        wrists[s] = np.stack([x, y], 1)
        flex[s] = 0.45 * _smooth(rng, t, 0.15, 0.7)
        curl[s] = np.clip(0.3 + 0.3 * _smooth(rng, t, 0.2, 0.8), 0.0, 1.0)
    gesture_meta = None
    if config.gestures:  # its own random stream: the rest of the clip is drawn exactly as without gestures
        grng = np.random.default_rng(np.random.SeedSequence([int(config.seed), _GESTURE_STREAM, 1, int(index)]))
        style = gesture_style(config.seed, identity.index)
        wrists, curl, apex = beat_gestures(syllables, style, layout.wrist_rest, t, grng)
        gesture_meta = {"law": "beat strokes: apex at stressed syllable onset + lag (data_pipelines/synthetic_world/"
                               "gestures.py)", "style": style.to_json(),
                        "stroke_times": [round(float(v), 4) for v in apex],
                        "syllable_onsets": [round(float(v), 4) for v in syllables.start]}

    static = static_layer(identity, layout, cam)
    frames = np.empty((T, res, res, 3), np.uint8)
    kpts = np.empty((T, 133, 3), np.float32)
    poses = []
    for f in range(T):
        st = FrameState(float(envelope[f]), float(sway[f]), sway_sign, float(blink[f]),
                        {s: wrists[s][f] for s in SIDES}, {s: float(flex[s][f]) for s in SIDES},
                        {s: float(curl[s][f]) for s in SIDES})
        pose = pose_of(identity, layout, st)
        poses.append(pose)
        frames[f] = draw_frame(identity, layout, cam, static, pose)
        kpts[f] = keypoints_of(layout, cam, pose)
    reference = draw_frame(identity, layout, cam, static, pose_of(identity, layout, neutral_state(layout)))
    has_ref = _stratified(index, config.ref_fraction)
    key = clip_key(config, index)
    meta = {
        "fps": fps, "num_frames": T, "width": res, "height": res, "kind": kind, "identity": identity.name,
        "source": SOURCE, "head_box": [round(v, 5) for v in head_box(layout, cam, poses, identity)],
        "synthetic": {
            "generator_version": GENERATOR_VERSION, "seed": int(config.seed), "clip_index": int(index),
            "identity_index": identity.index, "has_ref": has_ref,
            "camera": [round(cam.x0, 5), round(cam.y0, 5), round(cam.size, 5)],
            "mouth_law": "mouth_opening[f] = envelope[f] = e(f / fps); inner half-height = opening * mouth_max_open",
            "mouth_opening": [round(float(v), 4) for v in envelope],
            "identity": identity.to_json(),
        },
    }
    if gesture_meta is not None:
        meta["synthetic"]["gestures"] = gesture_meta
    return Clip(key, frames, audio, kpts, envelope, envelope.copy(), reference, has_ref, identity, meta)


# ------------------------------------------------------------------------------------------ shards
def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_clip(clip: Clip) -> dict:
    """A clip -> a webdataset sample dict (bytes per field) in the public schema."""
    sample = {
        "__key__": clip.key,
        "mp4": encode_video(clip.frames, clip.meta["fps"]),
        "wav": encode_wav(clip.audio, AUDIO_SAMPLE_RATE),
        "kpts.npy": _npy(np.ascontiguousarray(clip.kpts, dtype=np.float32)),
        "json": json.dumps(clip.meta, sort_keys=True).encode("utf-8"),
    }
    if clip.has_ref:
        sample["ref.png"] = _png(clip.reference)
    return sample


def _render_encode(args: tuple[WorldConfig, int]) -> tuple[dict, str, str, bool]:
    config, index = args
    clip = render_clip(config, index)
    return encode_clip(clip), clip.identity.name, clip.meta["kind"], clip.has_ref


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _params(config: WorldConfig, num_clips: int, clips_per_shard: int, first_index: int = 0) -> dict:
    params = {"generator_version": GENERATOR_VERSION, "num_clips": int(num_clips), "first_index": int(first_index),
              "clips_per_shard": int(clips_per_shard), **asdict(config)}
    if not config.gestures:  # worlds written before the parameter existed stay complete
        params.pop("gestures")
    return params


def _complete(out: Path, params: dict) -> list[Path] | None:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete") or manifest.get("params") != params:
        return None
    paths = [out / s["name"] for s in manifest["shards"]]
    if all(p.is_file() and p.stat().st_size == s["bytes"] for p, s in zip(paths, manifest["shards"])):
        return paths
    return None


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on ``out`` so that concurrent callers (e.g. DDP ranks) generate once."""
    import fcntl

    with open(out / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def generate_shards(out_dir: str | os.PathLike, num_clips: int = 256, seed: int = 0, num_identities: int = 8,
                    resolution: int = 128, fps: float = 25.0, num_frames: int = 50, headshot_fraction: float = 0.2,
                    clips_per_shard: int = 64, workers: int | None = None, ref_fraction: float = 0.5,
                    first_index: int = 0, gestures: bool = False) -> list[Path]:
    """Write ``num_clips`` clips (indices ``first_index ...``) as webdataset shards ``synthetic-00000.tar, ...``
    plus ``manifest.json``. Two calls with the same seed and disjoint index ranges give disjoint clips of the same
    identities (a train / validation split).

    A no-op returning the existing shard paths when ``out_dir`` holds a complete manifest with the same
    parameters. Each shard and the manifest are written to a temporary name and renamed when complete;
    shards of an earlier, different run that are not part of this one are removed. ``workers`` processes
    render in parallel (default ``min(4, cpu_count)``; 0 or 1 renders in this process); sample order is
    the clip index order regardless.
    """
    import webdataset as wds

    config = WorldConfig(seed=int(seed), num_identities=int(num_identities), resolution=int(resolution),
                         fps=float(fps), num_frames=int(num_frames), headshot_fraction=float(headshot_fraction),
                         ref_fraction=float(ref_fraction), gestures=bool(gestures))
    if num_clips < 1:
        raise ValueError(f"synthetic_world: bad num_clips={num_clips!r}")
    if clips_per_shard < 1:
        raise ValueError(f"synthetic_world: bad clips_per_shard={clips_per_shard!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if first_index < 0:
        raise ValueError(f"synthetic_world: bad first_index={first_index!r}")
    params = _params(config, num_clips, clips_per_shard, first_index)
    with _locked(out):
        done = _complete(out, params)
        if done is not None:
            return done
        (out / MANIFEST).unlink(missing_ok=True)
        workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
        jobs = [(config, first_index + i) for i in range(num_clips)]
        pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_render_encode, jobs, chunksize=2) if pool else map(_render_encode, jobs)
            num_shards = math.ceil(num_clips / clips_per_shard)
            shards, identities, kinds, with_ref = [], set(), {"halfbody": 0, "headshot": 0}, 0
            for s in range(num_shards):
                path = out / f"{SHARD_PREFIX}{s:05d}.tar"
                tmp = out / f".{path.name}.tmp-{os.getpid()}"
                n = 0
                try:
                    with open(tmp, "wb") as fh:
                        writer = wds.TarWriter(fh)
                        for _ in range(min(clips_per_shard, num_clips - s * clips_per_shard)):
                            sample, name, kind, has_ref = next(results)
                            writer.write(sample)
                            identities.add(name)
                            kinds[kind] += 1
                            with_ref += has_ref
                            n += 1
                        writer.close()
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                shards.append({"name": path.name, "num_samples": n, "bytes": path.stat().st_size})
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
        keep = {s["name"] for s in shards}
        for stale in out.glob(f"{SHARD_PREFIX}*.tar"):
            if stale.name not in keep:
                stale.unlink()
        manifest = {
            "generator": "data_pipelines.synthetic_world", "complete": True, "params": params,
            "num_clips": num_clips, "shards": shards,
            "shard_pattern": f"{SHARD_PREFIX}{{00000..{num_shards - 1:05d}}}.tar",
            "identities": sorted(identities), "kinds": kinds, "with_ref": with_ref,
        }
        _atomic_write_json(out / MANIFEST, manifest)
        return [out / s["name"] for s in shards]




def generate_world(root: str | os.PathLike, train_clips: int = 192, val_clips: int = 16, **params) -> dict[str, list[Path]]:
    """A train / validation split of one world under ``root/train`` and ``root/val``: the same identities,
    disjoint clips (validation takes the indices after the training ones). A no-op when both are complete."""
    root = Path(root)
    return {
        "train": generate_shards(root / "train", num_clips=train_clips, **params),
        "val": generate_shards(root / "val", num_clips=val_clips, first_index=train_clips, **params),
    }
