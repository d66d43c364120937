"""Python 3.9 compatibility: 3D Slicer 5.6 and 5.8 run the library on Python 3.9."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any


def zip_strict(*collections: Collection) -> Iterator[tuple[Any, ...]]:
    """`zip(..., strict=True)` (Python 3.10+) for sized arguments: unequal lengths raise ValueError."""
    lengths = [len(c) for c in collections]
    if len(set(lengths)) > 1:
        raise ValueError(f"zip_strict() arguments have different lengths {lengths}")
    return zip(*collections)
