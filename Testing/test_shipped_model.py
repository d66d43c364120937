"""The trained demonstration model shipped in MedSynLib/models/default: whole, as its card says, and trained."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from MedSynLib.anatomy import LEFT_LOBES, RIGHT_LOBES
from MedSynLib.pipeline import EMBEDDED_MODEL, MedSynPipeline
from MedSynLib.text_encoder import EMBEDDED_ENCODER

CARD = EMBEDDED_MODEL / "README.md"


def card_checksums() -> dict[str, str]:
    """The `sha256  path` lines of the model card."""
    lines = re.findall(r"^([0-9a-f]{64})  (\S+)$", CARD.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {path: digest for digest, path in lines}


@pytest.fixture(scope="module")
def shipped():
    return MedSynPipeline.from_pretrained(EMBEDDED_MODEL)


def test_every_file_matches_the_checksum_on_its_card():
    files = {p.relative_to(EMBEDDED_MODEL).as_posix() for p in EMBEDDED_MODEL.rglob("*") if p.is_file()} - {"README.md"}
    listed = card_checksums()
    assert set(listed) == files
    for path, digest in listed.items():
        assert hashlib.sha256((EMBEDDED_MODEL / path).read_bytes()).hexdigest() == digest, path
    assert sum((EMBEDDED_MODEL / p).stat().st_size for p in files) < 50e6


def test_card_says_what_the_model_is_for():
    text = CARD.read_text(encoding="utf-8").lower()
    assert "not a clinical model" in text and "phantom" in text and "demonstration" in text


def test_shipped_model_is_the_trained_two_stage_demo(shipped):
    assert shipped.config.trained
    assert (shipped.stage1_config.size, shipped.stage2_config.size) == (64, 128)
    assert shipped.text_encoder_config.model == EMBEDDED_ENCODER


def test_a_short_generation_draws_air_filled_lungs_on_their_sides_inside_a_body(shipped):
    # A property of the trained weights: an untrained model gives noise and scattered masks.
    result = shipped.generate("Findings: No pleural effusion. The heart is not enlarged. Impression: Normal chest.",
                              seed=0, steps=4, stage2_steps=1)
    left = np.logical_or.reduce([result.masks[n] for n in LEFT_LOBES])
    right = np.logical_or.reduce([result.masks[n] for n in RIGHT_LOBES])
    lungs = left | right
    assert 0.05 < lungs.mean() < 0.5
    assert np.median(result.ct_hu[lungs]) < -600  # lungs are air
    assert np.percentile(result.ct_hu[~lungs], 90) > 0  # a body of soft tissue and bone around them
    # LPS arrays: x (last axis) grows toward the patient's left.
    assert np.argwhere(left)[:, 2].mean() > np.argwhere(right)[:, 2].mean() + 10
    assert result.metadata["synthetic"] and result.metadata["model_trained"]
