"""Pack a prepared dataset for moving between machines, and unpack it: about 2x smaller than its folder.

    python recipes/demo_model/pack_dataset.py pack DATASET_DIR ARCHIVE.tar.xz
    python recipes/demo_model/pack_dataset.py unpack ARCHIVE.tar.xz DATASET_DIR

Case files are stored uncompressed inside one xz stream, which compresses the noisy int16
CT better than each file's own zlib and shares repeated arrays (a 64/64 dataset holds its
CT twice). Unpacked cases are plain (uncompressed) .npz files that `PreparedDataset` reads.
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import numpy as np

from MedSynLib.data.prepared import INDEX, PreparedDataset


def pack(dataset: Path, archive: Path) -> None:
    """The index and the cases it lists (a view such as effusion_subset.py's packs only its cases)."""
    index = PreparedDataset(dataset)
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        tar.add(dataset / INDEX, arcname=INDEX)
        for case_id in index.case_ids:
            buffer = io.BytesIO()
            with np.load(index.case_path(case_id), allow_pickle=False) as case:
                np.savez(buffer, **{key: case[key] for key in case.files})
            info = tarfile.TarInfo(f"cases/{case_id}.npz")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)


def unpack(archive: Path, dataset: Path) -> None:
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(dataset, filter="data")


if __name__ == "__main__":
    command, source, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    {"pack": pack, "unpack": unpack}[command](source, target)
