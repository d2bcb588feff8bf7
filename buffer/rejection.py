"""`Rejection`: a request the buffer refuses. Raised by buffer/state.py and buffer/evaluation.py, answered by
buffer/server.py as an `Error` reply naming the field, and counted by its code."""

from __future__ import annotations


class Rejection(Exception):
    """A request the buffer refuses; `code` is short and machine-readable, the message names the field."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
