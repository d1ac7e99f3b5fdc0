#!/usr/bin/env python
"""What SASA costs, as ratios to the unpatched model: `python scripts/bench.py [--model smol-qwen-vl] [--json PATH]`.

A thin entry point (also installed as `sasa-bench`); the flags, the report layout and the work are in
`sasa_patcher.cli.bench`, `sasa_patcher.evaluation.bench` and `sasa_patcher.evaluation.bench_report`.
"""

import sys

from sasa_patcher.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
