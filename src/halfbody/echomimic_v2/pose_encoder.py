"""EchoMimicV2's Pose Encoder ``E_P`` (paper §3.1, §3.2.1, Figure 2) and where it enters the denoising UNet.

The encoder itself is shared (:class:`halfbody.models.pose_encoder.PoseEncoder`); its output is added to the
denoiser's features right after ``conv_in`` (:class:`PoseConditionedConvIn`).
"""

from __future__ import annotations

import torch
from torch import nn

from halfbody.models.pose_encoder import PoseEncoder

__all__ = ["PoseEncoder", "PoseConditionedConvIn"]


class PoseConditionedConvIn(nn.Module):
    """The UNet's ``conv_in`` plus a pose residual: ``conv(x) + residual``.

    The residual ``(N, C0, h, w)`` is set by the denoiser right before its UNet call and cleared right after
    (in ``DenoisingUNet.forward``, inside ``try/finally``); the UNet calls ``conv_in(sample)`` with no other arguments.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._residual: torch.Tensor | None = None

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        x = self.conv(sample)
        if self._residual is not None:
            if self._residual.shape != x.shape:
                raise ValueError(f"pose features {tuple(self._residual.shape)} do not match conv_in output "
                                 f"{tuple(x.shape)}: check latent_factor and the pose map size")
            x = x + self._residual.to(x.dtype)
        return x
