"""The ONNX directory as ONNX Runtime GenAI loads it (`og.Model(dir)`), served by GenAI's own loop.

For families whose spec names a GenAI type (`ArchitectureSpec.genai_type`; the spec also gives the
family's vision keys and image processor, `genai_sections`) the export adds, next to the graphs and
`sasa_onnx.json` (which keeps its own `graphs`: position rows and extra inputs are not GenAI's):

    genai_config.json             GenAI's model description: graph files, tensor names, token ids
                                  (the project's runtime reads graph and tensor names from it too)
    genai_processor_config.json   GenAI's image processor (onnxruntime-extensions transforms), named
                                  through `vision.config_filename` so it does not clash with the
                                  transformers `processor_config.json` of the checkpoint
    tokenizer.json, tokenizer_config.json (with the chat template)

GenAI rejects unknown keys in `genai_config.json`, so the SASA facts (threshold, refusal, mode) stay
in `sasa_onnx.json`. GenAI manages one KV cache: only gate-mode artifacts get a GenAI config. The
gate lives in the decoder graph: `num_hidden_layers` counts the decoder's layers plus the gate's
state layer (`onnx_graphs.gate_state_layer`), which GenAI carries from step to step like any cache
layer, and a flagged prompt's logits force the refusal tokens. GenAI's plain greedy loop therefore
refuses by itself:

    import onnxruntime_genai as og
    model = og.Model(d); processor = model.create_multimodal_processor(); tokenizer = og.Tokenizer(model)
    inputs = processor(prompt, images=og.Images.open(*paths) if paths else None)
    params = og.GeneratorParams(model); params.set_search_options(max_length=4096)
    generator = og.Generator(model, params); generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token(); tokens.append(generator.get_next_tokens()[0])
    print(tokenizer.decode(tokens))

`unsafe_prob` is an extra decoder output that GenAI binds by itself; reading it is optional (logging,
metrics): `generator.get_output("unsafe_prob")` right after the first `generate_next_token()` (the prompt
step); later steps overwrite it with -1 ("not computed").

`prompt` is the chat-templated text with one `<|vision_start|><|image_pad|><|vision_end|>` per image.
`og.Images.open` uses GenAI's own decoder: PNG and JPEG only, alpha dropped rather than composited over
white as transformers does; `GenAiVlm` (the generate CLI's GenAI path) hands it Pillow-decoded RGB PNG.
This module imports neither torch nor onnxruntime_genai at import time: the generate CLI uses it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sasa_patcher.export.onnx_names import CONFIG_NAME

GENAI_CONFIG_NAME = "genai_config.json"
GENAI_PROCESSOR_NAME = "genai_processor_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
PAST_PATTERN = "past.original.%d.{kind}"
PRESENT_PATTERN = "present.original.%d.{kind}"
SESSION_OPTIONS = {"log_id": "onnxruntime-genai", "provider_options": []}


# ----- reading the artifact (torch-free) ----------------------------------------------------------
def has_genai_config(onnx_dir) -> bool:
    return (Path(onnx_dir) / GENAI_CONFIG_NAME).is_file()


def _artifact_error(message: str) -> Exception:
    from sasa_patcher.export.onnx_runtime import ArtifactError  # lazy: onnx_runtime imports this module

    return ArtifactError(message)


def _lookup(genai: dict[str, Any], dotted: str, source: str) -> Any:
    """`genai["model"]["decoder"]...` by a dotted path; a missing key is one ArtifactError naming it."""
    node: Any = genai
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise _artifact_error(f"{source} lacks {dotted}: re-export the artifact")
        node = node[key]
    return node


def graphs_from_genai(genai: dict[str, Any], source: str = GENAI_CONFIG_NAME) -> dict[str, Any]:
    """The graph files and tensor names GenAI reads, from `genai_config.json`, as `sasa_onnx.json` `graphs` holds
    them: the runtime updates those with these, so both load the same files under the same names (the decoder's
    position rows and extra inputs stay `sasa_onnx.json`'s). A missing key raises `ArtifactError` naming it.
    """
    def get(dotted: str) -> Any:
        return _lookup(genai, dotted, source)

    layers = range(get("model.decoder.num_hidden_layers"))
    past = [get(f"model.decoder.inputs.past_{kind}_names") % layer for layer in layers for kind in ("key", "value")]
    present = [get(f"model.decoder.outputs.present_{kind}_names") % layer
               for layer in layers for kind in ("key", "value")]
    names = {key: get(f"model.decoder.inputs.{key}") for key in ("inputs_embeds", "attention_mask", "position_ids")}
    return {
        "vision_encoder": {"file": get("model.vision.filename"),
                           "names": {**get("model.vision.inputs"), **get("model.vision.outputs")}},
        "embed_tokens": {"file": get("model.embedding.filename"),
                         "names": {**get("model.embedding.inputs"), **get("model.embedding.outputs")}},
        "decoder": {
            "file": get("model.decoder.filename"),
            "names": names,
            "inputs": [*names.values(), *past],
            "outputs": [get("model.decoder.outputs.logits"), "unsafe_prob", *present],
        },
    }


def read_genai_config(onnx_dir) -> dict[str, Any]:
    """`genai_config.json`, checked as GenAI needs it: present, valid JSON, graph and processor files named and
    on disk. Every failure is one `ArtifactError` line naming the file and the fix."""
    onnx_dir = Path(onnx_dir)
    path = onnx_dir / GENAI_CONFIG_NAME
    if not path.is_file():
        try:
            config = json.loads((onnx_dir / CONFIG_NAME).read_text())
            never_written = "graphs" in config and not config.get("genai_files")
        except (OSError, ValueError):
            never_written = False
        if never_written:  # an augment-mode artifact, or a family GenAI cannot run: the project's runtime serves it
            raise _artifact_error(f"{onnx_dir} has no {GENAI_CONFIG_NAME} (ONNX Runtime GenAI serves gate-mode "
                                  "artifacts of the families it has a type for): use --runtime onnxruntime")
        raise _artifact_error(f"{path} is missing: copy it with the artifact or re-export the artifact")
    try:
        genai = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _artifact_error(f"{path} is not readable JSON ({error}): re-export the artifact") from None
    graphs_from_genai(genai, str(path))  # every graph key
    _lookup(genai, "model.context_length", str(path))
    files = {_lookup(genai, key, str(path)): f"{GENAI_CONFIG_NAME} {key} names it"
             for key in ("model.decoder.filename", "model.embedding.filename", "model.vision.filename",
                         "model.vision.config_filename")}
    files["tokenizer.json"] = "GenAI's tokenizer reads it"
    for name, why in files.items():
        if not (onnx_dir / str(name)).is_file():
            raise _artifact_error(f"{onnx_dir / str(name)} is missing ({why}): copy it with the artifact or "
                                  "re-export the artifact")
    return genai


# ----- writing the artifact (called by the exporter; takes the built sasa_onnx.json config) -------
def _pad_token(config: dict[str, Any], tokenizer, prompts: list[str]) -> int:
    """A pad id that never occurs in a templated prompt: GenAI masks every pad id out of the prompt.

    (SmolLM2's pad is `<|im_end|>`, which every chat turn contains.)
    """
    used = {token for prompt in prompts for token in tokenizer(prompt, add_special_tokens=False).input_ids}
    candidates = [config["pad_token_id"], *getattr(tokenizer, "all_special_ids", []), *config["eos_token_id"]]
    return next((token for token in candidates if token not in used), config["pad_token_id"])


def genai_config(config: dict[str, Any], vision_keys: dict[str, Any], genai_type: str, pad_token_id: int
                 ) -> dict[str, Any]:
    """GenAI's model description for the three graphs of `config` (the built `sasa_onnx.json`); `vision_keys`:
    the family's own `model.vision` keys (its spec's `genai_sections`)."""
    cache, graphs = config["cache"], config["graphs"]
    eos = config["eos_token_id"]
    return {
        "model": {
            "type": genai_type,
            "bos_token_id": config.get("bos_token_id", eos[0]),
            "eos_token_id": eos,
            "pad_token_id": pad_token_id,
            "context_length": config["context_length"],
            "vocab_size": config["vocab_size"],
            "image_token_id": config["image"]["image_token_id"],
            "video_token_id": config["image"]["video_token_id"],
            "vision_start_token_id": config["image"]["vision_start_token_id"],
            "decoder": {
                "session_options": SESSION_OPTIONS, "filename": graphs["decoder"]["file"],
                "head_size": cache["head_dim"], "hidden_size": config["hidden_size"],
                "num_attention_heads": config["num_attention_heads"],
                "num_hidden_layers": cache["num_hidden_layers"], "num_key_value_heads": cache["num_key_value_heads"],
                "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST_PATTERN.format(kind="key"),
                           "past_value_names": PAST_PATTERN.format(kind="value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_PATTERN.format(kind="key"),
                            "present_value_names": PRESENT_PATTERN.format(kind="value")},
            },
            "embedding": {
                "session_options": SESSION_OPTIONS, "filename": graphs["embed_tokens"]["file"],
                "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                "outputs": {"inputs_embeds": "inputs_embeds"},
            },
            "vision": {
                "session_options": SESSION_OPTIONS, "filename": graphs["vision_encoder"]["file"],
                "config_filename": GENAI_PROCESSOR_NAME,
                **vision_keys,
                "outputs": {"image_features": "image_features"},
            },
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": config["context_length"], "min_length": 0, "no_repeat_ngram_size": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def write_tokenizer_files(tokenizer, chat_template: str | None, out_dir: Path) -> None:
    """`tokenizer.json` + `tokenizer_config.json` with the chat template inline (onnxruntime-extensions reads both)."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        shutil.copyfile(Path(scratch) / "tokenizer.json", out_dir / "tokenizer.json")
        settings = json.loads((Path(scratch) / TOKENIZER_CONFIG_NAME).read_text())
    if chat_template:
        settings["chat_template"] = chat_template
    (out_dir / TOKENIZER_CONFIG_NAME).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def write_genai_files(config: dict[str, Any], model, processor, out_dir: Path) -> list[str]:
    """Write GenAI's config, processor and tokenizer files; return their names."""
    from sasa_patcher.architectures import spec_for
    from sasa_patcher.export.onnx_config import render_user_turn

    tokenizer = processor.tokenizer
    prompts = [render_user_turn(processor, "x", images) for images in (0, 1)]
    pad = _pad_token(config, tokenizer, [prompt for prompt in prompts if prompt])
    vision_keys, image_processor = spec_for(model).genai_sections(model, config["preprocessing"])
    files = {GENAI_CONFIG_NAME: genai_config(config, vision_keys, config["genai_type"], pad),
             GENAI_PROCESSOR_NAME: image_processor}
    for name, content in files.items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
    write_tokenizer_files(tokenizer, config.get("chat_template"), out_dir)
    return [*files, "tokenizer.json", TOKENIZER_CONFIG_NAME]


# ----- serving with GenAI (the generate CLI's GenAI path; torch-free) ------------------------------
def genai_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime_genai") is not None


class GenAiVlm:
    """Greedy answers through ONNX Runtime GenAI's own loop; the decoder graph refuses flagged prompts itself.

    Bad artifacts and inputs raise the project runtime's `ArtifactError`, `ImageError` or `PromptTooLongError`
    (one line each), never GenAI's own exceptions. Images are decoded by Pillow, as in the project's runtime
    and transformers, and handed to GenAI as RGB PNG: GenAI's own decoder reads PNG and JPEG only (a WebP
    or GIF ends the process), rejects CMYK JPEGs and drops alpha instead of compositing it over white.
    """

    def __init__(self, onnx_dir):
        import onnxruntime_genai as og

        from sasa_patcher.export.onnx_runtime import ArtifactError, load_config  # lazy: onnx_runtime imports this

        self.og, self.dir = og, Path(onnx_dir)
        genai = read_genai_config(self.dir)
        self.config = load_config(self.dir)  # the same checks as the ONNX Runtime path
        try:
            self.model = og.Model(str(self.dir))
            self.processor = self.model.create_multimodal_processor()
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as error:  # noqa: BLE001 - GenAI raises RuntimeError/OSError with long messages
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ArtifactError(f"ONNX Runtime GenAI cannot load {self.dir}: {first} (a file is damaged or "
                                "incomplete: re-export the artifact)") from None
        self.context_length = genai["model"]["context_length"]

    def images(self, paths: list) -> Any:
        """`og.Images` of `paths`, decoded by Pillow (unreadable files: ImageError) and passed as RGB PNG."""
        import io

        from sasa_patcher.export.onnx_preprocess import _to_rgb, open_image, smart_resize

        settings = self.config["preprocessing"]
        blobs = []
        for path in paths:
            image = _to_rgb(open_image(path))  # alpha over white, as transformers and the project's runtime
            if settings.get("resize") == "smart":  # the same refusal as the project's runtime (aspect ratio)
                smart_resize(image.height, image.width, settings["patch_size"] * settings["merge_size"],
                             settings["min_pixels"], settings["max_pixels"])
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)  # lossless: GenAI sees Pillow's pixels
            blobs.append(buffer.getvalue())
        return self.og.Images.open_bytes(*blobs)

    def inputs(self, prompt: str, images: list | None = None):
        """GenAI's named input tensors (ids, pixels, grids) for one user turn with `images` shown first."""
        from sasa_patcher.export.onnx_runtime import render_prompt

        images = list(images or [])
        text = render_prompt(self.config, prompt, len(images))
        return self.processor(text, images=self.images(images) if images else None)

    def generate(self, inputs, max_new_tokens: int = 256,
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], float, bool]:
        """The graph's greedy new tokens (to the end-of-sequence token or the budget; a flagged prompt's are the
        refusal tokens), the prompt's unsafe_prob, and whether the graph's gate flagged the prompt (reporting).

        `on_token` sees each new token id as it comes (streaming; an exception it raises ends the generation).
        A prompt beyond the context length raises PromptTooLongError; a budget beyond it is cut to fit, with a
        warning (as in the project's runtime)."""
        import warnings

        from sasa_patcher.export.onnx_runtime import PromptTooLongError, gate_flags

        length = inputs["input_ids"].as_numpy().shape[-1]
        if length >= self.context_length:
            raise PromptTooLongError(f"the prompt has {length} tokens; the model's context length is "
                                     f"{self.context_length}: shorten the prompt")
        if length + max_new_tokens > self.context_length:
            warnings.warn(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) exceed the context length "
                          f"{self.context_length}: generating at most {self.context_length - length} tokens",
                          stacklevel=3)
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(length + max_new_tokens, self.context_length), do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.set_inputs(inputs)
        eos = set(self.config["eos_token_id"])
        tokens: list[int] = []
        unsafe_prob = float("nan")
        while not generator.is_done() and not (tokens and tokens[-1] in eos):
            generator.generate_next_token()
            if not tokens:  # the prompt step: the probe's verdict (optional; the graph has acted on it)
                unsafe_prob = float(generator.get_output("unsafe_prob")[0])
            tokens.append(int(generator.get_next_tokens()[0]))
            if on_token is not None:
                on_token(tokens[-1])
        return tokens, unsafe_prob, bool(gate_flags(self.config["sasa"], unsafe_prob))

    def answer(self, prompt: str, images: list | None = None, max_new_tokens: int = 256) -> str:
        """Greedy answer to one prompt (the graph's refusal when gate mode flags it)."""
        tokens, _, _ = self.generate(self.inputs(prompt, images), max_new_tokens)
        eos = set(self.config["eos_token_id"])
        return self.tokenizer.decode([token for token in tokens if token not in eos])
