"""Shard sample -> training sample, the iterable shard datasets, and bad-sample accounting.

A shard sample follows the public schema (shared/DESIGN.md §1); the training sample follows
docs/ARCHITECTURE.md. Any shard that follows the schema works, whoever wrote it: unknown fields are ignored,
field names are matched case-insensitively (webdataset lower-cases suffixes).

Bad samples (a truncated tar member or shard, a shard that ends early, an undecodable mp4/wav/ref, a bad json,
NaN or pixel-unit keypoints, a wrong array shape, a missing field, audio too short or of the wrong duration, a clip
too short) are skipped and passed on as ``(key, reason)`` records in the ``bad_samples`` list of the next sample
that the same worker yields, so that the main process can aggregate them across workers (``collate_samples``
concatenates the lists). Samples that train after a repair (an unfinished wav header, stereo channels that cancel
on downmix) carry ``(key, reason)`` records in their own ``repairs`` list. ``reason`` is ``"<category>: <detail>"``;
counts group by category. Each record is logged with its key and reason once, where it is counted: in the
dataset (``log_records=True``, the default) or, under the datamodule, in the main process, so the lines printed
and the ``data/*`` counters agree. A worker whose stream is mostly bad stops with a ``RuntimeError`` instead of
spinning (``BadSampleLedger``). docs/BAD_DATA.md lists every case.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from halfbody.data import media
from halfbody.data.conditions import ConditionSpec, PoseRenderer, region_masks, valid_mask
from halfbody.data.keypoints import NUM_KEYPOINTS, REGION_KEYPOINTS, unnormalised_keypoints
from halfbody.data.transforms import (
    BadSample,
    Geometry,
    audio_context,
    audio_window,
    crop_geometry,
    face_geometry,
    headshot_geometry,
    keypoint_box,
    reference_index,
    sample_window,
)

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("mp4", "wav", "kpts.npy", "json")
# a sample's driving audio: the window, and the context the audio encoder hears (ClipConfig.audio_context)
AUDIO_FIELDS = ("audio", "audio_context", "audio_context_offset", "audio_context_length")
REF_FIELDS = ("ref.png", "ref.jpg", "ref.jpeg")
KINDS = ("halfbody", "headshot")

# Typical half-body framing (EchoMimicV2's EMTD-style 1:1 crops): the head, hair included, about a quarter of
# the width, centred, near the top. Normalised output coordinates [x0, y0, x1, y1].
DEFAULT_TARGET_HEAD_BOX = (0.375, 0.05, 0.625, 0.35)


# ------------------------------------------------------------------------------------------ accounting
class BadSampleLedger:
    """Counts good, bad (skipped) and repaired samples, and raises when most of them are bad.

    Used per dataloader worker (where a bad stream would otherwise spin without ever yielding) and in the main
    process over all workers' records (``HalfBodyDataModule.on_before_batch_transfer``). Counts are per read
    (``bad``, a sample read again in a later epoch or validation counts again) and per unique key
    (``bad_unique``). ``log_records`` logs one warning line per record, where it is counted.
    """

    def __init__(self, max_bad_fraction: float = 0.5, min_samples: int = 32, where: str = "", log_records: bool = True):
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples = int(min_samples)
        self.where = where
        self.log_records = log_records
        self.good = 0
        self.bad: Counter[str] = Counter()
        self.bad_keys: dict[str, set[str]] = {}
        self.repaired: Counter[str] = Counter()
        self.repaired_keys: dict[str, set[str]] = {}
        self.examples: dict[str, tuple[str, str]] = {}
        self.pending: list[tuple[str, str]] = []

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    @staticmethod
    def category(reason: str) -> str:
        return reason.split(":", 1)[0]

    def record(self, key: str, reason: str) -> None:
        """A skipped sample (or a shard-level loss, keyed by the shard's name)."""
        category = self.category(reason)
        if self.log_records:
            log.warning("skipping bad sample %s: %s", key, reason)
        self.bad[category] += 1
        self.bad_keys.setdefault(category, set()).add(str(key))
        self.examples.setdefault(category, (key, reason))
        self.pending.append((key, reason))
        self.check()

    def record_repair(self, key: str, reason: str) -> None:
        """A sample that trains after a repair (e.g. one stereo channel used); not bad."""
        category = self.category(reason)
        if self.log_records:
            log.warning("repaired sample %s: %s", key, reason)
        self.repaired[category] += 1
        self.repaired_keys.setdefault(category, set()).add(str(key))

    def add_good(self, n: int = 1) -> None:
        self.good += n

    def take_pending(self) -> list[tuple[str, str]]:
        out, self.pending = self.pending, []
        return out

    def check(self) -> None:
        bad = self.num_bad
        total = self.good + bad
        if total >= self.min_samples and total > 0 and bad / total > self.max_bad_fraction:
            key, reason = self.examples[self.bad.most_common(1)[0][0]]
            raise RuntimeError(
                f"too many bad samples{' in ' + self.where if self.where else ''}: {bad}/{total} "
                f"({bad / total:.0%}) > max_bad_fraction={self.max_bad_fraction:g}; by reason: {dict(self.bad)}; "
                f"e.g. key {key!r}: {reason}"
            )

    def state(self) -> dict:
        """The counts and key sets as plain picklable values (to merge the ledgers of several ranks)."""
        return {"good": self.good, "bad": dict(self.bad), "repaired": dict(self.repaired),
                "bad_keys": {c: sorted(k) for c, k in self.bad_keys.items()},
                "repaired_keys": {c: sorted(k) for c, k in self.repaired_keys.items()}}

    @classmethod
    def from_states(cls, states: Sequence[dict]) -> "BadSampleLedger":
        """One ledger holding the sum of several ``state()``s (reads add up; a key skipped on two ranks is one
        unique key)."""
        merged = cls(max_bad_fraction=1.0, log_records=False)
        for st in states:
            merged.good += int(st["good"])
            merged.bad.update(st["bad"])
            merged.repaired.update(st["repaired"])
            for c, keys in st["bad_keys"].items():
                merged.bad_keys.setdefault(c, set()).update(keys)
            for c, keys in st["repaired_keys"].items():
                merged.repaired_keys.setdefault(c, set()).update(keys)
        return merged

    def summary(self) -> dict:
        """``good``/``bad``/``repaired`` per read, ``bad_unique``/``repaired_unique`` per distinct key, and the
        same by reason category."""
        return {
            "good": self.good,
            "bad": self.num_bad,
            "bad_unique": len(set().union(*self.bad_keys.values())),
            "by_reason": dict(self.bad),
            "by_reason_unique": {c: len(k) for c, k in self.bad_keys.items()},
            "repaired": sum(self.repaired.values()),
            "repaired_unique": len(set().union(*self.repaired_keys.values())),
            "repaired_by_reason": dict(self.repaired),
        }


# ------------------------------------------------------------------------------------------ decoding
def decode_frames(data: bytes, indices: Sequence[int]) -> dict[int, np.ndarray]:
    """Decode an mp4 up to its largest wanted frame; convert only the wanted frames to RGB.

    Returns ``{frame_index: uint8 (H, W, 3)}``. Raises ``BadSample("undecodable mp4")``.
    """
    wanted = sorted({int(i) for i in indices})
    last = wanted[-1]
    want = set(wanted)
    out: dict[int, np.ndarray] = {}
    n = 0
    to_rgb = media.RGBConverter()  # fork-safe (a DataLoader worker), unlike frame.to_ndarray(format="rgb24")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadSample("undecodable mp4", "no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                if n in want:
                    out[n] = to_rgb(frame)
                n += 1
                if n > last:
                    break
    except BadSample:
        raise
    except (av.error.FFmpegError, EOFError, OSError, ValueError, IndexError) as e:
        raise BadSample("undecodable mp4", f"{type(e).__name__}: {e}") from e
    if n <= last:
        raise BadSample("undecodable mp4", f"decoded {n} frames, the window needs frame {last}")
    return out


def _load_npy(raw: dict, field: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw[field]), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError/... on junk
        raise BadSample("bad array", f"{field}: {type(e).__name__}: {e}") from e


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_meta(payload: bytes) -> dict:
    """Validate the ``json`` field. Raises ``BadSample("bad json")`` naming the offending key and value."""
    try:
        meta = json.loads(payload.decode("utf-8") if isinstance(payload, (bytes, bytearray)) else payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad json", f"not JSON: {e}") from e
    if not isinstance(meta, dict):
        raise BadSample("bad json", f"expected an object, got {type(meta).__name__}")
    for key in ("fps", "num_frames", "width", "height", "kind", "identity"):
        if key not in meta:
            raise BadSample("bad json", f"missing key {key!r}")
    if not _is_number(meta["fps"]) or meta["fps"] <= 0:
        raise BadSample("bad json", f"fps={meta['fps']!r}")
    for key in ("num_frames", "width", "height"):
        v = meta[key]
        if not _is_number(v) or v < 1 or float(v) != int(v):
            raise BadSample("bad json", f"{key}={v!r}")
        meta[key] = int(v)
    if meta["kind"] not in KINDS:
        raise BadSample("bad json", f"kind={meta['kind']!r} (expected one of {list(KINDS)})")
    if not isinstance(meta["identity"], str):
        raise BadSample("bad json", f"identity={meta['identity']!r} (expected a string)")
    hb = meta.get("head_box")
    if hb is not None:
        if not (isinstance(hb, list) and len(hb) == 4 and all(_is_number(v) for v in hb)
                and hb[0] < hb[2] and hb[1] < hb[3]):
            raise BadSample("bad json", f"head_box={hb!r} (expected [x0, y0, x1, y1] with x0 < x1, y0 < y1)")
    return meta


# The wav header's duration must agree with the clip's (json num_frames / fps) within this many seconds:
# AUDIO_TOLERANCE_FRAMES frames plus AUDIO_TOLERANCE_FRACTION of the clip. A header claiming a wrong sample
# rate (1 Hz, 16 Hz, or 8 kHz for 16 kHz samples) fails this before anything is resampled.
AUDIO_TOLERANCE_FRAMES = 2
AUDIO_TOLERANCE_FRACTION = 0.05


def _note_category(note: str) -> str:
    if note.startswith("stereo channels cancel"):
        return "stereo cancels"
    return "unfinished wav header" if note.startswith("unfinished") else "wav cut short"


def load_clip_audio(payload: bytes, num_frames: int, fps: float) -> media.WavAudio:
    """The ``wav`` field of a clip of ``num_frames`` at ``fps``: header checked against the clip's duration
    (before any decoding or resampling), then decoded to mono (repairs in ``notes``).

    Raises ``BadSample``: ``undecodable wav``, ``audio too short``, ``audio duration mismatch``.
    """
    try:
        header = media.parse_wav_header(payload)
    except media.MediaError as e:
        raise BadSample("undecodable wav", str(e)) from e
    clip_s = num_frames / fps
    tol = AUDIO_TOLERANCE_FRAMES / fps + AUDIO_TOLERANCE_FRACTION * clip_s
    said = (f"the wav holds {header.seconds:.3f} s ({header.frames} samples at {header.rate} Hz"
            f"{'; ' + header.unfinished if header.unfinished else ''}), the clip is {clip_s:.3f} s "
            f"({num_frames} frames at {fps:g} fps), tolerance {tol:.3f} s")
    if header.seconds < clip_s - tol:
        raise BadSample("audio too short", said)
    if header.seconds > clip_s + tol:
        raise BadSample("audio duration mismatch", said + " (a wrong sample rate in the header?)")
    try:
        return media.decode_wav(header)
    except media.MediaError as e:
        raise BadSample("undecodable wav", str(e)) from e


# ------------------------------------------------------------------------------------------ sample builder
@dataclass
class ClipConfig:
    """Per-datamodule settings of the training samples (fixed for a run; the ConditionSpec is per phase)."""

    num_frames: int = 12
    fps: float = 25.0
    height: int = 512
    width: int = 512
    crop: str = "random"  # train crop: random | center (validation always centres)
    scale_jitter: float = 0.0
    target_head_box: Sequence[float] = DEFAULT_TARGET_HEAD_BOX
    pad_value: int = 0
    score_threshold: float = 0.3
    audio_feats_field: str | None = None
    # what the audio encoder hears around the window: "clip", [before_s, after_s], or None (the window alone)
    audio_context: str | Sequence[float] | None = "clip"

    def __post_init__(self) -> None:
        if int(self.num_frames) < 1:
            raise ValueError(f"num_frames={self.num_frames!r}: must be >= 1")
        if not (float(self.fps) > 0):
            raise ValueError(f"fps={self.fps!r}: must be > 0")
        if self.crop not in ("random", "center"):
            raise ValueError(f"train_crop={self.crop!r}: expected 'random' or 'center'")
        tb = [float(v) for v in self.target_head_box]
        if len(tb) != 4 or not (0 <= tb[0] < tb[2] <= 1 and 0 <= tb[1] < tb[3] <= 1):
            raise ValueError(f"target_head_box={list(self.target_head_box)!r}: expected [x0, y0, x1, y1] in [0, 1]")
        self.target_head_box = tuple(tb)
        if self.audio_feats_field is not None:
            self.audio_feats_field = str(self.audio_feats_field).lower()
        ctx = self.audio_context
        if ctx is not None and ctx != "clip":
            try:
                before, after = (float(v) for v in ctx)
                ok = isinstance(ctx, Sequence) and not isinstance(ctx, str) and before >= 0 and after >= 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"audio_context={ctx!r}: expected 'clip', [before_s, after_s] with both >= 0, or null")
            self.audio_context = (before, after)


class SampleBuilder:
    """Turns one raw shard sample (``{"__key__", "mp4", "wav", "kpts.npy", "json", ...}`` bytes) into a training sample."""

    def __init__(self, clip: ClipConfig, spec: ConditionSpec | Mapping | None = None):
        self.clip = clip
        self.spec = ConditionSpec.from_any(spec)
        self._renderers: dict[tuple, PoseRenderer] = {}

    def _renderer(self, spec: ConditionSpec) -> PoseRenderer:
        groups = spec.groups
        if groups not in self._renderers:
            self._renderers[groups] = PoseRenderer(groups, self.clip.score_threshold)
        return self._renderers[groups]

    def build(self, raw: Mapping, rng: np.random.Generator | None) -> dict | None:
        """The training sample, or None when the ConditionSpec filters the clip out (not a bad sample).

        ``rng`` None means validation: window at frame 0, centred crop, deterministic reference, no dropout.
        Raises ``BadSample``.
        """
        spec = self.spec  # read once per sample: a runtime spec change applies from the next sample
        c = self.clip
        key = str(raw.get("__key__", "?"))
        fields = {str(k).lower(): v for k, v in raw.items()}
        for f in REQUIRED_FIELDS:
            if f not in fields:
                raise BadSample("missing field", f"{f!r} (has {sorted(k for k in fields if not k.startswith('__'))})")
        meta = parse_meta(fields["json"])
        kind = meta["kind"]
        if kind not in spec.kinds or (kind == "headshot" and spec.headshot == "drop"):
            return None

        kpts = _load_npy(fields, "kpts.npy")
        if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3):
            raise BadSample("wrong array shape", f"kpts.npy is {kpts.shape}, expected (num_frames, 133, 3)")
        if kpts.shape[0] != meta["num_frames"]:
            raise BadSample("wrong array shape", f"kpts.npy has {kpts.shape[0]} frames, json num_frames={meta['num_frames']}")
        if not np.issubdtype(kpts.dtype, np.floating) and not np.issubdtype(kpts.dtype, np.integer):
            raise BadSample("wrong array shape", f"kpts.npy dtype {kpts.dtype}")
        kpts = kpts.astype(np.float32)
        if not np.all(np.isfinite(kpts)):
            raise BadSample("NaN keypoints", f"{int((~np.isfinite(kpts)).sum())} non-finite values in kpts.npy")
        units = unnormalised_keypoints(kpts, meta["width"], meta["height"])
        if units is not None:
            raise BadSample("pixel-unit keypoints", f"kpts.npy: {units}")

        total = meta["num_frames"]
        fps_src = float(meta["fps"])
        start, idx = sample_window(total, c.num_frames, fps_src, c.fps, rng)

        feats = None
        if c.audio_feats_field is not None:
            if c.audio_feats_field not in fields:
                raise BadSample("missing field", f"{c.audio_feats_field!r} (configured audio_feats_field)")
            arr = _load_npy(fields, c.audio_feats_field)
            if arr.ndim != 3 or arr.shape[0] < int(idx[-1]) + 1:
                raise BadSample("wrong array shape", f"{c.audio_feats_field} is {arr.shape}, expected "
                                f"(num_frames={total}, K, D) covering frame {int(idx[-1])}")
            feats = np.asarray(arr[idx], dtype=np.float32)
            if not np.all(np.isfinite(feats)):
                raise BadSample("bad array", f"{c.audio_feats_field} has non-finite values")

        wav = load_clip_audio(fields["wav"], total, fps_src)
        audio16 = media.resample_audio(wav.samples, wav.rate)
        audio = audio_window(audio16, start, fps_src, c.num_frames, c.fps)
        context = None
        if c.audio_context is not None:
            context = audio_context(audio16, start, fps_src, audio.shape[0], c.audio_context)

        ref_field = next((f for f in REF_FIELDS if f in fields), None)
        ref_idx = None if ref_field is not None else reference_index(total, idx, rng)
        decoded = decode_frames(fields["mp4"], list(idx) + ([ref_idx] if ref_idx is not None else []))
        first = decoded[int(idx[0])]
        src_h, src_w = first.shape[:2]
        # Odd sizes are edge-padded to even by H.264 encoders: crop back to the json size.
        if src_w in (meta["width"], meta["width"] + 1) and src_h in (meta["height"], meta["height"] + 1):
            src_w, src_h = meta["width"], meta["height"]
        frames = np.stack([decoded[int(i)][:src_h, :src_w] for i in idx])

        geom = self._geometry(meta, kpts[idx], spec, src_w, src_h, rng)

        if ref_field is not None:
            try:
                with Image.open(io.BytesIO(fields[ref_field])) as im:
                    ref_img = np.array(im.convert("RGB"))
            except Exception as e:  # PIL raises many types on junk
                raise BadSample("undecodable ref", f"{ref_field}: {type(e).__name__}: {e}") from e
            ref_geom = geom.for_size(ref_img.shape[1], ref_img.shape[0])
        else:
            ref_img = decoded[ref_idx][:src_h, :src_w]
            ref_geom = geom

        h, w = c.height, c.width
        video = geom.apply_frames(frames, c.pad_value)
        ref = ref_geom.apply_frames(ref_img[None], c.pad_value)[0]
        k_px = geom.apply_keypoints(kpts[idx])
        valid = valid_mask(h, w, geom.valid_rect() if geom.is_padded else None)
        head_box = geom.apply_box(meta["head_box"]) if meta.get("head_box") is not None else None
        masks = region_masks(k_px, h, w, spec.mask_margins, c.score_threshold, head_box=head_box, valid=valid)
        if rng is not None and spec.pose_dropout > 0 and rng.random() < spec.pose_dropout:
            pose = torch.zeros(c.num_frames, 3, h, w)  # §3.2.1 iterative pose sampling: condition dropped
        else:
            pose = self._renderer(spec).render(k_px, h, w)
        k_norm = k_px.copy()
        k_norm[..., 0] /= w
        k_norm[..., 1] /= h

        sample = {
            "video": video,
            "ref": ref,
            "audio": torch.from_numpy(audio),
            "pose": pose,
            **masks,
            "valid": valid[None].expand(c.num_frames, 1, h, w).contiguous(),
            "pad_value": torch.tensor(c.pad_value / 127.5 - 1.0, dtype=torch.float32),
            "kpts": torch.from_numpy(k_norm),
            "fps": torch.tensor(float(c.fps), dtype=torch.float32),
            "key": key,
            "identity": meta["identity"],
            "kind": kind,
        }
        if context is not None:  # the encoder hears the context; per-frame windows start at the offset
            sample["audio_context"] = torch.from_numpy(context[0])
            sample["audio_context_offset"] = context[1]
            sample["audio_context_length"] = int(context[0].shape[0])
        if feats is not None:
            sample["audio_feats"] = torch.from_numpy(feats)
        sample["repairs"] = [(key, f"{_note_category(n)}: {n}") for n in wav.notes]
        return sample

    def _geometry(self, meta: dict, win_kpts: np.ndarray, spec: ConditionSpec, src_w: int, src_h: int,
                  rng: np.random.Generator | None) -> Geometry:
        c = self.clip
        if spec.framing == "face" or (meta["kind"] == "headshot" and spec.headshot == "pad"):
            # The head box: json head_box, else the face keypoints box enlarged by the head-mask margins.
            box = meta.get("head_box")
            if box is None:
                fb = keypoint_box(win_kpts, REGION_KEYPOINTS["face"], c.score_threshold)
                if fb is not None:
                    ml, mt, mr, mb = spec.mask_margins["head"]
                    bw, bh = fb[2] - fb[0], fb[3] - fb[1]
                    box = (fb[0] - ml * bw, fb[1] - mt * bh, fb[2] + mr * bw, fb[3] + mb * bh)
            if box is not None and spec.framing == "face":  # MirrorMe §3.4: face close-up crop
                return face_geometry(src_w, src_h, c.width, c.height, box)
            if box is not None:  # HPA (EchoMimicV2 §3.3)
                return headshot_geometry(src_w, src_h, c.width, c.height, box, c.target_head_box)
            log.debug("clip %s has no head_box and no visible face: cropped like a half-body clip", meta)
        crop_rng = rng if (rng is not None and c.crop == "random") else None
        return crop_geometry(src_w, src_h, c.width, c.height, crop_rng, c.scale_jitter if rng is not None else 0.0)


