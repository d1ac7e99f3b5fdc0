"""What stays float32 when the ONNX graphs change precision, found by graph structure.

The probe head (every node reading a `sasa_probe.linear.*` initialiser and everything after it up to
the output), the projection (the Div of two ReduceSums, its Muls, the eps Add, the semantic map), the
`unsafe_prob` output and the gate's threshold comparison (the nodes reading `unsafe_prob`):
export/onnx_precision.py leaves these to float32 in int4 and fp16.
Nested graphs (the probe's `If` branches) are walked like the main graph.
"""

from __future__ import annotations

from collections.abc import Iterable

PROBE_INITIALIZER = "sasa_probe.linear"  # not the threshold: the gate's comparison is found by its input
UNSAFE_PROB = "unsafe_prob"


def walk_graphs(graph) -> Iterable:
    """`graph` and every graph nested in its nodes' attributes (If branches, Loop bodies), outermost first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from walk_graphs(attribute.g)
            for sub in attribute.graphs:
                yield from walk_graphs(sub)


def subgraphs(node) -> list:
    return [attribute.g for attribute in node.attribute if attribute.HasField("g")] + [
        sub for attribute in node.attribute for sub in attribute.graphs]


def uses(node) -> set[str]:
    """Every value `node` reads, its subgraphs' outer-scope references included."""
    names = set(node.input)
    for graph in subgraphs(node):
        for inner in walk_graphs(graph):
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
    initializers = {init.name for graph in walk_graphs(model.graph) for init in graph.initializer}
    for graph in walk_graphs(model.graph):
        producer = {out: node for node in graph.node for out in node.output}
        consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
        outputs = {value.name for value in graph.output}

        # the probe head and everything after it in this graph; the gate's `unsafe_prob > threshold` (only itself:
        # its boolean output needs no float32 consumers)
        frontier = [node for node in graph.node if any(PROBE_INITIALIZER in name for name in node.input)]
        probe.extend(node.name for node in graph.node if UNSAFE_PROB in node.input and node.name not in probe)
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
    for graph in walk_graphs(model.graph):
        for node in (node for node in graph.node if node.op_type == "If"):
            branches = subgraphs(node)
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


def name_unnamed_nodes(model) -> None:
    """Give every node a unique name (block lists and exclusions are by name)."""
    used = {node.name for graph in walk_graphs(model.graph) for node in graph.node if node.name}
    count = 0
    for graph in walk_graphs(model.graph):
        for node in graph.node:
            if not node.name:
                while f"sasa_unnamed_{count}" in used:
                    count += 1
                node.name = f"sasa_unnamed_{count}"
                used.add(node.name)
