"""The bench (cli.bench, evaluation.bench, evaluation.latency) on tiny models: floors, ONNX baseline, report, input.

Nothing here asserts a speed (shared machines are noisy): only structure and correctness. The ONNX
tests export tiny decoder graphs, tens of seconds each (the dynamo export's decomposition pass), so the
baseline graph is exported once for the module and the runtime test exports only gate and augment.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from transformers import DynamicCache

from sasa_patcher.cli import bench as bench_cli
from sasa_patcher.evaluation import latency
from sasa_patcher.evaluation.bench_report import format_markdown, format_report, latency_lines
from sasa_patcher.evaluation.latency import (
    ABOVE,
    BELOW,
    INSIDE,
    MEASURES,
    NO_SPREAD,
    VARIANTS,
    OrtDecoder,
    bench_onnxruntime,
    bench_pytorch,
    bench_token_ids,
    compare,
    layer_floors,
    model_floors,
    round_sizes,
    time_rounds,
    token_ceiling,
)
from sasa_patcher.export.onnx_graphs import DecoderGraph, export_decoder
from sasa_patcher.export.onnx_names import UNSAFE_PROB_NOT_COMPUTED
from sasa_patcher.export.onnx_parity import LOGITS_TOLERANCE
from sasa_patcher.modeling_sasa import CACHE_KEY, SasaSettings
from sasa_patcher.patching import patch_model, temporary_settings
from tiny_models import IMAGE_TOKEN, build_qwen2_vl

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench.py"
S, F = 1, 3
ENTRY_NUMBERS = ("ratio", "floor", "baseline_ms", "patched_ms")


@pytest.fixture(scope="module")
def patched():
    return patch_model(build_qwen2_vl(), SasaSettings(S, F))


@pytest.fixture(scope="module")
def baseline_graph(patched, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-graphs") / "decoder_baseline.onnx"
    export_decoder(patched, path, probe=False)
    return path


def is_finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def check_runtime_report(report: dict, floors: dict, repeats: int) -> None:
    for measure in MEASURES:
        entry = report[measure]
        assert all(is_finite_positive(entry[key]) for key in ENTRY_NUMBERS), entry
        assert entry["floor"] == floors[measure]
        assert entry["ratio"] == pytest.approx(entry["patched_ms"] / entry["baseline_ms"])
        assert len(entry["baseline_samples_ms"]) == len(entry["patched_samples_ms"]) == repeats
        assert entry["paired_ratios"] == pytest.approx(
            [after / before for before, after in zip(entry["baseline_samples_ms"], entry["patched_samples_ms"],
                                                 strict=True)])
        assert entry["ratio_low"] <= entry["paired_ratio_median"] <= entry["ratio_high"]
        assert entry["verdict"] in {INSIDE, ABOVE, BELOW, NO_SPREAD}
        assert entry["spread_statistic"] == ("iqr" if repeats >= 4 else "min-max")
    assert isinstance(report["runtime"]["interleaved"], bool) and report["runtime"]["schedule"]


# ----- floors and inputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("layers,features,expected", [
    ((30, 12, 14), "projected-logits", {"prefill": 1 + 17 / 30, "prefill_augment": (15 + 17) / 30,
                                        "decode_gate": 1.0, "decode_augment": (15 + 17) / 30}),
    # the probe reads the original stream: gate's prefill is one forward plus the head, no second pass
    ((30, 12, 14), "logits", {"prefill": 1.0, "prefill_augment": (15 + 17 + 15) / 30,
                              "decode_gate": 1.0, "decode_augment": (15 + 17) / 30}),
    # default probe layers 8, 12, 16, 20: above f, so augment completes the original stream
    ((30, 12, 14), "multi-layer", {"prefill": 1.0, "prefill_augment": (15 + 17 + 15) / 30,
                                   "decode_gate": 1.0, "decode_augment": (15 + 17) / 30}),
    ((6, 1, 3), "hidden", {"prefill": 1 + 4 / 6, "prefill_augment": (4 + 4) / 6,
                           "decode_gate": 1.0, "decode_augment": (4 + 4) / 6}),
    ((6, 4, 5), "projected-logits", {"prefill": 1 + 1 / 6, "prefill_augment": (6 + 1) / 6,
                                     "decode_gate": 1.0, "decode_augment": (6 + 1) / 6}),
])
def test_layer_floors(layers, features, expected):
    floors = layer_floors(*layers, probe_features=features)
    assert floors.keys() == expected.keys() == MEASURES.keys()
    for name, value in expected.items():
        assert floors[name] == pytest.approx(value), name


def test_multi_layer_floor_below_f_needs_no_completed_stream():
    floors = layer_floors(30, 12, 14, probe_features="multi-layer", probe_layers=[4, 8, 14])
    assert floors["prefill"] == 1.0 and floors["prefill_augment"] == pytest.approx((15 + 17) / 30)


@pytest.mark.parametrize("features,probe_layers", [("projected-logits", []), ("hidden", []), ("logits", []),
                                                   ("multi-layer", [2, 5]), ("multi-layer", [1, 3])])
def test_floors_count_the_layer_calls_the_patched_forward_makes(features, probe_layers):
    """The floors are the decoder-layer calls `sasa_probe_features` and the serving streams actually make."""
    model = patch_model(build_qwen2_vl(), SasaSettings(S, F, probe_features=features, probe_layers=probe_layers))
    layers = model.sasa_text_model().layers
    calls = [0]
    hooks = [layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for layer in layers]
    floors = model_floors(model)
    ids = bench_token_ids(model.config, 2, 5, 1)
    mask = torch.ones_like(ids)
    try:
        for mode in ("gate", "augment"):
            with temporary_settings(model, mode=mode), torch.inference_mode():
                calls[0] = 0
                out = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
                prefill = calls[0]
                calls[0] = 0
                model(input_ids=ids[:, 5:], attention_mask=mask, use_cache=True, **{CACHE_KEY: getattr(out, CACHE_KEY)})
            assert prefill == floors["prefill" if mode == "gate" else "prefill_augment"] * len(layers), mode
            assert calls[0] == floors[f"decode_{mode}"] * len(layers), mode
    finally:
        for hook in hooks:
            hook.remove()


def test_position_rows_come_from_the_graph():
    assert OrtDecoder._position_rows(["batch", "seq"]) is None
    assert OrtDecoder._position_rows([3, "batch", "seq"]) == 3 and OrtDecoder._position_rows([4, "b", "s"]) == 4
    with pytest.raises(ValueError, match="position_ids"):
        OrtDecoder._position_rows(["rows", "batch", "seq"])


def test_only_the_qwen_adapter_has_multimodal_state_to_forget():
    from tiny_models import build_llava

    qwen = patch_model(build_qwen2_vl(), SasaSettings(S, F))
    qwen.model.rope_deltas = torch.zeros(1, 1)
    qwen.sasa_forget_multimodal_state()
    assert qwen.model.rope_deltas is None
    llava = patch_model(build_llava(), SasaSettings(S, F))
    llava.sasa_forget_multimodal_state()  # nothing kept between calls: a no-op


@pytest.mark.parametrize("layers", [(30, 14, 14), (30, 12, 30), (30, -1, 3)])
def test_layer_floors_refuse_impossible_layers(layers):
    with pytest.raises(ValueError):
        layer_floors(*layers)


def test_bench_token_ids_avoid_image_placeholders(patched):
    ids = bench_token_ids(patched.config, 3, 50, 10)
    assert ids.shape == (3, 60)
    assert token_ceiling(patched.config) == IMAGE_TOKEN
    assert int(ids.max()) < IMAGE_TOKEN and int(ids.min()) >= 0
    assert torch.equal(ids, bench_token_ids(patched.config, 3, 50, 10))


# ----- the unpatched ONNX baseline ----------------------------------------------------------------
def test_unpatched_decoder_graph_equals_the_unpatched_model(baseline_graph):
    """probe=False: the graph's logits are the unpatched model's, prefill and decode; no probe anywhere."""
    unpatched = build_qwen2_vl()
    decoder = OrtDecoder(baseline_graph, ["CPUExecutionProvider"])
    ids = bench_token_ids(unpatched.config, 2, 7, 2)
    mask = np.ones(ids.shape, np.int64)
    with torch.inference_mode():
        embeds = unpatched.get_input_embeddings()(ids).numpy()
        reference = unpatched(input_ids=ids[:, :7], attention_mask=torch.from_numpy(mask[:, :7]),
                              use_cache=True, **{CACHE_KEY: DynamicCache(config=unpatched.config)})
        outputs = decoder.step(embeds[:, :7], mask[:, :7], decoder.empty_past(2))
        assert np.abs(outputs[0].numpy() - reference.logits.numpy()).max() <= LOGITS_TOLERANCE
        assert outputs[1].numpy().tolist() == [UNSAFE_PROB_NOT_COMPUTED] * 2
        cache = getattr(reference, CACHE_KEY)
        for position in (7, 8):
            reference = unpatched(input_ids=ids[:, position:position + 1],
                                  attention_mask=torch.from_numpy(mask[:, :position + 1]), use_cache=True,
                                  **{CACHE_KEY: cache})
            outputs = decoder.step(embeds[:, position:position + 1], mask[:, :position + 1], outputs[2:])
            assert np.abs(outputs[0].numpy() - reference.logits.numpy()).max() <= LOGITS_TOLERANCE
            assert outputs[1].numpy().tolist() == [UNSAFE_PROB_NOT_COMPUTED] * 2
    graph = onnx.load(str(baseline_graph), load_external_data=False)
    assert "If" not in {node.op_type for node in graph.graph.node}


def test_unpatched_decoder_needs_gate_mode():
    model = patch_model(build_qwen2_vl(), SasaSettings(S, F, mode="augment"))
    with pytest.raises(ValueError, match="gate mode"):
        DecoderGraph(model, probe=False)


# ----- the measures -------------------------------------------------------------------------------
@pytest.mark.slow  # two decoder exports: about a minute on 2 cores
def test_runtime_reports(patched, baseline_graph, tmp_path):
    """Both runtimes, one repeat: every measure present, finite and positive; the ONNX graphs exported or reused."""
    ids = bench_token_ids(patched.config, 2, 6, 3)
    floors = layer_floors(6, S, F)
    # What an earlier image prompt of batch 3 leaves on the base module; the text-only baseline must not use it.
    patched.model.rope_deltas = torch.zeros(3, 1, dtype=torch.long)
    pytorch = bench_pytorch(patched, ids, 6, repeats=1, warmup=0)
    check_runtime_report(pytorch, floors, 1)
    assert patched.sasa.mode == "gate"  # the timing restored the serving mode
    ort_report = bench_onnxruntime(patched, ids, 6, tmp_path, repeats=1, warmup=0, reuse={"baseline": baseline_graph})
    check_runtime_report(ort_report, floors, 1)
    runtime = ort_report["runtime"]
    assert runtime["providers"] == ["CPUExecutionProvider"] and runtime["reused_graphs"] == ["baseline"]
    assert sorted(runtime["export_seconds"]) == ["augment", "gate"]
    assert sorted(path.name for path in tmp_path.glob("*.onnx")) == ["decoder_augment.onnx", "decoder_gate.onnx"]
    table = latency_lines({"runtimes": {"pytorch": pytorch, "onnxruntime": ort_report}})
    assert "pytorch base ms" in table[0] and "ort CPU base ms" in table[0]
    assert len(table) == 1 + len(MEASURES)


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = bench_cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def test_cli_json_schema(capsys, tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, _ = run_main(capsys, ["--model", str(tiny_dir), "--runtimes", "pytorch", "--skip-patch-timing",
                                        "--prompt-tokens", "8", "--decode-tokens", "2", "--repeats", "1",
                                        "--warmup", "0", "--threads", "1", "--json", str(out),
                                        "--markdown", str(tmp_path / "bench.md")])
    assert code == 0
    report = json.loads(out.read_text())
    markdown = (tmp_path / "bench.md").read_text().splitlines()
    table = [line for line in markdown if line.startswith("| ")]
    assert table[0].startswith("| measure | floor | pytorch base ms |") and table[1].startswith("| --- |")
    assert len(table) == 2 + len(MEASURES)
    assert {"model", "device", "dtype", "layers", "inputs", "runtimes", "patch_seconds", "patch",
            "peak_rss_over_weights", "memory", "machine", "versions", "wall_seconds"} <= report.keys()
    assert report["layers"] == {"num_layers": 6, "safety_layer": 2, "semantic_layer": 4, "chosen_by": "default rule",
                                "probe_features": "projected-logits"}
    assert report["inputs"]["prompt_tokens"] == 8 and report["inputs"]["repeats"] == 1
    assert list(report["runtimes"]) == ["pytorch"]
    check_runtime_report(report["runtimes"]["pytorch"], layer_floors(6, 2, 4), 1)
    assert report["patch_seconds"] is None and report["patch"] is None
    assert is_finite_positive(report["peak_rss_over_weights"])
    assert report["memory"]["weight_bytes"] > 0
    assert "prefill, gate" in stdout and "decode per token, augment" in stdout
    assert "(no spread: 1 repeat)" in table[2]  # one repeat: no spread to judge the floor against
    assert "- pytorch: variants interleaved repeat by repeat" in markdown


def test_cli_patch_timing(capsys, tiny_dir, tmp_path):
    """Patch timing on a tiny calibration subsample (bfloat16: PyTorch only, so no ONNX artifact to export)."""
    out = tmp_path / "bench.json"
    code, stdout, _ = run_main(capsys, ["--model", str(tiny_dir), "--runtimes", "pytorch", "--dtype", "bfloat16",
                                        "--calibration-prompts", "32", "--prompt-tokens", "8", "--decode-tokens",
                                        "2", "--repeats", "1", "--warmup", "0", "--threads", "1", "--semantic-pairs",
                                        "4", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    seconds = report["patch_seconds"]
    parts = ("load", "patch", "calibration_forward", "fit", "export", "other")
    for name in (*parts, "localisation", "features", "export_safetensors", "total"):
        assert isinstance(seconds[name], float) and math.isfinite(seconds[name]), name
    assert seconds["other"] >= 0  # the named parts are sub-intervals of the total
    assert seconds["calibration_forward"] == pytest.approx(seconds["localisation"] + seconds["features"])
    assert 0 < seconds["forward_passes"] < seconds["calibration_forward"] < seconds["calibrate"]
    patch = report["patch"]
    assert patch["calibration_prompts"] == 32 and patch["subsample"] and patch["formats"] == ["safetensors"]
    assert 0 < patch["forward_share"] < 1
    assert patch["calibration_over_forward"] == pytest.approx(seconds["calibrate"] / seconds["forward_passes"])
    assert report["layers"]["chosen_by"] == "calibration"
    assert "32-prompt subsample" in stdout


@pytest.mark.parametrize("argv,message", [
    (["--runtimes", "tensorrt"], "--runtimes"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--calibration-prompts", "30"], "at least 32"),
    (["--dtype", "bfloat16"], "float32"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--json", "/no/such/dir/bench.json"], "does not exist"),
    (["--model", "no-such-alias"], "unknown model alias"),
    (["--layers", "3,3"], "must come before"),
    (["--layers", "1,6"], "does not exist"),
    (["--prompt-tokens", "600"], "positions"),
    (["--model", "shape:qwen-vl"], "--allow-random-calibration"),
    (["--semantic-pairs", "1"], "--semantic-pairs"),
])
def test_bad_input_exits_2_with_one_line(capsys, tiny_dir, argv, message):
    if "--model" not in argv:
        argv = ["--model", str(tiny_dir), *argv]
    code, stdout, err = run_main(capsys, argv)
    assert code == 2 and stdout == ""
    assert message in err and len(err.splitlines()) == 1, err


def test_real_process_exit_code(tmp_path):
    """The script as users run it, from another directory: imports resolve, bad input exits 2."""
    result = subprocess.run([sys.executable, str(SCRIPT), "--runtimes", "nope"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --runtimes") and len(result.stderr.strip().splitlines()) == 1


# ----- noise: paired ratios, their spread, the verdict (synthetic samples, no model) ----------------
def synthetic_samples(baseline_ms: list[float], patched_ms: list[float]) -> dict:
    """Every patched variant timed `patched_ms`, the baseline `baseline_ms`, in both phases (seconds)."""
    def phases(values: list[float]) -> dict[str, list[float]]:
        return {"prefill": [value / 1e3 for value in values], "decode": [value / 1e3 for value in values]}

    return {"baseline": phases(baseline_ms), **{variant: phases(patched_ms) for variant in VARIANTS[1:]}}


def uniform_floors(value: float) -> dict[str, float]:
    return dict.fromkeys(MEASURES, value)


# Paired ratios 1.30, 1.35, 1.40, 1.45, 1.50: IQR 1.35-1.45.
BASE_MS = [100.0] * 5
SPREAD_MS = [130.0, 135.0, 140.0, 145.0, 150.0]


@pytest.mark.parametrize("floor,expected", [(1.40, INSIDE), (1.35, INSIDE), (1.45, INSIDE), (1.20, ABOVE),
                                            (1.34, ABOVE), (1.60, BELOW), (1.46, BELOW)])
def test_verdict_is_the_floor_against_the_paired_iqr(floor, expected):
    report = compare(synthetic_samples(BASE_MS, SPREAD_MS), uniform_floors(floor))
    for measure in MEASURES:
        entry = report[measure]
        assert entry["spread_statistic"] == "iqr"
        assert (entry["ratio_low"], entry["ratio_high"]) == pytest.approx((1.35, 1.45))
        assert entry["ratio"] == pytest.approx(1.40) and entry["verdict"] == expected, (floor, entry)


def test_the_spread_is_of_paired_ratios_not_of_each_variant():
    """The machine slows down 5x over the run and the patch costs exactly 1.5x in every repeat: the paired
    ratios are all 1.5, so a floor of 1.4 is clearly below them, although each variant's own samples spread
    widely (their quartiles crossed over, 300/400 to 450/200, would put 1.4 inside)."""
    baseline = [100.0, 200.0, 300.0, 400.0, 500.0]
    patched = [1.5 * value for value in baseline]
    entry = compare(synthetic_samples(baseline, patched), uniform_floors(1.4))["prefill"]
    assert entry["paired_ratios"] == pytest.approx([1.5] * 5)
    assert (entry["ratio_low"], entry["ratio_high"]) == pytest.approx((1.5, 1.5))
    assert entry["verdict"] == ABOVE
    assert entry["baseline_spread"] == pytest.approx((400 - 200) / 300)  # the baseline's own spread stays visible
    # Pairing is by repeat: the same samples in another order pair differently.
    shuffled = compare(synthetic_samples(baseline, patched[::-1]), uniform_floors(1.4))["prefill"]
    assert shuffled["paired_ratios"][0] == pytest.approx(7.5) and shuffled["verdict"] == INSIDE


def test_iqr_uses_percentiles_and_few_repeats_use_min_max():
    four = compare(synthetic_samples([100.0] * 4, [100.0, 110.0, 120.0, 130.0]), uniform_floors(1.0))["decode_gate"]
    assert four["spread_statistic"] == "iqr"
    assert (four["ratio_low"], four["ratio_high"]) == pytest.approx((1.075, 1.225))
    assert four["verdict"] == ABOVE
    three = compare(synthetic_samples([100.0, 80.0, 120.0], [110.0, 100.0, 120.0]), uniform_floors(1.1))["prefill"]
    assert three["spread_statistic"] == "min-max"
    assert (three["ratio_low"], three["ratio_high"]) == pytest.approx((1.0, 1.25))
    assert three["verdict"] == INSIDE
    assert three["baseline_spread"] == pytest.approx((120 - 80) / 100)
    one = compare(synthetic_samples([100.0], [150.0]), uniform_floors(1.0))["prefill"]
    assert one["verdict"] == NO_SPREAD and one["ratio_low"] == one["ratio_high"] == pytest.approx(1.5)


def synthetic_report(runtimes: dict) -> dict:
    """A whole bench report around synthetic latency results, as `format_report` and `format_markdown` read it."""
    return {"model": "tiny", "device": "cpu", "dtype": "float32", "wall_seconds": 1.0,
            "layers": {"num_layers": 6, "safety_layer": S, "semantic_layer": F, "chosen_by": "user",
                       "probe_features": "projected-logits"},
            "inputs": {"batch_size": 1, "prompt_tokens": 8, "decode_tokens": 2, "repeats": 5, "warmup": 1,
                       "threads": 1},
            "runtimes": runtimes, "patch_seconds": None, "patch": None, "peak_rss_over_weights": 2.0,
            "memory": {"weight_bytes": 2**30, "patch_stage": {"peak_rss": 2**31}, "patch_stage_covers": "load, patch"},
            "machine": {"cpu_count": 2, "load_average_at_start": 0.0}}


def test_report_shows_the_ratio_with_its_iqr_and_verdict():
    inside = compare(synthetic_samples(BASE_MS, SPREAD_MS), uniform_floors(1.4))
    inside["runtime"] = {"interleaved": True, "schedule": "variants interleaved repeat by repeat"}
    above = compare(synthetic_samples([100.0, 100.0, 100.0], [150.0, 152.0, 155.0]), uniform_floors(1.4))
    above["runtime"] = {"providers": ["CPUExecutionProvider"], "interleaved": False,
                        "schedule": "one variant after the other (one session load each); one session alive at a time"}
    report = synthetic_report({"pytorch": inside, "onnxruntime": above})
    rows = latency_lines(report)
    assert "1.400x (paired 1.400, IQR 1.350-1.450; floor 1.400: inside the noise)" in rows[1]
    assert "1.520x (paired 1.520, range 1.500-1.550; floor 1.400: above the floor)" in rows[1]
    assert "100.0 (IQR 0.0%)" in rows[1]
    text = format_report(report)
    markdown = format_markdown(report)
    for output in (text, markdown):
        assert "1.400x (paired 1.400, IQR 1.350-1.450; floor 1.400: inside the noise)" in output
        assert "onnxruntime: one variant after the other" in output and "inside the noise = the floor" in output
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 2 + len(MEASURES) and all(line.count(" | ") == table[0].count(" | ") for line in table)
    # The ratio of the medians and the paired median part ways: the cell shows both.
    apart = compare(synthetic_samples([100.0, 200.0, 300.0, 400.0, 500.0], [110.0, 220.0, 600.0, 800.0, 550.0]),
                    uniform_floors(1.0))
    apart["runtime"] = {"schedule": "variants interleaved repeat by repeat"}
    row = latency_lines(synthetic_report({"pytorch": apart}))[1]
    assert "1.833x (paired 1.100, IQR 1.100-2.000; floor 1.000: above the floor)" in row


# ----- ONNX Runtime schedule: rounds, one session alive at a time (fake sessions, no export) ---------
class FakeSession:
    """Stands in for an ONNX Runtime session: counts the live ones and logs what happens."""

    alive = 0
    most_alive = 0
    events: list = []

    def __init__(self, variant: str):
        FakeSession.alive += 1
        FakeSession.most_alive = max(FakeSession.most_alive, FakeSession.alive)
        self.variant = variant
        FakeSession.events.append(("load", variant))

    def __del__(self):
        FakeSession.alive -= 1

    @classmethod
    def reset(cls):
        cls.alive, cls.most_alive, cls.events = 0, 0, []


@pytest.fixture
def fake_sessions():
    FakeSession.reset()
    yield FakeSession
    FakeSession.reset()


def open_fake(variant: str):
    import contextlib

    @contextlib.contextmanager
    def opened():
        session = FakeSession(variant)
        clock = iter(range(1, 1000))

        def run(session=session):  # the runner holds its session, as `ort_runner` holds its decoder
            FakeSession.events.append(("run", session.variant))
            return float(next(clock)), 0.5

        try:
            yield run
        finally:
            del session

    return opened()


@pytest.mark.parametrize("repeats,rounds,sizes", [(5, 5, [1] * 5), (5, 3, [2, 2, 1]), (7, 5, [2, 2, 1, 1, 1]),
                                                  (2, 5, [1, 1]), (5, 1, [5])])
def test_round_sizes(repeats, rounds, sizes):
    assert round_sizes(repeats, rounds) == sizes


def test_rounds_interleave_variants_with_one_session_alive(fake_sessions):
    samples, loads = time_rounds(open_fake, VARIANTS, repeats=5, warmup=1, rounds=3, advance=lambda: None)
    assert fake_sessions.most_alive == 1 and fake_sessions.alive == 0
    loaded = [variant for event, variant in fake_sessions.events if event == "load"]
    # three rounds, the order rotated by one each round
    assert loaded == ["baseline", "gate", "augment", "gate", "augment", "baseline", "augment", "baseline", "gate"]
    assert all(len(seconds) == 3 for seconds in loads.values())
    # per load: one warm-up (clock 1, dropped) then the round's share, so repeat i of each variant is in one round
    for variant in VARIANTS:
        assert samples[variant]["prefill"] == [2.0, 3.0, 2.0, 3.0, 2.0]
        assert samples[variant]["decode"] == [0.5] * 5
    runs = [variant for event, variant in fake_sessions.events if event == "run"]
    assert len(runs) == 3 * 3 + 3 * 5  # warm-ups per load + timed repeats


def test_a_kept_runner_would_hold_two_sessions(fake_sessions):
    """The check above can fail: a schedule that keeps the runners alive holds every session at once."""
    kept = []
    for variant in VARIANTS:
        with open_fake(variant) as runner:
            kept.append(runner)
    assert fake_sessions.most_alive == len(VARIANTS)


def test_bench_onnxruntime_runs_in_rounds(patched, fake_sessions, monkeypatch, tmp_path):
    """The ONNX Runtime bench's schedule with the export and the sessions faked: rounds, one session at a time,
    and a report that says how it ran."""
    class FakeDecoder(FakeSession):
        def __init__(self, path, providers, threads):
            super().__init__(Path(path).stem.removeprefix("decoder_"))

        def empty_past(self, batch):
            return []

        def step(self, embeds, attention_mask, past):
            FakeSession.events.append(("step", self.variant))
            return [None, None]

    monkeypatch.setattr(latency, "export_decoders", lambda model, out_dir, reuse, log: (
        {variant: tmp_path / f"decoder_{variant}.onnx" for variant in VARIANTS}, {}))
    monkeypatch.setattr(latency, "OrtDecoder", FakeDecoder)
    ids = bench_token_ids(patched.config, 1, 4, 2)
    report = bench_onnxruntime(patched, ids, 4, tmp_path, repeats=4, warmup=1)
    assert fake_sessions.most_alive == 1 and fake_sessions.alive == 0
    check_runtime_report(report, model_floors(patched), 4)
    runtime = report["runtime"]
    assert runtime["interleaved"] is True and runtime["rounds"] == 4
    assert "4 rounds" in runtime["schedule"] and "one session alive at a time" in runtime["schedule"]
    assert all(len(seconds) == 4 for seconds in runtime["session_load_seconds"].values())
    loaded = [variant for event, variant in fake_sessions.events if event == "load"]
    assert loaded[:4] == ["baseline", "gate", "augment", "gate"]
    single = bench_onnxruntime(patched, ids, 4, tmp_path, repeats=4, warmup=0, rounds=1)["runtime"]
    assert single["interleaved"] is False and single["rounds"] == 1
    assert "one variant after the other" in single["schedule"]
