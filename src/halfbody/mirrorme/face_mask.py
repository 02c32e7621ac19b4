"""Face masks at latent resolution (MirrorMe §3.4 Facial Region Constraint, Eq. 8 ``M_face``).

Training uses a *dynamic* mask: each latent frame's mask is the union of its video frames' face masks (the
datamodule's ``mask_face``, from each frame's face keypoints, enlarged by ``data.condition.mask_margins.face``),
max-pooled to the latent grid so a face never vanishes. Inference uses an *enlarged static* mask: the box around
every frame's face, scaled about its centre by ``enlarge``, the same for all frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from halfbody.mirrorme.causal_audio_encoder import causal_frame_groups

__all__ = ["latent_face_mask", "static_face_mask", "to_latent_grid"]


def to_latent_grid(mask: torch.Tensor, spatial_factor: int, temporal_factor: int, reduce: str = "max") -> torch.Tensor:
    """``(B, F, 1, H, W)`` pixel mask -> ``(B, F', H/s, W/s)`` over the causal VAE's cells (frame groups x s x s),
    by ``max`` (a region never vanishes) or ``mean`` (the covered fraction, e.g. of valid pixels)."""
    if mask.ndim != 5 or mask.shape[2] != 1:
        raise ValueError(f"mask must be (B, F, 1, H, W), got shape {tuple(mask.shape)}")
    b, f, _, h, w = mask.shape
    s = int(spatial_factor)
    if h % s or w % s:
        raise ValueError(f"mask {h}x{w} is not divisible by the spatial factor {s}")
    pool = F.max_pool2d if reduce == "max" else F.avg_pool2d
    pooled = pool(mask.flatten(0, 1).float(), kernel_size=s).view(b, f, h // s, w // s)
    groups = causal_frame_groups(f, temporal_factor)
    if reduce == "max":
        return torch.stack([pooled[:, g.start:g.stop].amax(dim=1) for g in groups], dim=1)
    return torch.stack([pooled[:, g.start:g.stop].mean(dim=1) for g in groups], dim=1)


def latent_face_mask(mask: torch.Tensor, spatial_factor: int, temporal_factor: int) -> torch.Tensor:
    """The dynamic face mask: ``(B, F, 1, H, W)`` -> ``(B, F', H/s, W/s)`` in ``{0, 1}`` (any face pixel in a cell)."""
    return to_latent_grid(mask, spatial_factor, temporal_factor, "max")


def static_face_mask(mask: torch.Tensor, enlarge: float = 1.5) -> torch.Tensor:
    """``(B, F, 1, H, W)`` per-frame masks -> the same shape, every frame the enlarged box around all of them.

    A clip without any face pixels gets an empty mask.
    """
    if mask.ndim != 5 or mask.shape[2] != 1:
        raise ValueError(f"face mask must be (B, F, 1, H, W), got shape {tuple(mask.shape)}")
    if not enlarge >= 1.0:
        raise ValueError(f"enlarge={enlarge!r} must be >= 1 (an enlarged static mask)")
    b, f, _, h, w = mask.shape
    union = mask.amax(dim=(1, 2)) > 0.5  # (B, H, W)
    out = torch.zeros(b, h, w, dtype=mask.dtype, device=mask.device)
    for i in range(b):
        ys, xs = torch.nonzero(union[i], as_tuple=True)
        if ys.numel() == 0:
            continue
        y0, y1 = ys.min().item(), ys.max().item() + 1
        x0, x1 = xs.min().item(), xs.max().item() + 1
        cy, cx, hh, hw = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) * enlarge / 2, (x1 - x0) * enlarge / 2
        out[i, max(0, round(cy - hh)):min(h, round(cy + hh)), max(0, round(cx - hw)):min(w, round(cx + hw))] = 1
    return out[:, None, None].expand(b, f, 1, h, w).contiguous()
