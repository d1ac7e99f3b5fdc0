"""Probe features: one forward of the SASA-patched model per prompt batch, every candidate collected.

Each prompt is encoded as the model will see it at serving time: one user message through the
processor's chat template (an image item first when the prompt has one, then the text), with the
generation prompt appended, so the last prompt position is where the assistant's first token is
predicted. Batches are left-padded; the patched model finds the last non-pad position itself.

One forward with `output_sasa_features` gives the probe-feature candidates asked for and the original
stream's output of every layer at the last prompt position, so choosing a feature never costs a
second pass over the data. Results go to CPU float32 batch by batch into preallocated tensors:
memory is N x (2 V + D + L D) floats, whatever the batch size. With a `FeatureCache` every batch is
also written to disk (a stopped run resumes), and with `sequence_states` every layer's output at every
position too, which `projected_features` continues from once (s, f) is known.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sasa_patcher.modeling_sasa import PROBE_FEATURES, PROJECTED_FEATURES

if TYPE_CHECKING:
    from sasa_patcher.probes.feature_cache import FeatureCache

LAYER_STATES = "layer_states"
SEQUENCE_STATES = "sequence_states"


@dataclass
class ForwardClock:
    """Seconds spent inside the model's own calls (forward, projected continuation), summed over a run.

    Why: calibration's cost is stated as its wall time over the forward passes it must run (issue:
    aim <= 1.2x); tokenising, disk writes, probe fitting and the curves are the rest.
    """

    seconds: float = 0.0
    prompts: int = 0

    @contextlib.contextmanager
    def timing(self, prompts: int) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # kernels run asynchronously: count them here, not in the next copy
            self.seconds += time.perf_counter() - started
            self.prompts += prompts


def _timed(clock: ForwardClock | None, prompts: int):
    return clock.timing(prompts) if clock is not None else contextlib.nullcontext()


@dataclass
class Features:
    """Per-prompt features in the order of the prompts they came from.

    candidates:   feature name -> [N, dim] float32 CPU tensor (the names of `PROBE_FEATURES` asked for)
    layer_states: [N, L, D] float32 CPU tensor (original stream, each layer's output, last prompt
                  position), or None when not asked for
    labels:       [N] int array (0 benign, 1 harmful)
    """

    candidates: dict[str, torch.Tensor]
    layer_states: torch.Tensor | None
    labels: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | np.ndarray) -> Features:
        """The features of the prompts at `index` (in that order)."""
        rows = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return Features(
            candidates={name: value[rows] for name, value in self.candidates.items()},
            layer_states=None if self.layer_states is None else self.layer_states[rows],
            labels=self.labels[rows.numpy()],
            meta=dict(self.meta),
        )


def conversation(prompt) -> list[dict]:
    """The chat a prompt is: one user turn, the image item (if any) before the text."""
    content: list[dict] = []
    if getattr(prompt, "image", None) is not None:
        content.append({"type": "image"})
    content.append({"type": "text", "text": prompt.text})
    return [{"role": "user", "content": content}]


def load_image(path: str | Path) -> Image.Image:
    """The image file, decoded and converted to RGB (what every image processor here expects)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def image_sha256(path: str | Path | None) -> str | None:
    """sha256 of the image file's bytes (the audit record's and the digest's image identity)."""
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


@contextlib.contextmanager
def padding_side(processor, side: str) -> Iterator[None]:
    """Pad on `side` inside the block: left for generation and last-position features, right for training."""
    tokenizer = _tokenizer(processor)
    previous = getattr(tokenizer, "padding_side", None)
    tokenizer.padding_side = side
    try:
        yield
    finally:
        if previous is not None:
            tokenizer.padding_side = previous


def prompt_texts(processor, prompts: Sequence) -> list[str]:
    """Each prompt through the processor's chat template, with the generation prompt appended."""
    return [
        processor.apply_chat_template(conversation(prompt), tokenize=False, add_generation_prompt=True)
        for prompt in prompts
    ]


