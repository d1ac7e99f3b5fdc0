"""Reader measurement: held-out material only, faithful renderings, the script's inputs and output."""

from __future__ import annotations

import json

import pytest

from reader import corpus, measure, measure_cli


def test_heldout_sentences_are_short_held_out_and_fixed() -> None:
    sentences = measure.heldout_sentences(30)
    assert len(sentences) == 30 and sentences == measure.heldout_sentences(30)
    assert all(corpus.is_heldout(s) and len(s.split()) <= measure.MAX_HELDOUT_WORDS for s in sentences)
    training, _ = corpus.split_sentences(corpus.stdlib_sentences())
    assert not set(sentences) & set(training)


def test_styled_samples_show_the_whole_sentence_without_a_list() -> None:
    sentences = measure.heldout_sentences(6)
    samples = measure.styled_samples(sentences)
    assert [s.text for s in samples] == [" ".join(s.split()) for s in sentences]


@pytest.mark.parametrize("pairs", ["", "13,11", "1,2,3", "a,b"])
def test_bad_pairs_exit_2(pairs: str, capsys) -> None:
    assert measure_cli.main(["--pairs", pairs]) == 2
    assert "--pairs" in capsys.readouterr().err


def test_missing_weights_exit_2(tmp_path, capsys) -> None:
    assert measure_cli.main(["--weights", str(tmp_path / "none.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_script_writes_every_figure(tmp_path) -> None:
    out = tmp_path / "reader.json"
    argv = ["--out", str(out), "--transcription-limit", "2", "--gap-limit", "4", "--pairs", "11,13",
            "--max-new-tokens", "8"]
    assert measure_cli.main(argv) == 0
    result = json.loads(out.read_text())
    assert 0 <= result["transcription"]["token_accuracy"] <= 1 and result["transcription"]["n"] == 2
    gap = result["cross_modal_gap"]
    assert len(gap["layer_auroc_text"]) == len(gap["layer_auroc_image"]) == 30  # SmolLM2-135M layers
    assert [(row["s"], row["f"]) for row in result["sasa_image"]] == [(11, 13)]
    assert out.with_suffix(".png").stat().st_size > 0
