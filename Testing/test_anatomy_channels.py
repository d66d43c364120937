"""The structure table, label maps and the channel encodings the models generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedSynLib.anatomy import (
    LOBES,
    STRUCTURE_SETS,
    STRUCTURES,
    label_map_to_masks,
    masks_to_label_map,
    resolve_structures,
)
from MedSynLib.pipeline.channels import ChannelLayout, hu_to_unit, unit_to_hu


def test_structure_table_is_consistent():
    labels = [s.label for s in STRUCTURES.values()]
    assert len(set(labels)) == len(labels) and 0 not in labels
    for structure in STRUCTURES.values():
        assert all(0.0 <= c <= 1.0 for c in structure.color)
        terminology = structure.terminology()
        assert terminology["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert terminology["type"][0] == "SCT" and terminology["type"][1].isdigit()
    assert STRUCTURES["left_upper_lobe"].terminology()["typeModifier"][2] == "Left"
    assert len(STRUCTURE_SETS["lobes"]) == 7


def test_resolve_structures_rejects_unknown_and_repeated():
    assert [s.name for s in resolve_structures("lungs")] == list(STRUCTURE_SETS["lungs"])
    with pytest.raises(ValueError, match="unknown structure set"):
        resolve_structures("organs")
    with pytest.raises(ValueError, match="unknown structure"):
        resolve_structures(["liver"])
    with pytest.raises(ValueError, match="repeat"):
        resolve_structures(["airway", "airway"])


def test_label_map_draws_vessels_and_airway_over_lobes():
    lobe = np.zeros((4, 4, 4), bool)
    lobe[:2] = True
    vessel = np.zeros_like(lobe)
    vessel[1, 1, 1] = True
    label_map = masks_to_label_map({"vessels": vessel, "left_upper_lobe": lobe})
    assert label_map[1, 1, 1] == STRUCTURES["vessels"].label
    assert label_map[0, 0, 0] == STRUCTURES["left_upper_lobe"].label
    assert label_map[3, 3, 3] == 0


def test_lungs_are_the_union_of_their_lobes():
    label_map = np.zeros((3, 3, 3), np.uint8)
    label_map[0] = STRUCTURES["left_upper_lobe"].label
    label_map[1] = STRUCTURES["left_lower_lobe"].label
    label_map[2] = STRUCTURES["right_middle_lobe"].label
    masks = label_map_to_masks(label_map, resolve_structures("lungs"))
    assert masks["left_lung"][:2].all() and not masks["left_lung"][2].any()
    assert masks["right_lung"][2].all()
    with pytest.raises(ValueError, match="name no structure"):
        label_map_to_masks(np.full((2, 2, 2), 42), resolve_structures("lungs"))


def test_hu_mapping_matches_the_reference():
    hu = torch.tensor([-2000.0, -1024.0, -212.0, 600.0, 3000.0])
    unit = hu_to_unit(hu)
    assert torch.allclose(unit, torch.tensor([-1.0, -1.0, 0.0, 1.0, 1.0]))
    # The reference maps back with ((x + 1) / 2) * 1624 - 1024 = 812 x - 212.
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(unit_to_hu(x), (812 * x - 212).round().to(torch.int16))


def _random_masks(names, shape=(6, 6, 6), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.rand(shape, generator=generator) > 0.5 for n in names}


@pytest.mark.parametrize(("structures", "ct_window"), [("lobes", None), ("lungs", None), ("lobes", (-150, 150))])
def test_binary_encoding_round_trips_overlapping_masks(structures, ct_window):
    layout = ChannelLayout(STRUCTURE_SETS[structures], ct_window=ct_window)
    masks = _random_masks(layout.structures)
    ct = torch.randint(-1024, 600, (6, 6, 6))
    x = layout.encode(ct, masks)
    assert x.shape == (layout.num_channels, 6, 6, 6) and x.abs().max() <= 1
    ct_back, masks_back = layout.decode(x)
    assert (ct_back.int() - ct.int()).abs().max() <= 1
    assert all(torch.equal(masks_back[n], masks[n]) for n in layout.structures)


def test_reference_encoding_is_four_channels_with_a_lobe_label():
    layout = ChannelLayout(STRUCTURE_SETS["lobes"], "reference")
    assert layout.num_channels == 4
    label = torch.randint(0, 6, (5, 5, 5))
    masks = {name: label == STRUCTURES[name].label for name in LOBES}
    masks |= _random_masks(["airway", "vessels"], (5, 5, 5))
    channels = layout.encode_anatomy(masks)
    assert torch.allclose(channels[0], label / 5 * 2 - 1)
    decoded = layout.decode_anatomy(channels + 0.05)  # decoding tolerates small deviations
    assert all(torch.equal(decoded[n], masks[n]) for n in layout.structures)
    with pytest.raises(ValueError, match="lobes"):
        ChannelLayout(STRUCTURE_SETS["lungs"], "reference")


def test_window_channel_comes_second_and_resolves_soft_tissue_five_times_finer():
    layout = ChannelLayout(STRUCTURE_SETS["lobes"], ct_window=(-150, 150))
    assert layout.ct_channels == 2 and layout.num_channels == 2 + len(layout.structures)
    assert layout.channel_names[:3] == ("ct", "ct_window", layout.structures[0])
    assert layout.channels_of([layout.structures[0], "vessels"]) == [2, 1 + len(layout.structures)]
    fluid, muscle = layout.encode_ct(torch.tensor([10.0, 40.0]).view(2, 1, 1)).unbind(-3)
    assert (muscle - fluid)[1].item() == pytest.approx(0.2)  # 30 HU of a 300 HU window
    assert (muscle - fluid)[0].item() == pytest.approx(60 / 1624)


def test_window_decoding_takes_soft_tissue_from_the_window_and_the_rest_from_the_full_range():
    layout = ChannelLayout(STRUCTURE_SETS["lungs"], ct_window=(-150, 150))
    ct = torch.tensor([-900.0, -400.0, -60.0, 0.0, 35.0, 70.0, 400.0]).view(1, 1, 7)
    x = layout.encode(ct, {"left_lung": torch.zeros(ct.shape, dtype=torch.bool)})
    generator = torch.Generator().manual_seed(0)
    window_error = x.clone()
    window_error[1] += 0.05 * torch.randn(ct.shape, generator=generator)
    full_error = x.clone()
    full_error[0] += 0.05 * torch.randn(ct.shape, generator=generator)
    soft = ct.abs() < 100
    moved_by_window = (layout.decode(window_error)[0] - ct).abs()
    moved_by_full = (layout.decode(full_error)[0] - ct).abs()
    assert (moved_by_window[~soft] <= 1).all()  # lung and bone ignore the window channel
    assert (moved_by_full[soft] <= 1).all()  # soft tissue ignores the full-range channel
    assert (moved_by_window[soft] <= 0.15 * 150 + 1).all()  # a window unit is 150 HU, not 812


def test_window_channel_needs_a_window_inside_the_model_range_and_the_binary_encoding():
    for window in [(100, -100), (-2000, 100), (0, float("nan"))]:
        with pytest.raises(ValueError, match="ct_window"):
            ChannelLayout(STRUCTURE_SETS["lungs"], ct_window=window)
    with pytest.raises(ValueError, match="reference encoding"):
        ChannelLayout(STRUCTURE_SETS["lobes"], "reference", ct_window=(-150, 150))
