"""`python -m MedSynLib.train`: train either MedSyn stage on a prepared dataset, one GPU to many.

    python -m MedSynLib.train stage1 --data prepared/ --out runs/s1 [--config cfg.yaml] [key=value ...] [--resume]
    torchrun --nproc_per_node 4 -m MedSynLib.train stage2 --data prepared/ --out runs/s2
    python -m MedSynLib.train export --run runs/s1 --run runs/s2 --out models/mine

The recipe follows the reference (AdamW 1e-4, weight decay 0.01, batch 1 x accumulation 4,
gradient clipping 1.0, EMA 0.999 from step 10k, text dropped with p = 0.1, x0 objective).
Every sample is a function of (seed, sample number), so `--resume` continues exactly and
N processes with batch b train exactly like one process with batch N*b. Checkpoints
(safetensors + JSON) are written to a temporary folder, fsynced and renamed; the last K
are kept and an unreadable one is skipped for the one before.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .channels import ChannelLayout
from .compat import zip_strict
from .configuration import (
    check_overrides,
    check_settings,
    config_from_dict,
    config_to_dict,
    publish,
    read_json,
    write_json,
)
from .data import PreparedDataset
from .diffusion import PREDICTION_TYPES, SCHEDULES, focus_weights, training_target, weighted_mse
from .errors import (
    EXISTING_FILE,
    EXISTING_FOLDER,
    MAX_SEED,
    MAX_STEPS,
    OUTPUT_FOLDER,
    MedSynError,
    read_text,
    run_command,
)
from .networks import NETWORK_LIMITS, UNet3D, UNet3DConfig
from .pipeline import (
    WEIGHTS,
    MedSynPipeline,
    ModelConfig,
    StageConfig,
    load_weights,
    place_network,
    resolve_device,
    run_sampler,
    stage_config_from_dict,
    super_resolution_output,
    text_guided_output,
)
from .presets import stage_configs
from .preview import preview_image
from .text_encoder import ReportEncoder, TextEncoderConfig, check_report
from .training_data import Augmentation, DiffusionSamples, StreamSampler

STAGES = ("stage1", "stage2")


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
    focus_weight: float = 0.0  # > 0: loss weight 1 + focus_weight near focus_structures (thin ones)
    focus_structures: tuple[str, ...] = ("airway", "vessels")
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
                              ("schedule", tuple(SCHEDULES)), ("prediction_type", PREDICTION_TYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
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
    "patch": (1, 4096), "lowres_noise_max": (0, 1), "focus_weight": (0, 1e4), "zoom": (0.1, 10), "rotate_degrees": (0, 180),
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


# ----------------------------------------------------------------------------- configuration
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


def stage_config(stage: str, config: TrainConfig, dataset: PreparedDataset, text_dim: int) -> StageConfig:
    """The network + diffusion config of the stage, from the preset and the dataset."""
    layout = ChannelLayout(dataset.structures)
    s1, s2 = stage_configs(config.preset, channels=layout.num_channels, text_dim=text_dim,
                           text_tokens=int(dataset.index.get("text_tokens", 192)))
    chosen = s1 if stage == "stage1" else s2
    network = replace(chosen.network, **(config.network or {}))
    diffusion = replace(chosen.diffusion, schedule=config.schedule, prediction_type=config.prediction_type)
    size = dataset.low_size if stage == "stage1" else dataset.size
    return StageConfig(network, diffusion, size)


# ----------------------------------------------------------------------------- checkpoints
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars["state"].setdefault(str(index), {})[name] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict) -> dict:
    state: dict[int, dict] = {int(k): dict(v) for k, v in scalars["state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(run: Path, step: int, model: UNet3D, ema: UNet3D, optimizer, scaler, keep: int) -> Path:
    """Write checkpoints/step_N atomically (temporary folder, fsync, rename) and keep the last `keep`."""
    folder = run / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    optimizer_tensors, optimizer_scalars = _flatten_optimizer(optimizer.state_dict())
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
    save_file(optimizer_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "samples_seen_by_step": step, "optimizer": optimizer_scalars,
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
    }))
    for path in tmp.iterdir():
        with open(path, "rb") as file:
            os.fsync(file.fileno())
    if final.exists():
        shutil.rmtree(final)
    publish(tmp, final)
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    for old in sorted(folder.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path, model: UNet3D, ema: UNet3D, optimizer, scaler) -> int:
    """Load the newest readable checkpoint; return its step (0 when there is none)."""
    candidates = sorted((run / "checkpoints").glob("step_*"), reverse=True)
    for folder in candidates:
        try:
            state = json.loads((folder / "state.json").read_text())
            model.load_state_dict(load_file(folder / "model.safetensors"))
            ema.load_state_dict(load_file(folder / "ema.safetensors"))
            optimizer.load_state_dict(_unflatten_optimizer(load_file(folder / "optimizer.safetensors"), state["optimizer"]))
            if state["scaler"] is not None:
                scaler.load_state_dict(state["scaler"])
            return int(state["step"])
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError, json.JSONDecodeError) as error:
            print(f"medsyn: warning: checkpoint {folder} is unreadable ({type(error).__name__}: "
                  f"{str(error).splitlines()[0][:200]}); trying the previous one", file=sys.stderr)
    return 0


def start_from_model(model: UNet3D, stage: str, folder: Path) -> None:
    """Initialise `model` with the `stage` weights of an exported model folder (fine-tuning).

    The networks must match, except that modules which start as a no-op (`pooled_text`)
    may be new: a released model can be fine-tuned with them added.
    """
    source = folder / stage / "config.json"
    if not source.is_file():
        raise MedSynError(f"init_weights: {folder} is not a model folder (no {stage}/config.json)")
    saved = stage_config_from_dict(read_json(source), source=str(source)).network
    if not isinstance(saved, UNet3DConfig):
        raise MedSynError(f"init_weights: the {stage} network of {folder} is a converted reference network; "
                          f"training builds MedSynLib's own networks only")
    if replace(saved, pooled_text=model.config.pooled_text) != model.config:
        raise MedSynError(f"init_weights: the {stage} network of {folder} differs from this run's (preset and network "
                          f"settings must match it)")
    load_weights(model, folder / stage / WEIGHTS, source=str(source), may_lack=("text_to_time.",))


# ----------------------------------------------------------------------------- training
class Logger:
    """metrics.jsonl always; TensorBoard scalars too when tensorboard is installed. Rank 0 only."""

    def __init__(self, run: Path, enabled: bool):
        self.enabled, self.path, self.writer = enabled, run / "metrics.jsonl", None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run / "tensorboard"))
            except ImportError:
                print("medsyn: note: tensorboard is not installed; metrics go to metrics.jsonl only", file=sys.stderr)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def image(self, step: int, tag: str, image) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def setup_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun: NCCL on GPUs, Gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = resolve_device(device_name)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_agree(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process once it is true on any (so all of them stop at the same step)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@torch.no_grad()
def update_ema(ema: UNet3D, model: UNet3D, decay: float) -> None:
    for ema_value, value in zip_strict(ema.state_dict().values(), model.state_dict().values()):
        if ema_value.dtype.is_floating_point:
            ema_value.lerp_(value, 1 - decay)
        else:
            ema_value.copy_(value)


@torch.no_grad()
def preview(stage: str, ema: UNet3D, stage_cfg: StageConfig, dataset: PreparedDataset, text, config: TrainConfig,
            device: torch.device):
    """A sample from the fixed validation report (stage 1) or validation case (stage 2), as a PNG."""
    layout = ChannelLayout(dataset.structures)
    ema.eval()
    generator = torch.Generator().manual_seed(config.seed)
    if stage == "stage1":
        x_T = torch.randn((1, layout.num_channels) + (stage_cfg.size,) * 3, generator=generator).to(device)
        output = text_guided_output(ema, text[0].to(device), text[1].to(device), 1.0)
    else:
        case = dataset.load(0)
        low = layout.encode(torch.from_numpy(case.ct_hu_low), {n: torch.from_numpy(m) for n, m in case.masks_low.items()})
        condition = F.interpolate(low[None], size=(stage_cfg.size,) * 3, mode="nearest").to(device)
        x_T = torch.randn(condition.shape, generator=generator).to(device)
        output = super_resolution_output(ema, condition, None)
    sample = run_sampler(stage, output, x_T, stage_cfg, config.sample_steps)
    ct, masks = layout.decode(sample[0].float().cpu())
    return preview_image(ct.numpy(), {n: m.numpy() for n, m in masks.items()})


def train(stage: str, data: Path, run: Path, config: TrainConfig, *, resume: bool) -> Path:
    rank, world, device = setup_distributed(config.device)
    is_main = rank == 0
    dataset = PreparedDataset(data)
    text_dim = int(dataset.index["text_hidden"])
    stage_cfg = stage_config(stage, config, dataset, text_dim)
    layout = ChannelLayout(dataset.structures)
    if stage == "stage2" and any(p > dataset.size for p in config.patch):
        raise MedSynError(f"patch {config.patch} is larger than the dataset's volumes ({dataset.size}^3)")
    focus = [n for n in config.focus_structures if n in layout.structures]
    if config.focus_weight > 0 and not focus:
        raise MedSynError(f"focus_weight needs one of focus_structures {list(config.focus_structures)} in the "
                          f"dataset's structures {list(layout.structures)}")
    focus_channels = layout.channels_of(focus)
    torch.manual_seed(config.seed)
    model = UNet3D(stage_cfg.network)
    if config.init_weights:  # before anything is written: a wrong model folder leaves no run behind
        start_from_model(model, stage, Path(config.init_weights))
    run.mkdir(parents=True, exist_ok=True)
    saved = run / "run.json"
    if saved.is_file():
        previous = read_json(saved)
        if previous.get("stage") != stage:
            raise MedSynError(f"{run} holds a {previous.get('stage')} run, not {stage}")
        if not resume:
            raise MedSynError(f"{run} already holds a run; pass --resume to continue it or choose a new --out")
        if previous["stage_config"] != json.loads(json.dumps(config_to_dict(stage_cfg))):
            raise MedSynError(f"the network or data of {run} differ from this command's; cannot resume")
    if is_main:
        write_json(saved, {"stage": stage, "data": str(data.resolve()), "train": config_to_dict(config),
                           "stage_config": config_to_dict(stage_cfg), "world_size": world})

    # Model, EMA copy, optimizer, gradient scaler: set once, up front.
    ema = UNet3D(stage_cfg.network).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    for network in (model, ema):
        if config.channels_last:
            place_network(network, device)
        else:
            network.to(device)
    model.gradient_checkpointing = config.gradient_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    start = latest_checkpoint(run, model, ema, optimizer, scaler) if resume else 0
    if start >= config.steps:
        if is_main:
            print(f"{run} is already at step {start} of {config.steps}", file=sys.stderr)
        return run
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if config.compile:
        train_model = torch.compile(train_model)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    samples = DiffusionSamples(
        dataset, stage=stage, layout=layout, schedule=stage_cfg.diffusion.make_schedule(), seed=config.seed,
        cfg_drop=config.cfg_drop, timestep_range=config.timestep_range, patch=config.patch,
        lowres_noise_max=config.lowres_noise_max,
        augmentation=Augmentation(config.zoom, config.rotate_degrees) if config.augment else None,
    )
    sampler = StreamSampler(start_step=start, accumulation=config.grad_accumulation, world=world, rank=rank,
                            batch=config.batch_size)
    loader = torch.utils.data.DataLoader(samples, batch_size=config.batch_size, sampler=sampler,
                                         num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
                                         pin_memory=device.type == "cuda")
    batches = iter(loader)
    logger = Logger(run, is_main)
    validation_text = None
    if is_main and config.sample_every and stage == "stage1":
        if config.validation_report:
            encoder = ReportEncoder(config_from_dict(TextEncoderConfig, dataset.index["text_encoder"]))
            features = encoder.encode([config.validation_report])
            validation_text = (features.features, features.mask)
        else:
            case = dataset.load(0, low_only=True)
            validation_text = (torch.from_numpy(case.text_features.astype(np.float32))[None],
                               torch.from_numpy(case.text_mask)[None])

    bar = tqdm(total=config.steps, initial=start, desc=stage, unit="step", disable=not is_main)
    last_saved, window_start = start, time.perf_counter()
    deadline = time.monotonic() + 60 * config.time_limit_minutes if config.time_limit_minutes > 0 else None
    step = start
    for step in range(start, config.steps):
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total_loss = 0.0
        for micro in range(config.grad_accumulation):
            batch = {k: v.to(device, non_blocking=True) for k, v in next_batch(batches).items()}
            sync = micro == config.grad_accumulation - 1 or world == 1
            with (contextlib.nullcontext() if sync else train_model.no_sync()), autocast:
                output = train_model(batch["x_t"], batch["t"], text=batch["text"] if stage == "stage1" else None,
                                     text_mask=batch["text_mask"] if stage == "stage1" else None,
                                     drop_text=batch["drop_text"] if stage == "stage1" else None,
                                     cond=batch.get("cond"))
                target = training_target(batch["x0"], batch["noise"], batch["t"], samples.schedule,
                                         stage_cfg.diffusion.prediction_type)
                weights = focus_weights(batch["x0"], focus_channels, config.focus_weight)
                loss = weighted_mse(output, target, weights) / config.grad_accumulation
            scaler.scale(loss).backward()
            total_loss += loss.item()
        if not math.isfinite(total_loss):
            raise MedSynError(f"the loss became {total_loss} at step {step}; training stopped. "
                              f"The last good checkpoint is step {last_saved} in {run / 'checkpoints'}")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, config.ema_decay if step + 1 >= config.ema_start else 0.0)

        done = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{total_loss:.4f}", lr=f"{lr:.1e}")
        if is_main and (done % config.log_every == 0 or done == config.steps):
            elapsed = time.perf_counter() - window_start
            samples_per_s = config.log_every * config.grad_accumulation * config.batch_size * world / max(elapsed, 1e-9)
            logger.scalars(done, {"loss": total_loss, "lr": lr, "grad_norm": grad_norm, "samples_per_s": samples_per_s})
            window_start = time.perf_counter()
        if is_main and config.sample_every and (done % config.sample_every == 0 or done == config.steps):
            image = preview(stage, ema, stage_cfg, dataset, validation_text, config, device)
            (run / "previews").mkdir(exist_ok=True)
            image.save(run / "previews" / f"step_{done:08d}.png")
            logger.image(done, "preview", image)
        out_of_time = deadline is not None and all_agree(time.monotonic() >= deadline, world, device)
        if done % config.checkpoint_every == 0 or done == config.steps or out_of_time:
            if is_main:
                save_checkpoint(run, done, model, ema, optimizer, scaler, config.keep_checkpoints)
            last_saved = done
            if world > 1:
                dist.barrier()
        if out_of_time:
            if is_main:
                print(f"\nmedsyn: time limit of {config.time_limit_minutes} min reached at step {done}; "
                      f"continue with --resume", file=sys.stderr)
            break
    bar.close()
    logger.close()
    if world > 1:
        check_replicas(model, run, is_main)
        dist.destroy_process_group()
    return run


def next_batch(batches) -> dict[str, torch.Tensor]:
    """The next batch. A data worker's error comes back wrapped in its traceback text; the run
    stops with the worker's own one-line reason (its last line) instead."""
    try:
        return next(batches)
    except MedSynError as error:
        raise MedSynError(str(error).strip().splitlines()[-1].removeprefix(f"{MedSynError.__module__}.MedSynError: ")
                          ) from None


