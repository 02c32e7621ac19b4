"""Detail-dominant loss ``L_detail`` (EchoMimicV2 §3.5, Eq. 3): MSE between fixed Sobel edge maps.

The paper uses "the differentiable operators in Canny ... only the fixed Sobel kernels" on the one-step prediction
``I_0^t`` and the target. Choices made here (configurable):

- **Per channel** (``channels="rgb"``, default): edges of R, G and B separately, so colour edges of equal luminance
  count too; ``channels="luma"`` applies the kernels to BT.601 luminance instead.
- **x and y gradients** (``mode="xy"``, default) compared directly. ``mode="magnitude"`` compares
  ``sqrt(gx^2 + gy^2 + eps)`` (orientation-blind; its gradient is ill-conditioned at flat regions, hence not default).
- **Raw Sobel kernels** ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` (``normalize=False``, as in Canny); ``normalize=True``
  divides by 8 so a unit step gives a unit response.
- **Replicate padding**: image borders make no artificial edges, so a constant brightness shift leaves the edge maps
  (and the loss) unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from halfbody.losses.base import PixelLoss, composite_valid, masked_mean

__all__ = ["DetailLoss", "sobel_edges"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def _sobel_kernels() -> torch.Tensor:
    """``(2, 1, 3, 3)``: d/dx, d/dy (x to the right, y downwards)."""
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return torch.stack([gx, gx.t()]).unsqueeze(1)


def sobel_edges(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, 2C, H, W)``: per-channel (x, y) Sobel responses, replicate padding."""
    c = images.shape[1]
    weight = kernels.to(images.device, images.dtype).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3), grouped per channel
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), weight, groups=c)


class DetailLoss(PixelLoss):
    """``L_detail = MSE(Sobel(I_0^t), Sobel(I_target))`` per frame (Eq. 3), over valid pixels.

    Args:
        channels: ``"rgb"`` (per channel) or ``"luma"`` (BT.601 luminance).
        mode: ``"xy"`` (compare the x and y gradient maps) or ``"magnitude"`` (compare gradient magnitudes).
        normalize: divide the kernels by 8.
        eps: added under the square root in ``"magnitude"`` mode.
    """

    def __init__(self, channels: Literal["rgb", "luma"] = "rgb", mode: Literal["xy", "magnitude"] = "xy",
                 normalize: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        if channels not in ("rgb", "luma"):
            raise ValueError(f"DetailLoss channels must be 'rgb' or 'luma', got {channels!r}")
        if mode not in ("xy", "magnitude"):
            raise ValueError(f"DetailLoss mode must be 'xy' or 'magnitude', got {mode!r}")
        self.channels, self.mode, self.normalize, self.eps = channels, mode, bool(normalize), float(eps)
        kernels = _sobel_kernels() / (8.0 if normalize else 1.0)
        # fixed, non-trainable, not saved (they are constants of the definition)
        self.register_buffer("kernels", kernels, persistent=False)
        self.register_buffer("luma", torch.tensor(_LUMA).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def describe(self) -> str:
        return (f"DetailLoss(Sobel {self.mode} on {self.channels}{', /8' if self.normalize else ''}, "
                f"replicate padding)")

    def edges(self, images: torch.Tensor) -> torch.Tensor:
        """Edge maps of ``(N, 3, H, W)`` images: ``(N, 2C, H, W)`` (``xy``) or ``(N, C, H, W)`` (``magnitude``)."""
        x = images.float()
        if self.channels == "luma":
            x = (x * self.luma).sum(dim=1, keepdim=True)
        g = sobel_edges(x, self.kernels)
        if self.mode == "magnitude":
            g = (g[:, 0::2].square() + g[:, 1::2].square() + self.eps).sqrt()
        return g

    def forward(self, pred_pixels: torch.Tensor, target_pixels: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame loss ``(N,)`` float32."""
        self.check_inputs(pred_pixels, target_pixels, valid)
        pred = composite_valid(pred_pixels, target_pixels, valid)
        err = (self.edges(pred) - self.edges(target_pixels)).square()
        return masked_mean(err, valid)
