"""What the in-graph gate costs: the gate-mode decoder graph against the same graph without the gate.

    python -m sasa_patcher.evaluation.gate_cost [--model smol-qwen2.5-vl] [--repeats 15] [--out results]

Both decoders are exported from one patched model (gate mode, default layers) by the same exporter
(`export_decoder(gate=True|False)`): the only difference is `sasa_gate` and its state cache layer, so
the ratios isolate the gate. Measured, as `evaluation.latency` measures the decoders (same harness:
`ort_session_runner`, `time_rounds`, seeded random token ids, one session alive at a time):
- decode: mean ONNX Runtime time per token over `--decode-tokens` steps with the cache fed back;
- prefill: the `--prompt-tokens` prompt step;
each as gate / no-gate: the ratio of medians, and the median and IQR of the paired ratios (repeat i of
each variant ran in the same round). Also each export's wall time and peak resident memory (VmHWM,
reset before each export where the kernel allows), the graphs' node counts, and the extra KV cache:
one layer of the L, i.e. 1/L of the cache, per token 2 x kv_heads x head_dim x 4 bytes.

Writes `gate-cost.json` and `gate-cost.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sasa_patcher.evaluation.latency import (
    bench_token_ids,
    on_cpu,
    ort_session_runner,
    round_sizes,
    spread,
    time_rounds,
)
from sasa_patcher.export.onnx_graphs import export_decoder, text_dims
from sasa_patcher.memory import peak_rss_bytes, reset_peak

VARIANTS = ("no_gate", "gate")


def export_both(model, work_dir: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Both decoder graphs of `model`; per variant its export seconds, peak RSS and node count."""
    import onnx

    paths, figures = {}, {}
    for variant in VARIANTS:
        paths[variant] = work_dir / f"decoder_{variant}.onnx"
        peak_resets = reset_peak()
        started = time.perf_counter()
        with on_cpu(model):
            export_decoder(model, paths[variant], gate=variant == "gate")
        nodes = sum(1 for _ in onnx.load(str(paths[variant]), load_external_data=False).graph.node)
        figures[variant] = {"export_seconds": time.perf_counter() - started, "peak_rss_bytes": peak_rss_bytes(),
                            "peak_reset": peak_resets, "nodes": nodes}
    return paths, figures


def ratios(samples: dict, phase: str) -> dict:
    """gate / no_gate for one phase: ratio of medians, paired ratios' median and spread, the milliseconds."""
    before = [seconds * 1e3 for seconds in samples["no_gate"][phase]]
    after = [seconds * 1e3 for seconds in samples["gate"][phase]]
    paired = [a / b for b, a in zip(before, after, strict=True)]
    statistic, low, high = spread(paired)
    return {"ratio": statistics.median(after) / statistics.median(before),
            "paired_ratio_median": statistics.median(paired), "spread_statistic": statistic,
            "ratio_low": low, "ratio_high": high, "no_gate_ms": statistics.median(before),
            "gate_ms": statistics.median(after), "paired_ratios": paired}


def measure(model, *, batch: int, prompt_tokens: int, decode_tokens: int, repeats: int, warmup: int,
            rounds: int, threads: int | None, log=lambda message: None) -> dict:
    dims = text_dims(model)
    layers = dims["num_hidden_layers"]
    ids = bench_token_ids(model.config.get_text_config(), batch, prompt_tokens, decode_tokens)
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(ids).float().numpy()
    with tempfile.TemporaryDirectory() as scratch:
        paths, exports = export_both(model, Path(scratch))
        log(f"exported: {json.dumps(exports)}")
        samples, _ = time_rounds(
            lambda variant: ort_session_runner(paths[variant], ["CPUExecutionProvider"], threads, embeds,
                                               prompt_tokens),
            VARIANTS, repeats, warmup, len(round_sizes(repeats, rounds)), lambda: None)
    per_token_layer = 2 * dims["num_key_value_heads"] * dims["head_dim"] * 4
    return {
        "layers": layers,
        "inputs": {"batch": batch, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
                   "repeats": repeats, "warmup": warmup, "rounds": rounds, "threads": threads,
                   "provider": "CPUExecutionProvider"},
        "kv_cache": {"extra_fraction": 1 / layers, "extra_bytes_per_token": per_token_layer,
                     "cache_bytes_per_token_without_gate": per_token_layer * layers},
        "decode": ratios(samples, "decode"),
        "prefill": ratios(samples, "prefill"),
        "export": exports,
    }


def markdown(report: dict, model_name: str, command: str) -> str:
    decode, prefill, export, kv = report["decode"], report["prefill"], report["export"], report["kv_cache"]

    def row(name: str, entry: dict) -> str:
        return (f"| {name} | {entry['no_gate_ms']:.2f} | {entry['gate_ms']:.2f} | {entry['ratio']:.3f}x | "
                f"{entry['paired_ratio_median']:.3f} ({entry['spread_statistic']} {entry['ratio_low']:.3f}-"
                f"{entry['ratio_high']:.3f}) |")

    inputs = report["inputs"]
    return "\n".join([
        "# What the in-graph gate costs", "",
        f"`{command}` on `{model_name}` (L = {report['layers']}): the gate-mode decoder graph against the same "
        f"graph exported without the gate, ONNX Runtime {inputs['provider']}, batch {inputs['batch']}, "
        f"{inputs['prompt_tokens']}-token prompt, {inputs['decode_tokens']} decode steps, {inputs['repeats']} "
        f"repeats in {inputs['rounds']} rounds ({inputs['warmup']} warm-up per session), "
        f"{inputs['threads'] or 'default'} threads.", "",
        "| measure | no gate (ms) | gate (ms) | ratio of medians | paired ratio (spread) |",
        "| --- | --- | --- | --- | --- |",
        row("decode per token", decode), row("prefill", prefill), "",
        f"Extra KV cache: one layer of {report['layers']} = {kv['extra_fraction']:.4f} of the cache, "
        f"{kv['extra_bytes_per_token']} bytes per token per row (float32; the cache without the gate "
        f"{kv['cache_bytes_per_token_without_gate']}).", "",
        "| export | seconds | peak RSS (GiB) | nodes |", "| --- | --- | --- | --- |",
        *(f"| {variant} | {export[variant]['export_seconds']:.1f} | {export[variant]['peak_rss_bytes'] / 2**30:.2f} | "
          f"{export[variant]['nodes']} |" for variant in VARIANTS), "",
        "A paired ratio is gate / no gate of the same repeat (same round); the spread is their "
        "interquartile range (min-max below 4 repeats). A shared machine's noise moves both variants.", ""])


def main(argv: list[str] | None = None) -> int:
    from sasa_patcher.loading import load_model
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import default_layers, patch_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol-qwen2.5-vl")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    loaded = load_model(args.model)
    layers = loaded.model.config.get_text_config().num_hidden_layers
    model = patch_model(loaded.model, SasaSettings(*default_layers(layers), mode="gate"), loaded.processor.tokenizer)
    report = measure(model, batch=args.batch, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                     repeats=args.repeats, warmup=args.warmup, rounds=args.rounds, threads=args.threads,
                     log=lambda message: print(message, file=sys.stderr))
    command = "python -m sasa_patcher.evaluation.gate_cost " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gate-cost.json").write_text(json.dumps({**report, "model": args.model, "command": command},
                                                        indent=2) + "\n")
    text = markdown(report, args.model, command)
    (args.out / "gate-cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
