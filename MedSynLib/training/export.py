"""Export: one stage-1 run and one stage-2 run (their EMA weights) -> a model folder."""

from __future__ import annotations

from pathlib import Path

from MedSynLib.configuration import (
    config_from_dict,
    read_json,
)
from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.errors import (
    MedSynError,
)
from MedSynLib.geometry import NOMINAL_FIELD_OF_VIEW_MM
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.model_folder import (
    ModelConfig,
    Stage,
    load_weights,
    stage_config_from_dict,
)
from MedSynLib.text_encoder import TextEncoderConfig
from MedSynLib.training.config import STAGES, TrainConfig


def export(runs: list[Path], out: Path, *, base: Path | None = None) -> Path:
    """Combine one stage-1 run and one stage-2 run (their EMA weights) into a model folder.

    With `base` (a model folder), a stage without a run is taken from it: fine-tune one
    stage of a model and export it with the other stage unchanged.
    """
    if not runs:
        raise MedSynError("export needs at least one --run")
    stages, windows = {}, set()
    for run in runs:
        info = read_json(run / "run.json")
        windows.add(config_from_dict(TrainConfig, info["train"], source=str(run / "run.json")).ct_window)
        checkpoints = sorted((run / "checkpoints").glob("step_*"))
        if not checkpoints:
            raise MedSynError(f"{run} has no checkpoint to export")
        config = stage_config_from_dict(info["stage_config"], source=str(run / "run.json"))
        network = config.build_network()
        load_weights(network, checkpoints[-1] / "ema.safetensors", source=str(run / "run.json"))
        if info["stage"] in stages:
            raise MedSynError(f"two {info['stage']} runs given; export takes one run per stage")
        stages[info["stage"]] = (Stage(config, network.eval()), PreparedDataset(info["data"]),
                                 f"{int(checkpoints[-1].name.split('_')[1])} steps")
    base_model = MedSynPipeline.from_pretrained(base) if base is not None else None
    for stage in STAGES:
        if stage not in stages and base_model is not None:
            stages[stage] = (getattr(base_model, stage), None, f"from {base.name}")
    missing = [s for s in STAGES if s not in stages]
    if missing:
        raise MedSynError(f"export needs one run of each stage (or --base for the other); missing {missing}")
    datasets = [entry[1] for entry in stages.values() if entry[1] is not None]
    structures = {d.structures for d in datasets}
    # As configs, not raw JSON: an index written before a field existed reads as its default.
    encoders = {config_from_dict(TextEncoderConfig, d.index["text_encoder"]) for d in datasets}
    if base_model is not None:
        structures.add(base_model.config.structures)
        encoders.add(base_model.text_encoder_config)
        windows.add(base_model.config.ct_window)
    if len(structures) > 1 or len(encoders) > 1:
        raise MedSynError("the runs (and base model) were trained on datasets with different structures or text encoders")
    if len(windows) > 1:
        raise MedSynError(f"the runs (and base model) generate different CT channels (ct_window {sorted(windows, key=str)})")
    trained_on = " and ".join(sorted({f"{d.root.name} ({len(d)} cases)" for d in datasets}))
    stage2_data = stages["stage2"][1]
    model_config = ModelConfig(
        structures=datasets[0].structures,
        # stage 2 makes the output grid
        spacing_mm=(tuple(stage2_data.index.get("spacing_mm") or (NOMINAL_FIELD_OF_VIEW_MM / stage2_data.size,) * 3) if stage2_data
                    else base_model.config.spacing_mm),
        trained=True,
        ct_window=windows.pop(),
        description=f"trained on {trained_on}: stage 1 {stages['stage1'][2]}, stage 2 {stages['stage2'][2]}",
    )
    pipeline = MedSynPipeline(model_config, stages["stage1"][0], stages["stage2"][0], encoders.pop())
    pipeline.save_pretrained(out)
    return out