def encode_prompts(processor, prompts: Sequence) -> dict[str, torch.Tensor]:
    """A left-padded batch (input ids, attention mask, and the family's image inputs) for the prompts.

    Special tokens as transformers' own `processor.apply_chat_template(..., tokenize=True)` does it:
    the tokenizer adds none when the rendered template already starts with its BOS token, else its
    usual ones (a template without BOS keeps the BOS the model was trained with).
    """
    texts = prompt_texts(processor, prompts)
    # one list per prompt (empty for text): the batched form every processor takes (Gemma 3's needs it)
    images = [[load_image(prompt.image)] if getattr(prompt, "image", None) is not None else [] for prompt in prompts]
    bos = getattr(_tokenizer(processor), "bos_token", None)
    starts_with_bos = bool(bos) and bool(texts) and texts[0].startswith(bos)
    kwargs: dict = {"text": texts, "padding": True, "return_tensors": "pt", "add_special_tokens": not starts_with_bos}
    if any(images):
        kwargs["images"] = images
    with padding_side(processor, "left"):
        batch = processor(**kwargs)
    return {key: value for key, value in dict(batch).items() if value is not None}


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = model.get_input_embeddings().weight
    return parameter.device, parameter.dtype


def to_model(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


def batched(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """`order` cut into batches of at most `batch_size` indices."""
    return [list(order[start:start + batch_size]) for start in range(0, len(order), batch_size)]


def length_order(prompts: Sequence) -> list[int]:
    """Batch prompts of similar length together (less padding); image prompts grouped too."""
    return sorted(
        range(len(prompts)),
        key=lambda i: (getattr(prompts[i], "image", None) is not None, len(prompts[i].text), i),
    )


def padded_tokens(processor, prompts: Sequence, batches: list[list[int]]) -> list[int]:
    """Each batch's text tokens padded to its longest prompt (image placeholders not counted): what the
    time and disk estimates scale with."""
    texts = prompt_texts(processor, prompts)
    lengths = [len(ids) for ids in _tokenizer(processor)(texts, add_special_tokens=False)["input_ids"]]
    return [len(rows) * max(lengths[i] for i in rows) for rows in batches]


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _collect(processor, prompts: Sequence, batches: list[list[int]], todo: set[int],
             compute: Callable[[int, dict], dict], load: Callable[[int], dict], *, description: str,
             progress: bool, log: Callable[[str], None] | None) -> dict[str, torch.Tensor]:
    """Every batch's tensors in prompt order: `compute(index, encoded batch)` for the batches in `todo`,
    `load(index)` for the others. After the first computed batch `log` hears the time left (scaled by
    padded tokens); the bar shows it throughout."""
    work = padded_tokens(processor, prompts, batches) if todo and log is not None else None
    stored: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(prompts), desc=description, unit="prompt", disable=not progress, leave=False)
    try:
        for index, rows in enumerate(batches):
            if index in todo:
                started = time.perf_counter()
                found = compute(index, encode_prompts(processor, [prompts[i] for i in rows]))
                if work is not None:
                    seconds = time.perf_counter() - started
                    left = sum(work[i] for i in todo if i > index) * seconds / max(work[index], 1)
                    log(f"{description}: {len(batches)} batches, about {_duration(left)} left on this machine "
                        f"(first batch {seconds:.1f}s, scaled by padded tokens)")
                    work = None
            else:
                found = load(index)
            _store(stored, found, torch.as_tensor(rows), len(prompts))
            bar.update(len(rows))
    finally:
        bar.close()
    return stored


@torch.no_grad()
def extract_features(
    model,
    processor,
    prompts: Sequence,
    *,
    batch_size: int = 8,
    candidates: Sequence[str] = PROBE_FEATURES,
    layer_states: bool = True,
    progress: bool = True,
    description: str = "features",
    cache: FeatureCache | None = None,
    sequence_states: bool = False,
    log: Callable[[str], None] | None = None,
    clock: ForwardClock | None = None,
) -> Features:
    """Run the patched model once per batch and collect features at the last prompt position.

    `candidates` names the probe-feature candidates to keep (all by default; the projected stream
    runs only when one of them reads it); `layer_states=False` drops the per-layer states. Prompts
    are batched by length (less padding) and results returned in the input order. The model is put
    in eval mode; batches go to its device and dtype. `cache`: batches already on disk are read, not
    recomputed, and new ones are written; `sequence_states` (needs `cache`) also writes every layer's
    output at every position. `log` hears the time estimate after the first computed batch; `clock`
    adds the seconds spent in the model's forward calls.
    """
    unknown = set(candidates) - set(PROBE_FEATURES)
    if unknown:
        raise ValueError(f"unknown feature candidates {sorted(unknown)}: choose from {PROBE_FEATURES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to extract features from")
    if sequence_states and cache is None:
        raise ValueError("sequence_states are written to a FeatureCache: pass cache=")
    model.eval()
    device, dtype = model_device_dtype(model)
    batches = batched(length_order(prompts), batch_size)
    wanted = list(candidates) + ([LAYER_STATES] if layer_states else [])
    todo = {index for index in range(len(batches))
            if cache is None or not cache.has("batch", index) or (sequence_states and not cache.has("sequence", index))}
    if cache is not None and len(todo) < len(batches):
        message = f"{description}: {len(batches) - len(todo)} of {len(batches)} batches read from {cache.directory}"
        (log or print)(message)

    def compute(index: int, batch: dict) -> dict:
        with _timed(clock, len(batch["input_ids"])):
            output = model(**to_model(batch, device, dtype), output_sasa_features=tuple(candidates), use_cache=False,
                           logits_to_keep=1, output_sasa_sequence_states=sequence_states)
        found = {name: output.sasa_features[name] for name in wanted}
        if cache is not None:
            cache.save("batch", index, found)
            if sequence_states:
                states = output.sasa_features[SEQUENCE_STATES]
                cache.save("sequence", index, {f"layer.{layer}": states[:, layer] for layer in range(states.shape[1])})
        return found

    stored = _collect(processor, prompts, batches, todo, compute, lambda index: cache.load("batch", index, wanted),
                      description=description, progress=progress, log=log)
    labels = np.asarray([int(prompt.label) for prompt in prompts], dtype=np.int64)
    return Features(
        candidates={name: stored[name] for name in candidates},
        layer_states=stored.get(LAYER_STATES),
        labels=labels,
        meta={"safety_layer": model.sasa.safety_layer, "semantic_layer": model.sasa.semantic_layer},
    )


def _store(stored: dict[str, torch.Tensor], found: dict[str, torch.Tensor], index: torch.Tensor, count: int) -> None:
    """Put one batch's rows into the preallocated CPU float32 result tensors."""
    for name, value in found.items():
        value = value.detach().to("cpu", torch.float32)
        if name not in stored:
            stored[name] = torch.empty((count, *value.shape[1:]), dtype=torch.float32)
        stored[name][index] = value


@torch.no_grad()
def projected_features(
    model, processor, prompts: Sequence, cache: FeatureCache, *, batch_size: int = 8,
    candidates: Sequence[str] = PROJECTED_FEATURES, progress: bool = True, log: Callable[[str], None] | None = None,
    clock: ForwardClock | None = None,
) -> dict[str, torch.Tensor]:
    """The projected candidates at the model's current (s, f), continued from `extract_features`'
    stored sequence states (same prompts, batch size and cache): layers s+1..L-1 only."""
    model.eval()
    device, dtype = model_device_dtype(model)
    s, f = model.sasa.safety_layer, model.sasa.semantic_layer
    batches = batched(length_order(prompts), batch_size)
    kind = f"projected-{s}-{f}"
    todo = {index for index in range(len(batches)) if not cache.has(kind, index)}

    def compute(index: int, batch: dict) -> dict:
        layers = cache.load("sequence", index, [f"layer.{s}", f"layer.{f}"])
        batch = to_model(batch, device, dtype)
        with _timed(clock, len(batch["input_ids"])):
            found = model.sasa_projected_candidates(layers[f"layer.{s}"].to(device, dtype),
                                                    layers[f"layer.{f}"].to(device, dtype), **batch)
        found = {name: found[name] for name in candidates}
        cache.save(kind, index, found)
        return found

    return _collect(processor, prompts, batches, todo, compute, lambda index: cache.load(kind, index, list(candidates)),
                    description=f"projected features (layers {s + 1}..)", progress=progress, log=log)
