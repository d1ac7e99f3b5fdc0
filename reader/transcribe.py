"""Asking a model to transcribe images, and scoring the transcriptions.

Token accuracy is 1 - (token edit distance / reference tokens), floored at 0, over the language
model's own tokens of the whitespace-normalised texts: the reader's unit of output is a token, and
an edit distance does not punish one dropped word with every later word. Exact match compares the
whitespace-normalised strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from reader.corpus import normalise
from sasa_patcher.probes.features import padding_side

TRANSCRIBE_PROMPT = "Transcribe the text in the image."
MAX_NEW_TOKENS = 64


def transcription_messages() -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": TRANSCRIBE_PROMPT}]}]


def transcription_prompt(processor: ProcessorMixin) -> str:
    """The chat-formatted request, ending where the assistant's answer starts."""
    return processor.apply_chat_template(transcription_messages(), add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def transcribe(
    model: PreTrainedModel, processor: ProcessorMixin, images: Sequence[Image.Image], batch_size: int = 8
) -> list[str]:
    """Greedy transcriptions, batched with left padding (the answer starts at the same column)."""
    prompt = transcription_prompt(processor)
    answers: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        with padding_side(processor, "left"):
            inputs = processor(text=[prompt] * len(chunk), images=chunk, padding=True, return_tensors="pt")
        inputs = inputs.to(model.device)
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1] :]
        answers += [text.strip() for text in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def _edit_distance(reference: Sequence[int], hypothesis: Sequence[int]) -> int:
    previous = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        current = [i]
        for j, hyp in enumerate(hypothesis, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref != hyp)))
        previous = current
    return previous[-1]


def token_accuracy(reference: str, hypothesis: str, tokenizer) -> float:
    ref = tokenizer(normalise(reference), add_special_tokens=False).input_ids
    hyp = tokenizer(normalise(hypothesis), add_special_tokens=False).input_ids
    return max(0.0, 1.0 - _edit_distance(ref, hyp) / max(1, len(ref)))


def score(references: Sequence[str], hypotheses: Sequence[str], tokenizer) -> dict[str, float]:
    """Mean token accuracy and exact-match rate over paired texts."""
    accuracies = [token_accuracy(r, h, tokenizer) for r, h in zip(references, hypotheses, strict=True)]
    exact = [normalise(r) == normalise(h) for r, h in zip(references, hypotheses, strict=True)]
    return {"token_accuracy": sum(accuracies) / len(accuracies), "exact_match": sum(exact) / len(exact)}
