"""Autoencoders fitted on the training shards on first use (CPU presets and learning checks, issue 11).

:class:`FittedAutoencoder` is what :class:`~halfbody.models.compact_autoencoder.CompactAutoencoder` and
:class:`~halfbody.models.pca_autoencoder.PCAPatchAutoencoder` share:

- the weights live in one safetensors file (``path``, config key ``key``) whose metadata records the architecture;
  a file for another architecture, an unreadable file or one with other tensors is a one-line error naming ``key``;
- when the file is missing and ``fit_shards`` names shards, :meth:`FittedAutoencoder.prepare` (called by the
  LightningModule's ``setup``, after the datamodule has prepared its data) fits the weights on them
  (:meth:`FittedAutoencoder.fit_on_shards`) and caches the file, written under a temporary name and renamed; later
  runs load it. Nothing is downloaded.

:func:`load_shard_clips` and :func:`load_shard_frames` read the fit's frames out of the shards.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as Fn

from halfbody.models.autoencoders import Autoencoder
from halfbody.utils.errors import UserError

__all__ = ["FittedAutoencoder", "load_shard_clips", "load_shard_frames"]

log = logging.getLogger(__name__)


class FittedAutoencoder(Autoencoder):
    """An autoencoder with weights fitted on ``fit_shards`` on first use and cached at ``path``.

    Subclasses set :attr:`WHAT` (named in errors), build their modules and buffers, then call :meth:`load_or_expect_fit`;
    they implement :meth:`architecture` and :meth:`fit_on_shards`.
    """

    WHAT = "autoencoder weights"

    def __init__(self, path: str | os.PathLike | None, fit_shards: str | Sequence[str] | None, key: str) -> None:
        super().__init__(frozen=True)
        self.path = None if path is None else Path(path)
        self.fit_shards = fit_shards
        self.key = key
        self.fitted = False

    @property
    def group(self) -> str:
        """The config group of the autoencoder's keys (``model.autoencoder``)."""
        return self.key.rsplit(".", 1)[0]

    @abc.abstractmethod
    def architecture(self) -> dict[str, int]:
        """What a weights file must have been written for (stored in its metadata)."""

    @abc.abstractmethod
    def fit_on_shards(self) -> dict[str, Any]:
        """Fit the weights on ``fit_shards`` in place; returns the fit's statistics (stored in the file's metadata)."""

    def load_or_expect_fit(self) -> None:
        """Load ``path`` when it exists; else there must be ``fit_shards`` for :meth:`prepare` to fit on."""
        if self.path is not None and self.path.is_file():
            self.load_weights(self.path)
        elif self.fit_shards is None:
            raise UserError(f"{self.key}={None if self.path is None else str(self.path)!r}: no {self.WHAT} there (a "
                            "safetensors file), and no fit_shards to fit them on")
        self.freeze()

    def load_weights(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for truncated / foreign files
            raise UserError(f"{self.key}={str(path)!r}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        arch = json.loads(meta.get("architecture", "{}"))
        if arch != self.architecture():
            raise UserError(f"{self.key}={str(path)!r}: holds {self.WHAT} for {arch or 'no architecture'}, the config "
                            f"asks for {self.architecture()}")
        mine = set(self.state_dict())
        missing, unexpected = sorted(mine - set(state)), sorted(set(state) - mine)
        if missing or unexpected:
            raise UserError(f"{self.key}={str(path)!r}: keys do not match (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]})")
        self.load_state_dict(state, strict=True)
        self.fitted = True

    def save_weights(self, path: str | os.PathLike, extra: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        from halfbody.utils.io import atomic_output

        meta = {"architecture": json.dumps(self.architecture()), **(extra or {})}
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_output(path, durable=True) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return Path(path)

    def prepare(self) -> None:
        """Fit on ``fit_shards`` and cache the weights at ``path`` unless they are loaded already (first use)."""
        if self.fitted:
            return
        if self.path is not None and self.path.is_file():  # another run fitted it meanwhile
            self.load_weights(self.path)
            return
        stats = self.fit_on_shards()
        self.fitted = True
        self.freeze()
        if self.path is not None:
            self.save_weights(self.path, {"fit": json.dumps(stats)})
            log.info("%s cached at %s", self.WHAT, self.path)


def _shard_videos(shards: str | Sequence[str] | None, key: str) -> list[bytes]:
    """The ``*.mp4`` members of the shards, in shard and member order."""
    from halfbody.data.datamodule import expand_shards

    videos: list[bytes] = []
    for p in expand_shards(shards, key):
        with tarfile.open(p) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".mp4"):
                    fh = tar.extractfile(m)
                    if fh is not None:
                        videos.append(fh.read())
    if not videos:
        raise UserError(f"{key}={shards!r}: the shards hold no .mp4 clips to fit the autoencoder on")
    return videos


def _square(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> ``(N, 3, R, R)`` in ``[-1, 1]``: centre-cropped to a square, resized (antialiased
    bilinear, as the datamodule resizes)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    x = Fn.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return (x / 127.5 - 1.0).clamp(-1.0, 1.0)


def load_shard_frames(shards: str | Sequence[str] | None, resolution: int, max_frames: int = 4096,
                      key: str = "model.autoencoder.fit_shards") -> torch.Tensor:
    """Frames of the shards' clips as ``(N, 3, R, R)`` float in ``[-1, 1]``: each ``*.mp4`` member decoded, centre-
    cropped to a square, resized (antialiased bilinear, as the datamodule resizes) and subsampled evenly in time so
    that at most ``max_frames`` frames are kept over all clips. Clips that do not decode are skipped."""
    return load_shard_clips(shards, resolution, 1, max_frames, key)[:, 0]


def load_shard_clips(shards: str | Sequence[str] | None, resolution: int, num_frames: int, max_clips: int = 4096,
                     key: str = "model.autoencoder.fit_shards") -> torch.Tensor:
    """Windows of ``num_frames`` consecutive frames of the shards' clips, ``(N, num_frames, 3, R, R)`` in ``[-1, 1]``
    (square and resized as :func:`load_shard_frames`): at most ``max_clips`` in all, the same number from each clip,
    starting at evenly spaced frames. Clips shorter than a window or that do not decode are skipped."""
    from halfbody.data.media import MediaError, read_video

    videos = _shard_videos(shards, key)
    per_clip = max(1, -(-max_clips // len(videos)))
    out = []
    for data in videos:
        try:
            frames, _ = read_video(data)
        except MediaError:
            continue
        if len(frames) < num_frames:
            continue
        starts = np.unique(np.linspace(0, len(frames) - num_frames, per_clip).round().astype(int))
        x = _square(frames[(starts[:, None] + np.arange(num_frames)).reshape(-1)], resolution)
        out.append(x.reshape(len(starts), num_frames, *x.shape[1:]))
    if not out:
        raise UserError(f"{key}={shards!r}: no clip of the shards decodes to {num_frames} frame(s) or more")
    return torch.cat(out)[:max_clips]
