"""Held-out clips as a test list of real files: shards -> one reference png, wav, pose npy and ground-truth mp4 per
clip, and an EMTD-style list file (``image audio pose ground-truth-video`` per row) that ``python -m halfbody.generate
list=...`` and ``python -m halfbody.evaluate list=...`` read.

EchoMimicV2 §4.1 evaluates on EMTD, a list of held-out half-body clips (a reference image, the clip's audio, its hand
pose and the clip as ground truth); MirrorMe §4.1 reuses it. This module makes the same kind of list from any shards
that follow the schema (shared/DESIGN.md §1), e.g. the synthetic world's validation shards, so tables and learning
checks run generate / evaluate on real files exactly as a user would::

    python -m halfbody.data.test_set data/synthetic_world/val --out data/synthetic_world/test_set [--max-clips 8]

Per clip ``<key>`` (the shard key, made file-name safe) the folder gets:

- ``<key>.ref.png``: the shard's ``ref.png`` / ``ref.jpg`` (the same crop as the clip), else the clip's first frame
  (then with its keypoints, ``<key>.ref.kpts.npy``, ``(1, 133, 3)``);
- ``<key>.wav``: the clip's audio (the shard's wav as is; re-written at its own rate when cut to ``max_seconds``);
- ``<key>.kpts.npy``: float32 ``(T, 133, 3)`` keypoints, normalised to the clip's frame (which is the reference's):
  the list's pose column, and the ground truth's keypoint sidecar for ``halfbody.evaluate``;
- ``<key>.mp4``: the ground-truth clip (the shard's mp4 bytes as is; re-encoded, H.264 CRF 18, when cut);
- ``<key>.json``: the shard's ``json`` (``num_frames`` updated when cut; ``halfbody.evaluate`` reads its ``source`` to
  recognise the synthetic world);
- ``test_list.txt`` and ``test_set.json`` (the clips, their identities and kinds, the shards, the samples skipped
  and why).

Samples that cannot be read (missing fields, undecodable media, wrong keypoint shapes) are skipped with one line
each (in the log and in ``test_set.json``); the export fails only when no clip is left. Re-running with the same
arguments keeps the existing export (``test_set.json`` records them); other arguments re-export.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from halfbody.data import media
from halfbody.data.dataset import (REF_FIELDS, REQUIRED_FIELDS, BadSampleLedger, decode_frames, load_clip_audio,
                                   parse_meta, read_shard)
from halfbody.data.keypoints import NUM_KEYPOINTS, unnormalised_keypoints
from halfbody.data.transforms import BadSample
from halfbody.utils.errors import UserError
from halfbody.utils.io import atomic_output

log = logging.getLogger(__name__)

LIST_NAME = "test_list.txt"
MANIFEST_NAME = "test_set.json"
EXPORT_VERSION = 1


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_") or "clip"


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def _write_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


def _clip(raw: dict, max_seconds: float | None) -> dict[str, Any]:
    """One shard sample, checked: ``{meta, kpts, frames (the first frame, or the cut clip), fps, frames_n, cut, audio
    (WavAudio), ref (uint8 HxWx3 | None)}``.
    Raises ``BadSample`` (as the training loader would for the same sample)."""
    fields = {str(k).lower(): v for k, v in raw.items()}
    for f in REQUIRED_FIELDS:
        if f not in fields:
            raise BadSample("missing field", f"{f!r}")
    meta = parse_meta(fields["json"])
    try:
        kpts = np.load(io.BytesIO(fields["kpts.npy"]), allow_pickle=False)
    except Exception as e:  # numpy raises a zoo of types on junk
        raise BadSample("bad array", f"kpts.npy: {type(e).__name__}: {e}") from e
    if kpts.ndim != 3 or kpts.shape[1:] != (NUM_KEYPOINTS, 3) or not np.issubdtype(kpts.dtype, np.number):
        raise BadSample("wrong array shape", f"kpts.npy is {kpts.dtype} {kpts.shape}, expected (num_frames, 133, 3)")
    kpts = kpts.astype(np.float32)
    if not np.all(np.isfinite(kpts)):
        raise BadSample("NaN keypoints", "non-finite values in kpts.npy")
    units = unnormalised_keypoints(kpts, meta["width"], meta["height"])
    if units is not None:
        raise BadSample("pixel-unit keypoints", f"kpts.npy: {units}")
    audio = load_clip_audio(fields["wav"], meta["num_frames"], float(meta["fps"]))
    fps = float(meta["fps"])  # the clip's constant frame rate (shared/DESIGN.md §1)
    frames_n = min(kpts.shape[0], meta["num_frames"])
    if max_seconds is not None:
        frames_n = min(frames_n, max(1, int(round(max_seconds * fps))))
    cut = frames_n < meta["num_frames"] or frames_n < kpts.shape[0]
    # decode only what is written: the first frame (a reference, and proof that the mp4 decodes), or the cut clip
    decoded = decode_frames(fields["mp4"], range(frames_n if cut else 1))
    frames = np.stack([decoded[i] for i in sorted(decoded)])
    ref = None
    for f in REF_FIELDS:
        if f in fields:
            try:
                ref = np.asarray(Image.open(io.BytesIO(fields[f])).convert("RGB"))
            except Exception as e:  # PIL raises many types on junk
                raise BadSample("undecodable ref", f"{f}: {type(e).__name__}: {e}") from e
            break
    return {"meta": meta, "kpts": kpts, "frames": frames, "fps": fps, "frames_n": frames_n, "cut": cut,
            "audio": audio, "ref": ref, "mp4": fields["mp4"], "wav": fields["wav"]}


def export_test_set(shards: str | Sequence[str], out_dir: str | Path, *, max_clips: int | None = None,
                    kinds: Sequence[str] | None = ("halfbody",), max_seconds: float | None = None) -> Path:
    """Write the held-out clips of ``shards`` (a directory, brace pattern, glob or list, as ``data.val_shards``) into
    ``out_dir`` and return the path of its list file (see the module docstring).

    ``max_clips``: the first N good clips in shard order (None: all); ``kinds``: the clip kinds kept (EMTD is
    half-body only; None keeps every kind); ``max_seconds``: cut longer clips to their first seconds.
    Raises ``UserError`` naming the shards when no clip is left.
    """
    from halfbody.data.datamodule import expand_shards  # the datamodule's own path rules (and its errors)

    paths = expand_shards(shards if isinstance(shards, (str, Path)) else list(shards), "test_set.shards")
    out = Path(out_dir)
    args = {"version": EXPORT_VERSION, "shards": [str(Path(p).resolve()) for p in paths], "max_clips": max_clips,
            "kinds": list(kinds) if kinds is not None else None, "max_seconds": max_seconds}
    list_path, manifest_path = out / LIST_NAME, out / MANIFEST_NAME
    if list_path.is_file() and manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("args") == args and all((out / f).is_file() for c in previous.get("clips", [])
                                                 for f in c["files"].values()):
            log.info("test set %s is up to date (%d clips)", list_path, len(previous["clips"]))
            return list_path
    out.mkdir(parents=True, exist_ok=True)
    ledger = BadSampleLedger(max_bad_fraction=1.0, log_records=False)
    clips: list[dict[str, Any]] = []
    skipped: list[str] = []
    names: set[str] = set()
    for shard in paths:
        for raw in read_shard(shard, ledger):
            if max_clips is not None and len(clips) >= max_clips:
                break
            key = str(raw.get("__key__", "?"))
            try:
                c = _clip(raw, max_seconds)
            except BadSample as e:
                line = f"{Path(shard).name} [{key}]: {e}"
                skipped.append(line)
                log.warning("test set: skipped %s", line)
                continue
            if kinds is not None and c["meta"]["kind"] not in kinds:
                continue
            name = _safe_name(key)
            while name in names:
                name += "_"
            names.add(name)
            files = {"image": f"{name}.ref.png", "audio": f"{name}.wav", "pose": f"{name}.kpts.npy",
                     "video": f"{name}.mp4", "meta": f"{name}.json"}
            n, fps, cut = c["frames_n"], c["fps"], c["cut"]
            _write_png(out / files["image"], c["ref"] if c["ref"] is not None else c["frames"][0])
            if c["ref"] is None:  # the first frame: its keypoints are known
                files["image_keypoints"] = f"{name}.ref.kpts.npy"
                _write_npy(out / files["image_keypoints"], np.ascontiguousarray(c["kpts"][:1]))
            else:
                (out / f"{name}.ref.kpts.npy").unlink(missing_ok=True)
            _write_npy(out / files["pose"], np.ascontiguousarray(c["kpts"][:n]))
            with atomic_output(out / files["meta"]) as tmp:
                tmp.write_text(json.dumps({**c["meta"], "num_frames": n}))
            if cut:
                a = c["audio"]
                samples = a.samples[: int(round(n / fps * a.rate))]
                with atomic_output(out / files["audio"]) as tmp:
                    tmp.write_bytes(media.encode_wav(samples, a.rate))
                media.write_video(out / files["video"], c["frames"][:n], fps)
            else:
                _write_bytes(out / files["audio"], bytes(c["wav"]))
                _write_bytes(out / files["video"], bytes(c["mp4"]))
            clips.append({"key": key, "name": name, "identity": c["meta"]["identity"], "kind": c["meta"]["kind"],
                          "fps": fps, "frames": n, "seconds": n / fps, "shard": str(shard),
                          "reference": "ref field" if c["ref"] is not None else "first frame", "files": files})
        if max_clips is not None and len(clips) >= max_clips:
            break
    for key, reason in ledger.take_pending():
        skipped.append(f"{key}: {reason}")
    if not clips:
        more = f" (+{len(skipped) - 1} more)" if len(skipped) > 1 else ""
        why = f"; skipped: {skipped[0]}{more}" if skipped else ""
        raise UserError(f"test_set.shards={shards!s}: no usable clip of kind {args['kinds']} in {len(paths)} "
                        f"shard(s){why}")
    rows = ["# image audio pose ground-truth-video (halfbody.data.test_set; paths relative to this file)"]
    rows += [" ".join(c["files"][k] for k in ("image", "audio", "pose", "video")) for c in clips]
    with atomic_output(manifest_path) as tmp:
        tmp.write_text(json.dumps({"args": args, "clips": clips, "skipped": skipped}, indent=2))
    with atomic_output(list_path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    log.info("test set: %d clips in %s (%d samples skipped)", len(clips), list_path, len(skipped))
    return list_path


def main(argv: Sequence[str] | None = None) -> None:
    from halfbody.utils.errors import exit_on_user_error

    p = argparse.ArgumentParser(prog="python -m halfbody.data.test_set", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="validation shards: a directory, brace pattern or glob")
    p.add_argument("--out", required=True, help="the test-set folder (list file, media, test_set.json)")
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--kinds", default="halfbody", help="comma-separated clip kinds to keep, or 'all'")
    p.add_argument("--max-seconds", type=float, default=None)
    a = p.parse_args(argv)
    kinds = None if a.kinds == "all" else [k for k in a.kinds.split(",") if k]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with exit_on_user_error():
        path = export_test_set(a.shards, a.out, max_clips=a.max_clips, kinds=kinds, max_seconds=a.max_seconds)
    print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
