"""ONNX Runtime (CPU) against the PyTorch patched model on the same batches: the figures in parity.json.

Per batch: the vision encoder's image features, the prefill logits at every non-pad position,
`unsafe_prob`, the greedy continuation (end-of-sequence disabled, so every step is compared) and
the logits of every decode step. The ONNX side runs through `export.onnx_runtime`, the same code
`scripts/generate_onnx.py` runs.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from sasa_patcher.architectures import spec_for
from sasa_patcher.export.onnx_runtime import OnnxVlm, PreparedImage

# Logits: 1e-4 absolute, or 1e-5 of the largest |logit| when that is larger. Why the relative part:
# on the 30-layer embedded SmolLM2 (|logit| up to 43) PyTorch fp32 itself is 9.8e-5 from an fp64
# forward and ONNX Runtime fp32 1.1e-4 to 1.4e-4 from PyTorch (the slow test measures both), so 1e-4
# absolute would be measuring fp32 rounding.
LOGITS_TOLERANCE = 1e-4
LOGITS_RELATIVE_TOLERANCE = 1e-5
PROB_TOLERANCE = 1e-5
PARITY_NEW_TOKENS = 32
# ONNX Runtime maps external weights from the file and, by default, pre-packs every MatMul weight into
# a heap copy of the same size: the parity session would hold the weights twice (3B: OOM on a 23 GiB
# machine). Without pre-packing the kernels read the mapped file pages directly (slower, same sums).
PARITY_SESSION_CONFIG = {"session.disable_prepacking": "1"}
PARITY_PROMPTS = (
    "Describe this picture in one sentence.",
    "What is the capital of France?",
    "Write a short poem about the sea, the wind and the long summer evenings.",
)


def parity_image(size: tuple[int, int], seed: int = 0):
    """A deterministic test picture of exactly `size` (H, W): gradients, a box and some text."""
    from PIL import Image, ImageDraw

    height, width = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                       (x + y) * 255 // max(width + height - 2, 1)], -1).astype(np.uint8)
    pixels = (pixels // 2 + rng.integers(0, 128, pixels.shape)).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 5, height // 5, width // 2, height // 2], outline=(255, 255, 255), width=3)
    draw.text((width // 8, height * 2 // 3), "SASA parity", fill=(0, 0, 0))
    return image


def default_parity_cases(model, processor, image_size) -> list[dict]:
    """Text only (batch 1), image (batch 1), and a left-padded batch of 3 mixing both."""
    if processor is None or not hasattr(processor, "apply_chat_template"):
        return []

    def render(prompt: str, image: bool) -> str:
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)

    first, second = parity_image(image_size, 0), parity_image(image_size, 1)
    layouts = [
        ("text-batch1", [(PARITY_PROMPTS[1], None)]),
        ("image-batch1", [(PARITY_PROMPTS[0], first)]),
        ("mixed-batch3-left-padded", [(PARITY_PROMPTS[0], first), (PARITY_PROMPTS[1], None),
                                      (PARITY_PROMPTS[2], second)]),
    ]
    cases = []
    for name, rows in layouts:
        texts = [render(prompt, image is not None) for prompt, image in rows]
        # one list per prompt (empty for text): the batched form every processor takes (Gemma 3's needs it)
        images = [[image] if image is not None else [] for _, image in rows] if any(i for _, i in rows) else None
        batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        cases.append({"name": name, **dict(batch)})
    return cases


def split_images(model, batch: dict) -> list[PreparedImage]:
    """The batch's pixel values as one prepared image per image (with its grid), in placeholder order."""
    pixels = batch.get("pixel_values")
    if pixels is None:
        return []
    pixels = pixels.detach().float().numpy()
    grids = batch.get("image_grid_thw")
    if grids is None:
        return [PreparedImage(pixels[index:index + 1]) for index in range(pixels.shape[0])]
    grids = [tuple(grid) for grid in grids.tolist()]
    sizes = [int(np.prod(grid)) for grid in grids]
    return [PreparedImage(rows, grid)
            for rows, grid in zip(np.split(pixels, np.cumsum(sizes)[:-1]), grids, strict=True)]


