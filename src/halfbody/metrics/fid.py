"""FID (Heusel et al. 2017): Fréchet distance between Inception-v3 pool features of generated and real frames.

The feature network is the *FID Inception*: the TensorFlow Inception graph of 2015-12-05 that the original FID code
uses, in the PyTorch port of ``pytorch-fid`` (weights file ``pt_inception-2015-12-05-6726825d.pth``, a torchvision
``Inception3`` state dict with 1008 classes). It differs from torchvision's ImageNet Inception-v3 in four blocks,
rebuilt here: the average pools of Mixed_5b-5d (A), 6b-6e (C) and 7b (E) do not count the padding, and Mixed_7c
uses a max pool in its pool branch. Input: RGB in ``[0, 1]``, resized to 299 x 299 (bilinear, ``protocol.fid_resize``)
and scaled to ``[-1, 1]``; output: the 2048-d global average pool.

The distance is :func:`halfbody.metrics.frechet.frechet_distance` on the float64 features: the statistics of
``torchmetrics.image.fid.FrechetInceptionDistance`` (the tests check the two agree with this network as torchmetrics'
custom feature extractor), with an exact low-rank trace term instead of a 2048 x 2048 eigenproblem when there are
fewer frames than features. torch-fidelity (which would download its own weights) is not needed. The weight file
comes from the local path ``metrics.fid.weights`` (``torch.load(weights_only=True)``); a missing file skips FID.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .frechet import frechet_distance
from .weights import load_into, load_weights

__all__ = ["FIDInceptionV3", "fid_network", "frechet_inception_distance", "inception_features"]

EXPECTED = "pytorch-fid's FID Inception state dict pt_inception-2015-12-05-6726825d.pth (torchvision Inception3 keys)"


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _fid_blocks():
    from torchvision.models import inception as tvi

    class BlockA(tvi.InceptionA):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b5 = self.branch5x5_2(self.branch5x5_1(x))
            b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([b1, b5, b3, self.branch_pool(_avg3(x))], 1)

    class BlockC(tvi.InceptionC):
        def forward(self, x):
            b1 = self.branch1x1(x)
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d = x
            for m in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
                d = m(d)
            return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1)

    class BlockE(tvi.InceptionE):
        def __init__(self, in_channels: int, max_pool: bool):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def forward(self, x):
            b1 = self.branch1x1(x)
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
            pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
            return torch.cat([b1, b3, d, self.branch_pool(pooled)], 1)

    return tvi, BlockA, BlockC, BlockE


class FIDInceptionV3(nn.Module):
    """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, 2048)`` pool3 features of the FID Inception graph."""

    num_features = 2048

    def __init__(self, resize: int = 299) -> None:
        super().__init__()
        tvi, BlockA, BlockC, BlockE = _fid_blocks()
        net = tvi.Inception3(num_classes=1008, aux_logits=False, init_weights=False, transform_input=False)
        net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = BlockA(192, 32), BlockA(256, 64), BlockA(288, 64)
        net.Mixed_6b, net.Mixed_6c = BlockC(768, 128), BlockC(768, 160)
        net.Mixed_6d, net.Mixed_6e = BlockC(768, 160), BlockC(768, 192)
        net.Mixed_7b, net.Mixed_7c = BlockE(1280, max_pool=False), BlockE(2048, max_pool=True)
        self.net = net
        self.resize = int(resize)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":  # torchmetrics may call .train(): stay in eval mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = F.interpolate(x.float(), size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def fid_network(weights: str | None, key: str = "metrics.fid.weights", resize: int = 299) -> FIDInceptionV3:
    """The FID Inception with its local weights (``MissingWeights`` naming ``key`` when the file is absent)."""
    sd = load_weights(weights, key, EXPECTED)
    with torch.device("meta"):  # no random initialisation: every tensor comes from the file
        net = FIDInceptionV3(resize)
    load_into(net.net, sd, key, str(weights), ignore=("num_batches_tracked", "AuxLogits."))
    return net.eval()


@torch.no_grad()
def inception_features(network: FIDInceptionV3, frames: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """``(N, 3, H, W)`` frames in ``[0, 1]`` -> float64 ``(N, 2048)`` features."""
    dev = next(network.parameters()).device
    out = [network(frames[i:i + batch_size].to(dev).float()).double().cpu() for i in range(0, frames.shape[0],
                                                                                          batch_size)]
    return torch.cat(out).numpy()


def frechet_inception_distance(network: FIDInceptionV3, real: list[torch.Tensor], fake: list[torch.Tensor],
                               batch_size: int = 16) -> float:
    """FID between two frame sets (lists of ``(N, 3, H, W)`` chunks in ``[0, 1]``)."""
    fr = np.concatenate([inception_features(network, c, batch_size) for c in real])
    ff = np.concatenate([inception_features(network, c, batch_size) for c in fake])
    return frechet_distance(fr, ff)
