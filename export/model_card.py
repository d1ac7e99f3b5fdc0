"""The artifact's `README.md`: Hub metadata (YAML front matter) plus what a user needs to trust and run it.

The card is built from three sources only: the `sasa` settings the patched model carries (layers,
projection, serving mode, threshold, refusal text, calibration `metrics`), the base checkpoint
directory (its own card's license), and `CardInfo` (names, calibration data description, the
localisation plot). It never computes figures: `export/` does not reach back into calibration.

`sasa.metrics` is shown by `export.card_figures` (which keys it reads, and how). With no held-out AUROC
and no finite threshold the card says "untrained probe".
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from sasa_patcher.export.card_figures import calibration_section, finite_threshold, format_number, is_trained
from sasa_patcher.tables import escape_cell

PAPER_URL = "https://arxiv.org/abs/2507.21637"
PLOT_NAME = "localisation.png"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BASE_TAGS = ["sasa", "safety", "safety-probe", "vision-language", "custom_code"]

SERVING_TEXT = {
    "gate": "**gate**: generation runs on the original stream; the probe reads the prompt and a flagged row "
    "answers with the refusal text",
    "augment": "**augment**: generation itself runs on the projected stream at every step (two KV caches)",
}
PROJECTION_TEXT = {
    "replace": "replace: `H_s' = alpha * W(H_f)` (paper)",
    "residual": "residual: `H_s' = H_s + beta * alpha * W(H_f)`",
    "interpolate": "interpolate: `H_s' = (1 - beta) * H_s + beta * alpha * W(H_f)`",
}


@dataclass
class CardInfo:
    """What the card needs beyond the model: names, license, calibration data and the localisation plot.

    `base_model` is shown as the base; it goes into the YAML `base_model` field only when it is a
    Hub id (`owner/name`), since the Hub rejects anything else there; `source_models` (Hub ids the
    base derives from, e.g. the language weights of an embedded model) are used instead then.
    `license` falls back to the base directory's own card. `calibration_data` describes what the
    probe was fitted on (the digest comes from the metrics).
    """

    base_model: str
    license: str | None = None
    localisation_plot: Path | None = None
    model_name: str | None = None
    source_models: list[str] = field(default_factory=list)
    calibration_data: list[str] = field(default_factory=list)
    extra_tags: list[str] = field(default_factory=list)


def base_card_license(base_dir: Path) -> str | None:
    """The `license` field of the base checkpoint's own README front matter, if any (read locally only)."""
    readme = Path(base_dir) / "README.md"
    if not readme.is_file():
        return None
    try:
        card = ModelCard(readme.read_text(encoding="utf-8"), ignore_metadata_errors=True)
    except Exception:  # noqa: BLE001 - a malformed base card must not stop the export
        return None
    value = getattr(card.data, "license", None)
    return str(value) if value else None


def front_matter(info: CardInfo, license_: str | None) -> ModelCardData:
    base_ids = [info.base_model] if HUB_ID.match(info.base_model) else list(info.source_models)
    return ModelCardData(
        base_model=base_ids or None,
        license=license_,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=BASE_TAGS + [tag for tag in info.extra_tags if tag not in BASE_TAGS],
    )


def render_model_card(
    config: dict[str, Any],
    info: CardInfo,
    *,
    plot_name: str | None = None,
    weights: dict[str, Any] | None = None,
) -> str:
    """The card's body (no front matter). `config` is the artifact's `config.json` (with its `sasa` section);
    `weights` is what the checkpoint writer reports about the base weights (`base_weights`, `reason`)."""
    sasa = config["sasa"]
    text_config = config.get("text_config") or config
    num_layers = text_config.get("num_hidden_layers")
    patched_class = (config.get("architectures") or ["?"])[0]
    s, f = sasa["safety_layer"], sasa["semantic_layer"]
    title = info.model_name or f"{info.base_model.rstrip('/').split('/')[-1]} + SASA safety probe"

    lines = [
        f"# {title}",
        "",
        f"`{info.base_model}` with Self-Aware Safety Augmentation ([SASA]({PAPER_URL})) baked into the graph: "
        "a projection of an early safety-perception layer onto a later semantic layer, a second pass over "
        "the remaining layers, and a linear safety probe that outputs `unsafe_prob` for every prompt. "
        "No hooks: the patched class is in `modeling_sasa.py` (imports only torch and transformers).",
        "",
        "## Patch",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| base model | `{info.base_model}` |",
        f"| architecture | `{config.get('model_type', '?')}` -> `{patched_class}` |",
        f"| safety-perception layer s | {s} |",
        f"| semantic layer f | {f} |",
        f"| decoder layers | {num_layers if num_layers is not None else '?'} (second pass over layers s+1..L-1: "
        f"{_extra_cost(s, num_layers)}) |",
        f"| projection | {_projection(sasa)} |",
        "| semantic map W | `sasa_semantic_map.weight` (identity unless calibrated) |",
        f"| serving mode | {SERVING_TEXT.get(sasa.get('mode'), sasa.get('mode'))} |",
        f"| probe features | `{sasa.get('probe_features')}` at the last prompt position |",
        f"| threshold | {_threshold_text(sasa)} |",
        f"| refusal text | {escape_cell(repr(sasa.get('refusal_text', '')))} |",
        "",
        "## Calibration",
        "",
    ]
    lines += calibration_section(sasa, info.calibration_data)
    if plot_name:
        lines += ["## Layer localisation", "", f"![Probe quality per (s, f) layer pair]({plot_name})", ""]
    lines += _usage_section()
    lines += ["## Files", "", _weights_line(weights or {})]
    lines += [
        "- `sasa.safetensors`: the SASA tensors (`sasa_semantic_map.weight`, `sasa_probe.linear.weight`, "
        "`sasa_probe.linear.bias`, `sasa_probe.threshold`), listed with every base tensor in "
        "`model.safetensors.index.json`",
        "- `config.json`: the base config plus the `sasa` section, `architectures` and `auto_map` to "
        "`modeling_sasa.py`",
        "",
    ]
    return "\n".join(lines)


