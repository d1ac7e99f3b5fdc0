"""SASA-patched vision-language models: one self-contained file, imports only torch and transformers.

This file is copied verbatim into every exported checkpoint and loaded there with
`trust_remote_code=True`, so it must not import anything from this project.

What the patched graph computes (Self-Aware Safety Augmentation, arXiv 2507.21637):
- pass 1: the unmodified decoder, layers 0..L-1 (the original stream);
- projection of the safety-perception layer's output `H_s` onto the semantic layer's output `H_f`
  (after the fixed linear semantic map `W`, identity by default), token by token;
- pass 2: layers s+1..L-1 again on the projected state, then the final norm and `lm_head`
  (the projected stream);
- a linear probe head on the projected stream at the last prompt position -> `unsafe_prob`.

No hooks: the patched classes subclass the transformers classes and run the decoder layers in an
explicit loop, so the same code traces to ONNX and runs under `from_pretrained` alone.

Per-architecture knowledge (where image features are merged, how multimodal position ids are made)
lives in the small adapter classes at the bottom of this file, one per architecture; the generic
two-pass logic never branches on the architecture.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
    Gemma3ForConditionalGeneration,
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.utils import ModelOutput

PROJECTION_MODES = ("replace", "residual", "interpolate")
SERVING_MODES = ("gate", "augment")
PROBE_FEATURES = ("projected-logits", "logits", "hidden", "multi-layer", "multi-layer-pooled")
PROJECTED_FEATURES = ("projected-logits", "hidden")  # the features read from the projected stream
# "multi-layer": the original stream's outputs of `probe_layers` at the last prompt position, concatenated;
# by default four evenly spaced middle layers (8, 12, 16, 20 of 30), which transfer to unseen hazards better
# than any single layer's state.
MULTI_LAYER_FRACTIONS = (0.27, 0.4, 0.53, 0.67)
# "multi-layer-pooled": per probe layer, the last prompt position's state and the mean over the last
# POOLED_TOKENS prompt positions (pads left out). Why: an image placed before the text shifts the last
# position's state; the tail of the prompt (the request's last words and the template) carries the intent
# whatever came before it. 16 is what leave-one-source-out AUROC picked among 8, 16, 32 on smol-qwen-vl's
# calibration split (results/calibration.md). The window needs no image mask, so every runtime computes it from the
# attention mask alone.
POOLED_TOKENS = 16
MULTI_LAYER_FEATURES = ("multi-layer", "multi-layer-pooled")  # the features that read `probe_layers`


def default_probe_layers(num_layers: int) -> list[int]:
    """Four evenly spaced middle layers (fewer on a very shallow model), sorted and distinct."""
    return sorted({min(num_layers - 1, max(0, round(num_layers * q))) for q in MULTI_LAYER_FRACTIONS})
DEFAULT_REFUSAL = "I'm sorry, but I can't help with that request."
# transformers 5.24 renamed the KV cache's argument and output field `past_key_values` -> `cache`
# (decoder layers, masks, model outputs, generation); artifacts load this file under either name.
CACHE_KEY = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@dataclass
class SasaSettings:
    """Everything that defines the patched graph; stored as the `sasa` section of `config.json`.

    `threshold` is a probability. `None` means the probe head is untrained (zero weights), so no row
    is ever flagged; the matching buffer in the graph is +inf. Calibration replaces both.
    `metrics` carries calibration figures (held-out AUROC, TPR, FPR, data digest, ...) verbatim.
    """

    safety_layer: int
    semantic_layer: int
    projection: str = "replace"
    beta: float = 1.0
    eps: float = 1e-6
    mode: str = "gate"
    refusal_text: str = DEFAULT_REFUSAL
    refusal_token_ids: list[int] = field(default_factory=list)
    probe_features: str = "projected-logits"
    probe_layers: list[int] = field(default_factory=list)  # the layers of the MULTI_LAYER_FEATURES
    threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_layers: int) -> None:
        """Raise ValueError naming the bad field and the valid range."""
        s, f = self.safety_layer, self.semantic_layer
        if s < 0 or f < 0:
            raise ValueError(f"layers must be non-negative, got s={s}, f={f}")
        if s >= f:
            raise ValueError(f"the safety layer s must come before the semantic layer f, got s={s}, f={f}")
        if f >= num_layers:
            raise ValueError(f"the semantic layer f={f} does not exist: the model has layers 0..{num_layers - 1}")
        if self.projection not in PROJECTION_MODES:
            raise ValueError(f"projection must be one of {PROJECTION_MODES}, got {self.projection!r}")
        if self.mode not in SERVING_MODES:
            raise ValueError(f"mode must be one of {SERVING_MODES}, got {self.mode!r}")
        if self.probe_features not in PROBE_FEATURES:
            raise ValueError(f"probe_features must be one of {PROBE_FEATURES}, got {self.probe_features!r}")
        if self.probe_features in MULTI_LAYER_FEATURES and not self.probe_layers:
            raise ValueError(f"the {self.probe_features} probe needs probe_layers "
                             "(e.g. default_probe_layers(num_layers))")
        bad = [layer for layer in self.probe_layers if not 0 <= layer < num_layers]
        if bad or len(set(self.probe_layers)) != len(self.probe_layers):
            raise ValueError(f"probe_layers must be distinct layers in 0..{num_layers - 1}, got {self.probe_layers}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability in [0, 1], got {self.threshold}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SasaSettings:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in values.items() if key in known})


def sasa_project(h_s: torch.Tensor, h_f: torch.Tensor, projection: str, beta: float, eps: float) -> torch.Tensor:
    """Eq. 8 token by token: alpha = <H_s, H_f> / (<H_f, H_f> + eps), H_s' = alpha * H_f (+ modes).

    Computed in float32 whatever the model dtype, because the ratio of two dot products is where
    bf16 loses the most.
    """
    hs, hf = h_s.float(), h_f.to(h_s.device).float()
    alpha = (hs * hf).sum(-1, keepdim=True) / ((hf * hf).sum(-1, keepdim=True) + eps)
    projected = alpha * hf
    if projection == "residual":
        projected = hs + beta * projected
    elif projection == "interpolate":
        projected = (1.0 - beta) * hs + beta * projected
    return projected.to(h_s.dtype)


class SemanticMap(nn.Module):
    """The fixed linear map W applied to H_f before the projection.

    Identity in the paper-faithful setting; stored as a weight so a calibrated map can replace it
    without changing the graph.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight.to(hidden.device, hidden.dtype))