def _torch_image_features(model, image: PreparedImage) -> np.ndarray:
    """PyTorch's features for one image: the model's own tower, fed as the spec says (pixels, grid)."""
    pixels = torch.from_numpy(image.pixel_values)
    return model.sasa_image_features(spec_for(model).vision_inputs(pixels, image.grid_thw)).numpy()


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


def _torch_greedy(model, batch: dict, max_new_tokens: int) -> tuple[np.ndarray, list[torch.Tensor]]:
    """`generate()` greedy with end-of-sequence disabled, so exactly `max_new_tokens` steps run.

    (A generation config passed to `generate` with eos None is filled in from the model's own, so
    the model's is switched off for the call.)
    """
    config = model.generation_config
    saved = config.eos_token_id, config.do_sample, config.num_beams
    config.eos_token_id, config.do_sample, config.num_beams = None, False, 1
    try:
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, output_logits=True,
                                   return_dict_in_generate=True)
    finally:
        config.eos_token_id, config.do_sample, config.num_beams = saved
    return generated.sequences[:, batch["input_ids"].shape[1]:].numpy(), list(generated.logits)


@torch.no_grad()
def torch_reference(model, case: dict, max_new_tokens: int = PARITY_NEW_TOKENS) -> dict[str, Any]:
    """Everything the parity check compares, computed by the PyTorch model (numpy, positions under the mask only).

    Why apart: the references of every case are computed first, so the PyTorch model can be released
    before ONNX Runtime loads the graphs (the two together were 2.8x the weights at 2B).
    """
    batch = {key: value for key, value in case.items() if key != "name"}
    mask = batch["attention_mask"].bool().numpy()
    images = split_images(model, batch)
    started = time.perf_counter()
    features = [_torch_image_features(model, image) for image in images]
    reference = model(**batch)
    tokens, step_logits = _torch_greedy(model, batch, max_new_tokens)
    logits = reference.logits.numpy()[mask]
    return {"name": case.get("name", ""), "input_ids": batch["input_ids"].numpy(),
            "attention_mask": batch["attention_mask"].numpy(), "images": images, "image_features": features,
            "logits": logits, "unsafe_prob": reference.unsafe_prob.numpy(), "tokens": tokens,
            "step_logits": [step.numpy() for step in step_logits],
            "torch_seconds": round(time.perf_counter() - started, 2)}


