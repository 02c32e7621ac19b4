"""Sampling one job with the family's own pipeline (through the module's ``generate_video``), with a progress bar
over the network passes and bf16 autocast on GPU."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch

from halfbody.generation.conditions import Conditions, condition_tensors
from halfbody.generation.model import Settings, autocast

__all__ = ["sample", "progress_bar", "to_uint8_frames"]


@contextlib.contextmanager
def progress_bar(network: torch.nn.Module, total: int, desc: str, enabled: bool) -> Iterator[None]:
    """A bar over the network evaluations (the family's ``pipeline.network_passes``: context windows x steps, clips x
    steps; the CFG branches run as one batch). Counted on the host by a forward hook that touches no tensor, so it
    never waits for the device (no synchronisation inside the sampling loop)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    # every pass is shown (a pass takes far longer than drawing the bar)
    bar = tqdm(total=total, desc=desc, unit="pass", leave=False, dynamic_ncols=True, mininterval=0, miniters=1)

    def count(*_: Any) -> None:  # returns None: a forward hook's return value would replace the output
        bar.update(1)

    handle = network.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()
        bar.close()


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``(F, 3, H, W)`` in ``[-1, 1]`` -> uint8 ``(F, H, W, 3)`` on the host (one read-back, after sampling)."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def sample(model: torch.nn.Module, c: Conditions, s: Settings, device: torch.device, bf16: bool = False,
           progress: bool = True, desc: str = "") -> np.ndarray:
    """The family's own sampling of ``c.num_frames`` frames (any length): uint8 ``(F, H, W, 3)``."""
    g = torch.Generator(device=device).manual_seed(s.seed)
    conditions = condition_tensors(c, s, device)
    steps = int(s.steps or model.hparams.num_inference_steps)
    passes = model.pipeline.network_passes(c.num_frames, steps, **s.long_video)
    with autocast(model, device, bf16), progress_bar(model.network, passes, desc or "sampling", progress):
        video = model.generate_video(conditions, c.num_frames, **s.long_video, num_inference_steps=steps,
                                     guidance_scale=s.guidance_scale, generator=g)
    return to_uint8_frames(video[0])
