"""One evaluation run: real vs generated volumes -> metrics.json, table.md and plots.

The steps, in order (`run_evaluation`):

1. find the cases of both sets and check the output folder;
2. load each volume (progress bar), extract its features, its HU histogram, its anatomy
   (volumes from its own masks, and from the segmenter run on the CT), airway topology, the
   consistency of generated masks with the segmenter's, and, for generated volumes with a
   report, the findings the report asks for and the detectors' verdicts;
3. distribution metrics on the feature sets (FD and unbiased MMD^2 with bootstrap intervals,
   per feature group too), diversity (pairwise 3D MS-SSIM) and memorisation (nearest real);
4. write metrics.json, table.md (the layout of Table 1 of the paper) and the PNG plots.

The airway volume of Table 1 is measured the same way for both rows: the segmenter's airway
in each CT when a segmenter is used (the paper segments the generated images: its ablation
without shape channels still has an airway volume), otherwise each volume's own airway mask.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from MedSynLib.errors import MedSynError
from MedSynLib.evaluation import plots
from MedSynLib.evaluation.anatomy_metrics import airway_topology, anatomy_consistency, structure_volumes
from MedSynLib.evaluation.cases import CaseFiles, discover_cases, has_lobes, load_case
from MedSynLib.evaluation.distribution import distribution_metrics
from MedSynLib.evaluation.diversity import nearest_real, pairwise_ms_ssim, prepare_volume
from MedSynLib.evaluation.features import FeatureExtractor, body_crop, get_extractor
from MedSynLib.evaluation.findings import adherence_rates, detect_findings, requested_findings
from MedSynLib.hounsfield import MODEL_HU_RANGE
from MedSynLib.io.volumes import check_output_folder

HIST_EDGES = np.linspace(*MODEL_HU_RANGE, 82)  # 20 HU bins
AIRWAY_UNIT = 1e4  # Table 1 reports airway volume in units of 10^4 mm^3


@dataclass
class EvaluationOptions:
    features: str = "chest-ct"
    segmenter: str | None = "classical"
    method: str = "MedSyn"
    n_bootstrap: int = 200
    seed: int = 0
    device: str = "auto"
    ms_ssim_size: int = 96
    max_pairs: int = 200
    copy_factor: float = 0.5
    findings: bool = True
    extractor_options: dict = field(default_factory=dict)


@dataclass
class CaseResult:
    case_id: str
    set: str
    features: np.ndarray
    histogram: np.ndarray
    volumes_masks: dict[str, float] = field(default_factory=dict)
    volumes_segmented: dict[str, float] = field(default_factory=dict)
    airway: dict = field(default_factory=dict)
    consistency: dict[str, float] = field(default_factory=dict)
    requested: dict | None = None
    detected: dict | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict:
        out = {"case_id": self.case_id, "set": self.set, "volumes_mm3_masks": self.volumes_masks,
               "volumes_mm3_segmented": self.volumes_segmented, "airway": self.airway,
               "consistency_dice": self.consistency, "seconds": self.seconds}
        if self.requested is not None:
            out["requested_findings"] = {k: (asdict(v) if v is not None else None) for k, v in self.requested.items()}
            out["detected_findings"] = {k: v.as_dict() for k, v in self.detected.items()}
        return out


def _segment(segmenter, loaded) -> dict[str, np.ndarray] | None:
    if segmenter is None:
        return None
    try:
        return segmenter(loaded.image).masks
    except (ValueError, RuntimeError) as error:  # a segmenter that finds no lungs says so; go on
        print(f"medsyn: warning: segmenting {loaded.case.case_id} failed: {error}", file=sys.stderr)
        return None


def evaluate_case(case: CaseFiles, role: str, extractor: FeatureExtractor, segmenter, options: EvaluationOptions,
                  keep_volume: list) -> CaseResult:
    """Everything measured on one volume (see the module docstring, step 2)."""
    timings = {}
    start = time.perf_counter()
    loaded = load_case(case)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    features = extractor(loaded.hu, loaded.spacing)
    if not np.isfinite(features).all():  # the distribution metrics would fail on them, far from the cause
        raise MedSynError(f"the {extractor.name} features of {case.ct} are not finite (NaN or infinite)")
    timings["features"] = time.perf_counter() - start

    crop = body_crop(loaded.hu)
    counts, _ = np.histogram(np.clip(crop, HIST_EDGES[0], HIST_EDGES[-1]), bins=HIST_EDGES)
    result = CaseResult(case.case_id, role, features, counts / max(counts.sum(), 1))

    start = time.perf_counter()
    found = _segment(segmenter, loaded)
    timings["segmentation"] = time.perf_counter() - start
    if loaded.masks:
        result.volumes_masks = structure_volumes(loaded.masks, loaded.spacing)
    if found is not None:
        result.volumes_segmented = structure_volumes(found, loaded.spacing)
    airway_source = found if found is not None and "airway" in found else loaded.masks
    if airway_source and "airway" in airway_source:
        result.airway = {**airway_topology(airway_source["airway"], loaded.spacing),
                         "source": "segmenter" if airway_source is found else "masks"}
    if role == "fake" and loaded.masks and found is not None:
        result.consistency = anatomy_consistency(loaded.image, loaded.masks, segmenter, found=found)

    if role == "fake" and options.findings and case.report:
        start = time.perf_counter()
        masks = loaded.masks if loaded.masks else ({k: found[k] for k in ("left_lung", "right_lung")} if found else None)
        result.requested = requested_findings(case.report)
        result.detected = detect_findings(loaded.hu, loaded.spacing, masks)
        timings["findings"] = time.perf_counter() - start
    keep_volume.append(prepare_volume(loaded.hu, options.ms_ssim_size))
    result.seconds = {k: round(v, 3) for k, v in timings.items()}
    return result


def _mean_sd(values: list[float]) -> dict:
    array = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not array.size:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0, "n": int(array.size)}


def _airway_volume(result: CaseResult) -> float | None:
    if result.airway.get("source") == "segmenter":
        return result.volumes_segmented.get("airway")
    return result.volumes_masks.get("airway")


def summarize(real: list[CaseResult], fake: list[CaseResult], extractor: FeatureExtractor,
              volumes: dict[str, list[np.ndarray]], options: EvaluationOptions) -> dict:
    """The metrics of both sets (step 3)."""
    real_features = np.stack([r.features for r in real])
    fake_features = np.stack([r.features for r in fake])
    distribution = distribution_metrics(real_features, fake_features, n_bootstrap=options.n_bootstrap,
                                        seed=options.seed)
    groups = {}
    for name, (start, stop) in extractor.groups.items():
        groups[name] = distribution_metrics(real_features[:, start:stop], fake_features[:, start:stop],
                                            n_bootstrap=options.n_bootstrap, seed=options.seed)
    if extractor.groups and extractor.name.startswith("inception"):
        distribution["fd_mean_of_planes"] = float(np.mean([g["fd"]["value"] for g in groups.values()]))

    anatomy = {}
    for role, results in (("real", real), ("fake", fake)):
        names = sorted({k for r in results for k in list(r.volumes_masks) + list(r.volumes_segmented)})
        anatomy[role] = {
            "airway_volume_mm3": _mean_sd([_airway_volume(r) for r in results]),
            "airway_components": _mean_sd([r.airway.get("components") for r in results if r.airway]),
            "airway_branches": _mean_sd([r.airway.get("branches") for r in results if r.airway]),
            "volumes_mm3_masks": {n: _mean_sd([r.volumes_masks.get(n) for r in results]) for n in names},
            "volumes_mm3_segmented": {n: _mean_sd([r.volumes_segmented.get(n) for r in results]) for n in names},
        }
    consistency_names = sorted({k for r in fake for k in r.consistency})
    consistency = {n: _mean_sd([r.consistency.get(n) for r in fake]) for n in consistency_names}

    memorisation = nearest_real(fake_features, real_features, copy_factor=options.copy_factor)
    memorisation["nearest_case"] = [real[i].case_id for i in memorisation.pop("nearest_index")]
    memorisation["case_id"] = [r.case_id for r in fake]
    diversity = {"fake": pairwise_ms_ssim(volumes["fake"], max_pairs=options.max_pairs, seed=options.seed),
                 "real": pairwise_ms_ssim(volumes["real"], max_pairs=options.max_pairs, seed=options.seed),
                 "volume_size": options.ms_ssim_size}
    with_reports = [(r.requested, r.detected) for r in fake if r.requested is not None]
    adherence = adherence_rates(with_reports) if with_reports else None
    return {"distribution": distribution, "distribution_groups": groups, "anatomy": anatomy,
            "consistency_dice": consistency, "diversity_ms_ssim": diversity, "memorisation": memorisation,
            "text_adherence": adherence}


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def paper_table_markdown(metrics: dict, options: EvaluationOptions) -> str:
    """Table 1 of the paper: Method | FID | MMD | Airway (x10^4 mm^3), a Real row first."""
    d = metrics["distribution"]
    fd, mmd = d["fd"], d["mmd2"]
    lines = ["| Method | FID | MMD | Airway (×10^4 mm^3) |", "|---|---|---|---|"]
    for role, label in (("real", "Real"), ("fake", options.method)):
        airway = metrics["anatomy"][role]["airway_volume_mm3"]
        airway_text = ("–" if airway["mean"] is None else
                       f"{airway['mean'] / AIRWAY_UNIT:.2f} ± {airway['sd'] / AIRWAY_UNIT:.2f}")
        if role == "real":
            lines.append(f"| {label} | – | – | {airway_text} |")
        else:
            lines.append(f"| {label} | {_fmt(fd['value'])} [{_fmt(fd['ci_low'])}, {_fmt(fd['ci_high'])}] "
                         f"| {_fmt(mmd['value'])} [{_fmt(mmd['ci_low'])}, {_fmt(mmd['ci_high'])}] | {airway_text} |")
    info = metrics["settings"]
    lines += [
        "",
        f"FID: Fréchet distance of `{info['features']}` features ({d['n_features']}-d), "
        f"{d['n_real']} real vs {d['n_fake']} generated volumes; MMD: unbiased MMD² with a Gaussian kernel "
        f"(median-heuristic bandwidth {d['bandwidth']:.4g}); [{int(fd['confidence'] * 100)} % bootstrap interval, "
        f"{fd['n_bootstrap']} resamples]. Lower is better. Values depend on the feature extractor: they compare "
        "with the paper's only with the same extractor and data.",
        f"Airway: mean ± sd over each set, measured by {info['airway_source']}.",
    ]
    if "fd_mean_of_planes" in d:
        planes = ", ".join(f"{k} {_fmt(v['fd']['value'])}" for k, v in metrics["distribution_groups"].items())
        lines.append(f"2.5D FID per plane: {planes}; mean {_fmt(d['fd_mean_of_planes'])}.")
    return "\n".join(lines) + "\n"


def _plots(out: Path, real: list[CaseResult], fake: list[CaseResult]) -> list[str]:
    written = []
    densities = {"real": np.mean([r.histogram for r in real], axis=0), "fake": np.mean([r.histogram for r in fake], axis=0)}
    plots.histogram_plot(out / "intensity_histogram.png", HIST_EDGES, densities,
                         title="HU histogram inside the body crop (mean density per set)")
    written.append("intensity_histogram.png")
    rows = {}
    for name in ("left_lung", "right_lung", "airway", "vessels", "left_upper_lobe", "left_lower_lobe",
                 "right_upper_lobe", "right_middle_lobe", "right_lower_lobe"):
        sets = {}
        for role, results in (("real", real), ("fake", fake)):
            values = [(r.volumes_segmented.get(name) or r.volumes_masks.get(name)) for r in results]
            values = [v / 1000.0 for v in values if v is not None]
            if values:
                sets[role] = values
        if sets:
            rows[name.replace("_", " ")] = sets
    if rows:
        plots.distribution_plot(out / "structure_volumes.png", rows, unit="mL",
                                title="Structure volumes (segmenter where available, else own masks)")
        written.append("structure_volumes.png")
    return written


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def run_evaluation(real_source: str | Path, fake_source: str | Path, out: str | Path,
                   options: EvaluationOptions | None = None, *, overwrite: bool = False,
                   progress: bool = True) -> dict:
    """Evaluate generated volumes against real ones; returns the metrics written to metrics.json."""
    options = options or EvaluationOptions()
    out = Path(out)
    # 1. Inputs.
    check_output_folder(out, overwrite=overwrite)
    real_cases = discover_cases(real_source, role="--real")
    fake_cases = discover_cases(fake_source, role="--fake")
    for role, cases in (("--real", real_cases), ("--fake", fake_cases)):
        if len(cases) < 2:
            raise MedSynError(f"{role} has {len(cases)} volume(s); distribution metrics need at least 2 per set")
    extractor = get_extractor(options.features, device=options.device, **options.extractor_options)
    segmenter = None
    if options.segmenter:
        from MedSynLib.data.segmentation import get_segmenter

        try:
            segmenter = get_segmenter(options.segmenter)
        except ValueError as error:
            raise MedSynError(str(error)) from error

    # 2. Per-volume measurements.
    volumes: dict[str, list[np.ndarray]] = {"real": [], "fake": []}
    results: dict[str, list[CaseResult]] = {"real": [], "fake": []}
    for role, cases in (("real", real_cases), ("fake", fake_cases)):
        for case in tqdm(cases, desc=f"{role} volumes", unit="vol", disable=None if progress else True, file=sys.stderr):
            results[role].append(evaluate_case(case, role, extractor, segmenter, options, volumes[role]))

    # 3. Set-level metrics.
    metrics = summarize(results["real"], results["fake"], extractor, volumes, options)
    lobes = any(has_lobes({k: None for k in r.volumes_masks}) for r in results["fake"])
    metrics["settings"] = {
        "features": extractor.name, "extractor": extractor.info, "segmenter": options.segmenter,
        "airway_source": f"the {options.segmenter} segmenter" if segmenter else "each volume's own airway mask",
        "generated_lobes": lobes, "n_bootstrap": options.n_bootstrap, "seed": options.seed,
        "real": str(real_source), "fake": str(fake_source), "method": options.method,
    }
    metrics["cases"] = [r.record() for r in results["real"] + results["fake"]]

    # 4. Files.
    out.mkdir(parents=True, exist_ok=True)
    metrics["plots"] = _plots(out, results["real"], results["fake"])
    (out / "table.md").write_text(paper_table_markdown(metrics, options), encoding="utf-8")
    metrics = _jsonable(metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics
