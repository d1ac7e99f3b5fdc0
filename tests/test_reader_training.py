"""Reader training: the CTC objective's meaning, the schedule, checkpoints, and an exactly resumable run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from reader import train_cli
from reader.render import LIST_MARKERS, Sample
from reader.training import (
    CtcObjective,
    ReaderSettings,
    TextSource,
    curriculum_words,
    learning_rate,
    load_checkpoint,
    save_checkpoint,
)


class EmbeddingOnly(torch.nn.Module):
    """What CtcObjective reads from a model: the input embedding rows."""

    def __init__(self, vocabulary: int = 50, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(vocabulary, width)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embedding


def test_ctc_prefers_the_text_embeddings_in_reading_order() -> None:
    model = EmbeddingOnly()
    objective = CtcObjective(model, vocabulary_size=50)
    rows = model.embedding.weight.detach()
    target = [7, 3, 3, 12]
    # blank, 7, blank, 3, blank, 3, 12, blank: a valid CTC path for the target
    aligned = torch.stack([objective.blank.detach(), rows[7], objective.blank.detach(), rows[3],
                           objective.blank.detach(), rows[3], rows[12], objective.blank.detach()])
    aligned = aligned / aligned.norm(dim=-1, keepdim=True) * objective.target_norm
    shuffled = aligned[[6, 0, 3, 2, 1, 4, 5, 7]]
    good = objective([aligned], [target], sample_seed=0)
    bad = objective([shuffled], [target], sample_seed=0)
    noise = objective([torch.randn_like(aligned)], [target], sample_seed=0)
    assert good < 0.5 < bad and good < noise


def test_ctc_gradient_reaches_the_image_tokens() -> None:
    objective = CtcObjective(EmbeddingOnly(), vocabulary_size=50)
    features = torch.randn(8, 16, requires_grad=True)
    objective([features], [[1, 2]], sample_seed=1).backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_greedy_reading_decodes_a_ctc_path() -> None:
    model = EmbeddingOnly()
    objective = CtcObjective(model, vocabulary_size=50)
    rows = model.embedding.weight.detach()
    blank = objective.centre + objective.blank.detach()  # the blank's direction in the centred space
    path = torch.stack([blank, rows[7], rows[7], blank, rows[3], blank, rows[3], rows[12], blank])
    assert objective.read([path, rows[[5, 5, 9]]]) == [[7, 3, 3, 12], [5, 9]]


def test_curriculum_grows_texts_from_two_words_to_whole_sentences() -> None:
    settings = ReaderSettings(ctc_steps=1000, curriculum_steps=500)
    caps = [curriculum_words(settings, "ctc", step) for step in range(500)]
    assert caps[0] == 2 and caps[-1] == 11 and caps == sorted(caps)
    assert curriculum_words(settings, "ctc", 500) is None
    assert curriculum_words(settings, "lm", 0) is None
    assert curriculum_words(ReaderSettings(), "ctc", 0) is None


def test_text_source_respects_the_word_cap() -> None:
    class Vocab:
        def get_vocab(self) -> dict[str, int]:
            return {f"Ġword{chr(97 + i)}": i for i in range(26)}

    source = TextSource(Vocab())
    def words(sample: Sample) -> int:
        return len(sample.text.removesuffix(LIST_MARKERS).split())

    capped = source.samples(seed=0, stage="ctc", step=3, count=24, max_words=3)
    assert all(1 <= words(sample) <= 3 for sample in capped)
    free = source.samples(seed=0, stage="ctc", step=3, count=24)
    assert max(words(sample) for sample in free) > 3


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    settings = ReaderSettings(ctc_steps=1000, ctc_lr=1e-3, warmup_steps=100)
    assert learning_rate(settings, "ctc", 0) == pytest.approx(1e-5)
    assert learning_rate(settings, "ctc", 99) == pytest.approx(1e-3)
    assert learning_rate(settings, "ctc", 999) == pytest.approx(1e-4, rel=1e-3)


def test_checkpoint_round_trip_and_settings_mismatch(tmp_path) -> None:
    settings = ReaderSettings()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"settings": dataclasses.asdict(settings), "tower": {"w": torch.ones(2)}})
    assert torch.equal(load_checkpoint(path, settings)["tower"]["w"], torch.ones(2))
    with pytest.raises(ValueError, match="other settings"):
        load_checkpoint(path, dataclasses.replace(settings, seed=1))
    assert [leftover.name for leftover in tmp_path.iterdir()] == ["checkpoint.pt"]  # no partial file left


def test_bad_settings_exit_2(capsys) -> None:
    assert train_cli.main(["--ctc-steps", "-1"]) == 2
    assert "--ctc-steps, --lm-steps and --curriculum-steps must be >= 0" in capsys.readouterr().err


@pytest.mark.integration
def test_interrupted_run_resumes_to_the_same_weights(tmp_path) -> None:
    """Seeded and resumable: stop after 2 steps and resume, or run straight through: same tower."""
    script = train_cli
    common = ["--ctc-steps", "2", "--lm-steps", "1", "--ctc-batch", "2", "--lm-batch", "1", "--warmup-steps", "1",
              "--threads", "2", "--heldout-probe", "2"]
    assert script.main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert script.main([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "2"]) == 0
    assert not (tmp_path / "resumed" / "reader.safetensors").exists()
    assert script.main([*common, "--out", str(tmp_path / "resumed")]) == 0
    straight = load_file(tmp_path / "straight" / "reader.safetensors")
    resumed = load_file(tmp_path / "resumed" / "reader.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
