"""Running `sasa-serve` in tests: the app in a uvicorn thread on a free loopback port, raw HTTP helpers,
and images as data: URLs. Shared by tests/test_serve.py and tests/test_serve_load.py."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np

from sasa_patcher.evaluation.serve_bench import free_port


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


@contextmanager
def serving(served, config):
    """The app on 127.0.0.1:<free port> in a uvicorn thread; yields the base URL; stops it afterwards."""
    import uvicorn

    from sasa_patcher.serving.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served, config), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def request(url: str, path: str, body: bytes | dict | None = None, timeout: float = 60.0):
    """(status, headers (case-insensitive), parsed JSON or text) of a GET (no body) or POST."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    call = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode()


def png_url(height: int, width: int, seed: int = 0, fmt: str = "PNG", media_type: str = "image/png") -> str:
    """A seeded random picture as a data: URL."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return f"data:{media_type};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def decode_data_url(url: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
