"""Shared fixtures: tiny untrained models (the same code as the full-size presets)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_pipeline():
    from MedSynLib.pipeline.presets import build_pipeline

    return build_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("models") / "tiny"
    tiny_pipeline.save_pretrained(folder)
    return folder


PHANTOM_REPORTS_SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="session")
def text_encoder():
    from MedSynLib.text_encoder import ReportEncoder, TextEncoderConfig

    return ReportEncoder(TextEncoderConfig())


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory, text_encoder):
    """A prepared dataset of 4 phantom cases on the tiny preset's grids (32^3 and 16^3)."""
    import dataclasses

    import numpy as np
    import torch.nn.functional as F

    from MedSynLib.anatomy import STRUCTURE_SETS
    from MedSynLib.data.prepared import PreparedCase, write_case, write_index
    from MedSynLib.geometry import Geometry
    from MedSynLib.phantoms.chest import make_phantom

    root = tmp_path_factory.mktemp("prepared")
    (root / "cases").mkdir()
    structures = STRUCTURE_SETS["lobes"]
    ids = []
    for seed in PHANTOM_REPORTS_SEEDS:
        phantom = make_phantom(32, seed=seed)
        features = text_encoder.encode([phantom.report])

        def low(array, nearest=True):
            import torch

            tensor = torch.from_numpy(array.astype(np.float32))[None, None]
            return F.interpolate(tensor, size=(16, 16, 16), mode="nearest")[0, 0].numpy()

        case = PreparedCase(
            case_id=f"phantom{seed}", ct_hu=phantom.ct_hu, ct_hu_low=low(phantom.ct_hu).astype(np.int16),
            masks={n: phantom.masks[n] for n in structures},
            masks_low={n: low(phantom.masks[n]) > 0.5 for n in structures},
            text_features=features.features[0].numpy(), text_mask=features.mask[0].numpy(), report=phantom.report,
            geometry=Geometry.centered((32, 32, 32), phantom.spacing),
        )
        write_case(root / "cases" / f"{case.case_id}.npz", case, structures)
        ids.append(case.case_id)
    write_index(root, structures=structures, size=32, low_size=16,
                text_encoder=dataclasses.asdict(text_encoder.config), text_hidden=text_encoder.hidden_size,
                text_tokens=text_encoder.config.max_tokens, case_ids=ids)
    return root
