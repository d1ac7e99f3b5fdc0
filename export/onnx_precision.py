"""Precisions of the ONNX artifact: the exported float32 graphs converted to `fp16` or `int4`, on files only.

    fp32   the export as it is (the reference; parity against PyTorch in parity.json)
    int4   weight-only int4: every MatMul with a constant weight (decoder, lm_head, vision tower)
           becomes ONNX Runtime's `com.microsoft::MatMulNBits` through ONNX Runtime's own quantizer
           (`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`, symmetric,
           block 32 by default). Activations stay float32. For CPU and GPU.
    fp16   float16 weights and activations through ONNX Runtime's converter
           (`onnxruntime.transformers.float16.convert_float_to_float16`, keep_io_types: every graph
           input and output stays float32, so the runtime and GenAI feed the same tensors). For CUDA;
           ONNX Runtime's CPU provider runs it too, by casting each node without a float16 kernel
           back to float32 (slow: measured, not for serving).

What stays float32 in every precision (the issue's rule: the probe head, the projection and the
threshold comparison): found in the exported decoder by structure, not by guessed names:

- the probe head: every node that reads a `sasa_probe.linear.*` initialiser, and every node after it up
  to the graph output (Gemm/MatMul, Add, Sigmoid, Squeeze: the value that becomes `unsafe_prob`);
- the projection: each `Div` whose numerator is a `ReduceSum` (alpha = <H_s, W H_f> / (<W H_f, W H_f>
  + eps)), its ReduceSums, their Muls, the eps Add, the semantic map W (the MatMul with a constant
  weight feeding those Muls) and the Mul alpha * W H_f;
- `unsafe_prob` itself: the decoder's probe `If` keeps that output float32 in both branches;
- the gate's threshold comparison (`unsafe_prob > threshold`, the node reading `unsafe_prob` in the
  decoder graph); the gate's state and forced logits after it hold small integers and 0 / -1e4, exact
  in float16.

int4 leaves these nodes out of the quantizer (`nodes_to_exclude`); fp16 passes them as the
converter's `node_block_list`, then repairs what the converter does not do for nodes inside an `If`
branch (`_repair_fp16`): it places each Cast it added in the graph that uses it, removes the
float32 -> float16 -> float32 round trips it puts between two kept nodes, and keeps the `If`
output `unsafe_prob` float32.

The converted graphs keep the file names, so `genai_config.json` and `sasa_onnx.json` load them
unchanged; `sasa_onnx.json` records `precision` (GenAI takes every dtype from the graphs). The
conversion loads one graph at a time (peak memory about one graph) and needs no torch.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sasa_patcher.export.onnx_float32 import (
    kept_float32_nodes,
    name_unnamed_nodes,
    subgraphs,
    uses,
    walk_graphs,
)
from sasa_patcher.export.onnx_names import CONFIG_NAME, PARITY_NAME

PRECISIONS = ("fp32", "fp16", "int4")
INT4_BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
PRECISION_NAME = "precision.json"  # the conversion's record next to the converted graphs
ADDED_CAST_SUFFIXES = ("_cast_to_fp32_node", "_cast_to_fp16_node")
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types (kept here so this module imports onnx lazily)
Log = Callable[[str], None]


class PrecisionError(ValueError):
    """A precision that cannot be made from this input (unknown name, not an fp32 artifact)."""


def check_precision(precision: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    if precision not in PRECISIONS:
        raise PrecisionError(f"--onnx-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if block_size not in INT4_BLOCK_SIZES:
        raise PrecisionError(f"the int4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, "
                             f"got {block_size}")


# ----- int4 ----------------------------------------------------------------------------------------------------
def quantize_int4(model, block_size: int = DEFAULT_BLOCK_SIZE, exclude: Iterable[str] = ()):
    """MatMulNBits (4 bits, symmetric, `block_size`) on every constant-weight MatMul outside `exclude`.

    The exporter stores each weight as the MatMul reads it (`export.onnx_transposes`), so the quantizer
    sees every weight as an initialiser (artifacts exported before that kept a runtime Transpose on the
    layers the projected stream reads again: re-export them).
    """
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:  # ONNX Runtime before 1.20 names it after 4 bits only
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer as MatMulNBitsQuantizer

    import logging

    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level, quiet.level = quiet.level, logging.WARNING  # it logs every node it skips at INFO
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True,
                                         nodes_to_exclude=list(exclude))
        quantizer.process()
    finally:
        quiet.level = level
    model = quantizer.model.model
    # A weight read by two MatMuls (main graph and the probe branch) is quantized once per MatMul into the
    # same names: keep one copy of each.
    for graph in walk_graphs(model.graph):
        unique = list({init.name: init for init in graph.initializer}.values())
        if len(unique) != len(graph.initializer):
            graph.ClearField("initializer")
            graph.initializer.extend(unique)
    return model


# ----- fp16 ----------------------------------------------------------------------------------------------------
def convert_fp16(model, keep: Iterable[str] = ()):
    """float16 with float32 inputs/outputs; `keep` (node names, nested graphs included) stays float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = set(keep)
    # Shape inference on the structure only (the weights are still external references), so value_info
    # types every intermediate value and the converter knows where Casts go; then the weights are read.
    converted = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         node_block_list=sorted(keep))
    _repair_fp16(converted)
    return converted


