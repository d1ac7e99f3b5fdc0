"""The training record: a trailing moving average and the files a running training leaves to watch."""

from __future__ import annotations

import json

import numpy as np

from reader.history import moving_average, write_history


def test_moving_average_is_the_trailing_mean() -> None:
    values = [4.0, 2.0, 6.0, 0.0, 8.0]
    expected = [np.mean(values[max(0, i - 2):i + 1]) for i in range(len(values))]
    assert np.allclose(moving_average(values, 3), expected)


def test_history_is_written_as_json_and_chart(tmp_path) -> None:
    history = [{"stage": "ctc", "step": step, "loss": 10.0 / (step + 1)} for step in range(40)]
    history[19]["heldout_token_accuracy"] = 0.1
    history += [{"stage": "lm", "step": 0, "loss": 4.0, "heldout_token_accuracy": 0.2}]
    write_history(history, tmp_path)
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert (tmp_path / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["history.json", "history.png"]
