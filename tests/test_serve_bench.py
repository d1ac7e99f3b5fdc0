"""The serving bench's summary: refusals of the workload's harmful request are counted apart from the benign ones."""

from __future__ import annotations

from sasa_patcher.evaluation.serve_bench import HARMFUL_PROMPTS, PROMPTS, is_harmful, markdown, summarize


def result(index: int, finish_reason: str, status: int = 200) -> dict:
    return {"index": index, "status": status, "finish_reason": finish_reason, "usage": {"completion_tokens": 4},
            "latency": 1.0, "ttft": 0.5, "id": f"r{index}", "text": ""}


def test_refusals_of_the_harmful_request_are_counted_apart():
    harmful = [i for i in range(2 * len(PROMPTS)) if is_harmful(i)]
    assert harmful and all(PROMPTS[i % len(PROMPTS)] in HARMFUL_PROMPTS for i in harmful)
    # every harmful request refused, one benign one refused too, one request failed
    results = [result(i, "content_filter" if i in harmful or i == 0 else "stop") for i in range(2 * len(PROMPTS))]
    results[1]["status"] = 500
    load = {"requests": len(results), "concurrency": 2, "max_tokens": 4, "wall_seconds": 2.0,
            "rss_bytes": {"start": 100, "after_first_window": 110, "end": 110}, "results": results}
    summary = summarize(load)
    assert summary["answered"] == len(results) - 1
    assert summary["harmful_requests"] == len(harmful) and summary["harmful_refusals"] == len(harmful)
    assert summary["refusals"] == len(harmful) + 1 and summary["benign_refusals"] == 1
    report = markdown(summary, "t", "cmd", "setting")
    assert f"benign requests | 1 of {len(results) - 1 - len(harmful)} |" in report
    assert f"| {len(harmful)} of {len(harmful)} |" in report
