"""scripts/generate_onnx.py and its numpy runtime: preprocessing, positions, prompts, answers without torch.

The unit tests use the tiny Qwen2-VL with a minimal word-level tokenizer and a real
`Qwen2VLImageProcessorPil`, so the whole text -> answer path runs in seconds; the integration test
runs the embedded smol-qwen-vl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

import tiny_models
from sasa_patcher.architectures import spec_for
from sasa_patcher.export.onnx_config import build_config
from sasa_patcher.export.onnx_export import export_onnx
from sasa_patcher.export.onnx_names import CONFIG_NAME, DECODER_FILE
from sasa_patcher.export.onnx_runtime import OnnxVlm, mrope_positions, preprocess_image
from sasa_patcher.modeling_sasa import SasaSettings
from sasa_patcher.patching import patch_model, temporary_settings
from sasa_patcher.processors import image_only

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate_onnx.py"
TINY_SIZE = (56, 56)  # 4x4 patches of 14 -> 4 merged image tokens
PROMPT = "w10 w20 w30 w41 w52"
# What the generate script may import besides the standard library.
ALLOWED_THIRD_PARTY = {"onnxruntime", "onnxruntime_genai", "numpy", "tokenizers", "PIL", "jinja2", "markupsafe",
                       "sasa_patcher"}

TINY_SPECIAL = {
    "<pad>": tiny_models.PAD, "<|im_end|>": tiny_models.EOS, "<|image_pad|>": tiny_models.IMAGE_TOKEN,
    "<|vision_start|>": tiny_models.VISION_START, "<|vision_end|>": tiny_models.VISION_END,
    "<|video_pad|>": 123, "<|im_start|>": 124, "<unk>": 125,
}
TINY_TEMPLATE = (
    "{%- for message in messages -%}{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|> ' -}}{%- elif item['type'] == 'text' -%}"
    "{{- item['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def tiny_processor() :
    """Word-level tokenizer over the tiny vocabulary ('user', 'assistant', 'w5'..) and a 56x56 image processor."""
    vocab = dict(TINY_SPECIAL)
    words = ["user", "assistant", "system"] + [f"w{i}" for i in range(5, tiny_models.IMAGE_TOKEN)]
    vocab.update({word: index for index, word in enumerate(words, start=2)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in TINY_SPECIAL])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    tokenizer.chat_template = TINY_TEMPLATE
    pixels = TINY_SIZE[0] * TINY_SIZE[1]
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    return image_only(Qwen2VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=TINY_TEMPLATE)


def tiny_model():
    model = patch_model(tiny_models.build_qwen2_vl(),
                        SasaSettings(1, 3, mode="gate", refusal_token_ids=[7, 8, 9, tiny_models.EOS]))
    weight = model.sasa_probe.linear.weight
    weight.data = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    return model


def make_image(size=TINY_SIZE, mode="RGB", seed=0) -> Image.Image:
    height, width = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The tiny Qwen2-VL (gate mode) exported with its processor, as `patch.py` lays it out: `<out>/onnx/`."""
    model, processor = tiny_model(), tiny_processor()
    out = tmp_path_factory.mktemp("artifact")
    summary = export_onnx(model, processor, out / "onnx", image_size=TINY_SIZE)
    assert summary["parity"]["passed"], summary["parity"]["worst"]
    return SimpleNamespace(model=model, processor=processor, root=out, onnx=out / "onnx")


def run_script(artifact_dir: Path, *args: str, tmp_path: Path, runtime: str = "onnxruntime"
               ) -> subprocess.CompletedProcess:
    """Run the script with torch, transformers and onnx unimportable; record every module it loaded.

    `runtime` is pinned (never `auto`): a test of the project's runtime must not pass through GenAI's."""
    modules_file = tmp_path / "modules.json"
    prelude = (
        "import sys, json, atexit, runpy\n"
        "sys.modules.update(dict.fromkeys(['torch', 'transformers', 'onnx'], None))\n"
        f"atexit.register(lambda: open({str(modules_file)!r}, 'w').write(\n"
        "    json.dumps(sorted(name for name, module in sys.modules.items() if module is not None))))\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", prelude, str(SCRIPT), str(artifact_dir), *args, "--cpu",
                             "--runtime", runtime],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = {name.split(".")[0] for name in json.loads(modules_file.read_text()) if not name.startswith("_")}
    third_party = loaded - set(sys.stdlib_module_names)
    assert not {"torch", "transformers", "onnx"} & loaded
    assert third_party <= ALLOWED_THIRD_PARTY, third_party - ALLOWED_THIRD_PARTY
    return result


