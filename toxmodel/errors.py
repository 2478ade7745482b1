"""The library's errors (bad input data; a file that is not a checkpoint), below every module
that raises them and light to import (the `toxtune` command catches them without loading
torch), and how their messages quote a value."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file, column or rows at fault."""


class CheckpointError(ValueError):
    """A file that is not a loadable toxtune checkpoint; the message says why."""


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters ("..." at the end when cut), to quote it in a message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
