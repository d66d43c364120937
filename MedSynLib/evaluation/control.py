"""Does a trained model obey its inputs? Text control and anatomy control, measured.

    python -m MedSynLib.evaluation.control --model DIR --out REPORT_DIR [--samples 16]
        [--prompts prompts.txt] [--guidance 1,2,4] [--steps 5,10] [--anatomy-samples 8]

Text control: every prompt is generated `samples` times (seeds 0..n-1) at every setting of
guidance scale x stage-1 steps; each volume goes through the finding detectors
(`findings.py`) with its own generated lung masks. Per setting: for each finding, the rate
at which volumes show it when the prompt asks for it and when the prompt denies it, and how
often the nodule's lobe / the effusion's side is the one asked for.

Anatomy control (needs SimpleITK and the classical segmenter):
- consistency: Dice between the generated masks and the masks the classical segmenter
  finds in the generated CT (do the CT and its masks agree?);
- conditioning: generation given a held-out phantom's anatomy; Dice between that anatomy and
  the masks segmented from the generated CT (does the CT follow the anatomy it was given?).

Writes REPORT_DIR/control.json (all numbers and every sample's detections), table.md and
examples.png (the first sample of each prompt, default setting).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from MedSynLib.anatomy import standard_masks
from MedSynLib.configuration import atomic_write_bytes, config_to_dict
from MedSynLib.errors import (
    EXISTING_FILE,
    EXISTING_FOLDER,
    GUIDANCE,
    OUTPUT_FILE,
    OUTPUT_FOLDER,
    STEPS,
    WORKERS,
    MedSynError,
    integer_argument,
    read_text,
    run_command,
)
from MedSynLib.evaluation.findings import (
    FINDING_KINDS,
    Detection,
    adherence_rates,
    detect_findings,
    requested_findings,
)
from MedSynLib.io.preview import preview_image
from MedSynLib.pipeline.sampling import DTYPE_CHOICES
from MedSynLib.text_encoder import TextFeatures, check_report

# Phantom-style reports: each finding asked for on its own, with the others denied.
DEFAULT_PROMPTS = (
    "Findings: Moderate left pleural effusion. There are no lung nodules. The heart is not enlarged. "
    "Impression: Left pleural effusion.",
    "Findings: There is a moderate right pleural effusion. No pulmonary nodules. Normal heart size. "
    "Impression: Right pleural effusion.",
    "Findings: A 14 mm nodule is seen in the right upper lobe. No pleural effusion. The heart is not enlarged. "
    "Impression: Right upper lobe nodule.",
    "Findings: There is a 14 mm solid nodule in the left lower lobe. There is no pleural effusion. "
    "No cardiomegaly. Impression: Left lower lobe nodule.",
    "Findings: The heart is enlarged. No pleural effusion. There are no lung nodules. Impression: Cardiomegaly.",
    "Findings: No pulmonary nodules. No pleural effusion. The heart is not enlarged. "
    "Impression: No acute cardiopulmonary abnormality.",
)
CONSISTENCY_STRUCTURES = ("left_lung", "right_lung", "airway", "vessels")
SAMPLES = integer_argument(0, 10_000)


@dataclass(frozen=True)
class Setting:
    """One sampling setting; None means the model's default."""

    guidance: float | None = None
    steps: int | None = None

    def label(self) -> str:
        return f"guidance {_or_default(self.guidance)}, {_or_default(self.steps)} steps"


def _or_default(value) -> str:
    return "default" if value is None else f"{value:g}"


def settings_grid(guidance: Iterable[float | None], steps: Iterable[int | None]) -> list[Setting]:
    return [Setting(g, s) for g, s in product(guidance, steps)]


def _detect(ct_hu: np.ndarray, spacing, masks: dict[str, np.ndarray]) -> dict[str, dict]:
    return {kind: detection.as_dict() for kind, detection in detect_findings(ct_hu, spacing, masks).items()}


