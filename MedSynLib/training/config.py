"""Training settings: TrainConfig with its limits, config files and key=value overrides, the LR schedule."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from MedSynLib.configuration import (
    check_overrides,
    check_settings,
    config_from_dict,
    read_json,
)
from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.diffusion.schedules import (
    PREDICTION_TYPES,
    SCHEDULES,
)
from MedSynLib.errors import (
    MAX_SEED,
    MAX_STEPS,
    MedSynError,
    read_text,
)
from MedSynLib.networks.unet import NETWORK_LIMITS, UNet3DConfig
from MedSynLib.pipeline.channels import ChannelLayout, check_ct_window
from MedSynLib.pipeline.model_folder import (
    StageConfig,
)
from MedSynLib.pipeline.presets import stage_configs
from MedSynLib.text_encoder import check_report

STAGES = ("stage1", "stage2")
LOWRES_NOISE = ("shrink", "additive")


@dataclass(frozen=True)
class TrainConfig:
    """Every hyper-parameter of a run; files and key=value overrides may set any of them."""

    preset: str = "small"
    network: Optional[dict] = None  # overrides of the preset's network config, e.g. {"dim": 48}
    steps: int = 10_000
    batch_size: int = 1  # per process
    grad_accumulation: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 500
    lr_decay: str = "constant"  # or "cosine" (to 10 % at the last step)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 10_000
    cfg_drop: float = 0.1
    prediction_type: str = "x0"
    schedule: str = "cosine"
    mixed_precision: str = "no"  # "bf16" or "fp16" (with a gradient scaler)
    gradient_checkpointing: bool = False
    compile: bool = False
    channels_last: bool = True  # on CPU, 3D kernels channels-last as in generation (faster with oneDNN)
    seed: int = 0
    init_weights: str = ""  # a model folder whose weights of this stage start the run (fine-tuning)
    timestep_range: tuple[float, float] = (0.0, 1.0)  # t drawn uniformly in here; narrower to fine-tune coarse layout
    num_workers: int = 2
    patch: tuple[int, int, int] = (64, 72, 72)  # stage 2: slices x height x width
    lowres_noise_max: float = 0.4
    # How the stage-2 condition is noised, a ~ U[0, lowres_noise_max): "shrink" is the reference's
    # (1 - a) x + a N(0, 1), which also scales the condition by (1 - a), a shift the network learns to
    # undo and then applies to the clean condition it gets at generation; "additive", x + a N(0, 1),
    # keeps the condition's densities.
    lowres_noise: str = "shrink"
    focus_weight: float = 0.0  # > 0: loss weight 1 + focus_weight near focus_structures (thin ones)
    focus_structures: tuple[str, ...] = ("airway", "vessels")
    ct_loss_weight: float = 1.0  # loss weight of the CT channels against each anatomy channel
    # A soft-tissue window channel (low, high HU) generated with the CT (pipeline/channels.py);
    # None: the CT is one full-range channel, as in the reference.
    ct_window: Optional[tuple[float, float]] = None
    augment: bool = True
    zoom: tuple[float, float] = (0.9, 1.1)
    rotate_degrees: float = 10.0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    time_limit_minutes: float = 0.0  # > 0: checkpoint and stop after this long (job time limits)
    sample_every: int = 1000  # 0: no previews
    sample_steps: int = 20
    validation_report: str = ""  # empty: the report of the dataset's first case
    device: str = "auto"

    def __post_init__(self) -> None:
        check_settings(self, TRAIN_LIMITS)
        for name, choices in (("mixed_precision", ("no", "bf16", "fp16")), ("lr_decay", ("constant", "cosine")),
                              ("lowres_noise", LOWRES_NOISE),
                              ("schedule", tuple(SCHEDULES)), ("prediction_type", PREDICTION_TYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        object.__setattr__(self, "ct_window", check_ct_window(self.ct_window))
        low, high = self.timestep_range
        if not low < high:
            raise ValueError(f"timestep_range must satisfy 0 <= low < high <= 1, got {self.timestep_range}")
        if self.zoom[0] > self.zoom[1]:
            raise ValueError(f"zoom must be (low, high) with low <= high, got {self.zoom}")
        if self.validation_report:
            try:
                check_report(self.validation_report)
            except MedSynError as error:
                raise ValueError(f"validation_report: {error}") from error
        if self.network is not None:  # here, so that a bad size fails before a run folder exists
            check_overrides(UNet3DConfig, self.network, NETWORK_LIMITS, source="network")


# (low, high) of every number in TrainConfig: finite, and bounded so that a typo fails at once
# instead of hanging, exhausting memory or overflowing a generator.
TRAIN_LIMITS: dict[str, tuple[float, float]] = {
    "steps": (1, 10**9), "batch_size": (1, 4096), "grad_accumulation": (1, 4096), "learning_rate": (0, 1),
    "weight_decay": (0, 10), "warmup_steps": (0, 10**9), "grad_clip": (1e-6, 1e6), "ema_decay": (0, 1),
    "ema_start": (0, 10**9), "cfg_drop": (0, 1), "seed": (0, MAX_SEED), "timestep_range": (0, 1), "num_workers": (0, 256),
    "patch": (1, 4096), "lowres_noise_max": (0, 1), "focus_weight": (0, 1e4), "ct_loss_weight": (1e-3, 1e4), "zoom": (0.1, 10), "rotate_degrees": (0, 180),
    "log_every": (1, 10**9), "checkpoint_every": (1, 10**9), "keep_checkpoints": (1, 10**4),
    "time_limit_minutes": (0, 10**7), "sample_every": (0, 10**9), "sample_steps": (1, MAX_STEPS),
}


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10 %."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_decay == "constant":
        return config.learning_rate
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def parse_overrides(pairs: list[str]) -> dict:
    """key=value pairs; values are read as JSON when they parse (numbers, lists, true), else as text."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MedSynError(f"cannot read override {pair!r}; use key=value")
        try:
            overrides[key] = json.loads(value)
        except ValueError:  # not JSON (or a number past Python's 4300-digit limit): the text itself
            overrides[key] = value
    return overrides


