"""Load-test `sasa-serve` on an artifact: N requests at concurrency C, text and image prompts mixed.

    sasa-bench-serve patched/ --requests 200 --concurrency 8 --markdown results/serving.md

Starts the server as its own process on a free loopback port, sends the workload (streamed), and prints
throughput, latency and time-to-first-token percentiles, errors, refusals and the server's resident
memory at start, after the first 50 answers and at the end. The workload is in `evaluation/serve_bench.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sasa_patcher.evaluation.serve_bench import markdown, run_load, server_process, summarize


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="patch output directory or its onnx/")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16, help="answer budget of each request")
    parser.add_argument("--workers", type=int, default=1, help="the server's --workers")
    parser.add_argument("--queue-size", type=int, default=16, help="the server's --queue-size")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--json", type=Path, help="write the summary here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, value in (("--requests", args.requests), ("--concurrency", args.concurrency),
                        ("--max-tokens", args.max_tokens), ("--workers", args.workers)):
        if value < 1:
            print(f"error: {flag} must be at least 1", file=sys.stderr)
            return 2
    if not args.artifact.is_dir():
        print(f"error: {args.artifact} is not a directory: pass the patch output directory or its onnx/",
              file=sys.stderr)
        return 2
    model = "bench"
    with server_process(args.artifact, model, "--workers", str(args.workers), "--queue-size",
                        str(args.queue_size)) as (url, pid):
        summary = summarize(run_load(url, pid, model, args.requests, args.concurrency, args.max_tokens))
    command = " ".join(["sasa-bench-serve", *(sys.argv[1:] if argv is None else argv)])
    setting = (f"Server: `sasa-serve --workers {args.workers} --queue-size {args.queue_size}` "
               f"(ONNX Runtime GenAI where the artifact allows), CPU, OMP_NUM_THREADS=1.")
    report = markdown(summary, "Serving under load", command, setting)
    print(report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0
