"""The ONNX artifact against the PyTorch patched model: tiny models (unit) and the embedded model (integration).

Each (family, mode) is exported once per module: the dynamo export of a decoder takes tens of seconds
even for the tiny models, so the tests share the graphs.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import onnx
import pytest
import torch

from sasa_patcher.export.onnx_export import export_onnx
from sasa_patcher.export.onnx_names import CONFIG_NAME, PARITY_NAME, UNSAFE_PROB_NOT_COMPUTED
from sasa_patcher.export.onnx_parity import LOGITS_TOLERANCE, PARITY_NEW_TOKENS, PROB_TOLERANCE, default_parity_cases
from sasa_patcher.export.onnx_runtime import OnnxVlm
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model
from tiny_models import FAMILIES, GEMMA_IMAGE_SIZE, LLAVA_IMAGE_SIZE

S, F = 1, 3
FAMILY = {family.name: family for family in FAMILIES}
TINY_IMAGE_SIZE = {"qwen2_vl": (56, 56), "qwen2_5_vl": (56, 56), "llava": (LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE),
                   "gemma3": (GEMMA_IMAGE_SIZE, GEMMA_IMAGE_SIZE)}
EXPORTS = [("qwen2_vl", "gate"), ("qwen2_vl", "augment"), ("qwen2_5_vl", "gate"), ("llava", "gate"),
           ("gemma3", "gate")]


REFUSAL = [7, 8, 9, 1]  # ends in the tiny models' end-of-sequence id
MIXED = ([5, 12, 8], [True, False, True])  # the mixed batch: lengths, images


def tiny_patched(name: str, mode: str):
    """Random probe; gate mode's threshold lies midway between the mixed batch's two highest rows, so one row of it
    is flagged (far from the threshold: float noise between runtimes cannot flip it)."""
    model = patch_model(FAMILY[name].build(), SasaSettings(S, F, mode=mode, refusal_token_ids=REFUSAL))
    weight = model.sasa_probe.linear.weight
    weight.data = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    if mode == "gate":
        with torch.no_grad():
            probs = model(**FAMILY[name].make_batch(*MIXED, side="left"), use_cache=False).unsafe_prob
        highest = probs.sort().values[-2:]
        model.set_sasa(dataclasses.replace(model.sasa, threshold=float(highest.mean())))
    return model


def tiny_cases(name: str) -> list[dict]:
    make = FAMILY[name].make_batch
    return [
        {"name": "image-batch1", **make([7], [True])},
        {"name": "text-batch1", **make([9], [False])},
        {"name": "mixed-batch3-left-padded", **make(*MIXED, side="left")},
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, mode) -> (patched model, onnx dir, export summary), exported on first use."""
    cache = {}

    def get(name: str, mode: str):
        if (name, mode) not in cache:
            model = tiny_patched(name, mode)
            out = tmp_path_factory.mktemp(f"onnx-{name}-{mode}")
            summary = export_onnx(model, None, out, image_size=TINY_IMAGE_SIZE[name], parity_cases=tiny_cases(name))
            cache[name, mode] = model, out, summary
        return cache[name, mode]

    return get


@pytest.mark.parametrize("name,mode", EXPORTS, ids=[f"{n}-{m}" for n, m in EXPORTS])
def test_onnx_runtime_matches_pytorch(exported, name, mode):
    """Prefill logits, unsafe_prob, 32 greedy tokens and every decode step's logits; image and text, batch 1 and 3."""
    _, out, summary = exported(name, mode)
    parity = summary["parity"]
    assert json.loads((out / PARITY_NAME).read_text())["parity"] == parity
    assert [case["name"] for case in parity["cases"]] == ["image-batch1", "text-batch1", "mixed-batch3-left-padded"]
    for case in parity["cases"]:
        assert case["logits_max_abs_diff"] <= LOGITS_TOLERANCE, case
        assert case["decode_logits_max_abs_diff"] <= LOGITS_TOLERANCE, case
        assert case["unsafe_prob_max_abs_diff"] <= PROB_TOLERANCE, case
        assert case["tokens_identical"] and case["new_tokens"] == PARITY_NEW_TOKENS, case
        if case["images"]:
            assert case["image_features_max_abs_diff"] <= 1e-5, case
    # The random probe gives probabilities away from 0 and 1, so the unsafe_prob check means something.
    probabilities = [p for case in parity["cases"] for p in case["unsafe_prob"]]
    assert any(0.05 < p < 0.95 for p in probabilities), probabilities
    assert parity["passed"]