def load_config_file(path: Path) -> dict:
    if not path.is_file():
        raise MedSynError(f"config file {path} does not exist")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as error:
            raise MedSynError("YAML configs need PyYAML (pip install pyyaml); or use JSON") from error
        try:
            data = yaml.safe_load(read_text(path, "config file")) or {}
        except yaml.YAMLError as error:
            raise MedSynError(f"config file {path} is not valid YAML: {error}") from error
        if not isinstance(data, dict):
            raise MedSynError(f"{path} must hold a mapping of settings")
        return data
    return read_json(path)


def resolve_config(config_file: Path | None, overrides: list[str]) -> TrainConfig:
    values = load_config_file(config_file) if config_file else {}
    values.update(parse_overrides(overrides))
    return config_from_dict(TrainConfig, values, source=str(config_file or "overrides"))


def training_layout(config: TrainConfig, dataset: PreparedDataset) -> ChannelLayout:
    """The model channels a run trains: the dataset's structures, and the run's CT window."""
    try:
        return ChannelLayout(dataset.structures, ct_window=config.ct_window)
    except ValueError as error:
        raise MedSynError(str(error)) from error


def stage_config(stage: str, config: TrainConfig, dataset: PreparedDataset, text_dim: int) -> StageConfig:
    """The network + diffusion config of the stage, from the preset and the dataset."""
    layout = training_layout(config, dataset)
    s1, s2 = stage_configs(config.preset, channels=layout.num_channels, text_dim=text_dim,
                           text_tokens=int(dataset.index.get("text_tokens", 192)))
    chosen = s1 if stage == "stage1" else s2
    network = replace(chosen.network, **(config.network or {}))
    diffusion = replace(chosen.diffusion, schedule=config.schedule, prediction_type=config.prediction_type)
    size = dataset.low_size if stage == "stage1" else dataset.size
    return StageConfig(network, diffusion, size)
