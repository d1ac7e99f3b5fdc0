"""OpenAI chat-completions shapes: request validation, responses, stream chunks and the error body.

What is supported, and what is refused with a 400 rather than silently ignored:
- `messages`: one `user` message (the artifact's chat template renders one user turn); its `content` a
  string or a list of `text` and `image_url` parts. Images are shown before the text, whatever their
  position in the list (as the runtimes render them). `system` and `assistant` turns are refused.
- `max_tokens` / `max_completion_tokens`, `stop` (a string or up to 4), `stream`, `stream_options.include_usage`,
  `n` (1 only). `temperature` and `top_p` are validated (OpenAI's ranges) and accepted, but decoding is always
  greedy: the artifact's verdict and answer are those of its greedy loop. Other fields are ignored.
The response's extra field `sasa` carries the probe's verdict: `{"unsafe_prob": float | null, "flagged": bool}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_STOP_STRINGS = 4
# The finish reason of an answer the graph's gate refused (OpenAI's name for a filtered completion).
REFUSED_FINISH_REASON = "content_filter"


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code=code, param=param)


@dataclass
class ChatRequest:
    """One validated request: the user's text, its image URLs, and the decoding options."""

    model: str
    text: str
    image_urls: list[str]
    max_tokens: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(f"{name} must be a number from {low} to {high} (decoding is greedy whatever its value)", name)


def _positive_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(f"{name} must be an integer of at least 1", name)
    return value


def _content(content: Any) -> tuple[str, list[str]]:
    """(text, image URLs) of a user message's content."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not content:
        raise invalid("messages[0].content must be a string or a non-empty list of parts", "messages")
    texts, urls = [], []
    for index, part in enumerate(content):
        param = f"messages[0].content[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise invalid(f"{param}.image_url must be an object with a string url", param)
            urls.append(url)
        else:
            raise invalid(f"{param} must be a text part ({{'type': 'text', 'text': ...}}) or an image_url part "
                          f"({{'type': 'image_url', 'image_url': {{'url': 'data:image/png;base64,...'}}}})", param)
    return "\n".join(texts), urls


def parse_chat_request(body: Any, max_images: int) -> ChatRequest:
    """A validated `ChatRequest`, or an ApiError(400) naming the field and what it must be."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string (GET /v1/models lists it)", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise invalid("messages must hold exactly one message with role 'user': this server answers one user turn "
                      "(no system or assistant turns)", "messages", code="unsupported_messages")
    text, urls = _content(messages[0].get("content"))
    if len(urls) > max_images:
        raise invalid(f"{len(urls)} images in the request; the limit is {max_images} (--max-images)", "messages",
                      code="too_many_images")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    n = body.get("n")
    if n is not None and n != 1:
        raise invalid("n must be 1 (one greedy answer per request)", "n")
    max_tokens = _positive_int(body, "max_completion_tokens")
    legacy = _positive_int(body, "max_tokens")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise invalid(f"stop must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    return ChatRequest(model, text, urls, max_tokens if max_tokens is not None else legacy, stops, stream,
                       bool(options.get("include_usage")))


# ----- responses --------------------------------------------------------------------------------------
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def verdict(unsafe_prob: float | None, flagged: bool) -> dict[str, Any]:
    """The extra `sasa` field: the probe's unsafe_prob for the prompt (null when a stop string ended the
    generation before the runtime reported it) and whether the artifact's gate refused."""
    return {"unsafe_prob": unsafe_prob, "flagged": flagged}


def completion(request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int, sasa: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "sasa": sasa}


def chunk(request_id: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None,
          **extra: Any) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` gives the usage chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices, **extra}
