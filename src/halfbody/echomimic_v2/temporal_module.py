"""Temporal (motion) modules of the EchoMimicV2 denoiser (paper §3.1 "Temporal-Attention blocks", §3.4).

The released network (``configs/inference/inference_v2.yaml``: ``motion_module_type: Vanilla``, 8 heads, one
transformer block of two ``Temporal_Self`` attentions, sinusoidal frame positions up to 32 frames, mid block
included) has an AnimateDiff-style motion module after **every** layer of every UNet block: after each spatial
transformer in blocks with attention, after each resnet in blocks without (``DownBlock2D`` / ``UpBlock2D``), and
after the mid block's transformer: 21 modules in the SD1.5 layout. At every spatial position the ``F`` frames of a
sample attend to each other.

Parameter names follow the release (``<block>.motion_modules.<i>.temporal_transformer.…``, attention blocks
``attention_blocks.<j>`` with the frame-position buffer ``pos_encoder.pe``), so its ``motion_module.pth`` loads
key for key. The output projection starts at zero: a fresh module is the identity and an image UNet keeps its
behaviour.
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


class FramePositionEncoding(nn.Module):
    """The release's frame positions: a persistent ``pe`` buffer ``(1, max_frames, dim)`` (it is in the state dict
    and in ``motion_module.pth``), added to the first ``F`` frames."""

    def __init__(self, dim: int, max_frames: int = 32):
        super().__init__()
        self.register_buffer("pe", sinusoidal_frame_embedding(max_frames, dim)[None], persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, F, dim)``."""
        f = x.shape[1]
        if f > self.pe.shape[1]:
            raise ValueError(f"temporal module: {f} frames, but the frame position encoding covers "
                             f"{self.pe.shape[1]} (temporal_max_frames); sample longer videos in context windows")
        return x + self.pe[:, :f].to(x.dtype)


class TemporalSelfAttention(Attention):
    """Self-attention across frames with the frame positions added to its (normalised) input, as released."""

    def __init__(self, dim: int, heads: int, dim_head: int, max_frames: int = 32):
        super().__init__(query_dim=dim, heads=heads, dim_head=dim_head, bias=False)
        self.pos_encoder = FramePositionEncoding(dim, max_frames)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # (N, F, C)
        return super().forward(self.pos_encoder(hidden_states))


class TemporalTransformerBlock(nn.Module):
    """Temporal self-attention(s) + feed-forward on frame sequences ``(N, F, C)`` (pre-norm, residual)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, num_attentions: int = 2,
                 max_frames: int = 32, activation_fn: str = "geglu"):
        super().__init__()
        self.attention_blocks = nn.ModuleList([
            TemporalSelfAttention(dim, num_attention_heads, attention_head_dim, max_frames)
            for _ in range(num_attentions)
        ])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(num_attentions)])
        self.ff = FeedForward(dim, activation_fn=activation_fn)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            hidden_states = attn(norm(hidden_states)) + hidden_states
        return self.ff(self.ff_norm(hidden_states)) + hidden_states


class TemporalTransformer(nn.Module):
    """Attention across frames at each spatial position: ``(B * F, C, h, w)`` -> same shape (residual).

    Args:
        in_channels: channels ``C`` of the host layer's output.
        num_attention_heads: heads of the temporal attentions (released: 8).
        num_layers: temporal transformer blocks (released: 1).
        num_attentions: temporal self-attentions per block (released: 2).
        max_frames: length of the frame-position table (released: 32).
        norm_num_groups: groups of the input GroupNorm (released: 32).
    """

    def __init__(self, in_channels: int, num_attention_heads: int = 8, num_layers: int = 1, num_attentions: int = 2,
                 max_frames: int = 32, norm_num_groups: int = 32):
        super().__init__()
        if in_channels % num_attention_heads:
            raise ValueError(f"temporal module: {in_channels} channels do not split into {num_attention_heads} heads")
        if in_channels % norm_num_groups:
            raise ValueError(f"temporal module: {in_channels} channels do not split into {norm_num_groups} groups")
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        self.proj_in = nn.Linear(in_channels, in_channels)
        self.transformer_blocks = nn.ModuleList([
            TemporalTransformerBlock(in_channels, num_attention_heads, in_channels // num_attention_heads,
                                     num_attentions, max_frames)
            for _ in range(num_layers)
        ])
        self.proj_out = nn.Linear(in_channels, in_channels)
        # Zero-initialised output projection: a fresh module is the identity (§3.4, AnimateDiff).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        # diffusers' enable_gradient_checkpointing() on the UNet sets these two attributes.
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = hidden_states.shape
        if bf % num_frames:
            raise ValueError(f"temporal module: batch {bf} is not a multiple of num_frames={num_frames}")
        b = bf // num_frames
        residual = hidden_states
        x = self.norm(hidden_states)
        # (B*F, C, h, w) -> (B*h*w, F, C)
        x = x.view(b, num_frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, num_frames, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing and self._gradient_checkpointing_func is not None:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        x = self.proj_out(x)
        x = x.view(b, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)
        return x + residual


class FrameCount:
    """Per-forward frame count shared by the denoiser and its motion modules (set at the start of each forward).

    Kept after the forward on purpose: activation checkpointing recomputes the motion modules during backward.
    """

    def __init__(self) -> None:
        self.num_frames = 1


class MotionModule(nn.Module):
    """The release's ``VanillaTemporalModule``: a :class:`TemporalTransformer` under ``temporal_transformer``.

    It runs as a forward hook of its host layer (a spatial transformer or a resnet of the UNet block holding it in
    ``motion_modules``), so the UNet's own parameter names stay those of diffusers and of the release.
    """

    def __init__(self, in_channels: int, frames: FrameCount, **kwargs: Any):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(in_channels, **kwargs)
        self._frames = frames  # plain attribute: shared, not a submodule

    @property
    def proj_out(self) -> nn.Linear:
        return self.temporal_transformer.proj_out

    def forward(self, hidden_states: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        return self.temporal_transformer(hidden_states, self._frames.num_frames if num_frames is None else num_frames)

    def after_host(self, host: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of the host layer: run the motion module on the host's output (tensor or ``(tensor, ...)``
        / ``Transformer2DModelOutput``)."""
        if torch.is_tensor(output):
            return self(output)
        if isinstance(output, tuple):
            return (self(output[0]),) + tuple(output[1:])
        output.sample = self(output.sample)
        return output
