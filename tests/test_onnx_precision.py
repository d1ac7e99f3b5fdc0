"""Precisions of the ONNX artifact (export/onnx_precision.py, the quantize CLI, --onnx-precision).

One tiny Qwen2-VL export (gate mode, a random probe so unsafe_prob is away from 0 and 1), converted
to int4 and fp16. Tolerances, against the fp32 graphs on token-id prompts:
- int4 (block 32, symmetric, on random tiny weights: the worst case for 4 bits): unsafe_prob within
  0.15, last-position logits within 25% of the largest |logit|.
- fp16: unsafe_prob within 1e-3 (the probe and the projection run in float32), greedy tokens identical.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_onnx_export import REFUSAL, TINY_IMAGE_SIZE, tiny_cases, tiny_patched

from sasa_patcher.cli import patch as patch_cli
from sasa_patcher.cli import quantize_onnx
from sasa_patcher.export.onnx_export import export_onnx
from sasa_patcher.export.onnx_float32 import kept_float32_nodes
from sasa_patcher.export.onnx_names import CONFIG_NAME, DECODER_FILE, PARITY_NAME
from sasa_patcher.export.onnx_precision import PRECISION_NAME, PrecisionError, convert_onnx_dir
from sasa_patcher.export.onnx_precision_parity import compare_runs, default_cases, replace_with_precision, run_cases
from tiny_calibration import tiny_processor

INT4_PROB_TOLERANCE = 0.15
INT4_LOGITS_RELATIVE_TOLERANCE = 0.25
FP16_PROB_TOLERANCE = 1e-3
NEW_TOKENS = 6


def token_cases() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(10, 100, (1, length))} for length in (5, 9, 14)]


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)


def _nodes(model):
    return [node for graph in _graphs(model.graph) for node in graph.node]


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("precision-fp32") / "onnx"
    # with the tiny processor: the artifact has a tokenizer, so the precision step renders its prompts
    export_onnx(tiny_patched("qwen2_vl", "gate"), tiny_processor("qwen2_vl"), out,
                image_size=TINY_IMAGE_SIZE["qwen2_vl"], parity_cases=tiny_cases("qwen2_vl")[:1])
    return out


@pytest.fixture(scope="module")
def converted(fp32_dir, tmp_path_factory):
    """precision -> (directory, record), converted on first use."""
    cache = {}

    def get(precision: str):
        if precision not in cache:
            out = tmp_path_factory.mktemp(f"precision-{precision}") / "onnx"
            cache[precision] = out, convert_onnx_dir(fp32_dir, out, precision)
        return cache[precision]

    return get


@pytest.fixture(scope="module")
def fp32_run(fp32_dir):
    return run_cases(fp32_dir, token_cases(), NEW_TOKENS)


def test_kept_float32_nodes_are_the_probe_head_and_the_projection(fp32_dir):
    model = onnx.load(str(fp32_dir / DECODER_FILE), load_external_data=False)
    kept = kept_float32_nodes(model)
    by_name = {node.name: node for node in _nodes(model)}
    probe_ops = [by_name[name].op_type for name in kept["probe"]]
    assert any(any("sasa_probe" in name for name in by_name[n].input) for n in kept["probe"]), kept
    assert "Sigmoid" in probe_ops
    projection_ops = sorted(by_name[name].op_type for name in kept["projection"])
    assert projection_ops.count("Div") == 1 and projection_ops.count("ReduceSum") == 2, projection_ops
    assert "MatMul" in projection_ops  # the semantic map W


def test_int4_has_matmulnbits_and_stays_close_to_fp32(converted, fp32_run):
    out, record = converted("int4")
    model = onnx.load(str(out / DECODER_FILE))
    ops = [node.op_type for node in _nodes(model)]
    assert ops.count("MatMulNBits") >= 10 and record["graphs"][DECODER_FILE]["matmul_nbits"] == ops.count("MatMulNBits")
    kept = set(record["graphs"][DECODER_FILE]["kept_float32"]["probe"]
               + record["graphs"][DECODER_FILE]["kept_float32"]["projection"])
    assert all(node.op_type != "MatMulNBits" for node in _nodes(model) if node.name in kept)
    # the probe's and the semantic map's weights are float32 initialisers still
    floats = {init.name: init.data_type for graph in _graphs(model.graph) for init in graph.initializer}
    assert floats and all(dtype == onnx.TensorProto.FLOAT for name, dtype in floats.items() if "sasa_probe" in name)
    assert record["total_bytes"]["int4"] < 0.6 * record["total_bytes"]["fp32"], record["total_bytes"]
    assert json.loads((out / CONFIG_NAME).read_text())["precision"] == "int4"
    figures = compare_runs(fp32_run, run := run_cases(out, token_cases(), NEW_TOKENS))
    assert figures["unsafe_prob_max_abs_diff"] <= INT4_PROB_TOLERANCE, figures
    largest = max(float(np.abs(r["last_logits"]).max()) for r in fp32_run["results"])
    assert figures["last_logits_max_abs_diff"] <= INT4_LOGITS_RELATIVE_TOLERANCE * largest, (figures, largest)
    assert all(r["unsafe_prob"] != -1.0 for r in run["results"])


def test_fp16_weights_half_probe_and_projection_float32_io_float32(converted, fp32_run):
    out, record = converted("fp16")
    for path in sorted(out.glob("*.onnx")):
        model = onnx.load(str(path))
        for value in [*model.graph.input, *model.graph.output]:
            assert value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16, (path.name, value.name)
        if path.name != DECODER_FILE:
            continue
        kept = set(record["graphs"][path.name]["kept_float32"]["probe"]
                   + record["graphs"][path.name]["kept_float32"]["projection"])
        inits = {init.name: init for graph in _graphs(model.graph) for init in graph.initializer}
        kept_inputs = {name for node in _nodes(model) if node.name in kept for name in node.input}
        large = [init for init in inits.values() if int(np.prod(init.dims)) >= 64]
        assert sum(init.data_type == onnx.TensorProto.FLOAT16 for init in large) >= 0.9 * len(large)
        for name in kept_inputs & set(inits):
            if inits[name].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
                assert inits[name].data_type == onnx.TensorProto.FLOAT, name  # probe weight, semantic map, eps
        # no float16 value reaches a kept node: each of its float inputs is float32 or an int tensor
        producers = {out: node for node in _nodes(model) for out in node.output}
        for node in _nodes(model):
            if node.name in kept:
                for name in node.input:
                    source = producers.get(name)
                    assert not (source is not None and source.op_type == "Cast"
                                and source.attribute[0].i == onnx.TensorProto.FLOAT16), (node.name, name)
        # unsafe_prob: float32 out of both branches of the probe's If, and straight to the graph output
        probe_if = next(node for node in model.graph.node if node.op_type == "If")
        position = list(probe_if.output).index("unsafe_prob")
        for attribute in probe_if.attribute:
            assert attribute.g.output[position].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    figures = compare_runs(fp32_run, run_cases(out, token_cases(), NEW_TOKENS))
    assert figures["unsafe_prob_max_abs_diff"] <= FP16_PROB_TOLERANCE, figures
    assert figures["tokens_identical_cases"] == figures["cases"], figures


@pytest.mark.parametrize("precision", ["fp32", "int4", "fp16"])
def test_the_graph_gate_works_in_every_precision(converted, fp32_run, precision):
    """The decoder's own refusal after conversion: a prompt is answered with the refusal tokens (then end-of-sequence)
    exactly when its unsafe_prob passes the threshold, and fp16 keeps that comparison float32."""
    if precision == "fp32":
        run = fp32_run
    else:
        out, record = converted(precision)
        run = run_cases(out, token_cases(), NEW_TOKENS)
        model = onnx.load(str(out / DECODER_FILE), load_external_data=False)
        by_name = {node.name: node for node in _nodes(model)}
        kept = record["graphs"][DECODER_FILE]["kept_float32"]["probe"]
        # the gate's comparison (fp32: the Greater reading unsafe_prob) is kept float32 (fp16: no float16 reaches
        # a kept node, test_fp16_weights_half_probe_and_projection_float32_io_float32)
        assert any(by_name[name].op_type == "Greater" for name in kept if name in by_name), kept
    refusal = REFUSAL + [REFUSAL[-1]] * (NEW_TOKENS - len(REFUSAL))
    flags = [result["flagged"] for result in run["results"]]
    assert True in flags and (precision == "int4" or False in flags), run["results"]  # int4: probs move by < 0.15
    for result in run["results"]:
        assert (result["tokens"] == refusal) == result["flagged"], result


def test_replace_with_precision_compares_text_and_image_prompts_and_flags(fp32_dir, tmp_path):
    """The pipeline's convert-measure-swap step run for real: the comparison renders its prompts (one with an
    image) and flags them at the stored threshold, set in the widest gap between the fp32 probabilities so both
    sides occur; the flag agreement is what the two runs' probabilities give at that threshold."""
    import shutil

    cases = default_cases()
    assert any(image is not None for _, image in cases)
    probabilities = sorted(r["unsafe_prob"] for r in run_cases(fp32_dir, cases, NEW_TOKENS)["results"])
    threshold = max((high - low, (high + low) / 2) for low, high in zip(probabilities, probabilities[1:],
                                                                          strict=False))[1]
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(fp32_dir, onnx_dir)
    config = json.loads((onnx_dir / CONFIG_NAME).read_text())
    config["sasa"]["threshold"] = threshold
    (onnx_dir / CONFIG_NAME).write_text(json.dumps(config))
    record = replace_with_precision(onnx_dir, "int4")
    parity = json.loads((onnx_dir / PARITY_NAME).read_text())
    assert parity["precision"]["precision"] == "int4" and "parity" in parity  # the fp32 figures stay
    figures = record["parity"]
    assert "skipped" not in figures and figures["cases"] == len(cases), figures
    fp32, int4 = (np.array(figures["unsafe_prob"][name]) > threshold for name in ("fp32", "int4"))
    assert 0 < fp32.sum() < len(cases)  # flagged and unflagged prompts both occur
    assert figures["flagged"] == {"reference": int(fp32.sum()), "candidate": int(int4.sum())}
    assert figures["flag_agreement"] == pytest.approx(float((fp32 == int4).mean()))
    assert figures["unsafe_prob_max_abs_diff"] <= INT4_PROB_TOLERANCE, figures
    assert (onnx_dir / PRECISION_NAME).is_file() and not (tmp_path / "onnx.int4").exists()
    with pytest.raises(PrecisionError, match="already int4"):
        convert_onnx_dir(onnx_dir, tmp_path / "again", "int4")


