#!/usr/bin/env python
"""Load-test sasa-serve on an artifact: `python scripts/bench_serve.py patched/ --requests 200 --concurrency 8`.

A thin entry point (also installed as `sasa-bench-serve`); the flags and the work are in
`sasa_patcher.cli.bench_serve`; no torch.
"""

import sys

from sasa_patcher.cli.bench_serve import main

if __name__ == "__main__":
    sys.exit(main())
