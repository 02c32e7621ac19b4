"""The run: list sources, skip finished ones, process the rest in parallel, pack shards, report.

``run(input, out, cfg, workers)`` returns a ``Report``. Sources are independent; each worker process handles one
source at a time and writes its part + journal itself, so Ctrl-C (or a crash) loses only the sources in flight.
The next run skips every source with a journal (``retry_rejected=True`` also redoes sources that gave no clips,
e.g. after adding a missing sidecar), and packs whatever is finished but not yet in a shard.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import writer
from .config import PipelineConfig
from .keypoints import make_extractor
from .process import process_source
from .sources import Source, discover

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What a run did. ``rejections`` are ``(source label, where, reason)`` of the sources processed *now*."""

    out: Path
    sources: int = 0
    skipped: int = 0  # already done before this run
    processed: int = 0
    clips: int = 0  # clips written by this run
    rejections: list[tuple[str, str, str]] = field(default_factory=list)
    shards_written: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def by_reason(self) -> dict[str, int]:
        return dict(Counter(r[2].split(":", 1)[0] for r in self.rejections))

    def lines(self, limit: int = 50) -> list[str]:
        m = self.manifest
        out = [f"{self.sources} sources: {self.processed} processed, {self.skipped} already done; {self.clips} new "
               f"clips, {len(self.shards_written)} new shards in {self.seconds:.1f} s",
               f"output {self.out}: {m.get('num_clips', 0)} clips, {m.get('total_hours', 0.0):.3f} h, "
               f"{len(m.get('identities', {}))} identities, {len(m.get('shards', []))} shards "
               f"({m.get('shard_pattern') or 'none'})"]
        if self.rejections:
            out.append(f"rejected now ({len(self.rejections)}): {self.by_reason}")
            out += [f"  {label} [{where}]: {reason}" for label, where, reason in self.rejections[:limit]]
            if len(self.rejections) > limit:
                out.append(f"  ... {len(self.rejections) - limit} more in {self.out / writer.MANIFEST}")
        return out


# Worker state (one extractor per process, so model sessions load once).
_W: dict = {}


def _init_worker(cfg: PipelineConfig, out: str) -> None:
    import torch

    torch.set_num_threads(1)
    _W["cfg"], _W["out"] = cfg, out
    _W["extractor"] = make_extractor(cfg)


def _work(source: Source) -> dict:
    return process_source(source, _W["cfg"], _W["out"], _W["extractor"])


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with the hub/transformers dependencies
        return None
    return tqdm(total=total, unit="source", desc="video_to_shards", dynamic_ncols=True, file=sys.stderr)


def run(input_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: PipelineConfig, workers: int = 1,
        progress: bool = True, retry_rejected: bool = False) -> Report:
    """Turn the videos of ``input_path`` (a folder, a list file or one video) into shards under ``out_dir``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    sources = discover(input_path, cfg)
    extractor = make_extractor(cfg)  # config errors (a missing ONNX file) fail here, before any work
    (out / writer.WORK_DIR).mkdir(parents=True, exist_ok=True)
    with writer.exclusive(out):
        return _run_locked(sources, out, cfg, extractor, workers, progress, retry_rejected, t0)


def _run_locked(sources: list[Source], out: Path, cfg: PipelineConfig, extractor, workers: int, progress: bool,
                retry_rejected: bool, t0: float) -> Report:
    writer.check_config(out, cfg)
    writer.clean_temporaries(out)
    report = Report(out=out, sources=len(sources))
    todo = []
    for s in sources:
        j = writer.read_journal(out, s.sid)
        if j is not None and not (retry_rejected and not j["clips"]):
            report.skipped += 1
        else:
            todo.append(s)
    def done(journal: dict) -> None:
        report.processed += 1
        report.clips += len(journal["clips"])
        for r in journal["rejections"]:
            report.rejections.append((journal["label"] or journal["sid"], r["where"], r["reason"]))
        if bar is not None:
            bar.set_postfix(clips=report.clips, rejected=len(report.rejections), refresh=False)
            bar.update(1)
        elif progress:
            print(f"[{report.processed}/{len(todo)}] {journal['label']}: {len(journal['clips'])} clips, "
                  f"{len(journal['rejections'])} rejected", file=sys.stderr)

    bar = None
    try:
        if workers <= 1 or len(todo) <= 1:
            bar = _progress(len(todo), progress)
            for s in todo:
                done(process_source(s, cfg, out, extractor))
        else:
            # Fork where there is fork (workers start in milliseconds with everything imported, as torch's
            # DataLoader workers do); the pool exists before the progress bar's thread.
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(cfg, str(out))) as pool:
                bar = _progress(len(todo), progress)
                try:
                    for journal in pool.imap_unordered(_work, todo):
                        done(journal)
                except BaseException:
                    pool.terminate()
                    raise
    finally:
        if bar is not None:
            bar.close()
    # Rejections in input order (workers finish in any order).
    rank = {s.label: i for i, s in enumerate(sources)}
    report.rejections.sort(key=lambda r: rank.get(r[0], len(rank)))
    report.manifest, report.shards_written = writer.pack(out, [s.sid for s in sources], cfg)
    report.seconds = time.perf_counter() - t0
    return report
