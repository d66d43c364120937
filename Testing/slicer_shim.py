"""Stand-ins for the Qt side of 3D Slicer, so that MedSyn.py imports on `slicer-core`.

`slicer-core` brings MRML, `slicer.util` and VTK but no Qt: no `qt` module, no
`slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper`, `slicer.i18n` or
`slicer.app`. These stand-ins are just enough to import the module file and drive its
Logic from a test: base classes that only keep their parent, a parameterNodeWrapper that
leaves the class as it is, `tr` as the identity, a QTimer whose ticks the test calls by hand,
and an app with a version, recorded signal connections and a processEvents that does
nothing. The widget (real Qt) is not exercised here.

Use `install(monkeypatch)`: every change is undone after the test.
"""

from __future__ import annotations

import sys
import types


class FakeTimer:
    """qt.QTimer stand-in: remembers its timeout slots; tick() runs them once."""

    instances: list[FakeTimer] = []

    def __init__(self) -> None:
        self._slots = []
        self.active = False
        self.interval = None
        FakeTimer.instances.append(self)

    @property
    def timeout(self):
        return types.SimpleNamespace(connect=self._slots.append)

    def setInterval(self, milliseconds: int) -> None:  # noqa: N802 (Qt's name)
        self.interval = milliseconds

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def tick(self) -> None:
        if self.active:
            for slot in list(self._slots):
                slot()


class _Annotation:
    def __init__(self, *args, **kwargs) -> None:
        self.args = args


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


class FakeApp:
    """slicer.app stand-in: its version, and the (signal, slot) pairs connected to it."""

    def __init__(self, version: tuple[int, int], testing: bool) -> None:
        self.majorVersion, self.minorVersion = version  # noqa: N815 (Qt's names)
        self.connections: list[tuple[str, object]] = []
        self._testing = testing

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def testingEnabled(self) -> bool:  # noqa: N802 (Qt's name)
        return self._testing

    def processEvents(self) -> None:  # noqa: N802 (Qt's name)
        pass


def _keep_parent(self, parent=None, *args, **kwargs) -> None:
    self.parent = parent


def install(monkeypatch, slicer, *, testing: bool = True, version: tuple[int, int] = (5, 13)):
    """Put the stand-ins in place on the imported slicer-core `slicer` package (Slicer `version`)."""
    FakeTimer.instances.clear()
    base = {
        name: type(name, (), {"__init__": _keep_parent})
        for name in (
            "ScriptedLoadableModule",
            "ScriptedLoadableModuleLogic",
            "ScriptedLoadableModuleTest",
            "ScriptedLoadableModuleWidget",
        )
    }
    modules = {
        "qt": _module("qt", QTimer=FakeTimer),
        "slicer.i18n": _module("slicer.i18n", tr=lambda text: text),
        "slicer.parameterNodeWrapper": _module(
            "slicer.parameterNodeWrapper", Choice=_Annotation, WithinRange=_Annotation,
            parameterNodeWrapper=lambda cls: cls,
        ),
        "slicer.ScriptedLoadableModule": _module("slicer.ScriptedLoadableModule", **base),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", FakeApp(version, testing), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer.vtkMRMLScene(), raising=False)
    monkeypatch.delitem(sys.modules, "MedSyn", raising=False)
