"""Prometheus text exposition of the server's counters (no client library: a handful of series).

Series: `sasa_requests_total{status}`, `sasa_refusals_total` (answers the artifact flagged),
`sasa_cancelled_total` (generations stopped because their streaming client went away),
`sasa_queue_depth` and `sasa_running` (gauges), `sasa_time_to_first_token_seconds` and
`sasa_request_seconds` (histograms), `sasa_generated_tokens_total` and `sasa_decode_seconds_total`
(their ratio is the decode rate; `sasa_tokens_per_second` is that ratio since start).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[index] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(BUCKETS, self.counts, strict=True)]
        return [*rows, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total:.6f}",
                f"{name}_count {self.count}"]


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[int] = Counter()
        self.refusals = 0
        self.cancelled = 0
        self.tokens = 0
        self.decode_seconds = 0.0
        self.ttft = Histogram()
        self.latency = Histogram()

    def request(self, status: int) -> None:
        with self._lock:
            self.requests[status] += 1

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def answered(self, flagged: bool, tokens: int, decode_seconds: float, ttft: float, latency: float) -> None:
        with self._lock:
            self.refusals += int(flagged)
            self.tokens += tokens
            self.decode_seconds += decode_seconds
            self.ttft.observe(ttft)
            self.latency.observe(latency)

    def render(self, queue_depth: int, running: int) -> str:
        with self._lock:
            lines = ["# HELP sasa_requests_total Chat completion requests by HTTP status.",
                     "# TYPE sasa_requests_total counter"]
            lines += [f'sasa_requests_total{{status="{status}"}} {count}'
                      for status, count in sorted(self.requests.items())]
            rate = self.tokens / self.decode_seconds if self.decode_seconds else 0.0
            series: list[tuple[str, str, str, Callable[[], list[str]]]] = [
                ("sasa_refusals_total", "counter", "Answers the artifact flagged (finish_reason content_filter).",
                 lambda: [f"sasa_refusals_total {self.refusals}"]),
                ("sasa_cancelled_total", "counter", "Generations stopped because the client went away.",
                 lambda: [f"sasa_cancelled_total {self.cancelled}"]),
                ("sasa_queue_depth", "gauge", "Requests waiting for a worker.",
                 lambda: [f"sasa_queue_depth {queue_depth}"]),
                ("sasa_running", "gauge", "Requests being generated.", lambda: [f"sasa_running {running}"]),
                ("sasa_time_to_first_token_seconds", "histogram", "From request arrival to the first answer text.",
                 lambda: self.ttft.lines("sasa_time_to_first_token_seconds")),
                ("sasa_request_seconds", "histogram", "From request arrival to the end of the answer.",
                 lambda: self.latency.lines("sasa_request_seconds")),
                ("sasa_generated_tokens_total", "counter", "Answer tokens generated.",
                 lambda: [f"sasa_generated_tokens_total {self.tokens}"]),
                ("sasa_decode_seconds_total", "counter", "Seconds spent in generation.",
                 lambda: [f"sasa_decode_seconds_total {self.decode_seconds:.6f}"]),
                ("sasa_tokens_per_second", "gauge", "Generated tokens per generation second since start.",
                 lambda: [f"sasa_tokens_per_second {rate:.3f}"]),
            ]
            for name, kind, help_text, rows in series:
                lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rows()]
        return "\n".join(lines) + "\n"
