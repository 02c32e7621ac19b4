"""Per-source parts and journals, packing them into webdataset shards, and the manifest.

Layout of an output folder::

    clips-000000.tar ...        the shards (webdataset TarWriter; the public schema, shared/DESIGN.md §1)
    manifest.json               counts, hours, identities, rejection reasons, which source is in which shard
    _sources/config.json        the configuration the folder was made with
    _sources/<sid>.json         a source's journal = its done marker (clips, rejections), written last
    _sources/<sid>.tar          its samples until they are packed into shards (then removed)
    _sources/.lock              held by the run using the folder (a second run fails at once)

A worker writes a source's part and then its journal, each to a temporary name renamed when complete. Packing
appends the clips that are in no shard yet, in input order, to new shards (``shards.clips_per_shard`` each, the
last one possibly shorter); each shard is written to a temporary name, fsynced and renamed when complete, then
the manifest records them, then the packed parts are removed. Shards are never rewritten, never written over and
never removed: a re-run with nothing new changes no file, and sources added later go to new shards after the
existing ones (skipping any name already taken by a file that is not ours).

The manifest is a record, not the truth: when it is missing, unreadable, or disagrees with the files (a shard it
lists is gone or changed size, a shard of this configuration is not in it), ``survey`` rebuilds it from the
shards themselves (``scan_shard`` proves a shard is this tool's, in this configuration: complete tar, every
sample's json naming the tool and the configuration fingerprint) and the journals; journals that are gone are
rebuilt from the shards' json, so finished sources are never redone into duplicates. Shard-named files that are
not provably ours (another tool's, another configuration's, truncated) are left untouched and reported.
A crash at any point leaves complete shards only, and the next run continues from what is on disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from halfbody.utils.io import atomic_output

from .config import ConfigError, PipelineConfig, config_diff

log = logging.getLogger(__name__)

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


def clean_temporaries(out: Path, prefix: str = "clips") -> list[Path]:
    """Temporary files of an interrupted run: ``.<shard or manifest name>.*.tmp`` in the output folder and
    ``.*.tmp`` in ``_sources/``. Nothing else is touched; each removal is logged first. Returns them."""
    found: list[Path] = []
    if out.is_dir():
        found += sorted(out.glob(f".{prefix}-*.tar.*.tmp")) + sorted(out.glob(f".{MANIFEST}.*.tmp"))
    if (out / WORK_DIR).is_dir():
        found += sorted((out / WORK_DIR).glob(".*.tmp"))
    for p in found:
        log.warning("removing %s (a temporary file left by an interrupted run)", p)
        p.unlink(missing_ok=True)
    return found


def load_manifest(out: Path) -> dict | None:
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


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


# ------------------------------------------------------------------------------------------ what the folder holds
TOOL = "data_pipelines.video_to_shards"
_SAMPLE_FIELDS = ("mp4", "wav", "kpts.npy", "json")
_CLIP_KEY = re.compile(r"^(?P<sid>[A-Za-z0-9_-]+?)_\d{4,}(?:_head)?$")  # process.py: f"{sid}_{n:04d}[_head]"


def shard_index(name: str, prefix: str) -> int | None:
    """``clips-000012.tar`` -> 12 (the shard names this tool writes), else None."""
    m = re.fullmatch(rf"{re.escape(prefix)}-(\d{{6,}})\.tar", name)
    return int(m.group(1)) if m else None


def _candidates(out: Path, prefix: str) -> list[Path]:
    """Files named like this tool's shards, in index order."""
    found = [p for p in out.glob(f"{prefix}-*.tar") if shard_index(p.name, prefix) is not None and p.is_file()]
    return sorted(found, key=lambda p: (shard_index(p.name, prefix), p.name))


class NotOurs(Exception):
    """A shard-named file this run cannot prove it wrote (foreign, other configuration, damaged)."""


