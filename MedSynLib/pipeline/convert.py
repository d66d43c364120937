"""Import the reference implementation's released checkpoints into a MedSyn model folder.

The command is `python -m MedSynLib.convert reference` (cli/convert.py).

PATH is a state dict (`.bin` / `.pt` / `.pth` / `.ckpt` pickle, or `.safetensors`) or an
`accelerate` checkpoint folder (`save_state`): the reference's trainers prepare the model
first and the EMA model second, so `pytorch_model.bin` / `model.safetensors` hold the
trained weights and `pytorch_model_1.bin` / `model_1.safetensors` (or any `ema*` file) the
EMA. Each stage defaults to the weights the authors' evaluation scripts sample with:
stage 1 the EMA (`eval_low_res_given_prompt.py` samples with its EMA model), stage 2 the
trained, non-EMA weights (`eval_super_res.py` prepares a single model, which accelerate's
`load_state` fills from the index-0 file); `--weights` sets both. Pickles are read only with
`torch.load(weights_only=True)`: a file holding anything but tensors and plain containers is
refused. Wrapper prefixes (`module.`, `denoise_fn.`, `ema_model.`, `model.`, `_orig_mod.`) are
stripped; the diffusion wrapper's schedule buffers (including the five `ddim_*` buffers of the
older training code) are ignored and listed in the report; the middle spatial attention that
the reference shares between blocks is re-tied when a checkpoint stores it under one name only
(accelerate's safetensors saving keeps one name per shared tensor). Then every key and shape
must match `ReferenceUNet3D`, or the command stops (exit 2) naming the missing, unexpected and
mis-shaped keys.

The model folder gets the reference's semantics: 4 channels in the "reference" encoding
(CT, lobe label, airway, vessel) for the "lobes" structures, x0 prediction, the cosine
schedule with alpha_bar clamped to [1e-4, 1 - 1e-4] as the reference's `src/utils.py` trains
and samples, its DDIM loop (`ddim_reference`: 50 moves on t = 1, 0.98, ..., 0 and the x0
predicted at t = 0, i.e. 51 network calls for stage 1 and 21 for stage 2, x0 clipped to
[-1, 1]; the reference's integer stride int(1000 / n) for other step counts), no
guidance (the reference samples with cond_scale 1), and the report encoder
CXR-BERT-specialized with the reference's features (192 tokens, [PAD] hidden states kept,
no mask): the authors' fine-tuned folder when given (copied into `text_encoder/`), else the
hub id with trust_remote_code; the `classifier.*` head of their fine-tuned state dict is not
part of the encoder and is ignored (their loader ignores it too, strict=False) and listed.
The up levels run in the evaluation scripts' order unless `--up-order training` asks for the
training scripts' (see `networks/reference.py`). Remaining differences: the reference runs stage 1 in fp16
(`--dtype float16` on a GPU comes close) and truncates HU toward zero where we round (at
most 1 HU).

Orientation. The reference writes the network's (depth, height, width) array with
`SimpleITK.GetImageFromArray`, so depth becomes the image z axis, height y and width x, with
unit spacing, zero origin and identity direction; its `postprocess.py` flips the height axis
(`np.flip(img, 1)`, i.e. y) before mapping [0, 1] to HU, so the network's arrays hold y
reversed relative to the volumes the authors show. Converted models therefore carry
`flip_axes = (1,)`: outputs are flipped along y before they are written in LPS, and a given
anatomy is flipped the same way on its way in. Volumes were affinely registered to an
(unpublished) atlas and resized to 256^3, so no physical spacing exists: MedSyn places them
on a centred grid of 1.25 mm voxels (320 mm field of view); the reference writes 1 mm.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from MedSynLib.anatomy import STRUCTURE_SETS
from MedSynLib.diffusion.schedules import DiffusionConfig
from MedSynLib.errors import MedSynError, weights_file_problem
from MedSynLib.geometry import NOMINAL_FIELD_OF_VIEW_MM
from MedSynLib.networks.reference import (
    ReferenceUNet3D,
    ReferenceUNetConfig,
    reference_stage1_config,
    reference_stage2_config,
)
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.model_folder import ModelConfig, Stage, StageConfig, state_dict_misfit
from MedSynLib.text_encoder import TextEncoderConfig, encoder_hidden_size, resolve_model_path

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "denoise_fn.", "ema_model.", "model.")
# Buffers of the reference's GaussianDiffusion wrapper (the older training code's ddim_* ones
# included) and of EMA helpers: not network weights, ignored and listed in the report.
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "ddim_sigmas", "ddim_alphas", "ddim_alphas_prev", "ddim_sqrt_one_minus_alphas", "ddim_sigmas_for_original_num_steps",
    "initted", "step",
})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# In a checkpoint dict that is not itself a state dict, where each kind of weights lives.
NESTED_KEYS = {"ema": ("ema", "ema_model", "ema_state_dict"), "model": ("model", "state_dict", "model_state_dict")}
WEIGHT_CHOICES = ("ema", "model")
# What the authors' evaluation scripts load: stage 1 samples with its EMA model; stage 2
# prepares one model, which accelerate's load_state fills from the index-0 (trained) file.
DEFAULT_WEIGHTS = {"stage1": "ema", "stage2": "model"}
WEIGHT_LABELS = {"ema": "EMA weights", "model": "trained (non-EMA) weights"}
LOADED_BY = {"stage1": "eval_low_res_given_prompt.py", "stage2": "eval_super_res.py"}
TEXT_HEAD_PREFIX = "classifier."  # the fine-tuned encoder's classification head: not used for features
REFERENCE_TEXT_POSITIONS = 2048  # the reference grows CXR-BERT's 512 learned positions to 2048
POSITION_BUFFERS = ("position_ids", "token_type_ids")  # derived from the table size, not learned


def find_weight_file(folder: Path, weights: str) -> Path:
    """The model or EMA weights inside an accelerate checkpoint folder."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith((*PICKLE_SUFFIXES, ".safetensors")))
    if weights == "ema":
        candidates = [p for p in files if p.name.startswith("ema")]
        candidates += [p for p in files if p.name in ("pytorch_model_1.bin", "model_1.safetensors")]
    else:
        candidates = [p for p in files if p.name in ("pytorch_model.bin", "model.safetensors")]
    if not candidates:
        raise MedSynError(
            f"no {weights} weights in {folder} (looked for "
            f"{'ema*, pytorch_model_1.bin, model_1.safetensors' if weights == 'ema' else 'pytorch_model.bin, model.safetensors'}"
            f"; found {[p.name for p in files] or 'no weight files'}); try --weights {'model' if weights == 'ema' else 'ema'}"
        )
    return candidates[0]


