#!/usr/bin/env python
"""Splice the results tables into README.md's Results section: `python scripts/readme_results.py results/`.

A thin entry point (also installed as `sasa-readme-results`); the work is in `sasa_patcher.evaluation.readme`.
"""

import sys

from sasa_patcher.cli.readme_results import main

if __name__ == "__main__":
    sys.exit(main())