def _projection(sasa: dict[str, Any]) -> str:
    mode = sasa.get("projection")
    text = PROJECTION_TEXT.get(mode, str(mode))
    if mode != "replace":
        text += f", beta = {sasa.get('beta')}"
    return f"{text}, eps = {sasa.get('eps')}"


def _extra_cost(s: int, num_layers: int | None) -> str:
    if not num_layers:
        return "?"
    return f"{num_layers - s - 1}/{num_layers} of a forward"


def _threshold_text(sasa: dict[str, Any]) -> str:
    threshold = finite_threshold(sasa)
    if threshold is None:
        return "+inf (nothing is flagged)" + ("" if is_trained(sasa) else ": untrained probe")
    return f"{format_number(threshold)} on `unsafe_prob`"


def _weights_line(weights: dict[str, Any]) -> str:
    if weights.get("base_weights") == "saved":
        reason = weights.get("reason") or "the in-memory weights differ from the base checkpoint"
        return f"- base weights saved from memory, not the base checkpoint's files: {reason}"
    return ("- the base model's own files, unchanged: weight shards byte-identical to the base checkpoint, "
            "tokenizer, processor, chat template and generation config as the base ships them")


def _usage_section() -> list[str]:
    return [
        "## Usage",
        "",
        "### transformers",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'ARTIFACT = "path/or/hub-id/of/this/model"',
        "model = AutoModelForImageTextToText.from_pretrained(ARTIFACT, trust_remote_code=True)",
        "processor = AutoProcessor.from_pretrained(ARTIFACT)",
        'messages = [{"role": "user", "content": [{"type": "image", "url": "photo.png"},',
        '                                         {"type": "text", "text": "What is in this image?"}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt")',
        "out = model(**inputs)",
        "print(out.unsafe_prob)  # one probability per batch row; flagged above the threshold",
        "ids = model.generate(**inputs, max_new_tokens=64)  # gate mode: flagged rows get the refusal text",
        'print(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "`trust_remote_code=True` runs `modeling_sasa.py` from this repository: one file, read it first. "
        "Greedy and sampling decoding are supported; beam search is refused.",
        "",
        "### ONNX Runtime",
        "",
        "When the artifact has an `onnx/` folder (vision encoder, token embeddings, decoder with KV cache and "
        "`unsafe_prob`), run it with no PyTorch model code, from the sasa-patcher repository:",
        "",
        "```bash",
        'python scripts/generate_onnx.py ARTIFACT/onnx --prompt "What is in this image?"',
        "```",
        "",
    ]


def write_model_card(
    out_dir: Path,
    config: dict[str, Any],
    info: CardInfo,
    base_dir: Path | None = None,
    weights: dict[str, Any] | None = None,
) -> Path:
    """Write `README.md` into `out_dir`, copying the localisation plot next to it when one is given."""
    out_dir = Path(out_dir)
    plot_name = None
    if info.localisation_plot is not None:
        plot = Path(info.localisation_plot)
        if not plot.is_file():
            raise FileNotFoundError(f"localisation plot {plot} does not exist")
        if plot.suffix.lower() != ".png":
            raise ValueError(f"localisation plot must be a PNG file, got {plot.name}")
        if Path(plot).resolve() != (out_dir / PLOT_NAME).resolve():
            shutil.copyfile(plot, out_dir / PLOT_NAME)
        plot_name = PLOT_NAME
    license_ = info.license or (base_card_license(base_dir) if base_dir is not None else None)
    body = render_model_card(config, info, plot_name=plot_name, weights=weights)
    card = ModelCard(f"---\n{front_matter(info, license_).to_yaml()}\n---\n\n{body}")
    path = out_dir / "README.md"
    path.write_text(str(card), encoding="utf-8")
    return path
