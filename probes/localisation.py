"""Where SASA's three capabilities live, layer by layer, and the automatic choice of (s, f).

The SASA paper (arXiv 2507.21637) describes a VLM's layers in three stages: *safety perception*
(harmful and benign inputs become linearly separable) emerges early, *semantic understanding* (the
model grasps what an image says) later, and *alignment for expression* (the output distribution
turns to refusal) last. SASA projects the semantic layer's representation onto the early safety
layer. Measured here, on calibration data only, at the last prompt position:

- safety perception, per layer l: cross-validated AUROC of a logistic regression on the original
  stream's output of layer l (stratified, group-aware folds; standardised states; fixed L2 penalty
  C = `SAFETY_C`, so the curve's shape, not per-layer tuning, shows where separability appears);
- semantic understanding, per layer l: cosine similarity between a typographic (FigStep-style)
  image prompt and its text-only twin. Reported raw, and as a *matching gap*: on states centred by
  their mean over all pair prompts at that layer, mean cosine of matched pairs minus mean cosine of
  mismatched pairs (image i vs text j != i). Raw cosine at the last position is dominated by what
  every prompt shares (the same generation-prompt token, anisotropy), so the gap is the part that
  says "this image means this text"; its z-score (mean / standard error over pairs) says whether the
  signal is there at all;
- alignment for expression, per layer l: logit-lens probability mass (final norm + lm_head on the
  layer's output) on the first tokens of refusal openings ("I'm sorry", "I cannot", "I can't",
  "Sorry", ...), averaged over harmful prompts; the benign average is reported beside it because a
  first token such as "I" also opens compliant answers.

The rule for (s, f), with s < f < L (`choose_layers`):
1. s = the earliest layer l <= L-2 whose safety separability above chance, AUROC_l - 0.5, reaches
   `SAFETY_FRACTION` (90%) of its maximum over layers: where safety perception has emerged (the
   paper's early layer), not where it peaks (often later, already mixed with semantics).
2. e (expression onset) = the earliest layer where the harmful-minus-benign refusal mass reaches half
   its maximum; f is searched in (s, e) when that leaves at least one layer, else in (s, L-1]: the
   semantic layer should precede the layers that already turn the stream into a refusal.
3. f = in that range, the earliest layer whose semantic matching gap reaches `SEMANTIC_PLATEAU`
   (95%) of the range's maximum gap: where semantic understanding has arrived (peak or start of its
   plateau), keeping f - s as small as the evidence allows (measured on SmolLM2: the projected probe
   degrades as f - s grows).
4. Fallback when there are no image pairs or the matching gap is not significant (max z-score in
   the range below `SEMANTIC_MIN_Z` = 3, e.g. a vision tower that cannot read text): f = s + 2
   (clipped to L-1), the gap the text-only measurement on SmolLM2 found safest. The report says
   which branch was taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sasa_patcher.patching import temporary_settings
from sasa_patcher.probes.features import ForwardClock, extract_features
from sasa_patcher.probes.probe import cross_validate
from sasa_patcher.probes.refusal import REFUSAL_OPENINGS

SAFETY_C = 1e-2
SAFETY_FRACTION = 0.9
SEMANTIC_PLATEAU = 0.95
SEMANTIC_MIN_Z = 3.0
FALLBACK_GAP = 2
DEFAULT_MAX_PAIRS = 64
DEFAULT_MAX_EXPRESSION_PROMPTS = 128


# ----- the three curves -------------------------------------------------------------------------------
def safety_curve(
    layer_states: torch.Tensor, labels, groups: Sequence | None = None, *, C: float = SAFETY_C,
    folds: int = 5, seed: int = 0,
) -> list[float]:
    """Cross-validated AUROC of a logistic regression on each layer's states ([N, L, D] -> L floats)."""
    return [
        cross_validate(layer_states[:, layer], labels, groups, Cs=[C], folds=folds, seed=seed).auroc_by_C[0]
        for layer in range(layer_states.shape[1])
    ]


