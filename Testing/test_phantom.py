"""Tests of the procedural chest-CT phantom: determinism, anatomy, HU, findings, report."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from scipy import ndimage

from MedSynLib.anatomy import LEFT_LOBES, LOBES, RIGHT_LOBES
from MedSynLib.phantoms.chest import (
    CARDIOMEGALY_CTR,
    FINDING_KINDS,
    NEGATIONS,
    SIDES,
    VISIBLE_LESIONS,
    Finding,
    Phantom,
    balanced_findings,
    lobe_text,
    make_phantom,
    random_findings,
    write_report,
)

MASK_NAMES = {*LOBES, "airway", "vessels", "left_lung", "right_lung"}
NORMAL = ()


@functools.cache
def phantom(size: int = 32, seed: int = 0, findings: tuple[Finding, ...] | None = NORMAL) -> Phantom:
    """Phantoms shared between tests (read-only), so each is built once per session."""
    return make_phantom(size, seed=seed, findings=findings)


def lungs(p: Phantom) -> np.ndarray:
    return p.masks["left_lung"] | p.masks["right_lung"]


def centre_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Centre of mass (x, y, z mm from the volume corner)."""
    return np.array(ndimage.center_of_mass(mask))[::-1] * np.asarray(spacing)


def volume_ml(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    return float(mask.sum() * np.prod(spacing) / 1000.0)


def cardio_thoracic_ratio(p: Phantom) -> float:
    """Widest heart extent over widest lung extent along x, as on a frontal radiograph."""

    def width(mask: np.ndarray) -> int:
        columns = np.flatnonzero(mask.any(axis=(0, 1)))
        return int(columns[-1] - columns[0] + 1)

    return width(p.finding_masks["heart"]) / width(lungs(p))


def sentence_with(report: str, *words: str) -> bool:
    """Whether one sentence of the report holds all the words (case-insensitive)."""
    sentences = report.lower().replace(";", ".").split(".")
    return any(all(word.lower() in sentence for word in words) for sentence in sentences)


# ---------------------------------------------------------------------------------------
# Determinism, shapes, input checks
# ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_phantom():
    first = make_phantom(32, seed=3, findings=(Finding("nodule", "left_upper_lobe"),))
    second = make_phantom(32, seed=3, findings=(Finding("nodule", "left_upper_lobe"),))
    np.testing.assert_array_equal(first.ct_hu, second.ct_hu)
    assert first.masks.keys() == second.masks.keys()
    for name in first.masks:
        np.testing.assert_array_equal(first.masks[name], second.masks[name])
    for name in first.finding_masks:
        np.testing.assert_array_equal(first.finding_masks[name], second.finding_masks[name])
    assert first.report == second.report
    assert first.findings == second.findings


def test_different_seed_gives_different_phantom():
    a, b = phantom(32, seed=0), phantom(32, seed=1)
    assert not np.array_equal(a.ct_hu, b.ct_hu)
    assert not np.array_equal(lungs(a), lungs(b))
    assert not np.array_equal(a.masks["airway"], b.masks["airway"])


def test_random_findings_come_from_the_seed():
    drawn = [phantom(16, seed, None) for seed in range(6)]
    assert [p.findings for p in drawn] == [make_phantom(16, seed=seed).findings for seed in (0, 1)] + [
        p.findings for p in drawn[2:]
    ]
    assert any(p.findings for p in drawn) and not all(p.findings for p in drawn)
    for p in drawn:
        kinds = {finding.kind for finding in p.findings}
        assert set(p.finding_masks) == {"heart"} | (kinds & {"nodule", "effusion"})
        assert all(mask.any() for mask in p.finding_masks.values())


@pytest.mark.parametrize(
    ("size", "shape"),
    [(24, (24, 24, 24)), ((20, 24, 28), (20, 24, 28))],
)
def test_shapes_dtypes_and_spacing(size, shape):
    p = make_phantom(
        size, seed=2, findings=(Finding("effusion", "right"), Finding("nodule", "right_upper_lobe"))
    )
    assert p.ct_hu.shape == shape and p.ct_hu.dtype == np.int16
    assert set(p.masks) == MASK_NAMES
    assert set(p.finding_masks) == {"heart", "nodule", "effusion"}
    for mask in (*p.masks.values(), *p.finding_masks.values()):
        assert mask.shape == shape and mask.dtype == bool
    depth, height, width = shape
    assert p.spacing == pytest.approx((320.0 / width, 320.0 / height, 320.0 / depth))
    assert isinstance(p.report, str) and p.report


def test_fov_sets_spacing():
    assert make_phantom(16, seed=0, findings=NORMAL, fov_mm=400.0).spacing == pytest.approx(
        (25.0, 25.0, 25.0)
    )


@pytest.mark.parametrize("size", [0, 4, (32, 32), (32, 32, 2), 32.0, "64"])
def test_bad_size_raises(size):
    with pytest.raises(ValueError):
        make_phantom(size)


def test_bad_fov_raises():
    with pytest.raises(ValueError):
        make_phantom(16, fov_mm=0.0)


@pytest.mark.parametrize(
    ("kind", "location"),
    [
        ("tumour", None),
        ("nodule", None),
        ("nodule", "left"),
        ("nodule", "left_middle_lobe"),
        ("effusion", None),
        ("effusion", "middle"),
        ("effusion", "left_upper_lobe"),
        ("cardiomegaly", "left"),
    ],
)
def test_invalid_finding_raises(kind, location):
    with pytest.raises(ValueError):
        Finding(kind, location)


def test_valid_findings_construct():
    for lobe in LOBES:
        assert Finding("nodule", lobe).location == lobe
    assert Finding("effusion", "left").kind == "effusion"
    assert Finding("cardiomegaly").location is None


@pytest.mark.parametrize(
    "findings",
    [
        (Finding("cardiomegaly"), Finding("cardiomegaly")),
        (Finding("effusion", "left"), Finding("effusion", "left")),
        ("nodule",),
    ],
)
def test_bad_findings_raise(findings):
    with pytest.raises(ValueError):
        make_phantom(16, findings=findings)


# ---------------------------------------------------------------------------------------
# Anatomy
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "seed", "findings"),
    [(32, 0, NORMAL), (32, 1, NORMAL), (64, 0, NORMAL), (32, 2, (Finding("effusion", "left"),))],
)
def test_lobes_partition_each_lung(size, seed, findings):
    p = phantom(size, seed, findings)
    left = np.logical_or.reduce([p.masks[name] for name in LEFT_LOBES])
    right = np.logical_or.reduce([p.masks[name] for name in RIGHT_LOBES])
    np.testing.assert_array_equal(p.masks["left_lung"], left)
    np.testing.assert_array_equal(p.masks["right_lung"], right)
    total = sum(p.masks[name].astype(int) for name in LOBES)
    assert total.max() == 1, "lobes overlap"
    assert all(p.masks[name].any() for name in LOBES)
    assert not (p.masks["left_lung"] & p.masks["right_lung"]).any()


