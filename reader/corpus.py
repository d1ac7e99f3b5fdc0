"""Benign text to render for training the reader, and the held-out sentences it is measured on.

Why these sources: the reader must learn to read general English without ever seeing the harmful
requests it is later measured on (a reader trained on them would inflate the cross-modal figures).
Two sources are on every machine with no download: the docstrings of Python's own standard library
(real English sentences, read with `ast`, never imported) and the language model's tokenizer, whose
whole-word tokens give the general vocabulary, rarer words later in merge order. A sentence belongs to
the held-out side by a hash of its text, so "never seen in training" holds by construction.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import random
import re
import sysconfig
from pathlib import Path

HELDOUT_FRACTION = 0.05
MAX_WORDS = 20
MAX_PHRASE_WORDS = 12
# Words are drawn log-uniformly over the first VOCABULARY_TOP merge ranks: as much mass per decade of
# rarity, so common words dominate yet thousands of rarer ones are seen.
VOCABULARY_TOP = 20000
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'\"()?!-]+$")
_WORD = re.compile(r"^[A-Za-z]+$")


def is_heldout(sentence: str) -> bool:
    """Stable membership of the held-out side, independent of corpus order and Python version."""
    digest = hashlib.sha256(normalise(sentence).lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_FRACTION


def normalise(text: str) -> str:
    """One space between words: line breaks in an image are layout, not content."""
    return " ".join(text.split())


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef))]
    return [doc for node in nodes if (doc := ast.get_docstring(node))]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 3 <= len(words) <= MAX_WORDS or not _ALLOWED.match(sentence):
        return False
    alphabetic = sum(1 for word in words if _WORD.match(word.strip(",.;:'\"()?!-")))
    return alphabetic >= 0.8 * len(words) and sentence[0].isupper()


@functools.cache
def stdlib_sentences() -> tuple[str, ...]:
    """Prose sentences of 3..20 words from the standard library's docstrings, sorted and unique."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        for doc in _docstrings(path):
            for paragraph in re.split(r"\n\s*\n", doc):
                for sentence in _SENTENCE_END.split(normalise(paragraph)):
                    if _is_prose(sentence):
                        found.add(sentence)
    return tuple(sorted(found))


def split_sentences(sentences: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(training, held-out) by the stable hash."""
    train = [s for s in sentences if not is_heldout(s)]
    heldout = [s for s in sentences if is_heldout(s)]
    return train, heldout


def vocabulary_words(tokenizer) -> list[str]:
    """Whole-word tokens of the tokenizer (a leading space and 2+ letters), in merge order."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token.startswith("Ġ") and _WORD.match(token[1:]) and len(token) > 2:
            words.append(token[1:])
    return words


def random_phrase(rng: random.Random, words: list[str], max_words: int = MAX_PHRASE_WORDS) -> str:
    """A run of vocabulary words, Zipf-weighted by merge rank, with sentence-like casing and punctuation."""
    count = rng.randint(2, max_words)
    top = min(len(words), VOCABULARY_TOP)
    picked = [words[int(math.exp(rng.uniform(0, math.log(top))))- 1] for _ in range(count)]
    if rng.random() < 0.5:
        picked[0] = picked[0].capitalize()
    if rng.random() < 0.15:
        picked = [w.upper() if rng.random() < 0.3 else w for w in picked]
    text = " ".join(picked)
    return text + rng.choice(["", "", ".", ".", "?", "!", ":"])