class _Inline(Executor):
    """Runs submitted work at once (one process; no pickling of volumes)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def text_control(pipeline, prompts: Iterable[str], settings: list[Setting], *, samples: int, device="cpu",
                 dtype: str = "float32", report_features: dict | None = None, workers: int = 1, progress: bool = True) -> dict:
    """Generate and detect; returns per-setting rates, per-prompt rates and every sample's record.

    report_features: prompt -> TextFeatures, encoded beforehand (for machines without the encoder).
    The first sample of each prompt at the first setting is kept as `examples` (preview images).
    """
    prompts = list(prompts)
    if samples < 1 or not prompts or not settings:
        raise MedSynError("text control needs at least one prompt, one setting and one sample")
    features = report_features or {p: pipeline.encode_report(p) for p in prompts}
    records, examples = [], {}
    total = len(prompts) * len(settings) * samples
    with (ProcessPoolExecutor(workers) if workers > 1 else _Inline()) as pool, \
            tqdm(total=total, desc="text control", unit="volume", disable=not progress) as bar:
        pending = []
        for setting, prompt in product(settings, prompts):
            for seed in range(samples):
                result = pipeline.generate(prompt, seed=seed, guidance=setting.guidance, steps=setting.steps,
                                           device=device, dtype=dtype, report_features=features[prompt])
                if setting == settings[0] and seed == 0:
                    examples[prompt] = preview_image(result.ct_hu, result.masks)
                detection = pool.submit(_detect, result.ct_hu, result.geometry.spacing, result.masks)
                pending.append(({"setting": setting, "prompt": prompt, "seed": seed}, detection))
                bar.update(1)
        for record, detection in pending:
            records.append({**record, "detected": detection.result()})
    return {"settings": [_summary(setting, [r for r in records if r["setting"] == setting], prompts)
                         for setting in settings],
            "records": [{**r, "setting": r["setting"].__dict__} for r in records],
            "examples": examples}


def _summary(setting: Setting, records: list[dict], prompts: list[str]) -> dict:
    def pairs(subset):
        return [(requested_findings(r["prompt"]), {k: Detection(**v) for k, v in r["detected"].items()})
                for r in subset]

    per_prompt = {}
    for prompt in prompts:
        mine = [r for r in records if r["prompt"] == prompt]
        per_prompt[prompt] = {kind: float(np.mean([r["detected"][kind]["present"] for r in mine]))
                              for kind in FINDING_KINDS}
    return {"setting": setting.__dict__, "label": setting.label(), "samples": len(records),
            "rates": adherence_rates(pairs(records)), "detected_rate_per_prompt": per_prompt}


def anatomy_control(pipeline, *, samples: int, prompt: str, device="cpu", dtype: str = "float32", phantom_seed: int = 100_000,
                    progress: bool = True) -> dict:
    """Consistency (generated masks vs the segmented generated CT) and conditioning on phantom anatomy."""
    from MedSynLib.data.segmentation import get_segmenter
    from MedSynLib.evaluation.anatomy_metrics import anatomy_consistency
    from MedSynLib.geometry import Geometry, fitted_grid, resample
    from MedSynLib.phantoms.chest import make_phantom

    segmenter = get_segmenter("classical")
    size, structures = pipeline.stage2.config.size, pipeline.config.structures
    free, given, volumes = [], [], []
    for i in tqdm(range(samples), desc="anatomy control", unit="pair", disable=not progress):
        result = pipeline.generate(prompt, seed=i, device=device, dtype=dtype)
        masks = standard_masks(result.masks)
        free.append(anatomy_consistency(result.geometry.image(result.ct_hu), masks, segmenter))
        voxel_ml = float(np.prod(result.geometry.spacing)) / 1000
        volumes.append({n: float(masks[n].sum()) * voxel_ml for n in CONSISTENCY_STRUCTURES if n in masks})
        phantom = make_phantom(size, seed=phantom_seed + i)
        source = Geometry.centered(phantom.ct_hu.shape, phantom.spacing)
        grid = fitted_grid(source, size)
        anatomy = {n: resample(phantom.masks[n].astype(np.uint8), source, grid, labels=True).astype(bool)
                   for n in structures}
        result = pipeline.generate(prompt, seed=i, device=device, dtype=dtype, anatomy=anatomy, geometry=grid)
        given.append(anatomy_consistency(result.geometry.image(result.ct_hu), standard_masks(anatomy), segmenter))
    # Dice is 1 when both masks are empty: the generated volumes say whether a structure was drawn at all.
    return {"samples": samples, "prompt": prompt,
            "generated_volume_ml": {n: float(np.mean([v[n] for v in volumes])) for n in volumes[0]} if volumes else {},
            "consistency": _dice_summary(free), "conditioned_on_phantom_anatomy": _dice_summary(given)}


def _dice_summary(rows: list[dict]) -> dict:
    summary = {}
    for name in CONSISTENCY_STRUCTURES:
        values = [row[name] for row in rows if row.get(name) is not None]
        if values:
            summary[name] = {"mean": float(np.mean(values)), "min": float(np.min(values)), "n": len(values)}
    return summary


# ----------------------------------------------------------------------------- reports
def control_table_markdown(text: dict | None, anatomy: dict | None) -> str:
    lines = []
    if text:
        lines += ["| setting | finding | shown when asked | shown when denied | location right |",
                  "|---|---|---|---|---|"]
        for entry in text["settings"]:
            for kind in FINDING_KINDS:
                rate = entry["rates"][kind]
                lines.append(f"| {entry['label']} | {kind} | {_pct(rate['rate_when_requested'], rate['n_requested'])} "
                             f"| {_pct(rate['rate_when_denied'], rate['n_denied'])} "
                             f"| {_pct(rate.get('location_accuracy'), rate.get('n_located'))} |")
    if anatomy:
        lines += ["", "| structure | generated volume (mL, mean) | consistency Dice (mean / min) "
                      "| Dice to the given phantom anatomy (mean / min) |", "|---|---|---|---|"]
        for name in CONSISTENCY_STRUCTURES:
            free = anatomy["consistency"].get(name)
            given = anatomy["conditioned_on_phantom_anatomy"].get(name)
            volume = anatomy.get("generated_volume_ml", {}).get(name)
            lines.append(f"| {name} | {'-' if volume is None else f'{volume:.1f}'} | {_dice(free)} | {_dice(given)} |")
    return "\n".join(lines) + "\n"


def _pct(rate: float | None, n: int | None) -> str:
    return "-" if rate is None else f"{100 * rate:.0f} % (n={n})"


def _dice(entry: dict | None) -> str:
    return "-" if entry is None else f"{entry['mean']:.3f} / {entry['min']:.3f}"


def examples_figure(examples: dict, path: Path, *, panel: int = 160) -> None:
    """One row per prompt: its impression, then axial / coronal / sagittal views."""
    label_width = 260
    rows = [(prompt.partition("Impression:")[2].strip() or prompt[:60], image.resize((3 * panel, panel)))
            for prompt, image in examples.items()]
    canvas = Image.new("RGB", (label_width + 3 * panel, panel * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(rows):
        canvas.paste(image, (label_width, i * panel))
        draw.multiline_text((8, i * panel + panel // 2 - 12), _wrap(label, 34), fill="black")
    canvas.save(path)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


def write_report(out: Path, text: dict | None, anatomy: dict | None, extra: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if text and text.get("examples"):
        examples_figure(text["examples"], out / "examples.png")
    data = {**(extra or {}), "text_control": None if text is None else {k: v for k, v in text.items() if k != "examples"},
            "anatomy_control": anatomy}
    (out / "control.json").write_text(json.dumps(data, indent=1))
    (out / "table.md").write_text(control_table_markdown(text, anatomy))


def save_report_features(path: Path, features: dict, encoder: dict) -> None:
    """Prompt -> TextFeatures into one safetensors file, with the encoder that made them."""
    tensors = {}
    for i, item in enumerate(features.values()):
        tensors[f"features.{i}"], tensors[f"mask.{i}"] = item.features.contiguous(), item.mask.to(torch.uint8)
    atomic_write_bytes(path, save(tensors, metadata={"prompts": json.dumps(list(features)), "encoder": json.dumps(encoder)}))


def load_report_features(path: Path, prompts: list[str], encoder: dict) -> dict:
    try:
        with safe_open(path, "pt") as file:
            if json.loads(file.metadata()["encoder"]) != encoder:
                raise MedSynError(f"{path} was encoded with another text encoder than this model's {encoder}")
            stored = json.loads(file.metadata()["prompts"])
            loaded = {p: TextFeatures(file.get_tensor(f"features.{i}"), file.get_tensor(f"mask.{i}").bool())
                      for i, p in enumerate(stored)}
    except (OSError, SafetensorError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise MedSynError(f"cannot read report features {path}: {error}") from error
    missing = [p for p in prompts if p not in loaded]
    if missing:
        raise MedSynError(f"{path} holds no features for {len(missing)} prompt(s), e.g. {missing[0][:60]!r}")
    return loaded


# ----------------------------------------------------------------------------- command line
def _settings(item: Callable[[str], Any]) -> Callable[[str], list]:
    """An argparse type: comma-separated values of `item`'s type, or 'default' for the model's."""

    def parse(text: str) -> list:
        return [None if value.strip() == "default" else item(value.strip()) for value in text.split(",")]

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.evaluation.control", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=EXISTING_FOLDER, default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True, help="report folder")
    parser.add_argument("--prompts", type=EXISTING_FILE, help="text file, one report per line (default: built-in prompts)")
    parser.add_argument("--samples", type=SAMPLES, default=16, help="volumes per prompt and setting (0: no text control)")
    parser.add_argument("--guidance", type=_settings(GUIDANCE), default=[None],
                        help="comma-separated guidance scales, or 'default'")
    parser.add_argument("--steps", type=_settings(STEPS), default=[None],
                        help="comma-separated stage-1 step counts, or 'default'")
    parser.add_argument("--anatomy-samples", type=SAMPLES, default=0, help="volume pairs for anatomy control (0: skip)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="network arithmetic, as generate's")
    parser.add_argument("--workers", type=WORKERS, default=1, help="processes running the finding detectors")
    parser.add_argument("--save-report-features", type=OUTPUT_FILE, metavar="FILE",
                        help="encode the prompts into FILE (safetensors) and stop")
    parser.add_argument("--report-features", type=EXISTING_FILE, metavar="FILE",
                        help="prompt features from --save-report-features: sample where the encoder is absent")
    args = parser.parse_args(argv)

    from MedSynLib.pipeline.generation import MedSynPipeline
    from MedSynLib.pipeline.model_folder import EMBEDDED_MODEL
    from MedSynLib.pipeline.sampling import resolve_device

    prompts = ([check_report(line) for line in read_text(args.prompts, "prompts file").splitlines() if line.strip()]
               if args.prompts else list(DEFAULT_PROMPTS))
    pipeline = MedSynPipeline.from_pretrained(args.model or EMBEDDED_MODEL)
    encoder = config_to_dict(pipeline.text_encoder_config)
    if args.save_report_features:
        save_report_features(args.save_report_features, {p: pipeline.encode_report(p) for p in prompts}, encoder)
        return 0
    features = load_report_features(args.report_features, prompts, encoder) if args.report_features else None
    device = resolve_device(args.device)
    settings = settings_grid(args.guidance, args.steps)
    text = text_control(pipeline, prompts, settings, samples=args.samples, device=device, dtype=args.dtype,
                        workers=args.workers, report_features=features) if args.samples else None
    anatomy = (anatomy_control(pipeline, samples=args.anatomy_samples, prompt=prompts[-1], device=device, dtype=args.dtype)
               if args.anatomy_samples else None)
    write_report(args.out, text, anatomy, {"model": str(args.model or EMBEDDED_MODEL), "device": str(device),
                                           "dtype": args.dtype})
    print(control_table_markdown(text, anatomy))
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