@pytest.mark.parametrize("mode", ["gate", "augment"])
def test_graph_interface_and_config(exported, mode):
    model, out, _ = exported("qwen2_vl", mode)
    config = json.loads((out / CONFIG_NAME).read_text())
    num_layers = model.config.get_text_config().num_hidden_layers
    streams = config["cache"]["streams"]
    if mode == "gate":  # decode runs only the original stream: no projected cache at all
        assert streams == {"original": list(range(num_layers)), "projected": []}
    else:
        assert streams == {"original": list(range(F + 1)), "projected": list(range(S + 1, num_layers))}
    decoder = onnx.load(str(out / config["graphs"]["decoder"]["file"]), load_external_data=False)
    inputs = [value.name for value in decoder.graph.input]
    outputs = [value.name for value in decoder.graph.output]
    assert inputs == config["graphs"]["decoder"]["inputs"]
    assert outputs == config["graphs"]["decoder"]["outputs"]
    assert inputs[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert outputs[:2] == ["logits", "unsafe_prob"]
    cached = dict(streams)
    if mode == "gate":  # the gate's state layer L, named as an original-stream layer (GenAI counts L + 1)
        assert config["cache"]["gate_state_layer"] == num_layers
        assert config["cache"]["num_hidden_layers"] == num_layers + 1
        cached["original"] = [*streams["original"], num_layers]
    else:
        assert config["cache"]["gate_state_layer"] is None
    expected_past = [f"past.{stream}.{layer}.{kind}" for stream, layers in cached.items() for layer in layers
                     for kind in ("key", "value")]
    assert inputs[3:] == expected_past
    assert outputs[2:] == [name.replace("past.", "present.", 1) for name in expected_past]

    def axes(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    by_name = {value.name: value for value in (*decoder.graph.input, *decoder.graph.output)}
    assert axes(by_name["inputs_embeds"])[:2] == ["batch", "sequence_length"]
    assert axes(by_name["attention_mask"]) == ["batch", "total_sequence_length"]
    assert axes(by_name["position_ids"]) == [3, "batch", "sequence_length"]
    assert axes(by_name[expected_past[0]]) == ["batch", 2, "past_sequence_length", 16]
    assert axes(by_name["unsafe_prob"]) == ["batch"]
    # The prompt-only probe pass sits in an If on "past length == 0".
    assert [node.op_type for node in decoder.graph.node].count("If") == 1
    # Weights live in external data; the graph files hold structure only.
    for graph in config["graphs"].values():
        assert (out / (graph["file"] + ".data")).stat().st_size > 0
    assert config["sasa"]["mode"] == mode
    assert config["sasa"]["refusal_token_ids"] == REFUSAL
    assert config["cache"]["num_key_value_heads"] == 2 and config["cache"]["head_dim"] == 16
    assert config["image"]["sizes"] == [[56, 56]] and config["image"]["dynamic"]
    assert config["image"]["tokens_per_image"] is None and config["image"]["grid_thw"] is None
    assert config["genai_type"] == ("qwen2_5_vl" if mode == "gate" else None)
    assert config["eos_token_id"] == [1]


GRIDS = ([1, 4, 4], [1, 8, 12], [1, 16, 8], [1, 6, 6], [1, 14, 22])


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_vision_graph_takes_any_grid_and_several_images(exported, name):
    """Square, wide, tall, partial-window grids one at a time and two or three per call, as the tower computes."""
    model, out, _ = exported(name, "gate")
    runtime = OnnxVlm(out, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(3)
    for grids in [[grid] for grid in GRIDS] + [[GRIDS[1], GRIDS[2]], [GRIDS[3], GRIDS[0], GRIDS[4]]]:
        grid = torch.tensor(grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator)
        expected = model.sasa_image_features({"pixel_values": pixels, "image_grid_thw": grid}).numpy()
        feeds = {"pixel_values": pixels.numpy(), "image_grid_thw": grid.numpy()}
        assert np.abs(runtime.session("vision_encoder").run(None, feeds)[0] - expected).max() <= 1e-5, grids


def two_image_case(grids: list[list[int]], text: int = 6) -> dict:
    """One prompt with two images of different grids (placeholder counts from each grid), as the processor makes it."""
    from tiny_models import IMAGE_TOKEN, VISION_END, VISION_START

    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(2, IMAGE_TOKEN, (text,), generator=generator).tolist()
    for grid in grids:
        ids += [VISION_START] + [IMAGE_TOKEN] * (grid[0] * grid[1] * grid[2] // 4) + [VISION_END] + ids[:3]
    grid = torch.tensor(grids)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, generator=generator)
    input_ids = torch.tensor([ids])
    return {"name": "two-images", "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels, "image_grid_thw": grid,
            "mm_token_type_ids": (input_ids == IMAGE_TOKEN).long()}


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_two_images_of_different_sizes_generate_like_pytorch(exported, name):
    from sasa_patcher.export.onnx_parity import compare_references, torch_reference

    model, out, _ = exported(name, "gate")
    reference = torch_reference(model, two_image_case([[1, 8, 12], [1, 6, 4]]), max_new_tokens=8)
    figures = compare_references(out, [reference], max_new_tokens=8)["cases"][0]
    assert figures["images"] == 2 and figures["image_features_max_abs_diff"] <= 1e-5, figures
    assert figures["logits_max_abs_diff"] <= LOGITS_TOLERANCE, figures
    assert figures["unsafe_prob_max_abs_diff"] <= PROB_TOLERANCE and figures["tokens_identical"], figures


def test_vision_session_released_before_the_decoder_phase(exported):
    """What the parity check relies on: features encoded first, the vision session dropped, then the same generation."""
    from sasa_patcher.export.onnx_parity import split_images

    model, out, _ = exported("qwen2_5_vl", "gate")
    runtime = OnnxVlm(out, providers=["CPUExecutionProvider"])
    case = two_image_case([[1, 8, 12], [1, 6, 4]])
    images = split_images(model, case)
    ids, mask = case["input_ids"].numpy(), case["attention_mask"].numpy()
    inline = runtime.generate(ids, mask, images, 8, eos_token_ids=[])
    features = runtime.encode_images(images)
    runtime.release("vision_encoder")
    loaded, session = [], runtime.session
    runtime.session = lambda graph: loaded.append(graph) or session(graph)
    apart = runtime.generate(ids, mask, images, 8, eos_token_ids=[], image_features=features)
    assert "vision_encoder" not in loaded and {"embed_tokens", "decoder"} <= set(loaded)
    assert np.array_equal(apart.tokens, inline.tokens) and np.array_equal(apart.prefill_logits, inline.prefill_logits)
    runtime.session = session
    assert np.array_equal(runtime.encode_images(images), features)  # loaded again on demand


@torch.no_grad()
@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_single_token_prompt_and_decode_step_probe(exported, name):
    """A 1-token prefill (no dimension was specialised at 1), then a decode step reports 'not computed'."""
    model, out, _ = exported(name, "gate")
    runtime = OnnxVlm(out, providers=["CPUExecutionProvider"])
    input_ids = np.array([[17]], np.int64)
    mask = np.ones_like(input_ids)
    embeds = runtime.embed_tokens(input_ids, runtime.encode_images([]))
    positions, _ = runtime.prefill_positions(input_ids, mask)
    logits, unsafe_prob, *past = runtime.run_decoder(embeds, mask, positions, runtime.empty_cache(1))
    reference = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask))
    assert np.abs(logits - reference.logits.numpy()).max() <= LOGITS_TOLERANCE
    assert abs(float(unsafe_prob[0]) - float(reference.unsafe_prob[0])) <= PROB_TOLERANCE
    mask = np.ones((1, 2), np.int64)
    step = runtime.embed_tokens(np.array([[5]], np.int64), runtime.encode_images([]))
    _, decode_prob, *_ = runtime.run_decoder(step, mask, runtime.step_positions(mask, np.zeros((1, 1), np.int64)), past)
    assert decode_prob.tolist() == [UNSAFE_PROB_NOT_COMPUTED]


@pytest.mark.parametrize("name", ["qwen2_vl", "llava"])
def test_the_graph_refuses_by_itself_in_a_mixed_batch(exported, name):
    """The project's runtime takes the graph's argmax only: in a left-padded batch of different lengths, the
    flagged row answers the refusal tokens then end-of-sequence, and every row equals its single-row answer."""
    from sasa_patcher.export.onnx_parity import split_images

    model, out, _ = exported(name, "gate")
    runtime = OnnxVlm(out, providers=["CPUExecutionProvider"])
    make = FAMILY[name].make_batch

    def run(batch: dict):
        return runtime.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                split_images(model, batch), 8, eos_token_ids=[])

    together = run(make(*MIXED, side="left"))
    assert together.flagged.tolist().count(True) == 1, together.unsafe_prob
    for row, (length, image) in enumerate(zip(*MIXED, strict=True)):
        alone = run(make([length], [image], seed=row))
        assert together.tokens[row].tolist() == alone.tokens[0].tolist(), row
        assert bool(alone.flagged[0]) == bool(together.flagged[row])
        if together.flagged[row]:
            assert together.tokens[row].tolist() == REFUSAL + [REFUSAL[-1]] * 4
        else:
            assert together.tokens[row, :len(REFUSAL)].tolist() != REFUSAL


