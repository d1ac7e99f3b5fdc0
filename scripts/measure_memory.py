#!/usr/bin/env python
"""Peak memory of load + patch + artifact writing: `python scripts/measure_memory.py [--model smol-qwen-vl]`.

A thin entry point (also installed as `sasa-measure-memory`); the work is in `sasa_patcher.cli.measure_memory`,
which runs the patch pipeline and reads memory through `sasa_patcher.memory`.
"""

import sys

from sasa_patcher.cli.measure_memory import main

if __name__ == "__main__":
    sys.exit(main())
