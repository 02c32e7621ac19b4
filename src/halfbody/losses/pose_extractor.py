"""Pose-dominant loss ``L_pose`` (EchoMimicV2 §3.5, Eq. 2) and its pluggable pose extractor ``B_P``.

``L_pose = MSE(M_0^t, M_target)``, where ``M`` are the keypoint maps that a pose extractor ``B_P`` gives for the
decoded one-step prediction ``I_0^t`` and for the target frame. The loss needs gradients through ``B_P`` with respect
to its input, so ``B_P`` must be a differentiable torch module (DWPose as distributed for inference is an ONNX
model, which is not; export a torch pose network instead, see :class:`ExportedPoseExtractor`).

Extractor contract (:class:`PoseExtractor`): ``forward(pixels (N, 3, H, W) in [-1, 1]) -> (N, J, *)``: heatmaps
``(N, J, h, w)``, or SimCC-style per-axis logits concatenated to ``(N, J, Lx + Ly)``. Frozen, eval mode.
"""

from __future__ import annotations

import abc

import os
import warnings
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from halfbody.losses.base import PixelLoss, composite_valid
from halfbody.models.pretrained import PretrainedNotFoundError

__all__ = ["PoseExtractor", "RandomConvPoseExtractor", "ExportedPoseExtractor", "TorchScriptPoseExtractor", "PoseLoss"]


