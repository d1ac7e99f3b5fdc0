"""Serve the SASA ONNX artifact over OpenAI's chat-completions API (`sasa-serve ARTIFACT`).

    sasa-serve patched/ --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "patched", "messages": [{"role": "user", "content": "Hello"}]}'

The runtime is chosen as `sasa-generate-onnx` chooses it: ONNX Runtime GenAI (CUDA when onnxruntime-genai's
GPU build is installed) for gate-mode Qwen artifacts, else the project's ONNX Runtime loop (CUDA when
onnxruntime-gpu is installed, unless --cpu). SIGTERM or Ctrl-C: no new connections; the requests in
flight are answered, then the process exits. A bad artifact ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sasa_patcher.cli.generate_onnx import USER_ERRORS, load_runtime
from sasa_patcher.export.onnx_names import ONNX_DIRNAME
from sasa_patcher.serving.app import ServerConfig

DEFAULTS = ServerConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="patch output directory or its onnx/")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all; default loopback)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", help="the model id clients send (default: the artifact directory's name)")
    parser.add_argument("--runtime", choices=("auto", "genai", "onnxruntime"), default="auto",
                        help="auto: ONNX Runtime GenAI when installed and the artifact has genai_config.json")
    parser.add_argument("--cpu", action="store_true", help="the project's runtime on CPU even when CUDA is available")
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers, help="generations run at once")
    parser.add_argument("--queue-size", type=int, default=DEFAULTS.queue_size,
                        help="requests that may wait for a worker; more are answered 429 with Retry-After")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULTS.max_body_bytes,
                        help="request body limit (413 beyond); also the limit of one fetched remote image")
    parser.add_argument("--max-images", type=int, default=DEFAULTS.max_images, help="images per request")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULTS.max_image_pixels,
                        help="width x height of one image as sent")
    parser.add_argument("--default-max-tokens", type=int, default=DEFAULTS.default_max_tokens,
                        help="answer budget when a request sets no max_tokens (cut to the context left)")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs (off: only data: URLs; a server that fetches URLs can be "
                             "made to reach hosts its clients cannot)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def default_model_name(artifact: Path) -> str:
    path = artifact.resolve()
    return path.parent.name if path.name == ONNX_DIRNAME else path.name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    minimums = {"--workers": (args.workers, 1), "--queue-size": (args.queue_size, 0), "--port": (args.port, 0),
                "--max-body-bytes": (args.max_body_bytes, 1), "--max-images": (args.max_images, 0),
                "--max-image-pixels": (args.max_image_pixels, 1), "--default-max-tokens": (args.default_max_tokens, 1)}
    for flag, (value, minimum) in minimums.items():
        if value < minimum:
            print(f"error: {flag} must be at least {minimum}", file=sys.stderr)
            return 2
    import uvicorn

    from sasa_patcher.serving.app import create_app
    from sasa_patcher.serving.runtime import ServedModel

    try:
        runtime = load_runtime(args.artifact, args.runtime, args.cpu)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    served = ServedModel(runtime, args.model_name or default_model_name(args.artifact))
    config = ServerConfig(args.max_body_bytes, args.max_images, args.max_image_pixels, args.default_max_tokens,
                          args.workers, args.queue_size, args.allow_remote_images)
    print(f"serving {served.name!r} ({served.kind}) on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(served, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":  # `python -m sasa_patcher.cli.serve`: how the serving bench starts its server
    sys.exit(main())