class ProbeHead(nn.Module):
    """Logistic-regression safety probe: sigmoid(w . x + b), plus the decision threshold as a buffer.

    Computed in float32: a probe over 150k-dimensional logits is not reliable in bf16.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("threshold", torch.tensor(math.inf))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight.to(features.device, torch.float32)
        bias = self.linear.bias.to(features.device, torch.float32)
        return torch.sigmoid(F.linear(features.float(), weight, bias)).squeeze(-1)


class SasaCache(DynamicCache):
    """KV cache of the original stream (this object) plus the projected stream and per-row state.

    The projected stream (layers s+1..L-1) needs its own keys and values; the probe's verdict, the gate's
    state (`sasa_gate`) and the multimodal rope offsets are fixed at the prompt and carried through
    decoding here, so any loop that feeds the returned cache back (generate, or `model(**inputs)` by hand)
    gets the refusal. Beam search would have to reorder both caches and is refused by `generate`.
    """

    def __init__(self, config):
        super().__init__(config=config)
        self.projected = DynamicCache(config=config)
        # Sliding-window layers (Gemma 3) keep every position, as full layers: the mask applies the window,
        # and every layer's cache stays one length (the ONNX decoder's flat past/present tensors).
        for cache in (self, self.projected):
            cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer) else layer
                            for layer in cache.layers]
        self.unsafe_prob: torch.Tensor | None = None
        self.gate_state: torch.Tensor | None = None
        self.rope_deltas: torch.Tensor | None = None

    @property
    def flagged(self) -> torch.Tensor | None:
        """[B] bool: the rows gate mode answers with the refusal (None before the prompt)."""
        return None if self.gate_state is None else self.gate_state[:, 0] > 0.5


GATE_STATE_SIZE = 2  # (flag, refusal index): what `sasa_gate` carries from step to step
GATE_OTHER_LOGIT = -1e4  # a flagged row's logit for every token but the forced one (finite: fp16-safe)


def sasa_gate(
    logits: torch.Tensor, unsafe_prob: torch.Tensor, prompt_step: torch.Tensor, past_state: torch.Tensor,
    threshold: torch.Tensor, refusal_token_ids: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate mode's refusal as tensor arithmetic: the transformers forward and the ONNX decoder run this one code.

    `state` [B, 2] = (flag, index of the refusal token this step emits). On a prompt step (`prompt_step`, a
    bool scalar tensor: an empty past, or a chunk of several tokens such as a new user turn) the row's flag
    is `unsafe_prob > threshold` (float32) and the index restarts at 0; on a decode step both come from
    `past_state`, the index advancing by one up to the last refusal token (end-of-sequence, which then
    repeats). A flagged row's last-position logits are 0 at its refusal token and -1e4 elsewhere; an
    unflagged row's logits are returned untouched. Returns (logits, state).
    """
    state_dtype = past_state.dtype
    # threshold as a [1] tensor: a graph optimiser that merges equal scalar constants (onnxscript's) would
    # otherwise fold a threshold of 0.5 into the layers' own 0.5 constants
    flag = unsafe_prob.float() > threshold.float().reshape(1)
    fresh = torch.stack([flag.to(state_dtype), torch.zeros_like(past_state[:, 1])], -1)
    last_index = float(len(refusal_token_ids) - 1)
    advanced = torch.stack([past_state[:, 0], (past_state[:, 1] + 1).clamp(max=last_index)], -1)
    state = torch.where(prompt_step, fresh, advanced)
    refusal = torch.tensor(refusal_token_ids, dtype=torch.long, device=logits.device)
    token = refusal[state[:, 1].long()]
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    forced = torch.where(vocab[None] == token[:, None], 0.0, GATE_OTHER_LOGIT).to(logits.dtype)
    last = torch.where(state[:, :1] > 0.5, forced, logits[:, -1])
    return torch.cat([logits[:, :-1], last[:, None]], dim=1), state