def scan_shard(path: Path, fingerprint: str) -> list[tuple[str, dict]]:
    """``(key, json meta)`` of every sample of a shard *this tool wrote with this configuration*, in order.

    The proof: a complete tar (every member inside the file, then the end-of-archive zero blocks), every sample
    with the four schema fields and a json whose ``pipeline`` block names this tool and configuration fingerprint.
    Raises ``NotOurs`` naming what failed.
    """
    size = path.stat().st_size
    samples: list[tuple[str, dict]] = []
    try:
        with tarfile.open(path, "r:") as tf:
            members = tf.getmembers()
            end = tf.offset
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            for m in members:
                if not m.isfile():
                    raise NotOurs(f"member {m.name!r} is not a regular file")
                if m.offset_data + m.size > size:
                    raise NotOurs(f"member {m.name!r} runs past the end of the file (truncated)")
                key, _, fld = m.name.partition(".")
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][fld] = m
            for key in order:
                fields = groups[key]
                missing = [f for f in _SAMPLE_FIELDS if f not in fields]
                if missing:
                    raise NotOurs(f"sample {key!r} lacks {missing}")
                try:
                    meta = json.loads(tf.extractfile(fields["json"]).read())
                    pipe = meta["pipeline"]
                    tool, config = pipe["tool"], pipe["config"]
                except (ValueError, KeyError, TypeError) as e:
                    raise NotOurs(f"sample {key!r} has no readable pipeline record ({type(e).__name__})") from e
                if tool != TOOL or config != fingerprint:
                    raise NotOurs(f"sample {key!r} was written by {tool!r} with configuration {config!r}, "
                                  f"not by this configuration ({fingerprint})")
                samples.append((key, meta))
        with open(path, "rb") as fh:  # TarWriter ends with at least two zero blocks
            fh.seek(end)
            tail = fh.read()
    except NotOurs:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise NotOurs(f"not a readable tar ({type(e).__name__}: {e})") from e
    if len(tail) < 1024 or any(tail) or size % 512:
        raise NotOurs("no end-of-archive block (truncated or still being written)")
    if not samples:
        raise NotOurs("no samples")
    return samples


@dataclass
class Holdings:
    """What the output folder holds, from the manifest when it agrees with the files, else rebuilt from them.

    ``shards``: this configuration's shards in order (manifest entries); ``packed``: sid -> its clips in them;
    ``keys``: sid -> clip keys in them (only after a rebuild; None when the manifest was trusted);
    ``untouched``: ``(file name, why)`` of shard-named files that are not provably ours: never modified or
    removed, reported; ``rebuilt``: why the manifest was rebuilt, or None; ``restored``: journals rebuilt
    from the shards.
    """

    shards: list[dict] = field(default_factory=list)
    packed: dict[str, int] = field(default_factory=dict)
    keys: dict[str, set[str]] | None = None
    untouched: list[tuple[str, str]] = field(default_factory=list)
    rebuilt: str | None = None
    restored: list[str] = field(default_factory=list)


def _trusted(out: Path, cfg: PipelineConfig, old: dict | None) -> str | None:
    """Why the manifest cannot be taken as the record of the shards (None: it can)."""
    if old is None:
        return f"{MANIFEST} is {'unreadable' if (out / MANIFEST).exists() else 'missing'}"
    if old.get("tool") != TOOL or old.get("config") != cfg.fingerprint():
        return f"{MANIFEST} is not this configuration's ({old.get('config')!r})"
    shards, packed = old.get("shards"), old.get("packed")
    if not isinstance(shards, list) or not isinstance(packed, dict):
        return f"{MANIFEST} lacks its shard list"
    for s in shards:
        try:
            name, nbytes = s["name"], s["bytes"]
            _ = (int(s["num_samples"]), list(s["sources"]))
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST} has a malformed shard entry {s!r:.80}"
        p = out / str(name)
        if not p.is_file():
            return f"{MANIFEST} lists {name}, which is missing"
        if p.stat().st_size != nbytes:
            return f"{MANIFEST} lists {name} with {nbytes} bytes, the file has {p.stat().st_size}"
    for sid, n in packed.items():
        if not isinstance(n, int):
            return f"{MANIFEST} has a malformed packed count for {sid!r}"
        if n > 0 and not journal_path(out, sid).is_file():
            return f"the journal of {sid!r} (in {MANIFEST}) is missing"
    return None


