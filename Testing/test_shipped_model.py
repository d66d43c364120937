"""The trained demonstration model shipped in MedSynLib/pretrained/default: whole, as its card says, and trained."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from MedSynLib.anatomy import LEFT_LOBES, RIGHT_LOBES, standard_masks
from MedSynLib.evaluation.findings import detect_effusion
from MedSynLib.pipeline.generation import MedSynPipeline
from MedSynLib.pipeline.model_folder import EMBEDDED_MODEL
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
    assert (shipped.stage1.config.size, shipped.stage2.config.size) == (32, 128)
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
    assert result.masks["airway"].any() and result.masks["vessels"].any()  # stage 2 learned the thin structures


REPORTS = {
    "left": "Findings: Moderate left pleural effusion. No pulmonary nodules. Normal heart size. "
            "Impression: Left pleural effusion.",
    "right": "Findings: There is a moderate right pleural effusion. No pulmonary nodules. Normal heart size. "
             "Impression: Right pleural effusion.",
    "none": "Findings: No pleural effusion. No pulmonary nodules. Normal heart size. "
            "Impression: No acute cardiopulmonary abnormality.",
}


@pytest.fixture(scope="module")
def by_report(shipped):
    """One seed, the three effusion reports, generated as `generate` does by default."""
    return {name: shipped.generate(report, seed=0) for name, report in REPORTS.items()}


def lung_ml(result) -> dict[str, float]:
    """Volume (mL) of each generated lung (the union of its lobe masks)."""
    masks = standard_masks(result.masks)
    voxel_ml = float(np.prod(result.geometry.spacing)) / 1000
    return {side: float(masks[f"{side}_lung"].sum()) * voxel_ml for side in ("left", "right")}


def test_the_report_decides_the_side_of_the_effusion(by_report):
    # A property the trained model learned: an effusion takes the room of the lung on the side the
    # report names (a text-blind model gives the same lungs for all three reports of one seed).
    left, right, none = (lung_ml(by_report[name]) for name in ("left", "right", "none"))
    assert left["left"] < right["left"] - 100 and left["left"] < none["left"] - 100
    assert right["right"] < left["right"] - 100 and right["right"] < none["right"] - 100


def test_a_left_effusion_report_puts_fluid_on_the_patients_left(by_report):
    # Fluid-density tissue (the control evaluation's effusion detector: -30..25 HU behind the lung,
    # touching it) on the patient's left, for the same seed: the asked finding is drawn, not only its room.
    fluid = {name: detect_effusion(r.ct_hu, r.geometry.spacing, r.masks).details["volume_ml"]
             for name, r in by_report.items()}
    assert fluid["left"]["left"] > fluid["right"]["left"] + 50
    assert fluid["left"]["left"] > fluid["none"]["left"] + 50
