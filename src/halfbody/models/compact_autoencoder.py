"""A compact learned autoencoder, fitted on the training shards on first use (CPU presets, issue 11).

The lossless patch autoencoder keeps every pixel: a 64 x 64 frame becomes 16 x 16 x 48 latents (EchoMimicV2 tiny)
or, with 8 frames folded in, 8 x 8 x 1536 values per DiT token (MirrorMe tiny), so a tiny denoiser spends its
capacity on background pixels and pixel noise it cannot remove. Both papers denoise in a learned compact latent
space instead (EchoMimicV2 §3.1: SD's VAE, ``z0 = E(I)``; MirrorMe §3.1: LTX-Video's VAE, 32x space, 128
channels). This module is that idea at CPU scale: a small convolutional autoencoder (e.g. ``spatial_factor`` 4,
``latent_channels`` 8: 6x fewer values than pixels) fitted on frames of the training shards.

- :class:`CompactAutoencoder` is an :class:`~halfbody.models.autoencoders.Autoencoder`. With ``temporal_patch = tf
  > 1`` it folds ``tf`` frames' latents into channels with a causal first frame, as the patch autoencoder and
  LTX-Video do (``1 + k tf`` frames -> ``1 + k`` latent frames).
- Weights live in one safetensors file (``path``, config key ``model.autoencoder.path``). When the file is missing
  and ``fit_shards`` names shards, :meth:`CompactAutoencoder.prepare` (called by the LightningModule's ``setup``,
  after the datamodule has prepared its data) fits the autoencoder on them deterministically (``fit_seed``) and
  caches the file; later runs load it. Nothing is downloaded.
- Latents are normalised per channel with the fitted latents' mean and standard deviation (stored with the
  weights), as LTX-Video's VAE normalises its latents, so the diffusion noise has the data's scale.
- The decoder is fitted on latents perturbed with Gaussian noise (``fit_latent_noise``, in normalised units), so a
  slightly wrong generated latent still decodes to the world's clean flat colours.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as Fn
from torch import nn

from halfbody.models.autoencoders import _check_video
from halfbody.models.fitted_autoencoder import FittedAutoencoder, load_shard_frames
from halfbody.utils.errors import UserError

__all__ = ["CompactAutoencoder", "load_shard_frames", "fit_autoencoder"]

log = logging.getLogger(__name__)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU())


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(Fn.silu(self.conv1(Fn.silu(x))))


class _Encoder(nn.Module):
    """``(N, 3, H, W)`` -> ``(N, C, H/f, W/f)``: a 2x pixel unshuffle, then stride-2 convolutions."""

    def __init__(self, factor: int, channels: int, width: int) -> None:
        super().__init__()
        stages = int(round(math.log2(factor))) - 1
        layers: list[nn.Module] = [nn.PixelUnshuffle(2), _block(12, width)]
        for _ in range(stages):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), _ResBlock(width)]
        layers += [nn.SiLU(), nn.Conv2d(width, channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Decoder(nn.Module):
    """``(N, C, h, w)`` -> ``(N, 3, h f, w f)``: nearest-neighbour upsampling and convolutions, a 2x pixel shuffle."""

    def __init__(self, factor: int, channels: int, width: int) -> None:
        super().__init__()
        stages = int(round(math.log2(factor))) - 1
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), _ResBlock(width)]
        for _ in range(stages):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, padding=1),
                       _ResBlock(width)]
        layers += [nn.SiLU(), nn.Conv2d(width, 12, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class CompactAutoencoder(FittedAutoencoder):
    """A small learned image autoencoder (optionally folded over time, causally), fitted on the training shards.

    Args:
        path: the safetensors weights (config key ``key``). Loaded when it exists; otherwise fitted by
            :meth:`prepare` when ``fit_shards`` is set (and written there), else an error naming ``key``.
        spatial_factor: ``f``, a power of two >= 2 (8: a 64 x 64 frame -> 8 x 8 latents).
        latent_channels: channels per frame.
        temporal_patch: ``tf``; > 1 folds ``tf`` frames into channels with a causal first frame (video AE:
            ``latent_channels * tf`` channels per latent frame).
        width: convolution width.
        fit_shards: shards (a directory, glob, brace pattern or list) to fit on when ``path`` is missing.
        fit_resolution: the frames' square size when fitting (the model's ``data.resolution``).
        fit_steps, fit_batch_size, fit_lr, fit_seed, fit_latent_noise, fit_max_frames, fit_crop: the fit (Adam,
            cosine decay; L1 + MSE on pixels; latents perturbed by ``fit_latent_noise`` std in normalised units;
            random ``fit_crop``-pixel square crops, the network being fully convolutional; pixel errors weighted by
            ``1 + fit_detail_weight * |grad|``, so the mouth and the gloves are kept).
        key: the config key of ``path``, named in errors.
    """

    WHAT = "compact autoencoder weights"

    def __init__(self, path: str | os.PathLike | None = None, spatial_factor: int = 8, latent_channels: int = 8,
                 temporal_patch: int = 1, width: int = 32, fit_shards: str | Sequence[str] | None = None,
                 fit_resolution: int = 64, fit_steps: int = 600, fit_batch_size: int = 32, fit_lr: float = 2e-3,
                 fit_seed: int = 0, fit_latent_noise: float = 0.1, fit_max_frames: int = 4096,
                 fit_crop: int | None = 32, fit_detail_weight: float = 4.0,
                 key: str = "model.autoencoder.path") -> None:
        super().__init__(path, fit_shards, key)
        if spatial_factor < 2 or 2 ** int(round(math.log2(spatial_factor))) != spatial_factor:
            raise UserError(f"{self.group}.spatial_factor={spatial_factor!r}: must be a power of two >= 2")
        if temporal_patch < 1 or latent_channels < 1:
            raise UserError(f"{self.group}: temporal_patch and latent_channels must be >= 1, "
                            f"got {temporal_patch} and {latent_channels}")
        self.frame_channels = int(latent_channels)
        self.spatial_factor = int(spatial_factor)
        self.temporal_factor = int(temporal_patch)
        self.latent_channels = self.frame_channels * self.temporal_factor
        self.width = int(width)
        self.fit_options = dict(resolution=int(fit_resolution), steps=int(fit_steps), batch_size=int(fit_batch_size),
                                lr=float(fit_lr), seed=int(fit_seed), latent_noise=float(fit_latent_noise),
                                max_frames=int(fit_max_frames), crop=None if fit_crop is None else int(fit_crop),
                                detail_weight=float(fit_detail_weight))
        self.encoder = _Encoder(self.spatial_factor, self.frame_channels, self.width)
        self.decoder = _Decoder(self.spatial_factor, self.frame_channels, self.width)
        self.register_buffer("latent_mean", torch.zeros(self.frame_channels))
        self.register_buffer("latent_std", torch.ones(self.frame_channels))
        self.load_or_expect_fit()

    def extra_repr(self) -> str:
        return (f"spatial_factor={self.spatial_factor}, latent_channels={self.frame_channels}, "
                f"temporal_patch={self.temporal_factor}, width={self.width}, path={str(self.path)!r}")

    # ------------------------------------------------------------------------------------------ weights
    def architecture(self) -> dict[str, int]:
        return {"spatial_factor": self.spatial_factor, "latent_channels": self.frame_channels, "width": self.width}

    def fit_on_shards(self) -> dict[str, Any]:
        frames = load_shard_frames(self.fit_shards, self.fit_options["resolution"], self.fit_options["max_frames"],
                                   key=f"{self.group}.fit_shards")
        log.info("fitting the compact autoencoder on %d frames (%d steps) -> %s", len(frames),
                 self.fit_options["steps"], self.path)
        stats = fit_autoencoder(self, frames, **{k: v for k, v in self.fit_options.items()
                                                 if k not in ("resolution", "max_frames")})
        log.info("compact autoencoder: reconstruction L1 %.4f", stats["l1"])
        return {**self.fit_options, **stats}

    # ------------------------------------------------------------------------------------------ per frame
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in ``[-1, 1]`` -> ``(N, C, H/f, W/f)`` normalised latents."""
        z = self.encoder(frames)
        return (z - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` normalised latents -> ``(N, 3, h f, w f)`` (not clamped)."""
        return self.decoder(z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1))

    # ------------------------------------------------------------------------------------------ interface
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F, 3, H, W)`` -> ``(B, F', C tf, H/f, W/f)``; ``F' = 1 + (F-1)/tf`` when ``tf > 1``."""
        _check_video(video, channels=3)
        b, f, c, h, w = video.shape
        s, tf = self.spatial_factor, self.temporal_factor
        if h % s or w % s:
            raise ValueError(f"CompactAutoencoder(spatial_factor={s}) needs H and W divisible by {s}, got {h}x{w}")
        fl = self.latent_num_frames(f)
        z = self.encode_frames(video.reshape(b * f, c, h, w)).reshape(b, f, self.frame_channels, h // s, w // s)
        if tf > 1:  # causal first frame (like LTX): frame 0 alone, repeated to fill its group of tf
            z = torch.cat([z[:, :1].expand(-1, tf, -1, -1, -1), z[:, 1:]], dim=1)
            z = z.reshape(b, fl, tf * self.frame_channels, h // s, w // s)
        return z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F', C tf, h, w)`` -> ``(B, 1 + (F'-1) tf, 3, h f, w f)`` in ``[-1, 1]``."""
        _check_video(latents, "latents", channels=self.latent_channels)
        b, fl, _, h, w = latents.shape
        tf, c = self.temporal_factor, self.frame_channels
        z = latents
        if tf > 1:
            z = z.reshape(b, fl, tf, c, h, w)
            first = z[:, :1].mean(dim=2)  # the tf copies of frame 0
            z = torch.cat([first, z[:, 1:].reshape(b, (fl - 1) * tf, c, h, w)], dim=1)
        f = z.shape[1]
        video = self.decode_frames(z.reshape(b * f, c, h, w))
        return video.reshape(b, f, 3, h * self.spatial_factor, w * self.spatial_factor).clamp(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------- fitting
def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)``: the largest absolute neighbour difference over channels and directions,
    divided by its batch maximum."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(dim=1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(dim=1, keepdim=True)
    g = torch.maximum(Fn.pad(dx, (0, 1, 0, 0)), Fn.pad(dy, (0, 0, 0, 1)))
    g = torch.maximum(g, Fn.pad(dx, (1, 0, 0, 0)))
    g = torch.maximum(g, Fn.pad(dy, (0, 0, 1, 0)))
    return g / g.amax().clamp_min(1e-6)


def fit_autoencoder(ae: CompactAutoencoder, frames: torch.Tensor, steps: int = 600, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, latent_noise: float = 0.1, crop: int | None = None,
                    stats_frames: int = 1024, detail_weight: float = 0.0) -> dict[str, float]:
    """Fit ``ae`` on ``frames`` ``(N, 3, H, W)`` in ``[-1, 1]`` (random ``crop`` x ``crop`` windows on the latent
    grid when given), each pixel's error weighted by ``1 + detail_weight * |grad x|`` (the image gradient magnitude,
    normalised to [0, 1] per batch: small features are mostly edges); deterministic for a seed. Returns the final reconstruction errors (``l1``, ``mse``, on clean
    latents of ``stats_frames`` evenly spaced frames) and sets the latent normalisation from them."""
    params = list(ae.encoder.parameters()) + list(ae.decoder.parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in (ae.encoder, ae.decoder):  # deterministic initial weights, whatever ran before
            for m in mod.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
    ae.latent_mean.zero_()
    ae.latent_std.fill_(1.0)
    for p in params:
        p.requires_grad_(True)
    ae.encoder.train()
    ae.decoder.train()
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 20) * 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / steps)))
    n = len(frames)
    scale = torch.ones(1)
    for i in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x = frames[idx]
        if crop and crop < min(x.shape[-2:]):  # fully convolutional: random crops fit it at a fraction of the cost
            oy, ox = (int(torch.randint(0, (d - crop) // ae.spatial_factor + 1, (1,), generator=gen)) * ae.spatial_factor
                      for d in x.shape[-2:])
            x = x[..., oy:oy + crop, ox:ox + crop]
        if torch.rand(1, generator=gen).item() < 0.5:
            x = x.flip(-1)  # the world is left-right symmetric enough; doubles the poses seen
        z = ae.encoder(x)
        with torch.no_grad():
            scale = 0.9 * scale + 0.1 * z.std() if i else z.std().reshape(1)
        zn = z + latent_noise * scale * torch.randn(z.shape, generator=gen)
        y = ae.decoder(zn)
        err = (y - x).abs() + (y - x).pow(2)
        if detail_weight:  # small features (a mouth, a glove) are mostly edges: weigh pixels by the local gradient
            err = err * (1.0 + detail_weight * _gradient_magnitude(x))
        loss = err.mean() + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log.info("compact autoencoder fit: step %d/%d, loss %.4f", i + 1, steps, float(loss.detach()))
    ae.encoder.eval()
    ae.decoder.eval()
    for p in params:
        p.requires_grad_(False)
    with torch.no_grad():
        frames = frames[torch.linspace(0, n - 1, min(n, stats_frames)).round().long()]
        zs = torch.cat([ae.encoder(c) for c in frames.split(256)])
        ae.latent_mean.copy_(zs.mean(dim=(0, 2, 3)))
        ae.latent_std.copy_(zs.std(dim=(0, 2, 3)).clamp_min(1e-6))
        l1 = mse = 0.0
        for c in frames.split(256):
            y = ae.decode_frames(ae.encode_frames(c)).clamp(-1, 1)
            l1 += float((y - c).abs().sum())
            mse += float((y - c).pow(2).sum())
        count = frames.numel()
    return {"l1": l1 / count, "mse": mse / count}