# ------------------------------------------------------------------------------------------ shard reading
def _describe(exn: BaseException) -> str:
    msg = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {msg.split(' @ ')[0]}"


class _TailStream:
    """A read-only stream wrapper that counts the bytes read and keeps the last ``keep`` of them, so that after
    tarfile stops we can tell a proper end-of-archive (zero blocks at a 512-byte boundary) from a shard that
    broke off (tarfile silently ends the archive at a header cut short, losing every sample after it)."""

    def __init__(self, stream, keep: int = 512):
        self.stream, self.keep = stream, keep
        self.size = 0
        self.head = b""
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if data:
            if len(self.head) < 8:
                self.head = (self.head + data)[:8]
            self.size += len(data)
            self.tail = (self.tail + data)[-self.keep:] if len(data) < self.keep else data[-self.keep:]
        return data

    def drain(self, chunk: int = 1 << 16) -> None:
        while self.read(chunk):
            pass

    @property
    def compressed(self) -> bool:  # gzip / bzip2 / xz shards: their own end markers, checked by the decompressor
        return self.head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"))

    def ended_properly(self) -> bool:
        return self.compressed or self.size % 512 == 0 and len(self.tail) == 512 and not any(self.tail)

    def close(self) -> None:
        self.stream.close()

    def __str__(self) -> str:
        return str(self.stream)


