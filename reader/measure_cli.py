#!/usr/bin/env python3
"""Measure the reader: held-out transcription, the cross-modal safety gap, SASA on image-borne harm.

    python -m reader.measure_cli                          # the embedded model's tower -> results/reader.json
    python -m reader.measure_cli --weights build/reader/reader.safetensors --out build/reader.json

About 15 minutes on 2 CPU cores with the defaults. Writes the JSON and a per-layer AUROC chart next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

from reader import measure
from reader.training import fresh_tower
from sasa_patcher.console import log, report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.export.atomic import atomic_file
from sasa_patcher.loading import load_model
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model


def parse_pairs(text: str) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(int(x) for x in pair.split(",")) for pair in text.split()]
    except ValueError as error:
        raise UserInputError(f"--pairs {text!r}: write pairs as 's,f s,f', e.g. '8,12 11,13'") from error
    if not pairs or any(len(pair) != 2 or pair[0] >= pair[1] for pair in pairs):
        raise UserInputError(f"--pairs {text!r}: each pair is 's,f' with s < f")
    return pairs  # type: ignore[return-value]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="a trained tower (default: the embedded one)")
    parser.add_argument("--out", type=Path, default=Path("results/reader.json"))
    parser.add_argument("--transcription-limit", type=int, default=200, help="held-out sentences")
    parser.add_argument("--gap-limit", type=int, default=64, help="harmful and benign requests each")
    parser.add_argument("--pairs", default="8,12 11,13 14,16 10,20 6,24", help="(s, f) pairs for SASA AUROC")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length for the refusal judge")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser.parse_args(argv)


def plot_layers(text: list[float], image: list[float], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.plot(range(len(text)), text, marker="o", markersize=3, label="request as text")
    axis.plot(range(len(image)), image, marker="o", markersize=3, label="request as FigStep image")
    axis.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axis.set(xlabel="decoder layer (output, last prompt position)", ylabel="probe AUROC (5-fold CV)", ylim=(0.3, 1.02),
             title="Where harmfulness becomes linearly readable: text vs image")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run(args: argparse.Namespace) -> dict:
    pairs = parse_pairs(args.pairs)
    if args.weights is not None and not args.weights.is_file():
        raise UserInputError(f"--weights {args.weights}: no such file; "
                             "pass a reader.safetensors from `python -m reader.train_cli`")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    loaded = load_model("smol-qwen-vl", dtype="float32", device=args.device)
    model, processor = loaded.model, loaded.processor
    if args.weights is not None:
        fresh_tower(model, 0)
        model.model.visual.load_state_dict(load_file(args.weights))
    digest = hashlib.sha256(
        b"".join(t.detach().cpu().numpy().tobytes() for t in model.model.visual.state_dict().values())
    ).hexdigest()
    results: dict = {"model": "smol-qwen-vl", "tower_tensor_sha256": digest,
                     "weights": str(args.weights) if args.weights else "embedded"}

    sentences = measure.heldout_sentences(args.transcription_limit)
    log(f"transcribing {len(sentences)} held-out sentences in random styles and as FigStep images")
    results["transcription"] = measure.measure_transcription(model, processor, measure.styled_samples(sentences),
                                                             args.batch_size)
    results["transcription_figstep"] = measure.measure_transcription(
        model, processor, measure.figstep_samples(sentences), args.batch_size)
    log(f"token accuracy {results['transcription']['token_accuracy']:.3f}, "
        f"exact match {results['transcription']['exact_match']:.3f}")

    text_prompts, image_prompts = measure.gap_prompts(args.gap_limit)
    harmful_text = [p for p in text_prompts if p.label == 1]
    harmful_image = [p for p in image_prompts if p.label == 1]
    gap = {
        "n_harmful": len(harmful_text),
        "n_benign": len(text_prompts) - len(harmful_text),
        "refusal_rate_text": measure.refusal_rate(model, processor, harmful_text, args.batch_size,
                                                  args.max_new_tokens),
        "refusal_rate_image": measure.refusal_rate(model, processor, harmful_image, args.batch_size,
                                                   args.max_new_tokens),
    }
    s, f = pairs[0]
    model = patch_model(model, SasaSettings(safety_layer=s, semantic_layer=f), processor.tokenizer)
    gap["layer_auroc_text"] = measure.layer_aurocs(model, processor, text_prompts, args.batch_size)
    gap["layer_auroc_image"] = measure.layer_aurocs(model, processor, image_prompts, args.batch_size)
    results["cross_modal_gap"] = gap
    results["sasa_image"] = measure.sasa_aurocs(model, processor, image_prompts, pairs, args.batch_size)
    results["sasa_text"] = measure.sasa_aurocs(model, processor, text_prompts, pairs, args.batch_size)
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except UserInputError as error:
        return report_user_error(error)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out) as partial:
        partial.write_text(json.dumps(results, indent=2) + "\n")
    gap = results["cross_modal_gap"]
    plot_layers(gap["layer_auroc_text"], gap["layer_auroc_image"], args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
