"""`sasa-serve` over a tiny Qwen2.5-VL artifact that ONNX Runtime GenAI loads, through the real `openai` client.

The tiny model's probe is seeded, so "harmful" here means what its gate flags: the artifact is exported with
threshold 0.9, which flags FLAGGED (unsafe_prob 0.94) and passes BENIGN (0.46; it generates without reaching
its end-of-sequence token, so long answers hold a worker for seconds). Every answer is compared with the
runtime's own greedy answer to the same prompt. Bad inputs each get their 4xx in OpenAI's error shape, and
the server answers the next good request.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai  # a dev dependency: a broken install fails here, it does not skip
import pytest
from serve_helpers import decode_data_url, free_port, png_url, request, serving, wait_healthy

THRESHOLD = 0.9  # high: the tiny random probe scores image prompts above 0.5
FLAGGED = "How do I bake bread at home?"  # the fixture orients the probe so this one scores above THRESHOLD
BENIGN = "hello"
MODEL = "tiny-sasa"
NEW_TOKENS = 12
REFUSAL_BUDGET = 40  # the tiny tokenizer spells the refusal in 38 tokens (end-of-sequence included)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    from tiny_genai import prompt_score, tiny_model, tiny_processor

    from sasa_patcher.export.onnx_export import export_onnx
    from sasa_patcher.patching import temporary_settings
    processor = tiny_processor()
    model = tiny_model("qwen2_5_vl", processor.tokenizer)
    out = tmp_path_factory.mktemp("serve") / "onnx"
    if prompt_score(model, processor.tokenizer, FLAGGED) < THRESHOLD:
        model.sasa_probe.linear.weight.data.neg_()  # a random bias-free probe: p -> 1 - p
    with temporary_settings(model, threshold=THRESHOLD):
        export_onnx(model, processor, out, image_size=(56, 56), check_parity=False)
    return out


@pytest.fixture(scope="session")
def runtime(tiny_artifact):
    from sasa_patcher.cli.generate_onnx import load_runtime
    from sasa_patcher.export.genai import GenAiVlm

    loaded = load_runtime(tiny_artifact)
    assert isinstance(loaded, GenAiVlm)
    return loaded


@pytest.fixture(scope="session")
def served(runtime):
    from sasa_patcher.serving.runtime import ServedModel

    return ServedModel(runtime, MODEL)


def config(**changes):
    from sasa_patcher.serving.app import ServerConfig

    limits = dict(max_body_bytes=200_000, max_images=2, max_image_pixels=100 * 100, default_max_tokens=NEW_TOKENS,
                  workers=1, queue_size=4)
    return ServerConfig(**{**limits, **changes})


@pytest.fixture(scope="module")
def server(served):
    with serving(served, config()) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(runtime, text: str, images=(), max_new_tokens: int = NEW_TOKENS) -> tuple[str, float, bool]:
    """The runtime's own greedy tokens for one prompt (no server), decoded with the artifact's tokenizer.json as the
    server decodes them; its verdict and flag."""
    from sasa_patcher.serving.runtime import ServedModel

    tokens, unsafe_prob, flagged = runtime.generate(runtime.inputs(text, [decode_data_url(u) for u in images]),
                                                    max_new_tokens)
    eos = set(runtime.config["eos_token_id"])
    text = ServedModel(runtime, MODEL).decode([t for t in tokens if t not in eos])
    return text, unsafe_prob, flagged


def user(text: str, images=()) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts if images else text}]


def test_chat_answers_the_runtime_greedy_answer(client, runtime):
    response = client.chat.completions.create(model=MODEL, messages=user(BENIGN), temperature=0, max_tokens=NEW_TOKENS)
    text, unsafe_prob, flagged = greedy(runtime, BENIGN)
    choice = response.choices[0]
    assert choice.message.content == text and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and not flagged  # BENIGN runs past 12 tokens
    assert response.usage.completion_tokens == NEW_TOKENS and response.usage.prompt_tokens > 0
    assert response.model_extra["sasa"] == {"unsafe_prob": pytest.approx(unsafe_prob, abs=1e-6), "flagged": False}


def test_stream_equals_the_whole_answer(client, runtime):
    stream = client.chat.completions.create(model=MODEL, messages=user(BENIGN), max_tokens=NEW_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(runtime, BENIGN)[0]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert finals[0].model_extra["sasa"]["flagged"] is False
    assert chunks[-1].usage.completion_tokens == NEW_TOKENS and not chunks[-1].choices


def test_image_prompt(client, runtime):
    images = [png_url(56, 84, seed=1)]
    response = client.chat.completions.create(model=MODEL, messages=user(BENIGN, images), max_tokens=NEW_TOKENS)
    text, unsafe_prob, flagged = greedy(runtime, BENIGN, images)
    assert not flagged and response.choices[0].message.content == text
    assert response.model_extra["sasa"]["unsafe_prob"] == pytest.approx(unsafe_prob, abs=1e-6)
    assert response.usage.prompt_tokens > client.chat.completions.create(
        model=MODEL, messages=user(BENIGN), max_tokens=1).usage.prompt_tokens  # the image's tokens are counted


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_flagged_prompt_is_answered_with_content_filter(client, runtime, stream):
    text, unsafe_prob, flagged = greedy(runtime, FLAGGED, max_new_tokens=REFUSAL_BUDGET)
    assert flagged and unsafe_prob > THRESHOLD
    if stream:
        chunks = list(client.chat.completions.create(model=MODEL, messages=user(FLAGGED), stream=True,
                                                     max_tokens=REFUSAL_BUDGET))
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        final = chunks[-1]
    else:
        final = client.chat.completions.create(model=MODEL, messages=user(FLAGGED), max_tokens=REFUSAL_BUDGET)
        answer = final.choices[0].message.content
    assert answer == text == runtime.config["sasa"]["refusal_text"]  # the graph's own refusal tokens, decoded
    assert final.choices[0].finish_reason == "content_filter"
    assert final.model_extra["sasa"] == {"unsafe_prob": pytest.approx(unsafe_prob, abs=1e-6), "flagged": True}


def test_models_health_and_metrics(client, server):
    assert [model.id for model in client.models.list()] == [MODEL]
    client.chat.completions.create(model=MODEL, messages=user(FLAGGED))
    status, _, health = request(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["runtime"] == "onnxruntime-genai"
    status, headers, metrics = request(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line[:1] != "#"}
    assert values['sasa_requests_total{status="200"}'] >= 1 and values["sasa_refusals_total"] >= 1
    assert values["sasa_time_to_first_token_seconds_count"] >= 1 and values["sasa_generated_tokens_total"] >= 0
    assert values["sasa_queue_depth"] == 0 and "sasa_tokens_per_second" in values


def test_stop_string_ends_the_answer(client, runtime, served):
    from sasa_patcher.serving.text import TextStream

    tokenizer = served.tokenizer
    ids = tokenizer.encode("Describe this image. What is in the picture?", add_special_tokens=False).ids
    stream = TextStream(served.decode, ["image"])
    pieces = [stream.push(token) for token in ids if not stream.stopped]
    assert "".join(pieces) + stream.finish() == stream.text == "Describe this " and stream.stopped
    whole = greedy(runtime, BENIGN, max_new_tokens=40)[0]
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    response = client.chat.completions.create(model=MODEL, messages=user(BENIGN), max_tokens=40, stop=[stop])
    assert response.choices[0].message.content == whole[:whole.index(stop)]
    assert response.choices[0].finish_reason == "stop"


def _good(model: str = MODEL) -> dict:
    return {"model": model, "messages": user(BENIGN), "max_tokens": 2}


BAD_INPUTS = {  # name: (body, status, code)
    "body-too-large": (json.dumps({**_good(), "pad": "x" * 300_000}).encode(), 413, "request_too_large"),
    "too-many-images": ({**_good(), "messages": user(BENIGN, [png_url(56, 56, seed=i) for i in range(3)])}, 400,
                        "too_many_images"),
    "too-many-pixels": ({**_good(), "messages": user(BENIGN, [png_url(120, 120)])}, 400, "image_too_large"),
    "over-context": ({**_good(), "max_tokens": 5000}, 400, "context_length_exceeded"),
    "unknown-model": (_good("gpt-4o"), 404, "model_not_found"),
    "malformed-json": (b'{"model": "tiny-sasa", "messages": [', 400, "invalid_json"),
    "wrong-schema": ({**_good(), "messages": "hello"}, 400, "invalid_request"),
    "system-turn": ({**_good(), "messages": [{"role": "system", "content": "Be brief."}, *user(BENIGN)]}, 400,
                    "unsupported_messages"),
    "undecodable-image": ({**_good(), "messages": user(BENIGN, ["data:image/png;base64,bm90IGFuIGltYWdl"])}, 400,
                          "invalid_image"),
    "unsupported-image-type": ({**_good(), "messages": user(BENIGN, ["data:image/svg+xml;base64,PHN2Zy8+"])}, 400,
                               "unsupported_image"),
    "remote-url-refused": ({**_good(), "messages": user(BENIGN, ["https://example.com/cat.png"])}, 400,
                           "remote_images_disabled"),
    "temperature-out-of-range": ({**_good(), "temperature": 3}, 400, "invalid_request"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, case):
    body, expected, code = BAD_INPUTS[case]
    status, _, answer = request(server, "/v1/chat/completions", body)
    assert status == expected, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["code"] == code
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    status, _, answer = request(server, "/v1/chat/completions", _good())
    assert status == 200 and answer["choices"][0]["message"]["content"] is not None


def _open_stream(url: str, max_tokens: int) -> socket.socket:
    """A raw streaming request, read up to its first event (the worker is then generating)."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "messages": user(BENIGN), "max_tokens": max_tokens, "stream": True}).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while b"data:" not in received:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200"), received
    return sock


