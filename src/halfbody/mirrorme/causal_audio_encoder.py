"""Causal Audio Encoder of MirrorMe (§3.3, Figure 3a).

Per-video-frame wav2vec2 features go through ``log2(tf)`` stacked 1-D causal downsampling convolutions (three for
LTX's 8x temporal compression), so that audio latent frame ``i`` covers exactly the video frames of latent frame
``i`` of the causal video VAE:

    latent frame 0      <- video frame 0 alone                     (the causal first frame)
    latent frame i >= 1 <- video frames tf*(i-1)+1 ... tf*i

Each downsampling layer has kernel 2 and stride 2, so every output sees exactly one group of ``tf`` frames and never
a later one. Latent frame 0's group is its frame preceded by ``tf - 1`` frames (:attr:`CausalAudioEncoder.past_frames`):

- the **real past** when the caller has it: features ``(B, tf - 1 + F, K, D)`` whose first ``tf - 1`` frames are the
  audio just before the clip. A later clip of a long video (motion frames, §3.2) and a training window inside a longer
  clip both have it in the whole-audio context, so latent frame 0 of clip ``c > 0`` hears the speech that leads into
  its frame (past audio only: still causal);
- else ``tf - 1`` copies of frame 0, as the causal VAE pads its first frame (a clip with no audio before it, or
  precomputed per-window features).

Outputs (§3.3): ``a_glo`` ``(B, F', D_model)``, added to the noisy latent tokens of its latent frame "the way a
timestep embedding is added"; ``a_loc`` ``(B, F', n, C_a)``, the per-latent-frame tokens the audio adapter attends to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalAudioEncoder", "causal_frame_groups"]


def causal_frame_groups(num_frames: int, temporal_factor: int) -> list[range]:
    """The video frames behind each latent frame of a causal ``temporal_factor``x VAE (``num_frames = 1 + k tf``)."""
    tf = int(temporal_factor)
    if num_frames < 1 or (num_frames - 1) % tf:
        raise ValueError(f"a causal {tf}x VAE needs 1 + k*{tf} frames, got {num_frames}")
    return [range(0, 1)] + [range(tf * (i - 1) + 1, tf * i + 1) for i in range(1, 1 + (num_frames - 1) // tf)]


class CausalAudioEncoder(nn.Module):
    """``(B, F, K, D_in)`` per-frame audio features -> ``a_glo (B, F', D_model)``, ``a_loc (B, F', n, C_a)``.

    Args:
        in_dim: ``K * D_in``, the flattened per-frame audio feature size.
        model_dim: the transformer's hidden size (``a_glo`` is added to its tokens).
        audio_dim: ``C_a``, the width of ``a_loc`` tokens.
        num_tokens: ``n``, local tokens per latent frame ("distinct semantic constituents", §3.3).
        temporal_factor: the video VAE's temporal compression ``tf`` (a power of two; 8 for LTX).
        channels: width of the causal convolution stack.

    Inputs of ``F = 1 + k tf`` frames are padded with copies of frame 0; inputs of ``tf - 1 + F`` frames (a multiple
    of ``tf``) carry their own ``past_frames`` real past frames in front (see the module docstring).
    """

    def __init__(self, in_dim: int, model_dim: int, audio_dim: int = 768, num_tokens: int = 16,
                 temporal_factor: int = 8, channels: int = 512) -> None:
        super().__init__()
        layers = int(round(math.log2(temporal_factor))) if temporal_factor >= 1 else -1
        if layers < 0 or 2 ** layers != temporal_factor:
            raise ValueError(f"causal audio encoder: temporal_factor must be a power of two, got {temporal_factor}")
        self.temporal_factor = int(temporal_factor)
        self.past_frames = self.temporal_factor - 1  # frames of real past audio latent frame 0 can take
        self.num_tokens, self.audio_dim = int(num_tokens), int(audio_dim)
        self.proj_in = nn.Linear(in_dim, channels)
        # Figure 3a: stacked 1-D causal downsampling convolutions (kernel 2, stride 2: one group each)
        self.downsample = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size=2, stride=2) for _ in range(layers))
        self.norm = nn.LayerNorm(channels)
        self.to_global = nn.Linear(channels, model_dim)
        nn.init.zeros_(self.to_global.weight)  # a fresh encoder leaves the pretrained transformer's input unchanged
        nn.init.zeros_(self.to_global.bias)
        self.to_local = nn.Linear(channels, num_tokens * audio_dim)

    def forward(self, audio_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio_feats`` ``(B, F, K, D_in)`` with ``F = 1 + k tf``, or ``(B, tf - 1 + F, K, D_in)`` with the real past
        in front -> ``(a_glo (B, F', D), a_loc (B, F', n, C_a))``, ``F' = 1 + k``."""
        if audio_feats.ndim != 4:
            raise ValueError(f"audio features must be (B, F, K, D), got shape {tuple(audio_feats.shape)}")
        b, f = audio_feats.shape[:2]
        tf = self.temporal_factor
        with_past = tf > 1 and f >= tf and f % tf == 0  # tf - 1 past frames + 1 + k tf clip frames
        if not with_past:
            causal_frame_groups(f, tf)  # validates F
        x = F.silu(self.proj_in(audio_feats.flatten(2)))  # (B, F, C)
        x = x.transpose(1, 2)  # (B, C, F)
        if not with_past:  # no audio before the clip: the causal first frame, as the VAE pads it
            x = torch.cat([x[:, :, :1].expand(-1, -1, tf - 1), x], dim=2)
        for i, conv in enumerate(self.downsample):
            x = conv(x)
            if i + 1 < len(self.downsample):
                x = F.silu(x)
        x = self.norm(x.transpose(1, 2))  # (B, F', C)
        a_glo = self.to_global(x)
        a_loc = self.to_local(x).unflatten(-1, (self.num_tokens, self.audio_dim))
        return a_glo, a_loc
