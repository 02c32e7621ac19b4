"""Pose encoder: keypoint maps -> latent-grid features (EchoMimicV2 §3.1 ``E_P``; MirrorMe's hand guider reuses it).

A light conv net (the AnimateAnyone "pose guider" design) maps the keypoint map at pixel resolution to the
latent grid. EchoMimicV2 adds its output to the denoiser's features right after ``conv_in``
(:class:`halfbody.echomimic_v2.pose_encoder.PoseConditionedConvIn`); MirrorMe folds it over time and adds it to the
latent tokens. The output conv starts at zero, so a fresh pose encoder changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PoseEncoder(nn.Module):
    """``(N, pose_channels, H, W) -> (N, out_channels, H / latent_factor, W / latent_factor)``.

    Args:
        out_channels: channels of the UNet's first block (``block_out_channels[0]``, 320 for SD1.5).
        latent_factor: spatial factor of the autoencoder (8 for SD's VAE, 4 for the tiny patch autoencoder); a power
            of two, one stride-2 stage per factor of two.
        pose_channels: channels of the pose map (3, RGB).
        block_out_channels: widths ``(c_0, ..., c_n)``, ``n = log2(latent_factor)``; ``None`` picks
            ``(16, 32, 96, 256)`` cut to length.
    """

    def __init__(self, out_channels: int, latent_factor: int = 8, pose_channels: int = 3,
                 block_out_channels: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        stages = int(round(math.log2(latent_factor))) if latent_factor >= 1 else -1
        if stages < 0 or 2 ** stages != latent_factor:
            raise ValueError(f"pose encoder: latent_factor must be a power of two, got {latent_factor}")
        if block_out_channels is None:
            default = (16, 32, 96, 256, 256, 256)
            block_out_channels = default[: stages + 1]
        block_out_channels = tuple(block_out_channels)
        if len(block_out_channels) != stages + 1:
            raise ValueError(f"pose encoder: latent_factor={latent_factor} needs {stages + 1} block_out_channels, "
                             f"got {block_out_channels}")
        self.latent_factor = latent_factor
        self.conv_in = nn.Conv2d(pose_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(block_out_channels[:-1], block_out_channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # zero-init: no pose influence before training
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        """``pose``: ``(N, pose_channels, H, W)`` in ``[0, 1]``; ``H, W`` multiples of ``latent_factor``."""
        if pose.ndim != 4 or pose.shape[-2] % self.latent_factor or pose.shape[-1] % self.latent_factor:
            raise ValueError(f"pose map must be (N, C, H, W) with H, W multiples of {self.latent_factor}, "
                             f"got {tuple(pose.shape)}")
        x = F.silu(self.conv_in(pose))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)