@pytest.mark.parametrize(("size", "seed"), [(32, 0), (32, 1), (32, 2), (64, 0), (64, 5)])
def test_airway_is_one_tree_from_the_top_slice(size, seed):
    p = phantom(size, seed)
    airway = p.masks["airway"]
    _, count = ndimage.label(airway, structure=np.ones((3, 3, 3)))
    assert count == 1
    assert airway[-1].any(), "the trachea must enter through the top slice"
    assert not airway[0].any(), "the airway ends inside the chest"
    # It branches into both lungs.
    assert (airway & p.masks["left_lung"]).sum() > 0 and (airway & p.masks["right_lung"]).sum() > 0
    assert (p.ct_hu[airway] < -900).mean() > 0.95


@pytest.mark.parametrize(("size", "seed"), [(32, 0), (64, 0), (64, 5)])
def test_vessels_lie_in_the_lungs(size, seed):
    p = phantom(size, seed)
    vessels = p.masks["vessels"]
    assert vessels.sum() > 50
    assert (vessels & lungs(p)).sum() / vessels.sum() > 0.9
    assert (vessels & p.masks["left_lung"]).any() and (vessels & p.masks["right_lung"]).any()
    assert not (vessels & p.masks["airway"]).any()
    assert abs(np.median(p.ct_hu[vessels]) - 40) < 40


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_layout_follows_lps(seed):
    p = phantom(64, seed)
    left, right = centre_mm(p.masks["left_lung"], p.spacing), centre_mm(p.masks["right_lung"], p.spacing)
    assert left[0] > right[0] + 60, "patient's left lung is at larger x"
    middle = (left + right) / 2
    heart = centre_mm(p.finding_masks["heart"], p.spacing)
    assert heart[0] > middle[0], "the heart sits left of the midline"
    assert heart[1] < middle[1] - 10, "the heart is anterior"
    bone = p.ct_hu > 300
    spine = centre_mm(bone & (np.abs(np.arange(64) - 31.5) < 6)[None, None, :], p.spacing)
    assert spine[1] > middle[1] + 20, "the spine is posterior"
    trachea = centre_mm(p.masks["airway"][-1:], p.spacing)
    assert abs(trachea[0] - 160.0) < 10 and abs(trachea[0] - middle[0]) < 15
    assert spine[1] > trachea[1] > heart[1], "trachea lies between the heart and the spine"


