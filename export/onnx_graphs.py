"""The SASA-patched model as three ONNX graphs (the artifact around them: `export/onnx_export.py`).

    vision_encoder.onnx       pixel values -> image features, as the decoder consumes them. Qwen:
                              any image size, any number of images per call (pixel rows +
                              image_grid_thw, `export/onnx_vision.py`); LLaVA: one image of its
                              one size per call
    embed_tokens.onnx         input_ids + the features of every image in the batch -> inputs_embeds;
                              the image features replace the image placeholder tokens, in row-major
                              order (what the model's `masked_scatter` does)
    decoder_model_merged.onnx inputs_embeds, attention_mask, position_ids and both KV caches ->
                              logits, unsafe_prob, present.* (one graph for prefill and decode)
    sasa_onnx.json            names, cache layout, threshold, refusal, chat template, preprocessing
    parity.json               ONNX Runtime vs PyTorch figures, measured at export time

Exporter choices, measured here (torch 2.13, onnxruntime 1.32):
- decoder: `torch.export.export(strict=False)` with every varying axis `Dim.DYNAMIC` (batch, chunk,
  past), then the dynamo ONNX translation; traced with a past and a chunk of >= 2 tokens so neither
  is specialised (a 1-token prefill and 1-token decode steps are tested). The prompt-only probe pass
  is a `torch.cond` on the prompt step (past length == 0 or chunk > 1), i.e. an ONNX `If`: decode
  steps skip it. The TorchScript exporter cannot express that branch; named `Dim`s fail the
  non-strict export (see export_decoder).
- vision encoder: the TorchScript exporter (`dynamo=False`). Dynamo fails on the stock Qwen2-VL and
  Qwen2.5-VL towers (`grid_thw.tolist()` becomes an unbacked symbol: "Could not guard on
  data-dependent expression Eq(u0, 0)"); the Qwen towers are traced through a tensor-only rewrite
  of their forward (`QwenVisionGraph`) with two images of different grids, so pixel rows and the
  number of images are dynamic; LLaVA's CLIP tower is traced at its one size.
- embed_tokens: the TorchScript exporter (dynamic batch, length and number of image tokens).

The decoder wrapper builds a `SasaCache` from the flat cache tensors and calls the patched model's
own methods (`sasa_positions`, `_masks`, `sasa_serving_streams`, `sasa_probe_features`,
`sasa_probe`): the two-pass logic exists once, in `patcher/modeling_sasa.py`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import onnx
import torch
from torch import nn

from sasa_patcher.architectures import ImageLayout, spec_for
from sasa_patcher.export.onnx_names import UNSAFE_PROB_NOT_COMPUTED
from sasa_patcher.export.onnx_transposes import fold_weight_transposes
from sasa_patcher.modeling_sasa import GATE_STATE_SIZE, SasaCache, chunk_masks, last_token_index, sasa_gate

OPSET = 18
# Initialisers above this many bytes go to `<graph>.onnx.data` next to the graph.
EXTERNAL_DATA_THRESHOLD = 1024


# ----- the three graphs as modules --------------------------------------------------------------
class VisionEncoderGraph(nn.Module):
    """One image's pixel values (the processor's layout) -> [tokens_per_image, hidden]."""

    def __init__(self, model, layout: ImageLayout):
        super().__init__()
        self.model = model
        self.layout = layout

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.sasa_image_features(spec_for(self.model).vision_inputs(pixel_values, self.layout.grid_thw))


class EmbedTokensGraph(nn.Module):
    """input_ids [B, T] + image_features [N, H] -> inputs_embeds [B, T, H].

    The k-th image placeholder token of the batch (row-major) takes the k-th feature row, as
    `masked_scatter` does in the model. Placeholders beyond the N rows keep their token embedding, as
    in the model when no image is passed: decode steps pass N = 0.
    """

    def __init__(self, embed_tokens: nn.Module, image_token_id: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        count = image_features.shape[0]
        is_image = (input_ids == self.image_token_id).reshape(-1)
        index = torch.cumsum(is_image.long(), 0) - 1
        take = is_image & (index < count)
        index = torch.where(take, index, torch.full_like(index, count))
        padded = torch.cat([image_features.to(embeds.dtype), embeds.new_zeros(1, embeds.shape[-1])], dim=0)
        gathered = padded.index_select(0, index).reshape(embeds.shape)
        return torch.where(take.reshape(input_ids.shape).unsqueeze(-1), gathered, embeds)


def cache_layers(model) -> dict[str, list[int]]:
    """Which decoder layers each KV stream holds: gate keeps only the original stream."""
    settings = model.sasa
    num_layers = model.config.get_text_config().num_hidden_layers
    if settings.mode == "augment":
        return {
            "original": list(range(settings.semantic_layer + 1)),
            "projected": list(range(settings.safety_layer + 1, num_layers)),
        }
    return {"original": list(range(num_layers)), "projected": []}


def gate_state_layer(model) -> int | None:
    """The extra cache layer carrying `sasa_gate`'s state in gate mode (index L, after the decoder's layers).

    Why a cache layer: it is the one tensor every runtime (GenAI's `Generator` included) already feeds from
    one step's `present.*` to the next step's `past.*`, for any batch, so the graph refuses by itself. The
    key holds (flag, refusal index) in its first two head-dim entries at every new position (read back
    from the last past position); the value is zeros. Same shape as a decoder layer's: 1/L more cache.
    """
    return model.config.get_text_config().num_hidden_layers if model.sasa.mode == "gate" else None


def cache_names(model, prefix: str, gate: bool = True) -> list[str]:
    """Flat cache tensor names in graph order: `{prefix}.{stream}.{layer}.{key|value}`, the gate's state layer
    last (named as an original-stream layer: GenAI sees L + 1 layers). `gate=False`: a graph without the gate."""
    state = gate_state_layer(model) if gate else None
    streams = {**cache_layers(model)}
    if state is not None:
        streams["original"] = [*streams["original"], state]
    return [f"{prefix}.{stream}.{layer}.{kind}" for stream, layers in streams.items() for layer in layers
            for kind in ("key", "value")]


class DecoderGraph(nn.Module):
    """Flat tensors in, flat tensors out, the patched model's own code in between.

    Inputs: inputs_embeds [B, T, H], attention_mask [B, P+T] (1 = token, left padding),
    position_ids (`ArchitectureSpec.position_rows`: [B, T] or [rows, B, T]), then the past
    keys/values of `cache_names(model, "past")` as [B, kv_heads, P, head_dim], then the spec's
    `decoder_extra_inputs` ([B, T] each, e.g. Gemma 3's token_type_ids).
    Outputs: logits [B, T, V], unsafe_prob [B], then `present.*` as [B, kv_heads, P+T, head_dim].
    `unsafe_prob` is the probe on the chunk's last non-pad token on a prompt step (P == 0, or a chunk of
    several tokens: a new user turn), else -1. Gate mode: the last cache entries are the gate's state layer
    (`gate_state_layer`) and the logits pass through `sasa_gate`, so a flagged row's greedy tokens are the
    refusal, with no code in the runtime (`gate=False`: without it, the gate's cost baseline).

    `probe=False` (gate mode only) leaves the probe out: `unsafe_prob` is always -1 and the graph serves
    the original stream alone, i.e. it computes exactly the unpatched model's decoder. It is the
    baseline `scripts/bench.py` times the patched graphs against, through the same exporter.
    """

    def __init__(self, model, probe: bool = True, gate: bool = True):
        super().__init__()
        if not probe and model.sasa.mode != "gate":
            raise ValueError("probe=False exports the unpatched decoder, which needs gate mode "
                             f"(mode {model.sasa.mode!r} serves the projected stream)")
        self.model = model
        self.probe = probe
        self.gate = gate and probe and model.sasa.mode == "gate"
        self.layers = cache_layers(model)
        if self.gate:
            self.refusal = list(model.sasa.refusal_token_ids)
            if not self.refusal:
                if model.sasa.threshold is not None:
                    raise ValueError("gate mode with a threshold needs sasa.refusal_token_ids (set by the patcher "
                                     "from the tokenizer): patch the model with its tokenizer")
                self.refusal = [0]  # never emitted: without a threshold no row is flagged

    def forward(self, inputs_embeds, attention_mask, position_ids, past: list[torch.Tensor],
                extra: tuple[torch.Tensor, ...] = ()):
        model = self.model
        text_model = model.sasa_text_model()
        cache = SasaCache(model.config)
        flat = iter(past)
        for stream, layers in self.layers.items():
            target = cache if stream == "original" else cache.projected
            for layer in layers:
                target.layers[layer].update(next(flat), next(flat))
        gate = self.gate
        past_state = (next(flat), next(flat)) if gate else None
        batch, seq_len = inputs_embeds.shape[:2]
        past_length = past[0].shape[2]
        # The prompt step: an empty past, or a chunk of several tokens (a new user turn); decode steps are 1 token.
        prompt_step = (torch.scalar_tensor(past_length) == 0) | (torch.scalar_tensor(seq_len) > 1)
        text_pos, rope_pos = model.sasa_positions(position_ids, None, attention_mask, past_length, inputs_embeds,
                                                  cache, {})
        extras = dict(zip(spec_for(model).decoder_extra_inputs, extra, strict=True))
        masks = model.sasa_masks(text_model, inputs_embeds, attention_mask, cache, text_pos, extras)
        rotary = model.sasa_rotary(text_model, inputs_embeds, rope_pos)
        original, projected, per_layer = model.sasa_serving_streams(
            text_model, inputs_embeds, masks, rotary, text_pos, cache
        )
        serving = projected if model.sasa.mode == "augment" else original
        logits = model.lm_head(text_model.norm(serving))

        s, f = model.sasa.safety_layer, model.sasa.semantic_layer
        rows = torch.arange(batch, device=inputs_embeds.device)
        last = last_token_index(attention_mask, seq_len, batch, inputs_embeds.device)

        def prompt_probe(h_s, h_f):
            # Traced for every shape: the uncached passes see only the chunk's own keys.
            # every layer output is passed (the multi-layer probes read several; the others read s and f)
            features = model.sasa_probe_features(text_model, {**per_layer, s: h_s, f: h_f}, original, projected,
                                                 chunk_masks(masks, past_length), rotary, text_pos, rows, last,
                                                 attention_mask=attention_mask)
            return model.sasa_probe(features[model.sasa.probe_features])

        def not_computed(h_s, h_f):
            return torch.full((h_s.shape[0],), UNSAFE_PROB_NOT_COMPUTED, dtype=torch.float32, device=h_s.device)

        if self.probe:
            unsafe_prob = torch.cond(prompt_step, prompt_probe, not_computed, (per_layer[s], per_layer[f]))
        else:
            unsafe_prob = not_computed(per_layer[s], per_layer[f])
        presents = []
        for stream, layers in self.layers.items():
            source = cache if stream == "original" else cache.projected
            for layer in layers:
                presents += [source.layers[layer].keys, source.layers[layer].values]
        if gate:
            logits, state_present = self._gate(logits, unsafe_prob, prompt_step, past_state, presents[0])
            presents += state_present
        return (logits, unsafe_prob, *presents)

    def _gate(self, logits, unsafe_prob, prompt_step, past_state, like) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`sasa_gate` with its state read from and written to the state layer (`gate_state_layer`)."""
        past_key, past_value = past_state
        # the past's last position holds the state; an empty past reads the zero row prepended here
        stored = torch.cat([past_key.new_zeros(past_key.shape[0], 1, GATE_STATE_SIZE),
                            past_key[:, 0, :, :GATE_STATE_SIZE]], dim=1)[:, -1]
        model = self.model
        logits, state = sasa_gate(logits, unsafe_prob, prompt_step, stored.float(), model.sasa_probe.threshold,
                                  self.refusal)
        chunk = torch.zeros_like(like[:, :, -logits.shape[1]:])
        written = torch.cat([state[:, None, None, :].expand(-1, chunk.shape[1], chunk.shape[2], -1).to(chunk.dtype),
                             chunk[..., GATE_STATE_SIZE:]], dim=-1)
        return logits, [torch.cat([past_key, written], dim=2), torch.cat([past_value, chunk], dim=2)]


# ----- export -----------------------------------------------------------------------------------
def _save(proto: onnx.ModelProto, path: Path, threshold: int) -> None:
    """One graph file plus `<file>.data` holding every initialiser above `threshold` bytes."""
    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=threshold)


def _export_torchscript(module, args, path: Path, input_names, output_names, dynamic_axes, threshold) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        with torch.no_grad():
            torch.onnx.export(module, args, str(staged), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
        _save(onnx.load(str(staged)), path, threshold)


def decoder_example(model, batch: int = 2, past: int = 3, chunk: int = 4, gate: bool = True) -> tuple:
    """Trace inputs: past and chunk >= 2 and distinct, so no dimension is specialised or unified."""
    dims = text_dims(model)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(batch, chunk, dims["hidden_size"], generator=generator)
    mask = torch.ones(batch, past + chunk, dtype=torch.long)
    positions = torch.arange(past, past + chunk).expand(batch, chunk)
    positions = spec_for(model).trace_positions(positions)
    cache = [torch.randn(batch, dims["num_key_value_heads"], past, dims["head_dim"], generator=generator)
             for _ in cache_names(model, "past", gate)]
    # token types with an image block inside the chunk, so the bidirectional branch is traced
    extra = tuple(torch.tensor([[0] + [1] * (chunk - 2) + [0]] * batch) for _ in spec_for(model).decoder_extra_inputs)
    return embeds, mask, positions.contiguous(), cache, extra


def export_decoder(model, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD, probe: bool = True,
                   gate: bool = True) -> None:
    """torch.export (non-strict, every varying axis `Dim.DYNAMIC`), then the dynamo ONNX translation.

    `probe=False`: the unpatched model's decoder with the same interface (see `DecoderGraph`);
    `gate=False`: the patched decoder without the in-graph gate (the gate's cost baseline, `evaluation/gate_cost.py`).

    Named `Dim`s (or axis-name strings given to torch.onnx.export) fail the non-strict export: the
    guard "mask length >= chunk length" is not expressible, so the axes get their names afterwards.
    """
    dynamic = torch.export.Dim.DYNAMIC
    gate = gate and probe
    example = decoder_example(model, gate=gate)
    past_names = cache_names(model, "past", gate)
    dynamic_shapes = {
        "inputs_embeds": {0: dynamic, 1: dynamic},
        "attention_mask": {0: dynamic, 1: dynamic},
        "position_ids": spec_for(model).position_axes(dynamic),
        "past": [{0: dynamic, 2: dynamic} for _ in past_names],
        "extra": tuple({0: dynamic, 1: dynamic} for _ in spec_for(model).decoder_extra_inputs),
    }
    wrapper = DecoderGraph(model, probe=probe, gate=gate).eval()
    with torch.no_grad():
        program = torch.export.export(wrapper, example, dynamic_shapes=dynamic_shapes, strict=False)
        onnx_program = torch.onnx.export(
            program, example, dynamo=True, optimize=True, verify=False,
            input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names,
                         *spec_for(model).decoder_extra_inputs],
            output_names=["logits", "unsafe_prob", *cache_names(model, "present", gate)],
        )
    # Edited and saved as the exporter's IR: `model_proto` would build a protobuf holding a second copy
    # of every weight (at 2B: 15.9 GiB peak, 1.9x the weights); `onnx_ir.save` streams them to the file.
    model = onnx_program.model
    _strip_ir_metadata(model)
    _name_ir_axes(model, {("inputs_embeds", 0): "batch", ("inputs_embeds", 1): "sequence_length",
                          ("attention_mask", 1): "total_sequence_length", (past_names[0], 2): "past_sequence_length"})
    fold_weight_transposes(model)  # layers s+1..L-1 are read twice: ONNX Runtime would copy them transposed
    _save_ir(model, path, threshold)
    _drop_ir_weights(model)
    torch.compiler.reset()  # torch.export's caches keep the traced wrapper, and so the model, alive


def _drop_ir_weights(model) -> None:
    """Detach the saved graph from the PyTorch model: its initializers and the FX nodes in its `meta`.

    Why: onnxscript's module-level rewrite rules (used by `optimize=True`) keep their last matched
    node, hence this graph, alive after the export returns. Its initializers and former inputs wrap
    the model's parameters, and the exporter's `meta["node"]` entries lead to the traced FX graph; so
    the weights (mapped checkpoint pages included) stayed resident through the ONNX Runtime parity
    check after the pipeline had released the model (3B: 13.9 GiB; found with weak references and
    `gc.get_referrers` on the embedded model).
    """
    import onnx_ir

    # The exporter first adds every parameter of the traced module as a graph input (the vision
    # tower's too); the input list's reference counter (onnx_ir `_GraphIO._ref_counter`) keeps each
    # value it ever held as a key after the value is moved out, and with it the wrapped tensor.
    ever_inputs = list(getattr(model.graph.inputs, "_ref_counter", {}))
    for value in [*model.graph.initializers.values(), *ever_inputs]:
        value.const_value = None
    model.graph.initializers.clear()
    for value in [*model.graph.inputs, *ever_inputs]:
        value.meta.clear()
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.meta.clear()
        for value in node.outputs:
            value.meta.clear()


def _save_ir(model, path: Path, threshold: int) -> None:
    """As `_save`, from an `onnx_ir` model: tensors are written one at a time, never all in one protobuf."""
    import onnx_ir

    data = path.name + ".data"
    for stale in (path, path.with_name(data)):
        stale.unlink(missing_ok=True)
    onnx_ir.save(model, str(path), external_data=data, size_threshold_bytes=threshold)


def _strip_ir_metadata(model) -> None:
    """Drop the exporter's per-node stack traces and FX names: most of a small graph's bytes."""
    import onnx_ir

    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()


def _name_ir_axes(model, names: dict[tuple[str, int], str]) -> None:
    """Give the exporter's symbolic axes (s10, s22 + s69, ...) readable names everywhere they appear."""
    import onnx_ir

    inputs = {value.name: value for value in model.graph.inputs}
    symbols = {}
    for (name, axis), readable in names.items():
        symbol = inputs[name].shape[axis]
        if isinstance(symbol, onnx_ir.SymbolicDim) and symbol.value:
            symbols[str(symbol.value)] = readable
    if not symbols:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(symbol) for symbol in symbols) + r")\b")

    def rename(value) -> None:
        if value is None or value.shape is None:
            return
        dims = [onnx_ir.SymbolicDim(pattern.sub(lambda match: symbols[match.group(1)], str(dim.value)))
                if isinstance(dim, onnx_ir.SymbolicDim) and dim.value else dim for dim in value.shape]
        value.shape = onnx_ir.Shape(dims)

    for value in (*model.graph.inputs, *model.graph.outputs):
        rename(value)
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            rename(value)


