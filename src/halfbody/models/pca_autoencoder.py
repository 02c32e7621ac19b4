"""The patch autoencoder truncated to its principal components, fitted on the training shards on first use (issue 11).

The lossless :class:`~halfbody.models.autoencoders.PatchAutoencoder` gives each token every value of its pixel block
(3 x 8 x 8 = 192 per frame for the tiny EchoMimicV2 preset; x 8 frames = 1536 for the tiny MirrorMe DiT), far more than
the tiny networks are wide (32 and 128 channels). The networks then read their input through a projection that mixes
the noise of all those values into their few channels, and write their output through a projection that spans at
most as many directions as they are wide; on the synthetic world both learned the person's reference quickly but the
small moving details (the mouth, the gloves) slowly or not at all (benchmarks/RESULTS.md).

The tokens of the world are nearly low-rank: the first 128 principal directions of the 1536-value MirrorMe tokens
hold 99.5 % of their variance, and ground truth projected onto them keeps the oracle's mouth-sync margin at 1.16
(1.26 lossless; benchmarks/RESULTS.md, "PCA latents"). This autoencoder keeps exactly those directions: ``z = B (x - m)`` per token, ``x = B^T z + m``, with
``B`` the ``(k, C)`` orthonormal top-``k`` principal directions and ``m`` the mean token. It is the linear optimum of
the learned compact latent space the papers use (EchoMimicV2 §3.1 SD's VAE, MirrorMe §3.1 LTX-Video's VAE), with no
fit to go wrong: an orthonormal map leaves the isotropic diffusion noise isotropic, so the noise schedule means the
same as in pixel space.

- ``path`` (``model.autoencoder.path``) is one safetensors file with ``mean`` ``(C,)``, ``basis`` ``(k, C)`` and the
  explained variance; loaded when it exists. When it is missing and ``fit_shards`` names shards, :meth:`prepare`
  (the LightningModule's ``setup``, after the datamodule prepared its data) fits it on windows of consecutive frames
  of those shards (deterministic: shard order, windows from each clip's start) and caches it.
- With ``temporal_patch = tf > 1`` a token is a causal ``tf``-frame block, as in the patch autoencoder; the fit uses
  windows of ``1 + 2 tf`` frames, so the causal first frame's static block is fitted too.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from halfbody.models.autoencoders import PatchAutoencoder, _check_video
from halfbody.models.fitted_autoencoder import FittedAutoencoder, load_shard_clips
from halfbody.utils.errors import UserError

__all__ = ["PCAPatchAutoencoder", "principal_directions"]

log = logging.getLogger(__name__)


def principal_directions(tokens: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens`` ``(N, C)`` -> ``(mean (C,), basis (k, C) orthonormal rows, explained (k,) variance fractions)``,
    the top-``k`` eigenvectors of the tokens' covariance (float64), each signed so its largest entry is positive."""
    n, c = tokens.shape
    mean = sum(chunk.double().sum(0) for chunk in tokens.split(8192)) / max(1, n)
    cov = torch.zeros(c, c, dtype=torch.float64)
    for chunk in tokens.split(8192):
        d = chunk.double() - mean
        cov += d.T @ d
    evals, evecs = torch.linalg.eigh(cov / max(1, n - 1))
    order = evals.flip(0).clamp_min(0.0)
    basis = evecs.flip(1)[:, :components].T.contiguous()
    signs = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
    explained = order[:components] / order.sum().clamp_min(1e-30)
    return mean.float(), (basis * signs).float(), explained.float()


