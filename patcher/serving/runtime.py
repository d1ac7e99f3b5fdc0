"""One completion on the artifact: ONNX Runtime GenAI's loop, or the project's runtime for artifacts GenAI
cannot load (LLaVA, augment mode), chosen as `sasa-generate-onnx` chooses (`load_runtime`).

The verdict is the graph's: the answer is the decoded greedy tokens (for a flagged prompt, the refusal the
decoder's gate emits); when the runtime reports the prompt flagged, the finish reason is `content_filter`.
No threshold is read and no refusal is made here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sasa_patcher.export.genai import GenAiVlm
from sasa_patcher.export.onnx_preprocess import ImageError
from sasa_patcher.serving.protocol import REFUSED_FINISH_REASON, invalid
from sasa_patcher.serving.text import TextStream


class _Cancelled(Exception):
    """The client went away: end the generation and free the worker."""


class _Stopped(Exception):
    """A stop string appeared: end the generation."""


@dataclass
class Prepared:
    inputs: Any  # the runtime's own inputs (GenAI's named tensors, or ids + prepared images)
    prompt_tokens: int


@dataclass
class Outcome:
    text: str
    finish_reason: str  # stop | length | content_filter
    prompt_tokens: int
    completion_tokens: int
    unsafe_prob: float | None
    flagged: bool
    decode_seconds: float


class ServedModel:
    """The runtime, its context length, end-of-sequence ids and decoding, behind one `complete` call."""

    def __init__(self, runtime, name: str):
        self.runtime, self.name = runtime, name
        self.genai = isinstance(runtime, GenAiVlm)
        config = runtime.config
        self.eos = set(config["eos_token_id"])
        self.context_length: int | None = runtime.context_length
        self.kind = "onnxruntime-genai" if self.genai else "onnxruntime"
        from tokenizers import Tokenizer

        # One decoder for both runtimes, the artifact's tokenizer.json: GenAI's own decode differs on byte-level
        # tokens that are not valid UTF-8 (measured: it drops the rest of the text after one), so the same
        # tokens would read differently depending on the runtime.
        self.tokenizer = Tokenizer.from_file(str(runtime.dir / config["tokenizer_file"]))

    def prepare(self, text: str, images: list) -> Prepared:
        try:
            if self.genai:
                inputs = self.runtime.inputs(text, images)
                return Prepared(inputs, int(inputs["input_ids"].as_numpy().shape[-1]))
            ids, prepared = self.runtime.encode_prompt(text, images)
            return Prepared((ids, prepared), int(ids.shape[1]))
        except ImageError as error:  # e.g. an aspect ratio the model's resize refuses
            raise invalid(str(error), "messages", code="invalid_image") from None

    def budget(self, prompt_tokens: int, requested: int | None, default: int) -> int:
        """The answer's token budget: the request's, which must fit the context with the prompt; else the default
        cut to what the context leaves."""
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if room is not None and room < 1:
            raise invalid(f"the prompt has {prompt_tokens} tokens; the model's context length is "
                          f"{self.context_length}: shorten the prompt", "messages", code="context_length_exceeded")
        if requested is None:
            return default if room is None else min(default, room)
        if room is not None and requested > room:
            raise invalid(f"the prompt ({prompt_tokens} tokens) + max_tokens ({requested}) exceed the model's context "
                          f"length {self.context_length}: ask for at most {room} tokens", "max_tokens",
                          code="context_length_exceeded")
        return requested

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def complete(self, prepared: Prepared, max_new_tokens: int, stops: list[str], on_text: Callable[[str], None],
                 cancelled: threading.Event) -> Outcome | None:
        """Generate, handing each certain piece of text to `on_text`; None when `cancelled` was set."""
        import time

        stream = TextStream(self.decode, stops)
        ended_by_eos = False

        def on_token(token: int) -> None:
            nonlocal ended_by_eos
            if cancelled.is_set():
                raise _Cancelled
            if ended_by_eos or token in self.eos:
                ended_by_eos = True  # the project's runtime pads after the end: nothing more to show
                return
            delta = stream.push(token)
            if delta:
                on_text(delta)
            if stream.stopped:
                raise _Stopped

        started = time.perf_counter()
        unsafe_prob, flagged = None, False
        try:
            unsafe_prob, flagged = self._generate(prepared, max_new_tokens, on_token)
        except _Cancelled:
            return None
        except _Stopped:
            pass
        seconds = time.perf_counter() - started
        rest = stream.finish()
        if rest:
            on_text(rest)
        text = stream.text
        finish = (REFUSED_FINISH_REASON if flagged else "stop" if ended_by_eos or stream.stopped else "length")
        return Outcome(text, finish, prepared.prompt_tokens, len(stream.tokens), unsafe_prob, flagged, seconds)

    def _generate(self, prepared: Prepared, max_new_tokens: int, on_token: Callable[[int], None]) -> tuple[float, bool]:
        """Run the runtime's greedy loop; (unsafe_prob, flagged)."""
        if self.genai:
            _, unsafe_prob, flagged = self.runtime.generate(prepared.inputs, max_new_tokens, on_token=on_token)
            return float(unsafe_prob), bool(flagged)
        import numpy as np

        ids, images = prepared.inputs
        result = self.runtime.generate(ids, np.ones_like(ids), images, max_new_tokens,
                                       on_token=lambda chosen: on_token(int(chosen[0])))
        return float(result.unsafe_prob[0]), bool(result.flagged[0])

