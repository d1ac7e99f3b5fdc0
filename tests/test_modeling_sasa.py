"""The patched graph against straightforward references, on tiny Qwen2-VL, Qwen2.5-VL and LLaVA."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sasa_patcher.modeling_sasa import CACHE_KEY, SasaCache, SasaSettings, sasa_project
from sasa_patcher.patching import patch_model, temporary_settings

S, F = 1, 3
REFUSAL = [7, 8, 9, 1]  # ends in the tiny models' end-of-sequence id
PROJECTIONS = [("replace", 1.0), ("residual", 0.5), ("interpolate", 0.3)]


def patched(family, **settings):
    base = family.build()
    reference = copy.deepcopy(base)
    model = patch_model(base, SasaSettings(S, F, refusal_token_ids=REFUSAL, **settings))
    return reference, model


def random_probe(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = model.sasa_probe.linear.weight
    weight.data = torch.randn(weight.shape, generator=generator) * 0.3


def layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def hooked_reference(reference, batch, projection: str, beta: float, eps: float) -> torch.Tensor:
    """Independent reference: capture H_s and H_f, then rerun with layer s's output replaced."""
    layers = reference.model.language_model.layers
    captured = {}
    handles = [
        layers[index].register_forward_hook(
            lambda module, args, output, index=index: captured.__setitem__(index, layer_output(output))
        )
        for index in (S, F)
    ]
    reference(**batch)
    for handle in handles:
        handle.remove()
    h_s, h_f = captured[S], captured[F]
    alpha = (h_s * h_f).sum(-1, keepdim=True) / ((h_f * h_f).sum(-1, keepdim=True) + eps)
    replacement = {"replace": alpha * h_f, "residual": h_s + beta * alpha * h_f,
                   "interpolate": (1 - beta) * h_s + beta * alpha * h_f}[projection]

    def replace(module, args, output):
        return (replacement, *output[1:]) if isinstance(output, tuple) else replacement

    handle = layers[S].register_forward_hook(replace)
    try:
        return reference(**batch).logits
    finally:
        handle.remove()


@torch.no_grad()
def test_identity_projection_gives_the_unpatched_logits(family):
    batch = family.make_batch([9], [True])
    for mode in ("gate", "augment"):
        reference, model = patched(family, projection="residual", beta=0.0, mode=mode)
        expected = reference(**batch).logits
        diff = (model(**batch).logits - expected).abs().max().item()
        assert diff <= 1e-6, f"{mode}: max abs diff {diff}"


@torch.no_grad()
@pytest.mark.parametrize("projection,beta", PROJECTIONS)
def test_two_pass_equals_hooked_reference(family, projection, beta):
    reference, model = patched(family, projection=projection, beta=beta, mode="augment")
    random_probe(model)
    batch = family.make_batch([11], [True])
    expected = hooked_reference(reference, batch, projection, beta, model.sasa.eps)
    output = model(**batch, output_sasa_features=True)
    assert (output.logits - expected).abs().max().item() <= 1e-5
    # The probe reads the projected stream's logits at the last position.
    features = output.sasa_features["projected-logits"]
    assert (features - expected[:, -1]).abs().max().item() <= 1e-5
    probe = model.sasa_probe.linear
    expected_prob = torch.sigmoid(expected[:, -1] @ probe.weight[0] + probe.bias)
    assert (output.unsafe_prob - expected_prob).abs().max().item() <= 1e-6


def test_projection_modes_match_the_formula():
    h_s, h_f = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    alpha = (h_s * h_f).sum(-1, keepdim=True) / ((h_f * h_f).sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(sasa_project(h_s, h_f, "replace", 1.0, 1e-6), alpha * h_f)
    torch.testing.assert_close(sasa_project(h_s, h_f, "residual", 0.0, 1e-6), h_s)
    torch.testing.assert_close(sasa_project(h_s, h_f, "interpolate", 1.0, 1e-6), alpha * h_f)


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["gate", "augment"])
def test_padded_batch_equals_one_by_one(family, side, mode):
    _, model = patched(family, mode=mode)
    random_probe(model)
    lengths, images = [5, 12, 8], [True, False, True]
    batch = family.make_batch(lengths, images, side=side)
    together = model(**batch)
    for row in range(3):
        alone_batch = family.make_batch([lengths[row]], [images[row]], seed=row)
        alone = model(**alone_batch)
        mask = batch["attention_mask"][row].bool()
        diff = (together.logits[row][mask] - alone.logits[0]).abs().max().item()
        assert diff <= 1e-5, f"row {row}: logits differ by {diff}"
        prob_diff = abs(together.unsafe_prob[row].item() - alone.unsafe_prob[0].item())
        assert prob_diff <= 1e-5, f"row {row}: unsafe_prob differs by {prob_diff}"


