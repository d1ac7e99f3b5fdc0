"""ONNX Runtime GenAI loads the exported Qwen artifacts as they are and reproduces PyTorch.

Only GenAI's own API on the GenAI side, and no gate code: `og.Model`, `create_multimodal_processor`,
`og.Generator`, `get_output("unsafe_prob")` after the prompt step; the decoder graph refuses flagged
prompts by itself. The PyTorch side is the patched model's forward in a loop with its returned cache
on GenAI's own token ids and (de-padded) pixels; greedy answers are compared to end-of-sequence.
Unit: tiny Qwen2-VL and Qwen2.5-VL (tests/tiny_genai.py: a small byte-level BPE tokenizer whose Qwen
special tokens have low ids, so the ids provably come from the config).
Integration: the embedded smol-qwen2.5-vl (real SmolLM2 weights and tokenizer).
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime_genai as og  # a dependency: a broken install fails here, it does not skip
import pytest
import torch
from tiny_genai import BENIGN, HARMFUL, MARKER, exported, set_threshold_between

from sasa_patcher.export.genai import GENAI_CONFIG_NAME, GENAI_PROCESSOR_NAME
from sasa_patcher.export.onnx_export import export_onnx
from sasa_patcher.export.onnx_names import CONFIG_NAME
from sasa_patcher.export.onnx_parity import PROB_TOLERANCE, parity_image
from sasa_patcher.modeling_sasa import CACHE_KEY

EMBEDDED_NEW_TOKENS = 16  # SmolLM2 spells the refusal in 13 tokens, then end-of-sequence
NEW_TOKENS = 40  # the tiny tokenizer spells the refusal in 38 tokens (end-of-sequence included)
IMAGE_SIZES = ((120, 200), (150, 90))  # (H, W): a wide and a tall image -> grids [1, 8, 14] and [1, 10, 6]


def genai_run(onnx_dir, prompt: str, image_paths: list[str], new_tokens: int = NEW_TOKENS) -> dict:
    """Greedy generation with GenAI's API alone (no gate code); unsafe_prob read after the prompt step."""
    model = og.Model(str(onnx_dir))
    processor = model.create_multimodal_processor()
    inputs = processor(prompt, images=og.Images.open(*image_paths) if image_paths else None)
    named = {name: inputs[name].as_numpy() for name in inputs.keys()}
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=named["input_ids"].shape[1] + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens, unsafe_prob = [], None
    while not generator.is_done():
        generator.generate_next_token()
        if unsafe_prob is None:
            unsafe_prob = float(generator.get_output("unsafe_prob")[0])
        tokens.append(int(generator.get_next_tokens()[0]))
    return {"tokens": tokens, "unsafe_prob": unsafe_prob, **named}


