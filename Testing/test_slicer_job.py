"""The Slicer module's process side, without Slicer: request, command line, progress protocol,
background job (start, poll, wait, cancel, failure messages) and environment checks.

Runs in plain Python; the generator is the stand-in from conftest_slicer (same arguments,
same JSON-lines protocol), so no model is needed, started by a PythonSlicer stand-in that, like
the real launcher, passes no signal on to the interpreter it runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_slicer import fake_launcher, process_alive, processes_end, read_pids, write_fake_generator  # noqa: E402
from MedSynSlicerLib import job  # noqa: E402
from MedSynSlicerLib.job import EventKind, GenerationJob, GenerationRequest, JobEvent  # noqa: E402

# ---------------------------------------------------------------------------------------
# Request and command line
# ---------------------------------------------------------------------------------------


def test_command_with_defaults_leaves_model_steps_guidance_to_the_library_and_runs_stage2_whole():
    request = GenerationRequest("Emphysema.", seed=42)
    command = job.build_command("/opt/Slicer/bin/PythonSlicer", request, "/w/report.txt", "/w/result")
    assert command == [
        "/opt/Slicer/bin/PythonSlicer", "-m", "MedSynLib.generate",
        "--report-file", "/w/report.txt",
        "--out", "/w/result",
        "--seed", "42",
        "--device", "auto",
        "--progress", "jsonl",
        job.TILE_OPTION, "whole",  # tile size 0; MONAI is installed only when tiles are asked for
    ]  # fmt: skip


def test_command_with_every_option():
    request = GenerationRequest(
        "Emphysema.", seed=0, steps=25, guidance=4.5, model_dir="/models/m", device="cuda", tile_size=64
    )
    command = job.build_command("python", request, Path("/w/report.txt"), Path("/w/result"), Path("/w/a.nii.gz"))
    options = dict(zip(command[3::2], command[4::2], strict=True))
    assert command[:3] == ["python", "-m", "MedSynLib.generate"]
    assert options == {
        "--report-file": "/w/report.txt",
        "--out": "/w/result",
        "--seed": "0",
        "--device": "cuda",
        "--progress": "jsonl",
        "--model": "/models/m",
        "--steps": "25",
        "--guidance": "4.5",
        "--anatomy": "/w/a.nii.gz",
        job.TILE_OPTION: "64x64x64",
    }


def test_guidance_is_written_exactly():
    command = job.build_command("python", GenerationRequest("x", seed=1, guidance=7), "r", "o")
    assert command[command.index("--guidance") + 1] == "7.0"
    assert float(command[command.index("--guidance") + 1]) == 7.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"report": "   "}, "report is empty"),
        ({"seed": -1}, "seed"),
        ({"seed": job.MAX_SEED + 1}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"steps": 0}, "steps"),
        ({"guidance": float("nan")}, "guidance"),
        ({"guidance": -1.0}, "guidance"),
        ({"device": "gpu"}, "device"),
        ({"tile_size": -8}, "tile size"),
        ({"model_dir": " "}, "model folder"),
    ],
)
def test_request_rejects_bad_values(changes, message):
    values = {"report": "Emphysema.", "seed": 3} | changes
    with pytest.raises(ValueError, match=message):
        GenerationRequest(**values)


def test_request_parameters_are_json_ready():
    request = GenerationRequest("x", seed=5, steps=10, guidance=2.0, model_dir="/m", device="cpu", tile_size=32)
    assert json.loads(json.dumps(request.parameters())) == {
        "seed": 5, "steps": 10, "guidance": 2.0, "model": "/m", "device": "cpu", "tile_size": 32,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Progress protocol
# ---------------------------------------------------------------------------------------


def test_progress_line():
    event = job.parse_progress_line('{"event": "progress", "stage": "stage2", "step": 5, "steps": 20}\n')
    assert event == JobEvent(EventKind.PROGRESS, stage="stage2", step=5, steps=20)
    assert event.percent == pytest.approx(50 + 50 * 5 / 20)
    assert event.describe() == "stage2: step 5/20"


def test_progress_percent_spans_the_stages():
    first = job.parse_progress_line('{"event": "progress", "stage": "stage1", "step": 0, "steps": 50}')
    last = job.parse_progress_line('{"event": "progress", "stage": "stage1", "step": 50, "steps": 50}')
    end = job.parse_progress_line('{"event": "progress", "stage": "stage2", "step": 20, "steps": 20}')
    other = job.parse_progress_line('{"event": "progress", "stage": "encode", "step": 1, "steps": 4}')
    assert (first.percent, last.percent, end.percent, other.percent) == (0.0, 50.0, 100.0, 25.0)


def test_log_done_and_error_lines():
    assert job.parse_progress_line('{"event": "log", "message": "loading model"}') == JobEvent(
        EventKind.LOG, message="loading model"
    )
    assert job.parse_progress_line('{"event": "done", "out": "/tmp/x"}') == JobEvent(EventKind.DONE, out="/tmp/x")
    assert job.parse_progress_line("medsyn: error: report is empty") == JobEvent(
        EventKind.ERROR, message="report is empty"
    )
    assert job.parse_progress_line('{"event": "log", "message": "x"}').percent is None


@pytest.mark.parametrize(
    "line",
    [
        "UserWarning: something",
        "Traceback (most recent call last):",
        "{not json",
        "[1, 2, 3]",
        '{"event": "progress", "stage": "stage1", "step": "3", "steps": 10}',
        '{"event": "progress", "stage": "stage1", "step": 3, "steps": 0}',
        '{"event": "progress", "stage": "stage1", "step": true, "steps": 10}',
        '{"event": "progress", "step": 3, "steps": 10}',
        '{"event": "done"}',
        '{"event": "log", "message": 3}',
        '{"event": "teleport"}',
        '{"message": "no event key"}',
    ],
)
def test_anything_else_is_plain_output(line):
    event = job.parse_progress_line(line + "\n")
    assert event == JobEvent(EventKind.OUTPUT, message=line)
    assert event.describe() == line


@pytest.mark.parametrize("line", ["", "\n", "   \r\n"])
def test_blank_lines_are_skipped(line):
    assert job.parse_progress_line(line) is None


# ---------------------------------------------------------------------------------------
# The background job, with the stand-in generator
# ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_script(tmp_path):
    return write_fake_generator(tmp_path)


def test_job_runs_and_reports_events_in_order(tmp_path, fake_script):
    calls = []
    request = GenerationRequest("Emphysema in both upper lobes.", seed=11, steps=3, model_dir=str(tmp_path))
    generation = GenerationJob(request, python_executable="PythonSlicer", launcher=fake_launcher(fake_script, calls),
                               work_dir=tmp_path / "work")
    seen = []
    generation.start()
    generation.wait(on_event=seen.append)

    assert generation.finished and generation.succeeded and generation.returncode == 0
    assert [e.kind for e in seen] == (
        [EventKind.LOG, EventKind.OUTPUT] + [EventKind.PROGRESS] * 6 + [EventKind.DONE]
    )
    assert seen[0].message == "loading model: Ödem – 5 mm"  # UTF-8 from the child, whatever the locale
    assert [e.percent for e in seen if e.kind is EventKind.PROGRESS] == pytest.approx(
        [50 / 3, 100 / 3, 50, 50 + 50 / 3, 50 + 100 / 3, 100]
    )
    assert seen[-1].out == str(generation.output_dir)
    # The child got the report through the file, the arguments and the environment it needs.
    metadata = json.loads((generation.output_dir / "generation.json").read_text())
    assert metadata["report"] == "Emphysema in both upper lobes."
    assert metadata["seed"] == 11
    (call,) = calls
    assert call["args"][0] == "PythonSlicer"
    assert call["cwd"] == str(job.library_root())
    assert call["environment"]["PYTHONPATH"].split(os.pathsep)[0] == str(job.library_root())
    assert call["environment"]["PYTHONUNBUFFERED"] == "1"
    assert generation.events == seen


def test_job_poll_does_not_block(tmp_path, fake_script):
    generation = GenerationJob(GenerationRequest("x", seed=1, steps=2), launcher=fake_launcher(fake_script),
                               work_dir=tmp_path / "work")
    with pytest.raises(RuntimeError, match="start"):
        generation.wait()
    generation.start()
    events = []
    deadline = time.monotonic() + 30
    while not generation.finished and time.monotonic() < deadline:
        started = time.monotonic()
        events += generation.poll()
        assert time.monotonic() - started < 0.5
        time.sleep(0.02)
    assert generation.succeeded
    assert events == generation.events and events[-1].kind is EventKind.DONE
    with pytest.raises(RuntimeError, match="already"):
        generation.start()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("error", "the report is too short"),
        ("crash", "the generator failed (exit code 1): RuntimeError: CUDA out of memory"),
        ("noresult", "without writing a result folder"),
    ],
)
def test_job_failures_come_back_in_words(tmp_path, fake_script, mode, expected):
    generation = GenerationJob(GenerationRequest("x", seed=1, steps=1), launcher=fake_launcher(fake_script, mode=mode),
                               work_dir=tmp_path / "work")
    generation.start()
    generation.wait()
    assert generation.finished and not generation.succeeded
    assert expected in generation.failure_message()
    assert not generation.output_dir.exists()


def _started_slow_job(tmp_path, fake_script, calls) -> GenerationJob:
    generation = GenerationJob(GenerationRequest("x", seed=1), launcher=fake_launcher(fake_script, calls, mode="slow"),
                               work_dir=tmp_path / "work")
    generation.start()
    deadline = time.monotonic() + 30
    while not any(e.kind is EventKind.PROGRESS for e in generation.events):
        assert time.monotonic() < deadline, "the stand-in generator did not start"
        generation.poll()
        time.sleep(0.02)
    return generation


def _wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
def test_cancel_kills_the_launcher_and_the_interpreter_it_started(tmp_path, fake_script):
    calls = []
    generation = _started_slow_job(tmp_path, fake_script, calls)
    launcher_pid, interpreter_pid = read_pids(calls[0]["pid_file"])
    assert process_alive(launcher_pid) and process_alive(interpreter_pid)

    started = time.monotonic()
    generation.cancel()
    assert time.monotonic() - started < 0.5  # the GUI thread is not held up
    _wait_until(lambda: generation.poll() is not None and generation.finished)  # the panel leaves "running"
    assert processes_end([launcher_pid, interpreter_pid])
    assert generation.cancelled and not generation.succeeded
    assert generation.failure_message() == job.CANCELLED_MESSAGE
    assert not generation.output_dir.exists()
    generation.cleanup()
    assert not generation.work_dir.exists()
    generation.cancel()  # cancelling a finished job is harmless


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
def test_stopping_all_jobs_on_exit_kills_them_and_removes_their_folders(tmp_path, fake_script):
    calls = []
    generations = [_started_slow_job(tmp_path / str(n), fake_script, calls) for n in range(2)]
    pids = [pid for call in calls for pid in read_pids(call["pid_file"])]
    job.stop_all_jobs()
    assert not any(g.work_dir.exists() for g in generations)
    assert processes_end(pids)
    job.stop_all_jobs()  # nothing left to stop


@pytest.mark.skipif(os.name == "nt", reason="POSIX sessions")
def test_launcher_starts_a_session_of_its_own_and_decodes_utf8(tmp_path):
    script = "import os; print(os.getsid(0), os.getpgid(0)); print('Ödem – 5 mm')"
    process = job.subprocess_launcher([sys.executable, "-c", script], {"PYTHONIOENCODING": "utf-8"}, str(tmp_path),
                                      base_environment={"PATH": os.environ.get("PATH", "")})
    output, _ = process.communicate(timeout=30)
    assert process.stdout.encoding == "utf-8"
    session, group = (int(n) for n in output.split("\n")[0].split())
    assert session == group == process.pid != os.getsid(0)
    assert output.split("\n")[1] == "Ödem – 5 mm"


# ---------------------------------------------------------------------------------------
# Environment checks
# ---------------------------------------------------------------------------------------


def test_missing_packages_names_pip_requirements(monkeypatch):
    monkeypatch.setattr(job, "REQUIRED_PACKAGES", {"json": "json", "surely_not_a_module_xyz": "surely-not>=1"})
    monkeypatch.setattr(job, "TILING_PACKAGES", {"also_not_a_module_xyz": "also-not"})
    assert job.missing_packages() == ["surely-not>=1"]
    assert job.missing_packages(tiling=True) == ["surely-not>=1", "also-not"]


def test_library_root_holds_medsynlib():
    assert (job.library_root() / "MedSynLib" / "anatomy.py").is_file()


def test_python_executable_prefers_pythonslicer(tmp_path, monkeypatch):
    slicer_python = tmp_path / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    monkeypatch.setattr(sys, "executable", str(slicer_python))
    assert job.find_python_executable() == str(slicer_python)
    plain = tmp_path / "python3"
    plain.touch()
    monkeypatch.setattr(sys, "executable", str(plain))
    slicer_python.touch()
    assert job.find_python_executable() == str(slicer_python)


def test_a_chosen_model_folder_must_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        job.check_model_dir(str(tmp_path / "nowhere"))
    job.check_model_dir(str(tmp_path))
    job.check_model_dir(None)  # the embedded model: the library knows where it is, and says if it is missing
