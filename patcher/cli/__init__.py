"""The command-line programs: argument parsing and one call into the package each.

Each module has `build_parser()` and `main(argv) -> int` (exit code 2 and one line on bad input);
`scripts/*.py` and the console entry points in pyproject.toml only call `main`.
"""
