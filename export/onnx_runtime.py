"""Run the SASA ONNX artifact with ONNX Runtime: imports only numpy, onnxruntime, tokenizers and Pillow.

(jinja2, when installed, renders the chat template exactly as transformers does; without it the
single-turn prompt format pre-rendered at export time is used.) No torch, no transformers: this is
what `scripts/generate_onnx.py` runs, and what the export-time parity check compares with PyTorch.

Pipeline for one batch (left padding, greedy):
  image -> numpy preprocessing (`export/onnx_preprocess.py`, as the transformers processor; Qwen
  images keep their own size and grid) -> vision_encoder.onnx, once per image
  input_ids + all image features -> embed_tokens.onnx -> inputs_embeds
  prefill: decoder_model_merged.onnx with an empty past -> logits, unsafe_prob (the prompt's
  verdict), present.*; decode: one token per step, present.* fed back as past.*; each step takes the
  argmax of the graph's logits. Gate mode refuses inside the decoder graph (a flagged row's logits
  force the refusal tokens): this loop has no gate of its own.

Graphs come from `sasa_onnx.json` `graphs`; where the artifact has a `genai_config.json` (the file ONNX
Runtime GenAI loads), its graph files and tensor names replace those: both runtimes load the same files.
Bad artifacts and inputs raise `ArtifactError`, `ImageError` or `PromptTooLongError` with one line.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sasa_patcher.export.genai import GENAI_CONFIG_NAME, graphs_from_genai
from sasa_patcher.export.onnx_names import CONFIG_NAME, GRAPHS, ONNX_DIRNAME
from sasa_patcher.export.onnx_preprocess import (  # noqa: F401 - re-exported for callers of the runtime
    ImageError,
    PreparedImage,
    image_tokens,
    mrope_positions,
    preprocess_image,
    text_positions,
)


class ArtifactError(ValueError):
    """A damaged or incomplete ONNX artifact (bad JSON, missing keys, truncated graph files)."""


class PromptTooLongError(ValueError):
    """A prompt longer than the model's context length."""


def find_onnx_dir(path) -> Path:
    """The artifact's ONNX directory: `path` itself, or `path/onnx`."""
    path = Path(path)
    for candidate in (path, path / ONNX_DIRNAME):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or {path / ONNX_DIRNAME}: not a SASA ONNX artifact")


def load_config(onnx_dir: Path) -> dict:
    """`sasa_onnx.json`, with `graphs` taken from `genai_config.json` when the artifact has one."""
    def read(name: str) -> dict:
        try:
            return json.loads((onnx_dir / name).read_text())
        except (OSError, ValueError) as error:
            raise ArtifactError(f"cannot read {onnx_dir / name}: {error}") from None

    config = read(CONFIG_NAME)
    try:
        graphs = config["graphs"]
        if (onnx_dir / GENAI_CONFIG_NAME).is_file():
            for name, graph in graphs_from_genai(read(GENAI_CONFIG_NAME)).items():
                graphs[name].update(graph)
        for name in GRAPHS:
            graphs[name]["file"]
        config["sasa"]["mode"], config["sasa"]["threshold"], config["eos_token_id"], config["hidden_size"]
        config["cache"]
    except (KeyError, TypeError) as error:
        raise ArtifactError(f"{onnx_dir / CONFIG_NAME} (or {GENAI_CONFIG_NAME}) lacks the key {error}: "
                            "re-export the artifact") from None
    if config["sasa"].get("mode") == "gate" and config["cache"].get("gate_state_layer") is None:
        raise ArtifactError(f"{onnx_dir} is a gate-mode artifact from before the gate moved into the decoder graph "
                            "(no cache.gate_state_layer): re-export the artifact")
    return config


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


def gate_flags(sasa: dict, unsafe_prob) -> np.ndarray:
    """The rows the graph's gate refused (gate mode, unsafe_prob above the stored threshold): the graph has already
    acted on it; both runtimes read it back this one way, for reporting."""
    if sasa["mode"] != "gate" or sasa["threshold"] is None:
        return np.zeros(np.shape(unsafe_prob), bool)
    return np.asarray(unsafe_prob) > sasa["threshold"]


