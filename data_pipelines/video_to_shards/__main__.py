"""CLI: ``python -m data_pipelines.video_to_shards INPUT --out DIR [--config FILE] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

INTERRUPTED = "interrupted: finished sources are kept; run the same command again to continue"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m data_pipelines.video_to_shards",
        description="Turn a folder of talking-person videos (or an EMTD-style list file of 'path start end' "
                    "segments) into webdataset shards in the halfbody schema (shared/DESIGN.md §1).")
    p.add_argument("input", help="a folder of videos, one video, or a list file")
    p.add_argument("--out", required=True, help="output folder (shards, manifest.json, _sources/ journals)")
    p.add_argument("--config", default=None, help="YAML config (see data_pipelines/video_to_shards/example.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set crop.size=256 (repeatable)")
    p.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="processes, one source each at a time (default: min(4, cpus))")
    p.add_argument("--retry-rejected", action="store_true",
                   help="also redo finished sources that gave no clips (e.g. after adding a missing sidecar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.workers < 1:
        print(f"error: --workers={a.workers}: expected an integer >= 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if __name__ == "__main__":  # as a script: SIGTERM (a shutdown, a scheduler) stops the run like Ctrl-C
        signal.signal(signal.SIGTERM, _terminate)
    try:
        # The heavy imports happen here, so that Ctrl-C at any moment (start-up included) gives the one line.
        from .config import ConfigError, load_config
        from .pipeline import run

        try:
            cfg = load_config(a.config, a.overrides)
            report = run(a.input, a.out, cfg, workers=a.workers, progress=not a.no_progress,
                         retry_rejected=a.retry_rejected)
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            _done()
            return 2
        print("\n".join(report.lines()), flush=True)
        _done()
        return 0
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        _done()
        return 130


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


def _done() -> None:
    """As a script: a Ctrl-C from now on (the interpreter's exit) must not kill the finished process by SIGINT."""
    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    code = main()
    if code == 130:
        # A Ctrl-C that landed inside some C-level import leaves CPython marked "interrupted" even though it was
        # handled, and the interpreter would then end itself by SIGINT instead of exiting with 130.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)
