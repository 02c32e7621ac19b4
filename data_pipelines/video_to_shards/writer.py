"""Per-source parts and journals, packing them into webdataset shards, and the manifest.

Layout of an output folder::

    clips-000000.tar ...        the shards (webdataset TarWriter; the public schema, shared/DESIGN.md §1)
    manifest.json               counts, hours, identities, rejection reasons, which source is in which shard
    _sources/config.json        the configuration the folder was made with
    _sources/<sid>.json         a source's journal = its done marker (clips, rejections), written last
    _sources/<sid>.tar          its samples until they are packed into shards (then removed)
    _sources/.lock              held by the run using the folder (a second run fails at once)

A worker writes a source's part and then its journal, each to a temporary name renamed when complete. Packing
appends the parts that are not in a shard yet, in input order, to new shards (``shards.clips_per_shard`` each,
the last one possibly shorter); each shard is written to a temporary name and renamed when complete, then the
manifest records them, then the packed parts are removed. Shards are never rewritten: a re-run with nothing new
changes no file, and sources added later go to new shards after the existing ones. A crash at any point leaves
complete shards only; whatever was not recorded in the manifest is redone by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds

from halfbody.utils.io import atomic_output

from .config import ConfigError, PipelineConfig, config_diff

WORK_DIR = "_sources"
MANIFEST = "manifest.json"
TAR_MTIME = 0.0  # fixed member mtime: the same clips give the same shard bytes


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()  # atomic_output's temporary files are private (0600); outputs get the usual mode


def journal_path(out: Path, sid: str) -> Path:
    return out / WORK_DIR / f"{sid}.json"


def part_path(out: Path, sid: str) -> Path:
    return out / WORK_DIR / f"{sid}.tar"


def _write_json(path: Path, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.chmod(tmp, _MODE)


class PartWriter:
    """A source's samples, streamed to a temporary file as they are made (a long video never sits in memory) and
    renamed to ``_sources/<sid>.tar`` by ``commit``; ``discard`` removes them."""

    def __init__(self, out: Path, sid: str):
        self.path = part_path(out, sid)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        self._sink = wds.TarWriter(self._fh, encoder=False, mtime=TAR_MTIME)
        self.count = 0

    def add(self, sample: dict) -> None:
        self._sink.write(sample)
        self.count += 1

    def _close(self) -> None:
        if not self._fh.closed:
            self._sink.close()
            self._fh.close()

    def commit(self) -> None:
        """Complete the part (no samples: no part, and a stale one from an earlier attempt is removed)."""
        self._close()
        if self.count:
            os.chmod(self._tmp, _MODE)
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)
            self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        self._close()
        self._tmp.unlink(missing_ok=True)
        self.count = 0


def write_journal(out: Path, sid: str, journal: dict) -> None:
    """The done marker: written after the source's part is complete."""
    _write_json(journal_path(out, sid), journal)


