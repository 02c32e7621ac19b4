"""Sync-C and Sync-D (Chung & Zisserman 2016, "Out of time: automated lip sync in the wild"; EchoMimicV2 §4.1 [25],
MirrorMe §4.1 [26]) with the SyncNet of ``joonson/syncnet_python``.

- **Network.** syncnet_python's ``SyncNetModel.S`` (weights ``data/syncnet_v2.model``, a state dict: ``netcnnaud.*``,
  ``netfcaud.*``, ``netcnnlip.*``, ``netfclip.*``), rebuilt here layer for layer: a 2D CNN on 13 x 20 MFCC windows
  (0.2 s) and a 3D CNN on 5 face crops of 224 x 224 (BGR, 0-255, as syncnet_python feeds cv2 frames), each to a
  1024-d embedding.
- **Audio.** 16 kHz mono at int16 scale, MFCC as ``python_speech_features.mfcc`` with its defaults (25 ms frames,
  10 ms steps, rectangular window, 512-point FFT, 26 mel filters, 13 cepstra, lifter 22, pre-emphasis 0.97, c0 =
  log frame energy): 100 MFCC frames per second, 4 per video frame at 25 fps.
- **Offsets** (``calc_pdist``): video window ``i`` (frames ``i..i+4``) against audio windows ``i + d`` for
  ``d`` in ``[-vshift, vshift]`` (``protocol.sync_vshift`` = 15), zero embeddings beyond the ends; the Euclidean
  distances are averaged over ``i`` per offset. **Sync-D** is the minimum of those means, **Sync-C** (confidence) is
  their median minus the minimum, and the AV offset is ``vshift - argmin`` (:func:`sync_scores`). Videos are scored
  one by one and the scores averaged over videos.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .weights import load_into, load_weights

__all__ = ["SyncNet", "mfcc", "sync_embeddings", "sync_network", "sync_scores"]

EXPECTED = "syncnet_python's data/syncnet_v2.model (SyncNetModel.S state dict)"
SAMPLE_RATE = 16_000


def _bn_relu(conv: nn.Module, channels: int, bn=nn.BatchNorm2d, inplace: bool = True) -> list[nn.Module]:
    return [conv, bn(channels), nn.ReLU(inplace=inplace)]


class SyncNet(nn.Module):
    """syncnet_python's ``S``: ``forward_aud`` ``(N, 1, 13, 20)`` and ``forward_lip`` ``(N, 3, 5, 224, 224)`` -> ``(N, 1024)``."""

    def __init__(self, embedding: int = 1024) -> None:
        super().__init__()
        self.netcnnaud = nn.Sequential(
            *_bn_relu(nn.Conv2d(1, 64, 3, 1, 1), 64), nn.MaxPool2d(1, 1),
            *_bn_relu(nn.Conv2d(64, 192, 3, 1, 1), 192), nn.MaxPool2d(3, (1, 2)),
            *_bn_relu(nn.Conv2d(192, 384, 3, padding=1), 384),
            *_bn_relu(nn.Conv2d(384, 256, 3, padding=1), 256),
            *_bn_relu(nn.Conv2d(256, 256, 3, padding=1), 256), nn.MaxPool2d(3, 2),
            *_bn_relu(nn.Conv2d(256, 512, (5, 4), padding=0), 512, inplace=False))
        self.netfcaud = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))
        self.netfclip = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, embedding))
        b3 = nn.BatchNorm3d
        self.netcnnlip = nn.Sequential(
            *_bn_relu(nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2), 0), 96, b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_bn_relu(nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), 256, b3),
            nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
            *_bn_relu(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
            *_bn_relu(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3),
            *_bn_relu(nn.Conv3d(256, 256, (1, 3, 3), padding=(0, 1, 1)), 256, b3), nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
            *_bn_relu(nn.Conv3d(256, 512, (1, 6, 6), padding=0), 512, b3))

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfcaud(self.netcnnaud(x).flatten(1))

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
        return self.netfclip(self.netcnnlip(x).flatten(1))


def sync_network(weights: str | None, key: str = "metrics.sync.weights") -> SyncNet:
    sd = load_weights(weights, key, EXPECTED)
    with torch.device("meta"):
        net = SyncNet(int(sd["netfcaud.3.weight"].shape[0]) if "netfcaud.3.weight" in sd else 1024)
    return load_into(net, sd, key, str(weights)).eval()


# ------------------------------------------------------------------------------------------ MFCC
def _hz2mel(hz):
    return 2595 * np.log10(1 + np.asarray(hz) / 700.0)


def _mel2hz(mel):
    return 700 * (10 ** (np.asarray(mel) / 2595.0) - 1)


