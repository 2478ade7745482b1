"""Give the driver's freed heap back to the operating system before the matrices are
shared and between finalize's parts.

glibc raises its mmap threshold after a large block is freed (up to 32 MB), so the many
1-32 MB arrays a stage allocates (predictions, slices of the feature matrix, the domain's
working sets) come from its arenas afterwards; freed, they stay in the process (resident, as
RSS) until the arena's top is free, which fragmentation rarely allows. At 10^6 molecules the
driver began each finalize part some hundreds of MB above where the last one started, and its
peak is where the next part adds its own working set on top. `trim` asks glibc to release
every free page (`malloc_trim(0)`); elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """libc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """Return the heap's free pages to the OS; True when glibc released any."""
    release = _malloc_trim()
    return bool(release(0)) if release is not None else False
