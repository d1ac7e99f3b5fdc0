"""The built-in calibration set: the real prompts of `probes.datasets` balanced by label and form.

Why this module is shaped like this: a linear probe learns whatever separates its two classes. The
public harmful sets are imperatives ("Write a tutorial on how to ..."), chat-style benign data is
questions, and benign data is rarely about drugs, weapons or hacking. Trained on that, a probe learns
"imperative vs question" or "scary topic vs everyday topic", not harm. So the built-in calibration set
is assembled cell by cell: harmful imperatives, harmful questions, benign imperatives and benign
questions in equal numbers, with sensitive-looking benign requests (medicine, drugs, security,
chemistry, violence in history and fiction, XSTest-style over-refusal prompts, per-hazard look-alikes)
on the benign side, and rule-based form twins (see `probes.form_augment`) filling an equal, marked
share of every cell. Hazard categories and sources are interleaved so no big one drowns a small one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence

from sasa_patcher.probes.datasets import (
    BENIGN,
    HARMFUL,
    Prompt,
    clean_text,
    dedupe,
    load_all_real,
    normalise_text,
)
from sasa_patcher.probes.form_augment import FORMS, Form, convert

log = logging.getLogger(__name__)


def _stable_rank(text: str) -> str:
    return hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()


def _interleave(prompts: Iterable[Prompt], key) -> list[Prompt]:
    groups: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(key(prompt), []).append(prompt)
    queues = [group for _, group in sorted(groups.items())]
    ordered: list[Prompt] = []
    for index in range(max((len(q) for q in queues), default=0)):
        ordered.extend(queue[index] for queue in queues if index < len(queue))
    return ordered


def _round_robin(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Interleave hazard categories, and sources within each (each in stable hash order), so that a small
    category or source is not drowned by a big one (AdvBench alone is mostly non-violent crimes)."""
    by_category: dict[str, list[Prompt]] = {}
    for prompt in sorted(prompts, key=lambda p: _stable_rank(p.text)):
        by_category.setdefault(prompt.category or "", []).append(prompt)
    queues = {name: _interleave(group, lambda p: p.source) for name, group in by_category.items()}
    return _interleave([p for name in sorted(queues) for p in queues[name]], lambda p: p.category or "")


def form_twin(prompt: Prompt) -> Prompt | None:
    """The prompt rewritten into the other form by `probes.form_augment`, marked as augmented."""
    target: Form = "question" if prompt.form == "imperative" else "imperative"
    text = convert(prompt.text, target)
    if text is None:
        return None
    return dataclasses.replace(
        prompt, text=clean_text(text), form=target, augmented=True, origin=prompt.origin or prompt.text
    )


def builtin_calibration_set(per_cell: int = 300, augmented_share: float = 1 / 3) -> list[Prompt]:
    """A form- and label-balanced calibration set from the built-in sources.

    Four cells (harmful/benign x imperative/question) of `per_cell` prompts each. In every cell,
    round(per_cell * augmented_share) prompts are form twins of real prompts chosen for the other cell
    of the same label, and the rest are real prompts, interleaved across sources in stable hash order.
    The augmented share is the same in every cell on purpose: if only one cell were augmented, the
    rewrite templates themselves would become a label cue. Deterministic: same inputs, same list.
    The counts (per source, label, form, and how many prompts augmentation produced) are logged and
    available from `summarize()`.
    """
    if per_cell <= 0 or not 0 <= augmented_share < 1:
        raise ValueError("per_cell must be positive and augmented_share in [0, 1)")
    n_aug = round(per_cell * augmented_share)
    n_real = per_cell - n_aug
    real = dedupe(load_all_real())

    chosen: dict[tuple[int, str], list[Prompt]] = {}
    for label in (HARMFUL, BENIGN):
        for form in FORMS:
            pool = _round_robin(p for p in real if p.label == label and p.form == form)
            if len(pool) < n_real:
                raise ValueError(
                    f"only {len(pool)} real {form}s with label {label}, but per_cell={per_cell} with "
                    f"augmented_share={augmented_share:.2f} needs {n_real}: "
                    "lower per_cell or raise augmented_share"
                )
            chosen[(label, form)] = pool[:n_real]

    seen = {normalise_text(p.text) for p in real}
    result: list[Prompt] = []
    for label in (HARMFUL, BENIGN):
        for form in FORMS:
            other = "question" if form == "imperative" else "imperative"
            twins: list[Prompt] = []
            for prompt in _round_robin(chosen[(label, other)]):
                if len(twins) == n_aug:
                    break
                twin = form_twin(prompt)
                if twin is not None and normalise_text(twin.text) not in seen:
                    seen.add(normalise_text(twin.text))
                    twins.append(twin)
            if len(twins) < n_aug:
                raise ValueError(
                    f"the rules produced only {len(twins)} {form} twins with label {label}, {n_aug} needed: "
                    "lower augmented_share"
                )
            result.extend(chosen[(label, form)])
            result.extend(twins)
    log.info("built-in calibration set:\n%s", format_summary(summarize(result)))
    return result


