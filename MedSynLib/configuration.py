"""Configs are constructors: typed dataclasses that round-trip through JSON.

Every network and diffusion component is built from a dataclass config, written next to
its weights as `config.json` and read back with unknown keys rejected by name, so a typo
or a config from another version fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from MedSynLib.compat import zip_strict
from MedSynLib.errors import MedSynError, check_number, read_text

ConfigT = TypeVar("ConfigT")


def config_from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
    """Build dataclass `cls` from `data`, naming any unknown key; tuples are restored from lists."""
    values = _field_values(cls, data, source)
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise MedSynError(f"{source}: {error}") from error


def _field_values(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """`data` as values of `cls`'s fields (nested configs built, lists made tuples); unknown keys refused."""
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
    return values


def check_settings(config: Any, limits: dict[str, tuple[float, float]]) -> None:
    """Refuse a dataclass config with a value of the wrong type or a number outside its
    (low, high) limits (numbers in tuples each), naming the one setting that is wrong."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        _check_value(field.name, getattr(config, field.name), hints[field.name], limits.get(field.name))


def check_overrides(cls: type, data: dict[str, Any], limits: dict[str, tuple[float, float]], *, source: str) -> None:
    """Check some settings of `cls` (overrides of a preset) as `check_settings` does, before
    the whole config exists; rules between settings are left to the whole config."""
    hints = typing.get_type_hints(cls)
    for name, value in _field_values(cls, data, source).items():
        try:
            _check_value(name, value, hints[name], limits.get(name))
        except ValueError as error:
            raise MedSynError(f"{source}: {error}") from error


def _check_value(name: str, value: Any, hint: Any, limits: tuple[float, float] | None) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if type(None) in args:  # X | None
        if value is None:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) and isinstance(value, tuple) else args
        if not isinstance(value, tuple) or len(value) != len(items):
            raise ValueError(f"{name} must be a list of {len(items) if args[-1:] != (Ellipsis,) else 'some'} "
                             f"values, got {value!r}")
        for item, item_hint in zip_strict(value, items):
            _check_value(name, item, item_hint, limits)
    elif hint in (int, float):
        check_number(name, value, *(limits or (-math.inf, math.inf)), integer=hint is int)
    elif hint in (bool, str, dict) and not isinstance(value, hint):
        raise ValueError(f"{name} must be {'true or false' if hint is bool else 'a ' + hint.__name__}, got {value!r}")


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
    if not path.exists():
        raise MedSynError(f"missing file {path}")
    try:
        data = json.loads(read_text(path, "JSON file"))
    except json.JSONDecodeError as error:
        raise MedSynError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise MedSynError(f"{path} must hold a JSON object")
    return data