def compare_image_features(runtime: OnnxVlm, reference: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The vision graph on one case's images: their features (for the decoder phase) and the figures."""
    images = reference["images"]
    started = time.perf_counter()
    encoded = [runtime.encode_images([image]) for image in images]
    figures: dict[str, Any] = {"vision_seconds": round(time.perf_counter() - started, 2)}
    if images:
        figures["image_features_max_abs_diff"] = max(
            _max_diff(ours, want) for ours, want in zip(encoded, reference["image_features"], strict=True))
    hidden = runtime.config["hidden_size"]
    return (np.concatenate(encoded) if encoded else np.zeros((0, hidden), np.float32)), figures


def compare_reference(runtime: OnnxVlm, reference: dict[str, Any], image_features: np.ndarray) -> dict[str, Any]:
    """ONNX Runtime's embed and decoder graphs on one case against its PyTorch reference, from the image
    features `compare_image_features` computed (the caller merges its figures into these)."""
    mask = reference["attention_mask"].astype(bool)
    images = reference["images"]
    figures: dict[str, Any] = {"name": reference["name"], "batch": int(mask.shape[0]), "images": len(images),
                               "prompt_tokens": [int(row.sum()) for row in mask]}
    figures["torch_seconds"] = reference["torch_seconds"]
    torch_tokens = reference["tokens"]
    started = time.perf_counter()
    result = runtime.generate(reference["input_ids"], reference["attention_mask"], images, torch_tokens.shape[1],
                              eos_token_ids=[], image_features=image_features)
    figures["onnxruntime_seconds"] = round(time.perf_counter() - started, 2)
    figures["logits_max_abs_diff"] = _max_diff(result.prefill_logits[mask], reference["logits"])
    figures["logits_max_abs"] = float(np.abs(reference["logits"]).max())
    figures["unsafe_prob"] = [float(p) for p in reference["unsafe_prob"]]
    figures["unsafe_prob_max_abs_diff"] = _max_diff(result.unsafe_prob, reference["unsafe_prob"])
    unflagged = ~result.flagged
    figures["flagged"] = [bool(flag) for flag in result.flagged]
    step_diffs = [_max_diff(ours[unflagged], theirs[unflagged])
                  for ours, theirs in zip(result.step_logits, reference["step_logits"], strict=False)]
    figures["decode_logits_max_abs_diff"] = max(step_diffs, default=0.0)
    figures["new_tokens"] = int(torch_tokens.shape[1])
    figures["tokens_identical"] = bool(result.tokens.shape == torch_tokens.shape
                                       and np.array_equal(result.tokens, torch_tokens))
    return figures


def parity_failures(results: list[dict]) -> list[str]:
    """Each case's figure outside its tolerance, as a sentence (empty: parity passed).

    Why sentences: the export writes the artifact either way (float32 accumulation over many random layers can
    exceed the relative logits tolerance while every token agrees), so the log must say what failed, not only
    that something did.
    """
    failures = []
    for r in results:
        logits = max(r["logits_max_abs_diff"], r["decode_logits_max_abs_diff"])
        tolerance = max(LOGITS_TOLERANCE, LOGITS_RELATIVE_TOLERANCE * r["logits_max_abs"])
        if logits > tolerance:
            failures.append(f"{r['name']}: logits differ by {logits:.2e} (tolerance {tolerance:.2e})")
        if r["unsafe_prob_max_abs_diff"] > PROB_TOLERANCE:
            failures.append(f"{r['name']}: unsafe_prob differs by {r['unsafe_prob_max_abs_diff']:.2e} "
                            f"(tolerance {PROB_TOLERANCE:.0e})")
        if not r["tokens_identical"]:
            failures.append(f"{r['name']}: the greedy tokens differ")
    return failures


def compare_references(onnx_dir, references: list[dict], max_new_tokens: int = PARITY_NEW_TOKENS) -> dict[str, Any]:
    """The parity summary from precomputed references: needs no PyTorch model, only the ONNX artifact.

    One graph's weights at a time where it can: every case's images go through the vision graph first,
    then its session is released before the decoder's weights are read (at 3B the three graphs mapped
    together are 15.2 GiB, 1.09x the weights, before any working memory).
    """
    runtime = OnnxVlm(onnx_dir, providers=["CPUExecutionProvider"], session_config=PARITY_SESSION_CONFIG)
    vision = [compare_image_features(runtime, reference) for reference in references]
    runtime.release("vision_encoder")
    results = [{**compare_reference(runtime, reference, features), **figures}
               for reference, (features, figures) in zip(references, vision, strict=True)]
    worst = {
        key: max((r.get(key, 0.0) for r in results), default=0.0)
        for key in ("logits_max_abs_diff", "decode_logits_max_abs_diff", "unsafe_prob_max_abs_diff",
                    "image_features_max_abs_diff", "logits_max_abs")
    }
    worst["tokens_identical"] = all(r["tokens_identical"] for r in results)
    failures = parity_failures(results)
    return {
        "provider": "CPUExecutionProvider",
        "tolerances": {"logits": LOGITS_TOLERANCE, "logits_relative_to_max_abs_logit": LOGITS_RELATIVE_TOLERANCE,
                       "unsafe_prob": PROB_TOLERANCE, "tokens": "identical"},
        "new_tokens": max_new_tokens,
        "passed": not failures,
        "failures": failures,
        "worst": worst,
        "cases": results,
    }
