"""The audio-to-pose denoiser: a transformer over keypoint-motion sequences (docs/AUDIO2POSE.md).

One token per video frame. A token is the frame's motion (noisy, or clean for the motion-prefix frames, flagged)
plus the frame's audio features (the shared frozen encoder's ``K x D`` window, projected; a learned null embedding
when audio is dropped for CFG) plus a sinusoidal frame position. The flow timestep and the reference pose form one
conditioning vector that modulates every block (adaLN-Zero, as DiT, Peebles & Xie 2023 §3.2), so the reference
acts at every layer without taking a token. Bidirectional self-attention over the window lets a stroke prepare
before its syllable, as in DiffGesture's and Audio2Photoreal's transformer denoisers.

Shapes: ``x_t`` ``(B, T, 92)``, ``t`` ``(B,)`` in ``[0, 1]``, ``audio`` ``(B, T, K, D)`` or None, ``reference``
``(B, REFERENCE_DIM)``, ``prefix`` ``(B, T)`` bool (clean prefix frames) -> velocity ``(B, T, 92)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from halfbody.audio2pose.keypoint_sequence import POSE_DIM, REFERENCE_DIM


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``(...,)`` -> ``(..., dim)`` sinusoidal embedding."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MotionBlock(nn.Module):
    """Pre-norm self-attention + MLP, both modulated (shift, scale, gate) by the conditioning vector."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, g1, b1, s2, g2, b2 = self.modulation(nn.functional.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + g1) + s1
        x = x + b1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + g2) + s2
        return x + b2 * self.mlp(h)


class MotionTransformer(nn.Module):
    """
    Args:
        audio_feature_dim: ``K * D`` of the audio encoder (set by the module from its encoder).
        dim / depth / heads: transformer width, blocks, attention heads.
        mlp_ratio, dropout: the blocks' MLP width factor and attention dropout.
        max_period: of the frame-position embedding.
    """

    def __init__(self, audio_feature_dim: int, dim: int = 512, depth: int = 8, heads: int = 8,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim % heads or dim % 2:
            raise ValueError(f"model.network: dim={dim} must be even and divisible by heads={heads}")
        self.dim, self.max_period = int(dim), float(max_period)
        self.motion_in = nn.Linear(POSE_DIM + 1, dim)  # + the prefix flag
        self.audio_in = nn.Sequential(nn.LayerNorm(audio_feature_dim), nn.Linear(audio_feature_dim, dim), nn.GELU(),
                                      nn.Linear(dim, dim))
        self.null_audio = nn.Parameter(torch.zeros(dim))
        self.time_in = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.reference_in = nn.Sequential(nn.Linear(REFERENCE_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(MotionBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, POSE_DIM)
        for layer in (self.modulation_out, self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def module_groups(self) -> dict[str, list[nn.Module]]:
        return {"motion_transformer": [self]}

    def encode_audio(self, audio: torch.Tensor | None, batch: int, frames: int,
                     audio_keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, K, D)`` features -> ``(B, T, dim)`` tokens; dropped samples (``audio_keep`` False) and
        ``audio=None`` get the learned null embedding (the unconditional branch of CFG)."""
        null = self.null_audio.to(self.motion_in.weight.dtype).expand(batch, frames, -1)
        if audio is None:
            return null
        a = self.audio_in(audio.flatten(2).to(self.motion_in.weight.dtype))
        if audio_keep is not None:
            a = torch.where(audio_keep[:, None, None], a, null)
        return a

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, audio: torch.Tensor | None, reference: torch.Tensor,
                prefix: torch.Tensor, audio_keep: torch.Tensor | None = None,
                audio_tokens: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x_t.shape
        dtype = self.motion_in.weight.dtype
        h = self.motion_in(torch.cat([x_t.to(dtype), prefix[..., None].to(dtype)], dim=-1))
        h = h + (audio_tokens if audio_tokens is not None else self.encode_audio(audio, b, n, audio_keep))
        pos = sinusoidal(torch.arange(n, device=x_t.device), self.dim, self.max_period).to(dtype)
        h = h + pos[None]
        c = self.time_in(sinusoidal(t * 1000.0, self.dim).to(dtype)) + self.reference_in(reference.to(dtype))
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.modulation_out(nn.functional.silu(c))[:, None].chunk(2, dim=-1)
        return self.out(self.norm_out(h) * (1 + scale) + shift)
