"""Autoencoders that map videos to diffusion latents and back (docs/ARCHITECTURE.md, "Autoencoder interface").

Every video in halfbody is ``(B, F, C, H, W)`` (frames before channels) with pixels in ``[-1, 1]``.

- :class:`PatchAutoencoder`: lossless space-to-depth (optionally also over time with a causal first frame, like
  LTX-Video). It needs no weights, so tiny CPU presets decode generated latents to real pixels.
- :class:`KLAutoencoder`: SD's image VAE (sd-vae-ft-mse), applied per frame (EchoMimicV2 §3.1, "z0 = E(I)").
- :class:`LTXVideoAutoencoder`: LTX-Video's causal video VAE, 8x in time and 32x in space, 128 channels
  (MirrorMe §3.1, "Lightweight Tokenization with LTX").

All three are frozen by default: no parameter requires grad and the module stays in eval mode even when a parent
calls ``.train()``. Gradients still flow *through* them to their inputs when a caller needs that.
"""

from __future__ import annotations

import abc

import os
from typing import Any

import torch
from torch import nn
import torch.nn.functional as Fn

from halfbody.models.pretrained import load_pretrained

__all__ = ["Autoencoder", "PatchAutoencoder", "KLAutoencoder", "LTXVideoAutoencoder"]


def _check_video(video: torch.Tensor, name: str = "video", channels: int | None = None) -> None:
    if video.ndim != 5:
        raise ValueError(f"{name} must be (B, F, C, H, W), got shape {tuple(video.shape)}")
    if channels is not None and video.shape[2] != channels:
        raise ValueError(f"{name} must have {channels} channels at dim 2 (B, F, C, H, W), "
                         f"got shape {tuple(video.shape)}")