def semantic_curve(image_states: torch.Tensor, text_states: torch.Tensor) -> dict:
    """Raw and centred cosine of paired image / text prompts per layer ([P, L, D] each, P >= 2).

    Returns lists over layers: `raw_cosine` (matched pairs, uncentred), `matched` and `mismatched`
    (centred), `gap` = matched - mismatched, and `gap_z` (gap / standard error over pairs).
    """
    a, b = image_states.double(), text_states.double()
    pairs = a.shape[0]
    if pairs < 2 or b.shape != a.shape:
        raise ValueError(f"need at least 2 image/text pairs of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    raw = torch.nn.functional.cosine_similarity(a, b, dim=-1).mean(0)
    mean = torch.cat([a, b]).mean(0, keepdim=True)
    a_unit = torch.nn.functional.normalize(a - mean, dim=-1)
    b_unit = torch.nn.functional.normalize(b - mean, dim=-1)
    cosines = torch.einsum("ild,jld->lij", a_unit, b_unit)  # [L, P, P]
    matched = torch.diagonal(cosines, dim1=1, dim2=2)  # [L, P]
    off_diagonal = (cosines.sum(-1) - matched) / (pairs - 1)  # each image vs every other text
    per_pair = matched - off_diagonal
    gap = per_pair.mean(-1)
    stderr = per_pair.std(-1, unbiased=True) / math.sqrt(pairs)
    z = gap / stderr.clamp_min(1e-12)
    return {
        "raw_cosine": raw.tolist(),
        "matched": matched.mean(-1).tolist(),
        "mismatched": off_diagonal.mean(-1).tolist(),
        "gap": gap.tolist(),
        "gap_z": z.tolist(),
        "pairs": pairs,
    }


def refusal_opening_ids(tokenizer, phrases: Sequence[str] = REFUSAL_OPENINGS) -> list[int]:
    """The distinct first tokens of the refusal phrases (as the assistant's first word, no leading space)."""
    ids = []
    for phrase in phrases:
        encoded = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if encoded and encoded[0] not in ids:
            ids.append(int(encoded[0]))
    return ids


@torch.no_grad()
def expression_curve(
    model, layer_states: torch.Tensor, labels, token_ids: Sequence[int], *,
    max_prompts: int = DEFAULT_MAX_EXPRESSION_PROMPTS, seed: int = 0, chunk: int = 16,
) -> dict:
    """Mean logit-lens probability on `token_ids`, per layer, for harmful and for benign prompts.

    At most `max_prompts` prompts per class (a seeded sample) are read: the mean converges long
    before, and each read is an lm_head over the vocabulary for every layer.
    """
    labels = np.asarray(labels)
    generator = np.random.default_rng(seed)
    weight = model.get_output_embeddings().weight
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=weight.device)
    result = {"token_ids": list(map(int, token_ids))}
    for name, value in (("harmful_mass", 1), ("benign_mass", 0)):
        rows = np.flatnonzero(labels == value)
        if len(rows) > max_prompts:
            rows = np.sort(generator.choice(rows, size=max_prompts, replace=False))
        if len(rows) == 0:
            result[name] = None
            continue
        total = torch.zeros(layer_states.shape[1], dtype=torch.float64)
        for start in range(0, len(rows), chunk):
            states = layer_states[torch.as_tensor(rows[start : start + chunk])].to(weight.device, weight.dtype)
            logits = model.sasa_logit_lens(states).float()  # [n, L, V]
            total += logits.softmax(-1)[..., ids].sum(-1).sum(0).double().cpu()
        result[name] = (total / len(rows)).tolist()
    return result


# ----- the rule -----------------------------------------------------------------------------------------
def choose_layers(
    safety: Sequence[float], semantic: dict | None, expression: dict | None, num_layers: int,
) -> tuple[int, int, dict]:
    """(s, f, reasons) by the rule in this module's docstring; always 0 <= s < f <= num_layers - 1."""
    if num_layers < 2:
        raise ValueError("SASA needs at least two decoder layers")
    gains = np.asarray(safety, dtype=np.float64) - 0.5
    usable = gains[: num_layers - 1]  # s <= L-2 so that f exists
    target = SAFETY_FRACTION * float(gains.max())
    reaching = np.flatnonzero(usable >= target - 1e-12)
    s = int(reaching[0]) if len(reaching) else int(np.argmax(usable))
    reasons: dict = {"safety_target_auroc": 0.5 + target, "safety_layer_auroc": float(safety[s])}

    onset = None
    if expression and expression.get("harmful_mass") is not None and expression.get("benign_mass") is not None:
        contrast = np.asarray(expression["harmful_mass"]) - np.asarray(expression["benign_mass"])
        if contrast.max() > 0:
            onset = int(np.flatnonzero(contrast >= 0.5 * contrast.max())[0])
    reasons["expression_onset"] = onset
    stop = onset if onset is not None and onset - s >= 2 else num_layers  # f in (s, stop)
    candidates = np.arange(s + 1, stop)
    reasons["semantic_range"] = [int(candidates[0]), int(candidates[-1])]

    if semantic is not None:
        gap = np.asarray(semantic["gap"])[candidates]
        z = np.asarray(semantic["gap_z"])[candidates]
        reasons["semantic_max_z"] = float(z.max())
        if z.max() >= SEMANTIC_MIN_Z and gap.max() > 0:
            f = int(candidates[np.flatnonzero(gap >= SEMANTIC_PLATEAU * gap.max())[0]])
            reasons["branch"] = "semantic plateau"
            return s, f, reasons
        reasons["branch"] = f"fallback: semantic matching gap not significant (max z < {SEMANTIC_MIN_Z})"
    else:
        reasons["branch"] = "fallback: no image/text pairs"
    f = min(s + FALLBACK_GAP, int(candidates[-1]))
    return s, f, reasons


