"""Audio Adapter of MirrorMe (§3.3, Eq. 4-7) with the Facial Region Constraint (§3.4).

Every ``k`` transformer blocks the video tokens of latent frame ``i`` cross-attend to that frame's audio tokens
(time is reshaped into the batch), a learnable padding token ``p`` is appended to the audio tokens (Eq. 4), and the
result enters through a LayerNorm scaled by a learnable ``gamma`` (Eq. 7):

    a_hat = a_loc (+) p                                            (Eq. 4)
    x_i  <- x_i + gamma * LayerNorm(CrossAttn(x_i W_q, a_hat W_k, a_hat W_v))      (Eq. 5-7)

Face mask (§3.4): query tokens outside the face mask may attend only to the padding token, so the audio cannot
change them (their update is the same constant for any audio); tokens inside attend to every audio token.

``temporal_alignment=False, padding_token=False, output_norm=False`` is Table 1's baseline: plain cross-attention of
every video token to the clip's raw audio feature tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AudioAdapter"]


class AudioAdapter(nn.Module):
    """Cross-attention from video tokens to audio tokens.

    Args:
        query_dim: transformer hidden size ``D``.
        audio_dim: width of the audio tokens (``C_a``, or the raw feature size for the baseline).
        heads, head_dim: attention heads.
        padding_token: append the learnable ``p`` of Eq. 4.
        output_norm: LayerNorm on the attention output (Eq. 7).
        gamma_init: initial ``gamma``; 0 leaves a pretrained transformer unchanged at the start of training.
    """

    def __init__(self, query_dim: int, audio_dim: int, heads: int = 8, head_dim: int = 64, padding_token: bool = True,
                 output_norm: bool = True, gamma_init: float = 0.0) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm_q = nn.LayerNorm(query_dim, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(query_dim, inner)
        self.to_k = nn.Linear(audio_dim, inner)
        self.to_v = nn.Linear(audio_dim, inner)
        self.to_out = nn.Linear(inner, query_dim)
        self.padding = nn.Parameter(torch.randn(1, 1, audio_dim) * audio_dim ** -0.5) if padding_token else None
        self.norm_out = nn.LayerNorm(query_dim, eps=1e-6) if output_norm else nn.Identity()
        self.gamma = nn.Parameter(torch.full((query_dim,), float(gamma_init)))

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor, face_mask: torch.Tensor | None = None,
                audio_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's residual update (the caller adds it).

        Args:
            hidden: ``(B, T, N, D)`` video tokens grouped by latent frame (``T = 1``: one group per clip).
            audio: ``(B, T, M, C_a)`` the audio tokens each group attends to.
            face_mask: ``(B, T, N)`` bool/float, 1 inside the face; ``None``: every token may hear the audio.
            audio_keep: ``(B,)``; 0 removes the audio tokens of that clip (CFG's unconditional branch): its tokens
                attend to the padding token only, or get no update without one.
        Returns:
            ``(B, T, N, D)``.
        """
        b, t, n, _ = hidden.shape
        if audio.shape[:2] != (b, t):
            raise ValueError(f"audio tokens {tuple(audio.shape)} do not match the video groups {(b, t)}")
        a = audio.to(hidden.dtype).flatten(0, 1)  # (B*T, M, C_a)
        m = a.shape[1]
        if self.padding is not None:  # Eq. 4
            a = torch.cat([a, self.padding.to(a.dtype).expand(a.shape[0], 1, -1)], dim=1)
        q = self.to_q(self.norm_q(hidden.flatten(0, 1))).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k = self.to_k(a).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        v = self.to_v(a).unflatten(-1, (self.heads, -1)).transpose(1, 2)

        hears = None  # (B*T, N) bool: may this query token attend to the audio tokens?
        if face_mask is not None:
            if face_mask.shape != (b, t, n):
                raise ValueError(f"face_mask must be {(b, t, n)}, got {tuple(face_mask.shape)}")
            hears = face_mask.flatten(0, 1) > 0.5
        if audio_keep is not None:
            keep = (torch.as_tensor(audio_keep, device=hidden.device) > 0.5).view(b, 1, 1).expand(b, t, n).flatten(0, 1)
            hears = keep if hears is None else hears & keep
        attn_mask = None
        if hears is not None and self.padding is not None:
            allowed = torch.ones(b * t, n, m + 1, dtype=torch.bool, device=hidden.device)
            allowed[:, :, :m] = hears[:, :, None]
            attn_mask = allowed[:, None]  # (B*T, 1, N, M+1); the padding key is always allowed
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B*T, heads, N, hd)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        out = self.gamma * self.norm_out(out)  # Eq. 7
        if hears is not None and self.padding is None:
            out = out * hears[..., None].to(out.dtype)
        return out.view(b, t, n, -1)