@dataclass
class SasaOutput(ModelOutput):
    """`logits` of the serving stream, `unsafe_prob` per batch row (the prompt's verdict).

    `sasa_features` (only when asked for) holds every probe-feature candidate at the last prompt
    position, plus `layer_states`: the original stream's output of every layer there.
    """

    logits: torch.Tensor | None = None
    unsafe_prob: torch.Tensor | None = None
    if CACHE_KEY == "cache":
        cache: SasaCache | None = None
    else:
        past_key_values: SasaCache | None = None
    sasa_features: dict[str, torch.Tensor] | None = None


def one_cache(cache: SasaCache | None, past_key_values: SasaCache | None) -> SasaCache | None:
    """The cache under whichever name the caller's transformers version uses; both at once is ambiguous."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache once: as `cache` (transformers >= 5.24) or as `past_key_values`")
    return cache if cache is not None else past_key_values


def text_positions(
    attention_mask: torch.Tensor | None, past_length: int, seq_len: int, batch: int, device: torch.device
) -> torch.Tensor:
    """1-D positions that skip padding, so a left-padded row sees the positions it sees alone."""
    if attention_mask is None or attention_mask.ndim != 2:
        positions = torch.arange(past_length, past_length + seq_len, device=device)
        return positions.unsqueeze(0).expand(batch, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    return positions[:, -seq_len:]


def chunk_masks(masks: dict, past_length: int) -> dict:
    """The attention masks restricted to the chunk's own keys: what the probe's uncached passes see.

    On a prompt step after a past (a new user turn) the probe judges the new turn's tokens among themselves.
    """
    # sliced from the past's end, not `-seq_len`: two masks sliced by `-seq_len` fail torch.export (Gemma 3)
    return {name: (mask[..., past_length:] if mask is not None else None) for name, mask in masks.items()}


def last_token_index(attention_mask: torch.Tensor | None, seq_len: int, batch: int, device) -> torch.Tensor:
    """Index of the last non-pad token of each row in the current chunk (left or right padding)."""
    if attention_mask is None or attention_mask.ndim != 2:
        return torch.full((batch,), seq_len - 1, device=device, dtype=torch.long)
    chunk = attention_mask[:, -seq_len:].long()
    return seq_len - 1 - chunk.flip(-1).argmax(-1)


def tail_weights(attention_mask: torch.Tensor | None, seq_len: int, last: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, T] float32: 1 at the last `tokens` prompt positions of the chunk up to `last` that are not pads."""
    positions = torch.arange(seq_len, device=last.device)[None, :]
    window = (positions <= last[:, None]) & (positions > last[:, None] - tokens)
    if attention_mask is not None and attention_mask.ndim == 2:
        window = window & attention_mask[:, -seq_len:].bool()
    return window.float()