def read_shard(url: str, ledger: BadSampleLedger) -> Iterator[dict]:
    """Raw samples of one tar shard; tar-level errors (truncated shard or member, junk) are recorded, not raised.

    Uses webdataset's tar expander and key grouping with a recording handler. When a shard breaks off, the
    sample that was being read is incomplete: it is recorded as ``tar error`` under its key and not yielded.
    A shard that breaks off at (or inside) a member header looks like a clean end to tarfile; it is detected
    from the missing end-of-archive block and recorded as ``shard ended early`` under the shard's name (the
    samples after the cut are lost and cannot be counted one by one).
    """
    name = os.path.basename(str(url))
    errors: list[BaseException] = []

    def handler(exn: BaseException) -> bool:  # webdataset handler: record and continue
        errors.append(exn)
        return True

    try:
        stream = _TailStream(gopen(url, "rb"))
    except Exception as e:
        ledger.record(name, f"tar error: cannot open shard {url}: {_describe(e)}")
        return
    try:
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=handler), handler=handler)
        prev, keys = None, []
        for s in samples:
            if prev is not None:
                yield prev
            prev = s
            keys.append(s.get("__key__"))
        ended_early = False
        if not errors:
            try:
                stream.drain()
            except Exception as e:  # a read error after tarfile stopped
                errors.append(e)
            else:
                ended_early = stream.size > 0 and not stream.ended_properly()
        fields = {str(k).lower() for k in prev} if prev is not None else set()
        incomplete = prev is not None and not all(f in fields for f in REQUIRED_FIELDS)
        if errors:
            detail = _describe(errors[0])
            if incomplete:
                ledger.record(str(prev.get("__key__")), f"tar error: truncated in {name}: {detail}")
                prev = None
            else:
                ledger.record(name, f"tar error: {detail}")
            for extra in errors[1:]:
                log.debug("further tar error in %s: %s", name, _describe(extra))
        elif ended_early:
            if incomplete:
                ledger.record(str(prev.get("__key__")), f"tar error: truncated in {name}: the shard breaks off in a "
                              f"member header after {stream.size} bytes")
                prev = None
                keys.pop()
            after = f"after {len(keys)} samples (last key {keys[-1]!r})" if keys else "before its first sample"
            ledger.record(name, f"shard ended early: {name} breaks off after {stream.size} bytes without an "
                          f"end-of-archive block, {after}; the samples after that are lost")
        if prev is not None:
            yield prev
    finally:
        stream.close()


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(rank or 0), int(world_size or 1)


