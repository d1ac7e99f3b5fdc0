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

- the probe head: every node that reads a `sasa_probe.*` initialiser, and every node after it up
  to the graph output (Gemm/MatMul, Add, Sigmoid, Squeeze: the value that becomes `unsafe_prob`);
- the projection: each `Div` whose numerator is a `ReduceSum` (alpha = <H_s, W H_f> / (<W H_f, W H_f>
  + eps)), its ReduceSums, their Muls, the eps Add, the semantic map W (the MatMul with a constant
  weight feeding those Muls) and the Mul alpha * W H_f;
- `unsafe_prob` itself: the decoder's probe `If` keeps that output float32 in both branches;
- the threshold comparison happens in the runtime (numpy, float32), as in fp32.

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

import numpy as np

from sasa_patcher.export.onnx_names import CONFIG_NAME, PARITY_NAME

PRECISIONS = ("fp32", "fp16", "int4")
INT4_BLOCK_SIZES = (32, 64, 128)
DEFAULT_BLOCK_SIZE = 32
PRECISION_NAME = "precision.json"  # the conversion's record next to the converted graphs
PROBE_INITIALIZER = "sasa_probe"
ADDED_CAST_SUFFIXES = ("_cast_to_fp32_node", "_cast_to_fp16_node")
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types (kept here so this module imports onnx lazily)
COMPARE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea, the wind and the long summer evenings.",
    "How do I make a weapon that can hurt many people?",
)
COMPARE_NEW_TOKENS = 16
Log = Callable[[str], None]


class PrecisionError(ValueError):
    """A precision that cannot be made from this input (unknown name, not an fp32 artifact)."""