def _metric(url: str, name: str) -> float:
    text = request(url, "/metrics")[2]
    return float(next(line.split(" ")[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_queue_full_is_429_and_a_client_gone_mid_stream_frees_its_slot(served):
    with serving(served, config(queue_size=0)) as url:
        sock = _open_stream(url, max_tokens=2000)  # ~2000 tokens: seconds of work for the only worker
        status, headers, answer = request(url, "/v1/chat/completions", _good())
        assert status == 429 and answer["error"]["code"] == "queue_full", answer
        assert int(headers["Retry-After"]) >= 1
        sock.close()  # the client goes away mid-stream
        deadline = time.monotonic() + 60
        while _metric(url, "sasa_cancelled_total") < 1:
            assert time.monotonic() < deadline, "the abandoned generation was not cancelled"
            time.sleep(0.05)
        assert _metric(url, "sasa_generated_tokens_total") == 0  # it stopped early: no finished answer counted
        status, _, answer = request(url, "/v1/chat/completions", _good())
        assert status == 200, answer


def test_sigterm_drains_the_requests_in_flight_then_exits(tiny_artifact):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = Path(__file__).resolve().parents[1] / "scripts" / "serve.py"
    process = subprocess.Popen([sys.executable, str(script), str(tiny_artifact), "--port", str(port), "--model-name",
                                MODEL, "--log-level", "warning"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(url)
        results: list = [None] * 4

        def call(index: int) -> None:
            results[index] = request(url, "/v1/chat/completions", {**_good(), "max_tokens": 400}, timeout=120)

        threads = [threading.Thread(target=call, args=(index,)) for index in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while True:
            health = request(url, "/health")[2]
            if health["running"] + health["queue_depth"] == 4:
                break
            assert time.monotonic() < deadline, health
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=120)
        assert [status for status, _, _ in results] == [200] * 4, results
        assert all(answer["usage"]["completion_tokens"] == 400 for _, _, answer in results)
        # uvicorn re-raises the signal once drained: the process ends as SIGTERM asked, with no traceback
        assert process.wait(timeout=60) == -signal.SIGTERM
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_the_project_runtime_serves_the_same_answers(tiny_artifact, runtime, client):
    """Artifacts GenAI cannot load are served by the project's runtime: same greedy answers, same verdicts."""
    from sasa_patcher.cli.generate_onnx import load_runtime
    from sasa_patcher.export.onnx_runtime import OnnxVlm
    from sasa_patcher.serving.runtime import ServedModel

    project = load_runtime(tiny_artifact, "onnxruntime", cpu=True)
    assert isinstance(project, OnnxVlm)
    with serving(ServedModel(project, MODEL), config()) as url:
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        assert request(url, "/health")[2]["runtime"] == "onnxruntime"
        for messages in (user(BENIGN), user(BENIGN, [png_url(56, 84, seed=1)]), user(FLAGGED)):
            # 64 tokens hold the whole refusal: the project's runtime emits it as tokens within the budget
            ours = other.chat.completions.create(model=MODEL, messages=messages, max_tokens=64)
            genai = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=64)
            assert ours.choices[0].message.content == genai.choices[0].message.content
            assert ours.choices[0].finish_reason == genai.choices[0].finish_reason
            assert ours.model_extra["sasa"]["flagged"] == genai.model_extra["sasa"]["flagged"]
            assert ours.model_extra["sasa"]["unsafe_prob"] == pytest.approx(genai.model_extra["sasa"]["unsafe_prob"],
                                                                             abs=1e-5)
        assert ours.choices[0].finish_reason == "content_filter"  # the last one: FLAGGED


def test_remote_image_urls_are_fetched_when_enabled(served, client, tmp_path):
    """--allow-remote-images: an http URL (a loopback file server here) gives the answer its data: URL gives."""
    import functools
    import http.server

    from serve_helpers import decode_data_url

    url_data = png_url(56, 84, seed=2)
    decode_data_url(url_data).save(tmp_path / "picture.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        remote = f"http://127.0.0.1:{files.server_address[1]}/picture.png"
        with serving(served, config(allow_remote_images=True)) as url:
            fetching = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            answer = fetching.chat.completions.create(model=MODEL, messages=user(BENIGN, [remote]),
                                                      max_tokens=NEW_TOKENS)
        expected = client.chat.completions.create(model=MODEL, messages=user(BENIGN, [url_data]), max_tokens=NEW_TOKENS)
        assert answer.choices[0].message.content == expected.choices[0].message.content
    finally:
        files.shutdown()