def survey(out: Path, cfg: PipelineConfig) -> Holdings:
    """What the folder holds. Trusts ``manifest.json`` when every shard it lists is there with its size and no
    other shard-named file is this configuration's; otherwise rebuilds the record from the shards themselves
    (and the journals): nothing finished is ever redone, dropped or deleted. Journals missing for sources whose
    clips are in the shards are rebuilt from the shards' json."""
    prefix, fp = cfg.shards.prefix, cfg.fingerprint()
    old = load_manifest(out)
    if old is None and not (out / MANIFEST).exists() and not _candidates(out, prefix):
        return Holdings()  # nothing packed yet
    why = _trusted(out, cfg, old)
    h = Holdings()
    if why is None:
        listed = {s["name"] for s in old["shards"]}
        for p in _candidates(out, prefix):
            if p.name in listed:
                continue
            try:
                scan_shard(p, fp)
            except NotOurs as e:
                h.untouched.append((p.name, str(e)))
            else:
                why = f"{p.name} is this configuration's but not in {MANIFEST} (an interrupted run)"
                break
        if why is None:
            h.shards = [dict(s) for s in old["shards"]]
            h.packed = {str(k): int(v) for k, v in old["packed"].items()}
            return h
    # Rebuild from the files.
    h = Holdings(keys={}, rebuilt=why)
    log.warning("%s: rebuilding the record of %s from the shards and the journals", why, out)
    key_sid: dict[str, str] = {}
    journals: dict[str, dict] = {}
    for jp in sorted((out / WORK_DIR).glob("*.json")):
        if jp.name == "config.json":
            continue
        j = read_journal(out, jp.stem)
        if j is not None:
            journals[jp.stem] = j
            key_sid.update({c["key"]: jp.stem for c in j.get("clips", [])})
    seen: dict[str, str] = {}  # key -> shard name
    metas: dict[str, list[dict]] = {}
    for p in _candidates(out, prefix):
        try:
            samples = scan_shard(p, fp)
        except NotOurs as e:
            h.untouched.append((p.name, str(e)))
            continue
        dup = next((k for k, _ in samples if k in seen), None)
        if dup is not None:
            h.untouched.append((p.name, f"repeats sample {dup!r} of {seen[dup]}"))
            continue
        sources: list[str] = []
        for key, meta in samples:
            m = _CLIP_KEY.match(key)
            sid = key_sid.get(key) or (m.group("sid") if m else key)
            seen[key] = p.name
            h.keys.setdefault(sid, set()).add(key)
            h.packed[sid] = h.packed.get(sid, 0) + 1
            if not sources or sources[-1] != sid:
                sources.append(sid)
            metas.setdefault(sid, []).append({"key": key, "meta": meta})
        h.shards.append({"name": p.name, "num_samples": len(samples), "bytes": p.stat().st_size, "sources": sources})
    for sid in journals:
        h.packed.setdefault(sid, 0)
        h.keys.setdefault(sid, set())
    for sid, items in metas.items():
        if sid not in journals:
            _restore_journal(out, sid, items, fp)
            h.restored.append(sid)
    return h


def _restore_journal(out: Path, sid: str, items: list[dict], fingerprint: str) -> None:
    """A journal for a source whose clips are in the shards but whose journal is gone (so it is not redone)."""
    clips = []
    label = sid
    for it in items:
        m = it["meta"]
        fps, n = float(m.get("fps", 25.0)), int(m.get("num_frames", 0))
        label = str(m.get("source", sid)).rsplit("@", 1)[0] or sid
        clips.append({"key": it["key"], "kind": m.get("kind", "halfbody"), "identity": str(m.get("identity", sid)),
                      "num_frames": n, "seconds": round(n / fps, 4) if fps > 0 else 0.0,
                      "where": str(m.get("source", "")).rsplit("@", 1)[-1]})
    log.warning("the journal of source %r is missing; rebuilt from the %d clip(s) in the shards", sid, len(clips))
    write_journal(out, sid, {"sid": sid, "label": label, "video": None, "identity": clips[0]["identity"],
                             "start": None, "end": None, "config": fingerprint, "clips": clips, "rejections": [],
                             "restored_from_shards": True})


