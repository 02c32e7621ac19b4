"""The run: list sources, skip finished ones, process the rest in parallel, pack shards, report.

``run(input, out, cfg, workers)`` returns a ``Report``. Sources are independent; each worker process handles one
source at a time and writes its part + journal itself, so Ctrl-C (or a crash) loses only the sources in flight.
The next run skips every source with a journal (``retry_rejected=True`` also redoes sources that gave no clips,
e.g. after adding a missing sidecar), and packs whatever is finished but not yet in a shard.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import writer
from .config import PipelineConfig
from .keypoints import make_extractor
from .process import PIPELINE_VERSION, process_source
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
    notes: list[tuple[str, str]] = field(default_factory=list)  # (source label, note): repairs, e.g. unit conversions
    shards_written: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    seconds: float = 0.0
    untouched: list[tuple[str, str]] = field(default_factory=list)  # shard-named files not ours: left alone
    rebuilt: str | None = None  # why the manifest was rebuilt from the shards and journals
    restored: list[str] = field(default_factory=list)  # sources whose journal was rebuilt from the shards

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
        if self.rebuilt:
            out.append(f"manifest rebuilt from the shards and journals ({self.rebuilt})")
        if self.restored:
            out.append(f"journals rebuilt from the shards for {len(self.restored)} source(s): "
                       f"{', '.join(self.restored[:10])}{' ...' if len(self.restored) > 10 else ''}")
        for name, why in self.untouched:
            out.append(f"left untouched, not written by this configuration (not in the manifest): {name}: {why}")
        if self.notes:
            out.append(f"repaired now ({len(self.notes)}):")
            out += [f"  {label}: {note}" for label, note in self.notes[:limit]]
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


def _worker_main(conn, cfg: PipelineConfig, out: str) -> None:
    """A worker process: one source at a time from ``conn``, its journal back. Ctrl-C is the parent's business
    (the terminal sends SIGINT to the whole process group): workers ignore it and are stopped by the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the parent's own handler (the CLI's) is not for workers
    _init_worker(cfg, out)
    while True:
        try:
            source = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if source is None:
            return
        journal = _work(source)
        try:
            conn.send(journal)
        except OSError:  # the parent is gone (the journal is on disk: the next run skips the source)
            return


