"""The SQL layer's one error: a query refused or failed, with the tunnel's code for it."""

from __future__ import annotations


class SqlError(Exception):
    """A query refused or failed; `code` is the tunnel's error code (docs/protocol.md §9)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