def export_vision(model, layout: ImageLayout, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    """The spec's vision module and example; names and dynamic axes (the named dimensions) from its contract."""
    spec = spec_for(model)
    contract = spec.vision_io(model, layout)
    module, example = spec.vision_graph(model, layout)
    tensors = {**contract["inputs"], **contract["outputs"]}
    axes = {name: {axis: dim for axis, dim in enumerate(tensor["shape"]) if isinstance(dim, str)}
            for name, tensor in tensors.items()}
    _export_torchscript(module.eval(), example, path, list(contract["inputs"]), list(contract["outputs"]),
                        {name: named for name, named in axes.items() if named} or None, threshold)


def export_embed(model, path: Path, threshold: int = EXTERNAL_DATA_THRESHOLD) -> None:
    hidden = text_dims(model)["hidden_size"]
    ids = torch.tensor([[5, model.config.image_token_id, model.config.image_token_id, 6]])
    features = torch.randn(2, hidden)
    wrapper = EmbedTokensGraph(model.get_input_embeddings(), model.config.image_token_id).eval()
    axes = {"input_ids": {0: "batch", 1: "sequence_length"}, "image_features": {0: "num_image_tokens"},
            "inputs_embeds": {0: "batch", 1: "sequence_length"}}
    _export_torchscript(wrapper, (ids, features), path, ["input_ids", "image_features"], ["inputs_embeds"], axes,
                        threshold)


def text_dims(model) -> dict[str, int]:
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return {"hidden_size": text.hidden_size, "num_key_value_heads": text.num_key_value_heads, "head_dim": head_dim,
            "num_hidden_layers": text.num_hidden_layers, "vocab_size": model.get_output_embeddings().weight.shape[0]}
