"""Evaluation and benchmarking of patched artifacts: end-to-end runs (`systems`), the timing harness (`latency`)."""