def greedy_without_cache(model, batch: dict, steps: int) -> torch.Tensor:
    """Recompute the whole sequence at every step: the reference for cached generation."""
    batch = dict(batch)
    generated = []
    for _ in range(steps):
        logits = model(**batch, use_cache=False).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        generated.append(token)
        batch["input_ids"] = torch.cat([batch["input_ids"], token], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(token).int()], 1)
    return torch.cat(generated, dim=1)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["gate", "augment"])
def test_cached_generation_equals_recomputation(family, mode):
    _, model = patched(family, mode=mode)
    model.generation_config.eos_token_id = None
    batch = family.make_batch([6, 10], [True, False])
    cached = model.generate(**batch, max_new_tokens=16, do_sample=False)
    new_tokens = cached[:, batch["input_ids"].shape[1]:]
    assert new_tokens.shape[1] == 16
    assert torch.equal(new_tokens, greedy_without_cache(model, batch, 16))


@torch.no_grad()
def test_gate_mode_refuses_flagged_rows_and_leaves_others_untouched(family):
    reference, model = patched(family, mode="gate")
    reference.generation_config.eos_token_id = None
    model.generation_config.eos_token_id = None
    random_probe(model)
    lengths, images = [6, 10, 8], [True, False, True]
    batch = family.make_batch(lengths, images)
    probs = model(**batch).unsafe_prob
    # Flag exactly the rows above the median probability.
    threshold = probs.median().item()
    model.set_sasa(SasaSettings(S, F, mode="gate", threshold=threshold, refusal_token_ids=[7, 8, 9, 1]))
    flagged = probs > threshold
    assert 0 < int(flagged.sum()) < 3
    output = model.generate(**batch, max_new_tokens=6, do_sample=False)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    for row in range(3):
        if flagged[row]:
            assert new_tokens[row, :4].tolist() == [7, 8, 9, 1]
        else:
            alone = family.make_batch([lengths[row]], [images[row]], seed=row)
            expected = reference.generate(**alone, max_new_tokens=6, do_sample=False)
            assert new_tokens[row].tolist() == expected[0, alone["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def test_augment_mode_keeps_two_caches(family):
    _, model = patched(family, mode="augment")
    cache = getattr(model(**family.make_batch([7], [False])), CACHE_KEY)
    assert isinstance(cache, SasaCache)
    assert cache.get_seq_length() == 7
    assert cache.projected.get_seq_length(S + 1) == 7


def test_plain_cache_is_refused(family):
    from transformers import DynamicCache

    _, model = patched(family)
    with pytest.raises(TypeError, match="SasaCache"):
        model(**family.make_batch([5], [False]), **{CACHE_KEY: DynamicCache()})


@torch.no_grad()
def test_the_cache_is_taken_under_either_name(family):
    """transformers >= 5.24 passes `cache`, earlier versions `past_key_values`; a caller may use either."""
    _, model = patched(family, mode="augment")
    prompt = family.make_batch([5], [False])
    step = {"input_ids": prompt["input_ids"][:, -1:], "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    logits = []
    for name in ("cache", "past_key_values"):
        cache = getattr(model(**prompt), CACHE_KEY)
        logits.append(model(**step, **{name: cache}).logits)
    assert torch.equal(logits[0], logits[1])
    with pytest.raises(ValueError, match="pass the cache once"):
        model(**step, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("mode", ["gate", "augment"])
def test_features_at_a_decode_step_are_refused(family, mode):
    _, model = patched(family, mode=mode)
    batch = family.make_batch([5], [False])
    with torch.no_grad():
        cache = getattr(model(**batch), CACHE_KEY)
        step = {"input_ids": batch["input_ids"][:, -1:], "attention_mask": torch.ones(1, 6, dtype=torch.long)}
        with pytest.raises(ValueError, match="without a cache"):
            model(**step, output_sasa_features=True, **{CACHE_KEY: cache})


def flag_rows_above(model, batch: dict) -> torch.Tensor:
    """Set the threshold to the lowest row's probability: every other row is flagged. Returns the flags."""
    probs = model(**batch, use_cache=False).unsafe_prob
    model.set_sasa(dataclasses.replace(model.sasa, threshold=float(probs.min())))
    return probs > probs.min()


@torch.no_grad()
def test_a_forward_only_loop_refuses_like_generate(family):
    """A simple server's loop: `model(**inputs)`, then one token per call with the returned cache."""
    _, model = patched(family, mode="gate")
    random_probe(model)
    model.generation_config.eos_token_id = None
    batch = family.make_batch([6, 10], [True, False])
    flagged = flag_rows_above(model, batch)
    expected = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    output = model(**batch)
    cache, mask = getattr(output, CACHE_KEY), batch["attention_mask"]
    tokens = [output.logits[:, -1].argmax(-1)]
    for _ in range(5):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        output = model(input_ids=tokens[-1][:, None], attention_mask=mask, **{CACHE_KEY: cache})
        tokens.append(output.logits[:, -1].argmax(-1))
    tokens = torch.stack(tokens, dim=1)
    assert tokens[flagged].tolist() == [REFUSAL + [REFUSAL[-1]] * 2]
    assert torch.equal(tokens, expected) and torch.equal(cache.flagged, flagged)


@torch.no_grad()
def test_a_new_user_turn_is_judged_again(family):
    """A chunk of several tokens after a past (a new user turn) is a prompt step: the probe judges it, and a benign
    turn after a refused one is answered with the model's own logits."""
    _, model = patched(family, mode="gate")
    random_probe(model)
    first, second = family.make_batch([8], [False], seed=1), family.make_batch([6], [False], seed=2)

    def turns() -> tuple:
        one = model(**first)
        cache = getattr(one, CACHE_KEY)
        flag_one = bool(cache.flagged[0])
        two = model(input_ids=second["input_ids"], attention_mask=torch.ones(1, 14, dtype=torch.long),
                    **{CACHE_KEY: cache})
        return one, two, flag_one, bool(cache.flagged[0])

    with temporary_settings(model, threshold=None):
        plain_one, plain_two, *flags = turns()
    assert flags == [False, False]
    if plain_one.unsafe_prob < plain_two.unsafe_prob:  # orient the bias-free probe: the first turn scores higher
        model.sasa_probe.linear.weight.data.neg_()
        with temporary_settings(model, threshold=None):
            plain_one, plain_two, *flags = turns()
    threshold = float(plain_one.unsafe_prob + plain_two.unsafe_prob) / 2
    with temporary_settings(model, threshold=threshold):
        one, two, flag_one, flag_two = turns()
    assert flag_one and not flag_two
    assert one.logits[0, -1].argmax().item() == REFUSAL[0]
    torch.testing.assert_close(two.unsafe_prob, plain_two.unsafe_prob, atol=0, rtol=0)
    torch.testing.assert_close(two.logits, plain_two.logits, atol=0, rtol=0)


@torch.no_grad()
def test_the_image_text_pipeline_refuses_through_the_model_alone():
    """`pipeline("image-text-to-text")` needs torchvision (its image processor path); runs where it is installed."""
    pytest.importorskip("torchvision")
    from tiny_genai import HARMFUL, tiny_model, tiny_processor
    from transformers import pipeline

    processor = tiny_processor()
    model = tiny_model("qwen2_5_vl", processor.tokenizer)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "text", "text": HARMFUL}]}]
    output = pipe(text=messages, max_new_tokens=60, do_sample=False, return_full_text=False)
    assert output[0]["generated_text"].strip() == model.sasa.refusal_text