class PCAPatchAutoencoder(FittedAutoencoder):
    """Patch tokens ``(C = 3 p^2 tf)`` -> their top ``components`` principal coordinates.

    Args:
        path: the safetensors file (config key ``key``). Loaded when it exists; otherwise fitted by :meth:`prepare`
            when ``fit_shards`` is set (and written there), else an error naming ``key``.
        patch_size, temporal_patch: the patch autoencoder's ``p`` and ``tf``.
        components: ``k``, the latent channels (at most ``3 p^2 tf``).
        fit_shards: shards (a directory, glob, brace pattern or list) to fit on when ``path`` is missing.
        fit_resolution: the frames' square size when fitting (the model's ``data.resolution``).
        fit_max_frames: at most this many frames, in windows of ``1 + 2 tf`` frames (one frame when ``tf = 1``),
            spread evenly over the shards' clips.
        key: the config key of ``path``, named in errors.
    """

    WHAT = "principal directions"

    def __init__(self, path: str | os.PathLike | None = None, patch_size: int = 8, temporal_patch: int = 1,
                 components: int = 32, fit_shards: str | Sequence[str] | None = None, fit_resolution: int = 64,
                 fit_max_frames: int = 4096, key: str = "model.autoencoder.path") -> None:
        super().__init__(path, fit_shards, key)
        self.patch = PatchAutoencoder(patch_size, temporal_patch)
        if not 1 <= components <= self.patch.latent_channels:
            raise UserError(f"{self.group}.components={components!r}: must be in [1, {self.patch.latent_channels}] "
                            f"(3 x {patch_size}^2 x {temporal_patch} values per token)")
        self.latent_channels = int(components)
        self.spatial_factor, self.temporal_factor = self.patch.spatial_factor, self.patch.temporal_factor
        self.fit_options = dict(resolution=int(fit_resolution), max_frames=int(fit_max_frames))
        self.register_buffer("mean", torch.zeros(self.patch.latent_channels))
        self.register_buffer("basis", torch.eye(self.latent_channels, self.patch.latent_channels))
        self.register_buffer("explained", torch.zeros(self.latent_channels))
        self.load_or_expect_fit()

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch.patch_size}, temporal_patch={self.temporal_factor}, "
                f"components={self.latent_channels}, path={str(self.path)!r}")

    # ------------------------------------------------------------------------------------------ weights
    def architecture(self) -> dict[str, int]:
        return {"patch_size": self.patch.patch_size, "temporal_patch": self.temporal_factor,
                "components": self.latent_channels}

    def fit(self, clips: torch.Tensor) -> dict[str, float]:
        """Fit on ``clips`` ``(N, 1 + k tf, 3, H, W)`` in ``[-1, 1]``; returns the fit's statistics."""
        z = self.patch.encode(clips)  # (N, F', C, h, w)
        mean, basis, explained = principal_directions(z.permute(0, 1, 3, 4, 2).reshape(-1, z.shape[2]),
                                                      self.latent_channels)
        self.mean.copy_(mean)
        self.basis.copy_(basis)
        self.explained.copy_(explained)
        self.fitted = True
        return {"clips": int(len(clips)), "tokens": int(z.numel() // z.shape[2]),
                "explained_variance": float(explained.sum())}

    def fit_on_shards(self) -> dict[str, Any]:
        window = 1 + 2 * self.temporal_factor if self.temporal_factor > 1 else 1
        clips = load_shard_clips(self.fit_shards, self.fit_options["resolution"], window,
                                 max(1, self.fit_options["max_frames"] // window), key=f"{self.group}.fit_shards")
        stats = self.fit(clips)
        log.info("principal directions of %d patch tokens: %d of %d keep %.4f of the variance", stats["tokens"],
                 self.latent_channels, self.patch.latent_channels, stats["explained_variance"])
        return {**self.fit_options, **stats}

    # ------------------------------------------------------------------------------------------ interface
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F, 3, H, W)`` -> ``(B, F', k, H/p, W/p)`` principal coordinates of each patch token."""
        z = self.patch.encode(video)
        z = z - self.mean.to(z.dtype).view(1, 1, -1, 1, 1)
        return torch.einsum("kc,bfchw->bfkhw", self.basis.to(z.dtype), z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F', k, h, w)`` -> ``(B, F, 3, h p, w p)`` in ``[-1, 1]``."""
        _check_video(latents, "latents", channels=self.latent_channels)
        z = torch.einsum("kc,bfkhw->bfchw", self.basis.to(latents.dtype), latents)
        return self.patch.decode(z + self.mean.to(z.dtype).view(1, 1, -1, 1, 1))
