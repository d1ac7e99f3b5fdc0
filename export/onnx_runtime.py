"""Run the SASA ONNX artifact with ONNX Runtime: imports only numpy, onnxruntime, tokenizers and Pillow.

(jinja2, when installed, renders the chat template exactly as transformers does; without it the
single-turn prompt format pre-rendered at export time is used.) No torch, no transformers: this is
what `scripts/generate_onnx.py` runs, and what the export-time parity check compares with PyTorch.

Pipeline for one batch (left padding, greedy):
  image -> numpy preprocessing (as the transformers processor) -> vision_encoder.onnx, once per image
  input_ids + all image features -> embed_tokens.onnx -> inputs_embeds
  prefill: decoder_model_merged.onnx with an empty past -> logits, unsafe_prob (the prompt's
  verdict), present.*; decode: one token per step, present.* fed back as past.*
  gate mode: a row whose unsafe_prob exceeds the threshold emits the refusal tokens instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sasa_patcher.export.onnx_names import CONFIG_NAME, ONNX_DIRNAME


def find_onnx_dir(path) -> Path:
    """The artifact's ONNX directory: `path` itself, or `path/onnx`."""
    path = Path(path)
    for candidate in (path, path / ONNX_DIRNAME):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} or {path / ONNX_DIRNAME}: not a SASA ONNX artifact")


def default_providers() -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or available


# ----- image preprocessing (numpy replay of the transformers PIL image processors) ----------------
def _to_rgb(image):
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _rescale_normalize(pixels: np.ndarray, settings: dict) -> np.ndarray:
    """CHW uint8 -> float32, in the processor's order and precision (float64 rescale, float32 normalize)."""
    image = pixels
    if settings.get("do_rescale", True):
        image = (image.astype(np.float64) * settings["rescale_factor"]).astype(np.float32)
    else:
        image = image.astype(np.float32)
    if settings.get("do_normalize", True):
        mean = np.array(settings["image_mean"], dtype=image.dtype)
        std = np.array(settings["image_std"], dtype=image.dtype)
        image = ((image.T - mean) / std).T
    return image


def preprocess_image(image, config: dict) -> np.ndarray:
    """A PIL image (or path) -> the vision encoder's `pixel_values` for one image.

    Qwen: resized to the supported size (bicubic), rescaled, normalized, cut into
    (t, h, w) patches in the processor's order: [h*w, C*temporal*patch*patch].
    LLaVA: shortest edge resized, center crop, rescale, normalize: [1, C, H, W].
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    settings = config["preprocessing"]
    height, width = config["image"]["sizes"][0]
    if settings.get("do_convert_rgb", True):
        image = _to_rgb(image)
    resample = settings.get("resample", 3)
    if settings["resize"] == "exact":
        if image.size != (width, height):
            image = image.resize((width, height), resample=resample)
    else:
        short = settings["shortest_edge"]
        w, h = image.size
        if w <= h:
            new_w, new_h = short, int(short * h / w)
        else:
            new_w, new_h = int(short * w / h), short
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=resample)
    pixels = np.asarray(image)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    pixels = np.moveaxis(pixels, -1, 0)
    if settings.get("do_center_crop"):
        crop_h, crop_w = settings["crop_size"]
        top, left = (pixels.shape[1] - crop_h) // 2, (pixels.shape[2] - crop_w) // 2
        if top < 0 or left < 0:
            raise ValueError(f"image {pixels.shape[1:]} smaller than the crop {crop_h}x{crop_w}")
        pixels = pixels[:, top:top + crop_h, left:left + crop_w]
    image_array = _rescale_normalize(pixels, settings)
    if "patch_size" not in settings:
        return image_array[None].astype(np.float32)
    return patchify(image_array, settings["patch_size"], settings["merge_size"], settings["temporal_patch_size"])


def patchify(image: np.ndarray, patch: int, merge: int, temporal: int) -> np.ndarray:
    """Qwen2-VL patch layout: (gh, gw, mh, mw) blocks, each C x temporal x patch x patch, flattened."""
    channels, height, width = image.shape
    grid_h, grid_w = height // patch, width // patch
    patches = image.reshape(channels, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], temporal, *patches.shape[5:]))
    return np.ascontiguousarray(patches.reshape(grid_h * grid_w, channels * temporal * patch * patch), np.float32)


# ----- positions -----------------------------------------------------------------------------------
def text_positions(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions that skip padding (0 at pad positions), as the patched model makes them."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int,
                    grid_thw: tuple[int, int, int], merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2-VL `get_rope_index` for images: [3, B, T] positions and per-row deltas [B, 1]."""
    batch, length = input_ids.shape
    positions = np.zeros((3, batch, length), dtype=np.int64)
    deltas = np.zeros((batch, 1), dtype=np.int64)
    grid_t, grid_h, grid_w = grid_thw[0], grid_thw[1] // merge, grid_thw[2] // merge
    for row in range(batch):
        valid = attention_mask[row].astype(bool)
        ids = input_ids[row][valid]
        is_image = ids == image_token_id
        pieces, current, start = [], 0, 0
        while start < len(ids):
            end = start
            while end < len(ids) and is_image[end] == is_image[start]:
                end += 1
            if not is_image[start]:
                pieces.append(np.broadcast_to(np.arange(end - start) + current, (3, end - start)))
                current += end - start
            else:
                # One run of placeholder tokens per image (the template separates images).
                per_image = grid_t * grid_h * grid_w
                for _ in range((end - start) // per_image):
                    t, h, w = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
                    pieces.append(np.stack([t.ravel() + current, h.ravel() + current, w.ravel() + current]))
                    current += max(grid_h, grid_w)
            start = end
        row_positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, row, valid] = row_positions
        deltas[row, 0] = (row_positions.max() + 1 - len(ids)) if len(ids) else 0
    return positions, deltas


