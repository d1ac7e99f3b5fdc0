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
from sasa_patcher.evaluation.bench_report import latency_lines
from sasa_patcher.evaluation.latency import (
    MEASURES,
    OrtDecoder,
    bench_onnxruntime,
    bench_pytorch,
    bench_token_ids,
    layer_floors,
    model_floors,
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
    assert "runtime" in report


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


def test_cli_patch_timing(capsys, tiny_dir, tmp_path):
    """Patch timing on a tiny calibration subsample (bfloat16: PyTorch only, so no ONNX artifact to export)."""
    out = tmp_path / "bench.json"
    code, stdout, _ = run_main(capsys, ["--model", str(tiny_dir), "--runtimes", "pytorch", "--dtype", "bfloat16",
                                        "--calibration-prompts", "32", "--prompt-tokens", "8", "--decode-tokens",
                                        "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                        "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    seconds = report["patch_seconds"]
    parts = ("load", "patch", "calibration_forward", "fit", "export", "other")
    for name in (*parts, "localisation", "features", "export_safetensors", "total"):
        assert isinstance(seconds[name], float) and math.isfinite(seconds[name]), name
    assert seconds["other"] >= 0  # the named parts are sub-intervals of the total
    assert seconds["calibration_forward"] == pytest.approx(seconds["localisation"] + seconds["features"])
    patch = report["patch"]
    assert patch["calibration_prompts"] == 32 and patch["subsample"] and patch["formats"] == ["safetensors"]
    assert 0 < patch["forward_share"] < 1
    assert report["layers"]["chosen_by"] == "calibration"
    assert "32-prompt subsample" in stdout


@pytest.mark.parametrize("argv,message", [
    (["--runtimes", "tensorrt"], "--runtimes"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--calibration-prompts", "30"], "multiple of 4"),
    (["--dtype", "bfloat16"], "float32"),
    (["--dtype", "float8"], "unknown dtype"),
    (["--json", "/no/such/dir/bench.json"], "does not exist"),
    (["--model", "no-such-alias"], "unknown model alias"),
    (["--layers", "3,3"], "must come before"),
    (["--layers", "1,6"], "does not exist"),
    (["--prompt-tokens", "600"], "positions"),
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