def test_anatomy_varies_with_seed():
    volumes = {round(volume_ml(lungs(phantom(32, seed)), phantom(32, seed).spacing)) for seed in range(4)}
    hearts = {int(phantom(32, seed).finding_masks["heart"].sum()) for seed in range(4)}
    assert len(volumes) == 4 and len(hearts) > 1


def test_resolution_keeps_the_anatomy():
    coarse, fine = phantom(32, 0), phantom(64, 0)
    for name in ("left_lung", "right_lung"):
        v32, v64 = volume_ml(coarse.masks[name], coarse.spacing), volume_ml(fine.masks[name], fine.spacing)
        assert abs(v32 - v64) / v64 < 0.15
        shift = centre_mm(coarse.masks[name], coarse.spacing) - centre_mm(fine.masks[name], fine.spacing)
        assert np.abs(shift).max() < 8.0
    h32 = volume_ml(coarse.finding_masks["heart"], coarse.spacing)
    h64 = volume_ml(fine.finding_masks["heart"], fine.spacing)
    assert abs(h32 - h64) / h64 < 0.2


def test_lung_volume_is_adult_sized():
    p = phantom(64, 0)
    assert 1500 < volume_ml(lungs(p), p.spacing) < 7000


# ---------------------------------------------------------------------------------------
# Hounsfield units
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 5])
def test_hounsfield_ranges(seed):
    p = phantom(64, seed)
    ct = p.ct_hu.astype(float)
    lung = lungs(p)
    parenchyma = lung & ~p.masks["vessels"] & ~p.masks["airway"]
    assert -900 < ct[parenchyma].mean() < -750
    assert ct[parenchyma].std() > 5, "the lung has texture"
    body = ndimage.binary_fill_holes(ct > -500)
    assert ct[~body].mean() < -950, "air outside the body"
    soft = body & ~lung & ~p.masks["airway"]
    assert 0 < np.median(ct[soft]) < 100
    assert 0 < ct[p.finding_masks["heart"]].mean() < 100
    assert ((ct > 400) & (ct < 900)).sum() > 100, "bone"
    assert ct.min() >= -1024 and ct.max() < 1200


