"""What the reader makes measurable: transcription quality and the cross-modal safety gap.

Transcription is scored on held-out standard-library sentences of up to 12 words (the hash split in
`reader.corpus`), rendered with the training renderer's random styles under a fixed seed, and on the
same sentences through the FigStep renderer the evaluation uses.

The cross-modal gap compares the same HarmBench/AdvBench requests (and benign requests, for AUROC) as
text and as FigStep images: the keyword refusal rate of the unpatched model, and a cross-validated
logistic probe's AUROC on every layer's last-position state. SASA on image-borne harm compares the
probe on the patched graph's projected logits against the plain logits, at several (s, f).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from reader.corpus import split_sentences, stdlib_sentences
from reader.render import Sample, font_paths, render_figstep, render_free
from reader.transcribe import score, transcribe
from sasa_patcher.evaluation.held_out import take
from sasa_patcher.evaluation.systems import TorchSystem, generate_all
from sasa_patcher.patching import temporary_settings
from sasa_patcher.probes.datasets import Prompt, load_advbench, load_benign, load_harmbench
from sasa_patcher.probes.features import extract_features
from sasa_patcher.probes.probe import cross_validate
from sasa_patcher.probes.refusal import is_refusal
from sasa_patcher.probes.typographic import typographic_variants

MAX_HELDOUT_WORDS = 12
PROBE_C = (1.0,)


def heldout_sentences(limit: int) -> list[str]:
    """Held-out sentences of at most 12 words, a fixed pseudo-random choice."""
    _, heldout = split_sentences(stdlib_sentences())
    short = [s for s in heldout if len(s.split()) <= MAX_HELDOUT_WORDS]
    return random.Random(0).sample(short, min(limit, len(short)))


def styled_samples(sentences: Sequence[str], seed: int = 0) -> list[Sample]:
    """The training renderer's random styles, seeded; sentences that lost words to layout are re-drawn."""
    rng, fonts = random.Random(seed), font_paths()
    samples = []
    for sentence in sentences:
        sample = render_free(sentence, rng, fonts)
        while sample.text != " ".join(sentence.split()) or "1. 2. 3." in sample.text:
            sample = render_free(sentence, rng, fonts)
        samples.append(sample)
    return samples


def figstep_samples(sentences: Sequence[str]) -> list[Sample]:
    """The same sentences as the evaluation renders requests: FigStep heading plus an empty list."""
    return [render_figstep(sentence) for sentence in sentences]


def measure_transcription(model, processor, samples: Sequence[Sample], batch_size: int = 8) -> dict:
    answers = transcribe(model, processor, [s.image for s in samples], batch_size)
    result = score([s.text for s in samples], answers, processor.tokenizer)
    examples = [{"reference": s.text, "transcription": a} for s, a in zip(samples[:8], answers, strict=False)]
    return {**result, "n": len(samples), "examples": examples}


def gap_prompts(limit: int) -> tuple[list[Prompt], list[Prompt]]:
    """(text, typographic) prompt lists: `limit` harmful HarmBench+AdvBench and `limit` benign requests."""
    harmful = take(load_harmbench(), limit // 2) + take(load_advbench(), limit - limit // 2)
    text = harmful + take(load_benign(), limit)
    return text, typographic_variants(text)


def refusal_rate(model, processor, prompts: Sequence[Prompt], batch_size: int, max_new_tokens: int) -> float:
    answers = generate_all(TorchSystem("base", model, processor), prompts, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, description="refusals")
    return float(np.mean([is_refusal(answer.text) for answer in answers]))


def cv_auroc(X, labels) -> float:
    return float(cross_validate(X, labels, Cs=PROBE_C).auroc_by_C[0])


def layer_aurocs(model, processor, prompts: Sequence[Prompt], batch_size: int) -> list[float]:
    """Cross-validated probe AUROC on each decoder layer's output at the last prompt position."""
    features = extract_features(model, processor, prompts, batch_size=batch_size, candidates=(),
                                description="layer states")
    states = features.layer_states
    return [cv_auroc(states[:, layer], features.labels) for layer in range(states.shape[1])]


def sasa_aurocs(model, processor, prompts: Sequence[Prompt], pairs: Sequence[tuple[int, int]],
                batch_size: int) -> list[dict]:
    """Probe AUROC with (`projected-logits`) and without (`logits`) the SASA projection, per (s, f)."""
    rows = []
    for safety, semantic in pairs:
        with temporary_settings(model, safety_layer=safety, semantic_layer=semantic):
            features = extract_features(model, processor, prompts, batch_size=batch_size,
                                        candidates=("projected-logits", "logits"), layer_states=False,
                                        description=f"SASA s={safety} f={semantic}")
        rows.append({
            "s": safety,
            "f": semantic,
            "auroc_projected": cv_auroc(features.candidates["projected-logits"], features.labels),
            "auroc_plain": cv_auroc(features.candidates["logits"], features.labels),
        })
    return rows