@torch.no_grad()
def torch_run(model, run: dict, new_tokens: int = NEW_TOKENS) -> dict:
    """The patched model on GenAI's ids and pixels (GenAI pads each image to the largest patch count: de-pad),
    decoded greedily as a simple server does: `model(**inputs)`, then one token per call with the returned cache.

    Not `generate`: measured here, the patched Qwen2-VL's `generate` starts 0.046 away from its own forward on a
    [1, 8, 14] grid (its own multimodal positions), while both ONNX runtimes equal the forward within 1e-6.
    """
    input_ids = torch.from_numpy(run["input_ids"].astype(np.int64))
    kwargs = {}
    if "image_grid_thw" in run and run["image_grid_thw"].size:
        grids = run["image_grid_thw"]
        pixels = run["pixel_values"]
        per_image = pixels.shape[0] // len(grids)
        rows = [pixels[i * per_image: i * per_image + int(np.prod(g))] for i, g in enumerate(grids)]
        kwargs = {"pixel_values": torch.from_numpy(np.concatenate(rows)), "image_grid_thw": torch.from_numpy(grids),
                  "mm_token_type_ids": (input_ids == model.config.image_token_id).long()}
    output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    unsafe_prob, cache = float(output.unsafe_prob[0]), getattr(output, CACHE_KEY)
    tokens = [int(output.logits[0, -1].argmax())]
    while len(tokens) < new_tokens and tokens[-1] not in eos_ids(model):
        mask = torch.ones(1, input_ids.shape[1] + len(tokens), dtype=torch.long)
        output = model(input_ids=torch.tensor([tokens[-1:]]), attention_mask=mask, **{CACHE_KEY: cache})
        tokens.append(int(output.logits[0, -1].argmax()))
    return {"tokens": tokens, "unsafe_prob": unsafe_prob, "flagged": bool(cache.flagged[0])}


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The answer's tokens before the end-of-sequence token (GenAI's loop may stop without returning it)."""
    return next((tokens[:index] for index, token in enumerate(tokens) if token in eos), tokens)


def check_cases(model, processor, onnx_dir, tmp_path, new_tokens: int = NEW_TOKENS) -> list[dict]:
    """Benign and harmful text, one and two images, and a two-turn conversation (harmful, refused, then benign):
    GenAI's plain loop against the patched model's forward-only loop, answers compared to end-of-sequence."""
    paths = []
    for index, size in enumerate(IMAGE_SIZES):
        path = tmp_path / f"image{index}.png"
        parity_image(size, index).save(path)
        paths.append(str(path))

    def render(*turns: str, images: int = 0) -> str:
        messages = [{"role": "user" if index % 2 == 0 else "assistant",
                     "content": [{"type": "image"}] * (images if index == 0 else 0) + [{"type": "text", "text": text}]}
                    for index, text in enumerate(turns)]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    cases = [("benign-text", render(BENIGN), []),
             ("harmful-text", render(HARMFUL), []),
             ("one-image", render("Describe this image.", images=1), paths[:1]),
             ("two-images-two-sizes", render("Compare the two images.", images=2), paths),
             ("two-turns", render(HARMFUL, model.sasa.refusal_text, BENIGN), [])]
    eos = eos_ids(model)
    results = []
    for name, prompt, images in cases:
        ours = genai_run(onnx_dir, prompt, images, new_tokens)
        reference = torch_run(model, ours, new_tokens)
        assert ours["input_ids"][0].tolist() == processor.tokenizer(_expand(prompt, ours))["input_ids"], name
        answer = until_eos(ours["tokens"], eos)
        results.append({"name": name, "answers_equal": answer == until_eos(reference["tokens"], eos),
                        "generated": len(ours["tokens"]), "flagged": reference["flagged"],
                        "refused": answer == until_eos(model.sasa.refusal_token_ids, eos)[:len(answer)],
                        "unsafe_prob_diff": abs(ours["unsafe_prob"] - reference["unsafe_prob"]),
                        "unsafe_prob": reference["unsafe_prob"],
                        "grids": ours.get("image_grid_thw", np.zeros((0, 3))).tolist()})
    return results


def _expand(prompt: str, run: dict) -> str:
    """The prompt with each image marker expanded to its grid's placeholder count (what GenAI tokenizes)."""
    for grid in run.get("image_grid_thw", np.zeros((0, 3), np.int64)).tolist():
        prompt = prompt.replace(MARKER, "<|vision_start|>" + "<|image_pad|>" * (int(np.prod(grid)) // 4)
                                + "<|vision_end|>\0", 1)
    return prompt.replace("\0", "")


@pytest.mark.parametrize(("family", "feature"), [("qwen2_5_vl", "projected-logits"), ("qwen2_vl", "projected-logits"),
                                               ("qwen2_5_vl", "multi-layer-pooled")])
def test_genai_generates_like_pytorch(tmp_path_factory, tmp_path, family, feature):
    """GenAI's own loop against transformers, for the paper's probe feature and the pooled one (the pooled window
    reads the attention mask GenAI feeds)."""
    out, model, processor = exported(tmp_path_factory, family, feature)
    genai = json.loads((out / GENAI_CONFIG_NAME).read_text())
    assert genai["model"]["type"] == "qwen2_5_vl"
    assert genai["model"]["vision"]["config_filename"] == GENAI_PROCESSOR_NAME
    assert genai["model"]["image_token_id"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") < 10
    # sasa_onnx.json keeps its graphs (position rows, extra inputs); the runtime takes file and tensor names
    # from genai_config.json, where GenAI reads them
    assert json.loads((out / CONFIG_NAME).read_text())["graphs"]["decoder"]["position_rows"] == 3
    results = check_cases(model, processor, out, tmp_path)
    print(json.dumps(results))
    assert [r["grids"] for r in results] == [[], [], [[1, 8, 14]], [[1, 8, 14], [1, 10, 6]], []]
    check_results(results)
    assert any(0.02 < r["unsafe_prob"] < 0.98 for r in results)


def check_results(results: list[dict]) -> None:
    """Equal answers everywhere; the harmful prompt refused (flagged rows refuse, others do not), the benign one
    answered."""
    by_name = {r["name"]: r for r in results}
    assert by_name["harmful-text"]["flagged"] and not by_name["benign-text"]["flagged"], results
    for result in results:
        assert result["answers_equal"] and result["generated"] >= 1, result
        assert result["unsafe_prob_diff"] <= PROB_TOLERANCE, result
        assert result["refused"] == result["flagged"], result


def test_genai_continuous_batching_engine_refuses_the_artifact(tmp_path_factory):
    """GenAI 0.18's `og.Engine` serves decoder-only models only: it refuses the three-graph VLM artifact, so a
    continuous-batching GenAI server cannot serve it (the gate or not). Fails when a GenAI release accepts it:
    then the gate must be tested there."""
    if not hasattr(og, "Engine"):
        pytest.skip("this onnxruntime-genai has no Engine")
    out, _, _ = exported(tmp_path_factory)
    with pytest.raises(RuntimeError, match="decoder-only"):
        og.Engine(og.Model(str(out)))


def pillow_variants(tmp_path) -> dict[str, str]:
    """One 60x80 picture in files GenAI's own decoder misreads or cannot read: alpha, 16-bit, WebP, GIF, BMP, CMYK."""
    from PIL import Image

    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (60, 80, 4), dtype=np.uint8), "RGBA")
    variants = {"rgba.png": rgba, "la.png": rgba.convert("LA"), "rgb.webp": rgba.convert("RGB"),
                "rgb.gif": rgba.convert("RGB"), "rgb.bmp": rgba.convert("RGB"), "cmyk.jpg": rgba.convert("CMYK"),
                "gray16.png": Image.fromarray(rng.integers(0, 65535, (60, 80)).astype(np.uint16))}
    paths = {}
    for name, image in variants.items():
        image.save(tmp_path / name, **({"lossless": True} if name.endswith(".webp") else {}))
        paths[name] = str(tmp_path / name)
    return paths


