"""The reader's text: benign sources, a stable held-out split, vocabulary phrases."""

from __future__ import annotations

import random

import pytest

from reader import corpus
from sasa_patcher.probes.datasets import load_advbench, load_harmbench, normalise_text


@pytest.fixture(scope="module")
def sentences() -> tuple[str, ...]:
    return corpus.stdlib_sentences()


def test_stdlib_sentences_are_prose_of_bounded_length(sentences: tuple[str, ...]) -> None:
    assert len(sentences) > 5000
    assert all(3 <= len(s.split()) <= corpus.MAX_WORDS for s in sentences)
    assert all(s[0].isupper() and ">>>" not in s for s in sentences)
    assert list(sentences) == sorted(set(sentences))


def test_split_is_disjoint_stable_and_about_five_percent(sentences: tuple[str, ...]) -> None:
    train, heldout = corpus.split_sentences(sentences)
    assert not set(train) & set(heldout)
    assert 0.03 < len(heldout) / len(sentences) < 0.07
    assert all(corpus.is_heldout(s) for s in heldout)
    assert corpus.is_heldout("  " + heldout[0].replace(" ", "\n")) is True  # layout does not move a sentence


def test_training_text_never_contains_an_evaluation_request(sentences: tuple[str, ...]) -> None:
    harmful = {normalise_text(p.text) for p in load_advbench() + load_harmbench()}
    assert not harmful & {normalise_text(s) for s in sentences}


def test_vocabulary_words_are_whole_words() -> None:
    class Vocab:
        def get_vocab(self) -> dict[str, int]:
            return {"Ġthe": 5, "the": 1, "Ġa": 2, "Ġcat": 9, "Ġ12": 3, "Ġdog": 7, "<|im_end|>": 0}

    assert corpus.vocabulary_words(Vocab()) == ["the", "dog", "cat"]


def test_random_phrase_is_deterministic_given_the_generator() -> None:
    words = [f"word{i}" for i in range(100)]
    first = [corpus.random_phrase(random.Random(3), words) for _ in range(5)]
    again = [corpus.random_phrase(random.Random(3), words) for _ in range(5)]
    assert first == again
    assert all(2 <= len(p.split()) <= 12 for p in first)
