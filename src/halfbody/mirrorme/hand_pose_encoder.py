"""Hand pose encoder ("hand guider") of MirrorMe (§3.4, Table 1 "+ Hand Guider").

Hand-keypoint maps are compressed to the latent grid: the shared per-frame :class:`PoseEncoder` brings them to
``H / s x W / s``; then, like the causal video VAE, the frame axis is folded causally (frame 0 alone, then groups of
``tf``) into channels, and a linear layer maps each latent-grid cell to the transformer's hidden size. The result is
added to the video latent tokens. The linear layer starts at zero (weights and bias), so a fresh guider adds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from halfbody.mirrorme.causal_audio_encoder import causal_frame_groups
from halfbody.models.pose_encoder import PoseEncoder

__all__ = ["HandPoseEncoder"]


class HandPoseEncoder(nn.Module):
    """``(B, F, 3, H, W)`` pose maps -> ``(B, F', H/s, W/s, D)`` token features.

    Args:
        model_dim: transformer hidden size ``D``.
        spatial_factor: ``s`` of the video VAE (a power of two; 32 for LTX).
        temporal_factor: ``tf`` of the video VAE (8 for LTX).
        channels: per-frame feature width at the latent grid.
        block_out_channels: widths of the per-frame :class:`PoseEncoder` stages (``None``: its defaults).
    """

    def __init__(self, model_dim: int, spatial_factor: int = 32, temporal_factor: int = 8, channels: int = 32,
                 block_out_channels: tuple[int, ...] | list[int] | None = None) -> None:
        super().__init__()
        self.temporal_factor = int(temporal_factor)
        self.frame_encoder = PoseEncoder(channels, latent_factor=spatial_factor, block_out_channels=block_out_channels)
        self.frame_encoder.conv_out.reset_parameters()  # the zero start is the projection's (else no gradient flows)
        self.proj = nn.Linear(self.temporal_factor * channels, model_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        if pose.ndim != 5:
            raise ValueError(f"pose maps must be (B, F, C, H, W), got shape {tuple(pose.shape)}")
        b, f = pose.shape[:2]
        groups = len(causal_frame_groups(f, self.temporal_factor))
        x = self.frame_encoder(pose.flatten(0, 1))  # (B*F, c, h, w)
        x = x.unflatten(0, (b, f))
        tf = self.temporal_factor
        x = torch.cat([x[:, :1].expand(-1, tf - 1, -1, -1, -1), x], dim=1)  # causal first frame, like the VAE
        x = x.unflatten(1, (groups, tf))  # (B, F', tf, c, h, w)
        x = x.permute(0, 1, 4, 5, 2, 3).flatten(-2)  # (B, F', h, w, tf*c)
        return self.proj(F.silu(x))