# ------------------------------------------------------------------------------------------ packing
def pack(out: Path, order: list[str], cfg: PipelineConfig, holdings: Holdings | None = None) -> tuple[dict, list[str]]:
    """Append the finished clips of ``order`` (input order) that are in no shard yet to new shards; update the
    manifest. Never rewrites or removes a shard, and never writes over a file: new shards take the next free
    names after this configuration's last shard.

    Returns ``(manifest, names of the shards written now)``.
    """
    if holdings is None:
        holdings = survey(out, cfg)
    old = load_manifest(out)
    shards: list[dict] = [dict(s) for s in holdings.shards]
    packed: dict[str, int] = dict(holdings.packed)
    journals = {sid: j for sid in order if (j := read_journal(out, sid)) is not None}
    pending: list[tuple[str, set[str]]] = []
    have: dict[str, int] = {}
    for sid, j in journals.items():
        want = {c["key"] for c in j["clips"]}
        if holdings.keys is None:  # the manifest's record: a source with clips in it is done (maybe with lost ones)
            if packed.get(sid, 0) > 0:
                continue
            missing, have[sid] = want, 0
        else:
            got = holdings.keys.get(sid, set())
            missing, have[sid] = want - got, len(got & want)
            if not missing:
                packed[sid] = max(packed.get(sid, 0), len(want))
                continue
        pending.append((sid, missing))
    written: list[str] = []
    prefix, per = cfg.shards.prefix, cfg.shards.clips_per_shard

    def samples():
        for sid, missing in pending:
            if missing and part_path(out, sid).is_file():
                for s in _read_part(part_path(out, sid)):
                    if s["__key__"] in missing:
                        yield sid, s

    stream = samples()
    done: dict[str, int] = {sid: 0 for sid, _ in pending}
    index = max((shard_index(s["name"], prefix) or 0 for s in shards), default=-1) + 1
    item = next(stream, None)
    while item is not None:
        while (out / f"{prefix}-{index:06d}.tar").exists():  # a file that is not ours: never written over
            index += 1
        name = f"{prefix}-{index:06d}.tar"
        index += 1
        count, members = 0, []
        with atomic_output(out / name) as tmp, open(tmp, "wb") as fh:
            sink = wds.TarWriter(fh, encoder=False, mtime=TAR_MTIME)
            while item is not None and count < per:
                sid, s = item
                sink.write(s)
                done[sid] += 1
                if not members or members[-1] != sid:
                    members.append(sid)
                count += 1
                item = next(stream, None)
            sink.close()
            fh.flush()
            os.fsync(fh.fileno())
            os.chmod(tmp, _MODE)
        shards.append({"name": name, "num_samples": count, "bytes": (out / name).stat().st_size, "sources": members})
        written.append(name)
    for sid, _ in pending:
        packed[sid] = have[sid] + done[sid]
    manifest = build_manifest(out, cfg, shards, packed, holdings)
    if manifest != old:
        _write_json(out / MANIFEST, manifest)
    # Parts whose clips are all in shards now (or were already: a crash before their removal).
    for sid, j in journals.items():
        p = part_path(out, sid)
        if p.is_file() and packed.get(sid, 0) >= len(j["clips"]):
            log.info("removing %s (its %d clips are in the shards)", p, len(j["clips"]))
            p.unlink()
    return manifest, written


def build_manifest(out: Path, cfg: PipelineConfig, shards: list[dict], packed: dict[str, int],
                   holdings: Holdings | None = None) -> dict:
    """Counts over every packed source's journal."""
    kinds: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    identities: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    items, repairs = [], []
    with_clips = rejected = 0
    for sid in sorted(packed):
        j = read_journal(out, sid)
        if j is None:
            continue
        lost = len(j["clips"]) - packed[sid]
        if lost > 0:  # a shard or part file that went missing: these clips are in no shard
            items.append({"source": j["label"] or sid, "where": "source",
                          "reason": f"clips lost: {lost} of its {len(j['clips'])} clips are in no shard and have no "
                                    f"part file (removed?); delete {WORK_DIR}/{sid}.json and run again to redo it"})
            by_reason["clips lost"] += 1
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
        repairs += [{"source": j["label"] or sid, "note": note} for note in j.get("notes", [])]
    n = sum(s["num_samples"] for s in shards)
    names = [s["name"] for s in shards]
    contiguous = names == [f"{cfg.shards.prefix}-{i:06d}.tar" for i in range(len(names))]
    manifest = {
        "tool": TOOL,
        "config": cfg.fingerprint(),
        "num_clips": n,
        "kinds": dict(sorted(kinds.items())),
        "total_hours": round(sum(seconds.values()) / 3600.0, 6),
        "hours_by_kind": {k: round(v / 3600.0, 6) for k, v in sorted(seconds.items())},
        "identities": dict(sorted(identities.items())),
        "sources": {"total": len(packed), "with_clips": with_clips, "without_clips": rejected},
        "rejections": {"total": sum(by_reason.values()), "by_reason": dict(sorted(by_reason.items())), "items": items},
        "shards": shards,
        # A brace pattern when the shards are exactly prefix-000000.. in order (else use the list above).
        "shard_pattern": f"{cfg.shards.prefix}-{{000000..{len(shards) - 1:06d}}}.tar" if shards and contiguous else None,
        "packed": dict(sorted(packed.items())),
    }
    if repairs:  # e.g. pixel-unit sidecar keypoints converted to frame units
        manifest["repairs"] = repairs
    if holdings is not None and holdings.untouched:
        manifest["untouched"] = [{"name": n_, "reason": r} for n_, r in holdings.untouched]
    return manifest


def shard_paths(out: Path) -> list[Path]:
    m = load_manifest(out) or {}
    return [out / s["name"] for s in m.get("shards", [])]