def tail_mean(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of `states` [B, T, D] over the positions `weights` marks (computed in float32)."""
    total = (states.float() * weights[..., None]).sum(1)
    return (total / weights.sum(1, keepdim=True).clamp_min(1.0)).to(states.dtype)


class SasaMixin:
    """The generic two-pass forward and generation; adapters below supply the architecture bits."""

    _sasa_architecture: str = ""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.init_sasa(SasaSettings.from_dict(config.sasa))

    # ----- set-up ---------------------------------------------------------------------------
    def init_sasa(self, settings: SasaSettings) -> None:
        """Add the fixed SASA modules (identity map, untrained probe) and record the settings."""
        text_config = self.config.get_text_config()
        settings.validate(text_config.num_hidden_layers)
        reference = self.get_output_embeddings().weight
        in_features = {"hidden": text_config.hidden_size,
                       "multi-layer": text_config.hidden_size * len(settings.probe_layers),
                       "multi-layer-pooled": 2 * text_config.hidden_size * len(settings.probe_layers)}.get(
            settings.probe_features, reference.shape[0])
        self.sasa_semantic_map = SemanticMap(text_config.hidden_size).to(reference.device, reference.dtype)
        self.sasa_probe = ProbeHead(in_features).to(reference.device)
        if settings.threshold is not None:
            self.sasa_probe.threshold.fill_(settings.threshold)
        self.sasa = settings
        self.config.sasa = settings.to_dict()

    def set_sasa(self, settings: SasaSettings) -> None:
        """Replace the settings that do not change tensor shapes (layers, modes, threshold, text)."""
        settings.validate(self.config.get_text_config().num_hidden_layers)
        if settings.probe_features != self.sasa.probe_features or (
            settings.probe_features in MULTI_LAYER_FEATURES
            and list(settings.probe_layers) != list(self.sasa.probe_layers)
        ):
            raise ValueError("changing probe_features (or probe_layers) changes the probe: call init_sasa instead")
        self.sasa = settings
        self.config.sasa = settings.to_dict()
        self.sasa_probe.threshold.fill_(math.inf if settings.threshold is None else settings.threshold)

    # ----- architecture adapter interface --------------------------------------------------
    def sasa_text_model(self) -> nn.Module:
        """The decoder stack: `embed_tokens`, `layers`, `norm`, `rotary_emb`, `config`."""
        return self.model.language_model

    def sasa_input_embeddings(self, input_ids, inputs_embeds, multimodal: dict) -> torch.Tensor:
        """Token embeddings with every image's features at its placeholder tokens (row-major, as upstream)."""
        if inputs_embeds is None:
            inputs_embeds = self.model.get_input_embeddings()(input_ids)
        if multimodal.get("pixel_values") is None:
            return inputs_embeds
        features = self.sasa_image_features(multimodal).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(self.sasa_image_mask(input_ids, inputs_embeds, features), features)

    def sasa_image_features(self, multimodal: dict) -> torch.Tensor:
        """Every image's features, [image tokens of all images, hidden]: what replaces the placeholders."""
        raise NotImplementedError

    def sasa_image_mask(self, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        """Where the image features go: the base model's placeholder mask for images."""
        raise NotImplementedError

    def sasa_positions(self, position_ids, input_ids, attention_mask, past_length, embeds, cache, multimodal):
        """Return (text positions [B, T] for the mask, rotary positions as the rotary module wants)."""
        raise NotImplementedError

    def sasa_forget_multimodal_state(self) -> None:
        """Clear per-prompt state the base class keeps on the module between calls (none for most families)."""

    def sasa_masks(self, text_model, inputs_embeds, attention_mask, cache, text_pos, multimodal: dict) -> dict:
        """The attention mask of each layer type; `multimodal` holds the family's extra inputs (e.g. token types)."""
        return self._masks(text_model, inputs_embeds, attention_mask, cache, text_pos)

    def sasa_rotary(self, text_model, inputs_embeds, rope_pos):
        """The rotary embeddings the layers take: one pair, or a dict by layer type (Gemma 3: local and global)."""
        return text_model.rotary_emb(inputs_embeds, rope_pos)

    # ----- the two passes -------------------------------------------------------------------
    def _masks(self, text_model, inputs_embeds, attention_mask, cache, text_pos, **overlay) -> dict:
        """The causal (and sliding-window) masks; `overlay`: extra mask arguments (Gemma 3's image blocks)."""
        if isinstance(attention_mask, dict):
            return attention_mask
        kwargs = dict(
            config=text_model.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=text_pos,
            **{CACHE_KEY: cache},
            **overlay,
        )
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self._layer_types(text_model):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    @staticmethod
    def _layer_types(text_model) -> list[str]:
        config = text_model.config
        return getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers

    def _run_layers(self, text_model, hidden, layer_ids, masks, rotary, text_pos, cache) -> tuple:
        """Run the given decoder layers; return the final hidden state and each layer's output."""
        layer_types = self._layer_types(text_model)
        outputs = {}
        for index in layer_ids:
            layer_cache = cache(index) if callable(cache) else cache
            hidden = text_model.layers[index](
                hidden,
                attention_mask=masks[layer_types[index]],
                position_embeddings=rotary[layer_types[index]] if isinstance(rotary, dict) else rotary,
                position_ids=text_pos,
                use_cache=layer_cache is not None,
                **{CACHE_KEY: layer_cache},
            )
            outputs[index] = hidden
        return hidden, outputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: SasaCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        output_sasa_features: bool | tuple[str, ...] = False,
        output_sasa_sequence_states: bool = False,
        past_key_values: SasaCache | None = None,
        **kwargs,
    ) -> SasaOutput:
        """Keyword arguments beyond the named ones are the family's image inputs (`pixel_values`, ...).

        The cache arrives as `cache` (transformers >= 5.24) or `past_key_values` (earlier).
        `output_sasa_features`: True for every probe candidate, or the names of the ones wanted (the
        projected stream runs only when one of them reads it). `output_sasa_sequence_states`: also
        every layer's output at every position (`sasa_features["sequence_states"]`, [B, L, T, D]), what
        `sasa_projected_candidates` continues from once (s, f) is known.
        """
        multimodal = kwargs
        settings = self.sasa
        text_model = self.sasa_text_model()
        num_layers = text_model.config.num_hidden_layers
        cache = one_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, SasaCache):
            raise TypeError("SASA models need a SasaCache (two streams); pass None to start a new one")
        use_cache = self.config.get_text_config().use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = SasaCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        prefill = past_length == 0
        seq_len = (inputs_embeds if input_ids is None else input_ids).shape[1]
        prompt_step = prefill or seq_len > 1  # a new user turn appended to the conversation is judged again
        extracting = output_sasa_features is not False and output_sasa_features is not None
        if extracting and not prefill:
            # The uncached streams the features need would see only the new tokens, not the prompt.
            raise ValueError("output_sasa_features reads a prompt: call it without a cache (a fresh one)")
        wanted = set(PROBE_FEATURES if output_sasa_features is True else output_sasa_features) if extracting else None

        embeds, text_pos, masks, rotary = self._sasa_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, past_length, cache, multimodal
        )
        batch, seq_len = embeds.shape[:2]

        augment = settings.mode == "augment"
        original, projected, per_layer = self.sasa_serving_streams(
            text_model, embeds, masks, rotary, text_pos, cache, all_original_layers=extracting
        )
        serving = projected if augment else original
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(text_model.norm(serving[:, keep]))

        unsafe_prob, features = None, None
        if prompt_step or extracting:
            rows = torch.arange(batch, device=embeds.device)
            last = last_token_index(attention_mask, seq_len, batch, embeds.device)
            features = self.sasa_probe_features(
                text_model, per_layer, original, projected, chunk_masks(masks, past_length), rotary, text_pos, rows,
                last, wanted, attention_mask=attention_mask,
            )
            if settings.probe_features in features:  # absent only when the caller asked for other candidates
                unsafe_prob = self.sasa_probe(features[settings.probe_features])
            if extracting:
                features["layer_states"] = torch.stack([per_layer[i][rows, last] for i in range(num_layers)], 1)
            if output_sasa_sequence_states:
                features["sequence_states"] = torch.stack([per_layer[i] for i in range(num_layers)], 1)
        if cache is not None:
            if prompt_step:
                cache.unsafe_prob = unsafe_prob
            unsafe_prob = cache.unsafe_prob
            if not augment and unsafe_prob is not None:
                logits = self._gate(logits, unsafe_prob, prompt_step, cache)
        return SasaOutput(
            logits=logits,
            unsafe_prob=unsafe_prob,
            sasa_features=features if extracting else None,
            **{CACHE_KEY: cache if use_cache else None},
        )

    def sasa_serving_streams(self, text_model, embeds, masks, rotary, text_pos, cache, all_original_layers=False):
        """The streams every step needs: return (original, projected, per-layer original outputs).

        gate: the original stream, layers 0..L-1, cached; `projected` is None (the probe pass makes it).
        augment: the original stream up to layer f (cached; layers f+1..L-1 uncached and only with
        `all_original_layers`, else `original` is None), then the cached projected stream.
        """
        settings = self.sasa
        num_layers = text_model.config.num_hidden_layers
        f = settings.semantic_layer
        augment = settings.mode == "augment"
        last_original = num_layers - 1 if (not augment or all_original_layers) else f

        def original_cache(index: int):
            # In augment mode the original stream is only ever continued up to layer f.
            if cache is None or (augment and index > f):
                return None
            return cache

        original, per_layer = self._run_layers(
            text_model, embeds, range(last_original + 1), masks, rotary, text_pos, original_cache
        )
        if last_original < num_layers - 1:
            original = None
        projected = None
        if augment:
            projected = self._projected_stream(
                text_model, per_layer, masks, rotary, text_pos, cache.projected if cache is not None else None
            )
        return original, projected, per_layer

    def _projected_stream(self, text_model, per_layer, masks, rotary, text_pos, cache) -> torch.Tensor:
        """Project H_s onto W H_f and run layers s+1..L-1 again on the result."""
        settings = self.sasa
        s, f = settings.safety_layer, settings.semantic_layer
        start = sasa_project(
            per_layer[s], self.sasa_semantic_map(per_layer[f]), settings.projection, settings.beta, settings.eps
        )
        projected, _ = self._run_layers(
            text_model, start, range(s + 1, text_model.config.num_hidden_layers), masks, rotary, text_pos, cache
        )
        return projected

    def sasa_probe_features(
        self, text_model, per_layer, original, projected, masks, rotary, text_pos, rows, last, wanted=None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict:
        """The probe's input at (rows, last), completing whichever stream the serving pass left out, uncached.

        `wanted`: the candidate names to compute (feature extraction); None: the probe's own feature.
        gate: the projected stream is run here (prompt only, no cache) when a wanted feature reads it.
        augment: the original stream's layers f+1..L-1 are run here when the unprojected logits or a
        multi-layer state above f are wanted. Only `per_layer[s]`, `per_layer[f]` and the probe layers
        are read (every layer's output extends `per_layer`). `attention_mask` (2-D, past and chunk) keeps pads
        out of the pooled feature's window.
        """
        settings = self.sasa
        f, num_layers = settings.semantic_layer, text_model.config.num_hidden_layers
        wanted = {settings.probe_features} if wanted is None else set(wanted)
        layers = list(settings.probe_layers) or default_probe_layers(num_layers)
        needs_original = "logits" in wanted or (bool(wanted & set(MULTI_LAYER_FEATURES)) and max(layers) > f)
        if original is None and needs_original:
            original, more = self._run_layers(
                text_model, per_layer[f], range(f + 1, num_layers), masks, rotary, text_pos, None
            )
            per_layer.update(more)
        candidates = {}
        if wanted & set(PROJECTED_FEATURES):
            if projected is None:
                projected = self._projected_stream(text_model, per_layer, masks, rotary, text_pos, None)
            candidates.update(self._projected_candidates(text_model, projected, rows, last))
        if "logits" in wanted:
            candidates["logits"] = self.lm_head(text_model.norm(original[rows, last]))
        if "multi-layer" in wanted:
            candidates["multi-layer"] = torch.cat([per_layer[layer][rows, last] for layer in layers], dim=-1)
        if "multi-layer-pooled" in wanted:
            seq_len = per_layer[layers[0]].shape[1]
            weights = tail_weights(attention_mask, seq_len, last, POOLED_TOKENS)
            lasts = [per_layer[layer][rows, last] for layer in layers]
            candidates["multi-layer-pooled"] = torch.cat(
                lasts + [tail_mean(per_layer[layer], weights) for layer in layers], dim=-1)
        return candidates

    def _projected_candidates(self, text_model, projected, rows, last) -> dict:
        projected_hidden = text_model.norm(projected[rows, last])
        return {"projected-logits": self.lm_head(projected_hidden), "hidden": projected_hidden}

    @torch.no_grad()
    def sasa_projected_candidates(
        self, safety_states: torch.Tensor, semantic_states: torch.Tensor, input_ids=None, attention_mask=None,
        **multimodal,
    ) -> dict:
        """The projected candidates of a prompt batch from its stored layer-s and layer-f outputs.

        Why: calibration with localised layers learns (s, f) only after every prompt has been through
        the model once (`output_sasa_sequence_states`); this runs only layers s+1..L-1 instead of a
        second full forward. `input_ids`, `attention_mask` and the image inputs are the batch's own
        (positions and masks come from them; the decoder layers below s are not run).
        """
        text_model = self.sasa_text_model()
        embeds, text_pos, masks, rotary = self._sasa_inputs(input_ids, None, attention_mask, None, 0, None, multimodal)
        settings = self.sasa
        per_layer = {settings.safety_layer: safety_states, settings.semantic_layer: semantic_states}
        projected = self._projected_stream(text_model, per_layer, masks, rotary, text_pos, None)
        batch, seq_len = embeds.shape[:2]
        rows = torch.arange(batch, device=embeds.device)
        last = last_token_index(attention_mask, seq_len, batch, embeds.device)
        return self._projected_candidates(text_model, projected, rows, last)

    def _sasa_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_length, cache, multimodal):
        """(embeddings, text positions, attention masks, rotary embeddings): what every layer call needs."""
        for ignored in ("return_dict", "output_attentions", "output_hidden_states", "cache_position"):
            multimodal.pop(ignored, None)
        text_model = self.sasa_text_model()
        embeds = self.sasa_input_embeddings(input_ids, inputs_embeds, multimodal)
        text_pos, rope_pos = self.sasa_positions(
            position_ids, input_ids, attention_mask, past_length, embeds, cache, multimodal
        )
        masks = self.sasa_masks(text_model, embeds, attention_mask, cache, text_pos, multimodal)
        return embeds, text_pos, masks, self.sasa_rotary(text_model, embeds, rope_pos)

    def _gate(self, logits: torch.Tensor, unsafe_prob: torch.Tensor, prompt_step: bool, cache: SasaCache):
        """Gate mode with a cache: `sasa_gate` on the last position, its state kept in the cache."""
        batch = logits.shape[0]
        past_state = cache.gate_state if cache.gate_state is not None else logits.new_zeros(batch, GATE_STATE_SIZE)
        refusal = self.sasa.refusal_token_ids
        threshold = self.sasa_probe.threshold.to(logits.device)
        if not refusal:
            if prompt_step and bool((unsafe_prob > threshold).any()):
                raise ValueError("gate mode needs sasa.refusal_token_ids (set by the patcher from the tokenizer)")
            return logits
        logits, cache.gate_state = sasa_gate(logits, unsafe_prob, torch.tensor(prompt_step), past_state.float(),
                                             threshold, refusal)
        return logits

    def sasa_logit_lens(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits read off intermediate states through the final norm and lm_head."""
        return self.lm_head(self.sasa_text_model().norm(states))

    # ----- generation -----------------------------------------------------------------------
    def generate(self, *args, **kwargs):
        """`transformers` generation with a two-stream cache; gate mode forces refusals per row."""
        config = kwargs.get("generation_config") or self.generation_config
        if (kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1) != 1:
            raise ValueError("SASA generation supports greedy and sampling decoding, not beam search")
        if kwargs.get("use_cache") is False:
            raise ValueError("SASA generation needs the KV cache (use_cache=True)")
        cache = one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None))
        if cache is None:
            cache = SasaCache(self.config)
        kwargs[CACHE_KEY] = cache
        return super().generate(*args, **kwargs)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """Image inputs reach `forward` through **kwargs: accept whatever the base class's forward does."""
        base_arguments = set(inspect.signature(transformers_base_class(type(self)).forward).parameters)
        super()._validate_model_kwargs({k: v for k, v in model_kwargs.items() if k not in base_arguments})


# ===== Architecture adapters: everything that differs between model families lives below. =====


class _QwenVLAdapter(SasaMixin):
    """Qwen2-VL family: images merged at `<|image_pad|>`, 3-D multimodal rotary positions (M-RoPE)."""

    def sasa_input_embeddings(self, input_ids, inputs_embeds, multimodal: dict) -> torch.Tensor:
        if multimodal.get("pixel_values_videos") is not None:
            raise NotImplementedError("video inputs are not supported by the SASA patch yet")
        return super().sasa_input_embeddings(input_ids, inputs_embeds, multimodal)

    def sasa_image_mask(self, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        image_mask, _ = self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=features)
        return image_mask

    def sasa_image_features(self, multimodal: dict) -> torch.Tensor:
        grid = multimodal["image_grid_thw"]
        features = self.model.get_image_features(multimodal["pixel_values"], grid, return_dict=True).pooler_output
        return torch.cat(list(features), dim=0)

    def sasa_positions(self, position_ids, input_ids, attention_mask, past_length, embeds, cache, multimodal):
        if position_ids is not None:
            if position_ids.ndim == 3 and position_ids.shape[0] == 4:  # text row + 3 M-RoPE rows
                return position_ids[0], position_ids[1:]
            if position_ids.ndim == 2:
                return position_ids, position_ids[None].expand(3, -1, -1)
            # [3, B, T] M-RoPE rows (ONNX Runtime GenAI's contract): text positions from the mask
            batch, seq_len = embeds.shape[:2]
            return text_positions(attention_mask, past_length, seq_len, batch, embeds.device), position_ids
        batch, seq_len = embeds.shape[:2]
        text = text_positions(attention_mask, past_length, seq_len, batch, embeds.device)
        if past_length > 0:
            deltas = cache.rope_deltas if cache is not None and cache.rope_deltas is not None else 0
            return text, (text + deltas)[None].expand(3, -1, -1)
        if multimodal.get("image_grid_thw") is None:
            rope = text[None].expand(3, -1, -1)
            deltas = torch.zeros(batch, 1, dtype=torch.long, device=embeds.device)
        else:
            token_types = multimodal.get("mm_token_type_ids")
            if token_types is None:
                token_types = (input_ids == self.config.image_token_id).int()
            rope, deltas = self.model.get_rope_index(
                input_ids,
                mm_token_type_ids=token_types,
                image_grid_thw=multimodal["image_grid_thw"],
                attention_mask=attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None,
            )
        if cache is not None:
            cache.rope_deltas = deltas
        return text, rope

    def sasa_forget_multimodal_state(self) -> None:
        """Clear the rope deltas the transformers Qwen-VL model keeps on the module after a multimodal prompt.

        The base forward recomputes them only for prompts with images and applies the stored ones to later
        decode steps, so a text-only run of the base forward after an image prompt decodes with stale
        positions, or fails when the batch sizes differ. The patched forward keeps them in its cache.
        """
        if getattr(self.model, "rope_deltas", None) is not None:
            self.model.rope_deltas = None


class SasaQwen2VLForConditionalGeneration(_QwenVLAdapter, Qwen2VLForConditionalGeneration):
    """Qwen2-VL with SASA."""

    _sasa_architecture = "qwen2_vl"


class SasaQwen2_5_VLForConditionalGeneration(_QwenVLAdapter, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL with SASA: same merge and M-RoPE contract as Qwen2-VL for images."""

    _sasa_architecture = "qwen2_5_vl"


class SasaLlavaForConditionalGeneration(SasaMixin, LlavaForConditionalGeneration):
    """LLaVA (CLIP tower + projector + Llama text model) with SASA: 1-D rotary positions."""

    _sasa_architecture = "llava"

    def sasa_image_mask(self, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        return self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=features)

    def sasa_image_features(self, multimodal: dict) -> torch.Tensor:
        features = self.model.get_image_features(
            pixel_values=multimodal["pixel_values"],
            vision_feature_layer=multimodal.get("vision_feature_layer", self.config.vision_feature_layer),
            vision_feature_select_strategy=multimodal.get(
                "vision_feature_select_strategy", self.config.vision_feature_select_strategy
            ),
            image_sizes=multimodal.get("image_sizes"),
            return_dict=True,
        ).pooler_output
        return torch.cat(list(features), dim=0)

    def sasa_positions(self, position_ids, input_ids, attention_mask, past_length, embeds, cache, multimodal):
        if position_ids is None:
            batch, seq_len = embeds.shape[:2]
            position_ids = text_positions(attention_mask, past_length, seq_len, batch, embeds.device)
        return position_ids, position_ids


class SasaGemma3ForConditionalGeneration(SasaMixin, Gemma3ForConditionalGeneration):
    """Gemma 3 (SigLIP tower + pooled projector + Gemma 3 text model) with SASA: 1-D rotary positions, local
    (sliding-window) and global layers with their own rotary bases, bidirectional attention inside each image.

    `token_type_ids` (1 at image tokens, the processor's output) is the one extra input: with it the masks let
    the tokens of one image attend to each other in both directions, as the base model does.
    """

    _sasa_architecture = "gemma3"

    def init_sasa(self, settings: SasaSettings) -> None:
        text = self.config.get_text_config()
        if text.final_logit_softcapping is not None:
            raise ValueError("Gemma 3 with final_logit_softcapping is not supported: the patched streams read the "
                             "logits through lm_head alone (no published Gemma 3 checkpoint sets it)")
        if self.config.mm_tokens_per_image > text.sliding_window:
            raise ValueError(f"an image of {self.config.mm_tokens_per_image} tokens exceeds the sliding window "
                             f"({text.sliding_window}): the sliding layers' image-block mask assumes it fits")
        super().init_sasa(settings)

    def sasa_input_embeddings(self, input_ids, inputs_embeds, multimodal: dict) -> torch.Tensor:
        if inputs_embeds is None and input_ids is not None and self.config.image_token_id >= self.model.vocab_size:
            # An image token outside the vocabulary embeds as pad, as the base model does
            inputs_embeds = self.model.get_input_embeddings()(input_ids.masked_fill(
                input_ids == self.config.image_token_id, 0))
        return super().sasa_input_embeddings(input_ids, inputs_embeds, multimodal)

    def sasa_image_mask(self, input_ids, inputs_embeds, features: torch.Tensor) -> torch.Tensor:
        return self.model.get_placeholder_mask(input_ids, inputs_embeds, image_features=features)

    def sasa_image_features(self, multimodal: dict) -> torch.Tensor:
        features = self.model.get_image_features(multimodal["pixel_values"], return_dict=True).pooler_output
        return features.reshape(-1, features.shape[-1])

    def sasa_positions(self, position_ids, input_ids, attention_mask, past_length, embeds, cache, multimodal):
        if position_ids is None:
            batch, seq_len = embeds.shape[:2]
            position_ids = text_positions(attention_mask, past_length, seq_len, batch, embeds.device)
        return position_ids, position_ids

    def sasa_masks(self, text_model, inputs_embeds, attention_mask, cache, text_pos, multimodal: dict) -> dict:
        """With `token_type_ids` ([B, chunk], 1 = image token): causal OR same-image block, as Gemma 3 masks.

        The sliding layers get OR(sliding causal, block), index-based (traceable; the base model's AND(window,
        OR(causal, block)) goes through vmap, which torch.export cannot trace inside the probe's branch):
        the same mask while an image's tokens fit the window (256 <= 1024 in every Gemma 3; checked at init).
        """
        token_types = multimodal.get("token_type_ids")
        if token_types is None:
            return super().sasa_masks(text_model, inputs_embeds, attention_mask, cache, text_pos, multimodal)
        if attention_mask is not None and attention_mask.ndim == 2:
            past = attention_mask.shape[-1] - inputs_embeds.shape[1]
        else:
            past = cache.get_seq_length() if cache is not None else 0
        # Block ids index absolute positions: the chunk's token types sit after the past.
        is_image = F.pad(token_types.to(inputs_embeds.device) == 1, (past, 0))
        starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
        blocks = torch.where(is_image, torch.cumsum(starts.long(), -1) - 1, -1)
        return self._masks(text_model, inputs_embeds, attention_mask, cache, text_pos, block_sequence_ids=blocks)

    def sasa_rotary(self, text_model, inputs_embeds, rope_pos) -> dict:
        return {kind: text_model.rotary_emb(inputs_embeds, rope_pos, kind) for kind in dict.fromkeys(
            self._layer_types(text_model))}


SASA_CLASSES: dict[str, type[SasaMixin]] = {
    cls._sasa_architecture: cls
    for cls in (
        SasaQwen2VLForConditionalGeneration,
        SasaQwen2_5_VLForConditionalGeneration,
        SasaLlavaForConditionalGeneration,
        SasaGemma3ForConditionalGeneration,
    )
}


def transformers_base_class(cls: type) -> type:
    """The transformers class a patched class extends (e.g. Qwen2VLForConditionalGeneration)."""
    return next(base for base in cls.__mro__ if base.__module__.startswith("transformers."))


def _register_checkpoint_names(cls: type) -> None:
    """Give each patched class its base's load-time key renaming.

    transformers 5 renames checkpoint keys on load (Qwen2-VL `model.layers.*` ->
    `model.language_model.layers.*`, ...) but skips classes defined outside the library unless their
    name is registered; without this, an artifact linking the base's own shards loads random weights.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    base = transformers_base_class(cls)
    mapping = get_checkpoint_conversion_mapping(base.__name__) or get_checkpoint_conversion_mapping(
        base.config_class.model_type
    )
    if mapping:
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


for _sasa_class in SASA_CLASSES.values():
    _register_checkpoint_names(_sasa_class)
    # The probe is float32 by design: keep it (and its threshold) float32 when loaded in bf16/fp16.
    _sasa_class._keep_in_fp32_modules_strict = [
        *(transformers_base_class(_sasa_class)._keep_in_fp32_modules_strict or []),
        "sasa_probe",
    ]
