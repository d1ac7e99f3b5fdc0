"""Utility of a system next to its base: teacher-forced next-token distributions on the benign text prompts.

Scored positions are the tokens of the user's own text inside the chat-formatted prompt (template
tokens and the system prompt are near-deterministic and would flatter every model alike); position t's
distribution predicts token t+1. Mean per-token KL(base || system) in nats over all scored tokens
pooled, and perplexity = exp(mean negative log-likelihood of the actual next token) over the same
tokens. Why the prompt text and not an answer: it is human-written, identical for every model, and
needs no generation; a base-generated answer would be the base's own greedy choice and bias the
comparison. Gate mode serves the original stream, so its KL to the base is 0 up to float noise: that
is the point of gate. Augment serves the projected stream at every position, which is what KL measures.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from sasa_patcher.probes.datasets import Prompt
from sasa_patcher.probes.features import batched, encode_prompts, length_order, prompt_texts


def user_text_mask(processor, prompts: Sequence[Prompt], input_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, T]: the tokens of each prompt's own text inside its left-padded chat-formatted encoding.

    Found from the tokenizer's character offsets on the rendered chat, right-aligned to the batch
    (left padding); the token ids are checked against the batch so a misalignment fails loudly.
    Tokens that straddle the text's edges (merged with template characters) are left out.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    mask = torch.zeros(input_ids.shape, dtype=torch.bool)
    for row, (prompt, rendered) in enumerate(zip(prompts, prompt_texts(processor, prompts), strict=True)):
        if prompt.image is not None:
            raise ValueError("the utility metrics are computed on text-only prompts")
        start = rendered.rfind(prompt.text)
        if start < 0:
            raise ValueError(f"the chat template changed the prompt text: {prompt.text[:60]!r}")
        end = start + len(prompt.text)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        if input_ids[row, input_ids.shape[1] - len(ids):].tolist() != list(ids):
            raise ValueError("the batch's token ids differ from the rendered chat's; cannot locate the user text")
        inside = [start <= begin and finish <= end and finish > begin for begin, finish in offsets]
        mask[row, input_ids.shape[1] - len(ids):] = torch.tensor(inside, dtype=torch.bool)
    return mask


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_reference || P) in nats for each row of [N, V] logits, computed in float64."""
    reference = torch.log_softmax(reference_logits.double(), dim=-1)
    other = torch.log_softmax(logits.double(), dim=-1)
    return (reference.exp() * (reference - other)).sum(-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats of each target token under its row of [N, V] logits (float64)."""
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return -log_probs.gather(-1, targets.long()[:, None]).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean negative log-likelihood per token)."""
    return float(torch.exp(nll.double().mean()))


def utility_metrics(
    systems: Sequence, processor, prompts: Sequence[Prompt], *, batch_size: int, progress: bool = True,
) -> dict:
    """KL to the first system (the base) and perplexity, teacher-forced on the user text of `prompts`.

    Returns per system: `kl_to_base` (mean per token, nats), `kl_to_base_max` (largest per-token
    value), `perplexity`, and the `tokens` and `prompts` scored.
    """
    nll: dict[str, list[torch.Tensor]] = {system.name: [] for system in systems}
    kl: dict[str, list[torch.Tensor]] = {system.name: [] for system in systems}
    with tqdm(total=len(prompts), desc="utility (teacher-forced)", unit="prompt", disable=not progress,
              leave=False) as bar:
        for rows in batched(length_order(prompts), batch_size):
            chunk = [prompts[i] for i in rows]
            batch = encode_prompts(processor, chunk)
            scored = user_text_mask(processor, chunk, batch["input_ids"])[:, 1:]
            targets = batch["input_ids"][:, 1:][scored]
            reference = None
            for system in systems:
                logits = system.logits(batch)[:, :-1][scored]
                reference = logits if reference is None else reference
                nll[system.name].append(token_nll(logits, targets))
                kl[system.name].append(token_kl(reference, logits))
            bar.update(len(rows))
    result = {}
    for system in systems:
        name = system.name
        system_kl, system_nll = torch.cat(kl[name]), torch.cat(nll[name])
        result[name] = {"kl_to_base": float(system_kl.mean()), "kl_to_base_max": float(system_kl.max()),
                        "perplexity": perplexity(system_nll), "tokens": int(system_nll.numel()),
                        "prompts": len(prompts)}
    return result