def check_replicas(model: UNet3D, run: Path, is_main: bool) -> None:
    """Gather a hash of every process's parameters into replicas.json: they must all be equal."""
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    checksums = [None] * dist.get_world_size()
    dist.all_gather_object(checksums, digest.hexdigest())
    if is_main:
        write_json(run / "replicas.json", {"parameter_checksums": checksums})
        if len(set(checksums)) != 1:
            raise MedSynError(f"the processes' parameters diverged: {checksums}")


# ----------------------------------------------------------------------------- export
def export(runs: list[Path], out: Path, *, base: Path | None = None) -> Path:
    """Combine one stage-1 run and one stage-2 run (their EMA weights) into a model folder.

    With `base` (a model folder), a stage without a run is taken from it: fine-tune one
    stage of a model and export it with the other stage unchanged.
    """
    if not runs:
        raise MedSynError("export needs at least one --run")
    stages = {}
    for run in runs:
        info = read_json(run / "run.json")
        checkpoints = sorted((run / "checkpoints").glob("step_*"))
        if not checkpoints:
            raise MedSynError(f"{run} has no checkpoint to export")
        config = stage_config_from_dict(info["stage_config"], source=str(run / "run.json"))
        network = config.build_network()
        load_weights(network, checkpoints[-1] / "ema.safetensors", source=str(run / "run.json"))
        if info["stage"] in stages:
            raise MedSynError(f"two {info['stage']} runs given; export takes one run per stage")
        stages[info["stage"]] = (config, network.eval(), PreparedDataset(info["data"]),
                                 f"{int(checkpoints[-1].name.split('_')[1])} steps")
    base_model = MedSynPipeline.from_pretrained(base) if base is not None else None
    for stage in STAGES:
        if stage not in stages and base_model is not None:
            stages[stage] = (getattr(base_model, f"{stage}_config"), getattr(base_model, stage), None, f"from {base.name}")
    missing = [s for s in STAGES if s not in stages]
    if missing:
        raise MedSynError(f"export needs one run of each stage (or --base for the other); missing {missing}")
    datasets = [entry[2] for entry in stages.values() if entry[2] is not None]
    structures = {d.structures for d in datasets}
    # As configs, not raw JSON: an index written before a field existed reads as its default.
    encoders = {config_from_dict(TextEncoderConfig, d.index["text_encoder"]) for d in datasets}
    if base_model is not None:
        structures.add(base_model.config.structures)
        encoders.add(base_model.text_encoder_config)
    if len(structures) > 1 or len(encoders) > 1:
        raise MedSynError("the runs (and base model) were trained on datasets with different structures or text encoders")
    trained_on = " and ".join(sorted({f"{d.root.name} ({len(d)} cases)" for d in datasets}))
    stage2_data = stages["stage2"][2]
    model_config = ModelConfig(
        structures=datasets[0].structures,
        # stage 2 makes the output grid
        spacing_mm=(tuple(stage2_data.index.get("spacing_mm") or (320.0 / stage2_data.size,) * 3) if stage2_data
                    else base_model.config.spacing_mm),
        trained=True,
        description=f"trained on {trained_on}: stage 1 {stages['stage1'][3]}, stage 2 {stages['stage2'][3]}",
    )
    pipeline = MedSynPipeline(model_config, stages["stage1"][:2], stages["stage2"][:2], encoders.pop())
    pipeline.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedSynLib.train", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=[*STAGES, "export"])
    parser.add_argument("overrides", nargs="*", help="key=value settings of TrainConfig")
    parser.add_argument("--data", type=EXISTING_FOLDER, help="prepared dataset folder")
    parser.add_argument("--out", type=OUTPUT_FOLDER, required=True, help="run folder (or model folder for export)")
    parser.add_argument("--config", type=EXISTING_FILE, default=None, help="YAML or JSON file of TrainConfig settings")
    parser.add_argument("--resume", action="store_true", help="continue from the newest readable checkpoint")
    parser.add_argument("--run", type=EXISTING_FOLDER, action="append", default=[],
                        help="export: a run folder (one per stage)")
    parser.add_argument("--base", type=EXISTING_FOLDER, default=None,
                        help="export: a model folder giving the stage without a run")
    args = parser.parse_intermixed_args(argv)
    if args.command == "export":
        print(f"wrote {export(args.run, args.out, base=args.base)}", file=sys.stderr)
        return 0
    if args.data is None:
        raise MedSynError("--data is required for training")
    config = resolve_config(args.config, args.overrides)
    existed = args.out.exists()
    try:
        train(args.command, args.data, args.out, config, resume=args.resume)
    except BaseException:  # a run that failed before its first checkpoint leaves nothing behind
        if not existed and not any((args.out / "checkpoints").glob("step_*")):
            shutil.rmtree(args.out, ignore_errors=True)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