_STOP_SIGNALS = {int(signal.SIGINT), int(signal.SIGTERM), int(getattr(signal, "SIGHUP", signal.SIGTERM))}


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored inside (a no-op outside the main thread, where signals cannot be changed)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _sigterm_default():
    """SIGTERM at its default action inside (a no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _Pool:
    """Worker processes fed one source at a time over pipes. The parent never blocks without a timeout: it waits
    on the pipes and the processes together, so a worker that dies (killed, out of memory) is noticed, its source
    rejected with the reason, and a new worker takes its place; on Ctrl-C (or any error) every worker is stopped
    within a few seconds."""

    def __init__(self, n: int, cfg: PipelineConfig, out: Path):
        self.ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.cfg, self.out, self.n = cfg, out, n
        self.workers: list[list] = []  # [process, conn, source in flight or None]

    def start(self, tasks: int) -> None:
        """Start the workers (before any thread of the parent, e.g. the progress bar's, exists)."""
        for _ in range(min(self.n, tasks)):
            self._start()

    def _start(self) -> list:
        parent, child = self.ctx.Pipe()
        # Workers start with SIGINT ignored and SIGTERM default, so a Ctrl-C during their start-up cannot print a
        # traceback, and terminating them is immediate.
        # PyAV's filter graphs (an audio resampler) are reference cycles that hold thread pools. A forked worker that
        # garbage-collects one it inherited waits forever for threads it does not have, so the parent frees its
        # cyclic garbage first.
        gc.collect()
        with _sigint_ignored(), _sigterm_default():
            p = self.ctx.Process(target=_worker_main, args=(child, self.cfg, str(self.out)), daemon=True)
            p.start()
        child.close()
        w = [p, parent, None]
        self.workers.append(w)
        return w

    def run(self, todo: list[Source]):
        """Yield each source's journal as it finishes (any order)."""
        queue = list(reversed(todo))
        if not self.workers:
            self.start(len(todo))
        busy = 0
        while queue or busy:
            for w in self.workers:
                if w[2] is None and queue:
                    w[2] = queue.pop()
                    busy += 1
                    try:
                        w[1].send(w[2])
                    except OSError:  # the worker is gone: noticed below through its sentinel
                        pass
            ready = mp_connection.wait([w[1] for w in self.workers if w[2] is not None]
                                       + [w[0].sentinel for w in self.workers if w[2] is not None], timeout=1.0)
            for w in list(self.workers):
                p, conn, source = w
                if source is None or (conn not in ready and p.sentinel not in ready):
                    continue
                journal, eof = None, False
                try:
                    if conn.poll():
                        journal = conn.recv()
                except (EOFError, OSError):
                    eof = True
                if journal is not None:
                    w[2] = None
                    busy -= 1
                    yield journal
                elif eof or not p.is_alive():  # died with the source in flight
                    p.join(5.0)
                    if p.is_alive():
                        p.kill()
                        p.join()
                    conn.close()
                    self.workers.remove(w)
                    busy -= 1
                    if p.exitcode is not None and -p.exitcode in _STOP_SIGNALS:
                        # Stopped from outside (a shutdown, a scheduler's preemption): not the source's fault. No
                        # journal, so the next run redoes it.
                        log.warning("the worker processing %s was stopped by signal %d; the next run redoes it",
                                    source.label, -p.exitcode)
                    else:
                        yield _worker_died(source, self.cfg, self.out, p.exitcode)
                    if queue:
                        self._start()

    def close(self, timeout: float = 3.0) -> None:
        """Stop every worker: ask the idle ones to leave, terminate the busy ones, kill what remains. A second
        Ctrl-C meanwhile is ignored (this takes at most ``timeout`` + 1 s)."""
        with _sigint_ignored():
            self._close(timeout)

    def _close(self, timeout: float) -> None:
        for p, conn, source in self.workers:
            try:
                if source is None and p.is_alive():
                    conn.send(None)
                else:
                    p.terminate()
            except (OSError, ValueError):
                p.terminate()
        deadline = time.monotonic() + timeout
        for p, conn, _ in self.workers:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
            conn.close()
        self.workers = []


def _worker_died(source: Source, cfg: PipelineConfig, out: Path, exitcode: int | None) -> dict:
    """The journal of a source whose worker process died (killed, out of memory): rejected, with the reason."""
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    log.error("the worker processing %s died (%s)", source.label, how)
    journal = {
        "sid": source.sid, "label": source.label, "video": source.video, "identity": source.identity,
        "start": source.start, "end": source.end, "config": cfg.fingerprint(), "version": PIPELINE_VERSION,
        "clips": [], "rejections": [{"where": "source", "reason": f"worker died: the process handling this source "
                                     f"ended ({how}), e.g. out of memory; --retry-rejected redoes it"}],
        "seconds_decoded": 0.0, "elapsed_s": 0.0,
    }
    writer.part_path(out, source.sid).unlink(missing_ok=True)
    writer.write_journal(out, source.sid, journal)
    return journal


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
    writer.clean_temporaries(out, cfg.shards.prefix)
    holdings = writer.survey(out, cfg)  # before anything is skipped or packed: the manifest may be stale or gone
    report = Report(out=out, sources=len(sources), untouched=list(holdings.untouched), rebuilt=holdings.rebuilt,
                    restored=list(holdings.restored))
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
        report.notes += [(journal["label"] or journal["sid"], n) for n in journal.get("notes", [])]
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
            pool = _Pool(min(workers, len(todo)), cfg, out)
            try:
                pool.start(len(todo))  # before the progress bar's thread
                bar = _progress(len(todo), progress)
                for journal in pool.run(todo):
                    done(journal)
            finally:
                pool.close()
    finally:
        if bar is not None:
            bar.close()
    # Rejections in input order (workers finish in any order).
    rank = {s.label: i for i, s in enumerate(sources)}
    report.rejections.sort(key=lambda r: rank.get(r[0], len(rank)))
    report.manifest, report.shards_written = writer.pack(out, [s.sid for s in sources], cfg, holdings)
    report.seconds = time.perf_counter() - t0
    return report