def read_checkpoint(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a weights file or an accelerate checkpoint folder (pickles: weights_only)."""
    return _read_weights(path, weights)[0]


def _read_weights(path: str | Path, weights: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The weights and, where `weights` chose among several, the file or entry chosen (for the report)."""
    if weights not in WEIGHT_CHOICES:
        raise MedSynError(f"--weights must be one of {WEIGHT_CHOICES}, got {weights!r}")
    path = Path(path)
    chosen = path.is_dir()
    if chosen:
        path = find_weight_file(path, weights)
    if not path.is_file():
        raise MedSynError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            state, origin = load_file(path), str(path)
        except (SafetensorError, OSError) as error:
            raise MedSynError(f"cannot read {path}: {error}") from error
    else:
        state, origin = _read_pickle(path, weights)
    return state, origin if chosen or origin != str(path) else None


def _read_pickle(path: Path, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise MedSynError(f"refusing {path}: {weights_file_problem(error)}") from error
    return _state_dict_of(data, weights, path)


def _state_dict_of(data: object, weights: str, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    if not isinstance(data, dict):
        raise MedSynError(f"{path} holds a {type(data).__name__}, not a state dict")
    origin = str(path)
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        nested = [k for k in NESTED_KEYS[weights] if isinstance(data.get(k), dict)]
        if not nested:
            raise MedSynError(
                f"{path} is not a flat state dict and has no {weights} weights under {list(NESTED_KEYS[weights])} "
                f"(top-level keys: {sorted(map(str, data))[:8]})"
            )
        data, origin = data[nested[0]], f"{path}[{nested[0]!r}]"
    others = sorted(str(k) for k, v in data.items() if not isinstance(v, torch.Tensor))
    if others:
        raise MedSynError(f"{path}: entries that are not tensors: {others[:5]}")
    return dict(data), origin


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes, repeatedly (e.g. `module.denoise_fn.`)."""
    stripped = {}
    for key, value in state.items():
        name = key
        while name.startswith(WRAPPER_PREFIXES):
            name = name[next(len(p) for p in WRAPPER_PREFIXES if name.startswith(p)):]
        if name in stripped:
            raise MedSynError(f"two checkpoint entries map to {name!r} once wrapper prefixes are removed")
        stripped[name] = value
    return stripped


class MatchedState(NamedTuple):
    """A checkpoint fitted to the network, and what was done to fit it (for the conversion report)."""

    state: dict[str, torch.Tensor]  # float32 tensors in the network's key order
    ignored: list[str]  # entries that are not network weights (IGNORED_KEYS)
    retied: list[str]  # shared weights the checkpoint stored under another name only


def match_state_dict(network: ReferenceUNet3D, state: dict[str, torch.Tensor], *, source: str) -> MatchedState:
    """Check every key and shape against the network, ignoring non-network buffers and re-tying shared weights."""
    expected = network.state_dict()
    ignored = sorted(k for k in state if k in IGNORED_KEYS and k not in expected)
    state = {k: v for k, v in state.items() if k not in ignored}
    # Weights the reference shares (its middle spatial attention), grouped by storage.
    shared: dict[int, list[str]] = {}
    for name, value in expected.items():
        if value.numel():
            shared.setdefault(value.data_ptr(), []).append(name)
    absent = {k for k in expected if k not in state}
    for names in shared.values():
        stored = [n for n in names if n in state]
        if stored:
            state.update({n: state[stored[0]] for n in names if n in absent})
    retied = [k for k in expected if k in absent and k in state]
    misfit = state_dict_misfit(expected, state)
    if misfit:
        raise MedSynError(f"{source} does not fit the reference {network.config.variant} network "
                          f"(dim {network.config.dim}): {misfit}")
    for first, *others in shared.values():
        for name in others:
            if not torch.equal(state[first], state[name]):
                raise MedSynError(f"{source}: {name} should equal the shared weight {first} but differs")
    fitted = {k: state[k].float() if state[k].is_floating_point() else state[k] for k in expected}
    return MatchedState(fitted, ignored, retied)


def load_reference_network(path: str | Path, config: ReferenceUNetConfig, weights: str, *,
                           stage: str) -> tuple[ReferenceUNet3D, str]:
    """The network with the checkpoint's weights, and the conversion report's line about it."""
    network = ReferenceUNet3D(config)
    state, origin = _read_weights(path, weights)
    matched = match_state_dict(network, strip_prefixes(state), source=str(path))
    network.load_state_dict(matched.state)
    authors = f"the authors' {LOADED_BY[stage]} samples with the {WEIGHT_LABELS[DEFAULT_WEIGHTS[stage]]}"
    if origin is None:
        line = f"{stage}: the one state dict in {path}, used as it is ({authors})"
    elif weights == DEFAULT_WEIGHTS[stage]:
        line = f"{stage}: {WEIGHT_LABELS[weights]} from {origin} ({authors})"
    else:
        line = f"{stage}: {WEIGHT_LABELS[weights]} from {origin} (--weights {weights}; {authors})"
    line += f", up levels in the {config.up_order} scripts' order"
    if matched.ignored:
        line += f"; ignored {len(matched.ignored)} non-network entries: {', '.join(matched.ignored)}"
    if matched.retied:
        line += f"; re-tied {len(matched.retied)} shared weights stored under one name: {', '.join(matched.retied)}"
    return network.eval().requires_grad_(False), line


def extend_position_embeddings(model: torch.nn.Module, positions: int) -> None:
    """Grow each BERT position table to `positions` rows, keeping the learned rows (the reference's recipe)."""
    tables = [m for _, m in model.named_modules() if isinstance(getattr(m, "position_embeddings", None), torch.nn.Embedding)]
    if not tables:
        raise MedSynError("the text encoder has no learned position embeddings to extend")
    for embeddings in tables:
        old = embeddings.position_embeddings
        if old.num_embeddings >= positions:
            continue
        new = torch.nn.Embedding(positions, old.embedding_dim, padding_idx=old.padding_idx)
        new.weight.data[: old.num_embeddings] = old.weight.data
        embeddings.position_embeddings = new
        embeddings.register_buffer("position_ids", torch.arange(positions).expand(1, -1), persistent=False)
        if hasattr(embeddings, "token_type_ids"):
            embeddings.register_buffer("token_type_ids", torch.zeros(1, positions, dtype=torch.long), persistent=False)
    model.config.max_position_embeddings = positions


def fine_tuned_text_encoder(base: str, weights: str | Path, out: Path) -> list[str]:
    """The authors' encoder, saved whole into `out`: the base CXR-BERT, its positions extended to
    2048, their fine-tuned weights on top (a state dict, read with weights_only). Returns the
    entries ignored: the `classifier.*` head, which their own loader skips too (strict=False)."""
    from transformers import AutoModel, AutoTokenizer

    config = TextEncoderConfig.named(base)
    path = resolve_model_path(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        model = AutoModel.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MedSynError(f"could not load the base text encoder {base!r}: {first_line}") from error
    extend_position_embeddings(model, REFERENCE_TEXT_POSITIONS)
    state = {k.removeprefix("module."): v for k, v in read_checkpoint(weights, "model").items()}
    expected = model.state_dict()
    ignored = sorted(k for k in state if k.startswith(TEXT_HEAD_PREFIX) and k not in expected)
    state = {k: v for k, v in state.items() if k not in ignored}
    learned = [k for k in expected if not k.endswith(POSITION_BUFFERS)]
    derived = [k for k in state if k.endswith(POSITION_BUFFERS)]
    misfit = state_dict_misfit({k: expected[k] for k in learned}, state, optional=derived)
    if misfit:
        raise MedSynError(f"{weights} does not fit {base} with {REFERENCE_TEXT_POSITIONS} positions: {misfit}")
    model.load_state_dict({k: state[k] for k in learned}, strict=False)
    tokenizer.model_max_length = REFERENCE_TEXT_POSITIONS
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return ignored


def reference_text_encoder(text_encoder: str | Path | None, out: Path, text_dim: int,
                           text_weights: str | Path | None = None) -> tuple[TextEncoderConfig, list[str]]:
    """The report encoder config and the report's lines about it; a folder (or base + fine-tuned
    weights) goes into out/text_encoder, named "."."""
    notes = []
    if text_weights is not None:
        ignored = fine_tuned_text_encoder(str(text_encoder or "reference"), text_weights, out / "text_encoder")
        if ignored:
            notes.append(f"text encoder: ignored {len(ignored)} entries of {text_weights} that are not part of "
                         f"the encoder (the authors' loader skips them too): {', '.join(ignored)}")
        source = out / "text_encoder"
    elif text_encoder is not None and Path(text_encoder).is_dir():
        source = Path(text_encoder)
        shutil.copytree(source, out / "text_encoder", dirs_exist_ok=True)
    else:
        config = TextEncoderConfig.named(str(text_encoder or "reference"), max_tokens=192, keep_padding_states=True)
        check = config if config.model.startswith("embedded:") else None  # hub ids may be offline: not checked
        if check is not None and (hidden := encoder_hidden_size(check)) != text_dim:
            raise MedSynError(f"text encoder {text_encoder} gives {hidden}-d features but stage 1 expects {text_dim}")
        return config, notes
    remote_code = any(source.glob("*.py")) or "auto_map" in json.loads(
        (source / "config.json").read_text(encoding="utf-8") if (source / "config.json").is_file() else "{}")
    check = TextEncoderConfig(model=str(out / "text_encoder"), trust_remote_code=remote_code)
    if (hidden := encoder_hidden_size(check)) != text_dim:
        raise MedSynError(f"text encoder {text_encoder} gives {hidden}-d features but stage 1 expects {text_dim}")
    return TextEncoderConfig(model=".", max_tokens=192, trust_remote_code=remote_code, keep_padding_states=True), notes


def convert_reference(
    stage1: str | Path,
    stage2: str | Path,
    out: str | Path,
    *,
    text_encoder: str | Path | None = None,
    text_encoder_weights: str | Path | None = None,
    weights: str | None = None,
    stage1_network: ReferenceUNetConfig | None = None,
    stage2_network: ReferenceUNetConfig | None = None,
    stage1_size: int = 64,
    stage2_size: int = 256,
) -> tuple[MedSynPipeline, list[str]]:
    """Write a model folder from the reference's two checkpoints; returns the pipeline and the
    conversion report's lines. `weights` None: each stage what the authors' scripts load."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MedSynError(f"output {out} exists and is not an empty folder")
    s1 = StageConfig(stage1_network or reference_stage1_config(),
                     DiffusionConfig("cosine", "x0", "ddim_reference", num_steps=50, guidance_scale=1.0, clip_x0=True),
                     stage1_size, architecture="reference")
    s2 = StageConfig(stage2_network or reference_stage2_config(),
                     DiffusionConfig("cosine", "x0", "ddim_reference", num_steps=20, guidance_scale=1.0, clip_x0=True),
                     stage2_size, architecture="reference")
    kinds = {stage: weights or default for stage, default in DEFAULT_WEIGHTS.items()}
    network1, line1 = load_reference_network(stage1, s1.network, kinds["stage1"], stage="stage1")
    network2, line2 = load_reference_network(stage2, s2.network, kinds["stage2"], stage="stage2")
    config = ModelConfig(
        structures=STRUCTURE_SETS["lobes"],
        channel_encoding="reference",
        spacing_mm=(NOMINAL_FIELD_OF_VIEW_MM / stage2_size,) * 3,
        trained=True,
        flip_axes=(1,),  # the reference's postprocess.py flips y before its volumes are shown
        description=f"reference MedSyn checkpoints imported from {Path(stage1).name} ({kinds['stage1']} weights), "
                    f"{Path(stage2).name} ({kinds['stage2']} weights)",
    )
    out.mkdir(parents=True, exist_ok=True)
    try:
        text_config, text_notes = reference_text_encoder(text_encoder, out, s1.network.text_dim, text_encoder_weights)
        pipeline = MedSynPipeline(config, Stage(s1, network1), Stage(s2, network2), text_config, source=str(out))
        pipeline.save_pretrained(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return pipeline, [line1, line2, *text_notes]