def test_genai_sees_the_pixels_the_project_runtime_sees(tmp_path_factory, tmp_path):
    """GenAiVlm hands GenAI Pillow's pixels (alpha over white), so both runtimes prepare every image alike."""
    from sasa_patcher.export.genai import GenAiVlm
    from sasa_patcher.export.onnx_runtime import preprocess_image

    out, _, _ = exported(tmp_path_factory)
    runtime = GenAiVlm(out)
    for name, path in pillow_variants(tmp_path).items():
        pixels = runtime.inputs("Describe this image.", [path])["pixel_values"].as_numpy()
        expected = preprocess_image(path, runtime.config).pixel_values
        assert pixels.shape == expected.shape, name
        assert np.abs(pixels - expected).max() <= 1e-6, name


def test_genai_answer_budget_is_cut_to_the_context_with_a_warning(tmp_path_factory):
    from sasa_patcher.export.genai import GenAiVlm

    out, _, _ = exported(tmp_path_factory)
    runtime = GenAiVlm(out)
    inputs = runtime.inputs(BENIGN)
    runtime.context_length = inputs["input_ids"].as_numpy().shape[-1] + 3
    streamed = []
    with pytest.warns(UserWarning, match="context length"):
        tokens, _, flagged = runtime.generate(inputs, max_new_tokens=20, on_token=streamed.append)
    assert not flagged and 1 <= len(tokens) <= 3 and streamed == tokens


@pytest.mark.integration  # in the default suite (CI's acceptance check): ~6.5 min on 2 CPU cores (export ~4)
def test_embedded_smol_qwen25_vl_runs_in_genai(tmp_path):
    from embedded_patch import patched_embedded

    model, processor = patched_embedded("smol-qwen2.5-vl", random_probe=True)
    set_threshold_between(model, processor, HARMFUL, BENIGN)
    started = time.perf_counter()
    export_onnx(model, processor, tmp_path / "onnx", check_parity=False)
    print(f"export {time.perf_counter() - started:.0f}s")
    results = check_cases(model, processor, tmp_path / "onnx", tmp_path, new_tokens=EMBEDDED_NEW_TOKENS)
    print(json.dumps(results))
    assert [r["name"] for r in results] == ["benign-text", "harmful-text", "one-image", "two-images-two-sizes",
                                            "two-turns"]
    assert len({tuple(grid) for grid in results[3]["grids"]}) == 2  # two images, two sizes
    check_results(results)
