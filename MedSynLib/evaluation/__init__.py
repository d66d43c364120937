"""Evaluation of generated chest CTs: distribution metrics, anatomy, diversity, text adherence.

`python -m MedSynLib.evaluate` runs all of it (`runner.run_evaluation`); the parts:

- `distribution`: Fréchet distance, unbiased MMD^2 (median-heuristic Gaussian kernel), bootstrap intervals;
- `features`: feature extractors by name (``chest-ct``, ``med3d:PATH``, ``inception-2.5d``, ``intensity``);
- `anatomy_metrics`: structure volumes, airway topology, consistency of generated anatomy;
- `diversity`: pairwise 3D MS-SSIM and nearest-real-volume memorisation checks;
- `findings`: nodule / effusion / cardiomegaly detectors and report adherence rates;
- `cases`: finding and reading the volumes of a set; `plots`: PNG plots with Pillow.
"""

from MedSynLib.evaluation.distribution import (
    Estimate,
    bootstrap,
    distribution_metrics,
    frechet_distance,
    gaussian_stats,
    median_bandwidth,
    mmd2,
)
from MedSynLib.evaluation.features import (
    FeatureExtractor,
    available_extractors,
    get_extractor,
    register_extractor,
)

__all__ = [
    "Estimate",
    "FeatureExtractor",
    "available_extractors",
    "bootstrap",
    "distribution_metrics",
    "frechet_distance",
    "gaussian_stats",
    "get_extractor",
    "median_bandwidth",
    "mmd2",
    "register_extractor",
]
