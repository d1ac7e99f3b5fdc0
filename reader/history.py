"""A training run's record, written beside its checkpoints so a long run can be watched: JSON and a chart.

Each entry is {"stage", "step", "loss"} plus, at checkpoints, "heldout_token_accuracy". The chart puts the
loss (a moving average: single batches are noisy) and the held-out accuracy of each stage side by side.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from reader.training import STAGES
from sasa_patcher.export.atomic import atomic_file

SMOOTHING_STEPS = 25


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start, so no value is dropped)."""
    cumulative = np.cumsum(np.asarray(values, dtype=float))
    starts = np.maximum(np.arange(len(values)) - window + 1, 0)
    totals = cumulative - np.where(starts > 0, cumulative[starts - 1], 0.0)
    return totals / (np.arange(len(values)) - starts + 1)


def write_history(history: list[dict], folder: Path) -> None:
    """history.json and history.png in `folder`, each replaced whole (a reader never sees half a file)."""
    with atomic_file(folder / "history.json") as partial:
        partial.write_text(json.dumps(history) + "\n")
    plot_history(history, folder / "history.png")


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    stages = [stage for stage in STAGES if any(entry["stage"] == stage for entry in history)]
    figure, axes = plt.subplots(1, max(1, len(stages)), figsize=(6 * max(1, len(stages)), 4), squeeze=False,
                                constrained_layout=True)
    for axis, stage in zip(axes[0], stages, strict=False):
        entries = [entry for entry in history if entry["stage"] == stage]
        steps = [entry["step"] for entry in entries]
        axis.plot(steps, moving_average([entry["loss"] for entry in entries], SMOOTHING_STEPS), color="tab:blue")
        axis.set_yscale("log")  # early losses are an order of magnitude above the plateaus that matter
        axis.set_xlabel(f"{stage} step")
        axis.set_ylabel(f"loss ({SMOOTHING_STEPS}-step mean)", color="tab:blue")
        axis.grid(alpha=0.3)
        scored = [entry for entry in entries if "heldout_token_accuracy" in entry]
        twin = axis.twinx()
        twin.plot([entry["step"] for entry in scored], [entry["heldout_token_accuracy"] for entry in scored],
                  marker="o", markersize=3, color="tab:red")
        twin.set_ylim(0, 1)
        twin.set_ylabel("held-out token accuracy", color="tab:red")
        axis.set_title({"ctc": "recognition (greedy CTC reading)", "lm": "transcription by the language model"}[stage])
    with atomic_file(path) as partial:
        figure.savefig(partial, dpi=110)
    plt.close(figure)