def _worker_info() -> tuple[int, int]:
    info = get_worker_info()
    if info is None:
        return 0, 1
    return info.id, info.num_workers


def _share(total: int, slot: int, slots: int) -> int:
    return total // slots + (1 if slot < total % slots else 0)


class _ShardDataset(IterableDataset):
    def __init__(self, shards: Sequence[str], builder: SampleBuilder, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, max_bad_fraction: float = 0.5, min_samples_for_bad_check: int = 32,
                 max_consecutive_skips: int = 1000, log_records: bool = True):
        super().__init__()
        self.log_records = bool(log_records)  # False: whoever aggregates the records logs them (the datamodule)
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ValueError("no shards given")
        self.builder = builder
        self.seed = int(seed)
        self.rank, self.world_size = rank, world_size
        self.max_bad_fraction = float(max_bad_fraction)
        self.min_samples_for_bad_check = int(min_samples_for_bad_check)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self.epoch = 0
        self._iterations = 0  # this copy's own count (persistent workers keep their copy across epochs)

    def set_epoch(self, epoch: int) -> None:
        """Stamp the epoch (main process, before workers copy the dataset). Resets the iteration count, so an
        epoch's stream depends only on (seed, rank, worker, epoch): a run resumed at an epoch start sees exactly
        the batches the uninterrupted run saw. Persistent workers are not re-stamped; their own iteration count
        keeps their epochs apart."""
        self.epoch = int(epoch)
        self._iterations = 0

    def set_condition_spec(self, spec: ConditionSpec | Mapping) -> None:
        self.builder.spec = ConditionSpec.from_any(spec)

    def _setup_iteration(self) -> tuple[int, int, int, int, BadSampleLedger]:
        rank, world = _dist_info(self.rank, self.world_size)
        wid, nw = _worker_info()
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # workers render/resize on one core each
        ledger = BadSampleLedger(self.max_bad_fraction, self.min_samples_for_bad_check,
                                 where=f"rank {rank}/{world} worker {wid}/{nw} ({len(self.shards)} shards, e.g. {self.shards[0]})",
                                 log_records=self.log_records)
        return rank, world, wid, nw, ledger

    def _build(self, raw: dict, rng, ledger: BadSampleLedger, skips: list[int]) -> dict | None:
        key = str(raw.get("__key__", "?"))
        try:
            sample = self.builder.build(raw, rng)
        except BadSample as e:
            ledger.record(key, e.reason)
            return None
        if sample is None:
            skips[0] += 1
            if skips[0] > self.max_consecutive_skips:
                spec = self.builder.spec
                raise RuntimeError(f"the condition spec filters out every sample ({skips[0]} in a row; kinds="
                                   f"{list(spec.kinds)}, headshot={spec.headshot!r}) in shards like {self.shards[0]}")
            return None
        skips[0] = 0
        ledger.add_good()
        for k, reason in sample["repairs"]:
            ledger.record_repair(k, reason)
        sample["bad_samples"] = ledger.take_pending()
        return sample


