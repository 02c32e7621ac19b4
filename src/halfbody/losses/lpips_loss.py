"""Low-level loss ``L_low`` (EchoMimicV2 §3.5, Eq. 4): LPIPS between the one-step prediction and the target.

Uses the ``lpips`` package's ``LPIPS`` network. What the package ships and what it downloads:

- **shipped in the wheel**: the learned linear calibration layers, ``lpips/weights/v{0.0,0.1}/{alex,vgg,squeeze}.pth``;
- **downloaded** (through torchvision) when ``pnet_rand=False``: the ImageNet backbone. Nothing may download at run
  time here, so the network is always built with a random backbone (``pnet_rand=True``) and then

  - paper scale: the backbone weights are loaded from a local file named by a config key (default
    ``model.phd.lpips.backbone_path``): a torchvision ``alexnet`` / ``vgg16`` / ``squeezenet1_1`` state dict, e.g.
    ``torch.save(torchvision.models.alexnet(weights="IMAGENET1K_V1").state_dict(), "alexnet.pth")`` made once on a
    machine with network access, or the torchvision hub file itself (``alexnet-owt-7be5be79.pth``); ``.pth``/``.pt``
    are read with ``torch.load(weights_only=True)``, ``.safetensors`` with safetensors;
  - tiny preset (``stand_in=True``): the random backbone stays (seeded, so every rank builds the same one) and
    :meth:`LowLevelLoss.describe` says so.

  In both cases the linear layers come from the package (or ``linear_path``) and are loaded strictly (``lpips``
  itself loads them with ``strict=False``, which would silently skip them under a different layer naming).

The spatial LPIPS map is averaged over valid pixels only. Inputs smaller than ``min_size`` are upscaled first
(AlexNet's feature stack needs about 31 pixels).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from halfbody.losses.base import PixelLoss, composite_valid, masked_mean
from halfbody.models.pretrained import PretrainedNotFoundError

__all__ = ["LowLevelLoss", "load_state_dict_file", "lpips_linear_weights_path"]

_TV_NAMES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def lpips_linear_weights_path(net: str, version: str = "0.1") -> Path:
    """The calibrated linear layers that ship inside the ``lpips`` package."""
    import lpips

    return Path(lpips.__file__).resolve().parent / "weights" / f"v{version}" / f"{net}.pth"


def load_state_dict_file(path: str | os.PathLike | None, key: str, expected: str) -> dict[str, torch.Tensor]:
    """A tensor state dict from ``path`` (the value of config key ``key``): ``.safetensors`` or a torch pickle read
    with ``weights_only=True``. A ``{"state_dict": ...}`` wrapper is unwrapped. Errors name ``key``."""
    if not path:
        raise PretrainedNotFoundError(f"config key {key!r} is not set: expected {expected}")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise PretrainedNotFoundError(f"config key {key!r} points to {str(p)!r}, which is not a file: expected {expected}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the key
        raise ValueError(f"config key {key!r}: cannot read {str(p)!r} as a state dict ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and set(sd) == {"state_dict"}:
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"config key {key!r}: {str(p)!r} does not hold a flat tensor state dict: expected {expected}")
    return sd


class LowLevelLoss(PixelLoss):
    """``L_low = LPIPS(I_0^t, I_target)`` per frame (Eq. 4), frozen, differentiable w.r.t. the prediction.

    Args:
        net: LPIPS backbone: ``"alex"`` (default, the LPIPS paper's recommended loss), ``"vgg"`` or ``"squeeze"``.
        backbone_path: config key ``key``: local torchvision state dict of the backbone (see module docstring).
            Required unless ``stand_in``.
        stand_in: keep a random (seeded) backbone; for tiny presets only. Must not be combined with a path.
        key: the config key quoted in errors about ``backbone_path``.
        linear_path: config key ``linear_key``: LPIPS linear layers; ``None`` = the file shipped with ``lpips``.
        linear_key: the config key quoted in errors about ``linear_path``.
        version: LPIPS version of the shipped linear layers (``"0.1"``).
        min_size: inputs whose shorter side is below this are bilinearly upscaled to it first.
        seed: seed of the random backbone (stand-in) so all ranks build the same network.
    """

    def __init__(self, net: Literal["alex", "vgg", "squeeze"] = "alex", backbone_path: str | None = None,
                 stand_in: bool = False, key: str = "model.phd.lpips.backbone_path",
                 linear_path: str | None = None, linear_key: str = "model.phd.lpips.linear_path",
                 version: str = "0.1", min_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        import lpips

        if net not in _TV_NAMES:
            raise ValueError(f"LowLevelLoss net must be one of {sorted(_TV_NAMES)}, got {net!r}")
        if stand_in and backbone_path:
            raise ValueError(f"config key {key!r} is set ({backbone_path!r}) but stand_in=true asks for a random "
                             f"backbone: choose one")
        expected = (f"a torchvision {_TV_NAMES[net]} state dict file (.pth/.pt via torch.load(weights_only=True), or "
                    f".safetensors), e.g. torch.save(torchvision.models.{_TV_NAMES[net]}(weights='DEFAULT').state_dict()"
                    f", path); or set stand_in=true for a random backbone (tiny presets)")
        backbone_sd = None if stand_in else load_state_dict_file(backbone_path, key, expected)
        self.net_name, self.version, self.min_size = net, version, int(min_size)
        self.stand_in = bool(stand_in)
        self.backbone_source = "RANDOM backbone: stand-in" if stand_in else f"backbone from {backbone_path}"
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation, from inside lpips
            torch.manual_seed(seed)
            # pnet_rand=True: never lets torchvision download; pretrained=False: we load the linear layers below
            self.lpips = lpips.LPIPS(pretrained=False, net=net, version=version, lpips=True, spatial=True,
                                     pnet_rand=True, pnet_tune=False, use_dropout=False, eval_mode=True,
                                     verbose=False)
        if backbone_sd is not None:
            self._load_backbone(backbone_sd, key, str(backbone_path))
        linear_path = linear_path or None
        lin_file = lpips_linear_weights_path(net, version) if linear_path is None else linear_path
        self._load_linear(load_state_dict_file(lin_file, linear_key, f"LPIPS v{version} linear layers for {net} "
                                               f"(the lpips package ships weights/v{version}/{net}.pth)"), linear_key)
        self.linear_source = "lpips package" if linear_path is None else str(linear_path)
        self.freeze()

    def describe(self) -> str:
        return f"LPIPS({self.net_name} v{self.version}, {self.backbone_source}; linear layers from {self.linear_source})"

    def _load_backbone(self, sd: dict[str, torch.Tensor], key: str, path: str) -> None:
        """Copy a torchvision model's ``features.<i>.*`` (or bare ``<i>.*``, or lpips's own ``net.slice<k>.<i>.*``)
        tensors into the lpips backbone slices, requiring every backbone tensor with the right shape."""
        net = self.lpips.net
        mapped, missing, wrong = {}, [], []
        for name, param in net.state_dict().items():
            m = re.match(r"slice\d+\.(\d+)\.(.+)$", name)
            candidates = [f"features.{m.group(1)}.{m.group(2)}", f"{m.group(1)}.{m.group(2)}"] if m else []
            candidates += [f"net.{name}", name]
            src = next((c for c in candidates if c in sd), None)
            if src is None:
                missing.append(candidates[0])
            elif sd[src].shape != param.shape:
                wrong.append(f"{src}: {tuple(sd[src].shape)} vs {tuple(param.shape)}")
            else:
                mapped[name] = sd[src]
        if missing or wrong:
            detail = f"missing {missing[:3]}" if missing else f"shape mismatch {wrong[:3]}"
            raise ValueError(f"config key {key!r}: {path!r} is not a torchvision {_TV_NAMES[self.net_name]} state dict "
                             f"({detail}{' ...' if len(missing) + len(wrong) > 3 else ''})")
        net.load_state_dict(mapped, strict=True)

    def _load_linear(self, sd: dict[str, torch.Tensor], key: str) -> None:
        # the shipped files name the 1x1 convs lin<k>.model.1.weight (index 1: after a Dropout); ours have no Dropout
        own = {n: p for n, p in self.lpips.state_dict().items() if re.match(r"lin\d+\.", n)}  # (lins.<k> aliases them)
        renamed = {re.sub(r"^(lin\d+)\.model\.\d+\.", r"\1.model.0.", k): v for k, v in sd.items()
                   if re.match(r"lin\d+\.", k)}
        missing = sorted(set(own) - set(renamed))
        wrong = [n for n in own if n in renamed and renamed[n].shape != own[n].shape]
        if missing or wrong:
            raise ValueError(f"config key {key!r}: LPIPS linear layers for {self.net_name} do not fit "
                             f"(missing {missing[:3]}, shape mismatch {wrong[:3]})")
        self.lpips.load_state_dict({n: renamed[n] for n in own}, strict=False)

    def forward(self, pred_pixels: torch.Tensor, target_pixels: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per-frame loss ``(N,)`` float32: the spatial LPIPS map averaged over valid pixels."""
        self.check_inputs(pred_pixels, target_pixels, valid)
        pred = composite_valid(pred_pixels, target_pixels, valid)
        target = target_pixels.to(pred.dtype)
        h, w = pred.shape[-2:]
        if min(h, w) < self.min_size:
            scale = self.min_size / min(h, w)
            size = (max(self.min_size, round(h * scale)), max(self.min_size, round(w * scale)))
            pred = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)
            target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
            valid = None if valid is None else F.interpolate(valid.float(), size=size, mode="nearest")
        dist = self.lpips(pred, target)  # (N, 1, H, W): per-layer maps upsampled to the input size and summed
        return masked_mean(dist, valid)