@torch.no_grad()
def pytorch_answer(model, processor, prompt: str, image=None, max_new_tokens: int = 16) -> str:
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    batch = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


# ----- the numpy runtime against transformers --------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_qwen_pixels_equal_the_hf_processor(artifact, mode):
    config = json.loads((artifact.onnx / CONFIG_NAME).read_text())
    image = make_image(mode=mode)
    expected = artifact.processor.image_processor(images=[image], return_tensors="np")
    prepared = preprocess_image(image, config)
    assert expected["image_grid_thw"].tolist() == [list(prepared.grid_thw)]
    pixels = prepared.pixel_values
    assert pixels.dtype == np.float32 and pixels.shape == expected["pixel_values"].shape
    assert np.abs(pixels - expected["pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize("size", [(90, 37), (200, 120), (150, 90), (600, 500), (20, 30)])
def test_every_image_keeps_its_own_size_as_the_processor_resizes_it(size):
    """smart_resize within [min_pixels, max_pixels], aspect ratio kept: the processor's grid and pixels."""
    model = tiny_model()
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 160},
                                               patch_size=14, merge_size=2, temporal_patch_size=2)
    config = build_config(model, SimpleNamespace(image_processor=image_processor),
                          spec_for(model).image_layout(model, TINY_SIZE), TINY_SIZE)
    image = make_image(size)
    expected = image_processor(images=[image], return_tensors="np")
    prepared = preprocess_image(image, config)
    assert [list(prepared.grid_thw)] == expected["image_grid_thw"].tolist()
    assert np.abs(prepared.pixel_values - expected["pixel_values"]).max() <= 1e-6


@pytest.mark.parametrize("size", [(40, 33), (28, 60), (28, 28)])
def test_clip_pixels_equal_the_hf_processor(size):
    """LLaVA: shortest edge to the crop size, center crop, rescale, normalize, as CLIPImageProcessorPil."""
    model = patch_model(tiny_models.build_llava(), SasaSettings(1, 3))
    image_size = (tiny_models.LLAVA_IMAGE_SIZE,) * 2
    clip = CLIPImageProcessorPil(size={"shortest_edge": image_size[0]},
                                 crop_size={"height": image_size[0], "width": image_size[1]})
    config = build_config(model, SimpleNamespace(image_processor=clip), spec_for(model).image_layout(model, image_size),
                          image_size)
    image = make_image(size)
    expected = clip(images=[image], return_tensors="np")["pixel_values"]
    pixels = preprocess_image(image, config).pixel_values
    assert pixels.shape == expected.shape == (1, 3, *image_size)
    assert np.abs(pixels - expected).max() <= 1e-6


def test_mrope_positions_equal_the_model(artifact):
    model = artifact.model
    batch = tiny_models.qwen_batch([5, 12, 8, 3], [True, False, True, True], side="left")
    expected, deltas = model.model.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                                  image_grid_thw=batch["image_grid_thw"],
                                                  attention_mask=batch["attention_mask"])
    positions, ours = mrope_positions(batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                                      tiny_models.IMAGE_TOKEN, tiny_models.QWEN_GRID, 2)
    assert np.array_equal(positions, expected.numpy())
    assert np.array_equal(ours, deltas.numpy())


@pytest.mark.parametrize("with_image", [False, True])
def test_prompt_ids_equal_the_hf_processor(artifact, with_image, monkeypatch):
    """Chat template (jinja2, and the pre-rendered fallback), placeholder expansion and tokenization."""
    runtime = OnnxVlm(artifact.onnx, providers=["CPUExecutionProvider"])
    image = make_image() if with_image else None
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": PROMPT}]
    text = artifact.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)
    expected = artifact.processor(text=[text], images=[image] if with_image else None, return_tensors="np")
    assert runtime.render_prompt(PROMPT, with_image) == text
    monkeypatch.setitem(runtime.config, "chat_template", None)  # what a runtime without jinja2 does
    assert runtime.render_prompt(PROMPT, with_image) == text
    ids, images = runtime.encode_prompt(PROMPT, image)
    assert ids.tolist() == expected["input_ids"].tolist()
    if with_image:
        assert np.abs(images[0].pixel_values - expected["pixel_values"]).max() <= 1e-6


# ----- the script, torch unimportable ------------------------------------------------------------------
@pytest.mark.parametrize("with_image", [False, True])
def test_script_answers_like_pytorch_without_torch(artifact, tmp_path, with_image):
    image = make_image(seed=3) if with_image else None
    args = ["--prompt", PROMPT, "--max-new-tokens", "16"]
    if with_image:
        image.save(tmp_path / "picture.png")
        args += ["--image", str(tmp_path / "picture.png")]
    expected = pytorch_answer(artifact.model, artifact.processor, PROMPT, image, max_new_tokens=16)
    assert expected.strip()
    result = run_script(artifact.root, *args, tmp_path=tmp_path)  # the parent of onnx/
    assert result.stdout == expected + "\n"


