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


@pytest.mark.parametrize("structures", ["lobes", "lungs"])
def test_binary_encoding_round_trips_overlapping_masks(structures):
    layout = ChannelLayout(STRUCTURE_SETS[structures])
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
