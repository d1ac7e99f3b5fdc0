"""Transcription scoring: token edit distance and exact match over normalised text."""

from __future__ import annotations

import pytest

from reader.transcribe import score, token_accuracy


class WordTokenizer:
    """One token per word: makes the expected distances obvious."""

    def __call__(self, text: str, add_special_tokens: bool = False):
        class Out:
            input_ids = [hash(word) for word in text.split()]

        return Out()


def test_identical_text_scores_one_whatever_the_line_breaks() -> None:
    assert token_accuracy("the cat sat", "the  cat\nsat", WordTokenizer()) == 1.0


def test_one_dropped_word_costs_one_token_not_the_rest() -> None:
    assert token_accuracy("a b c d", "a c d", WordTokenizer()) == pytest.approx(0.75)
    assert token_accuracy("a b", "x y z w v", WordTokenizer()) == 0.0  # floored


def test_score_averages_and_counts_exact_matches() -> None:
    result = score(["a b", "c d"], ["a b", "c x"], WordTokenizer())
    assert result == {"token_accuracy": pytest.approx(0.75), "exact_match": 0.5}
