"""The held-out prompt sets an evaluation runs on: which prompts, grouped how, and how many.

- Data is held out from calibration by construction. The built-in calibration set is split with the
  same stable hash calibration used (`probes.splits`, at the artifact's recorded held-out fraction),
  and only the held-out side is evaluated. The sensitive-looking benign sets (over-refusal) lose every
  prompt whose group sits on the calibration side. A user's own manifest is taken as held out as it is.
- Prompt sets: harmful and benign text prompts; the same requests as FigStep-style typographic image
  prompts (`probes.typographic`), so text and image attacks are paired; the user's own image prompts
  when a manifest has any; and the over-refusal set. `take` picks a deterministic subset per set.
  Every prompt keeps its hazard `category` (`probes.taxonomy`), so the figures can also be grouped
  per hazard and per benign family (`evaluation.metrics.category_metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sasa_patcher.probes.datasets import BENIGN, HARMFUL, Prompt, dedupe, load_over_refusal, load_rho_over_refusal
from sasa_patcher.probes.splits import group_key, unit_hash
from sasa_patcher.probes.typographic import DEFAULT_SIZE, to_typographic

DEFAULT_LIMIT = 32
SUBSET_SALT = "evaluation-subset"
MODALITIES = ("text", "typographic", "image")
OVER_REFUSAL = "over_refusal"


@dataclass(frozen=True)
class PromptSet:
    """Prompts judged together: one label, one modality (text, typographic rendering, user image)."""

    name: str
    label: int
    modality: str
    prompts: list[Prompt]


def over_refusal_prompts(calibration: Sequence[Prompt]) -> list[Prompt]:
    """The sensitive-looking benign sets, minus any prompt whose group calibration saw.

    Both sets also feed the built-in calibration set, so without this filter some over-refusal
    prompts would be ones the probe was fitted on.
    """
    seen = {group_key(prompt) for prompt in calibration}
    candidates = dedupe([*load_over_refusal(), *load_rho_over_refusal()])
    return [prompt for prompt in candidates if group_key(prompt) not in seen]


def take(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """At most `limit` prompts, chosen by a salted hash of their group key, kept in input order.

    Deterministic with no seed to record, and nested: a larger limit keeps every prompt of a smaller
    one, so figures at two limits are comparable.
    """
    if limit is None or len(prompts) <= limit:
        return list(prompts)
    ranked = sorted(range(len(prompts)), key=lambda i: (unit_hash(group_key(prompts[i]), SUBSET_SALT), i))
    return [prompts[i] for i in sorted(ranked[:limit])]


def build_prompt_sets(
    prompts: Sequence[Prompt], over_refusal: Sequence[Prompt], *, limit: int | None,
    image_size: tuple[int, int] = DEFAULT_SIZE,
) -> list[PromptSet]:
    """The evaluation's prompt sets from held-out `prompts` (harmful and benign) and the over-refusal set.

    Typographic sets render the requests of the chosen text prompts (same subset, so text and image
    results are paired) at `image_size` (width, height). Empty sets are left out.
    """
    sets = []
    for label, kind in ((HARMFUL, "harmful"), (BENIGN, "benign")):
        text = take([p for p in prompts if p.label == label and p.image is None], limit)
        images = take([p for p in prompts if p.label == label and p.image is not None], limit)
        sets += [
            PromptSet(f"{kind}_text", label, "text", text),
            PromptSet(f"{kind}_typographic", label, "typographic", [to_typographic(p, image_size) for p in text]),
            PromptSet(f"{kind}_image", label, "image", images),
        ]
    sets.append(PromptSet(OVER_REFUSAL, BENIGN, "text", take(list(over_refusal), limit)))
    return [prompt_set for prompt_set in sets if prompt_set.prompts]
