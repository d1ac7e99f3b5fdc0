"""Real benign traffic: the pinned files parse into the expected registers, labelled benign, with categories."""

from collections import Counter

from sasa_patcher.probes.benign_data import (
    chatterbot_openings,
    chitchat_turns,
    load_chatterbot,
    load_chitchat,
    load_donotanswer_advice,
)
from sasa_patcher.probes.datasets import BENIGN, normalise_text


def test_chatterbot_openings_read_the_first_turn_only():
    text = "categories:\n- food\nconversations:\n- - what is good to eat?\n  - pizza\n- - 'Hi there'\n  - hello\n" \
           "- - |\n    a block\n"
    assert chatterbot_openings(text) == ["what is good to eat?", "Hi there"]


def test_chitchat_turns_join_one_senders_messages():
    conversations = {"a": {"messages": [[{"text": "Hello"}, {"text": "how are you?"}], [{"text": " fine "}]]}}
    assert chitchat_turns(conversations) == ["Hello how are you?", "fine"]


def test_real_benign_sources_cover_several_registers():
    chatterbot, chitchat, advice = load_chatterbot(), load_chitchat(), load_donotanswer_advice()
    assert len(chatterbot) > 500 and len(chitchat) == 400 and 80 <= len(advice) <= 120
    every = [*chatterbot, *chitchat, *advice]
    assert all(p.label == BENIGN and p.category is not None for p in every)
    texts = {normalise_text(p.text) for p in chatterbot}
    assert len(texts) == len(chatterbot)  # repeats across topic files kept once
    assert "who wrote the hobbit" in texts  # lowercase search-style query
    assert any("python" in t for t in texts)  # coding
    assert all(8 <= len(p.text.split()) <= 60 for p in chitchat)
    assert Counter(p.category for p in advice)["specialized_advice"] >= 60
    assert not any("suicid" in p.text.lower() for p in advice)  # self-harm items are not advice