def mfcc(signal: np.ndarray, rate: int = SAMPLE_RATE, winlen: float = 0.025, winstep: float = 0.01, numcep: int = 13,
         nfilt: int = 26, nfft: int = 512, preemph: float = 0.97, ceplifter: int = 22) -> np.ndarray:
    """``python_speech_features.mfcc`` with its defaults (rectangular window, c0 = log energy): ``(frames, 13)``."""
    from scipy.fft import dct

    x = np.asarray(signal, np.float64)
    x = np.append(x[:1], x[1:] - preemph * x[:-1]) if x.size else x
    flen, fstep = int(round(winlen * rate)), int(round(winstep * rate))
    n = 1 if x.size <= flen else 1 + int(np.ceil((x.size - flen) / fstep))
    padded = np.concatenate([x, np.zeros((n - 1) * fstep + flen - x.size)])
    idx = np.arange(flen)[None] + fstep * np.arange(n)[:, None]
    frames = padded[idx]
    pspec = np.square(np.abs(np.fft.rfft(frames, nfft))) / nfft
    energy = pspec.sum(1)
    energy = np.where(energy == 0, np.finfo(float).eps, energy)
    mel = np.linspace(_hz2mel(0), _hz2mel(rate / 2), nfilt + 2)
    bins = np.floor((nfft + 1) * _mel2hz(mel) / rate)
    fbank = np.zeros((nfilt, nfft // 2 + 1))
    for j in range(nfilt):
        lo, mid, hi = int(bins[j]), int(bins[j + 1]), int(bins[j + 2])
        for i in range(lo, mid):
            fbank[j, i] = (i - bins[j]) / (bins[j + 1] - bins[j])
        for i in range(mid, hi):
            fbank[j, i] = (bins[j + 2] - i) / (bins[j + 2] - bins[j + 1])
    feat = pspec @ fbank.T
    feat = np.log(np.where(feat == 0, np.finfo(float).eps, feat))
    feat = dct(feat, type=2, axis=1, norm="ortho")[:, :numcep]
    feat *= 1 + (ceplifter / 2.0) * np.sin(np.pi * np.arange(numcep) / ceplifter)
    feat[:, 0] = np.log(energy)
    return feat


# ------------------------------------------------------------------------------------------ scores
def sync_scores(video_emb: torch.Tensor, audio_emb: torch.Tensor, vshift: int = 15) -> dict[str, float]:
    """syncnet_python's ``calc_pdist`` + evaluate: ``{"sync_d", "sync_c", "offset"}`` from ``(N, D)`` embeddings.

    Window ``i``'s video embedding is compared with audio embeddings ``i - vshift .. i + vshift`` (zeros outside);
    Sync-D = min over offsets of the mean distance, Sync-C = median - min, offset = ``vshift - argmin``: positive
    when the audio embedding that matches video window ``i`` is ``i - offset`` (the audio leads the video)."""
    v, a = video_emb.double(), audio_emb.double()
    n = min(v.shape[0], a.shape[0])
    v, a = v[:n], a[:n]
    win = 2 * vshift + 1
    ap = torch.nn.functional.pad(a, (0, 0, vshift, vshift))
    dists = torch.stack([torch.linalg.vector_norm(v[i][None] - ap[i:i + win] + 1e-6, dim=1) for i in range(n)], 1)
    mdist = dists.mean(1)  # (win,)
    minval, minidx = torch.min(mdist, 0)
    return {"sync_d": float(minval), "sync_c": float(torch.median(mdist) - minval), "offset": int(vshift - minidx)}


@torch.no_grad()
def sync_embeddings(network: SyncNet, faces: torch.Tensor, audio16: np.ndarray, fps: float = 25.0,
                    batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Face crops ``(F, 3, 224, 224)`` in ``[0, 1]`` (RGB) at 25 fps + 16 kHz audio -> video and audio embeddings of
    the ``min(F, len(audio) / 640) - 5`` windows, as syncnet_python's ``evaluate``."""
    if abs(fps - 25.0) > 1e-6:
        raise ValueError(f"SyncNet needs 25 fps video (got {fps:g}; set protocol.fps=25)")
    dev = next(network.parameters()).device
    cc = torch.from_numpy(mfcc(np.asarray(audio16, np.float64) * 32768.0).T.copy()).float()  # (13, T_mfcc)
    last = min(faces.shape[0], len(audio16) // 640) - 5
    if last < 1:
        raise ValueError(f"too short for SyncNet: {faces.shape[0]} frames / {len(audio16) / SAMPLE_RATE:.2f} s "
                         "(needs at least 6 frames of video and audio)")
    bgr = faces[:, [2, 1, 0]].float() * 255.0  # (F, 3, H, W)
    vid = bgr.permute(1, 0, 2, 3)  # (3, F, H, W)
    vfeats, afeats = [], []
    for start in range(0, last, batch_size):
        idx = range(start, min(last, start + batch_size))
        lip = torch.stack([vid[:, i:i + 5] for i in idx]).to(dev)
        aud = torch.stack([cc[:, i * 4:i * 4 + 20] for i in idx])[:, None].to(dev)
        vfeats.append(network.forward_lip(lip).cpu())
        afeats.append(network.forward_aud(aud).cpu())
    return torch.cat(vfeats), torch.cat(afeats)