def read_journal(out: Path, sid: str) -> dict | None:
    try:
        return json.loads(journal_path(out, sid).read_text())
    except (OSError, ValueError):
        return None  # missing or half-written by something else: the source is redone


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``_sources/.lock`` for a whole run: a second run on the same folder fails at once, naming it."""
    import fcntl

    with open(out / WORK_DIR / ".lock", "a") as fh:  # "a": the lock file (and its mtime) stays untouched
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigError(f"output folder {str(out)!r} is in use by another run") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_config(out: Path, cfg: PipelineConfig) -> None:
    """Record the configuration on first use; refuse a folder made with another one (naming the keys)."""
    path = out / WORK_DIR / "config.json"
    mine = cfg.to_dict()
    if path.is_file():
        try:
            theirs = json.loads(path.read_text())
        except ValueError:
            theirs = None
        if theirs is not None and theirs != mine:
            keys = config_diff(theirs, mine)
            raise ConfigError(f"output folder {str(out)!r} was made with another configuration (differs in "
                              f"{', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}); use a new --out or delete it")
        if theirs is not None:
            return
    _write_json(path, mine)


def clean_temporaries(out: Path) -> None:
    """Temporary files of an interrupted run (``.<name>.*.tmp``)."""
    for d in (out, out / WORK_DIR):
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)


def load_manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _read_part(path: Path) -> list[dict]:
    """Samples of a part file in order, ``{"__key__": ..., field: bytes}``."""
    samples: list[dict] = []
    with tarfile.open(path, "r") as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            key, _, fld = m.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][fld] = tf.extractfile(m).read()
    return samples


def pack(out: Path, order: list[str], cfg: PipelineConfig) -> tuple[dict, list[str]]:
    """Append the finished, unpacked sources of ``order`` (input order) to new shards; update the manifest.

    Returns ``(manifest, names of the shards written now)``.
    """
    old = load_manifest(out) or {}
    shards: list[dict] = list(old.get("shards", []))
    packed: dict[str, int] = dict(old.get("packed", {}))  # sid -> clips packed
    # Parts of sources recorded as packed (a crash before their removal) are stale.
    for sid, n in packed.items():
        if n > 0:
            part_path(out, sid).unlink(missing_ok=True)
    journals = {sid: j for sid in order if (j := read_journal(out, sid)) is not None}
    pending = [sid for sid in order if sid in journals and packed.get(sid, 0) == 0]
    written: list[str] = []
    prefix, per = cfg.shards.prefix, cfg.shards.clips_per_shard

    def samples():
        for sid in pending:
            if journals[sid]["clips"] and part_path(out, sid).is_file():
                for s in _read_part(part_path(out, sid)):
                    yield sid, s

    stream = samples()
    pending_done: dict[str, int] = {sid: 0 for sid in pending}
    exhausted = False
    while not exhausted:
        name = f"{prefix}-{len(shards):06d}.tar"
        count, members = 0, []
        first = next(stream, None)
        if first is None:
            break
        with atomic_output(out / name) as tmp, open(tmp, "wb") as fh:
            sink = wds.TarWriter(fh, encoder=False, mtime=TAR_MTIME)
            item = first
            while item is not None:
                sid, s = item
                sink.write(s)
                pending_done[sid] += 1
                if not members or members[-1] != sid:
                    members.append(sid)
                count += 1
                if count >= per:
                    break
                item = next(stream, None)
            else:
                exhausted = True
            sink.close()
            os.chmod(tmp, _MODE)
        shards.append({"name": name, "num_samples": count, "bytes": (out / name).stat().st_size, "sources": members})
        written.append(name)
    for sid in pending:
        packed[sid] = pending_done[sid]
    manifest = build_manifest(out, cfg, shards, packed)
    if manifest != old:
        _write_json(out / MANIFEST, manifest)
    for sid in pending:
        part_path(out, sid).unlink(missing_ok=True)
    # Shards of an interrupted earlier pack that the manifest does not list (they were redone under their name).
    listed = {s["name"] for s in shards}
    for p in out.glob(f"{prefix}-*.tar"):
        if p.name not in listed:
            p.unlink()
    return manifest, written


def build_manifest(out: Path, cfg: PipelineConfig, shards: list[dict], packed: dict[str, int]) -> dict:
    """Counts over every packed source's journal."""
    kinds: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    identities: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    items = []
    with_clips = rejected = 0
    for sid in sorted(packed):
        j = read_journal(out, sid)
        if j is None:
            continue
        if packed[sid] != len(j["clips"]):  # a part file that went missing: its clips are in no shard
            items.append({"source": j["label"] or sid, "where": "source",
                          "reason": f"part file missing: {len(j['clips'])} clips not in any shard"})
            by_reason["part file missing"] += 1
            continue
        for c in j["clips"]:
            kinds[c["kind"]] += 1
            seconds[c["kind"]] += c["seconds"]
            identities[c["identity"]] += 1
        with_clips += bool(j["clips"])
        rejected += not j["clips"]
        for r in j["rejections"]:
            by_reason[r["reason"].split(":", 1)[0]] += 1
            items.append({"source": j["label"] or sid, "where": r["where"], "reason": r["reason"]})
    n = sum(s["num_samples"] for s in shards)
    return {
        "tool": "data_pipelines.video_to_shards",
        "config": cfg.fingerprint(),
        "num_clips": n,
        "kinds": dict(sorted(kinds.items())),
        "total_hours": round(sum(seconds.values()) / 3600.0, 6),
        "hours_by_kind": {k: round(v / 3600.0, 6) for k, v in sorted(seconds.items())},
        "identities": dict(sorted(identities.items())),
        "sources": {"total": len(packed), "with_clips": with_clips, "without_clips": rejected},
        "rejections": {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())), "items": items},
        "shards": shards,
        "shard_pattern": f"{cfg.shards.prefix}-{{000000..{len(shards) - 1:06d}}}.tar" if shards else None,
        "packed": dict(sorted(packed.items())),
    }


def shard_paths(out: Path) -> list[Path]:
    m = load_manifest(out) or {}
    return [out / s["name"] for s in m.get("shards", [])]
