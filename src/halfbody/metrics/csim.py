"""CSIM: identity consistency, the cosine similarity between ArcFace embeddings of the reference image's face and
of the generated frames' faces (EchoMimicV2 §4.1, MirrorMe §4.1; ArcFace: Deng et al. 2019).

- **Network.** insightface's ``arcface_torch`` IResNet (``backbone.pth`` of e.g. ``ms1mv3_arcface_r100_fp16``; keys
  ``conv1.weight``, ``bn1.*``, ``prelu.weight``, ``layer1.0.bn1.*`` ... ``bn2.*``, ``fc.*``, ``features.*``), rebuilt
  here; the depth is ``metrics.csim.layers`` (IResNet-100: ``[3, 13, 30, 3]``, -50: ``[3, 4, 14, 3]``).
- **Faces.** Each face is aligned to ArcFace's 112 x 112 five-point template from its keypoints
  (:func:`halfbody.metrics.face.align_arcface`), RGB scaled to ``[-1, 1]``.
- **Score.** Per video, the mean over its frames of ``cos(e_ref, e_frame)``; then the mean over videos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_into, load_weights

__all__ = ["IResNet", "csim_network", "face_embeddings"]

EXPECTED = "insightface arcface_torch IResNet backbone.pth (state dict)"


class IBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """``(N, 3, 112, 112)`` in ``[-1, 1]`` -> ``(N, num_features)`` identity embeddings."""

    def __init__(self, layers=(3, 13, 30, 3), num_features: int = 512) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
        mods = [IBasicBlock(self.inplanes, planes, 2, down)]
        self.inplanes = planes
        mods += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.bn2(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.features(self.fc(x.flatten(1)))


def csim_network(weights: str | None, layers=(3, 13, 30, 3), key: str = "metrics.csim.weights") -> IResNet:
    sd = load_weights(weights, key, EXPECTED)
    with torch.device("meta"):
        net = IResNet(tuple(int(v) for v in layers), int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 512)
    return load_into(net, sd, key, str(weights)).eval()


@torch.no_grad()
def face_embeddings(network: IResNet, faces: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Aligned faces ``(N, 3, 112, 112)`` in ``[0, 1]`` -> L2-normalised embeddings ``(N, D)``."""
    dev = next(network.parameters()).device
    out = [network(faces[i:i + batch_size].to(dev).float() * 2 - 1).cpu() for i in range(0, faces.shape[0], batch_size)]
    return F.normalize(torch.cat(out).double(), dim=1)
