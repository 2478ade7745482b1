"""Tanimoto similarity of bit-packed fingerprints, compiled: AND + popcount on 64-bit words.

The applicability domain's searches (`toxmodel.domain`) compare queries with training rows:
the exact search with every row whose bit count can still win, the clustered search with the
members of the clusters it probes and, first, every cluster's centre. numpy cannot fuse AND,
popcount and the running maximum (each is a pass over a temporary of queries x rows x words),
and scipy's sparse product pays an indexed gather per on bit; these loops, compiled by numba,
do the three in registers: 2.3-3 ns a pair of 1024-bit rows on one core against 22 ns for
the sparse product (RESULTS "A compiled popcount kernel for the domain's searches").

The reference rows are held transposed, word by word (`(n_words, n_rows)`), so the loop over
rows is contiguous and compiles to vector popcounts where the CPU has them. Every count is an
exact integer, and the best row is chosen by comparing fractions exactly (p1 * s2 > p2 * s1),
so the answers equal brute force's bit for bit at any width.

numba is imported with this module; `toxmodel.domain` imports it only when a domain is fitted
or searched, so the rest of `toxmodel` (training, checkpoints) works where numba is not
installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
# `best_in_range`: reference rows every query goes through before the next block (64 KB of
# 1024-bit words: in a core's L2; a whole 8192-row chunk streamed per query ran 1.4x slower)
RANGE_BLOCK = 512


def compiled(fn: Callable[..., Any]) -> Any:
    """`fn` compiled without the GIL, its machine code cached on disk (beside this file, or in
    the user's cache folder, or NUMBA_CACHE_DIR) so that only a machine's first use compiles
    it (1.7 s for the kernels here). Where numba finds no folder to cache in, it refuses
    `cache=True` outright; the kernels are then compiled in each process instead of failing."""
    try:
        return numba.njit(nogil=True, cache=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


def words(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """Packed rows (uint8, `np.packbits(..., bitorder="little")`) as uint64 words
    (n, ceil(n_bits / 64)), C-ordered, with every bit beyond `n_bits` cleared (whatever a file
    put in the last byte's spare bits, or padding)."""
    n_bytes = (n_bits + 7) // 8
    n_words = (n_bits + 63) // 64
    out = np.zeros((len(packed), n_words * 8), dtype=np.uint8)
    out[:, :n_bytes] = packed[:, :n_bytes]
    if n_bits % 8:
        out[:, n_bytes - 1] &= np.uint8((1 << (n_bits % 8)) - 1)
    return out.view("<u8").astype(np.uint64, copy=False)


def transposed(rows: np.ndarray) -> np.ndarray:
    """`words` rows as (n_words, n_rows), C-ordered: the layout the kernels read references in."""
    return np.ascontiguousarray(rows.T)


def transposed_words(
    packed: np.ndarray, n_bits: int, order: np.ndarray | None = None, block: int = 8192
) -> np.ndarray:
    """`transposed(words(packed[order], n_bits))`, `block` rows at a time: no whole copy of
    the rows in another layout on the way (0.1 GB at 782,000 rows of 1024 bits)."""
    n = len(packed) if order is None else len(order)
    out = np.empty(((n_bits + 63) // 64, n), dtype=np.uint64)
    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        part = packed[rows] if order is None else packed[order[rows]]
        out[:, rows] = words(part, n_bits).T
    return out


@numba.njit(inline="always")
def _popcount(x: np.uint64) -> np.uint64:  # LLVM compiles this idiom to the popcnt instruction
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


@numba.njit(inline="always")
def _best_fraction(
    inter: np.ndarray, c: int, ref_counts: np.ndarray, lo: int, length: int
) -> tuple[int, int, int]:
    """(p, s, j): among `length` rows, the first j with the largest p / s, p = inter[j] =
    |a & b|, s = c + ref_counts[lo + j] = |a| + |b|, compared as integers (p1 s2 > p2 s1);
    (0, 1, -1) where no row shares a bit. Its Tanimoto is p / (s - p)."""
    top_p, top_s, top_j = np.int64(0), np.int64(1), -1
    for j in range(length):
        p = np.int64(inter[j])
        s = c + ref_counts[lo + j]
        if p * top_s > top_p * s:
            top_p, top_s, top_j = p, s, j
    return top_p, top_s, top_j


@compiled
def counts(rows: np.ndarray) -> np.ndarray:
    """On bits per row of `words` rows, int64."""
    out = np.zeros(rows.shape[0], dtype=np.int64)
    for i in range(rows.shape[0]):
        for k in range(rows.shape[1]):
            out[i] += np.int64(_popcount(rows[i, k]))
    return out


@compiled
def _intersections(
    query: np.ndarray, ref_t: np.ndarray, lo: int, length: int, out: np.ndarray
) -> None:
    """out[j] = |query & ref row lo + j| for `length` rows of the transposed `ref_t`."""
    for j in range(length):
        out[j] = 0
    for k in range(ref_t.shape[0]):
        x = query[k]
        row = ref_t[k, lo : lo + length]  # indexed from 0: the loop compiles to vector code
        for j in range(length):  # (with row[lo + j] it does not: 8.8 against 2.3 ns a pair)
            out[j] += _popcount(x & row[j])


@compiled
def best_in_range(
    query: np.ndarray,
    q_counts: np.ndarray,
    ref_t: np.ndarray,
    r_counts: np.ndarray,
    lo: int,
    hi: int,
    take: np.ndarray,
    top: np.ndarray,
    where: np.ndarray,
) -> None:
    """For each query row i in `take`: where reference rows lo..hi - 1 (columns of `ref_t`)
    hold a Tanimoto above top[i], top[i] becomes it and where[i] the first row reaching it.

    The best row is `_best_fraction`'s, its Tanimoto p / (s - p) divided once in float64 (a
    query sharing no bit keeps top and where). The rows go RANGE_BLOCK at a time, every query
    through a block before the next, so that a block stays in the core's cache."""
    m = len(take)
    top_p = np.zeros(m, dtype=np.int64)
    top_s = np.ones(m, dtype=np.int64)
    row = np.full(m, -1, dtype=np.int64)
    inter = np.empty(RANGE_BLOCK, dtype=np.uint64)
    for start in range(lo, hi, RANGE_BLOCK):
        length = min(RANGE_BLOCK, hi - start)
        for t in range(m):
            i = take[t]
            _intersections(query[i], ref_t, start, length, inter)
            p, s, j = _best_fraction(inter, q_counts[i], r_counts, start, length)
            if p * top_s[t] > top_p[t] * s:  # strictly: an earlier block's row keeps a tie
                top_p[t], top_s[t], row[t] = p, s, start + j
    for t in range(m):
        if top_p[t] > 0:
            value = top_p[t] / (top_s[t] - top_p[t])
            i = take[t]
            if value > top[i]:
                top[i] = value
                where[i] = row[t]


@compiled
def ratio_scores(
    query: np.ndarray, q_counts: np.ndarray, ref_t: np.ndarray, r_counts: np.ndarray
) -> np.ndarray:
    """float32 (m, n): |a & b| / (|a| + |b|) of every query row with every reference row,
    which orders pairs as Tanimoto does (T = x / (1 - x)), for ranking cluster centres. An
    empty reference row counts 0.5 (two empty rows: 0, not 0 / 0). Each value is the float32
    division of float32 operands, as numpy computes it."""
    m, n = query.shape[0], ref_t.shape[1]
    out = np.empty((m, n), dtype=np.float32)
    inter = np.empty(n, dtype=np.uint64)
    rows = np.empty(n, dtype=np.float32)
    for j in range(n):
        rows[j] = np.float32(max(r_counts[j], 0.5))
    for i in range(m):
        _intersections(query[i], ref_t, 0, n, inter)
        q = np.float32(q_counts[i])
        for j in range(n):
            out[i, j] = np.float32(inter[j]) / (rows[j] + q)
    return out


@compiled
def best_in_clusters(
    query: np.ndarray,
    q_counts: np.ndarray,
    train: np.ndarray,
    t_counts: np.ndarray,
    members: np.ndarray,
    starts: np.ndarray,
    clusters: np.ndarray,
    asking: np.ndarray,
    ask_starts: np.ndarray,
    best: np.ndarray,
) -> None:
    """For every cluster g in `clusters`, the max Tanimoto of each query that asks for it
    (`asking[ask_starts[g]:ask_starts[g + 1]]`) to its training rows
    (`members[starts[g]:starts[g + 1]]`, rows of `train`, uint64 words), raised into `best`.

    A cluster's rows are gathered once, transposed, for all the queries asking for it. The
    best row is `_best_fraction`'s, its Tanimoto p / (s - p) divided once in float64: the
    correctly rounded exact maximum (0 where nothing is shared)."""
    n_words = train.shape[1]
    longest = 0
    for g in clusters:
        longest = max(longest, starts[g + 1] - starts[g])
    ref_t = np.empty((n_words, longest), dtype=np.uint64)
    ref_counts = np.empty(longest, dtype=np.int64)
    inter = np.empty(longest, dtype=np.uint64)
    for g in clusters:
        lo, length = starts[g], starts[g + 1] - starts[g]
        for j in range(length):
            row = members[lo + j]
            ref_counts[j] = t_counts[row]
            for k in range(n_words):
                ref_t[k, j] = train[row, k]
        for a in range(ask_starts[g], ask_starts[g + 1]):
            i = asking[a]
            _intersections(query[i], ref_t, 0, length, inter)
            p, s, _ = _best_fraction(inter, q_counts[i], ref_counts, 0, length)
            if p > 0 and p / (s - p) > best[i]:
                best[i] = p / (s - p)
