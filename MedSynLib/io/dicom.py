"""Reading a DICOM series: one series, slices ordered along the normal, gaps refused.

Preparation and evaluation both read scans through `read_dicom_series`, so a scan that one
accepts the other accepts too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from MedSynLib.compat import zip_strict
from MedSynLib.errors import MedSynError


def read_dicom_series(folder: str | Path, series_id: str | None = None) -> sitk.Image:
    """Read one DICOM series as a 3D image in HU, slices sorted by position along the normal.

    A folder holding several series needs ``series_id``; the error lists the ones found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MedSynError(f"DICOM folder {folder} does not exist")
    reader = sitk.ImageSeriesReader()
    series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not series_ids:
        raise MedSynError(f"no DICOM series in {folder}")
    if series_id is None:
        if len(series_ids) > 1:
            raise MedSynError(f"{folder} holds {len(series_ids)} DICOM series; pick one of {series_ids}")
        series_id = series_ids[0]
    elif series_id not in series_ids:
        raise MedSynError(f"series {series_id!r} is not in {folder}; found {series_ids}")
    # GDCM orders the files by image position projected on the slice normal.
    files = reader.GetGDCMSeriesFileNames(str(folder), series_id)
    if len(files) < 2:
        raise MedSynError(f"DICOM series {series_id} in {folder} has {len(files)} slice(s); need a volume")
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise MedSynError(f"could not read the DICOM series in {folder}: {first_line}") from error
    if image.GetDimension() != 3:
        raise MedSynError(f"DICOM series in {folder} is not a 3D volume")
    _check_even_slice_spacing(reader, image, folder)
    return image


def _check_even_slice_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """Refuse a series with a gap, a step over 1.5x the smallest (a median misses the gap in a short
    series): a missing or unreadable slice, which GDCM skips silently and the volume is stretched over."""
    normal = image.GetDirection()[2::3]
    positions = []
    for index in range(image.GetSize()[2]):
        key = "0020|0032"  # Image Position (Patient)
        if not reader.HasMetaDataKey(index, key):
            return
        position = [float(v) for v in reader.GetMetaData(index, key).split("\\")]
        positions.append(sum(p * n for p, n in zip_strict(position, normal)))
    steps = np.abs(np.diff(positions))
    if steps.size and steps.max() > 1.5 * steps.min():
        raise MedSynError(f"DICOM series in {folder} has uneven slice spacing ({steps.min():.2f} to "
                          f"{steps.max():.2f} mm): a slice is missing or unreadable")
