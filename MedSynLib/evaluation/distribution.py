"""Distances between two sets of feature vectors: Fréchet distance, MMD^2, bootstrap intervals.

Both metrics take two arrays of shape (n_samples, n_features), one row per volume.

**Fréchet distance** (FD; "FID" when the features come from Inception) between Gaussian fits
N(mu_r, S_r) and N(mu_f, S_f) of the two sets::

    FD = |mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))

With a few dozen volumes and 2048-d features both covariances are singular, which is where
the usual ``scipy.linalg.sqrtm(S_r @ S_f)`` goes wrong (complex parts, NaN). For sample
covariances S = A A^T with A = (X - mu)^T / sqrt(n - 1), the eigenvalues of S_r S_f are the
squared singular values of A_r^T A_f (an n_r x n_f matrix), so tr((S_r S_f)^(1/2)) is the sum
of those singular values: exact, real, never singular and cheap.
For precomputed (mu, S), MONAI's ``monai.metrics.fid.compute_frechet_distance`` does the
``sqrtm`` form (the tests check the two agree).

**MMD^2** with the Gaussian kernel k(a, b) = exp(-|a - b|^2 / (2 sigma^2)), sigma from the
median heuristic (median pairwise distance of the pooled sets) unless given. The unbiased
estimate leaves out the diagonal terms k(x_i, x_i) = 1 of the within-set sums, so it can be
slightly negative when the sets match; the biased one keeps them and is always larger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _as_features(features: np.ndarray, name: str, *, min_rows: int = 2) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2D array (samples, features), got shape {array.shape}")
    if array.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def _check_pair(real: np.ndarray, fake: np.ndarray, *, min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    real = _as_features(real, "real features", min_rows=min_rows)
    fake = _as_features(fake, "fake features", min_rows=min_rows)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    return real, fake


# --------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance (ddof = 1) of a (samples, features) array."""
    features = _as_features(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (exact, via singular values)."""
    real, fake = _check_pair(real, fake)
    mean_real, mean_fake = real.mean(axis=0), fake.mean(axis=0)
    a_real = (real - mean_real) / np.sqrt(real.shape[0] - 1)  # S_real = a_real^T a_real
    a_fake = (fake - mean_fake) / np.sqrt(fake.shape[0] - 1)
    trace_real = float(np.sum(a_real**2))
    trace_fake = float(np.sum(a_fake**2))
    # tr((S_r S_f)^(1/2)) = nuclear norm of a_r a_f^T (eigenvalues of S_r S_f = singular values^2).
    trace_sqrt = float(np.sum(np.linalg.svd(a_real @ a_fake.T, compute_uv=False)))
    distance = float(np.sum((mean_real - mean_fake) ** 2)) + trace_real + trace_fake - 2.0 * trace_sqrt
    return max(distance, 0.0)  # rounding can leave -1e-12 for identical sets



# --------------------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------------------


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = np.sum(a**2, axis=1)[:, None] + np.sum(b**2, axis=1)[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d2, 0.0)


def median_bandwidth(real: np.ndarray, fake: np.ndarray) -> float:
    """Median heuristic: the median Euclidean distance between distinct samples of the pooled set."""
    real, fake = _check_pair(real, fake, min_rows=1)
    pooled = np.concatenate([real, fake])
    d2 = _squared_distances(pooled, pooled)
    upper = d2[np.triu_indices(len(pooled), k=1)]
    positive = upper[upper > 0]
    if positive.size == 0:
        return 1.0  # every sample identical: any bandwidth gives MMD 0
    return float(np.sqrt(np.median(positive)))


def mmd2(real: np.ndarray, fake: np.ndarray, *, bandwidth: float | None = None, unbiased: bool = True) -> float:
    """Squared maximum mean discrepancy with a Gaussian kernel (median-heuristic bandwidth by default).

    unbiased=True (default): within-set means over i != j only (m(m-1) terms); the
    estimate is centred on the true MMD^2 and can be slightly negative. unbiased=False
    includes the diagonal (the V-statistic), which is >= the unbiased value.
    """
    real, fake = _check_pair(real, fake)
    sigma = median_bandwidth(real, fake) if bandwidth is None else float(bandwidth)
    if not sigma > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth!r}")
    gamma = 1.0 / (2.0 * sigma**2)
    k_rr = np.exp(-gamma * _squared_distances(real, real))
    k_ff = np.exp(-gamma * _squared_distances(fake, fake))
    k_rf = np.exp(-gamma * _squared_distances(real, fake))
    m, n = len(real), len(fake)
    if unbiased:
        within_real = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
        within_fake = (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
    else:
        within_real, within_fake = k_rr.mean(), k_ff.mean()
    return float(within_real + within_fake - 2.0 * k_rf.mean())


# --------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """A metric with its bootstrap percentile interval."""

    value: float
    low: float
    high: float
    n_bootstrap: int
    confidence: float

    def as_dict(self) -> dict:
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high,
                "n_bootstrap": self.n_bootstrap, "confidence": self.confidence}


def bootstrap(
    metric: Callable[[np.ndarray, np.ndarray], float],
    real: np.ndarray,
    fake: np.ndarray,
    *,
    n_bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """The metric on the full sets, and a percentile interval from resampling each set with replacement.

    Real and fake are resampled independently (seeded), the metric recomputed on each
    replicate, and the (1 - confidence)/2 and (1 + confidence)/2 quantiles reported.
    """
    real, fake = _check_pair(real, fake)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap!r}")
    value = float(metric(real, fake))
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        replicates[b] = metric(real[rng.integers(0, len(real), len(real))], fake[rng.integers(0, len(fake), len(fake))])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return Estimate(value, float(low), float(high), n_bootstrap, confidence)


def distribution_metrics(
    real: np.ndarray, fake: np.ndarray, *, n_bootstrap: int = 200, confidence: float = 0.95, seed: int = 0
) -> dict:
    """FD and unbiased MMD^2 with bootstrap intervals, plus the bandwidth used (fixed in the replicates)."""
    real, fake = _check_pair(real, fake)
    sigma = median_bandwidth(real, fake)

    def mmd_fixed(a: np.ndarray, b: np.ndarray) -> float:
        return mmd2(a, b, bandwidth=sigma)

    fd = bootstrap(frechet_distance, real, fake, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed)
    mmd = bootstrap(mmd_fixed, real, fake, n_bootstrap=n_bootstrap, confidence=confidence, seed=seed + 1)
    return {
        "fd": fd.as_dict(),
        "mmd2": mmd.as_dict(),
        "mmd2_biased": mmd2(real, fake, bandwidth=sigma, unbiased=False),
        "bandwidth": sigma,
        "n_real": int(len(real)),
        "n_fake": int(len(fake)),
        "n_features": int(real.shape[1]),
    }
