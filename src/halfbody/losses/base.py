"""Shared contract of the PhD pixel-space loss terms (EchoMimicV2 §3.5, Eq. 2-4).

Every term is a frozen ``nn.Module`` with

    forward(pred_pixels, target_pixels, valid=None) -> per-frame loss (N,)

``pred_pixels`` / ``target_pixels``: ``(N, 3, H, W)`` in ``[-1, 1]`` with ``N = B * F`` frames; ``valid``: optional
``(N, 1, H, W)`` mask, 0 on padding (HPA, letterbox). :func:`per_clip` turns ``(B * F,)`` into ``(B,)``.

Padding is excluded in two steps, so that a prediction that differs from the target *only* in padding gives exactly
zero loss (and no gradient there): (1) the prediction is replaced by the target wherever ``valid == 0``, which also
stops padding from leaking into neighbouring pixels through filter / receptive-field overlap; (2) terms with a
pixel-resolution error map average it over valid pixels only.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PixelLoss", "per_clip", "composite_valid", "masked_mean"]


def per_clip(frame_loss: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Mean over each clip's frames: ``(B * F,)`` -> ``(B,)``."""
    if frame_loss.ndim != 1 or num_frames < 1 or frame_loss.shape[0] % num_frames:
        raise ValueError(f"per_clip needs a (B*F,) loss with F={num_frames}, got shape {tuple(frame_loss.shape)}")
    return frame_loss.view(-1, num_frames).mean(dim=1)


def composite_valid(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The prediction inside the valid region, the target in padding (``valid`` broadcast over channels)."""
    if valid is None:
        return pred
    return torch.where(valid.to(pred.device) > 0.5, pred, target.to(pred.dtype))


def masked_mean(err: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Per-frame mean of an error map ``(N, C, H, W)`` over channels and valid pixels -> ``(N,)`` float32.

    A frame without any valid pixel gives 0.
    """
    err = err.float().mean(dim=1, keepdim=True)
    if valid is None:
        return err.mean(dim=(1, 2, 3))
    w = (valid.to(err.device) > 0.5).float()
    if w.shape[-2:] != err.shape[-2:]:
        raise ValueError(f"valid mask {tuple(valid.shape)} does not match the error map {tuple(err.shape)}")
    return (err * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3)).clamp_min(1.0)


class PixelLoss(nn.Module):
    """Base of the frozen pixel-space loss terms: always in eval mode, no gradients into its own parameters.

    Attributes:
        stand_in: True when the term uses random weights in place of a pretrained network (tiny presets); its
            value then only exercises the training path and says nothing about pose / perceptual quality.
    """

    stand_in: bool = False

    def freeze(self) -> "PixelLoss":
        for p in self.parameters():  # parameters() also reaches into TorchScript / exported submodules
            p.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "PixelLoss":
        # a parent's .train() (Lightning calls it at every fit start) must not turn on dropout / batch-norm updates
        return super().train(False)

    def describe(self) -> str:
        """One line for the training logs, naming stand-ins as such."""
        return type(self).__name__

    @staticmethod
    def check_inputs(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> None:
        if pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(f"pred_pixels must be (N, 3, H, W), got shape {tuple(pred.shape)}")
        if target.shape != pred.shape:
            raise ValueError(f"target_pixels {tuple(target.shape)} must match pred_pixels {tuple(pred.shape)}")
        if valid is not None and (valid.ndim != 4 or valid.shape[1] != 1 or valid.shape[0] != pred.shape[0]
                                  or valid.shape[-2:] != pred.shape[-2:]):
            raise ValueError(f"valid must be (N, 1, H, W) = ({pred.shape[0]}, 1, {pred.shape[2]}, {pred.shape[3]}), "
                             f"got shape {tuple(valid.shape)}")