# ---------------------------------------------------------------------------------------
# Findings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lobe", LOBES)
def test_nodule_lies_in_its_lobe(lobe):
    p = phantom(64, 4, (Finding("nodule", lobe),))
    nodule = p.finding_masks["nodule"]
    assert nodule.sum() >= 4, "visible at 64^3"
    assert not (nodule & ~p.masks[lobe]).any()
    ct = p.ct_hu.astype(float)
    assert -50 < ct[nodule].mean() < 100
    assert ct[nodule].mean() - ct[p.masks[lobe] & ~nodule].mean() > 600
    assert sentence_with(p.report, "nodule", lobe_text(lobe))
    assert not any(sentence in p.report for sentence in NEGATIONS["nodule"])


def test_nodule_keeps_the_chest():
    """A nodule changes only its sphere: same seed, same anatomy around it."""
    normal = phantom(64, 4)
    p = phantom(64, 4, (Finding("nodule", "right_lower_lobe"),))
    outside = ~p.finding_masks["nodule"]
    np.testing.assert_array_equal(p.masks["right_lung"], normal.masks["right_lung"])
    assert np.mean(p.ct_hu[outside] == normal.ct_hu[outside]) > 0.999


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_displaces_its_lung(side):
    other = "right" if side == "left" else "left"
    normal = phantom(64, 1)
    p = phantom(64, 1, (Finding("effusion", side),))
    fluid = p.finding_masks["effusion"]
    assert fluid.sum() > 100
    assert p.masks[f"{side}_lung"].sum() < 0.95 * normal.masks[f"{side}_lung"].sum()
    np.testing.assert_array_equal(p.masks[f"{other}_lung"], normal.masks[f"{other}_lung"])
    assert not (fluid & lungs(p)).any()
    assert (fluid & normal.masks[f"{side}_lung"]).sum() == fluid.sum(), "fluid fills that pleural space"
    # Dependent: posterior and inferior of the lung it compresses; visible as fluid.
    fluid_centre = centre_mm(fluid, p.spacing)
    lung_centre = centre_mm(normal.masks[f"{side}_lung"], p.spacing)
    assert fluid_centre[1] > lung_centre[1] + 20 and fluid_centre[2] < lung_centre[2]
    assert (fluid_centre[0] > 160) == (side == "left")
    assert -20 < p.ct_hu[fluid].astype(float).mean() < 40
    assert sentence_with(p.report, side, "effusion")
    assert not any(sentence in p.report for sentence in NEGATIONS["effusion"])


def test_cardiomegaly_enlarges_the_heart():
    normal = phantom(64, 2)
    p = phantom(64, 2, (Finding("cardiomegaly"),))
    assert p.finding_masks["heart"].sum() > 1.3 * normal.finding_masks["heart"].sum()
    assert cardio_thoracic_ratio(p) > CARDIOMEGALY_CTR
    assert cardio_thoracic_ratio(normal) < CARDIOMEGALY_CTR - 0.03
    assert "enlarged" in p.report.lower() or "cardiomegaly" in p.report.lower()
    assert not any(sentence in p.report for sentence in NEGATIONS["cardiomegaly"])


def test_normal_ctr_over_seeds():
    for seed in range(4):
        assert 0.3 < cardio_thoracic_ratio(phantom(32, seed)) < CARDIOMEGALY_CTR


def test_several_findings_together():
    findings = (Finding("nodule", "left_lower_lobe"), Finding("effusion", "left"), Finding("cardiomegaly"))
    p = phantom(64, 6, findings)
    assert p.findings == findings
    assert not (p.finding_masks["nodule"] & ~p.masks["left_lower_lobe"]).any()
    assert not (p.finding_masks["nodule"] & p.finding_masks["effusion"]).any()
    for kind in FINDING_KINDS:
        assert not any(sentence in p.report for sentence in NEGATIONS[kind])


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def test_normal_report_negates_every_kind():
    p = phantom(32, 0)
    assert p.findings == ()
    assert set(p.finding_masks) == {"heart"}
    for kind in FINDING_KINDS:
        assert any(sentence in p.report for sentence in NEGATIONS[kind]), kind


