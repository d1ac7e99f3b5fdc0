"""The ONNX artifact (`onnx/`): the three graphs, `sasa_onnx.json`, the tokenizer and `parity.json`.

    vision_encoder.onnx       one image's pixel values -> its image features
    embed_tokens.onnx         input_ids + the features of every image in the batch -> inputs_embeds
    decoder_model_merged.onnx inputs_embeds, attention_mask, position_ids and the KV cache ->
                              logits, unsafe_prob, present.* (one graph for prefill and decode)
    sasa_onnx.json            names, cache layout, threshold, refusal, chat template, preprocessing
    parity.json               ONNX Runtime vs PyTorch figures, measured at export time

How each graph is traced, and why: `export/onnx_graphs.py`; the config: `export/onnx_config.py`.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

from sasa_patcher.architectures import spec_for
from sasa_patcher.export.genai import write_genai_files
from sasa_patcher.export.onnx_config import build_config
from sasa_patcher.export.onnx_graphs import EXTERNAL_DATA_THRESHOLD, export_decoder, export_embed, export_vision
from sasa_patcher.export.onnx_names import (
    CONFIG_NAME,
    DECODER_FILE,
    EMBED_FILE,
    PARITY_NAME,
    TOKENIZER_FILE,
    VISION_FILE,
)
from sasa_patcher.export.onnx_parity import compare_references, default_parity_cases, torch_reference
from sasa_patcher.memory import current_rss_bytes, peak_rss_bytes, reset_peak

GIB = 1024**3


def _phase_peak() -> int:
    """Peak resident memory since the previous phase (reset after reading where the kernel allows)."""
    peak = peak_rss_bytes()
    reset_peak()
    return peak


def _return_freed_memory() -> None:
    """Ask glibc to hand freed heap pages back to the kernel (freed tensors below its mmap threshold stay
    in the heap otherwise, and count as resident); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _file_sizes(directory: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in sorted(directory.iterdir())
            if path.is_file() and path.name != PARITY_NAME}


def export_onnx(
    model,
    processor,
    out_dir: Path,
    *,
    image_size: tuple[int, int] | None = None,
    parity_cases: list[dict] | None = None,
    check_parity: bool = True,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    log=None,
    release_model: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write the three graphs, `sasa_onnx.json`, the tokenizer and `parity.json` into `out_dir`.

    `model`: a SASA-patched model in float32 (its `sasa.mode` is baked into the decoder).
    `processor`: its transformers processor (chat template, tokenizer, image constants), or None.
    `parity_cases`: batches as the processor makes them (`input_ids`, `attention_mask`, and the
    image inputs); default: built from the processor. Returns the summary that `parity.json` holds.

    Memory: the graphs are written one at a time, then the PyTorch references of the parity cases
    are computed, then, when `release_model` is given, the caller drops its references to the model
    (`release_model()`; this function drops its own) before ONNX Runtime loads the graphs, so the
    PyTorch weights and the ONNX Runtime session are never resident together. The peak resident
    memory of each phase is in the summary (`peak_rss_bytes`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda message: None)
    if model.dtype != torch.float32:
        raise ValueError(f"ONNX export runs in float32; the model is {model.dtype} (load it with dtype=float32)")
    model.eval()
    spec = spec_for(model)
    image_size = tuple(image_size or spec.default_image_size(model, processor))
    layout = spec.image_layout(model, image_size)
    spec.check_image_size(model, processor, image_size)
    timings, peaks = {}, {}
    reset_peak()
    for name, job in (
        (VISION_FILE, lambda path: export_vision(model, layout, path, external_data_threshold)),
        (EMBED_FILE, lambda path: export_embed(model, path, external_data_threshold)),
        (DECODER_FILE, lambda path: export_decoder(model, path, external_data_threshold)),
    ):
        started = time.perf_counter()
        job(out_dir / name)
        timings[name] = round(time.perf_counter() - started, 2)
        peaks[name] = _phase_peak()
        log(f"exported {name} in {timings[name]:.1f}s (peak RSS {peaks[name] / GIB:.1f} GiB)")

    config = build_config(model, processor, layout, image_size)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
        tokenizer.backend_tokenizer.save(str(out_dir / TOKENIZER_FILE))
        config["tokenizer_file"] = TOKENIZER_FILE
    if config.get("genai_type") and tokenizer is not None:
        # ONNX Runtime GenAI's files; the runtime takes graph files and tensor names from genai_config.json.
        config["genai_files"] = write_genai_files(config, model, processor, out_dir)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    import onnxruntime
    import transformers

    summary: dict[str, Any] = {
        "export_seconds": timings,
        "image_size": list(image_size),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }
    references = None
    if check_parity:
        cases = parity_cases if parity_cases is not None else default_parity_cases(model, processor, image_size)
        if cases:
            started = time.perf_counter()
            references = [torch_reference(model, case) for case in cases]
            summary["parity_torch_seconds"] = round(time.perf_counter() - started, 2)
            peaks["parity_torch"] = _phase_peak()
    if release_model is not None:
        model = processor = tokenizer = None
        release_model()
        gc.collect()
        _return_freed_memory()
        reset_peak()  # the ONNX Runtime phase's peak starts here, not at the model's size before the release
        log(f"released the PyTorch model before ONNX Runtime loads the graphs (RSS now "
            f"{current_rss_bytes() / GIB:.1f} GiB: {current_rss_bytes('RssAnon') / GIB:.1f} private, "
            f"{current_rss_bytes('RssFile') / GIB:.1f} mapped files)")
    if references:
        started = time.perf_counter()
        summary["parity"] = compare_references(out_dir, references)
        summary["parity_seconds"] = round(time.perf_counter() - started, 2)
        peaks["parity_onnxruntime"] = _phase_peak()
        log(f"parity: {json.dumps(summary['parity']['worst'])}")
        if summary["parity"]["failures"]:
            log("WARNING: ONNX Runtime does not match PyTorch within tolerance (the artifact is written; "
                f"{PARITY_NAME} has every figure): " + "; ".join(summary["parity"]["failures"]))
    summary["peak_rss_bytes"] = peaks
    summary["file_bytes"] = _file_sizes(out_dir)
    (out_dir / PARITY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


