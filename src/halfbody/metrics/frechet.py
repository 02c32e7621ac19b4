"""The Fréchet distance between two Gaussians fitted to feature sets (Heusel et al. 2017, Eq. in §3 of the FID paper):

``d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``

for FID (Inception pool features) and FVD (Unterthiner et al. 2018, I3D logits). Statistics are float64 and match
``torchmetrics.image.fid.FrechetInceptionDistance`` (unbiased covariances; tested against it). ``Tr (S_a S_b)^(1/2)`` is
exact either way: with fewer samples than feature dimensions (every test set, most video sets) it is the nuclear norm
of ``A B^T / sqrt((n-1)(m-1))`` for the centred feature matrices ``A, B`` (the non-zero eigenvalues of ``S_a S_b`` are
the squared singular values of that small matrix), which avoids a 2048 x 2048 eigenproblem; otherwise scipy's
``sqrtm`` of ``S_a S_b`` (a small diagonal offset when it is singular; round-off's imaginary part dropped).
"""

from __future__ import annotations

import numpy as np

__all__ = ["frechet_distance", "gaussian_stats"]


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, ``N - 1``) of features ``(N, D)``, ``N >= 2``."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D), got shape {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between feature sets ``a (N, D)`` and ``b (M, D)`` (identical sets: 0 up to round-off)."""
    from scipy import linalg

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mu1, s1 = gaussian_stats(a)
    mu2, s2 = gaussian_stats(b)
    diff = mu1 - mu2
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if max(n, m) <= d:
        small = (a - mu1) @ (b - mu2).T / np.sqrt((n - 1) * (m - 1))
        tr_covmean = float(np.linalg.svd(small, compute_uv=False).sum())
        return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean))
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    return float(max(0.0, diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)))
