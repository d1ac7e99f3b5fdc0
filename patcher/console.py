"""What the command-line scripts print besides their results: progress lines and bad-input errors.

One place, so every script reports bad input the same way: one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from sasa_patcher.errors import UserInputError

USER_ERROR_EXIT = 2


def log(message: str) -> None:
    """Progress on stderr, so stdout carries only what a script is asked for."""
    print(message, file=sys.stderr, flush=True)


def report_user_error(error: UserInputError) -> int:
    """Print the one-line reason and return the exit code for bad input."""
    print(f"error: {error}", file=sys.stderr)
    return USER_ERROR_EXIT