@torch.no_grad()
def test_embed_tokens_merges_like_the_model(exported):
    model, out, _ = exported("qwen2_vl", "gate")
    runtime = OnnxVlm(out, providers=["CPUExecutionProvider"])
    batch = FAMILY["qwen2_vl"].make_batch([6, 9], [True, True])
    features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                              return_dict=True).pooler_output
    expected = model.sasa_input_embeddings(batch["input_ids"], None, {k: batch[k] for k in ("pixel_values",
                                                                                            "image_grid_thw")})
    merged = runtime.embed_tokens(batch["input_ids"].numpy(), torch.cat(features).numpy())
    assert np.abs(merged - expected.numpy()).max() <= 1e-6
    # Decode steps pass no features: a generated placeholder id keeps its own embedding, as in the model.
    plain = runtime.embed_tokens(batch["input_ids"].numpy(), runtime.encode_images([]))
    assert np.abs(plain - model.get_input_embeddings()(batch["input_ids"]).numpy()).max() == 0.0


def test_non_float32_model_is_refused(tmp_path):
    model = tiny_patched("qwen2_vl", "gate").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        export_onnx(model, None, tmp_path, image_size=(56, 56))


# ----- integration: the embedded real-weight model -------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("name", ["smol-qwen-vl", "smol-llava"])
def test_embedded_model_export_parity(tmp_path, name):
    from embedded_patch import patched_embedded

    model, processor = patched_embedded(name, random_probe=True)
    started = time.perf_counter()
    summary = export_onnx(model, processor, tmp_path)
    elapsed = time.perf_counter() - started
    sizes = {name: f"{size / 2**20:.1f} MiB" for name, size in summary["file_bytes"].items()}
    print(f"\n{name}: export + parity {elapsed:.0f}s, graphs {summary['export_seconds']}, "
          f"parity {summary['parity_seconds']}s, image {summary['image_size']}, sizes {sizes}")
    print(json.dumps(summary["parity"]["worst"]))
    parity = summary["parity"]
    assert parity["passed"], parity["worst"]
    assert len(parity["cases"]) == 3 and all(case["tokens_identical"] for case in parity["cases"])
    assert parity["worst"]["unsafe_prob_max_abs_diff"] <= PROB_TOLERANCE

    # Why the logits tolerance is relative on this model: ONNX Runtime's fp32 error is of the size of
    # PyTorch's own fp32 error against float64 arithmetic (30 layers, |logit| ~ 40). Measured here so
    # the relative tolerance stays justified: ORT may not drift further than twice PyTorch's own error.
    text_case = next(case for case in default_parity_cases(model, processor, tuple(summary["image_size"]))
                     if case["name"] == "text-batch1")
    batch = {key: value for key, value in text_case.items() if key != "name"}
    with torch.no_grad():
        fp32 = model(**batch).logits
        fp64 = model.double()(**batch).logits.float()
    own_error = (fp32 - fp64).abs().max().item()
    onnx_error = next(case for case in parity["cases"] if case["name"] == "text-batch1")["logits_max_abs_diff"]
    print(f"text-batch1 logits: PyTorch fp32 vs fp64 {own_error:.3g}, ONNX Runtime vs PyTorch fp32 {onnx_error:.3g}")
    assert onnx_error <= 2 * own_error


