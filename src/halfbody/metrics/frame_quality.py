"""Per-frame reconstruction metrics between a generated frame and its ground-truth frame: SSIM, PSNR, LPIPS.

The low-level visual-quality group of EchoMimicV2 §4.1 / MirrorMe §4.1 ("FID, FVD, SSIM and PSNR ... evaluate the
low-level visual quality"), with the established implementations:

- **SSIM** (Wang et al. 2004, the paper's [35]): ``torchmetrics.functional.structural_similarity_index_measure``,
  Gaussian window 11 / sigma 1.5, on RGB in ``[0, 1]`` (``data_range=1``), averaged over channels and pixels.
- **PSNR** (the paper's [15]): ``10 log10(data_range^2 / MSE)`` per frame over all pixels and channels; identical
  frames (MSE 0) score the protocol's cap (``protocol.psnr_cap``) instead of infinity, so a mean stays finite.
- **LPIPS** (Zhang et al. 2018), AlexNet v0.1 with the learned linear layers shipped in the ``lpips`` package and the
  AlexNet backbone from a local torchvision state dict (``metrics.lpips.backbone_path``); the same network as the
  PhD loss's ``L_low`` (:class:`halfbody.losses.lpips_loss.LowLevelLoss`).

Frames are float tensors ``(N, 3, H, W)`` in ``[0, 1]``; every function returns ``(N,)`` float64 per-frame values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .weights import MissingWeights

__all__ = ["LPIPSMetric", "psnr", "ssim"]


def _check(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.ndim != 4 or pred.shape[1] != 3 or pred.shape != target.shape:
        raise ValueError(f"frames must be two (N, 3, H, W) tensors of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")


def ssim(pred: torch.Tensor, target: torch.Tensor, kernel_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM ``(N,)`` in ``[-1, 1]`` (1: identical)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check(pred, target)
    out = structural_similarity_index_measure(pred.float(), target.float(), gaussian_kernel=True, sigma=sigma,
                                              kernel_size=kernel_size, reduction="none", data_range=1.0)
    return out.double().reshape(-1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, cap: float = 100.0) -> torch.Tensor:
    """Per-frame PSNR ``(N,)`` in dB, at most ``cap`` (identical frames score exactly ``cap``)."""
    _check(pred, target)
    mse = (pred.double() - target.double()).square().flatten(1).mean(1)
    value = 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-300))
    return torch.where(mse > 0, value.clamp(max=cap), torch.full_like(value, cap))


class LPIPSMetric(torch.nn.Module):
    """LPIPS distance per frame ``(N,)`` (0: identical), from local weights.

    Args:
        backbone_path: ``metrics.lpips.backbone_path``: a torchvision AlexNet (VGG16 / SqueezeNet 1.1 for the other
            ``net``) state dict. Missing -> :class:`MissingWeights` naming ``key``.
    """

    def __init__(self, backbone_path: str | None, net: str = "alex", key: str = "metrics.lpips.backbone_path") -> None:
        super().__init__()
        from halfbody.losses.lpips_loss import LowLevelLoss
        from halfbody.models.pretrained import PretrainedNotFoundError

        if not backbone_path or not Path(os.path.expanduser(str(backbone_path))).is_file():
            raise MissingWeights(f"{key}={str(backbone_path)!r} not found (expected a torchvision {net} state dict; "
                                 "nothing is downloaded)")
        try:
            self.net = LowLevelLoss(net=net, backbone_path=backbone_path, key=key)  # type: ignore[arg-type]
        except PretrainedNotFoundError as e:
            raise MissingWeights(str(e)) from None
        self.eval()

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check(pred, target)
        dev = next(self.net.parameters()).device
        return self.net(pred.to(dev).float() * 2 - 1, target.to(dev).float() * 2 - 1).double().cpu().reshape(-1)