class TrainShardDataset(_ShardDataset):
    """Resampled shards (with replacement), a shuffle buffer, random windows; a fixed number of batches per epoch.

    Each (rank, worker) draws shards from its own RNG seeded from ``(seed, rank, world_size, worker, num_workers,
    epoch, iteration)``, so DDP/FSDP ranks and dataloader workers read different data, and every epoch differs.
    ``rank``/``world_size`` None: ``torch.distributed`` when initialised, else 0/1 (the datamodule fills them
    from the Trainer). Per rank and epoch it yields exactly ``batches_per_epoch * batch_size`` samples, split
    over the workers in whole batches.
    """

    def __init__(self, shards, builder, *, batch_size: int, batches_per_epoch: int, shuffle_buffer: int = 16, **kw):
        super().__init__(shards, builder, **kw)
        self.batch_size, self.batches_per_epoch = int(batch_size), int(batches_per_epoch)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        if self.batch_size < 1 or self.batches_per_epoch < 1:
            raise ValueError(f"batch_size={batch_size} and batches_per_epoch={batches_per_epoch} must be >= 1")

    def __len__(self) -> int:
        return self.batch_size * self.batches_per_epoch

    def _raw_stream(self, rng: np.random.Generator, ledger: BadSampleLedger) -> Iterator[dict]:
        empty = 0
        limit = max(20, 3 * len(self.shards))
        while True:
            url = self.shards[int(rng.integers(0, len(self.shards)))]
            got = False
            for raw in read_shard(url, ledger):
                got = True
                yield raw
            empty = 0 if got else empty + 1
            if empty >= limit:
                raise RuntimeError(f"{empty} shards in a row gave no samples (e.g. {url}); by reason: {dict(ledger.bad)}")

    def __iter__(self) -> Iterator[dict]:
        rank, world, wid, nw, ledger = self._setup_iteration()
        self._iterations += 1
        seq = np.random.SeedSequence([self.seed, rank, world, wid, nw, self.epoch, self._iterations])
        rng = np.random.default_rng(seq)
        quota = self.batch_size * _share(self.batches_per_epoch, wid, nw)
        if quota == 0:
            return
        buffer: list[dict] = []
        emitted, skips = 0, [0]
        for raw in self._raw_stream(rng, ledger):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(raw)
                continue
            i = int(rng.integers(0, len(buffer)))
            raw, buffer[i] = buffer[i], raw
            sample = self._build(raw, rng, ledger, skips)
            if sample is not None:
                yield sample
                emitted += 1
                if emitted >= quota:
                    return


