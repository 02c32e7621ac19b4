"""Tiny random stand-ins for the evaluation networks' weight files, saved in each real file format (a plain state
dict with the published key names and shapes), so tests load them back through the real loading code.

They prove the loading path, the shapes, the pre-processing and the arithmetic around the networks; they do not
prove that a random network's numbers mean anything (docs/EVALUATION.md, "What the tests prove").
"""

from __future__ import annotations

from pathlib import Path

import torch


def random_state_dict(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fan-in-scaled Gaussian weights, unit BatchNorm statistics, zero biases: a network whose activations neither
    vanish nor explode, for every tensor of ``module`` (which may live on the meta device)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if not v.dtype.is_floating_point:
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
        elif k.endswith("running_var") or (v.ndim == 1 and k.endswith("weight")):
            out[k] = torch.ones(v.shape)
        elif k.endswith("running_mean") or k.endswith("bias"):
            out[k] = torch.zeros(v.shape)
        else:
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / max(1, v[0].numel())) ** 0.5
    return out


def save_metric_weights(folder: Path, which=("fid", "fvd", "lpips", "sync", "csim"),
                        csim_layers=(1, 1, 1, 1)) -> dict[str, str]:
    """Write the stand-ins into ``folder``; returns the ``metrics.*`` overrides that point at them. (The ArcFace
    stand-in has 64-d embeddings: the file's ``fc`` shape sets the width.)"""
    import torchvision

    from halfbody.metrics.csim import IResNet
    from halfbody.metrics.fid import FIDInceptionV3
    from halfbody.metrics.fvd import InceptionI3d
    from halfbody.metrics.sync import SyncNet

    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    with torch.device("meta"):
        nets = {"fid": (FIDInceptionV3().net, "pt_inception-2015-12-05-6726825d.pth", "metrics.fid.weights"),
                "fvd": (InceptionI3d(), "rgb_imagenet.pt", "metrics.fvd.weights"),
                # LPIPS reads only AlexNet's convolutional ``features.*`` (the classifier is 58 M unused parameters)
                "lpips": (torchvision.models.alexnet().features, "alexnet.pth", "metrics.lpips.backbone_path"),
                "sync": (SyncNet(), "syncnet_v2.model", "metrics.sync.weights"),
                "csim": (IResNet(csim_layers, num_features=64), "backbone.pth", "metrics.csim.weights")}
    for i, name in enumerate(which):
        module, filename, key = nets[name]
        path = folder / filename
        if not path.exists():
            sd = random_state_dict(module, seed=i)
            if name == "lpips":
                sd = {f"features.{k}": v for k, v in sd.items()}
            torch.save(sd, path)
        files[key] = str(path)
    overrides = {k: v for k, v in files.items()}
    if "csim" in which:
        overrides["metrics.csim.layers"] = "[" + ",".join(str(v) for v in csim_layers) + "]"
    return overrides
