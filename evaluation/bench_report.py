"""The bench report as text (stdout) and as markdown (README Results): latency table, patch time, memory.

Why apart from the run: the figures are computed once (`evaluation.bench`) and printed twice, and
the README must show exactly what the run wrote. Tables come from the one table helper.
"""

from __future__ import annotations

from sasa_patcher.tables import markdown_table, text_table

GIB = 2**30

MEASURE_LABELS = {"prefill": "prefill, gate", "prefill_augment": "prefill, augment",
                  "decode_gate": "decode per token, gate", "decode_augment": "decode per token, augment"}


def latency_lines(report: dict) -> list[str]:
    return text_table(latency_rows(report))


def latency_rows(report: dict) -> list[list[str]]:
    runtimes = report["runtimes"]
    header = ["measure", "floor"]
    for name, result in runtimes.items():
        providers = result["runtime"].get("providers")
        label = f"ort {providers[0].removesuffix('ExecutionProvider')}" if providers else name
        header += [f"{label} base ms", "patched ms", "ratio"]
    rows = [header]
    for measure, label in MEASURE_LABELS.items():
        row = [label, f"{next(iter(runtimes.values()))[measure]['floor']:.3f}"]
        for result in runtimes.values():
            entry = result[measure]
            row += [baseline_cell(entry), f"{entry['patched_ms']:.1f}", ratio_cell(entry)]
        rows.append(row)
    return rows


def spread_label(entry: dict) -> str:
    return "IQR" if entry["spread_statistic"] == "iqr" else "range"


def ratio_cell(entry: dict) -> str:
    """`1.430x (paired 1.440, IQR 1.380-1.510; floor 1.400: inside the noise)`: the ratio of the medians,
    then the median and spread of the paired ratios (their min-max, "range", below 4 repeats), the floor
    and the verdict. The paired median is shown because the spread and the verdict are about the paired
    ratios, and the ratio of the medians can fall outside their spread."""
    if len(entry["paired_ratios"]) < 2:
        return f"{entry['ratio']:.3f}x ({entry['verdict']})"
    return (f"{entry['ratio']:.3f}x (paired {entry['paired_ratio_median']:.3f}, {spread_label(entry)} "
            f"{entry['ratio_low']:.3f}-{entry['ratio_high']:.3f}; floor {entry['floor']:.3f}: {entry['verdict']})")


def baseline_cell(entry: dict) -> str:
    """The baseline's median and its own run-to-run spread over the median: `715.1 (IQR 2.5%)`."""
    if len(entry["baseline_samples_ms"]) < 2:
        return f"{entry['baseline_ms']:.1f}"
    return f"{entry['baseline_ms']:.1f} ({spread_label(entry)} {100 * entry['baseline_spread']:.1f}%)"


def schedule_lines(report: dict) -> list[str]:
    """How each runtime ordered its runs: interleaved, in rounds, or one variant after the other."""
    return [f"{name}: {result['runtime']['schedule']}" for name, result in report["runtimes"].items()
            if "schedule" in result["runtime"]]


def patch_lines(report: dict) -> list[str]:
    seconds, details = report["patch_seconds"], report["patch"]
    if seconds is None:
        return ["patch wall time: not measured (--skip-patch-timing)"]
    sample = (f"a {details['calibration_prompts']}-prompt subsample of the {details['builtin_prompts']} built-in "
              "prompts" if details["subsample"] else f"all {details['builtin_prompts']} built-in prompts")
    parts = [
        ("load", "load", ""),
        ("patch (class swap, fixed modules)", "patch", ""),
        ("calibration passes", "calibration_forward",
         f"localisation {seconds['localisation']:.1f} s, features {seconds['features']:.1f} s; "
         f"{seconds['forward_passes']:.1f} s inside the model's calls"),
        ("probe fit (+ leave-one-source-out)", "fit", ""),
        ("export", "export", ", ".join(f"{name} {seconds['export_' + name]:.1f} s" for name in details["formats"])),
        ("other", "other", ""),
        ("total", "total", f"forward passes {100 * details['forward_share']:.0f}% of it; calibration "
                           f"{details['calibration_over_forward']:.2f}x its forward passes"),
    ]
    return [f"patch wall time (calibrated on {sample}):"] + [
        f"  {label:<36}{seconds[key]:>8.1f} s  {note}".rstrip() for label, key, note in parts]


def memory_line(report: dict) -> str:
    memory = report["memory"]
    peak = memory["patch_stage"]["peak_rss"]
    ratio = report["peak_rss_over_weights"]
    weights = f"{ratio:.2f} x the weights ({memory['weight_bytes'] / GIB:.2f} GiB)" if ratio else "no weight size"
    return f"memory: peak RSS {peak / GIB:.2f} GiB over {memory['patch_stage_covers']} = {weights}"


RATIO_NOTE = ("ratio = patched median / unpatched median; paired = median of the per-repeat ratios patched_i / "
              "baseline_i, IQR = their 25th-75th percentile (range = min-max, below 4 repeats); floor = "
              "decoder-layer passes over L (work outside the layers not counted); inside the noise = the floor "
              "lies within the paired IQR (range), so this run cannot tell the ratio from its floor; base ms "
              "spread = the baseline's own run-to-run IQR (range) over its median")


def heading_lines(report: dict) -> list[str]:
    layers, inputs = report["layers"], report["inputs"]
    return [
        f"SASA bench: {report['model']} on {report['device']} ({report['dtype']}), L={layers['num_layers']}, "
        f"s={layers['safety_layer']}, f={layers['semantic_layer']} ({layers['chosen_by']}), "
        f"probe on {layers['probe_features']}",
        f"batch {inputs['batch_size']}, prompt {inputs['prompt_tokens']} tokens, decode {inputs['decode_tokens']} "
        f"tokens; median of {inputs['repeats']} runs after {inputs['warmup']} warm-up; threads: {inputs['threads']}",
    ]


def closing_lines(report: dict) -> list[str]:
    return [*patch_lines(report), memory_line(report), f"wall time of this run: {report['wall_seconds']:.0f} s",
            *contention_note(report)]


def format_report(report: dict) -> str:
    lines = [*heading_lines(report), "", *latency_lines(report), RATIO_NOTE, *schedule_lines(report), "",
             *closing_lines(report)]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The same report for a README: the latency table as markdown, the rest verbatim."""
    heading = heading_lines(report)
    schedule = [f"- {line}" for line in schedule_lines(report)]
    lines = [f"**{heading[0]}**", "", heading[1], "", *markdown_table(latency_rows(report)), "", RATIO_NOTE, "",
             *([*schedule, ""] if schedule else []), "```text", *closing_lines(report), "```"]
    return "\n".join(lines) + "\n"


def contention_note(report: dict) -> list[str]:
    """A warning when other processes were using the CPU as the run started.

    Measured on a 2-core machine shared with other jobs: with as many threads as cores, PyTorch
    timings were distorted up to 10x, unevenly between the variants; with one thread they were not.
    """
    load, cores = report["machine"]["load_average_at_start"], report["machine"]["cpu_count"]
    if load is None or load < 1:
        return []
    return [f"note: load average {load:.1f} on {cores} cores at the start: other processes compete for the CPU, so "
            "timings are noisy, and with as many threads as cores they can be distorted many-fold; use an idle "
            "machine, or --threads below the number of free cores"]
