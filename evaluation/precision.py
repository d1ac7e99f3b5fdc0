"""int4 / fp16 against fp32: the same artifact's ONNX graphs in each precision, on the held-out prompts (CPU).

    python -m sasa_patcher.evaluation.precision build/i14 --precisions int4,fp16 --out results/

The fp32 graphs of the artifact are converted here (export/onnx_precision.py, timed) and every
precision runs through the project's runtime (`OnnxVlm`, CPUExecutionProvider) on the artifact's
held-out prompts (`calibration.jsonl`, split `heldout`; text only: the file keeps image hashes, not
images), or `--limit` of them evenly spaced through the file. Per precision against fp32:

- flag agreement: `unsafe_prob > threshold` (the stored threshold) the same way on each prompt
- unsafe_prob max and mean absolute difference
- greedy-token agreement over `--new-tokens` new tokens (end-of-sequence off): prompts whose tokens
  are identical, and the share of tokens before the first divergence
- artifact size (graph files + external data) and conversion seconds
- decode ms/token: (time for N new tokens - time for 1) / (N - 1), per prompt of the timing subset,
  `--repeats` rounds with the precisions interleaved in each round; median and min-max, and the
  ratio to fp32 within each round (median, min-max), so load on the machine hits both sides alike.

Writes precision.json and precision.md. Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from sasa_patcher.export.onnx_precision import convert_onnx_dir
from sasa_patcher.export.onnx_precision_parity import compare_runs, run_cases
from sasa_patcher.export.onnx_runtime import OnnxVlm, find_onnx_dir
from sasa_patcher.tables import markdown_table, text_table

MIB = 2**20
NOTES = [
    "Notes: `flag agreement` is `unsafe_prob > threshold` the same way as fp32 on each prompt; `token agreement` "
    "is the share of new tokens before the first divergence from fp32. The probe head and `unsafe_prob` are float32 "
    "in every precision, but the probe reads hidden states that the int4 (or fp16) layers compute, so its score moves "
    "with the weights' precision. int4 quantizes the MatMul weights (decoder layers, lm_head); Gemm nodes (the "
    "TorchScript-exported vision tower, the probe branch's own heads) stay float32. fp16 on the CPU provider runs "
    "through ONNX Runtime's inserted casts (nodes without float16 kernels compute in float32), so its figures here "
    "are a lower bound on the CUDA difference, and its timing is not a serving figure.",
]


def heldout_prompts(artifact: Path, limit: int | None = None) -> list[str]:
    """The held-out text prompts of the artifact's calibration record (all when none is held out); `limit`
    takes that many, evenly spaced through the record."""
    path = artifact / "calibration.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no calibration.jsonl in {artifact}: pass the patch output directory")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    held = [r for r in records if r.get("split") == "heldout"] or records
    texts = [r["text"] for r in held if not r.get("image_sha256")]
    if limit and limit < len(texts):  # evenly spaced: the record is grouped by label and source
        texts = [texts[int(i)] for i in np.linspace(0, len(texts) - 1, limit).round()]
    return texts


def decode_ms(runtime: OnnxVlm, input_ids: np.ndarray, new_tokens: int) -> float:
    """ms per decode step: (N new tokens - 1 new token) / (N - 1)."""
    mask = np.ones_like(input_ids)
    started = time.perf_counter()
    runtime.generate(input_ids, mask, [], 1, eos_token_ids=[])
    one = time.perf_counter() - started
    started = time.perf_counter()
    runtime.generate(input_ids, mask, [], new_tokens, eos_token_ids=[])
    many = time.perf_counter() - started
    return 1000 * (many - one) / (new_tokens - 1)


def time_decode(dirs: dict[str, Path], prompts: list[str], new_tokens: int, repeats: int,
                threads: int | None) -> dict[str, Any]:
    """Interleaved timing: every round times each precision on every prompt (sessions held together)."""
    runtimes = {name: OnnxVlm(path, providers=["CPUExecutionProvider"], threads=threads) for name, path in dirs.items()}
    ids = [next(iter(runtimes.values())).encode_prompt(prompt)[0] for prompt in prompts]
    for runtime in runtimes.values():  # warm-up
        decode_ms(runtime, ids[0], 3)
    rounds: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(repeats):
        for name, runtime in runtimes.items():
            rounds[name].append(float(np.mean([decode_ms(runtime, row, new_tokens) for row in ids])))
    del runtimes
    out = {}
    for name, values in rounds.items():
        ratios = [value / base for value, base in zip(values, rounds["fp32"], strict=True)]
        out[name] = {"decode_ms_per_token": {"median": statistics.median(values), "min": min(values),
                                             "max": max(values), "rounds": values},
                     "ratio_to_fp32": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}}
    return out


def measure(artifact, precisions: list[str], limit: int | None = None, new_tokens: int = 16, repeats: int = 5,
            timing_prompts: int = 3, threads: int | None = None, keep: Path | None = None, log=print) -> dict:
    artifact = Path(artifact)
    fp32_dir = find_onnx_dir(artifact)
    config = json.loads((fp32_dir / "sasa_onnx.json").read_text())
    if config.get("precision", "fp32") != "fp32":
        raise ValueError(f"{fp32_dir} is {config['precision']}: measure an fp32 artifact")
    prompts = heldout_prompts(artifact if (artifact / "calibration.jsonl").is_file() else fp32_dir.parent, limit)
    log(f"{len(prompts)} held-out text prompts, {new_tokens} new tokens, precisions fp32,{','.join(precisions)}")
    scratch = Path(tempfile.mkdtemp(prefix="sasa-precision-", dir=keep))
    report: dict[str, Any] = {"artifact": str(artifact), "prompts": len(prompts), "new_tokens": new_tokens,
                              "threshold": config["sasa"].get("threshold"), "provider": "CPUExecutionProvider",
                              "precisions": {}}
    try:
        dirs = {"fp32": fp32_dir}
        for precision in precisions:
            record = convert_onnx_dir(fp32_dir, scratch / precision, precision, log=log)
            dirs[precision] = scratch / precision
            report["precisions"][precision] = {"convert_seconds": record["convert_seconds"],
                                               "bytes": record["total_bytes"][precision]}
            report["fp32_bytes"] = record["total_bytes"]["fp32"]
        cases = [(prompt, None) for prompt in prompts]
        started = time.perf_counter()
        reference = run_cases(fp32_dir, cases, new_tokens, threads=threads)
        log(f"fp32 on {len(cases)} prompts in {time.perf_counter() - started:.0f}s")
        report["fp32"] = {"flagged": sum(r["flagged"] for r in reference["results"])}
        for precision in precisions:
            started = time.perf_counter()
            run = run_cases(dirs[precision], cases, new_tokens, threads=threads)
            report["precisions"][precision].update(compare_runs(reference, run))
            log(f"{precision} on {len(cases)} prompts in {time.perf_counter() - started:.0f}s")
        timing = time_decode(dirs, prompts[:timing_prompts], new_tokens, repeats, threads)
        report["timing"] = {"prompts": min(timing_prompts, len(prompts)), "repeats": repeats, "threads": threads,
                            **timing}
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return report


def table_rows(report: dict) -> list[list[str]]:
    timing = report["timing"]
    rows = [["precision", "size MiB", "size ratio", "convert s", "flag agreement", "unsafe_prob max diff",
             "tokens identical", "token agreement", "decode ms/token (min-max)", "decode ratio (min-max)"]]
    fp32_ms = timing["fp32"]["decode_ms_per_token"]
    rows.append(["fp32", f"{report['fp32_bytes'] / MIB:.0f}", "1.00", "-", "-", "-", "-", "-",
                 f"{fp32_ms['median']:.1f} ({fp32_ms['min']:.1f}-{fp32_ms['max']:.1f})", "1.00"])
    for name, figures in report["precisions"].items():
        ms, ratio = timing[name]["decode_ms_per_token"], timing[name]["ratio_to_fp32"]
        rows.append([name, f"{figures['bytes'] / MIB:.0f}", f"{figures['bytes'] / report['fp32_bytes']:.2f}",
                     f"{figures['convert_seconds']:.0f}", f"{figures['flag_agreement']:.3f}",
                     f"{figures['unsafe_prob_max_abs_diff']:.3g}",
                     f"{figures['tokens_identical_cases']}/{figures['cases']}",
                     f"{figures['token_prefix_agreement']:.3f}",
                     f"{ms['median']:.1f} ({ms['min']:.1f}-{ms['max']:.1f})",
                     f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"])
    return rows


def markdown(report: dict, command: str) -> str:
    timing = report["timing"]
    flagged = {name: f["flagged"]["candidate"] for name, f in report["precisions"].items()}
    lines = ["# ONNX precisions against fp32 (CPU)", "", f"Command: `{command}`", "",
             f"Artifact `{report['artifact']}`; {report['prompts']} held-out text prompts, {report['new_tokens']} "
             f"greedy new tokens (end-of-sequence off), threshold {report['threshold']}; flagged: fp32 "
             f"{report['fp32']['flagged']}, " + ", ".join(f"{k} {v}" for k, v in flagged.items()) + ". "
             f"Decode timing: {timing['prompts']} prompts, {timing['repeats']} interleaved rounds, "
             f"{report['provider']}.", "", *markdown_table(table_rows(report)), "", *NOTES, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="patch output directory (fp32 onnx/ and calibration.jsonl)")
    parser.add_argument("--precisions", default="int4,fp16")
    parser.add_argument("--limit", type=int, help="N held-out prompts, evenly spaced through calibration.jsonl")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--timing-prompts", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    try:
        report = measure(args.artifact, [p for p in args.precisions.split(",") if p], args.limit, args.new_tokens,
                         args.repeats, args.timing_prompts, args.threads, log=lambda m: print(m, file=sys.stderr))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = "python -m sasa_patcher.evaluation.precision " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps({**report, "command": command}, indent=2) + "\n")
    (args.out / "precision.md").write_text(markdown(report, command))
    print("\n".join(text_table(table_rows(report))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
