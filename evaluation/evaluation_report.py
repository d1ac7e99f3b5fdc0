"""The evaluation report: the metrics table (rows = figures, columns = systems), the per-category table
(rows = hazards and benign families), their markdown and charts, the files.

Why apart from the run: the same rows feed the markdown tables and the charts, and the files are
written together (atomically) so a report is never half there. Tables come from the one table
helper, per-prompt records through the one JSONL writer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sasa_patcher.export.atomic import atomic_output_dir
from sasa_patcher.export.card_figures import traffic_section
from sasa_patcher.jsonl import write_jsonl
from sasa_patcher.tables import format_metric, markdown_table


def table_rows(report: dict) -> list[tuple[str, str, dict]]:
    """(key, label, {system: value}) for every figure of the table, in reading order."""
    metrics = report["metrics"]
    rows = [(f"asr/{name}", f"attack success rate, {name}", values) for name, values in metrics["asr"].items()]
    rows += [(f"refusal/{name}", f"refusal rate, {name}", values) for name, values in metrics["refusal_rate"].items()]
    rows += [(f"flagged/{name}", f"probe flagged rate, {name}", values)
             for name, values in metrics["flagged_rate"].items()]
    for modality, per_system in metrics["probe"].items():
        for figure in ("auroc", "tpr", "fpr"):
            rows.append((f"probe/{modality}/{figure}", f"probe {figure.upper()}, {modality} (harmful vs benign)",
                         {system: point[figure] for system, point in per_system.items()}))
    rows.append(("consistency/same_answer_as_base", "same answer as the base, prompts not flagged",
                 metrics["same_answer_as_base"]))
    utility = metrics["utility"]
    for key, label in (("kl_to_base", "KL(base || model) per token, nats"), ("kl_to_base_max", "max per-token KL"),
                       ("perplexity", "perplexity")):
        rows.append((f"utility/{key}", f"{label} (benign prompt text)",
                     {system: values[key] for system, values in utility.items()}))
    return rows


def markdown(report: dict) -> str:
    """The table (rows = metrics, columns = systems) with what it was measured on."""
    systems = report["systems"]
    sasa = report["sasa"]
    lines = [
        f"### SASA evaluation: {report['base']} vs {report['artifact']} ({report['runtime']})",
        "",
        f"Layers s={sasa['safety_layer']}, f={sasa['semantic_layer']}; probe `{sasa['probe_features']}`, "
        f"threshold {format_metric(sasa['threshold'])}; greedy, at most {report['options']['max_new_tokens']} new "
        "tokens; "
        f"data: {report['data']['data']}. Wall time {report['seconds']['total_s']:.0f} s.",
        "",
    ]
    rows = [["metric", *systems]] + [[label, *(format_metric(values.get(system)) for system in systems)]
                                     for _, label, values in table_rows(report)]
    lines += markdown_table(rows, align=["---", *("---:" for _ in systems)])
    lines += ["", "Prompts per set: " + ", ".join(f"{name} {count}" for name, count in report["counts"].items())
              + ". Refusals judged by the GCG keyword list (`probes/refusal.py`) plus the configured refusal text;"
              " KL and perplexity are teacher-forced on the user text of the benign prompts.", ""]
    for modality in report["metrics"].get("by_category", {}):
        lines += [f"#### Per hazard and benign family, {modality} prompts", "",
                  "Harmful prompts by hazard (flagged = TPR), benign prompts by the family they look like, the "
                  "over-refusal set included (flagged = FPR); the probe at the artifact's threshold, refusals per "
                  "system.", "", *markdown_table(category_rows(report, modality)), ""]
    traffic = traffic_section(report.get("calibration_metrics") or {}, set())
    if traffic:
        lines += ["#### Real traffic and transfer (the artifact's calibration figures)", "", *traffic]
    return "\n".join(lines)


def patched_systems(report: dict) -> list[str]:
    """The systems with a probe (the base has none), in report order."""
    figures = report["metrics"].get("by_category", {})
    scored = {system for sides in figures.values() for table in sides.values() for entry in table.values()
              for system in entry["flagged_rate"]}
    return [system for system in report["systems"] if system in scored]


def category_rows(report: dict, modality: str) -> list[list[str]]:
    """The per-category table of one modality: header, then one row per hazard and per benign family."""
    systems, patched = report["systems"], patched_systems(report)
    rows = [["side", "category", "n", *(f"flagged, {s}" for s in patched), *(f"refused, {s}" for s in systems)]]
    for side, table in report["metrics"]["by_category"][modality].items():
        for category, entry in table.items():
            rows.append([side, category, str(entry["n"]),
                         *(format_metric(entry["flagged_rate"].get(s)) for s in patched),
                         *(format_metric(entry["refusal_rate"].get(s)) for s in systems)])
    return rows


CHART_ROWS = ("asr/harmful_text", "asr/harmful_typographic", "asr/harmful_image", "refusal/benign_text",
              "refusal/benign_typographic", "refusal/over_refusal", "probe/text/auroc", "probe/text/tpr",
              "probe/text/fpr", "probe/typographic/auroc", "probe/typographic/tpr", "probe/typographic/fpr")


def plot(report: dict, path: Path) -> None:
    """Grouped bars: ASR, refusal rates and probe figures, one bar per system (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = {key: values for key, _, values in table_rows(report)}
    groups = [key for key in CHART_ROWS if key in rows]
    systems = report["systems"]
    width = 0.8 / len(systems)
    figure, axis = plt.subplots(figsize=(max(8.0, 1.1 * len(groups)), 4.8), constrained_layout=True)
    for index, system in enumerate(systems):
        heights = [rows[key].get(system) for key in groups]
        positions = [g + (index - (len(systems) - 1) / 2) * width for g in range(len(groups))]
        axis.bar(positions, [math.nan if h is None else h for h in heights], width, label=system)
    axis.set_xticks(range(len(groups)), [key.replace("/", "\n", 1).replace("/", " ") for key in groups], fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("rate / AUROC")
    axis.set_title(f"SASA evaluation ({report['runtime']}): {report['base']}")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_categories(report: dict, path: Path, modality: str = "text") -> bool:
    """Horizontal bars per hazard (left) and benign family (right): the probe's flagged rate and each
    system's refusal rate. False (nothing written) when the modality has no per-category figures."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    sides = report["metrics"].get("by_category", {}).get(modality)
    if not sides:
        return False
    patched = patched_systems(report)
    series = [(f"flagged ({patched[0]})", "flagged_rate", patched[0])] if patched else []
    series += [(f"refused ({system})", "refusal_rate", system) for system in report["systems"]]
    tallest = max(len(table) for table in sides.values())
    figure, axes = plt.subplots(1, len(sides), figsize=(5.5 * len(sides), 1.6 + 0.32 * tallest * len(series) / 2),
                                constrained_layout=True, squeeze=False)
    height = 0.8 / len(series)
    for axis, (side, table) in zip(axes[0], sides.items(), strict=True):
        names = list(table)
        for index, (label, key, system) in enumerate(series):
            values = [table[name][key].get(system) for name in names]
            positions = [row + (index - (len(series) - 1) / 2) * height for row in range(len(names))]
            axis.barh(positions, [math.nan if v is None else v for v in values], height, label=label)
        axis.set_yticks(range(len(names)), [f"{name} ({table[name]['n']})" for name in names], fontsize=8)
        axis.invert_yaxis()
        axis.set_xlim(0, 1.05)
        axis.set_title(f"{side} ({'TPR' if side == 'harmful' else 'FPR'} = flagged), {modality}", fontsize=10)
        axis.grid(axis="x", alpha=0.3)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncols=len(series),
                  fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def transfer_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(label, rate record) for the transfer chart: each benign source's refusal rate when held out of the fit,
    the same pooled per modality, harmful image prompts by kind, and each never-fitted attack family."""
    rows = [(f"benign {name} (held out)", value) for name, value in (metrics.get("loso_fpr_by_source") or {}).items()]
    rows += [(f"benign {name} prompts (held out)", value)
             for name, value in (metrics.get("loso_fpr_by_modality") or {}).items()]
    variants = (metrics.get("heldout_by_modality") or {}).get("harmful_image_by_variant") or {}
    rows += [(f"harmful image, {name}", value) for name, value in variants.items()]
    rows += [(f"attack: {name}", value["flagged"]) for name, value in (metrics.get("transfer") or {}).items()]
    return [(label, value) for label, value in rows if value and value.get("rate") is not None]


def plot_transfer(report: dict, path: Path) -> bool:
    """Horizontal bars with their Wilson intervals: the rates of `transfer_rows` at the artifact's threshold.
    False (nothing written) when the artifact's metrics hold none."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = transfer_rows(report.get("calibration_metrics") or {})
    if not rows:
        return False
    rates = [value["rate"] for _, value in rows]
    errors = [[rate - value["low"] for rate, (_, value) in zip(rates, rows, strict=True)],
              [value["high"] - rate for rate, (_, value) in zip(rates, rows, strict=True)]]
    colours = ["tab:red" if label.startswith("benign") else "tab:green" for label, _ in rows]
    figure, axis = plt.subplots(figsize=(8.0, 1.2 + 0.3 * len(rows)), constrained_layout=True)
    axis.barh(range(len(rows)), rates, xerr=errors, color=colours, capsize=2)
    axis.set_yticks(range(len(rows)), [f"{label} ({value['k']}/{value['n']})" for label, value in rows], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1.05)
    axis.set_xlabel("flagged at the artifact's threshold\n(red: benign, should be low; green: harmful, should be high)")
    axis.set_title(f"Real traffic and transfer: {report['base']}", fontsize=10)
    axis.grid(axis="x", alpha=0.3)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(report: dict, records: list[dict], out: Path, force: bool) -> None:
    """evaluation.json, evaluation.md, evaluation.png, categories.png (when the prompts carry categories),
    transfer.png (when the artifact's metrics hold transfer figures) and generations.jsonl, moved into place
    together."""
    with atomic_output_dir(out, force) as staging:
        (staging / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (staging / "evaluation.md").write_text(markdown(report), encoding="utf-8")
        plot(report, staging / "evaluation.png")
        plot_categories(report, staging / "categories.png")
        plot_transfer(report, staging / "transfer.png")
        write_jsonl(staging / "generations.jsonl", records)