class ValShardDataset(_ShardDataset):
    """Shards in order, no resampling, windows at frame 0, centred crops: the same samples every time.

    Split over ``world_size * num_workers`` slots: by shard when there are at least as many shards as slots,
    else by sample (slot ``s`` builds raw samples ``s, s + slots, ...``; the others are read but not decoded),
    so that one small validation shard still feeds every rank. ``val_samples`` caps the total over all slots.
    """

    def __init__(self, shards, builder, *, val_samples: int | None = None, **kw):
        super().__init__(shards, builder, **kw)
        self.val_samples = None if val_samples is None else int(val_samples)

    def __iter__(self) -> Iterator[dict]:
        rank, world, wid, nw, ledger = self._setup_iteration()
        # One sample is held back so that records of bad samples after the last good one still reach the
        # main process (they ride on the last sample).
        held = None
        for sample in self._samples(rank, world, wid, nw, ledger):
            if held is not None:
                yield held
            held = sample
        if held is not None:
            held["bad_samples"] = held["bad_samples"] + ledger.take_pending()
            yield held

    def _samples(self, rank: int, world: int, wid: int, nw: int, ledger: BadSampleLedger) -> Iterator[dict]:
        slots, slot = world * nw, rank * nw + wid
        cap = math.inf if self.val_samples is None else _share(self.val_samples, slot, slots)
        if cap == 0:
            return
        by_shard = len(self.shards) >= slots
        shards = self.shards[slot::slots] if by_shard else self.shards
        # split by sample, every slot reads every shard: only slot 0 records tar-level losses, so that a broken
        # shard counts once per pass, not once per slot
        quiet = BadSampleLedger(1.0, 1 << 62, log_records=False)
        tar_ledger = ledger if by_shard or slot == 0 else quiet
        emitted, skips, i = 0, [0], -1
        for url in shards:
            for raw in read_shard(url, tar_ledger):
                i += 1
                if not by_shard and i % slots != slot:
                    continue
                sample = self._build(raw, None, ledger, skips)
                if sample is not None:
                    yield sample
                    emitted += 1
                    if emitted >= cap:
                        return