def test_script_refuses_a_flagged_prompt(artifact, tmp_path):
    """The refusal comes from the decoder graph: the same artifact with a graph exported at threshold 0."""
    from sasa_patcher.export.onnx_graphs import export_decoder

    flagged = tmp_path / "flagged"
    shutil.copytree(artifact.onnx, flagged)
    config = json.loads((flagged / CONFIG_NAME).read_text())
    with temporary_settings(artifact.model, threshold=0.0):  # every probability passes
        export_decoder(artifact.model, flagged / DECODER_FILE)
    config["sasa"]["threshold"] = 0.0
    (flagged / CONFIG_NAME).write_text(json.dumps(config))
    refusal = OnnxVlm(flagged).tokenizer.decode(artifact.model.sasa.refusal_token_ids, skip_special_tokens=True)
    assert refusal.strip()
    result = run_script(flagged, "--prompt", PROMPT, tmp_path=tmp_path)  # the onnx/ directory itself
    assert result.stdout == refusal + "\n"
    config["sasa"]["threshold"] = None  # the script has no gate of its own: the JSON does not matter
    (flagged / CONFIG_NAME).write_text(json.dumps(config))
    assert run_script(flagged, "--prompt", PROMPT, tmp_path=tmp_path).stdout == refusal + "\n"


def test_script_rejects_a_directory_without_artifact(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--prompt", "hi"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert "sasa_onnx.json" in result.stderr


# ----- integration: the embedded model --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_script_answers_like_pytorch_on_the_embedded_model(tmp_path):
    from embedded_patch import patched_embedded

    model, processor = patched_embedded("smol-qwen-vl")
    export_onnx(model, processor, tmp_path / "out" / "onnx", check_parity=False)
    size = json.loads((tmp_path / "out" / "onnx" / CONFIG_NAME).read_text())["image"]["sizes"][0]
    image = make_image(tuple(size), seed=5)
    image.save(tmp_path / "picture.png")
    for prompt, picture in (("What is the capital of France?", None), ("Describe this picture.", image)):
        args = ["--prompt", prompt, "--max-new-tokens", "32"]
        if picture is not None:
            args += ["--image", str(tmp_path / "picture.png")]
        expected = pytorch_answer(model, processor, prompt, picture, max_new_tokens=32)
        result = run_script(tmp_path / "out", *args, tmp_path=tmp_path)
        print(f"\n{prompt!r} -> {result.stdout.strip()!r}")
        assert result.stdout == expected + "\n"


# ----- bad input: one clear line and exit status 2, in both runtimes -----------------------------------
def bad_artifacts(source: Path, tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    """name -> (artifact dir, extra CLI args, expected message fragment)."""
    from sasa_patcher.export.onnx_runtime import load_config

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"this is not a PNG file")
    truncated = copy("truncated")
    decoder = truncated / load_config(truncated)["graphs"]["decoder"]["file"]
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 3])
    no_graphs = copy("no-graphs")
    (no_graphs / "genai_config.json").unlink(missing_ok=True)
    config = json.loads((no_graphs / CONFIG_NAME).read_text())
    config.pop("graphs", None)
    (no_graphs / CONFIG_NAME).write_text(json.dumps(config))
    context = json.loads((source / CONFIG_NAME).read_text())["context_length"]
    return {
        "undecodable-image": (source, ["--image", str(not_an_image)], "cannot read image"),
        "truncated-graph": (truncated, [], "cannot load"),
        "config-without-graphs": (no_graphs, [], "graphs"),
        "prompt-beyond-context": (source, ["--prompt", " ".join(["w10"] * (context + 50))], "context length"),
    }


@pytest.mark.parametrize("case", ["undecodable-image", "truncated-graph", "config-without-graphs",
                                  "prompt-beyond-context"])
def test_bad_input_is_one_error_line_and_exit_2(artifact, tmp_path, capsys, case):
    from sasa_patcher.cli.generate_onnx import main

    directory, extra, message = bad_artifacts(artifact.onnx, tmp_path)[case]
    args = [str(directory), "--prompt", PROMPT, "--cpu", "--runtime", "onnxruntime", *extra]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error:") and message in captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


