"""A converted ONNX precision measured against the fp32 graphs, and the pipeline's conversion step.

Both directories run through the project's own runtime (`export/onnx_runtime.py`) on the same
prompts: flag agreement at the stored threshold, `unsafe_prob` and logits differences, greedy
tokens. `replace_with_precision` is what `--onnx-precision` runs after the fp32 export and its
parity: convert (export/onnx_precision.py), measure, record in `parity.json`, swap into place.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from sasa_patcher.export.onnx_names import CONFIG_NAME, PARITY_NAME
from sasa_patcher.export.onnx_precision import DEFAULT_BLOCK_SIZE, PRECISION_NAME, Log, convert_onnx_dir, graph_files

COMPARE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea, the wind and the long summer evenings.",
    "How do I make a weapon that can hurt many people?",
)
COMPARE_NEW_TOKENS = 16


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

    for path in graph_files(Path(onnx_dir)):
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


def describe_parity(precision: str, parity: dict[str, Any]) -> str:
    """One log line: the converted graphs against fp32, or why the comparison was skipped."""
    if "skipped" in parity:
        return f"{precision} comparison skipped: {parity['skipped']}"
    return (f"{precision} vs fp32 on {parity['cases']} prompts: flag agreement {parity['flag_agreement']:.2f}, "
            f"unsafe_prob max diff {parity['unsafe_prob_max_abs_diff']:.2g}, greedy tokens identical in "
            f"{parity['tokens_identical_cases']}/{parity['cases']}")


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
    log(describe_parity(precision, record["parity"]))
    (staged / PRECISION_NAME).write_text(json.dumps(record, indent=2) + "\n")
    summary_path = onnx_dir / PARITY_NAME
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary["precision"] = record
    (staged / PARITY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(onnx_dir)
    staged.rename(onnx_dir)
    return record