def collate_samples(samples: Sequence[dict]) -> dict:
    """Stack tensors (leading ``B``), keep strings as lists, concatenate the ``bad_samples`` / ``repairs`` record
    lists. ``audio_context`` (clips of different lengths) is zero-padded at the end to the longest; each sample's own
    length is ``audio_context_length``."""
    if not samples:
        raise ValueError("collate_samples: empty batch")
    keys = list(samples[0])
    for s in samples[1:]:
        if set(s) != set(keys):
            raise ValueError(f"collate_samples: samples {samples[0].get('key')!r} and {s.get('key')!r} have "
                             f"different fields: {sorted(set(keys) ^ set(s))}")
    out: dict = {}
    for k in keys:
        vals = [s[k] for s in samples]
        if k in ("bad_samples", "repairs"):
            out[k] = [tuple(r) for v in vals for r in v]
        elif k == "audio_context":
            out[k] = torch.nn.utils.rnn.pad_sequence(vals, batch_first=True)
        elif torch.is_tensor(vals[0]):
            try:
                out[k] = torch.stack(vals)
            except RuntimeError as e:
                raise ValueError(f"collate_samples: field {k!r} has shapes {[tuple(v.shape) for v in vals]}") from e
        elif isinstance(vals[0], (int, float)) and not isinstance(vals[0], bool):
            out[k] = torch.tensor(vals)
        else:
            out[k] = list(vals)
    return out