def test_decoder_export_keeps_no_weight_alive(tmp_path):
    """After the decoder export no PyTorch weight stays referenced (the ONNX Runtime parity check then runs
    without the model: at 3B the kept weights were 14 GiB beside ONNX Runtime's own)."""
    import gc
    import weakref

    from sasa_patcher.export.onnx_graphs import export_decoder

    model = tiny_patched("qwen2_vl", "gate")
    weights = {name: weakref.ref(parameter) for name, parameter in model.named_parameters()}
    export_decoder(model, tmp_path / "decoder.onnx")
    del model
    gc.collect()
    assert [name for name, ref in weights.items() if ref() is not None] == []


def test_gemma3_artifact_with_its_processor_prompts_and_generates_like_pytorch(tmp_path):
    """Gemma 3 through the processor path: the parity cases rendered by the real Gemma3Processor (text, image,
    mixed batch), and the runtime's own prompt (the template's <start_of_image> expanded as the processor does)."""
    from PIL import Image

    from tiny_calibration import tiny_processor

    model, processor = tiny_patched("gemma3", "gate"), tiny_processor("gemma3")
    summary = export_onnx(model, processor, tmp_path / "onnx", image_size=TINY_IMAGE_SIZE["gemma3"])
    assert summary["parity"]["passed"], summary["parity"]["worst"]
    assert any(case["images"] for case in summary["parity"]["cases"])
    config = json.loads((tmp_path / "onnx" / CONFIG_NAME).read_text())
    assert config["genai_type"] is None and "genai_files" not in config  # GenAI cannot feed token_type_ids
    decoder = config["graphs"]["decoder"]
    assert list(decoder["extra_inputs"]) == ["token_type_ids"] and decoder["inputs"][-1] == "token_type_ids"
    runtime = OnnxVlm(tmp_path / "onnx", providers=["CPUExecutionProvider"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    ids, prepared = runtime.encode_prompt("what is here?", image)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "what is here?"}]}],
                                         add_generation_prompt=True, tokenize=False)
    expected = processor(text=[text], images=[[image]], return_tensors="pt")
    assert ids.tolist() == expected["input_ids"].tolist()
    assert np.abs(prepared[0].pixel_values - expected["pixel_values"].numpy()).max() <= 1e-5


