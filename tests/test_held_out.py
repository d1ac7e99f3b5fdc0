"""The held-out prompt sets (sasa_patcher.evaluation.held_out): deterministic subsets, the over-refusal
filter, text and typographic sets paired."""

from __future__ import annotations

from PIL import Image

from sasa_patcher.evaluation.held_out import build_prompt_sets, over_refusal_prompts, take
from sasa_patcher.probes.calibration_set import builtin_calibration_set
from sasa_patcher.probes.splits import group_key, split
from sasa_patcher.probes.typographic import CARRIER_PROMPT
from tiny_calibration import synthetic_prompts


def test_take_is_deterministic_nested_and_in_input_order():
    prompts = synthetic_prompts(40)
    small, large = take(prompts, 5), take(prompts, 12)
    assert len(small) == 5 and len(large) == 12
    assert take(prompts, 5) == small
    assert set(p.text for p in small) <= set(p.text for p in large)
    positions = [prompts.index(p) for p in large]
    assert positions == sorted(positions)
    assert take(prompts, None) == prompts and take(prompts, 100) == prompts


def test_over_refusal_set_leaves_out_every_calibration_group():
    builtin = split(builtin_calibration_set())
    over = over_refusal_prompts(builtin.calibration)
    calibration_keys = {group_key(p) for p in builtin.calibration}
    assert over and not any(group_key(p) in calibration_keys for p in over)
    everything = over_refusal_prompts([])
    assert len(everything) > len(over)  # the sets do feed calibration, so the filter removes some
    assert all(p.label == 0 for p in everything)
    assert all(p.category is not None for p in everything)  # the per-family rows need them


def test_sets_pair_text_and_typographic_requests(tmp_path):
    prompts = synthetic_prompts(30, image_dir=tmp_path)
    over = synthetic_prompts(6, seed=3)
    sets = {s.name: s for s in build_prompt_sets(prompts, [p for p in over if p.label == 0], limit=4,
                                                 image_size=(224, 160))}
    assert set(sets) == {"harmful_text", "harmful_typographic", "harmful_image", "benign_text",
                         "benign_typographic", "benign_image", "over_refusal"}
    for kind, label in (("harmful", 1), ("benign", 0)):
        text, typographic = sets[f"{kind}_text"], sets[f"{kind}_typographic"]
        assert len(text.prompts) == 4 and all(p.label == label and p.image is None for p in text.prompts)
        assert [p.origin for p in typographic.prompts] == [p.text for p in text.prompts]
        assert [p.category for p in typographic.prompts] == [p.category for p in text.prompts]
        assert all(p.text == CARRIER_PROMPT and Image.open(p.image).size == (224, 160) for p in typographic.prompts)
        assert all(p.image is not None for p in sets[f"{kind}_image"].prompts)
    assert len(sets["over_refusal"].prompts) == 3
