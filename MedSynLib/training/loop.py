"""The training loop of either stage: data stream, AdamW + EMA, optional DDP, mixed precision,
time limits and checkpoints; `python -m MedSynLib.train` (cli/train.py) drives it.

Every sample is a function of (seed, sample number), so a resumed run continues exactly and
N processes with batch b train exactly like one process with batch N*b.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from MedSynLib.compat import zip_strict
from MedSynLib.configuration import (
    config_from_dict,
    config_to_dict,
    read_json,
    write_json,
)
from MedSynLib.data.datasets import Augmentation, DiffusionSamples, StreamSampler
from MedSynLib.data.prepared import PreparedDataset
from MedSynLib.diffusion.objective import DiffusionObjective
from MedSynLib.errors import (
    MedSynError,
)
from MedSynLib.io.preview import preview_image
from MedSynLib.networks.unet import UNet3D
from MedSynLib.pipeline.model_folder import (
    StageConfig,
)
from MedSynLib.pipeline.sampling import (
    nearest_resize,
    place_network,
    resolve_device,
    run_sampler,
    super_resolution_output,
    text_guided_output,
)
from MedSynLib.text_encoder import ReportEncoder, TextEncoderConfig
from MedSynLib.training.checkpoints import latest_checkpoint, save_checkpoint, start_from_model
from MedSynLib.training.config import TrainConfig, learning_rate, stage_config, training_layout


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
    layout = training_layout(config, dataset)
    ema.eval()
    generator = torch.Generator().manual_seed(config.seed)
    if stage == "stage1":
        x_T = torch.randn((1, layout.num_channels) + (stage_cfg.size,) * 3, generator=generator).to(device)
        output = text_guided_output(ema, text[0].to(device), text[1].to(device), 1.0)
    else:
        case = dataset.load(0)
        low = layout.encode_arrays(case.ct_hu_low, case.masks_low)
        condition = nearest_resize(low[None], stage_cfg.size).to(device)
        x_T = torch.randn(condition.shape, generator=generator).to(device)
        output = super_resolution_output(ema, condition, None)
    sample = run_sampler(stage, output, x_T, stage_cfg, config.sample_steps)
    ct, masks = layout.decode(sample[0].float().cpu())
    return preview_image(ct.numpy(), {n: m.numpy() for n, m in masks.items()})


def open_run(run: Path, stage: str, stage_cfg: StageConfig, config: TrainConfig, data: Path, *, resume: bool,
             world: int, is_main: bool) -> None:
    """Create the run folder, or check that the one there is this run (same stage and network) and
    that resuming it was asked for; record the settings in run.json (the main process, after all
    have checked)."""
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
    if world > 1:  # every process has looked before the main one writes: none may find this run's own run.json
        dist.barrier()
    if is_main:
        write_json(saved, {"stage": stage, "data": str(data.resolve()), "train": config_to_dict(config),
                           "stage_config": config_to_dict(stage_cfg), "world_size": world})


def validation_report_features(dataset: PreparedDataset, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The text features stage-1 previews are sampled with: `validation_report`, else the first case's."""
    if config.validation_report:
        encoder = ReportEncoder(config_from_dict(TextEncoderConfig, dataset.index["text_encoder"]))
        features = encoder.encode([config.validation_report])
        return features.features, features.mask
    case = dataset.load(0, low_only=True)
    return torch.from_numpy(case.text_features.astype(np.float32))[None], torch.from_numpy(case.text_mask)[None]


def train(stage: str, data: Path, run: Path, config: TrainConfig, *, resume: bool) -> Path:
    rank, world, device = setup_distributed(config.device)
    is_main = rank == 0
    dataset = PreparedDataset(data)
    text_dim = int(dataset.index["text_hidden"])
    stage_cfg = stage_config(stage, config, dataset, text_dim)
    layout = training_layout(config, dataset)
    if stage == "stage2" and any(p > dataset.size for p in config.patch):
        raise MedSynError(f"patch {config.patch} is larger than the dataset's volumes ({dataset.size}^3)")
    focus = [n for n in config.focus_structures if n in layout.structures]
    if config.focus_weight > 0 and not focus:
        raise MedSynError(f"focus_weight needs one of focus_structures {list(config.focus_structures)} in the "
                          f"dataset's structures {list(layout.structures)}")
    objective = DiffusionObjective(stage_cfg.diffusion.make_schedule(), stage_cfg.diffusion.prediction_type,
                                   tuple(layout.channels_of(focus)), config.focus_weight, config.ct_loss_weight,
                                   layout.ct_channels)
    torch.manual_seed(config.seed)
    model = UNet3D(stage_cfg.network)
    if config.init_weights:  # before anything is written: a wrong model folder leaves no run behind
        start_from_model(model, stage, Path(config.init_weights), layout)
    open_run(run, stage, stage_cfg, config, data, resume=resume, world=world, is_main=is_main)

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
        dataset, stage=stage, layout=layout, seed=config.seed,
        cfg_drop=config.cfg_drop, timestep_range=config.timestep_range, patch=config.patch,
        lowres_noise_max=config.lowres_noise_max, lowres_noise=config.lowres_noise,
        augmentation=Augmentation(config.zoom, config.rotate_degrees) if config.augment else None,
    )
    sampler = StreamSampler(start_step=start, accumulation=config.grad_accumulation, world=world, rank=rank,
                            batch=config.batch_size)
    loader = torch.utils.data.DataLoader(samples, batch_size=config.batch_size, sampler=sampler,
                                         num_workers=config.num_workers, persistent_workers=config.num_workers > 0,
                                         pin_memory=device.type == "cuda")
    batches = iter(loader)
    logger = Logger(run, is_main)
    previews = is_main and config.sample_every and stage == "stage1"
    validation_text = validation_report_features(dataset, config) if previews else None

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
                def denoiser(x_t: torch.Tensor, t: torch.Tensor, batch=batch) -> torch.Tensor:
                    return train_model(x_t, t, text=batch["text"] if stage == "stage1" else None,
                                       text_mask=batch["text_mask"] if stage == "stage1" else None,
                                       drop_text=batch["drop_text"] if stage == "stage1" else None,
                                       cond=batch.get("cond"))

                loss = objective.loss(denoiser, batch["x0"], batch["noise"], batch["t"]) / config.grad_accumulation
            scaler.scale(loss).backward()
            total_loss += loss.item()
        if not math.isfinite(total_loss):
            raise MedSynError(f"the loss became {total_loss} at step {step}; training stopped. "
                              f"The last good checkpoint is step {last_saved} in {run / 'checkpoints'}")
        grad_norm = optimizer_step(model, ema, optimizer, scaler, config, step)

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


def optimizer_step(model: UNet3D, ema: UNet3D, optimizer, scaler, config: TrainConfig, step: int) -> float:
    """Clip, step, zero the gradients and update the EMA (a copy until ema_start); the gradient norm."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, config.ema_decay if step + 1 >= config.ema_start else 0.0)
    return grad_norm


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





