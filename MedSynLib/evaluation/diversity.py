"""Diversity (pairwise 3D MS-SSIM) and memorisation (nearest training volume in feature space).

**3D MS-SSIM** (Wang et al. 2003, extended to volumes): volumes are mapped from HU
[-1024, 600] to [0, 1] (data range 1, C1 = 0.01^2, C2 = 0.03^2) and compared with separable
Gaussian windows (7 voxels, sigma 1.5) on a pyramid made by 2x average pooling. The number of
scales follows the size: as many as keep the smallest side >= the window, from 1 up to 5
(3 for 32-63 voxels, 4 for 64-111, 5 from 112 on). The standard weights (0.0448, 0.2856,
0.3001, 0.2363, 0.1333) are cut to the scales used and renormalised. Negative contrast terms
are clipped at 0. Before comparing, every volume is resized (area averaging) to a common
cube of `size` voxels (default 96), so sets of different grids compare.

Within a generated set, a *high* mean pairwise MS-SSIM means the samples look alike (low
diversity); the real set's value is the reference.

**Memorisation**: each generated volume's nearest real (training) volume by Euclidean
distance between feature vectors. A generated volume closer to a real one than
``copy_factor`` (default 0.5) times the median nearest-neighbour distance among the real
volumes themselves is flagged as a possible copy (or an absolute ``threshold`` is given).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from MedSynLib.hounsfield import MODEL_HU_RANGE

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
WINDOW = 7
SIGMA = 1.5


def prepare_volume(hu: np.ndarray, size: int = 96) -> np.ndarray:
    """HU -> [0, 1] on a size^3 cube (area averaging when shrinking, trilinear when growing)."""
    from MedSynLib.evaluation.features import resize_volume, window

    tensor = window(torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32)), *MODEL_HU_RANGE)
    return resize_volume(tensor, (size, size, size)).numpy().astype(np.float32)


def number_of_scales(shape: tuple[int, ...], window: int = WINDOW) -> int:
    """Scales that keep the smallest side >= the window, between 1 and 5."""
    smallest = min(shape)
    scales = 1
    while scales < 5 and smallest // (2**scales) >= window:
        scales += 1
    return scales


def _gaussian(window: int, sigma: float) -> torch.Tensor:
    x = torch.arange(window, dtype=torch.float64) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of (N, 1, D, H, W)."""
    k = kernel.numel()
    x = F.conv3d(x, kernel.view(1, 1, k, 1, 1))
    x = F.conv3d(x, kernel.view(1, 1, 1, k, 1))
    return F.conv3d(x, kernel.view(1, 1, 1, 1, k))


def _ssim_terms(a: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _blur(a, kernel), _blur(b, kernel)
    var_a = _blur(a * a, kernel) - mu_a**2
    var_b = _blur(b * b, kernel) - mu_b**2
    cov = _blur(a * b, kernel) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    dims = tuple(range(1, cs.ndim))
    return (luminance * cs).mean(dim=dims), cs.mean(dim=dims)


def ms_ssim_3d(a: np.ndarray, b: np.ndarray, *, scales: int | None = None) -> float:
    """3D MS-SSIM of two volumes of the same shape with values in [0, 1]."""
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"volumes must be 3D and of one shape, got {a.shape} and {b.shape}")
    scales = scales or number_of_scales(a.shape)
    if min(a.shape) // (2 ** (scales - 1)) < WINDOW:
        raise ValueError(f"{scales} scales need a side of at least {WINDOW * 2 ** (scales - 1)}, got {a.shape}")
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float64)
    weights = weights / weights.sum()
    kernel = _gaussian(WINDOW, SIGMA)
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float32))[None, None]
    values = []
    with torch.inference_mode():
        for level in range(scales):
            ssim, cs = _ssim_terms(x, y, kernel)
            values.append(ssim if level == scales - 1 else cs)
            if level < scales - 1:
                x, y = F.avg_pool3d(x, 2), F.avg_pool3d(y, 2)
    terms = torch.stack(values).double().clamp(min=0.0)[:, 0]
    return float(torch.prod(terms**weights))


def pairwise_ms_ssim(volumes: list[np.ndarray], *, max_pairs: int = 200, seed: int = 0) -> dict:
    """Mean and sd of MS-SSIM over pairs of prepared volumes (all pairs, or `max_pairs` drawn)."""
    pairs = list(itertools.combinations(range(len(volumes)), 2))
    if not pairs:
        return {"mean": None, "sd": None, "pairs": 0}
    if len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=max_pairs, replace=False))]
    scores = np.array([ms_ssim_3d(volumes[i], volumes[j]) for i, j in pairs])
    return {"mean": float(scores.mean()), "sd": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
            "pairs": len(pairs), "scales": number_of_scales(volumes[0].shape)}


def nearest_real(
    fake_features: np.ndarray, real_features: np.ndarray, *, copy_factor: float = 0.5, threshold: float | None = None
) -> dict:
    """For each generated volume, its nearest real volume and whether it is close enough to be a copy."""
    fake = np.asarray(fake_features, dtype=np.float64)
    real = np.asarray(real_features, dtype=np.float64)
    d2 = np.sum(fake**2, 1)[:, None] + np.sum(real**2, 1)[None, :] - 2 * fake @ real.T
    distances = np.sqrt(np.maximum(d2, 0.0))
    nearest = distances.argmin(axis=1)
    nearest_distance = distances[np.arange(len(fake)), nearest]
    reference = None
    if threshold is None and len(real) >= 2:
        r2 = np.sum(real**2, 1)[:, None] + np.sum(real**2, 1)[None, :] - 2 * real @ real.T
        within = np.sqrt(np.maximum(r2, 0.0))
        np.fill_diagonal(within, np.inf)
        reference = float(np.median(within.min(axis=1)))
        threshold = copy_factor * reference
    flagged = nearest_distance < threshold if threshold is not None else np.zeros(len(fake), dtype=bool)
    return {
        "nearest_index": nearest.tolist(),
        "distance": nearest_distance.tolist(),
        "threshold": threshold,
        "real_nn_median": reference,
        "copy_factor": copy_factor,
        "flagged": flagged.tolist(),
    }