class Autoencoder(nn.Module, metaclass=abc.ABCMeta):
    """Interface: pixels ``(B, F, 3, H, W)`` in ``[-1, 1]`` <-> latents ``(B, F', C, H/f, W/f)``.

    Attributes:
        latent_channels: ``C``.
        spatial_factor: ``f``, the downsampling factor over height and width.
        temporal_factor: ``tf``; 1 for image autoencoders (applied per frame, ``F' = F``), otherwise a causal video
            autoencoder with ``F = 1 + k * tf`` and ``F' = 1 + k``.

    Subclasses implement :meth:`encode` and :meth:`decode`; the image methods default to one-frame videos.
    """

    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def __init__(self, frozen: bool = True) -> None:
        super().__init__()
        self.frozen = frozen

    def freeze(self) -> "Autoencoder":
        """No gradients into the parameters, and eval mode from now on (see :meth:`train`)."""
        self.frozen = True
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Autoencoder":
        # A frozen autoencoder ignores a parent's ``.train()`` (Lightning calls it at every fit start).
        return super().train(False if self.frozen else mode)

    def latent_num_frames(self, num_frames: int) -> int:
        """``F'`` for a clip of ``num_frames`` frames (raises if ``num_frames`` is not ``1 + k * tf``)."""
        tf = self.temporal_factor
        if tf == 1:
            return num_frames
        if num_frames < 1 or (num_frames - 1) % tf != 0:
            raise ValueError(f"{type(self).__name__} needs 1 + k*{tf} frames (causal first frame), got {num_frames}")
        return 1 + (num_frames - 1) // tf

    def pixel_num_frames(self, latent_frames: int) -> int:
        """``F`` decoded from ``latent_frames`` latent frames: ``1 + (F' - 1) * tf``."""
        return latent_frames if self.temporal_factor == 1 else 1 + (latent_frames - 1) * self.temporal_factor

    @abc.abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F, 3, H, W)`` in ``[-1, 1]`` -> ``(B, F', C, H/f, W/f)`` scaled latents."""

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F', C, h, w)`` -> ``(B, F, 3, h*f, w*f)`` in ``[-1, 1]``."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, C, H/f, W/f)``: one frame (references)."""
        if image.ndim != 4:
            raise ValueError(f"image must be (B, 3, H, W), got shape {tuple(image.shape)}")
        return self.encode(image.unsqueeze(1))[:, 0]

    def decode_image(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, 3, h*f, w*f)`` in ``[-1, 1]``."""
        if latent.ndim != 4:
            raise ValueError(f"latent must be (B, C, h, w), got shape {tuple(latent.shape)}")
        return self.decode(latent.unsqueeze(1))[:, 0]

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Round trip ``decode(encode(video))``."""
        return self.decode(self.encode(video))


# --------------------------------------------------------------------------------------------------------------
# Lossless patch autoencoder
# --------------------------------------------------------------------------------------------------------------


class PatchAutoencoder(Autoencoder):
    """Lossless space-to-depth (and optionally time-to-depth) "autoencoder" with no weights.

    Spatially, each ``p x p`` pixel patch becomes ``3 p^2`` channels (``pixel_unshuffle``). With
    ``temporal_patch = tf > 1`` it also folds ``tf`` consecutive frames into channels, with a causal first frame as
    in LTX-Video: a clip of ``1 + k*tf`` frames gives ``1 + k`` latent frames; frame 0 is repeated ``tf`` times to form
    the first group, and decoding averages those ``tf`` copies (exact for an encoded clip, smooth for a generated one).

    Latent channel order: ``(tf, 3, p, p)`` flattened. Latents are ``scaling_factor * pixels``, so the round trip is
    exact up to float rounding; ``scaling_factor ~ 2`` brings typical ``[-1, 1]`` video to roughly unit variance.

    Args:
        patch_size: ``p``, the spatial factor.
        temporal_patch: ``tf``, the temporal factor (1 = per-frame image autoencoder).
        scaling_factor: latents are pixels times this constant.
        clamp: clamp decoded pixels to ``[-1, 1]`` (an encoded clip in range is still recovered exactly).
    """

    def __init__(self, patch_size: int = 4, temporal_patch: int = 1, scaling_factor: float = 1.0,
                 clamp: bool = True) -> None:
        super().__init__(frozen=True)
        if patch_size < 1 or temporal_patch < 1:
            raise ValueError(f"patch_size and temporal_patch must be >= 1, got {patch_size} and {temporal_patch}")
        if scaling_factor == 0:
            raise ValueError("scaling_factor must be non-zero for the patch autoencoder to stay invertible")
        self.patch_size = int(patch_size)
        self.temporal_patch = int(temporal_patch)
        self.scaling_factor = float(scaling_factor)
        self.clamp = clamp
        self.latent_channels = 3 * self.patch_size ** 2 * self.temporal_patch
        self.spatial_factor = self.patch_size
        self.temporal_factor = self.temporal_patch

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, temporal_patch={self.temporal_patch}, "
                f"scaling_factor={self.scaling_factor}")

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, F, 3, H, W)`` -> ``(B, F', 3 p^2 tf, H/p, W/p)``; ``F' = 1 + (F-1)/tf`` when ``tf > 1``."""
        _check_video(video, channels=3)
        b, f, c, h, w = video.shape
        p, tf = self.patch_size, self.temporal_patch
        if h % p or w % p:
            raise ValueError(f"PatchAutoencoder(patch_size={p}) needs H and W divisible by {p}, got {h}x{w}")
        fl = self.latent_num_frames(f)
        z = Fn.pixel_unshuffle(video.reshape(b * f, c, h, w), p).reshape(b, f, c * p * p, h // p, w // p)
        if tf > 1:
            # Causal first frame (like LTX): frame 0 alone, repeated to fill its group of tf.
            z = torch.cat([z[:, :1].expand(-1, tf, -1, -1, -1), z[:, 1:]], dim=1)  # (B, fl*tf, 3p^2, h, w)
            z = z.reshape(b, fl, tf * c * p * p, h // p, w // p)
        return z * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F', 3 p^2 tf, h, w)`` -> ``(B, 1 + (F'-1) tf, 3, h p, w p)``."""
        _check_video(latents, "latents", channels=self.latent_channels)
        b, fl, _, h, w = latents.shape
        p, tf = self.patch_size, self.temporal_patch
        z = latents / self.scaling_factor
        if tf > 1:
            z = z.reshape(b, fl, tf, 3 * p * p, h, w)
            first = z[:, :1].mean(dim=2)  # (B, 1, 3p^2, h, w): the tf copies of frame 0
            z = torch.cat([first, z[:, 1:].reshape(b, (fl - 1) * tf, 3 * p * p, h, w)], dim=1)
        f = z.shape[1]
        video = Fn.pixel_shuffle(z.reshape(b * f, 3 * p * p, h, w), p).reshape(b, f, 3, h * p, w * p)
        return video.clamp(-1.0, 1.0) if self.clamp else video


# --------------------------------------------------------------------------------------------------------------
# SD image VAE (per frame)
# --------------------------------------------------------------------------------------------------------------

_KL_EXPECTED = ("a diffusers AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors), "
                "e.g. stabilityai/sd-vae-ft-mse or SD1.5's vae/ folder")


class KLAutoencoder(Autoencoder):
    """SD's image VAE (diffusers ``AutoencoderKL``, e.g. sd-vae-ft-mse) applied frame by frame.

    Latents are ``(z - shift_factor) * scaling_factor`` with both constants from the VAE config (SD1.5:
    ``scaling_factor = 0.18215``, no shift). Encoding uses the posterior mean unless ``sample_posterior``.

    Args:
        path: local directory of the VAE (the value of config key ``key``).
        key: the config key naming ``path``, quoted in loading errors.
        chunk_size: frames per VAE call (bounds memory; ``B * F`` frames are flattened first).
        sample_posterior: encode with a posterior sample instead of its mean.
        dtype: optional dtype to load the VAE in (inputs are cast to it, outputs cast back).
        frozen: no grads and eval mode (default).
    """

    def __init__(self, path: str | os.PathLike | None, key: str = "model.autoencoder.path", chunk_size: int = 8,
                 sample_posterior: bool = False, dtype: torch.dtype | None = None, frozen: bool = True) -> None:
        super().__init__(frozen=frozen)
        from diffusers import AutoencoderKL

        kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
        self.vae = load_pretrained(AutoencoderKL, path, key, _KL_EXPECTED, **kwargs)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        cfg = self.vae.config
        self.chunk_size = int(chunk_size)
        self.sample_posterior = sample_posterior
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.temporal_factor = 1
        if frozen:
            self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, F, 3, H, W)`` in ``[-1, 1]`` -> ``(B, F, 4, H/8, W/8)`` scaled latents (SD1.5 VAE)."""
        _check_video(video, channels=3)
        b, f, c, h, w = video.shape
        f_ = self.spatial_factor
        if h % f_ or w % f_:
            raise ValueError(f"KLAutoencoder needs H and W divisible by {f_}, got {h}x{w}")
        frames = video.reshape(b * f, c, h, w).to(self.vae.dtype)
        out = []
        for chunk in frames.split(self.chunk_size):
            dist = self.vae.encode(chunk).latent_dist
            out.append(dist.sample(generator) if self.sample_posterior else dist.mean)
        z = (torch.cat(out) - self.shift_factor) * self.scaling_factor
        return z.reshape(b, f, *z.shape[1:]).to(video.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, F, 4, h, w)`` scaled latents -> ``(B, F, 3, 8h, 8w)`` in ``[-1, 1]``."""
        _check_video(latents, "latents", channels=self.latent_channels)
        b, f = latents.shape[:2]
        z = latents.reshape(b * f, *latents.shape[2:]).to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        frames = torch.cat([self.vae.decode(chunk).sample for chunk in z.split(self.chunk_size)])
        return frames.reshape(b, f, *frames.shape[1:]).clamp(-1.0, 1.0).to(latents.dtype)


