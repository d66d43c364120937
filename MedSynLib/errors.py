"""User-facing errors, the checks at the command-line edge, and the wrapper that turns failures into one line.

Every command runs through `run_command`, so each kind of bad input fails the same way in
every command: one line `medsyn: error: ...`, exit code 2, no traceback. Arguments are
checked while they are parsed (the argument types below: bounded finite numbers, files
and folders that exist and are what they should be, output places that can be written),
so a bad value fails before any work is done or any output is made.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import re
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MAX_STEPS = 1000  # sampling steps: the reference trains on 1000 times; more steps only take longer
MAX_SEED = 2**32 - 1  # what every random generator used here (torch, numpy) accepts
MAX_MESSAGE = 400  # characters of one error line
MAX_LOWPASS_VOXELS = 64.0  # a Gaussian low-pass's sigma (stage-2 consistency): wider is the whole volume
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class MedSynError(Exception):
    """A problem with the user's input or environment, reported as one line (exit code 2)."""


def one_line(message: str) -> str:
    """A message as one plain line: other libraries' texts bring newlines and terminal colour codes."""
    text = " ".join(ANSI_ESCAPE.sub("", message).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def run_command(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a command's main; a MedSynError, an argument error or an OSError becomes one line on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        check_argv(argv)
        with _argument_errors_raised():
            return main(argv) or 0
    except MedSynError as error:
        message = str(error)
    except OSError as error:
        message = os_error_message(error)
    except KeyboardInterrupt:
        print("medsyn: interrupted", file=sys.stderr)
        return 130
    print(f"medsyn: error: {one_line(message)}", file=sys.stderr)
    return 2


def check_argv(argv: list[str]) -> None:
    """Refuse arguments that are not UTF-8: Python hands them on as lone surrogates that fail far inside."""
    for number, argument in enumerate(argv, start=1):
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError as error:
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise MedSynError(f"command-line argument {number} ({shown!r}) is not UTF-8 text") from error


@contextlib.contextmanager
def _argument_errors_raised() -> Iterator[None]:
    """argparse prints its usage and exits; inside a command its errors are MedSynErrors like any other."""

    def error(parser: argparse.ArgumentParser, message: str):
        raise MedSynError(f"{message} (see {parser.prog} --help)")

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def os_error_message(error: OSError) -> str:
    """An OSError that reached the top, said with the path it concerns."""
    reason = (error.strerror or str(error) or type(error).__name__).lower()
    paths = [str(p) for p in (error.filename, error.filename2) if p is not None]
    return f"cannot use {' -> '.join(paths)}: {reason}" if paths else reason


def weights_file_problem(error: BaseException) -> str:
    """Why torch could not load a weights file, said plainly: its refusal of a pickle is several
    paragraphs with terminal colour codes that advise loading it unsafely, which we never do."""
    text = str(error)
    if isinstance(error, EOFError) or not text.strip():
        return "the file is empty or cut short"
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return (f"it is a pickle holding objects other than tensors ({unsafe.group(1)}); refused, "
                "as loading it could run code")
    if isinstance(error, pickle.UnpicklingError) or "WeightsUnpickler" in text:
        return "it is not a weights file (neither safetensors nor a pickle of tensors)"
    return one_line(text.strip().splitlines()[0])


# ----------------------------------------------------------------------------- numbers
def check_number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> int | float:
    """`value` if it is a finite number (an int when `integer`) in [low, high]; else ValueError naming `name`."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    finite = ok_type and not (isinstance(value, float) and not math.isfinite(value))  # any int is finite
    if isinstance(value, bool) or not finite or not low <= value <= high:
        raise ValueError(f"{name} must be {kind} from {_number(low)} to {_number(high)}, got {value!r}")
    return value


def _number(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value == int(value) else f"{value:g}"


def integer_argument(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (upper bounds keep a typo from hanging or exhausting memory)."""

    def parse(text: str) -> int:
        try:
            return check_number("the value", int(text), low, high, integer=True)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}") from None

    return parse


def number_argument(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (float() alone takes 'nan' and 'inf')."""

    def parse(text: str) -> float:
        try:
            return check_number("the value", float(text), low, high)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number from {_number(low)} to {_number(high)}, "
                                             f"got {text!r}") from None

    return parse


STEPS = integer_argument(1, MAX_STEPS)
SEED = integer_argument(0, MAX_SEED)
GUIDANCE = number_argument(0.0, 100.0)
LOWPASS_VOXELS = number_argument(0.0, MAX_LOWPASS_VOXELS)  # a Gaussian's sigma in voxels; 0 = off
WORKERS = integer_argument(1, 256)


# ----------------------------------------------------------------------------- paths
def path_problem(path: Path, kind: str, what: str = "") -> str | None:
    """What is wrong with `path` (the `what`, e.g. "manifest") as a "file" or "folder" to read, a
    "file or folder", or an "output folder" / "output file" to write; None when nothing is."""
    name = f"{what} {path}".strip()
    if kind in ("file", "folder", "file or folder"):
        if not path.exists():
            return f"{name} does not exist"
        if kind == "file" and path.is_dir():
            return f"{name} is a folder, not a file"
        if kind == "folder" and not path.is_dir():
            return f"{name} is a file, not a folder"
        return None
    if kind == "output file":
        if path.is_dir():
            return f"{name} is a folder, not a file"
        place = path.parent
        if not place.is_dir():
            return f"{place} (the folder of {name}) {'is a file' if place.exists() else 'does not exist'}"
    else:
        if path.exists() and not path.is_dir():
            return f"{name} is a file, not a folder"
        place = path
        while not place.exists():  # the folder is made with its missing parents
            place = place.parent
        if not place.is_dir():
            return f"{place} is a file, not a folder (in {name})"
    try:
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as error:
        return f"cannot write into {place}: {(error.strerror or str(error)).lower()}"
    return None


def require_path(path: str | Path, kind: str, what: str = "") -> Path:
    """`path` if `path_problem` finds nothing wrong with it, else a MedSynError saying what is."""
    problem = path_problem(Path(path), kind, what)
    if problem:
        raise MedSynError(problem)
    return Path(path)


def path_argument(kind: str) -> Callable[[str], Path]:
    """An argparse type for a path of `kind` (see `path_problem`), checked before any work."""

    def parse(text: str) -> Path:
        problem = path_problem(Path(text), kind)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return Path(text)

    return parse


EXISTING_FILE = path_argument("file")
EXISTING_FOLDER = path_argument("folder")
EXISTING_PATH = path_argument("file or folder")
OUTPUT_FOLDER = path_argument("output folder")
OUTPUT_FILE = path_argument("output file")


def read_text(path: Path, what: str = "file") -> str:
    """A UTF-8 text file (a byte-order mark is allowed); one clear line when it is not one."""
    data = require_path(path, "file", what).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise MedSynError(f"{what} {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from error