def test_quantize_cli_bad_input_exit_2_one_line(fp32_dir, tmp_path, capsys):
    cases = [
        [str(fp32_dir), "--precision", "int8", "--out", str(tmp_path / "a")],
        [str(fp32_dir), "--precision", "fp32", "--out", str(tmp_path / "a")],
        [str(tmp_path / "missing"), "--precision", "int4", "--out", str(tmp_path / "a")],
        [str(fp32_dir), "--precision", "int4", "--block-size", "48", "--out", str(tmp_path / "a")],
        [str(fp32_dir), "--precision", "int4", "--out", str(fp32_dir / "inside")],
    ]
    for argv in cases:
        assert quantize_onnx.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), (argv, err)
    assert not (tmp_path / "a").exists()


def test_quantize_cli_writes_a_complete_directory(fp32_dir, tmp_path, capsys):
    out = tmp_path / "int4"
    assert quantize_onnx.main([str(fp32_dir.parent), "--precision", "int4", "--out", str(out), "--block-size",
                               "128"]) == 0
    assert "int4 graphs written" in capsys.readouterr().out
    record = json.loads((out / PRECISION_NAME).read_text())
    assert record["int4"]["block_size"] == 128
    assert sorted(p.name for p in out.glob("*.onnx")) == sorted(p.name for p in fp32_dir.glob("*.onnx"))
    assert quantize_onnx.main([str(fp32_dir), "--precision", "int4", "--out", str(out)]) == 2  # exists, no --force


def test_patch_cli_unknown_precision_exit_2_one_line(tmp_path, capsys):
    argv = ["--model", "smol-qwen-vl", "--out", str(tmp_path / "out"), "--calibration", "none"]
    assert patch_cli.main([*argv, "--onnx-precision", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--onnx-precision must be one of fp32, fp16, int4" in err[0], err
    assert patch_cli.main([*argv, "--onnx-precision", "int4", "--format", "safetensors"]) == 2
    assert "add onnx to --format" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