@pytest.fixture(scope="module")
def genai_artifact(tmp_path_factory) -> Path:
    """The tiny Qwen2.5-VL of tests/tiny_genai.py (gate mode), exported once: an ONNX directory GenAI loads."""
    from tiny_genai import exported

    return exported(tmp_path_factory)[0]


def genai_bad_artifacts(source: Path, tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (artifact dir, extra CLI args): what a GenAI user hits (genai_config.json holds the graph names)."""
    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(source, target)
        return target

    def edit_genai(name: str, change) -> Path:
        target = copy(name)
        path = target / "genai_config.json"
        path.write_text(change(path.read_text()))
        return target

    def without_decoder_file(text: str) -> str:
        genai = json.loads(text)
        del genai["model"]["decoder"]["filename"]
        return json.dumps(genai)

    not_an_image = tmp_path / "not-an-image.png"
    not_an_image.write_bytes(b"this is not a PNG file")
    truncated = copy("truncated")
    decoder = truncated / json.loads((source / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    decoder.write_bytes(decoder.read_bytes()[: decoder.stat().st_size // 3])
    missing = copy("genai-config-missing")
    (missing / "genai_config.json").unlink()
    context = json.loads((source / "genai_config.json").read_text())["model"]["context_length"]
    return {
        "undecodable-image": (source, ["--image", str(not_an_image)]),
        "truncated-graph": (truncated, []),
        "genai-config-without-decoder-file": (edit_genai("no-decoder-file", without_decoder_file), []),
        "genai-config-not-json": (edit_genai("not-json", lambda text: text[: len(text) // 2]), []),
        "genai-config-missing": (missing, []),
        "prompt-beyond-context": (source, ["--prompt", " ".join(["hello"] * (context + 50))]),
    }


# case -> (message fragments with --runtime genai, with --runtime auto: a failed GenAI load falls back to the
# project's runtime, whose error is then the one line)
GENAI_MESSAGES = {
    "undecodable-image": ("cannot read image", "cannot read image"),
    "truncated-graph": (("ONNX Runtime GenAI cannot load", "decoder_model_merged.onnx", "re-export the artifact"),
                        "decoder_model_merged.onnx"),
    "genai-config-without-decoder-file": ("genai_config.json lacks model.decoder.filename: re-export the artifact",
                                          "genai_config.json lacks model.decoder.filename: re-export the artifact"),
    "genai-config-not-json": ("genai_config.json is not readable JSON", "genai_config.json"),
    # auto: sasa_onnx.json keeps its own graphs, so the project's runtime serves the artifact (test below)
    "genai-config-missing": ("genai_config.json is missing: copy it with the artifact or re-export the artifact",
                             None),
    "prompt-beyond-context": ("context length is 2048: shorten the prompt",) * 2,
}


@pytest.mark.parametrize("case,runtime", [(case, runtime) for case, messages in GENAI_MESSAGES.items()
                                          for runtime, message in zip(("genai", "auto"), messages, strict=True)
                                          if message is not None])
def test_bad_input_is_one_error_line_and_exit_2_in_genai(genai_artifact, tmp_path, capsys, case, runtime):
    from sasa_patcher.cli.generate_onnx import main

    directory, extra = genai_bad_artifacts(genai_artifact, tmp_path)[case]
    expected = GENAI_MESSAGES[case][runtime == "auto"]
    args = [str(directory), "--prompt", "Describe this image.", "--cpu", "--runtime", runtime, *extra]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error:"), captured.err
    assert all(fragment in captured.err for fragment in ([expected] if isinstance(expected, str) else expected)), \
        captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err


def test_auto_serves_an_artifact_without_genai_config(genai_artifact, tmp_path, capsys):
    """sasa_onnx.json keeps its graphs (position rows included) when GenAI's files are written: with
    genai_config.json gone, --runtime auto serves the artifact with the project's runtime."""
    from sasa_patcher.cli.generate_onnx import main

    directory, extra = genai_bad_artifacts(genai_artifact, tmp_path)["genai-config-missing"]
    assert main([str(directory), "--prompt", "Describe this image.", "--cpu", "--runtime", "auto",
                 "--max-new-tokens", "4", *extra]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "Traceback" not in captured.err


def test_answer_budget_is_cut_to_the_context_with_a_warning(artifact):
    runtime = OnnxVlm(artifact.onnx, providers=["CPUExecutionProvider"])
    context = runtime.context_length
    ids = np.full((1, context - 3), 10, np.int64)
    with pytest.warns(UserWarning, match="context length"):
        result = runtime.generate(ids, np.ones_like(ids), [], max_new_tokens=20, eos_token_ids=[])
    assert result.tokens.shape[1] == 3
