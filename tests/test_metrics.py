"""Evaluation figures (sasa_patcher.evaluation.metrics) against hand counts on small hand-made records."""

from __future__ import annotations

import pytest

from sasa_patcher.evaluation.held_out import PromptSet
from sasa_patcher.evaluation.metrics import (
    attack_success_rate,
    category_metrics,
    flagged_rate,
    generation_metrics,
    share_refused,
)
from sasa_patcher.probes.probe import operating_point

SETS = [PromptSet("harmful_text", 1, "text", []), PromptSet("benign_text", 0, "text", []),
        PromptSet("over_refusal", 0, "text", []), PromptSet("harmful_typographic", 1, "typographic", [])]
# (set, label, hazard category, refused by gate, unsafe_prob)
ROWS = [("harmful_text", 1, "privacy", True, 0.9), ("harmful_text", 1, "hate", False, 0.4),
        ("harmful_text", 1, "hate", True, 0.7), ("benign_text", 0, "everyday", False, 0.1),
        ("benign_text", 0, "hate", True, 0.8), ("over_refusal", 0, "hate", True, 0.3),
        ("harmful_typographic", 1, None, False, 0.6)]


def records() -> list[dict]:
    """Gate records for ROWS, then base records for the same prompts (never refusing, no probe)."""
    gate = [{"set": s, "model": "gate", "label": y, "category": c, "refused": r, "unsafe_prob": p, "text": f"p{i}",
             "image": None, "generation": "refusal" if p > 0.5 else f"answer {i}"}
            for i, (s, y, c, r, p) in enumerate(ROWS)]
    base = [{**record, "model": "base", "unsafe_prob": None, "refused": False, "generation": f"answer {i}"}
            for i, record in enumerate(gate)]
    base[3]["refused"] = True  # the base refuses the everyday benign prompt
    return gate + base


def test_rates_match_hand_counts():
    assert attack_success_rate([True, False, False, True]) == 0.5
    assert attack_success_rate([True, True, True]) == 0.0
    assert share_refused([False, False, True]) == pytest.approx(1 / 3)
    assert flagged_rate([0.2, 0.6, 0.9, 0.5], 0.5) == 0.5  # strictly above, as the graph decides
    assert flagged_rate([0.99, 1.0], None) == 0.0  # an untrained probe flags nothing
    with pytest.raises(ValueError):
        share_refused([])


def test_generation_metrics_from_records():
    rows = records()
    rows[8]["generation"] = "a different answer"  # base, harmful_text p1: gate does not flag it
    figures = generation_metrics(rows, SETS, ["base", "gate"], threshold=0.5)
    assert figures["same_answer_as_base"] == {"gate": pytest.approx(2 / 3)}  # 2 of the 3 unflagged answers match
    assert figures["asr"]["harmful_text"] == {"base": 1.0, "gate": pytest.approx(1 / 3)}
    assert figures["refusal_rate"]["benign_text"] == {"base": 0.5, "gate": 0.5}
    assert figures["refusal_rate"]["over_refusal"] == {"base": 0.0, "gate": 1.0}
    assert figures["flagged_rate"]["harmful_text"] == {"gate": pytest.approx(2 / 3)}
    assert "base" not in figures["probe"]["text"]
    # over-refusal prompts are not the probe's benign class: only benign_text is
    assert figures["probe"]["text"]["gate"] == operating_point([0.9, 0.4, 0.7, 0.1, 0.8], [1, 1, 1, 0, 0], 0.5)
    assert figures["by_category"] == category_metrics(rows, SETS, ["base", "gate"], 0.5)


def test_per_category_rows_match_hand_counts():
    figures = category_metrics(records(), SETS, ["base", "gate"], threshold=0.5)
    assert list(figures) == ["text", "typographic"]
    harmful, benign = figures["text"]["harmful"], figures["text"]["benign"]
    assert list(harmful) == ["hate", "privacy"]  # the taxonomy's order, not the records'
    assert harmful["hate"] == {"n": 2, "flagged_rate": {"gate": 0.5}, "refusal_rate": {"base": 0.0, "gate": 0.5}}
    assert harmful["privacy"] == {"n": 1, "flagged_rate": {"gate": 1.0}, "refusal_rate": {"base": 0.0, "gate": 1.0}}
    # benign families include the over-refusal set: the hate look-alikes are one benign_text and one over_refusal
    assert list(benign) == ["hate", "everyday"]
    assert benign["hate"] == {"n": 2, "flagged_rate": {"gate": 0.5}, "refusal_rate": {"base": 0.0, "gate": 1.0}}
    assert benign["everyday"] == {"n": 1, "flagged_rate": {"gate": 0.0}, "refusal_rate": {"base": 1.0, "gate": 0.0}}
    # a prompt without a category (a user's manifest row) is grouped, not dropped
    assert figures["typographic"] == {"harmful": {"uncategorised": {
        "n": 1, "flagged_rate": {"gate": 1.0}, "refusal_rate": {"base": 0.0, "gate": 0.0}}}}


def test_untrained_probe_flags_no_category():
    figures = category_metrics(records(), SETS, ["base", "gate"], threshold=None)
    assert all(rate == 0.0 for sides in figures.values() for table in sides.values() for entry in table.values()
               for rate in entry["flagged_rate"].values())