# --------------------------------------------------------------------------------------------------------------
# LTX-Video causal video VAE
# --------------------------------------------------------------------------------------------------------------

_LTX_EXPECTED = ("a diffusers AutoencoderKLLTXVideo directory (config.json + diffusion_pytorch_model.safetensors), "
                 "e.g. the vae/ folder of Lightricks/LTX-Video in diffusers layout")


class LTXVideoAutoencoder(Autoencoder):
    """LTX-Video's causal video VAE (diffusers ``AutoencoderKLLTXVideo``): 8x time, 32x space, 128 channels.

    Latents are normalised per channel exactly as diffusers' ``LTXPipeline`` does:
    ``z = (mu - latents_mean) * scaling_factor / latents_std`` on encode, and the inverse before decoding, with the
    ``latents_mean`` / ``latents_std`` buffers stored in the VAE weights and ``scaling_factor`` from its config (1.0
    for LTX-Video). Layout conversion: ours ``(B, F, C, H, W)`` <-> the VAE's ``(B, C, T, H, W)``.

    When the decoder is timestep-conditioned (``timestep_conditioning`` in the config, LTX-Video >= 0.9.1), decoding
    passes ``decode_timestep`` as ``temb`` and first blends latents with noise,
    ``z = (1 - decode_noise_scale) * z + decode_noise_scale * noise``, as the pipeline does
    (``decode_noise_scale = None`` means "same as ``decode_timestep``"; the pipeline default is 0 for both; LTX-0.9.1's
    model card suggests 0.05 / 0.025).

    Args:
        path: local directory of the VAE (the value of config key ``key``).
        key: the config key naming ``path``, quoted in loading errors.
        sample_posterior: encode with a posterior sample instead of its mean.
        decode_timestep: decoder timestep for timestep-conditioned decoders (ignored otherwise).
        decode_noise_scale: noise blended into latents before a timestep-conditioned decode.
        slicing: encode/decode one batch element at a time (bounds memory).
        tiling: spatial/temporal tiling for large videos (diffusers ``enable_tiling``).
        dtype: optional dtype to load the VAE in (inputs are cast to it, outputs cast back).
        frozen: no grads and eval mode (default).
        vae: an already-built ``AutoencoderKLLTXVideo`` to wrap instead of loading ``path`` (benchmarks with
            random weights).
    """

    def __init__(self, path: str | os.PathLike | None, key: str = "model.autoencoder.path",
                 sample_posterior: bool = False, decode_timestep: float = 0.0,
                 decode_noise_scale: float | None = None, slicing: bool = True, tiling: bool = False,
                 dtype: torch.dtype | None = None, frozen: bool = True, vae: nn.Module | None = None) -> None:
        super().__init__(frozen=frozen)
        from diffusers import AutoencoderKLLTXVideo

        kwargs: dict[str, Any] = {} if dtype is None else {"torch_dtype": dtype}
        self.vae = vae if vae is not None else load_pretrained(AutoencoderKLLTXVideo, path, key, _LTX_EXPECTED, **kwargs)
        # Batch slicing is done here rather than with ``vae.enable_slicing()``: diffusers 0.42's sliced decode
        # mis-pairs latents and ``temb`` (it iterates a tuple instead of zipping), so timestep decoders break.
        self.slicing = slicing
        if tiling:
            self.vae.enable_tiling()
        cfg = self.vae.config
        self.sample_posterior = sample_posterior
        self.decode_timestep = float(decode_timestep)
        self.decode_noise_scale = self.decode_timestep if decode_noise_scale is None else float(decode_noise_scale)
        self.scaling_factor = float(cfg.scaling_factor)
        self.timestep_conditioning = bool(cfg.timestep_conditioning)
        self.latent_channels = int(cfg.latent_channels)
        self.spatial_factor = int(self.vae.spatial_compression_ratio)
        self.temporal_factor = int(self.vae.temporal_compression_ratio)
        if frozen:
            self.freeze()

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.vae.latents_mean.view(1, 1, -1, 1, 1).to(like.device, like.dtype)
        std = self.vae.latents_std.view(1, 1, -1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def encode(self, video: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 1 + 8k, 3, H, W)`` in ``[-1, 1]`` -> ``(B, 1 + k, 128, H/32, W/32)`` normalised latents."""
        _check_video(video, channels=3)
        b, f, c, h, w = video.shape
        self.latent_num_frames(f)  # validates F = 1 + k * tf
        s = self.spatial_factor
        if h % s or w % s:
            raise ValueError(f"LTXVideoAutoencoder needs H and W divisible by {s}, got {h}x{w}")
        x = video.permute(0, 2, 1, 3, 4).to(self.vae.dtype)  # (B, 3, F, H, W)
        mus = []
        for xb in (x.split(1) if self.slicing else (x,)):
            dist = self.vae.encode(xb).latent_dist
            mus.append(dist.sample(generator) if self.sample_posterior else dist.mode())
        mu = torch.cat(mus).permute(0, 2, 1, 3, 4)  # (B, F', C, h, w)
        mean, std = self._stats(mu)
        return ((mu - mean) * self.scaling_factor / std).to(video.dtype)

    def decode(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 1 + k, 128, h, w)`` normalised latents -> ``(B, 1 + 8k, 3, 32h, 32w)`` in ``[-1, 1]``."""
        _check_video(latents, "latents", channels=self.latent_channels)
        z = latents.to(self.vae.dtype)
        mean, std = self._stats(z)
        z = (z * std / self.scaling_factor + mean).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
        temb = None
        if self.timestep_conditioning:
            if self.decode_noise_scale > 0:
                noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = (1.0 - self.decode_noise_scale) * z + self.decode_noise_scale * noise
            temb = torch.full((z.shape[0],), self.decode_timestep, device=z.device, dtype=z.dtype)
        if self.slicing:
            tembs = temb.split(1) if temb is not None else (None,) * z.shape[0]
            video = torch.cat([self.vae.decode(zb, tb).sample for zb, tb in zip(z.split(1), tembs)])
        else:
            video = self.vae.decode(z, temb).sample  # (B, 3, F, H, W)
        return video.permute(0, 2, 1, 3, 4).clamp(-1.0, 1.0).to(latents.dtype)