def _added_cast(node) -> bool:
    return node.op_type == "Cast" and node.name.endswith(ADDED_CAST_SUFFIXES)


def _cast_to(node) -> int:
    return next(attribute.i for attribute in node.attribute if attribute.name == "to")


def _repair_fp16(model) -> None:
    """What `convert_float_to_float16` leaves wrong when kept nodes sit inside an `If` branch.

    1. It appends every Cast it adds to the main graph, also those that read or feed values of a
       branch: each goes to the graph of the nodes that use it, just before the first of them.
    2. Between two kept nodes it puts float32 -> float16 -> float32: the pair is removed, so the
       kept region computes in float32 end to end.
    3. A kept value that leaves an `If` branch (`unsafe_prob`) is cast to float16 and back: the
       branch outputs stay float32, and so does the `If` output and the graph output.
    """
    main = model.graph
    added = [node for node in main.node if _added_cast(node)]
    for node in added:
        main.node.remove(node)

    # 2. round trips: Cast(fp16 <- x32) feeding Cast(fp32): readers of the second read x32 directly
    by_input: dict[str, list] = {}
    for node in added:
        by_input.setdefault(node.input[0], []).append(node)
    rename: dict[str, str] = {}
    for node in added:
        if _cast_to(node) == FLOAT16:
            for back in by_input.get(node.output[0], []):
                if _cast_to(back) == FLOAT:
                    rename[back.output[0]] = node.input[0]
    added = [node for node in added if node.output[0] not in rename]
    for graph in walk_graphs(main):
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name in rename:
                    node.input[index] = rename[name]

    # 3. unsafe_prob: If outputs produced in every branch by an added Cast to float16 of a kept node's value
    for node in list(main.node):
        if node.op_type != "If":
            continue
        branches = subgraphs(node)
        for position, out in enumerate(node.output):
            casts = []
            for branch in branches:
                name = branch.output[position].name
                cast = next((c for c in added if c.output[0] == name and _cast_to(c) == FLOAT16), None)
                casts.append(cast)
            if any(cast is None for cast in casts):
                continue
            for branch, cast in zip(branches, casts, strict=True):
                branch.output[position].name = cast.input[0]
                branch.output[position].type.tensor_type.elem_type = FLOAT
                added.remove(cast)
            for info in main.value_info:
                if info.name == out:
                    info.type.tensor_type.elem_type = FLOAT
            # the converter's graph-output Cast (fp16 -> fp32) after the If becomes a rename
            for cast in [c for c in main.node if c.op_type == "Cast" and c.input[0] == out]:
                if cast.name.startswith("graph_output_cast") and cast.output[0] in {o.name for o in main.output}:
                    main.node.remove(cast)
                    node.output[position] = cast.output[0]
                    # the gate's comparison reads it too (directly, or through a Cast added for it)
                    for reader in [*added, *(n for graph in walk_graphs(main) for n in graph.node)]:
                        reader.input[:] = [cast.output[0] if name == out else name for name in reader.input]

    # 1. each remaining added Cast into the graph whose nodes read its output, before the first reader
    graphs = list(walk_graphs(main))
    for cast in added:
        reading = [graph for graph in graphs if any(cast.output[0] in reader.input for reader in graph.node)
                   or cast.output[0] in {value.name for value in graph.output}]
        if not reading:  # only kept nodes read it, and they now read the float32 value
            continue
        target = reading[0] if len(reading) == 1 else main  # readers in several graphs: the main one sees all
        readers = [index for index, reader in enumerate(target.node) if cast.output[0] in uses(reader)]
        producers = [index for index, node in enumerate(target.node) if cast.input[0] in node.output]
        position = min(readers) if readers else len(target.node)
        if producers and producers[0] >= position:  # read before it is made: after its producer
            position = producers[0] + 1
        target.node.insert(position, cast)