def test_parity_failures_name_each_figure_outside_its_tolerance():
    from sasa_patcher.export.onnx_parity import parity_failures

    good = {"name": "text", "logits_max_abs_diff": 5e-5, "decode_logits_max_abs_diff": 1e-5, "logits_max_abs": 12.0,
            "unsafe_prob_max_abs_diff": 1e-7, "tokens_identical": True}
    assert parity_failures([good]) == []
    # relative tolerance: 1e-5 x the largest logit (here 1.2e-4) when that exceeds the absolute 1e-4
    bad = {**good, "name": "image", "decode_logits_max_abs_diff": 1.6e-4, "unsafe_prob_max_abs_diff": 2e-5,
           "tokens_identical": False}
    failures = parity_failures([good, bad])
    assert len(failures) == 3 and all(f.startswith("image: ") for f in failures)
    assert "1.60e-04 (tolerance 1.20e-04)" in failures[0] and "greedy tokens" in failures[2]


def test_export_warns_when_parity_fails(monkeypatch, tmp_path):
    from sasa_patcher.export import onnx_export
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import patch_model
    from tiny_models import FAMILIES

    family = next(family for family in FAMILIES if family.name == "qwen2_vl")
    model = patch_model(family.build(), SasaSettings(1, 3, refusal_token_ids=[7, 8, 9, 1]))
    failing = {"passed": False, "failures": ["text: the greedy tokens differ"], "worst": {}, "cases": []}
    monkeypatch.setattr(onnx_export, "compare_references", lambda *args, **kwargs: failing)
    lines = []
    summary = onnx_export.export_onnx(model, None, tmp_path, image_size=(56, 56), log=lines.append,
                                      parity_cases=[{"name": "text", **family.make_batch([9], [False])}])
    assert summary["parity"] is failing
    warning = [line for line in lines if line.startswith("WARNING")]
    assert len(warning) == 1 and "text: the greedy tokens differ" in warning[0]
