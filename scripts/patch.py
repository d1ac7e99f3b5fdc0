#!/usr/bin/env python
"""Patch a vision-language model with SASA: `python scripts/patch.py --model smol-qwen-vl --out patched/`.

A thin entry point (also installed as `sasa-patch`); the flags and the work are in `sasa_patcher.cli.patch`.
"""

import sys

from sasa_patcher.cli.patch import main

if __name__ == "__main__":
    sys.exit(main())