# ----- the artifact ------------------------------------------------------------------------------------
@dataclass
class Generation:
    tokens: np.ndarray  # [B, n] new tokens (pad after a row's end-of-sequence)
    unsafe_prob: np.ndarray  # [B] the prompt's verdict
    flagged: np.ndarray  # [B] bool: the graph's gate refused this row (unsafe_prob > threshold; for reporting)
    prefill_logits: np.ndarray  # [B, T, V]
    step_logits: list[np.ndarray]  # one [B, V] per generated token (the raw decoder output)


class OnnxVlm:
    """The three graphs, the config and the tokenizer of one exported model."""

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None,
                 session_config: dict[str, str] | None = None):
        """`session_config`: ONNX Runtime session config entries (e.g. the parity check's no pre-packing)."""
        self.dir = find_onnx_dir(path)
        self.config = load_config(self.dir)
        self._options = ort.SessionOptions()
        if threads:
            self._options.intra_op_num_threads = threads
        for key, value in (session_config or {}).items():
            self._options.add_session_config_entry(key, value)
        self._providers = providers or default_providers()
        self._sessions: dict[str, ort.InferenceSession] = {}
        graphs = self.config["graphs"]
        for name in GRAPHS:  # a broken artifact fails here, not in the middle of a generation
            self.session(name)
        self.names = {key: value for graph in graphs.values() for key, value in graph.get("names", {}).items()}
        self.extra_input_names = list(graphs["decoder"].get("extra_inputs", {}))
        self.past_names = [name for name in graphs["decoder"]["inputs"][3:] if name not in self.extra_input_names]
        self.output_names = graphs["decoder"]["outputs"]
        self._tokenizer = None

    def session(self, graph: str) -> ort.InferenceSession:
        """The session of one graph (`vision_encoder`, `embed_tokens`, `decoder`), loaded again after `release`."""
        if graph not in self._sessions:
            path = self.dir / self.config["graphs"][graph]["file"]
            try:
                self._sessions[graph] = ort.InferenceSession(str(path), self._options, providers=self._providers)
            except Exception as error:  # noqa: BLE001 - ONNX Runtime raises its own types (InvalidProtobuf, Fail, ...)
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise ArtifactError(f"cannot load {path} ({type(error).__name__}): {first}") from None
        return self._sessions[graph]

    def release(self, graph: str) -> None:
        """Drop one graph's session and its mapped weights (the parity check holds one graph at a time)."""
        self._sessions.pop(graph, None)

    def name(self, tensor: str) -> str:
        """A graph tensor's name in this artifact (genai_config.json may rename them)."""
        return self.names.get(tensor, tensor)

    # --- properties of the artifact
    @property
    def position_rows(self) -> int:
        """1: positions [B, T]; 3: the M-RoPE rows [3, B, T] (4: older artifacts with a text row first)."""
        return self.config["graphs"]["decoder"]["position_rows"]

    @property
    def context_length(self) -> int | None:
        return self.config.get("context_length")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.dir / self.config["tokenizer_file"]))
        return self._tokenizer

    # --- graphs
    def encode_images(self, images: list) -> np.ndarray:
        """Image features of every image, concatenated in order (one vision call per image, as GenAI)."""
        hidden = self.config["hidden_size"]
        features = []
        for image in images:
            image = image if isinstance(image, PreparedImage) else PreparedImage(np.asarray(image))
            feeds = {self.name("pixel_values"): np.asarray(image.pixel_values, np.float32)}
            if image.grid_thw is not None:
                feeds[self.name("image_grid_thw")] = np.array([image.grid_thw], np.int64)
            features.append(self.session("vision_encoder").run(None, feeds)[0])
        return np.concatenate(features) if features else np.zeros((0, hidden), np.float32)

    def embed_tokens(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        feeds = {self.name("input_ids"): input_ids.astype(np.int64), self.name("image_features"): image_features}
        return self.session("embed_tokens").run(None, feeds)[0]

    def prefill_positions(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                          grids: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decoder positions of a prompt and the per-row M-RoPE deltas; `grids`: each image's (t, h, w)."""
        text = text_positions(attention_mask)
        batch = input_ids.shape[0]
        if self.position_rows == 1:
            return text, np.zeros((batch, 1), np.int64)
        image = self.config["image"]
        if not (input_ids == image["image_token_id"]).any():
            rope, deltas = np.stack([text] * 3), np.zeros((batch, 1), np.int64)
        else:
            rope, deltas = mrope_positions(input_ids, attention_mask, image["image_token_id"],
                                           grids or image["grid_thw"], image["spatial_merge_size"])
        return (np.concatenate([text[None], rope]) if self.position_rows == 4 else rope), deltas

    def step_positions(self, attention_mask: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        text = text_positions(attention_mask)[:, -1:]
        if self.position_rows == 1:
            return text
        return np.stack(([text] if self.position_rows == 4 else []) + [text + deltas] * 3)

    def extra_inputs(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder's extra inputs for a chunk of `input_ids` (their one rule: 1 at image tokens)."""
        image_token = self.config["image"]["image_token_id"]
        return {self.name(name): (input_ids == image_token).astype(np.int64) for name in self.extra_input_names}

    def run_decoder(self, embeds, attention_mask, position_ids, past: list[np.ndarray],
                    extra: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
        feeds = {self.name("inputs_embeds"): embeds, self.name("attention_mask"): attention_mask.astype(np.int64),
                 self.name("position_ids"): position_ids.astype(np.int64),
                 **dict(zip(self.past_names, past, strict=True)), **(extra or {})}
        return self.session("decoder").run(self.output_names, feeds)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        cache = self.config["cache"]
        shape = (batch, cache["num_key_value_heads"], 0, cache["head_dim"])
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    # --- generation
    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, images: list[np.ndarray],
                 max_new_tokens: int, eos_token_ids=None, pad_token_id: int | None = None,
                 image_features: np.ndarray | None = None,
                 on_token: Callable[[np.ndarray], None] | None = None) -> Generation:
        """Greedy decoding of a left-padded batch; `images` in the order their placeholders appear.

        `on_token` sees each step's [B] chosen tokens as they come (streaming; an exception it raises ends
        the generation).

        `image_features`: the images' vision output computed beforehand (`encode_images`), so the vision
        session can be released first (the parity check); `images` still give the M-RoPE grids.
        """
        input_ids = np.asarray(input_ids, np.int64)
        attention_mask = np.asarray(attention_mask, np.int64)
        batch = input_ids.shape[0]
        eos = set(self.config["eos_token_id"] if eos_token_ids is None else eos_token_ids)
        pad = pad_token_id if pad_token_id is not None else self.config["pad_token_id"]
        max_new_tokens = self._fit_context(input_ids.shape[1], max_new_tokens)
        if image_features is None:
            image_features = self.encode_images(images)
        embeds = self.embed_tokens(input_ids, image_features)
        grids = [image.grid_thw for image in images if isinstance(image, PreparedImage) and image.grid_thw]
        position_ids, deltas = self.prefill_positions(input_ids, attention_mask, grids or None)
        logits, unsafe_prob, *past = self.run_decoder(embeds, attention_mask, position_ids, self.empty_cache(batch),
                                                      self.extra_inputs(input_ids))
        flagged = gate_flags(self.config["sasa"], unsafe_prob)
        prefill_logits, step_logits = logits, []
        hidden = self.config["hidden_size"]
        no_images = np.zeros((0, hidden), np.float32)
        suppress = self.config.get("generation", {}).get("suppress_tokens") or []
        tokens, finished = [], np.zeros(batch, bool)
        for step in range(max_new_tokens):
            last = logits[:, -1]
            step_logits.append(last)
            if suppress:
                last = last.copy()
                last[:, suppress] = -np.inf
            chosen = np.where(finished, pad, last.argmax(-1)).astype(np.int64)
            tokens.append(chosen)
            if on_token is not None:
                on_token(chosen)
            finished |= np.isin(chosen, list(eos))
            if finished.all() or step == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], axis=1)
            embeds = self.embed_tokens(chosen[:, None], no_images)
            logits, _, *past = self.run_decoder(embeds, attention_mask, self.step_positions(attention_mask, deltas),
                                                past, self.extra_inputs(chosen[:, None]))
        new_tokens = np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int64)
        return Generation(new_tokens, unsafe_prob, flagged, prefill_logits, step_logits)

    def _fit_context(self, prompt_length: int, max_new_tokens: int) -> int:
        """Refuse a prompt beyond the context length; shorten the answer budget to fit, with a warning."""
        context = self.context_length
        if not context:
            return max_new_tokens
        if prompt_length >= context:
            raise PromptTooLongError(f"the prompt has {prompt_length} tokens; the model's context length is "
                                     f"{context}: shorten the prompt")
        if prompt_length + max_new_tokens > context:
            allowed = context - prompt_length
            warnings.warn(f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceed the context "
                          f"length {context}: generating at most {allowed} tokens", stacklevel=3)
            return allowed
        return max_new_tokens

    # --- text in, text out
    def render_prompt(self, prompt: str, with_image: bool | int) -> str:
        """The chat template applied to one user turn with `with_image` images first (jinja2 if installed,
        else the pre-rendered single-turn format, which holds at most one image)."""
        return render_prompt(self.config, prompt, int(with_image))

    def encode_prompt(self, prompt: str, image=None) -> tuple[np.ndarray, list[PreparedImage]]:
        """Token ids (each image's placeholder expanded to its own feature count) and the prepared images.

        `image`: None, one image (path or PIL image) or a list of them, shown before the text.
        """
        paths = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        images = [preprocess_image(path, self.config) for path in paths]
        text = self.render_prompt(prompt, len(images))
        if images:
            expand = self.config["image_prompt"]  # what the processor puts where the template marks an image
            pieces = text.split(expand["marker"])
            if len(pieces) - 1 != len(images):
                raise ValueError(f"the chat template placed {len(pieces) - 1} image markers for {len(images)} images")
            merge = self.config["image"]["spatial_merge_size"]
            counts = [image_tokens(i.grid_thw, merge) if i.grid_thw else self.config["image"]["tokens_per_image"]
                      for i in images]
            text = pieces[0] + "".join(expand["before"] + expand["token"] * count + expand["after"] + piece
                                       for count, piece in zip(counts, pieces[1:], strict=True))
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return np.array([ids], np.int64), images

    def answer(self, prompt: str, image=None, max_new_tokens: int = 256) -> str:
        """Greedy answer to one prompt (the graph's refusal when gate mode flags it)."""
        input_ids, images = self.encode_prompt(prompt, image)
        result = self.generate(input_ids, np.ones_like(input_ids), images, max_new_tokens)
        eos = set(self.config["eos_token_id"])
        ids = []
        for token in result.tokens[0].tolist():
            if token in eos:
                break
            ids.append(token)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def render_prompt(config: dict, prompt: str, images: int) -> str:
    """One user turn through the artifact's chat template; torch-free (jinja2 or the pre-rendered format)."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": prompt}]
    template = config.get("chat_template")
    if template:
        try:
            return _render_jinja(template, [{"role": "user", "content": content}], config.get("special_tokens", {}))
        except ImportError:
            if images > 1:
                raise ValueError("several images per prompt need jinja2 for the chat template") from None
    prefix, suffix = config["prompt_format"]["image" if images else "text"]
    return prefix + prompt + suffix


def _render_jinja(template: str, messages: list[dict], special_tokens: dict) -> str:
    """Render as transformers' `apply_chat_template` does (sandboxed, trim/lstrip blocks, loop controls)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **special_tokens)