# ----- the whole localisation -----------------------------------------------------------------------------
@dataclass
class Localisation:
    """The three curves, the chosen layers and why; `save` writes the JSON and the plot."""

    num_layers: int
    safety_layer: int
    semantic_layer: int
    safety_auroc: list[float]
    semantic: dict | None
    expression: dict | None
    reasons: dict
    counts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, folder: str | Path, stem: str = "localisation") -> dict[str, Path]:
        """Write `<stem>.json` (every number) and `<stem>.png` (the three curves, s and f marked)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / f"{stem}.json", "png": folder / f"{stem}.png"}
        self.files = {key: str(path) for key, path in paths.items()}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        plot_curves(self, paths["png"])
        return paths


def plot_curves(localisation: Localisation, path: str | Path) -> None:
    """Three stacked panels over the layers, with s and f as vertical lines (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    layers = np.arange(localisation.num_layers)
    figure, axes = plt.subplots(3, 1, figsize=(7.5, 8.5), sharex=True, constrained_layout=True)
    axes[0].plot(layers, localisation.safety_auroc, marker="o", markersize=3, color="tab:red")
    axes[0].set_ylabel("CV AUROC")
    axes[0].set_title("Safety perception: harmful vs benign, linear probe on each layer")
    axes[0].axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
    if localisation.semantic is not None:
        axes[1].plot(layers, localisation.semantic["raw_cosine"], marker="o", markersize=3, label="cosine (raw)")
        twin = axes[1].twinx()
        twin.plot(layers, localisation.semantic["gap"], marker="s", markersize=3, color="tab:green",
                  label="matched - mismatched (centred)")
        twin.set_ylabel("matching gap", color="tab:green")
        axes[1].legend(loc="upper left", fontsize=8)
        twin.legend(loc="lower right", fontsize=8)
        pairs = localisation.semantic["pairs"]
        axes[1].set_title(f"Semantic understanding: typographic image vs text twin ({pairs} pairs)")
    else:
        axes[1].text(0.5, 0.5, "no image/text pairs", ha="center", va="center", transform=axes[1].transAxes)
        axes[1].set_title("Semantic understanding")
    axes[1].set_ylabel("cosine")
    if localisation.expression is not None:
        for key, label in (("harmful_mass", "harmful prompts"), ("benign_mass", "benign prompts")):
            if localisation.expression.get(key) is not None:
                mass = np.clip(localisation.expression[key], 1e-12, None)
                axes[2].plot(layers, mass, marker="o", markersize=3, label=label)
        axes[2].set_yscale("log")  # logit-lens mass stays near zero until the last layers
        axes[2].legend(fontsize=8)
    axes[2].set_ylabel("P(refusal first token)")
    axes[2].set_title("Alignment for expression: logit-lens refusal mass")
    axes[2].set_xlabel("decoder layer")
    for axis in axes:
        axis.axvline(localisation.safety_layer, color="black", linestyle="--", linewidth=1)
        axis.axvline(localisation.semantic_layer, color="black", linestyle="-.", linewidth=1)
        axis.grid(alpha=0.3)
    axes[0].text(localisation.safety_layer, axes[0].get_ylim()[1], f" s={localisation.safety_layer}", va="top")
    axes[0].text(localisation.semantic_layer, axes[0].get_ylim()[0], f" f={localisation.semantic_layer}", va="bottom")
    figure.savefig(path, dpi=110)
    plt.close(figure)


@contextlib.contextmanager
def cheapest_projection(model) -> Iterator[None]:
    """Temporarily put (s, f) at (L-2, L-1): layer states do not depend on them, the second pass is shortest."""
    layers = model.config.get_text_config().num_hidden_layers
    with temporary_settings(model, safety_layer=layers - 2, semantic_layer=layers - 1):
        yield


def typographic_pairs(prompts: Sequence, *, max_pairs: int = DEFAULT_MAX_PAIRS, seed: int = 0,
                      cache_dir: Path | None = None) -> list[tuple]:
    """(image prompt, text-only twin) pairs for the semantic curve, at most `max_pairs`, both labels.

    Image prompts already in the set that record the request they render (`origin`) are paired with
    it as text; if there are none, text prompts are rendered FigStep-style (`probes.typographic`).
    The sample is seeded and balanced between the labels.
    """
    from sasa_patcher.probes.typographic import to_typographic

    existing = [
        (p, dataclasses.replace(p, text=p.origin, image=None, source=p.source.split("/", 1)[0]))
        for p in prompts
        if getattr(p, "image", None) is not None and getattr(p, "origin", None) and not getattr(p, "augmented", False)
    ]
    generator = np.random.default_rng(seed)
    pool = existing or [(None, p) for p in prompts if getattr(p, "image", None) is None]
    chosen = []
    for value in (1, 0):
        rows = [pair for pair in pool if pair[1].label == value]
        take = min(len(rows), max_pairs // 2 if value == 1 else max_pairs - len(chosen))
        chosen += [rows[i] for i in sorted(generator.choice(len(rows), size=take, replace=False))]
    return [(image or to_typographic(text, cache_dir=cache_dir), text) for image, text in chosen]


def localise(
    model, processor, prompts: Sequence, *, features=None, groups: Sequence | None = None,
    pairs: Sequence[tuple] | None | str = "auto", batch_size: int = 8, seed: int = 0, progress: bool = True,
    refusal_phrases: Sequence[str] = REFUSAL_OPENINGS, max_expression_prompts: int = DEFAULT_MAX_EXPRESSION_PROMPTS,
    max_pairs: int = DEFAULT_MAX_PAIRS, choose: bool = True, clock: ForwardClock | None = None,
    log: Callable[[str], None] | None = None,
) -> Localisation:
    """The three curves on `prompts` (calibration data) and the (s, f) the rule picks.

    `features` may carry the prompts' layer states already (from `extract_features`); otherwise one
    forward per batch collects them. `groups` keeps related prompts in one CV fold (see
    `probes.splits.group_key`). `pairs`: "auto" builds typographic pairs from the prompts, None skips
    the semantic curve, or give (image prompt, text prompt) pairs. With `choose=False` the model's
    current layers are reported instead of chosen (curves for a user-given (s, f)). `clock` and `log`
    as in `extract_features` (the image pairs are the long part at real size: `log` hears their time).
    """
    layers = model.config.get_text_config().num_hidden_layers
    if features is None or features.layer_states is None:
        with cheapest_projection(model):
            features = extract_features(model, processor, prompts, batch_size=batch_size, candidates=(),
                                        layer_states=True, progress=progress, description="layer states",
                                        clock=clock, log=log)
    labels = features.labels
    safety = safety_curve(features.layer_states, labels, groups, seed=seed)

    if isinstance(pairs, str):
        if pairs != "auto":
            raise ValueError(f"pairs must be 'auto', None or a list of pairs, got {pairs!r}")
        pairs = typographic_pairs(prompts, max_pairs=max_pairs, seed=seed)
    semantic = None
    if pairs is not None and len(pairs) >= 2:
        with cheapest_projection(model):
            image_states = extract_features(model, processor, [p[0] for p in pairs], batch_size=batch_size,
                                            candidates=(), progress=progress, description="image pairs",
                                            clock=clock, log=log).layer_states
            text_states = extract_features(model, processor, [p[1] for p in pairs], batch_size=batch_size,
                                           candidates=(), progress=progress, description="text pairs",
                                           clock=clock, log=log).layer_states
        semantic = semantic_curve(image_states, text_states)

    tokenizer = getattr(processor, "tokenizer", processor)
    token_ids = refusal_opening_ids(tokenizer, refusal_phrases)
    expression = expression_curve(model, features.layer_states, labels, token_ids,
                                  max_prompts=max_expression_prompts, seed=seed)
    expression["phrases"] = list(refusal_phrases)
    if choose:
        s, f, reasons = choose_layers(safety, semantic, expression, layers)
    else:
        s, f = model.sasa.safety_layer, model.sasa.semantic_layer
        reasons = {"branch": "given by the user"}
    return Localisation(
        num_layers=layers, safety_layer=s, semantic_layer=f, safety_auroc=safety, semantic=semantic,
        expression=expression, reasons=reasons,
        counts={"prompts": len(labels), "harmful": int((labels == 1).sum()), "benign": int((labels == 0).sum()),
                "pairs": 0 if semantic is None else semantic["pairs"]},
    )
