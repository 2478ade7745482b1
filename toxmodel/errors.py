"""The library's error for bad input data, below every module that reads or checks a table,
and how its messages quote a value."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file, column or rows at fault."""


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters ("..." at the end when cut), to quote it in a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