class PoseExtractor(PixelLoss, metaclass=abc.ABCMeta):
    """Interface of ``B_P``: pixels ``(N, 3, H, W)`` in ``[-1, 1]`` -> keypoint maps ``(N, J, *)``.

    Shares :class:`PixelLoss`'s frozen / always-eval behaviour and ``stand_in`` / ``describe()`` labelling.
    """

    num_keypoints: int

    @abc.abstractmethod
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in ``[-1, 1]`` -> keypoint maps ``(N, J, *)``."""


class RandomConvPoseExtractor(PoseExtractor):
    """Stand-in ``B_P`` for tiny presets: a random-weight (seeded) conv stack giving ``J`` sigmoid heatmaps at 1/4
    resolution. Differentiable, so the loss path trains end to end, but its maps encode no pose.

    Args:
        num_keypoints: ``J``.
        width: hidden channels.
        seed: weight seed, so every rank builds the same extractor.
    """

    stand_in = True

    def __init__(self, num_keypoints: int = 17, width: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.num_keypoints = int(num_keypoints)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width, self.num_keypoints, 1),
            )
        self.freeze()

    def describe(self) -> str:
        return f"RandomConvPoseExtractor(J={self.num_keypoints}, RANDOM weights: stand-in)"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(pixels))


class ExportedPoseExtractor(PoseExtractor):
    """Paper-scale ``B_P``: a user-exported pose network loaded from a local file.

    Two formats, told apart by the suffix:

    - ``.pt2``: ``torch.export`` (``torch.export.save(torch.export.export(model.eval(), (example,),
      dynamic_shapes=({0: torch.export.Dim("n")},)), "pose.pt2")``), loaded with ``torch.export.load(...).module()``;
      the batch dimension must be exported as dynamic. Exported graphs are fixed in eval mode.
    - anything else (``.pt``): TorchScript (``torch.jit.trace(model.eval(), example).save("pose.pt")``), loaded with
      ``torch.jit.load``. TorchScript is deprecated in recent torch releases, so prefer ``.pt2``.

    Export e.g. an mmpose RTMPose / DWPose-l top-down model or any heatmap network; the graph must stay
    differentiable (no argmax / keypoint decoding inside: export the heatmap or SimCC head outputs).

    Args:
        path: config key ``key``: the ``.pt2`` / ``.pt`` file.
        key: the config key quoted in errors.
        input_size: ``(H, W)`` the network expects; inputs are bilinearly resized to it (``None``: as given).
        input_range: what the network expects: ``"minus_one_one"``, ``"zero_one"`` or ``"zero_255"``.
        mean, std: per-channel normalisation applied after the range conversion (e.g. mmpose's ImageNet values
            ``[123.675, 116.28, 103.53]`` / ``[58.395, 57.12, 57.375]`` with ``"zero_255"``).
        bgr: feed channels in BGR order.
        output_index: pick this element when the network returns a tuple / list; ``None`` concatenates
            ``(N, J, L)`` outputs (SimCC x and y) along the last axis, or takes the only element.
    """

    def __init__(self, path: str | os.PathLike | None, key: str = "model.phd.pose.extractor_path",
                 input_size: Sequence[int] | None = None,
                 input_range: Literal["minus_one_one", "zero_one", "zero_255"] = "minus_one_one",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, bgr: bool = False,
                 output_index: int | None = None) -> None:
        super().__init__()
        expected = ("a pose network file, torch.export (.pt2) or TorchScript (.pt), mapping (N, 3, H, W) pixels to "
                    "(N, J, ...) keypoint maps")
        if not path:
            raise PretrainedNotFoundError(f"config key {key!r} is not set: expected {expected}")
        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise PretrainedNotFoundError(f"config key {key!r} points to {str(p)!r}, which is not a file: "
                                          f"expected {expected}")
        if input_range not in ("minus_one_one", "zero_one", "zero_255"):
            raise ValueError(f"input_range must be minus_one_one, zero_one or zero_255, got {input_range!r}")
        self.exported = p.suffix == ".pt2"
        loader = "torch.export.load" if self.exported else "torch.jit.load"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.net = torch.export.load(str(p)).module() if self.exported else torch.jit.load(str(p), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - re-raised with the key
            raise ValueError(f"config key {key!r}: cannot load {str(p)!r} with {loader} "
                             f"({type(e).__name__}: {e}): expected {expected}") from e
        self.key, self.path = key, str(p)
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.input_range, self.bgr, self.output_index = input_range, bool(bgr), output_index
        if (mean is None) != (std is None):
            raise ValueError("ExportedPoseExtractor: give both mean and std, or neither")
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.num_keypoints = -1  # known after the first forward
        self.freeze()

    def describe(self) -> str:
        return f"ExportedPoseExtractor({'torch.export' if self.exported else 'TorchScript'}: {self.path})"

    def train(self, mode: bool = True) -> "ExportedPoseExtractor":
        # exported graphs are frozen in eval mode and refuse .train()/.eval(); TorchScript modules accept eval
        self.training = False
        if not self.exported:
            self.net.train(False)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        if self.input_range == "zero_one":
            x = (x + 1.0) * 0.5
        elif self.input_range == "zero_255":
            x = (x + 1.0) * 127.5
        if self.bgr:
            x = x.flip(1)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        out = self.net(x)
        if isinstance(out, (tuple, list)):
            if self.output_index is not None:
                out = out[self.output_index]
            elif len(out) == 1:
                out = out[0]
            elif all(isinstance(o, torch.Tensor) and o.ndim == 3 for o in out):
                out = torch.cat(list(out), dim=-1)  # SimCC: (N, J, Lx) + (N, J, Ly)
            else:
                raise ValueError(f"config key {self.key!r}: {self.path!r} returned {len(out)} outputs; set "
                                 f"output_index to pick the keypoint maps")
        if not isinstance(out, torch.Tensor) or out.ndim < 3 or out.shape[0] != pixels.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"config key {self.key!r}: {self.path!r} must return (N, J, ...) keypoint maps for "
                             f"N={pixels.shape[0]}, got {shape}")
        self.num_keypoints = int(out.shape[1])
        return out


class PoseLoss(PixelLoss):
    """``L_pose = MSE(B_P(I_0^t), B_P(I_target))`` per frame (Eq. 2).

    The target maps are computed without gradients. Padding: the prediction is replaced by the target where
    ``valid == 0`` before extraction, so padding contributes nothing; the map MSE is then a plain mean (keypoint maps
    need not share the pixel grid).

    Args:
        extractor: the frozen pose extractor ``B_P``.
    """

    def __init__(self, extractor: PoseExtractor) -> None:
        super().__init__()
        if not isinstance(extractor, nn.Module):
            raise TypeError(f"PoseLoss needs a PoseExtractor module, got {type(extractor).__name__}")
        self.extractor = extractor
        self.stand_in = bool(getattr(extractor, "stand_in", False))
        self.freeze()

    def describe(self) -> str:
        inner = self.extractor.describe() if hasattr(self.extractor, "describe") else type(self.extractor).__name__
        return f"PoseLoss({inner})"

    def forward(self, pred_pixels: torch.Tensor, target_pixels: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame loss ``(N,)`` float32."""
        self.check_inputs(pred_pixels, target_pixels, valid)
        pred = composite_valid(pred_pixels, target_pixels, valid)
        with torch.no_grad():
            m_target = self.extractor(target_pixels.to(pred.dtype))
        m_pred = self.extractor(pred)
        if m_pred.shape != m_target.shape:
            raise ValueError(f"pose maps of prediction {tuple(m_pred.shape)} and target {tuple(m_target.shape)} differ")
        return (m_pred.float() - m_target.float()).square().flatten(1).mean(dim=1)


#: The name used in the design notes; the class loads TorchScript and ``torch.export`` files alike.
TorchScriptPoseExtractor = ExportedPoseExtractor
