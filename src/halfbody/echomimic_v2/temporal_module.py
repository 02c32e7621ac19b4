"""Temporal modules of the EchoMimicV2 denoiser (paper §3.1 "Temporal-Attention blocks", §3.4).

AnimateDiff-style motion modules: at every spatial position, the ``F`` frames of a sample attend to each other.
Each spatial transformer of the denoising UNet is wrapped by :class:`SpatialTemporalTransformer`, which runs the
original ``Transformer2DModel`` and then a :class:`TemporalTransformer`. The output projection starts at zero, so a
fresh temporal module is the identity and a pretrained image UNet keeps its behaviour.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


def sinusoidal_frame_embedding(num_frames: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Sinusoidal position encoding of frame indices ``0..F-1``: ``(F, dim)`` (sin on even, cos on odd channels)."""
    pos = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_frames, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe if dtype is None else pe.to(dtype)


class TemporalTransformerBlock(nn.Module):
    """Temporal self-attention(s) + feed-forward on frame sequences ``(N, F, C)`` (pre-norm, residual).

    Like AnimateDiff, the frame position encoding is added to the normalised input of every attention.
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, num_attentions: int = 2,
                 activation_fn: str = "geglu"):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attentions)])
        self.attentions = nn.ModuleList([
            Attention(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=False)
            for _ in range(num_attentions)
        ])
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn=activation_fn)

    def forward(self, hidden_states: torch.Tensor, frame_pe: torch.Tensor) -> torch.Tensor:
        """``hidden_states``: ``(N, F, C)``; ``frame_pe``: ``(F, C)``. Returns ``(N, F, C)``."""
        for norm, attn in zip(self.norms, self.attentions):
            hidden_states = attn(norm(hidden_states) + frame_pe) + hidden_states
        return self.ff(self.ff_norm(hidden_states)) + hidden_states


class TemporalTransformer(nn.Module):
    """Attention across frames at each spatial position (AnimateDiff motion module).

    Args:
        in_channels: channels ``C`` of the wrapped spatial block's output.
        num_attention_heads: heads of the temporal attentions.
        attention_head_dim: channels per head; ``None``: ``C // num_attention_heads``.
        num_layers: temporal transformer blocks.
        num_attentions: temporal self-attentions per block (AnimateDiff uses two).
        norm_num_groups: groups of the input GroupNorm.
    """

    def __init__(self, in_channels: int, num_attention_heads: int = 8, attention_head_dim: int | None = None,
                 num_layers: int = 1, num_attentions: int = 2, norm_num_groups: int = 32):
        super().__init__()
        if attention_head_dim is None:
            if in_channels % num_attention_heads:
                raise ValueError(f"temporal module: {in_channels} channels do not split into {num_attention_heads} heads")
            attention_head_dim = in_channels // num_attention_heads
        inner = num_attention_heads * attention_head_dim
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, inner)
        self.transformer_blocks = nn.ModuleList([
            TemporalTransformerBlock(inner, num_attention_heads, attention_head_dim, num_attentions)
            for _ in range(num_layers)
        ])
        self.proj_out = nn.Linear(inner, in_channels)
        # Zero-initialised output projection: a fresh module is the identity (§3.4, AnimateDiff).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # diffusers' enable_gradient_checkpointing() on the UNet sets these two attributes.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        """``hidden_states``: ``(B * F, C, h, w)``, frame-major per sample. Returns the same shape."""
        bf, c, h, w = hidden_states.shape
        if bf % num_frames:
            raise ValueError(f"temporal module: batch {bf} is not a multiple of num_frames={num_frames}")
        b = bf // num_frames
        residual = hidden_states
        x = self.norm(hidden_states)
        # (B*F, C, h, w) -> (B*h*w, F, C)
        x = x.view(b, num_frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, num_frames, c)
        x = self.proj_in(x)
        pe = sinusoidal_frame_embedding(num_frames, x.shape[-1], device=x.device, dtype=x.dtype)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing and self._gradient_checkpointing_func is not None:
                x = self._gradient_checkpointing_func(block, x, pe)
            else:
                x = block(x, pe)
        x = self.proj_out(x)
        x = x.view(b, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)
        return x + residual


class SpatialTemporalTransformer(nn.Module):
    """A UNet ``Transformer2DModel`` followed by a :class:`TemporalTransformer` (drop-in for the spatial block).

    Called exactly like ``Transformer2DModel``; ``num_frames`` comes from
    ``cross_attention_kwargs["attn_context"].num_frames``. With ``temporal=None`` (an image model) it only runs the
    spatial block; the wrapper stays so that parameter names (``...attentions.i.spatial.*``) do not depend on
    whether temporal modules exist, and image-stage checkpoints load into video networks.
    """

    def __init__(self, spatial: nn.Module, temporal: TemporalTransformer | None = None):
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = self.spatial(hidden_states, *args, **kwargs)
        if self.temporal is None:
            return out
        sample = out[0] if isinstance(out, tuple) else out.sample
        cak = kwargs.get("cross_attention_kwargs") or {}
        ctx = cak.get("attn_context")
        if ctx is None:
            raise ValueError("temporal module needs cross_attention_kwargs['attn_context'] with num_frames")
        sample = self.temporal(sample, ctx.num_frames)
        if isinstance(out, tuple):
            return (sample,) + tuple(out[1:])
        out.sample = sample
        return out
