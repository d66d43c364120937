"""Diversity (pairwise 3D MS-SSIM) and memorisation (nearest training volume in feature space).

**3D MS-SSIM** (Wang et al. 2003, extended to volumes; MONAI's `MultiScaleSSIMMetric`): volumes
are mapped from HU [-1024, 600] to [0, 1] (data range 1, C1 = 0.01^2, C2 = 0.03^2) and compared
with Gaussian windows (7 voxels, sigma 1.5) on a pyramid made by 2x average pooling. The number of
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


def ms_ssim_3d(a: np.ndarray, b: np.ndarray, *, scales: int | None = None) -> float:
    """3D MS-SSIM of two volumes of the same shape with values in [0, 1] (MONAI's metric)."""
    from monai.metrics import MultiScaleSSIMMetric  # imported on demand: it costs seconds

    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"volumes must be 3D and of one shape, got {a.shape} and {b.shape}")
    scales = scales or number_of_scales(a.shape)
    if min(a.shape) // (2 ** (scales - 1)) < WINDOW:
        raise ValueError(f"{scales} scales need a side of at least {WINDOW * 2 ** (scales - 1)}, got {a.shape}")
    weights = np.array(MS_SSIM_WEIGHTS[:scales]) / sum(MS_SSIM_WEIGHTS[:scales])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=WINDOW, kernel_sigma=SIGMA,
                                  weights=tuple(weights.tolist()))
    x, y = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None] for v in (a, b))
    with torch.inference_mode():
        return float(metric(x, y))


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
