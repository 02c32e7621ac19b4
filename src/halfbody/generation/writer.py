"""The mp4 writer: H.264 + AAC, written to a temporary name and renamed when complete (``media.write_video``), in a
background thread, so that one batch row's video is encoded while the next row samples (PyAV / libx264 release the
GIL while encoding)."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from halfbody.data import media

log = logging.getLogger(__name__)

__all__ = ["VideoWriter"]


class VideoWriter:
    """Encode mp4s one at a time in one background thread.

    ``submit(path, frames, fps, audio, rate, done)`` returns at once; ``done(error)`` is called from :meth:`collect`
    (on the caller's thread) with None, or with the exception that encoding raised. ``background=False`` encodes
    in ``submit`` itself.
    """

    def __init__(self, background: bool = True):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp4-writer") if background else None
        self._pending: list[tuple[Future, Callable[[BaseException | None], None]]] = []

    def submit(self, path: Path, frames: np.ndarray, fps: float, audio: np.ndarray | None, rate: int,
               done: Callable[[BaseException | None], None]) -> None:
        if self._pool is None:
            try:
                media.write_video(path, frames, fps, audio, rate)
            except Exception as e:  # noqa: BLE001 - reported by done(), like a background error
                done(e)
            else:
                done(None)
            return
        self._pending.append((self._pool.submit(media.write_video, path, frames, fps, audio, rate), done))
        self.collect(block=False)

    def collect(self, block: bool = True) -> None:
        """Report finished writes (all of them, waiting, when ``block``)."""
        still = []
        for fut, done in self._pending:
            if block or fut.done():
                err = fut.exception()
                done(err)
            else:
                still.append((fut, done))
        self._pending = still

    def close(self) -> None:
        self.collect(block=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