def test_report_names_lobe_side_and_negates_the_rest():
    findings = (Finding("nodule", "right_middle_lobe"), Finding("effusion", "left"))
    for seed in range(10):
        report = write_report(findings, np.random.default_rng(seed))
        assert sentence_with(report, "nodule", "right middle lobe")
        assert sentence_with(report, "left", "effusion")
        assert any(sentence in report for sentence in NEGATIONS["cardiomegaly"])
        assert not any(sentence in report for sentence in NEGATIONS["nodule"] + NEGATIONS["effusion"])


def test_report_quotes_measurements():
    nodule, effusion = Finding("nodule", "left_upper_lobe"), Finding("effusion", "right")
    report = write_report(
        (nodule, effusion), np.random.default_rng(0), measurements={nodule: 12.0, effusion: 40.0}
    )
    assert sentence_with(report, "12 mm", "left upper lobe")
    assert sentence_with(report, "large", "right", "effusion")
    assert (
        "an 18 mm" in write_report((nodule,), np.random.default_rng(0), measurements={nodule: 18.0}).lower()
    )


def test_report_wording_varies_but_is_seeded():
    findings = (Finding("cardiomegaly"),)
    reports = [write_report(findings, np.random.default_rng(seed)) for seed in range(20)]
    assert reports == [write_report(findings, np.random.default_rng(seed)) for seed in range(20)]
    assert len(set(reports)) > 5
    assert all(report.strip() for report in reports)


def test_random_findings_cover_every_kind():
    rng = np.random.default_rng(0)
    draws = [random_findings(rng) for _ in range(300)]
    assert any(len(d) == 0 for d in draws)
    kinds = {finding.kind for draw in draws for finding in draw}
    assert kinds == set(FINDING_KINDS)
    assert {f.location for d in draws for f in d if f.kind == "nodule"} == set(LOBES)
    assert all(len(set(d)) == len(d) for d in draws)


def test_balanced_findings_repeat_every_combination_in_60_cases():
    designs = [balanced_findings(i) for i in range(120)]
    combos = [frozenset(d) for d in designs[:60]]
    with_nodule = [c for c in combos if any(f.kind == "nodule" for f in c)]
    assert len(set(with_nodule)) == len(with_nodule) == 30 and len(set(combos)) == 36
    assert designs[60:] == designs[:60]
    effusions = [next((f.location for f in d if f.kind == "effusion"), None) for d in designs[:60]]
    assert {side: effusions.count(side) for side in (*SIDES, None)} == {"left": 20, "right": 20, None: 20}
    assert sum(Finding("cardiomegaly") in d for d in designs[:60]) == 30
    nodule_lobes = [f.location for d in designs[:60] for f in d if f.kind == "nodule"]
    assert sorted(set(nodule_lobes)) == sorted(LOBES) and len(nodule_lobes) == 30


def test_visible_lesions_draw_larger_nodules_and_effusions():
    nodule = Finding("nodule", "right_lower_lobe")
    diameters = []
    for seed in range(6):
        p = make_phantom(32, seed=seed, findings=(nodule,), lesions=VISIBLE_LESIONS)
        diameters.append(float(p.report.split(" mm ")[0].split()[-1]))
    low, high = VISIBLE_LESIONS.nodule_diameter_mm
    assert all(low <= d <= high for d in diameters)
    effusion = (Finding("effusion", "left"),)
    default = [volume_ml(make_phantom(32, seed=s, findings=effusion).finding_masks["effusion"], (10.0,) * 3)
               for s in range(8)]
    visible = [volume_ml(make_phantom(32, seed=s, findings=effusion, lesions=VISIBLE_LESIONS)
                         .finding_masks["effusion"], (10.0,) * 3) for s in range(8)]
    assert np.mean(visible) > np.mean(default)
