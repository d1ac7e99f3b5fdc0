#!/usr/bin/env python
"""Evaluate a SASA artifact against its base model: `python scripts/evaluate.py smol-qwen-vl patched/ --out eval-out`.

A thin entry point (also installed as `sasa-evaluate`); the flags are in `sasa_patcher.cli.evaluate`,
the run in `sasa_patcher.evaluation.evaluate`, the report in `sasa_patcher.evaluation.evaluation_report`.
"""

import sys

from sasa_patcher.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
