"""Streaming text from greedy tokens: incremental decoding and stop strings.

Why decode the whole answer each time rather than token by token: byte-level BPE tokens can split one
UTF-8 character, so a token's own decoding is not a prefix of the answer's. A trailing replacement
character is held back until the next token completes it, and so is any tail that could still become
a stop string, so no client ever sees text that a stop string later removes.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Tokens in, new text out; `stopped` once a stop string appeared (the text ends before it)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.tokens: list[int] = []
        self.text = ""  # the answer so far, without a stop string
        self.sent = 0  # characters of `text` already returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the text that is now certain."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.finish()
        hold = len(self.text)
        if self.text.endswith("\ufffd"):
            hold -= 1
        for stop in self.stops:  # a tail that is a prefix of a stop string waits
            for size in range(min(len(stop) - 1, hold), 0, -1):
                if self.text[hold - size:hold] == stop[:size]:
                    hold -= size
                    break
        return self._emit(max(hold, self.sent))

    def finish(self) -> str:
        """The rest of the text (the answer has ended)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta, self.sent = self.text[self.sent:end], max(end, self.sent)
        return delta
