"""MedSyn: text-guided synthesis of 3D chest CT with its anatomy, in 3D Slicer.

A thin Qt layer: the widget edits a typed parameter node; the Logic runs
`python -m MedSynLib.generate` in a background process (Slicer's own Python) and imports
the result with the Qt-free functions of `MedSynSlicerLib` (tested headless).
"""

import importlib
import logging
import random
import sys
from pathlib import Path

import slicer

# The oldest Slicer this module runs in (its Python 3.9 and every Slicer API used here were
# checked against the 5.6 sources); newer releases and the preview run it too.
MINIMUM_SLICER_VERSION = (5, 6)


def _require_slicer_version() -> None:
    """On an older Slicer, stop loading with one message that says what is needed. Runs
    before anything that an older Slicer (or its Python 3.6) cannot import."""
    version = (slicer.app.majorVersion, slicer.app.minorVersion)
    if version < MINIMUM_SLICER_VERSION:
        raise RuntimeError(
            "MedSyn needs 3D Slicer {}.{} or newer; this is Slicer {}.{}. "
            "Install a current release from https://download.slicer.org".format(*MINIMUM_SLICER_VERSION, *version)
        )


_require_slicer_version()

from typing import Annotated  # noqa: E402


def _make_library_importable() -> None:
    """Installed, MedSynLib sits beside this file; in a source checkout it is two folders up."""
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent.parent):
        if (folder / "MedSynLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.insert(0, str(folder))
            return


_make_library_importable()

import qt  # noqa: E402
import vtk  # noqa: E402
from MedSynSlicerLib import job as medsynjob  # noqa: E402
from MedSynSlicerLib import mrml as medsynmrml  # noqa: E402
from MedSynSlicerLib import runner as medsynrunner  # noqa: E402
from slicer import vtkMRMLSegmentationNode  # noqa: E402
from slicer.i18n import tr as _  # noqa: E402
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

POLL_INTERVAL_MS = 200

#
# MedSyn
#


class MedSyn(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSyn")
        self.parent.categories = [_("Artificial Intelligence")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSyn for 3D Slicer developers"]
        self.parent.helpText = _("""
Generates a synthetic 3D chest CT and its anatomy (lung lobes, airway, vessels) from a
free-text radiology report, with a text-conditioned diffusion model (MedSyn). Optionally
the anatomy can be given as a segmentation, and the CT is generated to fit it.
<p><b>Every image made here is synthetic.</b> It shows no patient, is not a diagnosis and must
not be used for clinical decisions. The embedded default model is a small demonstration
model trained on phantoms (it draws the lobes, airway and vessels, and an effusion's side moves
the lungs, but findings are not yet drawn at their true densities);
results are only as good as the model folder used.</p>
<p>Console use:</p>
<pre>
import MedSyn
volume, segmentation = MedSyn.MedSynLogic().generate(
    "Severe emphysema in both upper lobes.", seed=42, steps=50, device="auto")
</pre>
<p>Parameters: <i>model</i> (folder; empty = embedded default), <i>steps</i> and <i>guidance</i>
(None = the model's defaults), <i>tileSize</i> (stage-2 tiles of that many voxels a side; 0 = whole
volume), <i>conditioningSegmentation</i> (a segmentation node whose segments are matched to
MedSyn structures by terminology or name).</p>
""")
        self.parent.acknowledgementText = _("""
MedSyn (Xu et al., "MedSyn: Text-guided Anatomy-aware Synthesis of High-Fidelity 3D CT
Images", IEEE TMI 2024) is the method this module implements; the code is an independent
implementation by the MedSyn for 3D Slicer developers.
""")
        # A generation still running when Slicer quits is killed and its work folder removed.
        slicer.app.connect("aboutToQuit()", medsynjob.stop_all_jobs)


#
# MedSynParameterNode
#


@parameterNodeWrapper
class MedSynParameterNode:
    """
    reportText - the radiology report the CT is generated from.
    modelFolder - model folder; empty for the embedded default model.
    seed, randomSeed - the random seed; with randomSeed a new one is drawn (and shown) each run.
    steps - stage-1 sampling steps; 0 for the model's default.
    guidanceScale - classifier-free guidance scale; 0 for the model's default.
    device - "auto", "cpu" or "cuda".
    tileSize - stage-2 tiles of tileSize^3 voxels, bounding memory; 0 for the whole volume at once.
    conditioningSegmentation - optional anatomy to generate the CT for.
    """

    reportText: str = ""
    modelFolder: str = ""
    seed: Annotated[int, WithinRange(0, medsynjob.MAX_SEED)] = 0
    randomSeed: bool = True
    steps: Annotated[int, WithinRange(0, 1000)] = 0
    guidanceScale: Annotated[float, WithinRange(0.0, 30.0)] = 0.0
    device: Annotated[str, Choice(list(medsynjob.DEVICES))] = "auto"
    tileSize: Annotated[int, WithinRange(0, 1024)] = 0
    conditioningSegmentation: vtkMRMLSegmentationNode


#
# MedSynWidget
#


class MedSynWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSyn.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedSynLogic()

        self.ui.exampleComboBox.addItem(_("Insert an example report..."))
        for title, text in medsynjob.EXAMPLE_REPORTS:
            self.ui.exampleComboBox.addItem(title, text)
        self.ui.exampleComboBox.currentIndexChanged.connect(self.onExampleSelected)
        self.ui.reportTextEdit.textChanged.connect(self.onReportChanged)
        # Not currentPathChanged: ctkPathLineEdit does not emit it for an empty (or invalid) text.
        modelPathText = slicer.util.findChildren(self.ui.modelPathLineEdit, className="QLineEdit")[0]
        modelPathText.textChanged.connect(self.onModelPathEdited)
        self.ui.generateButton.clicked.connect(self.onGenerate)
        self.ui.cancelButton.clicked.connect(self.onCancel)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None:
            self.logic.cancelGeneration()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.cancelGeneration()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """What connectGui does not cover, and button states.

        The report and the model folder are synced by hand: the report box is only rewritten
        when its text differs (rewriting it on every keystroke would move the cursor), and the
        model folder is a str where empty means the embedded default (ctkPathLineEdit binds to Path).
        """
        parameters = self._parameterNode
        if parameters and self.ui.reportTextEdit.toPlainText() != parameters.reportText:
            wasBlocked = self.ui.reportTextEdit.blockSignals(True)
            self.ui.reportTextEdit.setPlainText(parameters.reportText)
            self.ui.reportTextEdit.blockSignals(wasBlocked)
        fieldFolder = medsynjob.model_folder_from_field(self.ui.modelPathLineEdit.currentPath)
        if parameters and fieldFolder != parameters.modelFolder:
            self.ui.modelPathLineEdit.currentPath = parameters.modelFolder  # echoes back an equal value
        self.ui.seedSpinBox.enabled = bool(parameters) and not parameters.randomSeed
        running = self.logic.isRunning
        hasReport = bool(parameters and parameters.reportText.strip())
        self.ui.generateButton.enabled = hasReport and not running
        self.ui.generateButton.toolTip = _("Generate a synthetic CT from the report") if hasReport else _(
            "Write or choose a report first"
        )
        self.ui.cancelButton.enabled = running

    def onExampleSelected(self, index) -> None:
        if index > 0 and self._parameterNode:
            self._parameterNode.reportText = self.ui.exampleComboBox.itemData(index)
        self.ui.exampleComboBox.setCurrentIndex(0)

    def onReportChanged(self) -> None:
        if self._parameterNode:
            self._parameterNode.reportText = self.ui.reportTextEdit.toPlainText()

    def onModelPathEdited(self, text) -> None:
        if self._parameterNode:
            self._parameterNode.modelFolder = medsynjob.model_folder_from_field(text)

    def onGenerate(self) -> None:
        parameters = self._parameterNode
        # No wait cursor while installing: it asks first, and pip shows its own progress (Slicer 5.12+).
        with slicer.util.tryWithErrorDisplay(_("Failed to install MedSyn's Python packages.")):
            if not self.logic.setupPythonRequirements(askConfirmation=True, tiling=parameters.tileSize > 0):
                return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the generation."), waitCursor=True):
            request = self.logic.requestFromParameterNode(parameters)
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = "%p%"
            self._log(_("Generating with seed {seed}...").format(seed=request.seed))
            self.logic.startGeneration(
                request,
                conditioningSegmentation=parameters.conditioningSegmentation,
                onEvent=self.onJobEvent,
                onFinished=self.onJobFinished,
            )
        self.updateGUIFromParameterNode()

    def onCancel(self) -> None:
        self.logic.cancelGeneration()
        self._log(_("Cancelling..."))

    def onJobEvent(self, event) -> None:
        if event.kind is medsynjob.EventKind.PROGRESS:
            self.ui.progressBar.value = int(event.percent)
            self.ui.progressBar.format = f"{event.stage}: {event.step}/{event.steps}"
            if event.step in (0, 1, event.steps):
                self._log(event.describe())
        else:
            self._log(event.describe())

    def onJobFinished(self, result, error) -> None:
        self.updateGUIFromParameterNode()
        if result is None:
            self.ui.progressBar.format = _("not generated")
            self._log(error)
            if error != medsynjob.CANCELLED_MESSAGE:
                slicer.util.errorDisplay(_("Generation failed: {error}").format(error=error))
            return
        self.ui.progressBar.value = 100
        self.ui.progressBar.format = _("done")
        self._log(_("Added '{volume}' and '{segmentation}'.").format(
            volume=result.volume_node.GetName(), segmentation=result.segmentation_node.GetName()))
        slicer.util.setSliceViewerLayers(background=result.volume_node, fit=True)
        slicer.util.resetThreeDViews()

    def _log(self, text) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)


#
# MedSynLogic
#


def _slicerLauncher(args, environment, cwd):
    """Start a process in Slicer's startup environment, as slicer.util.launchConsoleProcess would,
    but in a process group of its own (so Cancel reaches python-real) and read as UTF-8."""
    return medsynjob.subprocess_launcher(args, environment, cwd, base_environment=slicer.util.startupEnvironment())


def _printEvent(event) -> None:
    print(event.describe())


class MedSynLogic(ScriptedLoadableModuleLogic):
    """Runs generations; no widgets. One generation at a time per logic instance."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._job = None
        self._onEvent = None
        self._onFinished = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self._poll)

    def getParameterNode(self):
        return MedSynParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._job is not None

    @staticmethod
    def requestFromParameterNode(parameters) -> medsynjob.GenerationRequest:
        """The request for the current parameters; draws (and stores) a new seed when randomSeed is set."""
        if parameters.randomSeed:
            parameters.seed = random.randint(0, medsynjob.MAX_SEED)
        return medsynjob.GenerationRequest(
            report=parameters.reportText,
            seed=parameters.seed,
            steps=parameters.steps or None,
            guidance=parameters.guidanceScale or None,
            model_dir=parameters.modelFolder.strip() or None,
            device=parameters.device,
            tile_size=parameters.tileSize,
        )

    def setupPythonRequirements(self, askConfirmation=True, tiling=False) -> bool:
        """Install what the generator imports, after asking; False if the user declined.

        PyTorch comes from the PyTorch extension (a build for this computer's GPU), at least the
        version the library needs; the pip calls after it are constrained to the installed torch,
        numpy and SimpleITK, so no dependency can replace them.
        """
        torchVersion = medsynjob.installed_version("torch")
        if torchVersion is None:
            if not self._installTorch(askConfirmation):
                return False
        elif not medsynjob.is_recent_torch(torchVersion):
            raise RuntimeError(_(
                "MedSyn needs PyTorch {minimum} or newer, and PyTorch {version} is installed. In the 'PyTorch Utils' "
                "module, install PyTorch with the version requirement '>={minimum}', restart Slicer and try again."
            ).format(minimum=medsynjob.MINIMUM_TORCH, version=torchVersion))
        missing = medsynjob.missing_packages(tiling=tiling)
        missingNoDeps = medsynjob.missing_no_deps_packages()
        if not missing and not missingNoDeps:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("MedSyn needs these Python packages, which will be downloaded and installed now:\n\n{packages}")
            .format(packages="\n".join(missing + missingNoDeps))
        ):
            return False
        if missing:
            with medsynjob.pinned_constraints() as constraints:
                slicer.util.pip_install([*missing, "--constraint", str(constraints)])
        if missingNoDeps:
            slicer.util.pip_install(["--no-deps", *missingNoDeps])
        importlib.invalidate_caches()
        stillMissing = medsynjob.missing_packages(tiling=tiling) + medsynjob.missing_no_deps_packages()
        if stillMissing:
            raise RuntimeError(_(
                "These packages were installed but cannot be imported yet: {packages}. "
                "Restart Slicer and try again."
            ).format(packages=", ".join(stillMissing)))
        return True

    @staticmethod
    def _installTorch(askConfirmation) -> bool:
        """PyTorch through the PyTorch extension, at the library's minimum version; False if declined."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(_(
                "MedSyn needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
                "restart Slicer, and try again."
            )) from error
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=f">={medsynjob.MINIMUM_TORCH}"
        )
        return torch is not None

    def startGeneration(self, request, conditioningSegmentation=None, onEvent=None, onFinished=None) -> None:
        """Start in the background. onEvent(JobEvent) for each progress/log line;
        onFinished(GenerationNodes or None, error message or None) at the end."""
        if self._job is not None:
            raise RuntimeError(_("A generation is already running."))
        job = medsynrunner.prepare_job(
            request, conditioning_segmentation=conditioningSegmentation, launcher=_slicerLauncher
        )
        try:
            job.start()
        except Exception:
            job.cleanup()
            raise
        self._job, self._onEvent, self._onFinished = job, onEvent, onFinished
        self._timer.start()

    def cancelGeneration(self) -> None:
        """Stop the running generation; nothing is added to the scene."""
        if self._job is not None:
            self._job.cancel()

    def _poll(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            if self._onEvent:
                self._onEvent(event)
        if not job.finished:
            return
        self._timer.stop()
        self._job = None
        result, error = None, None
        try:
            result = medsynrunner.import_result(slicer.mrmlScene, job)
        except medsynrunner.GenerationFailed as failure:  # cancelled, or the generator said why
            error = str(failure)
            logging.info(f"MedSyn: {error}")
        except Exception as exception:  # reported to the caller, who shows it
            logging.exception("MedSyn: importing the result failed")
            error = str(exception)
        finally:
            job.cleanup()
        if self._onFinished:
            self._onFinished(result, error)

    def generate(self, report, seed=None, steps=None, guidance=None, model=None, device="auto", tileSize=0,
                 conditioningSegmentation=None, onEvent=None):
        """Generate synchronously (console use); returns (volume node, segmentation node).

        seed None draws one; steps/guidance None use the model's defaults; model None uses
        the embedded default model.
        """
        if seed is None:
            seed = random.randint(0, medsynjob.MAX_SEED)
        if not self.setupPythonRequirements(askConfirmation=not slicer.app.testingEnabled(), tiling=tileSize > 0):
            raise RuntimeError(_("MedSyn's Python requirements are not installed."))
        request = medsynjob.GenerationRequest(
            report=report,
            seed=seed,
            steps=steps,
            guidance=guidance,
            model_dir=str(model) if model else None,
            device=device,
            tile_size=tileSize,
        )
        result = medsynrunner.run_generation(
            slicer.mrmlScene,
            request,
            conditioning_segmentation=conditioningSegmentation,
            launcher=_slicerLauncher,
            on_event=onEvent or _printEvent,
            idle=slicer.app.processEvents,
        )
        return result.volume_node, result.segmentation_node


#
# MedSynTest
#


class MedSynTest(ScriptedLoadableModuleTest):
    """Runs real generations with a tiny untrained model made on the spot (CPU, a few steps)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GenerateAndCondition()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()

    def _tinyModel(self) -> Path:
        modelDir = Path(slicer.util.tempDirectory("MedSynTest")) / "tiny-model"
        process = slicer.util.launchConsoleProcess(
            [medsynjob.find_python_executable(), "-m", "MedSynLib.init_model", "--preset", "tiny", "--out", str(modelDir)],
            updateEnvironment=medsynjob.child_environment(),
            cwd=str(medsynjob.library_root()),
        )
        slicer.util.logProcessOutput(process)
        return modelDir

    def test_GenerateAndCondition(self):
        self.delayDisplay("Preparing a tiny model")
        logic = MedSynLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        modelDir = self._tinyModel()
        report = "Severe emphysema in both upper lobes."

        self.delayDisplay("Generating")
        volume, segmentation = logic.generate(report, seed=7, steps=2, model=modelDir, device="cpu")
        self.assertEqual(volume.GetAttribute(medsynmrml.SYNTHETIC_ATTRIBUTE), "true")
        ct = slicer.util.arrayFromVolume(volume)
        self.assertEqual(ct.ndim, 3)
        self.assertGreaterEqual(int(ct.min()), -1024)
        self.assertLessEqual(int(ct.max()), 600)
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        folder = shNode.GetItemParent(shNode.GetItemByDataNode(volume))
        self.assertEqual(folder, shNode.GetItemParent(shNode.GetItemByDataNode(segmentation)))
        self.assertEqual(shNode.GetItemAttribute(folder, medsynmrml.REPORT_ATTRIBUTE), report)
        self.assertGreater(segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        geometry = medsynmrml.geometry_of_volume_node(volume)
        self.assertEqual(tuple(geometry.shape), ct.shape)

        self.delayDisplay("Generating for the anatomy just made")
        volume2, segmentation2 = logic.generate(
            report, seed=8, steps=2, model=modelDir, device="cpu", conditioningSegmentation=segmentation
        )
        geometry2 = medsynmrml.geometry_of_volume_node(volume2)
        self.assertEqual(geometry2.shape, geometry.shape)
        for a, b in zip(geometry2.origin + geometry2.spacing, geometry.origin + geometry.spacing):
            self.assertAlmostEqual(a, b, places=3)
        self.delayDisplay("Test passed")

    def test_CancelLeavesSceneUnchanged(self):
        logic = MedSynLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))
        modelDir = self._tinyModel()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        finished = []
        request = medsynjob.GenerationRequest("Normal chest.", seed=1, steps=50, model_dir=str(modelDir), device="cpu")
        logic.startGeneration(request, onFinished=lambda result, error: finished.append((result, error)))
        logic.cancelGeneration()
        for _attempt in range(600):
            if finished:
                break
            slicer.app.processEvents()
            qt.QThread.msleep(50)
        self.assertEqual(len(finished), 1)
        self.assertIsNone(finished[0][0])
        self.assertEqual(finished[0][1], medsynjob.CANCELLED_MESSAGE)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")
