"""Configs are constructors: typed dataclasses that round-trip through JSON.

Every network and diffusion component is built from a dataclass config, written next to
its weights as `config.json` and read back with unknown keys rejected by name, so a typo
or a config from another version fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from .errors import MedSynError

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
    """Build dataclass `cls` from `data`, naming any unknown key; tuples are restored from lists."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise MedSynError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value, source=f"{source}.{name}")
        elif isinstance(value, list) and "tuple" in str(hint):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        values[name] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise MedSynError(f"{source}: {error}") from error


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only when the block ends without error: it is
    written to a temporary name in the same folder, fsynced, then renamed. Never half a file."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as file:
        file.write(data)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temporary file or folder the usual permissions and rename it into place."""
    mode = 0o777 if Path(tmp).is_dir() else 0o666  # mkstemp/mkdtemp create private (0600/0700) entries
    os.chmod(tmp, mode & ~_current_umask())
    os.replace(tmp, path)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedSynError(f"missing file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedSynError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise MedSynError(f"{path} must hold a JSON object")
    return data