# --- reporting --------------------------------------------------------------------------------------


def summarize(prompts: Sequence[Prompt]) -> dict[str, object]:
    """Counts a reader needs to judge a set: per label x form, per source, and how many were augmented."""
    return {
        "total": len(prompts),
        "augmented": sum(p.augmented for p in prompts),
        "with_image": sum(p.image is not None for p in prompts),
        "by_label_form": dict(sorted(Counter((p.label, p.form) for p in prompts).items())),
        "by_label_form_augmented": dict(sorted(Counter((p.label, p.form, p.augmented) for p in prompts).items())),
        "by_source_label_form": dict(sorted(Counter((p.source, p.label, p.form) for p in prompts).items())),
    }


def _cell_name(cell: tuple[object, ...]) -> str:
    parts = []
    for part in cell:
        if isinstance(part, bool):
            parts.append("augmented" if part else "real")
        elif isinstance(part, int):
            parts.append("harmful" if part == HARMFUL else "benign")
        else:
            parts.append(str(part))
    return " ".join(parts)


def format_summary(summary: dict[str, object]) -> str:
    """The summary as aligned text lines, for logs and reports."""
    lines = [f"total {summary['total']}, augmented {summary['augmented']}, with image {summary['with_image']}"]
    for key in ("by_label_form_augmented", "by_source_label_form"):
        counts = summary[key]
        assert isinstance(counts, dict)
        lines.extend(f"  {_cell_name(cell):<40} {count}" for cell, count in counts.items())
    return "\n".join(lines)


# --- the default set: the balanced core plus real traffic and image prompts ---------------------------


def _first_by_source(prompts: Iterable[Prompt], count: int) -> list[Prompt]:
    """Up to `count` prompts in stable hash order (a fixed, content-keyed sample)."""
    return sorted(prompts, key=lambda p: _stable_rank(p.text))[:count]


def default_calibration_set(per_cell: int = 200, chatterbot: int = 200, chitchat: int = 150,
                            with_image: int = 60, typographic: int = 40) -> list[Prompt]:
    """What `--calibration builtin` calibrates on: the form- and label-balanced core
    (`builtin_calibration_set`), plus real benign user requests (`probes.benign_data`: ChatterBot and
    Chit-Chat samples of the given sizes, all of Do-Not-Answer's advice items), everyday questions about
    real images (`probes.image_prompts`), and harmful requests of the core carried with an image: `with_image`
    with an unrelated photo or chart (intent in the text) and `typographic` as FigStep-style images, with as
    many benign requests of the core rendered the same way.

    Why this shape: the core keeps look-alikes and over-refusal probes balanced by form; the real traffic
    is what a deployment sees and must not refuse; the image prompts put the same images on both sides so
    that only intent separates them; the benign typographic renderings share the harmful ones' carrier text,
    so that the carrier text is no cue for harm (only the rendered request is). The image prompts made from
    core requests keep their text version's split side (`origin`), and a prompt carries an image in at most
    one way. Deterministic.
    """
    from sasa_patcher.probes import benign_data, image_prompts
    from sasa_patcher.probes import typographic as typographic_module

    core = builtin_calibration_set(per_cell)
    seen = {normalise_text(p.text) for p in core}
    traffic = []
    for prompts, count in ((benign_data.load_chatterbot(), chatterbot), (benign_data.load_chitchat(), chitchat),
                           (benign_data.load_donotanswer_advice(), None)):
        fresh = [p for p in prompts if normalise_text(p.text) not in seen]
        traffic.extend(fresh if count is None else _first_by_source(fresh, count))
    harmful = _round_robin(p for p in core if p.label == HARMFUL and not p.augmented)
    benign = _round_robin(p for p in core if p.label == BENIGN and not p.augmented)
    if len(harmful) < with_image + typographic or len(benign) < typographic:
        raise ValueError(f"only {len(harmful)} real harmful and {len(benign)} real benign prompts for "
                         f"{with_image + typographic} harmful and {typographic} benign image prompts")
    result = [
        *core,
        *traffic,
        *image_prompts.benign_image_prompts(),
        *image_prompts.with_unrelated_image(harmful[:with_image]),
        *typographic_module.typographic_variants(harmful[with_image:with_image + typographic]),
        *typographic_module.typographic_variants(benign[:typographic]),
    ]
    log.info("default calibration set:\n%s", format_summary(summarize(result)))
    return result
