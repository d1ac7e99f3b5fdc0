#!/usr/bin/env python
"""Answer one prompt with the SASA ONNX artifact: `python scripts/generate_onnx.py patched/ --prompt "..."`.

A thin entry point (also installed as `sasa-generate-onnx`); the flags and the work are in
`sasa_patcher.cli.generate_onnx`, which imports no torch.
"""

import sys

from sasa_patcher.cli.generate_onnx import main

if __name__ == "__main__":
    sys.exit(main())
