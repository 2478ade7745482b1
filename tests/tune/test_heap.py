"""tune.heap: freed arena memory goes back to the OS when finalize asks."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from tune import heap

# In a fresh interpreter: one freed 8 MB array raises glibc's mmap threshold, so the next
# 4 MB arrays come from the heap's arena; each is followed by a small array that stays alive,
# so freeing them cannot shrink the arena from its top. Prints RSS (MB) allocated, freed and
# after heap.trim().
SCRIPT = textwrap.dedent(
    """
    import numpy as np
    from tune import heap

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    big = np.ones(2**20)
    del big
    blocks, pins = [], []
    for _ in range(100):
        blocks.append(np.ones(2**19))
        pins.append(np.ones(200))
    allocated = rss()
    del blocks
    freed = rss()
    released = heap.trim()
    print(allocated, freed, rss(), released)
    """
)


@pytest.mark.skipif(
    platform.system() != "Linux" or heap._malloc_trim() is None, reason="glibc's malloc_trim"
)
def test_trim_returns_freed_arena_blocks_that_free_alone_keeps_resident() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True
    )
    allocated, freed, trimmed, released = done.stdout.split()
    allocated, freed, trimmed = float(allocated), float(freed), float(trimmed)
    assert allocated - trimmed > 300  # 400 MB of blocks freed ...
    assert freed > trimmed + 300  # ... stayed resident after free, and trim gave them back
    assert released == "True"
