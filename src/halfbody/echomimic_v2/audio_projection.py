"""Audio projection: per-frame audio features -> context tokens of the audio cross-attention (paper §3.1, Fig. 2).

The audio encoder gives ``K`` tokens of dim ``D`` per video frame (e.g. Whisper hidden states of all layers in a
window around the frame). This module turns them into ``K'`` tokens of the UNet's ``cross_attention_dim``, the
``c_a`` that the Audio Cross Attention blocks attend to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AudioProjection(nn.Module):
    """``(B, F, K, D) -> (B * F, K', cross_attention_dim)``.

    Per-token MLP with a learned embedding of the token slot (window offset / encoder layer), an optional linear
    mix over the ``K`` slots into ``K'`` tokens, and an output LayerNorm.

    Args:
        audio_dim: ``D``.
        audio_tokens: ``K``.
        cross_attention_dim: width of the audio cross-attention context (the UNet's ``cross_attention_dim``).
        context_tokens: ``K'``; ``None``: ``K`` (no token mixing).
        hidden_dim: MLP width; ``None``: ``cross_attention_dim``.
    """

    def __init__(self, audio_dim: int, audio_tokens: int, cross_attention_dim: int, context_tokens: int | None = None,
                 hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or cross_attention_dim
        context_tokens = context_tokens or audio_tokens
        self.audio_dim, self.audio_tokens, self.context_tokens = audio_dim, audio_tokens, context_tokens
        self.norm_in = nn.LayerNorm(audio_dim)
        self.slot_embedding = nn.Parameter(torch.randn(audio_tokens, audio_dim) * 0.02)
        self.fc1 = nn.Linear(audio_dim, hidden_dim)
        self.token_mix = nn.Linear(audio_tokens, context_tokens) if context_tokens != audio_tokens else None
        self.fc2 = nn.Linear(hidden_dim, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)

    def forward(self, audio_feats: torch.Tensor) -> torch.Tensor:
        """``audio_feats``: ``(B, F, K, D)``. Returns ``(B * F, K', cross_attention_dim)``."""
        if audio_feats.ndim != 4 or audio_feats.shape[-2:] != (self.audio_tokens, self.audio_dim):
            raise ValueError(f"audio_feats must be (B, F, {self.audio_tokens}, {self.audio_dim}), "
                             f"got {tuple(audio_feats.shape)}")
        x = audio_feats.flatten(0, 1)
        x = self.norm_in(x) + self.slot_embedding.to(x.dtype)
        x = F.silu(self.fc1(x))
        if self.token_mix is not None:
            x = self.token_mix(x.transpose(1, 2)).transpose(1, 2)
        return self.norm_out(self.fc2(x))