# ----- files ---------------------------------------------------------------------------------------------------
def graph_files(onnx_dir: Path) -> list[Path]:
    return sorted(onnx_dir.glob("*.onnx"))


def _data_files(model) -> set[str]:
    """The external data files a loaded (structure only) graph points to."""
    from onnx.external_data_helper import uses_external_data

    locations = set()
    for graph in walk_graphs(model.graph):
        for init in graph.initializer:
            if uses_external_data(init):
                locations.update(entry.value for entry in init.external_data if entry.key == "location")
    return locations


def _save(model, path: Path) -> None:
    import onnx

    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)


def convert_graph(source: Path, target: Path, precision: str, block_size: int = DEFAULT_BLOCK_SIZE) -> dict[str, Any]:
    """One graph file (+ its external data) -> `target` in `precision`; what was kept float32 and done."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    name_unnamed_nodes(model)
    keep = kept_float32_nodes(model)
    kept = keep["probe"] + keep["projection"]
    if precision == "fp16":
        model = onnx.shape_inference.infer_shapes(model)  # structure only: the weights are not loaded yet
    onnx.load_external_data_for_model(model, str(source.parent))
    if precision == "int4":
        model = quantize_int4(model, block_size, exclude=kept)
    elif precision == "fp16":
        model = convert_fp16(model, keep=kept)
    _save(model, target)
    ops = [node.op_type for graph in walk_graphs(model.graph) for node in graph.node]
    del model
    return {"kept_float32": keep, "matmul_nbits": ops.count("MatMulNBits"), "matmul_float": ops.count("MatMul")}


def artifact_bytes(onnx_dir: Path) -> dict[str, int]:
    """Bytes of every graph file with its external data (what precision changes)."""
    return {path.name: path.stat().st_size for path in sorted(Path(onnx_dir).iterdir())
            if path.is_file() and (path.suffix == ".onnx" or path.name.endswith(".onnx.data"))}


def convert_onnx_dir(source, out, precision: str, *, block_size: int = DEFAULT_BLOCK_SIZE,
                     log: Log | None = None) -> dict[str, Any]:
    """The float32 ONNX directory `source` converted into `out` (a new directory): graphs in `precision`,
    every other file copied, `sasa_onnx.json` with `precision`, the record in `precision.json`.

    `out` must not exist yet (the callers stage it and move it into place). Returns the record.
    """
    log = log or (lambda message: None)
    check_precision(precision, block_size)
    source, out = Path(source), Path(out)
    config_path = source / CONFIG_NAME
    if not config_path.is_file():
        raise PrecisionError(f"no {CONFIG_NAME} in {source}: not a SASA ONNX directory")
    config = json.loads(config_path.read_text())
    if config.get("precision", "fp32") != "fp32":
        raise PrecisionError(f"{source} is already {config['precision']}: convert the fp32 export")
    out.mkdir(parents=True)
    graphs = graph_files(source)
    data_files = set()
    record: dict[str, Any] = {"precision": precision, "graphs": {}}
    if precision == "int4":
        record["int4"] = {"quantizer": "onnxruntime MatMulNBitsQuantizer", "bits": 4, "block_size": block_size,
                          "symmetric": True, "activations": "float32"}
    if precision == "fp16":
        record["fp16"] = {"converter": "onnxruntime.transformers.float16.convert_float_to_float16",
                          "keep_io_types": True}
    started_all = time.perf_counter()
    for path in graphs:
        import onnx

        data_files |= _data_files(onnx.load(str(path), load_external_data=False))
        started = time.perf_counter()
        if precision == "fp32":
            shutil.copy2(path, out / path.name)
            entry: dict[str, Any] = {}
        else:
            entry = convert_graph(path, out / path.name, precision, block_size)
        entry["seconds"] = round(time.perf_counter() - started, 2)
        record["graphs"][path.name] = entry
        log(f"{path.name} -> {precision} in {entry['seconds']:.1f}s")
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix != ".onnx" and path.name not in data_files \
                and path.name not in (CONFIG_NAME, PARITY_NAME, PRECISION_NAME):
            shutil.copy2(path, out / path.name)
        elif precision == "fp32" and path.name in data_files:
            shutil.copy2(path, out / path.name)
    config["precision"] = precision
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    record["convert_seconds"] = round(time.perf_counter() - started_all, 2)
    record["file_bytes"] = {"fp32": artifact_bytes(source), precision: artifact_bytes(out)}
    record["total_bytes"] = {name: sum(sizes.values()) for name, sizes in record["file_bytes"].items()}
    (out / PRECISION_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return record
