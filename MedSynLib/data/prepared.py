"""The prepared-dataset format that `prepare` writes and `train` reads.

    DIR/dataset.json          index: format version, structures, grid sizes, text encoder, case ids
    DIR/cases/<case_id>.npz   one compressed file per case (numpy, loaded with allow_pickle=False)

A case file holds the CT on the stage-2 grid (`ct_hu`, int16, size^3) and on the stage-1
grid (`ct_hu_low`), the anatomy as bit fields (`anatomy_bits`, uint8 or uint16, bit i =
structure i of dataset.json; overlaps allowed) at both sizes, the report's token
features (`text_features`, float16, tokens x hidden; `text_mask`), the report text and
the geometry of the stage-2 grid in patient space (JSON), so outputs map back to mm.
Files are written to a temporary name and renamed, so a case file is whole or absent.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MedSynLib.anatomy import resolve_structures
from MedSynLib.configuration import atomic_file, read_json, write_json
from MedSynLib.errors import MedSynError
from MedSynLib.geometry import Geometry

FORMAT = "medsyn-prepared"
FORMAT_VERSION = 1
INDEX = "dataset.json"
CASE_ARRAYS = frozenset({"ct_hu", "ct_hu_low", "anatomy_bits", "anatomy_bits_low", "text_features", "text_mask", "meta"})
UNREADABLE = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)  # what a broken case file raises


@dataclass
class PreparedCase:
    case_id: str
    ct_hu: np.ndarray  # int16 (S, S, S)
    ct_hu_low: np.ndarray  # int16 (s, s, s)
    masks: dict[str, np.ndarray]  # bool (S, S, S)
    masks_low: dict[str, np.ndarray]  # bool (s, s, s)
    text_features: np.ndarray  # float16 (tokens, hidden)
    text_mask: np.ndarray  # bool (tokens,)
    report: str
    geometry: Geometry


def pack_masks(masks: dict[str, np.ndarray], structures: tuple[str, ...]) -> np.ndarray:
    """Masks -> one integer volume whose bit i is structure i."""
    dtype = np.uint8 if len(structures) <= 8 else np.uint16
    bits = np.zeros(next(iter(masks.values())).shape, dtype=dtype)
    for i, name in enumerate(structures):
        bits |= masks[name].astype(dtype) << i
    return bits


def unpack_masks(bits: np.ndarray, structures: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: ((bits >> i) & 1).astype(bool) for i, name in enumerate(structures)}


def write_case(path: Path, case: PreparedCase, structures: tuple[str, ...]) -> None:
    arrays = {
        "ct_hu": case.ct_hu.astype(np.int16),
        "ct_hu_low": case.ct_hu_low.astype(np.int16),
        "anatomy_bits": pack_masks(case.masks, structures),
        "anatomy_bits_low": pack_masks(case.masks_low, structures),
        "text_features": case.text_features.astype(np.float16),
        "text_mask": case.text_mask.astype(bool),
        "meta": np.frombuffer(json.dumps({"case_id": case.case_id, "report": case.report,
                                          "geometry": case.geometry.as_dict()}).encode(), dtype=np.uint8),
    }
    with atomic_file(path) as file:
        np.savez_compressed(file, **arrays)


def read_case_meta(path: Path) -> dict:
    """The case id, report and geometry of a case file, without decompressing its volumes."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(bytes(data["meta"]).decode())


class PreparedDataset:
    """Read access to a prepared dataset; cases are loaded one at a time, never all at once."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise MedSynError(f"data folder {self.root} does not exist")
        if not (self.root / INDEX).is_file():
            raise MedSynError(f"{self.root} is not a prepared dataset (no {INDEX}); run python -m MedSynLib.prepare")
        index = read_json(self.root / INDEX)
        if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
            raise MedSynError(f"{self.root / INDEX} is not a {FORMAT} v{FORMAT_VERSION} index")
        self.index = index
        self.structures = tuple(s.name for s in resolve_structures(tuple(index["structures"])))
        self.size, self.low_size = int(index["size"]), int(index["low_size"])
        self.case_ids: list[str] = list(index["cases"])
        if not self.case_ids:
            raise MedSynError(f"prepared dataset {self.root} holds no cases")
        for case_id in self.case_ids:  # here, not in a data-loader worker far into a run
            self._check_case_file(case_id)

    def __len__(self) -> int:
        return len(self.case_ids)

    def case_path(self, case_id: str) -> Path:
        return self.root / "cases" / f"{case_id}.npz"

    def _check_case_file(self, case_id: str) -> None:
        """The file is there and lists every array (its zip directory is read, not its volumes)."""
        path = self.case_path(case_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = sorted(CASE_ARRAYS - set(data.files))
        except (*UNREADABLE, TypeError) as error:  # TypeError: a plain .npy array, not an archive
            raise MedSynError(f"cannot read case {case_id!r} ({path}): {error or type(error).__name__}") from error
        if missing:
            raise MedSynError(f"case file {path} lacks {missing}")

    def load(self, i: int, *, low_only: bool = False) -> PreparedCase:
        case_id = self.case_ids[i]
        path = self.case_path(case_id)
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                high = {} if low_only else {"ct_hu": data["ct_hu"], "bits": data["anatomy_bits"]}
                return PreparedCase(
                    case_id=case_id,
                    ct_hu=high.get("ct_hu"),
                    ct_hu_low=data["ct_hu_low"],
                    masks=unpack_masks(high["bits"], self.structures) if high else {},
                    masks_low=unpack_masks(data["anatomy_bits_low"], self.structures),
                    text_features=data["text_features"],
                    text_mask=data["text_mask"],
                    report=meta["report"],
                    geometry=Geometry(**{k: tuple(v) for k, v in meta["geometry"].items()}),
                )
        except (*UNREADABLE, KeyError) as error:
            raise MedSynError(f"cannot read case {case_id!r} ({path}): {error or type(error).__name__}") from error


def write_index(root: Path, *, structures: tuple[str, ...], size: int, low_size: int, text_encoder: dict,
                text_hidden: int, text_tokens: int, case_ids: list[str], extra: dict | None = None) -> None:
    """dataset.json: what every case file holds, and which cases are complete."""
    write_json(root / INDEX, {
        "format": FORMAT, "version": FORMAT_VERSION, "structures": list(structures), "size": size,
        "low_size": low_size, "text_encoder": text_encoder, "text_hidden": text_hidden, "text_tokens": text_tokens,
        "cases": sorted(case_ids), **(extra or {}),
    })
