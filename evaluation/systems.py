"""The systems an evaluation compares, and greedy generation through them.

Backends: `TorchSystem` (the base, or the safetensors artifact in one serving mode) and `OnnxSystem`
(the ONNX artifact through `export.onnx_runtime.OnnxVlm`, torch-free, its baked mode only). Both
generate greedily on left-padded batches and return the prompt's `unsafe_prob` with each answer, and
both give teacher-forced logits of their serving stream (`evaluation.utility`). `generation_records`
turns the answers into the per-prompt records every figure of `evaluation.metrics` is read from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from sasa_patcher.evaluation.held_out import PromptSet
from sasa_patcher.modeling_sasa import CACHE_KEY
from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.probes.features import batched, encode_prompts, length_order, model_device_dtype, to_model
from sasa_patcher.probes.refusal import is_refusal

DEFAULT_MAX_NEW_TOKENS = 48


@dataclass(frozen=True)
class Answer:
    """One greedy answer and the probe's verdict on its prompt (None for an unpatched model)."""

    text: str
    unsafe_prob: float | None


class TorchSystem:
    """A transformers model with the processor that feeds it: the base, or the artifact in one serving mode.

    The artifact's gate and augment systems share one loaded model; each call sets its own mode
    first (`set_sasa`), so the same weights serve both.
    """

    def __init__(self, name: str, model, processor, mode: str | None = None):
        self.name, self.model, self.processor, self.mode = name, model, processor, mode

    def _serve(self) -> tuple[torch.device, torch.dtype]:
        if self.mode is not None and self.model.sasa.mode != self.mode:
            self.model.set_sasa(dataclasses.replace(self.model.sasa, mode=self.mode))
        return model_device_dtype(self.model)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Answer]:
        """Greedy answers; the patched model's verdict comes back in its two-stream cache."""
        device, dtype = self._serve()
        batch = to_model(encode_prompts(self.processor, prompts), device, dtype)
        out = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  return_dict_in_generate=True)
        new_tokens = out.sequences[:, batch["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        verdict = getattr(getattr(out, CACHE_KEY), "unsafe_prob", None)
        scores = [None] * len(texts) if verdict is None else verdict.float().cpu().tolist()
        return [Answer(text, score) for text, score in zip(texts, scores, strict=True)]

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced next-token logits of the serving stream at every position, [B, T, V] float32 CPU."""
        device, dtype = self._serve()
        return self.model(**to_model(batch, device, dtype), use_cache=False).logits.float().cpu()


def left_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows as one left-padded int64 batch and its attention mask."""
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for index, row in enumerate(rows):
        ids[index, width - len(row):] = row
        mask[index, width - len(row):] = 1
    return ids, mask


def until_eos(tokens: Sequence[int], eos: set[int]) -> list[int]:
    """The tokens before the first end-of-sequence token."""
    kept = []
    for token in tokens:
        if token in eos:
            break
        kept.append(token)
    return kept


class OnnxSystem:
    """The ONNX artifact through ONNX Runtime (`OnnxVlm`), in the one mode baked into its graph."""

    def __init__(self, name: str, vlm):
        self.name, self.vlm = name, vlm

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Answer]:
        """Greedy answers from the runtime's own prompt encoding and image preprocessing (as users run it).

        In gate mode a flagged row's tokens are the refusal tokens, so decoding them gives the refusal text.
        """
        encoded = [self.vlm.encode_prompt(prompt.text, prompt.image) for prompt in prompts]
        ids, mask = left_pad([row[0].tolist() for row, _ in encoded], self.vlm.config["pad_token_id"])
        images = [pixels for _, row_images in encoded for pixels in row_images]
        result = self.vlm.generate(ids, mask, images, max_new_tokens)
        eos = set(self.vlm.config["eos_token_id"])
        return [
            Answer(self.vlm.tokenizer.decode(until_eos(row, eos), skip_special_tokens=True), float(score))
            for row, score in zip(result.tokens.tolist(), result.unsafe_prob.tolist(), strict=True)
        ]

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher-forced logits of the baked serving stream: one prefill of the decoder graph, [B, T, V]."""
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        if (ids == self.vlm.config["image"]["image_token_id"]).any():
            raise ValueError("teacher-forced logits are computed on text-only prompts")
        embeds = self.vlm.embed_tokens(ids, np.zeros((0, self.vlm.config["hidden_size"]), np.float32))
        positions, _ = self.vlm.prefill_positions(ids, mask)
        logits = self.vlm.run_decoder(embeds, mask, positions, self.vlm.empty_cache(len(ids)))[0]
        return torch.from_numpy(np.asarray(logits, np.float32))


def generate_all(
    system, prompts: Sequence[Prompt], *, batch_size: int, max_new_tokens: int, progress: bool = True,
    description: str = "generate",
) -> list[Answer]:
    """Every prompt's answer, in input order, batched by length (less padding, image prompts together)."""
    answers: list[Answer | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=description, unit="prompt", disable=not progress, leave=False) as bar:
        for rows in batched(length_order(prompts), batch_size):
            for row, answer in zip(rows, system.generate([prompts[i] for i in rows], max_new_tokens), strict=True):
                answers[row] = answer
            bar.update(len(rows))
    return answers  # type: ignore[return-value]


def generation_records(
    systems: Sequence, prompt_sets: Sequence[PromptSet], *, batch_size: int, max_new_tokens: int,
    refusal_texts: Sequence[str] = (), progress: bool = True,
) -> list[dict]:
    """One record per (system, prompt): what `generations.jsonl` holds and every generation metric reads.

    `set` is the prompt set (`evaluation.held_out`), `category` the prompt's hazard category
    (`probes.taxonomy`; None for a user's row without one) and `source_label` the source's own tag.
    """
    records = []
    for system in systems:
        for prompt_set in prompt_sets:
            answers = generate_all(system, prompt_set.prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   progress=progress, description=f"{system.name}: {prompt_set.name}")
            for prompt, answer in zip(prompt_set.prompts, answers, strict=True):
                records.append({
                    "set": prompt_set.name,
                    "model": system.name,
                    "label": int(prompt.label),
                    "category": prompt.category,
                    "source_label": prompt.source_label,
                    "text": prompt.text,
                    "request": prompt.origin or prompt.text,
                    "image": None if prompt.image is None else str(prompt.image),
                    "source": prompt.source,
                    "generation": answer.text,
                    "refused": is_refusal(answer.text, refusal_texts),
                    "unsafe_prob": answer.unsafe_prob,
                })
    return records
