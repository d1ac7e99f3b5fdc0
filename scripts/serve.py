#!/usr/bin/env python
"""Serve the SASA ONNX artifact over OpenAI's chat-completions API: `python scripts/serve.py patched/ --port 8000`.

A thin entry point (also installed as `sasa-serve`); the flags and the work are in
`sasa_patcher.cli.serve`; no torch.
"""

import sys

from sasa_patcher.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
