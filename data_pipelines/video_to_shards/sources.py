"""Sources: the units of work (one video, or one segment of a video), from a folder or an EMTD-style list file.

A folder source is every video file under the folder (``input.video_extensions``, recursively by default).
A list file has one segment per line, the shape of the EMTD benchmark list (EchoMimicV2 §4.1: TED videos with
annotated half-body speech segments)::

    # path-or-URL              start        end          [identity]
    https://www.youtube.com/watch?v=AbCdEf123  00:01:02.5  00:01:31     speaker_a
    talks/bob.mp4              75           102.25

separated by whitespace, commas or tabs; timecodes are seconds or ``[HH:]MM:SS[.fff]``. The videos must already be
on disk: a URL is matched to ``<input.video_dir>/<id>.<ext>`` by its YouTube id or last path part, a relative
path is resolved against ``input.video_dir`` (default: the list file's folder). Nothing is downloaded.

A problem found while listing (a bad line, a missing video) does not stop the run: the source carries it as its
``error`` and is reported as rejected with that reason.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from .config import PipelineConfig

_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Source:
    """One unit of work.

    Attributes:
        sid: stable id (letters, digits, ``-``, ``_``): journal name and prefix of every clip key.
        video: the video file.
        audio: a separate audio file to use instead of the video's track, or None.
        sidecar: where sidecar keypoints would be (``<video stem><keypoints.sidecar_suffix>``).
        identity: the person's identity written to every clip's json.
        start / end: the segment in seconds (None: the whole video).
        label: what the user gave (a path, or ``list.txt:3``) for the report.
        error: a problem found while listing (the source is rejected with it), else None.
    """

    sid: str
    video: str
    audio: str | None
    sidecar: str
    identity: str
    start: float | None = None
    end: float | None = None
    label: str = ""
    error: str | None = None


def safe_name(text: str) -> str:
    """A key-safe name: no dots (webdataset splits field names at the first dot), no separators."""
    out = _SAFE.sub("_", text).strip("_")
    return out or "x"


def parse_timecode(text: str) -> float:
    """``75``, ``75.5``, ``01:15``, ``00:01:15.5`` -> seconds. Raises ValueError naming the text."""
    t = text.strip()
    parts = t.split(":")
    if not 1 <= len(parts) <= 3 or any(p.strip() == "" for p in parts):
        raise ValueError(f"bad timecode {text!r} (expected seconds or [HH:]MM:SS[.fff])")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"bad timecode {text!r} (expected seconds or [HH:]MM:SS[.fff])") from None
    if any(v < 0 for v in vals) or any(v >= 60 for v in vals[1:]) or any(v != int(v) for v in vals[:-1]):
        raise ValueError(f"bad timecode {text!r} (expected seconds or [HH:]MM:SS[.fff])")
    secs = 0.0
    for v in vals:
        secs = secs * 60 + v
    return secs


def _audio_for(video: Path, cfg: PipelineConfig) -> str | None:
    dirs = ([Path(cfg.input.audio_dir)] if cfg.input.audio_dir else []) + [video.parent]
    for d in dirs:
        for ext in cfg.input.audio_extensions:
            cand = d / f"{video.stem}.{ext.strip('.')}"
            if cand.is_file() and cand.resolve() != video.resolve():
                return str(cand)
    return None


def _sidecar_for(video: Path, cfg: PipelineConfig) -> str:
    return str(video.with_name(video.stem + cfg.keypoints.sidecar_suffix))


def _unique(sids: list[str], raw: list[str]) -> list[str]:
    """Disambiguate equal ids with a short hash of what they were made from."""
    seen: dict[str, int] = {}
    for s in sids:
        seen[s] = seen.get(s, 0) + 1
    return [s if seen[s] == 1 else f"{s}-{hashlib.sha1(r.encode()).hexdigest()[:6]}" for s, r in zip(sids, raw)]


def _is_video(p: Path, cfg: PipelineConfig) -> bool:
    exts = {e.lower().strip(".") for e in cfg.input.video_extensions}
    return p.is_file() and p.suffix.lower().strip(".") in exts and not p.name.startswith(".")


def folder_sources(root: str | Path, cfg: PipelineConfig) -> list[Source]:
    """Every video under ``root`` in sorted path order."""
    root = Path(root)
    it = root.rglob("*") if cfg.input.recursive else root.iterdir()
    videos = sorted((p for p in it if _is_video(p, cfg)), key=lambda p: p.relative_to(root).as_posix())
    rels = [p.relative_to(root) for p in videos]
    sids = _unique([safe_name(r.with_suffix("").as_posix()) for r in rels], [r.as_posix() for r in rels])
    out = []
    for video, rel, sid in zip(videos, rels, sids):
        mode = cfg.input.identity
        if mode == "stem" or (mode == "auto" and len(rel.parts) == 1):
            identity = video.stem
        elif mode == "auto":
            identity = rel.parts[0]
        else:
            identity = video.parent.name
        out.append(Source(sid=sid, video=str(video), audio=_audio_for(video, cfg), sidecar=_sidecar_for(video, cfg),
                          identity=safe_name(identity), label=rel.as_posix()))
    return out


def _url_id(url: str) -> str:
    u = urlparse(url)
    q = parse_qs(u.query)
    if "v" in q and q["v"]:
        return q["v"][0]
    parts = [p for p in u.path.split("/") if p]
    if not parts:
        return ""
    return Path(parts[-1]).stem


def _find_video(ref: str, base: Path, cfg: PipelineConfig) -> Path | None:
    if "://" in ref:
        vid = _url_id(ref)
        if not vid:
            return None
        for ext in cfg.input.video_extensions:
            cand = base / f"{vid}.{ext.strip('.')}"
            if cand.is_file():
                return cand
        return None
    p = Path(ref)
    p = p if p.is_absolute() else base / p
    return p if p.is_file() else None


def list_sources(list_file: str | Path, cfg: PipelineConfig) -> list[Source]:
    """One source per segment line of an EMTD-style list file (see the module docstring), in file order."""
    list_file = Path(list_file)
    base = Path(cfg.input.video_dir) if cfg.input.video_dir else list_file.parent
    rows: list[tuple[str, str, Path | None, float | None, float | None, str | None, str]] = []
    for n, line in enumerate(list_file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        text = re.sub(r"\s+#.*$", "", line).strip()  # a comment starts at a '#' after whitespace (URLs keep theirs)
        if not text or text.startswith("#"):
            continue
        label = f"{list_file.name}:{n}"
        cols = [c for c in re.split(r"[\s,]+", text) if c]
        ref = cols[0]
        stem = safe_name(_url_id(ref) if "://" in ref else Path(ref).stem)
        if len(cols) not in (3, 4):
            rows.append((label, stem, None, None, None, f"bad list entry: expected 'path start end [identity]', "
                         f"got {len(cols)} column(s) in {text!r}", stem))
            continue
        identity = safe_name(cols[3]) if len(cols) == 4 else stem
        try:
            start, end = parse_timecode(cols[1]), parse_timecode(cols[2])
        except ValueError as e:
            rows.append((label, stem, None, None, None, f"bad list entry: {e}", identity))
            continue
        if end <= start:
            rows.append((label, stem, None, start, end, f"bad list entry: end {cols[2]} is not after start {cols[1]}",
                         identity))
            continue
        video = _find_video(ref, base, cfg)
        err = None if video is not None else f"video not found: {ref!r} (looked in {str(base)!r})"
        rows.append((label, stem, video, start, end, err, identity))
    raw = [f"{r[0]}|{r[1]}|{r[3]}|{r[4]}" for r in rows]
    sids = []
    for label, stem, video, start, end, err, identity in rows:
        if start is not None and end is not None:
            sids.append(f"{stem}_{int(round(start * 1000)):09d}_{int(round(end * 1000)):09d}")
        else:
            sids.append(f"{stem}_{safe_name(label)}")
    sids = _unique(sids, raw)
    out = []
    for (label, stem, video, start, end, err, identity), sid in zip(rows, sids):
        vpath = video if video is not None else base / stem
        out.append(Source(sid=sid, video=str(vpath), audio=_audio_for(vpath, cfg) if video is not None else None,
                          sidecar=_sidecar_for(vpath, cfg), identity=identity, start=start, end=end, label=label,
                          error=err))
    return out


def discover(input_path: str | Path, cfg: PipelineConfig) -> list[Source]:
    """A folder -> its videos; a file with a video extension -> that video; any other file -> a list file."""
    p = Path(input_path)
    if p.is_dir():
        return folder_sources(p, cfg)
    if not p.is_file():
        raise FileNotFoundError(f"input {str(p)!r} does not exist (expected a folder of videos or a list file)")
    if _is_video(p, cfg):
        return [s for s in folder_sources(p.parent, _non_recursive(cfg)) if Path(s.video) == p]
    return list_sources(p, cfg)


def _non_recursive(cfg: PipelineConfig) -> PipelineConfig:
    import copy

    c = copy.deepcopy(cfg)
    c.input.recursive = False
    return c
