#!/usr/bin/env python
"""Convert a SASA ONNX artifact to int4 or fp16: `python scripts/quantize_onnx.py patched/ --precision int4 --out DIR`.

A thin entry point (also installed as `sasa-quantize-onnx`); the flags and the work are in
`sasa_patcher.cli.quantize_onnx`, which imports no torch.
"""

import sys

from sasa_patcher.cli.quantize_onnx import main

if __name__ == "__main__":
    sys.exit(main())