# ----- the artifact ------------------------------------------------------------------------------------
@dataclass
class Generation:
    tokens: np.ndarray  # [B, n] new tokens (pad after a row's end-of-sequence)
    unsafe_prob: np.ndarray  # [B] the prompt's verdict
    flagged: np.ndarray  # [B] bool: gate mode answered with the refusal
    prefill_logits: np.ndarray  # [B, T, V]
    step_logits: list[np.ndarray]  # one [B, V] per generated token (the raw decoder output)


class OnnxVlm:
    """The three graphs, the config and the tokenizer of one exported model."""

    def __init__(self, path, providers: list[str] | None = None, threads: int | None = None):
        self.dir = find_onnx_dir(path)
        self.config = json.loads((self.dir / CONFIG_NAME).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or default_providers()
        graphs = self.config["graphs"]

        def session(name):
            return ort.InferenceSession(str(self.dir / graphs[name]["file"]), options, providers=providers)

        self.vision, self.embed, self.decoder = session("vision_encoder"), session("embed_tokens"), session("decoder")
        self.past_names = [n for n in graphs["decoder"]["inputs"] if n.startswith("past.")]
        self.output_names = graphs["decoder"]["outputs"]
        self._tokenizer = None

    # --- properties of the artifact
    @property
    def position_rows(self) -> int:
        """1: positions [B, T]; 4: the text row and the three M-RoPE rows, [4, B, T] (the config says which)."""
        return self.config["graphs"]["decoder"]["position_rows"]

    @property
    def flaggable(self) -> bool:
        sasa = self.config["sasa"]
        return sasa["mode"] == "gate" and sasa["threshold"] is not None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.dir / self.config["tokenizer_file"]))
        return self._tokenizer

    # --- graphs
    def encode_images(self, images: list[np.ndarray]) -> np.ndarray:
        hidden = self.config["hidden_size"]
        features = [self.vision.run(None, {"pixel_values": np.asarray(pixels, np.float32)})[0] for pixels in images]
        return np.concatenate(features) if features else np.zeros((0, hidden), np.float32)

    def embed_tokens(self, input_ids: np.ndarray, image_features: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": input_ids.astype(np.int64), "image_features": image_features})[0]

    def prefill_positions(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        text = text_positions(attention_mask)
        batch = input_ids.shape[0]
        if self.position_rows == 1:
            return text, np.zeros((batch, 1), np.int64)
        image = self.config["image"]
        if not (input_ids == image["image_token_id"]).any():
            return np.stack([text] * 4), np.zeros((batch, 1), np.int64)
        rope, deltas = mrope_positions(input_ids, attention_mask, image["image_token_id"], image["grid_thw"],
                                       image["spatial_merge_size"])
        return np.concatenate([text[None], rope]), deltas

    def step_positions(self, attention_mask: np.ndarray, deltas: np.ndarray) -> np.ndarray:
        text = text_positions(attention_mask)[:, -1:]
        return np.stack([text] + [text + deltas] * 3) if self.position_rows == 4 else text

    def run_decoder(self, embeds, attention_mask, position_ids, past: list[np.ndarray]) -> list[np.ndarray]:
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64), **dict(zip(self.past_names, past, strict=True))}
        return self.decoder.run(self.output_names, feeds)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        cache = self.config["cache"]
        shape = (batch, cache["num_key_value_heads"], 0, cache["head_dim"])
        return [np.zeros(shape, np.float32) for _ in self.past_names]

    # --- generation
    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, images: list[np.ndarray],
                 max_new_tokens: int, eos_token_ids=None, pad_token_id: int | None = None) -> Generation:
        """Greedy decoding of a left-padded batch; `images` in the order their placeholders appear."""
        input_ids = np.asarray(input_ids, np.int64)
        attention_mask = np.asarray(attention_mask, np.int64)
        batch = input_ids.shape[0]
        eos = set(self.config["eos_token_id"] if eos_token_ids is None else eos_token_ids)
        pad = pad_token_id if pad_token_id is not None else self.config["pad_token_id"]
        embeds = self.embed_tokens(input_ids, self.encode_images(images))
        position_ids, deltas = self.prefill_positions(input_ids, attention_mask)
        logits, unsafe_prob, *past = self.run_decoder(embeds, attention_mask, position_ids, self.empty_cache(batch))
        sasa = self.config["sasa"]
        flagged = unsafe_prob > sasa["threshold"] if self.flaggable else np.zeros(batch, bool)
        refusal = sasa["refusal_token_ids"]
        if flagged.any() and not refusal:
            raise ValueError("the artifact flags this prompt but defines no refusal_token_ids")
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
            chosen = last.argmax(-1)
            if flagged.any():
                chosen = np.where(flagged, refusal[min(step, len(refusal) - 1)], chosen)
            chosen = np.where(finished, pad, chosen).astype(np.int64)
            tokens.append(chosen)
            finished |= np.isin(chosen, list(eos))
            if finished.all() or step == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), np.int64)], axis=1)
            embeds = self.embed_tokens(chosen[:, None], no_images)
            logits, _, *past = self.run_decoder(embeds, attention_mask, self.step_positions(attention_mask, deltas),
                                                past)
        new_tokens = np.stack(tokens, axis=1) if tokens else np.zeros((batch, 0), np.int64)
        return Generation(new_tokens, unsafe_prob, flagged, prefill_logits, step_logits)

    # --- text in, text out
    def render_prompt(self, prompt: str, with_image: bool) -> str:
        """The chat template applied to one user turn (with jinja2 if installed, else the pre-rendered format)."""
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
        template = self.config.get("chat_template")
        if template:
            try:
                return _render_jinja(template, [{"role": "user", "content": content}],
                                     self.config.get("special_tokens", {}))
            except ImportError:
                pass
        prefix, suffix = self.config["prompt_format"]["image" if with_image else "text"]
        return prefix + prompt + suffix

    def encode_prompt(self, prompt: str, image=None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Token ids (image placeholder expanded to one token per image feature) and the pixel values."""
        images = [preprocess_image(image, self.config)] if image is not None else []
        text = self.render_prompt(prompt, image is not None)
        token = self.config["image_token"]
        if images:
            text = text.replace(token, token * self.config["image"]["tokens_per_image"])
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        return np.array([ids], np.int64), images

    def answer(self, prompt: str, image=None, max_new_tokens: int = 256) -> str:
        """Greedy answer to one prompt; the refusal text when gate mode flags the prompt."""
        input_ids, images = self.encode_prompt(prompt, image)
        result = self.generate(input_ids, np.ones_like(input_ids), images, max_new_tokens)
        if result.flagged[0]:
            return self.config["sasa"]["refusal_text"]
        eos = set(self.config["eos_token_id"])
        ids = []
        for token in result.tokens[0].tolist():
            if token in eos:
                break
            ids.append(token)
        return self.tokenizer.decode(ids, skip_special_tokens=True)


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
