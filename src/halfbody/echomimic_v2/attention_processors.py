"""Attention processors of the EchoMimicV2 network (paper Figure 2), in diffusers' processor style.

The SD1.5 UNet stays as diffusers builds it; what EchoMimicV2 changes about attention lives here:

- :class:`ReferenceWriteAttnProcessor` (ReferenceNet ``attn1``): records the self-attention input of each
  transformer block in a *reference bank* (§3.1 "ReferenceNet-based Backbone").
- :class:`ReferenceReadAttnProcessor` (denoiser ``attn1``): self-attention whose keys/values are the frame's own
  tokens plus the bank's reference tokens of the same block; per-sample reference dropout masks the reference tokens
  out of the softmax (an attention mask, not zeros, so a dropped sample is exactly "no reference").
- :class:`AudioCrossAttnProcessor` (denoiser ``attn2``): the text cross-attention repurposed for audio (§3.1), with
  the release's output gain (3.0), the Lips/Head Partial Attention of §3.2.2 / §3.3 as a spatial mask on its
  output, "off" (muted, §3.2.1 Initial Pose Phase) and per-sample audio dropout.
- :class:`PlainAttnProcessor`: ordinary SDPA attention that accepts (and ignores) the per-forward context.

Per-forward state travels in one :class:`AttentionContext`, passed as ``cross_attention_kwargs={"attn_context":
ctx}`` through the UNet; processors keep no state between forwards (friendly to FSDP2 and activation checkpointing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

AudioMode = Literal["off", "masked", "global"]
AUDIO_MODES: tuple[str, ...] = ("off", "masked", "global")


@dataclass
class AttentionContext:
    """What the processors (and the temporal wrappers) need to know about the current forward.

    Attributes:
        num_frames: ``F``; the UNet batch is ``B * F`` frames, frame-major within a sample (``b * F + f``).
        reference_bank: block key -> reference tokens ``(B, N_l, C_l)``. The ReferenceNet writes into it, the
            denoiser reads from it. Never cleared in place: activation checkpointing may re-read it in backward.
        reference_keep: ``(B,)`` bool; ``False`` hides the reference tokens from that sample. ``None``: keep all.
        audio_mode: ``"off"`` (audio attention contributes nothing, its branch is skipped), ``"masked"`` (output
            multiplied by ``audio_region``) or ``"global"`` (no spatial mask).
        audio_keep: ``(B,)`` float/bool; 0 zeroes the audio contribution of that sample. ``None``: keep all.
        audio_region: token count ``N`` of a block's grid -> mask tokens ``(B * F, N, 1)`` in ``[0, 1]``, see
            :func:`region_tokens_by_length`. Required when ``audio_mode == "masked"``.
    """

    num_frames: int = 1
    reference_bank: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_keep: torch.Tensor | None = None
    audio_mode: AudioMode = "global"
    audio_keep: torch.Tensor | None = None
    audio_region: dict[int, torch.Tensor] | None = None


def _project_out(attn: Attention, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(N, L, heads * d) -> (N, heads, L, d)``."""
    n, length, inner = x.shape
    return x.view(n, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(N, heads, L, d) -> (N, L, heads * d)``."""
    n, heads, length, d = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * d)


def _check_plain(attn: Attention, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3:
        raise ValueError(f"EchoMimicV2 processors expect token inputs (N, L, C), got shape {tuple(hidden_states.shape)}")
    if attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        raise ValueError("EchoMimicV2 processors support plain SD-style attention only (no spatial/group/qk norms)")


def plain_attention(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Standard (self- or cross-) attention of ``attn`` with SDPA: ``(N, L, C) -> (N, L, C)``."""
    _check_plain(attn, hidden_states)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if attention_mask is not None:
        n = hidden_states.shape[0]
        attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], n)
        attention_mask = attention_mask.view(n, attn.heads, -1, attention_mask.shape[-1])
    q = _heads(attn.to_q(hidden_states), attn.heads)
    k = _heads(attn.to_k(context), attn.heads)
    v = _heads(attn.to_v(context), attn.heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
    return _project_out(attn, _merge_heads(out).to(q.dtype), hidden_states)


class PlainAttnProcessor:
    """SDPA attention that accepts the per-forward ``attn_context`` and ignores it (ReferenceNet ``attn2``)."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 attn_context: AttentionContext | None = None) -> torch.Tensor:
        return plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceWriteAttnProcessor:
    """ReferenceNet self-attention (``attn1``) that records its input tokens under ``key`` in the bank.

    ``hidden_states``: ``(B, N, C)``, the block's normalised tokens (what the denoiser's ``attn1`` will see as
    extra keys/values). A key already present is left alone, so a recomputation under activation checkpointing
    does not replace the tensor the denoiser's graph holds.
    """

    def __init__(self, key: str):
        self.key = key

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 attn_context: AttentionContext | None = None) -> torch.Tensor:
        if attn_context is None:
            raise ValueError(f"ReferenceNet block {self.key!r} ran without an attn_context (call ReferenceNet.forward)")
        attn_context.reference_bank.setdefault(self.key, hidden_states)
        return plain_attention(attn, hidden_states, None, attention_mask)


class ReferenceReadAttnProcessor:
    """Denoiser self-attention (``attn1``) over the frame's tokens plus the sample's reference tokens (Fig. 2).

    Shapes: ``hidden_states`` ``(B * F, N, C)``; bank entry ``(B, M, C)``, shared by the ``F`` frames of a sample
    (its keys/values are projected once per sample, then broadcast over frames). With ``reference_keep[b] ==
    False`` the reference keys of sample ``b`` are masked out of the softmax, so the output equals attention
    without a reference.
    """

    def __init__(self, key: str):
        self.key = key

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 attn_context: AttentionContext | None = None) -> torch.Tensor:
        _check_plain(attn, hidden_states)
        if attention_mask is not None:
            raise ValueError("reference self-attention does not take a spatial attention_mask")
        if attn_context is None or self.key not in attn_context.reference_bank:
            raise ValueError(f"no reference tokens for denoiser block {self.key!r}: run the ReferenceNet first")
        ref = attn_context.reference_bank[self.key]
        bf, n, _ = hidden_states.shape
        nf = attn_context.num_frames
        b = ref.shape[0]
        if b * nf != bf:
            raise ValueError(f"reference batch {b} x {nf} frames does not match the denoiser batch {bf} ({self.key!r})")
        m = ref.shape[1]
        ref = ref.to(hidden_states.dtype)

        q = _heads(attn.to_q(hidden_states), attn.heads)
        # Reference keys/values once per sample, then broadcast over the sample's frames.
        k_ref = attn.to_k(ref)[:, None].expand(b, nf, m, -1).reshape(bf, m, -1)
        v_ref = attn.to_v(ref)[:, None].expand(b, nf, m, -1).reshape(bf, m, -1)
        k = _heads(torch.cat([attn.to_k(hidden_states), k_ref], dim=1), attn.heads)
        v = _heads(torch.cat([attn.to_v(hidden_states), v_ref], dim=1), attn.heads)

        mask = None
        keep = attn_context.reference_keep
        if keep is not None:
            keep = keep.to(device=hidden_states.device, dtype=torch.bool).repeat_interleave(nf)  # (B*F,)
            mask = torch.ones(bf, 1, 1, n + m, dtype=torch.bool, device=hidden_states.device)
            mask[:, 0, 0, n:] = keep[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
        return _project_out(attn, _merge_heads(out).to(q.dtype), hidden_states)


class AudioCrossAttnProcessor:
    """Audio cross-attention (denoiser ``attn2``) with Lips/Head Partial Attention (§3.2.2, §3.3).

    ``hidden_states`` ``(B * F, N, C)`` attend to the audio context ``encoder_hidden_states`` ``(B * F, K', D)``.
    By ``attn_context.audio_mode``:

    - ``"off"``: the branch is skipped and contributes zeros (audio muted; its parameters get no gradient);
    - ``"masked"``: the attention output (bias included) is multiplied by the region mask resized to this block's
      token grid, so audio acts only inside the lips / head / face region;
    - ``"global"``: no spatial mask (§3.2.2 Audio-Body Correlation).

    ``attn_context.audio_keep`` (``(B,)``) then zeroes the contribution of dropped samples (condition dropout).

    Args:
        gain: factor on the attention output before the block's residual add. The release multiplies by 3.0
            (``audio_feature_ratio`` in its ``mutual_self_attention.py``); 1.0 is plain cross-attention.
    """

    def __init__(self, gain: float = 1.0):
        self.gain = float(gain)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 attn_context: AttentionContext | None = None) -> torch.Tensor:
        mode = "global" if attn_context is None else attn_context.audio_mode
        if mode not in AUDIO_MODES:
            raise ValueError(f"audio_mode must be one of {AUDIO_MODES}, got {mode!r}")
        if mode == "off":
            return torch.zeros_like(hidden_states)
        if encoder_hidden_states is None:
            raise ValueError("audio cross-attention needs audio context tokens (encoder_hidden_states)")
        out = plain_attention(attn, hidden_states, encoder_hidden_states, attention_mask)
        if self.gain != 1.0:
            out = out * self.gain
        bf, n, _ = hidden_states.shape
        if mode == "masked":
            region = None if attn_context.audio_region is None else attn_context.audio_region.get(n)
            if region is None:
                raise ValueError(f"audio_mode='masked' but no region mask for a {n}-token grid (pass audio_mask)")
            out = out * region.to(out.dtype)
        keep = None if attn_context is None else attn_context.audio_keep
        if keep is not None:
            keep = keep.to(device=out.device, dtype=out.dtype).repeat_interleave(bf // keep.shape[0])
            out = out * keep[:, None, None]
        return out


def token_grids(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """The token grids of a UNet with ``levels`` resolutions at latent size ``(height, width)``.

    SD's downsamplers are stride-2 3x3 convs with padding 1, so each level is ``ceil`` of half the previous one.
    """
    grids = [(height, width)]
    for _ in range(levels - 1):
        h, w = grids[-1]
        grids.append(((h + 1) // 2, (w + 1) // 2))
    return grids


def region_tokens_by_length(mask: torch.Tensor, grids: list[tuple[int, int]]) -> dict[int, torch.Tensor]:
    """Resize a pixel-resolution region mask to every token grid of the UNet (§3.2.2 partial attention).

    Args:
        mask: ``(B, F, 1, H, W)`` in ``[0, 1]`` (lips / head / face region at pixel resolution).
        grids: token grids ``(h_l, w_l)``, e.g. from :func:`token_grids`.

    Returns:
        ``h_l * w_l`` -> ``(B * F, h_l * w_l, 1)``; adaptive max-pooling, so a region never vanishes.
    """
    if mask.ndim != 5 or mask.shape[2] != 1:
        raise ValueError(f"audio_mask must be (B, F, 1, H, W), got shape {tuple(mask.shape)}")
    flat = mask.flatten(0, 1).float()
    out: dict[int, torch.Tensor] = {}
    for h, w in grids:
        pooled = F.adaptive_max_pool2d(flat, (h, w))  # (B*F, 1, h, w)
        out.setdefault(h * w, pooled.flatten(2).transpose(1, 2))
    return out