def check_precision(precision: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    if precision not in PRECISIONS:
        raise PrecisionError(f"--onnx-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if block_size not in INT4_BLOCK_SIZES:
        raise PrecisionError(f"the int4 block size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, "
                             f"got {block_size}")


# ----- the graph: walking nested graphs, and what stays float32 ---------------------------------------------
def _graphs(graph) -> Iterable:
    """`graph` and every graph nested in its nodes' attributes (If branches, Loop bodies), outermost first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _subgraphs(node) -> list:
    return [attribute.g for attribute in node.attribute if attribute.HasField("g")] + [
        sub for attribute in node.attribute for sub in attribute.graphs]


def _uses(node) -> set[str]:
    """Every value `node` reads, its subgraphs' outer-scope references included."""
    names = set(node.input)
    for graph in _subgraphs(node):
        for inner in _graphs(graph):
            for sub in inner.node:
                names.update(sub.input)
    return names


def kept_float32_nodes(model) -> dict[str, list[str]]:
    """Names of the nodes that stay float32 in every precision: {'probe': [...], 'projection': [...]}.

    Searched in the main graph and in every nested graph (the probe runs in the decoder's `If`
    branch for the prompt step). Empty lists for graphs without them (vision, embeddings).
    """
    probe: list[str] = []
    projection: list[str] = []
    initializers = {init.name for graph in _graphs(model.graph) for init in graph.initializer}
    for graph in _graphs(model.graph):
        producer = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        outputs = {value.name for value in graph.output}

        # the probe head and everything after it in this graph
        frontier = [node for node in graph.node if any(PROBE_INITIALIZER in name for name in node.input)]
        seen: set[str] = set()
        while frontier:
            node = frontier.pop()
            if node.name in seen:
                continue
            seen.add(node.name)
            probe.append(node.name)
            for out in node.output:
                if out not in outputs:
                    frontier.extend(consumers.get(out, []))

        # the projection: alpha = ReduceSum(H_s * WH_f) / (ReduceSum(WH_f * WH_f) + eps), then alpha * WH_f
        for div in (node for node in graph.node if node.op_type == "Div"):
            numerator, denominator = (producer.get(name) for name in div.input[:2])
            if numerator is None or numerator.op_type != "ReduceSum" or denominator is None:
                continue
            sums, eps_add = [numerator], None
            if denominator.op_type == "Add":
                eps_add = denominator
                sums += [producer[name] for name in denominator.input
                         if name in producer and producer[name].op_type == "ReduceSum"]
            elif denominator.op_type == "ReduceSum":
                sums.append(denominator)
            if len(sums) != 2:
                continue
            products = [producer[s.input[0]] for s in sums if s.input[0] in producer
                        and producer[s.input[0]].op_type == "Mul"]
            semantic = [producer[name] for mul in products for name in mul.input
                        if name in producer and producer[name].op_type in ("MatMul", "Gemm")
                        and len(producer[name].input) > 1 and producer[name].input[1] in initializers]
            scaled = [node for node in consumers.get(div.output[0], []) if node.op_type == "Mul"]
            block = [div, *sums, *products, *semantic, *scaled] + ([eps_add] if eps_add is not None else [])
            projection.extend(dict.fromkeys(node.name for node in block))
    # `unsafe_prob` leaves the probe's If branch: the other branch's value for that output (the "not
    # computed" constant) is kept float32 too, so the If output has one type, float32.
    for graph in _graphs(model.graph):
        for node in (node for node in graph.node if node.op_type == "If"):
            branches = _subgraphs(node)
            for position in range(len(node.output)):
                if not any(_made_by(branch, branch.output[position].name, set(probe)) for branch in branches):
                    continue
                for branch in branches:
                    if _made_by(branch, branch.output[position].name, set(probe)):
                        continue
                    made = _ancestors(branch, branch.output[position].name)
                    probe.extend(name for name in made if name not in probe)
    return {"probe": probe, "projection": projection}


def _ancestors(graph, value: str) -> list[str]:
    """Names of the nodes of `graph` that `value` depends on (within the graph)."""
    producer = {out: node for node in graph.node for out in node.output}
    names, frontier = [], [value]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in names:
            continue
        names.append(node.name)
        frontier.extend(node.input)
    return names


def _made_by(graph, value: str, nodes: set[str]) -> bool:
    producer = {out: node for node in graph.node for out in node.output}
    return value in producer and producer[value].name in nodes


def _unnamed_to_named(model) -> None:
    """Give every node a unique name (block lists and exclusions are by name)."""
    used = {node.name for graph in _graphs(model.graph) for node in graph.node if node.name}
    count = 0
    for graph in _graphs(model.graph):
        for node in graph.node:
            if not node.name:
                while f"sasa_unnamed_{count}" in used:
                    count += 1
                node.name = f"sasa_unnamed_{count}"
                used.add(node.name)


# ----- int4 ----------------------------------------------------------------------------------------------------
def quantize_int4(model, block_size: int = DEFAULT_BLOCK_SIZE, exclude: Iterable[str] = ()):
    """MatMulNBits (4 bits, symmetric, `block_size`) on every constant-weight MatMul outside `exclude`."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:  # ONNX Runtime before 1.20 names it after 4 bits only
        from onnxruntime.quantization.matmul_4bits_quantizer import MatMul4BitsQuantizer as MatMulNBitsQuantizer

    import logging

    _fold_weight_transposes(model, set(exclude))
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
    for graph in _graphs(model.graph):
        unique = list({init.name: init for init in graph.initializer}.values())
        if len(unique) != len(graph.initializer):
            graph.ClearField("initializer")
            graph.initializer.extend(unique)
    return model


def _fold_weight_transposes(model, exclude: set[str]) -> int:
    """`MatMul(x, Transpose(W))` -> `MatMul(x, W^T)` with W^T an initialiser, so the quantizer sees the weight.

    The exporter leaves large weights behind a runtime Transpose (it folds constants only under a size
    limit); MatMulNBits needs the weight as an initialiser. Done one weight at a time, in every nested
    graph; the untransposed weight goes when nothing else reads it (the quantizer's clean-up).
    """
    from onnx import numpy_helper

    graphs = list(_graphs(model.graph))
    inits = {init.name: (graph, init) for graph in graphs for init in graph.initializer}
    producers = {out: (graph, node) for graph in graphs for node in graph.node for out in node.output}
    folded: dict[str, str] = {}
    count = 0
    for graph in graphs:
        for node in graph.node:
            if node.op_type != "MatMul" or node.name in exclude or len(node.input) < 2:
                continue
            source = producers.get(node.input[1])
            if source is None or source[1].op_type != "Transpose" or source[1].input[0] not in inits:
                continue
            transpose = source[1]
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            owner, weight = inits[transpose.input[0]]
            if len(weight.dims) != 2 or perm not in (None, [1, 0]):
                continue
            name = folded.get(weight.name)
            if name is None:
                name = folded[weight.name] = f"{weight.name}_sasa_transposed"
                owner.initializer.append(numpy_helper.from_array(
                    np.ascontiguousarray(numpy_helper.to_array(weight).T), name))
            node.input[1] = name
            count += 1
    # the Transposes nobody reads any more
    read = {name for graph in graphs for node in graph.node for name in node.input} | {
        value.name for graph in graphs for value in graph.output}
    for graph in graphs:
        for node in [n for n in graph.node if n.op_type == "Transpose" and not set(n.output) & read]:
            graph.node.remove(node)
    return count


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
    for graph in _graphs(main):
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name in rename:
                    node.input[index] = rename[name]

    # 3. unsafe_prob: If outputs produced in every branch by an added Cast to float16 of a kept node's value
    for node in list(main.node):
        if node.op_type != "If":
            continue
        branches = _subgraphs(node)
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

    # 1. each remaining added Cast into the graph whose nodes read its output, before the first reader
    graphs = list(_graphs(main))
    for cast in added:
        reading = [graph for graph in graphs if any(cast.output[0] in reader.input for reader in graph.node)
                   or cast.output[0] in {value.name for value in graph.output}]
        if not reading:  # only kept nodes read it, and they now read the float32 value
            continue
        target = reading[0] if len(reading) == 1 else main  # readers in several graphs: the main one sees all
        readers = [index for index, reader in enumerate(target.node) if cast.output[0] in _uses(reader)]
        producers = [index for index, node in enumerate(target.node) if cast.input[0] in node.output]
        position = min(readers) if readers else len(target.node)
        if producers and producers[0] >= position:  # read before it is made: after its producer
            position = producers[0] + 1
        target.node.insert(position, cast)


# ----- files ---------------------------------------------------------------------------------------------------
def _graph_files(onnx_dir: Path) -> list[Path]:
    return sorted(onnx_dir.glob("*.onnx"))


def _data_files(model) -> set[str]:
    """The external data files a loaded (structure only) graph points to."""
    from onnx.external_data_helper import uses_external_data

    locations = set()
    for graph in _graphs(model.graph):
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
    _unnamed_to_named(model)
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
    ops = [node.op_type for graph in _graphs(model.graph) for node in graph.node]
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
    graphs = _graph_files(source)
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


# ----- the converted graphs against the fp32 ones (both through the project's runtime) -------------------------
def compare_image(size: tuple[int, int] = (112, 168)):
    """A deterministic picture with some text (for the image case of the comparison)."""
    from PIL import Image, ImageDraw

    height, width = size
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 127 // (width + height)], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).text((8, height // 2), "precision check", fill=(0, 0, 0))
    return image


def default_cases() -> list[tuple[str, Any]]:
    """(prompt, image or None): the text prompts, and the first with an image."""
    return [(prompt, None) for prompt in COMPARE_PROMPTS] + [("Describe this picture in one sentence.",
                                                              compare_image())]


def run_cases(onnx_dir, cases: list, new_tokens: int = COMPARE_NEW_TOKENS,
              threads: int | None = None, repeats: int = 1) -> dict[str, Any]:
    """One artifact on every case (greedy, batch 1): unsafe_prob, flag, tokens, last prefill logits, timings.

    A case is (prompt, image or None), rendered with the artifact's chat template, or a dict with
    `input_ids` [1, T] (and `images`, prepared) for artifacts without a tokenizer.

    The session is dropped before returning, so two artifacts are never resident together.
    `repeats` > 1 times the decode of every case that many times (same tokens, ms/token each time).
    """
    from sasa_patcher.export.onnx_runtime import OnnxVlm

    runtime = OnnxVlm(onnx_dir, providers=["CPUExecutionProvider"], threads=threads)
    threshold = runtime.config["sasa"].get("threshold")
    results = []
    for case in cases:
        if isinstance(case, dict):  # token ids made by the caller (artifacts without a tokenizer)
            input_ids, images = np.asarray(case["input_ids"], np.int64), list(case.get("images", []))
        else:
            input_ids, images = runtime.encode_prompt(*case)
        mask = np.ones_like(input_ids)
        timings = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            generation = runtime.generate(input_ids, mask, images, new_tokens, eos_token_ids=[])
            timings.append(time.perf_counter() - started)
        prob = float(generation.unsafe_prob[0])
        results.append({
            "prompt_tokens": int(input_ids.shape[1]), "images": len(images), "unsafe_prob": prob,
            "flagged": bool(threshold is not None and prob > threshold),
            "tokens": [int(t) for t in generation.tokens[0]],
            "last_logits": np.asarray(generation.prefill_logits[0, -1], np.float32),
            "seconds": timings,
        })
    del runtime
    return {"threshold": threshold, "results": results}


def compare_runs(reference: dict[str, Any], candidate: dict[str, Any]) -> dict[str, Any]:
    """Figures of `candidate` against `reference` (same cases, same order)."""
    pairs = list(zip(reference["results"], candidate["results"], strict=True))
    prob_diffs = [abs(a["unsafe_prob"] - b["unsafe_prob"]) for a, b in pairs]
    logit_diffs = [float(np.abs(a["last_logits"] - b["last_logits"]).max()) for a, b in pairs]
    agreement = []
    for a, b in pairs:
        n = min(len(a["tokens"]), len(b["tokens"]))
        same = next((i for i in range(n) if a["tokens"][i] != b["tokens"][i]), n)
        agreement.append((same, n))
    return {
        "cases": len(pairs),
        "flag_agreement": sum(a["flagged"] == b["flagged"] for a, b in pairs) / max(len(pairs), 1),
        "flagged": {"reference": sum(a["flagged"] for a, _ in pairs), "candidate": sum(b["flagged"] for _, b in pairs)},
        "unsafe_prob_max_abs_diff": max(prob_diffs, default=0.0),
        "unsafe_prob_mean_abs_diff": float(np.mean(prob_diffs)) if prob_diffs else 0.0,
        "last_logits_max_abs_diff": max(logit_diffs, default=0.0),
        "tokens_identical_cases": sum(same == n for same, n in agreement),
        # greedy-token agreement: the share of new tokens before the first divergence, over all cases
        "token_prefix_agreement": sum(same for same, _ in agreement) / max(sum(n for _, n in agreement), 1),
    }


def fp16_runs_on_cpu(onnx_dir) -> str | None:
    """None when ONNX Runtime's CPU provider loads every graph of `onnx_dir`, else the first error line."""
    import onnxruntime as ort

    for path in _graph_files(Path(onnx_dir)):
        try:
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types
            return f"{path.name}: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
    return None


def precision_parity(fp32_dir, converted_dir, cases: list | None = None,
                     new_tokens: int = COMPARE_NEW_TOKENS) -> dict[str, Any]:
    """The converted artifact against its fp32 source through the project's runtime (CPU), one at a time."""
    config = json.loads((Path(converted_dir) / CONFIG_NAME).read_text())
    precision = config.get("precision", "fp32")
    if cases is None:
        if not config.get("tokenizer_file") or "prompt_format" not in config and "chat_template" not in config:
            return {"precision": precision, "skipped": "the artifact has no tokenizer or chat template to render "
                                                       "the comparison prompts with"}
        cases = default_cases()
    unavailable = fp16_runs_on_cpu(converted_dir) if precision == "fp16" else None
    if unavailable:
        return {"precision": precision, "skipped": f"ONNX Runtime's CPU provider cannot run the fp16 graphs "
                                                   f"({unavailable}); run them on CUDA"}
    reference = run_cases(fp32_dir, cases, new_tokens)
    candidate = run_cases(converted_dir, cases, new_tokens)
    figures = compare_runs(reference, candidate)
    figures.update({"precision": precision, "reference": "fp32 ONNX (same export)", "new_tokens": new_tokens,
                    "provider": "CPUExecutionProvider",
                    "unsafe_prob": {"fp32": [r["unsafe_prob"] for r in reference["results"]],
                                    precision: [r["unsafe_prob"] for r in candidate["results"]]}})
    return figures


def replace_with_precision(onnx_dir, precision: str, *, block_size: int = DEFAULT_BLOCK_SIZE,
                           check: bool = True, log: Log | None = None) -> dict[str, Any]:
    """The patch pipeline's step after the fp32 export and its parity: `onnx_dir` becomes `precision`.

    Converts into a sibling, measures it against the fp32 graphs (`precision_parity`, when `check`
    and the artifact has a tokenizer), adds the record to `parity.json` under `precision`, then puts
    the converted directory in the place of the fp32 one. Returns the record.
    """
    log = log or (lambda message: None)
    onnx_dir = Path(onnx_dir)
    staged = onnx_dir.with_name(f"{onnx_dir.name}.{precision}")
    shutil.rmtree(staged, ignore_errors=True)
    record = convert_onnx_dir(onnx_dir, staged, precision, block_size=block_size, log=log)
    sizes = {name: f"{total / 1024**2:.0f} MiB" for name, total in record["total_bytes"].items()}
    log(f"ONNX graphs converted to {precision} in {record['convert_seconds']:.1f}s: {sizes[precision]} "
        f"(fp32 {sizes['fp32']})")
    if not check:
        record["parity"] = {"skipped": "not requested"}
    else:
        started = time.perf_counter()
        record["parity"] = precision_parity(onnx_dir, staged)
        record["parity_seconds"] = round(time.perf_counter() - started, 2)
    parity = record["parity"]
    if "skipped" in parity:
        log(f"{precision} parity skipped: {parity['skipped']}")
    else:
        log(f"{precision} vs fp32 on {parity['cases']} prompts: flag agreement {parity['flag_agreement']:.2f}, "
            f"unsafe_prob max diff {parity['unsafe_prob_max_abs_diff']:.2g}, greedy tokens identical in "
            f"{parity['tokens_identical_cases']}/{parity['cases']}")
    (staged / PRECISION_NAME).write_text(json.dumps(record, indent=2) + "\n")
    summary_path = onnx_dir / PARITY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["precision"] = record
    (staged / PARITY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(onnx_dir)
    staged.rename(onnx_dir)
    return record
