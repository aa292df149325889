"""Flight SQL filter patterns (`db_schema_filter_pattern`, `table_name_filter_pattern`): SQL LIKE with `%` for
any run of characters and `_` for any one, matched without backtracking.

A pattern is cut at its `%` signs into pieces of literal characters and `_`. The first piece must match at
the start, the last at the end, and each middle piece is found at its leftmost place after the previous one:
taking the leftmost place never loses a match, since anything a later place could match the `%` after it can
match too. Each piece is compared at each place at most once, so a match costs at most pattern × name steps
(a regular expression of the same pattern backtracks exponentially in its `%` signs: one request froze the
gateway for every tenant). Patterns are bounded in length before they are matched.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

MAX_PATTERN_CHARS = 1024


def like(pattern: str | None) -> Callable[[str], bool]:
    """A predicate for `pattern` (None matches everything); ArrowInvalid for a pattern over the limit."""
    if pattern is None:
        return lambda _: True
    if len(pattern) > MAX_PATTERN_CHARS:
        raise pa.ArrowInvalid(f"filter pattern of {len(pattern)} characters, over the limit of {MAX_PATTERN_CHARS}")
    pieces = pattern.split("%")
    return lambda name: _matches(pieces, name)


def _piece_at(piece: str, name: str, at: int) -> bool:
    """Whether `piece` (literal characters and `_`) matches `name` at position `at`."""
    if at + len(piece) > len(name):
        return False
    return all(p == "_" or p == c for p, c in zip(piece, name[at:at + len(piece)]))


def _matches(pieces: list[str], name: str) -> bool:
    if len(pieces) == 1:
        return len(pieces[0]) == len(name) and _piece_at(pieces[0], name, 0)
    first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
    if len(first) + len(last) > len(name) or not _piece_at(first, name, 0):
        return False
    end = len(name) - len(last)  # the last piece is anchored at the end; middle pieces must fit before it
    if not _piece_at(last, name, end):
        return False
    at = len(first)
    for piece in middle:
        found = next((i for i in range(at, end - len(piece) + 1) if _piece_at(piece, name, i)), None)
        if found is None:
            return False
        at = found + len(piece)
    return True
