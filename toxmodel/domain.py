"""Applicability domain: how close a query molecule is to anything the model was trained on.

For each query the nearest-neighbour Tanimoto similarity to the training set is computed on the
model's Morgan fingerprint bits only (the first `n_bits` fingerprint columns; a count > 0 is an
on bit; MACCS keys and descriptors are left out, as they would blur what "a similar molecule"
means). A molecule is `in_domain` when that similarity reaches a threshold chosen on the
validation split.

Why the 10th percentile of the validation molecules' similarity to train: validation molecules
were held out from training exactly as a future query is, and the model's validation scores
describe how it does on them. Taking the threshold at their 10th percentile calls "in domain"
anything at least as close to the training data as 90 % of the molecules the model was shown to
handle, and flags the tail it was never checked on. Under a scaffold split the validation
molecules are novel scaffolds, so the threshold is lower; under a random split, higher. A fixed
cut such as Tanimoto 0.4 would ignore both the fingerprint size and the split.

Storage: the distinct training fingerprints, bit-packed (`np.packbits`, 8 bits a byte), ordered
by bit count. Both searches read them as 64-bit words through compiled kernels
(`toxmodel.tanimoto`, numba): AND, popcount and the running maximum fused in one loop, the
best pair chosen by comparing fractions as integers and its Tanimoto |a & b| / (|a| + |b| -
|a & b|) divided once in float64, so the answer equals RDKit's `BulkTanimotoSimilarity` bit
for bit at any width. Two empty fingerprints have similarity 0. (Before the kernels, a sparse
x dense product of the on bits, scipy's, about 10x slower a pair at 1024 bits; AND + popcount
in numpy, `bitwise_count`, was slower still, as each step is a pass over a temporary.)

Two searches, built when the domain is first queried:

- **exact** (`search="exact"`; "auto" up to `EXACT_MAX_TRAIN` distinct training fingerprints,
  and every domain saved before the clustered search existed): the training rows sorted by bit
  count; queries, sorted by bit count too, go in blocks of `TILE_QUERIES`, and each block scans
  the training rows outward from its own bit count. Tanimoto(a, b) <= min(|a|, |b|) /
  max(|a|, |b|) (Swamidass & Baldi, 2007), so a query leaves a side once no row left there can
  beat the best similarity it has found. The answer is the brute-force maximum. The bound only
  prunes what is far from a query's best: at the similarities an applicability domain sees
  (nearest neighbours at 0.4-0.8) it skipped about 14 % of the pairs, so the cost stays
  queries x training rows (`benchmarks/domain_scale.py`).
- **clustered** (`search="clustered"`; "auto" above `EXACT_MAX_TRAIN`): an inverted-file index
  (faiss's `IndexIVF`, with Tanimoto) repeated over `N_PARTITIONS` independent partitions. In
  each, `ceil(CLUSTERS_PER_SQRT * sqrt(n_train))` training rows drawn at random (seeded) are
  centres and every training row joins the centre most similar to it (exact search). A query
  ranks every centre (float32) and is compared with the members of the `n_probe` clusters per
  partition whose centres are most similar to it: about P * (K + n_probe * n_train / K)
  comparisons instead of n_train. One partition misses a neighbour that sits in another
  cluster than the query's nearest centres; independent partitions rarely all miss it. The
  answer is the exact similarity of a real training molecule, so it never exceeds the exact
  one; where all partitions missed the nearest neighbour it reads lower, so a flag can only be
  wrong one way: in domain called out. Hence a **second pass**: a query whose answer is below
  the threshold (the only flags that can be wrong) searches the members of its next most
  similar clusters, up to `n_probe_low` in each of the first `low_partitions` partitions, if it
  is at most `LOW_BAND` below (a query far from everything is out of domain whatever the first
  pass missed). Measured at 10^6 ECFP-like rows, 10^4 queries drawn like the validation rows
  (`benchmarks/domain_scale.py`, RESULTS "The domain's second pass"): 4 partitions x 2 probes
  alone gave 91.4 % of the exact flags, 6 x 3 (before the second pass) 96.2 %, 4 x 2 and then
  32 probes in all 4 partitions for the 18 % below the threshold 99.1 % (the exact search with
  the same sampled threshold: 99.65 %); 96 probes in 2 partitions answer as well for less
  (RESULTS "The second pass in two partitions"). Today's 2 partitions x 6 probes, then 128 in
  both, answer as well as 4 x 2 then 96 in two (99.13 against 99.09 % on ECFP-like rows, 99.05
  against 99.02 % on real molecules), rank half the centres and build half the partitions;
  on the 10^6 job's own, further queries they are no faster, as their second pass is deeper
  (RESULTS "The clustered search in two partitions").
  `certify` (`Domain.certify`, or per call) re-checks exactly the answers still below the
  threshold, starting from the clustered answer (Swamidass-Baldi pruning against it): the
  flags then equal the exact search's, at the cost of the exact search for those queries
  (about 10 % of queries drawn as the validation rows, all of them for queries far from the
  training set). `Domain.similarity(..., exact=True)` gives the exact answer.

Threads: both searches, the partitions' build and the threshold run in threads (`workers`;
by default every CPU the process may use), because the kernels release the GIL and threads
share the training rows without copying them. The exact search
splits the queries; the clustered one ranks the centres by blocks of queries and then scans
the probed clusters in groups, one group a thread. The answers do not depend on the number of
threads (the partitions assign a fixed PARTITION_ROWS rows at a time).

The threshold is chosen by the exact search, whatever search the domain answers with (before,
the clustered domain chose it with its own search, which read it low), on at most
`VALID_SAMPLE` validation rows, a seeded random sample: VALID_SAMPLE x n_train pairs, linear in
the training set instead of n_valid x n_train. The sampled 10th percentile has a rank error of
sqrt(0.1 * 0.9 / 4000) = 0.47 percentage points (one standard error); at 2 * 10^4 to 10^5
training rows it gave the full-validation threshold to 3 decimals and the same flags on every
query (`benchmarks/domain_scale.py`; larger sizes not measured).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

import numpy as np

from toxmodel.cpus import available_cpus

DOMAIN_PERCENTILE = 10.0  # threshold = this percentile of validation NN similarity to train
TILE_QUERIES = 128  # queries per tile of the similarity kernel
CHUNK_PAIRS = TILE_QUERIES * 8192  # exact search: query x train pairs per tile (8192 rows)
# search="auto": exact up to this many distinct training fingerprints, clustered above. Up to
# here the exact search costs at most about half what featurizing and predicting a molecule
# costs (about 0.2 ms on 2 CPUs), so a prediction with the check runs at about 0.65x one
# without it or faster (0.700x measured at 79,459 rows), with exact flags. Measured with the
# compiled kernels (benchmarks/domain_scale.py, 2 CPUs, 10^4 queries drawn like the validation
# rows): exact 0.58 s at 5 * 10^4 ECFP-like rows, 1.17 s
# at 10^5, 2.26 s at 2 * 10^5; clustered 0.19, 0.26, 0.44 s with 99.92, 99.90, 99.83 % of the
# exact flags; real molecules at 10^5: 1.02 against 0.19 s, 99.80 %. The 10^5 scale job's own
# 10^5 queries (79,459 training rows): exact 8.4 s, clustered 5.0-5.8 s, 99.92 % of the flags
# (RESULTS "The exact search up to 100,000 rows"). It was 50,000 with the sparse product
# (exact 3.28 s at 10^5), and 2 * 10^5 before that (a 10^5-molecule model predicted at 0.40x).
EXACT_MAX_TRAIN = 100_000
CLUSTERS_PER_SQRT = 2.0  # clustered search: ceil(this * sqrt(n_train)) clusters
# clustered search: independent partitions of the training rows, and the clusters a query
# searches in each. Two partitions of 6 probes (then 128, below) rank half the centres 4 x 2
# (then 96) ranked, and a fit builds half the partitions: at 10^6 rows, ECFP-like and real
# molecules, the same flags or more in 0.6x the fit; queries drawn like the validation rows in
# 0.82-0.94x the time, the 10^6 job's out-of-distribution queries (a quarter take the second
# pass, now 128 deep) in 1.04x (RESULTS "The clustered search in two partitions"). Faster
# choices lost flags on ECFP-like rows: 2 x 6 then 96 0.2 points, 3 x 3 then 96 0.1.
N_PARTITIONS = 2
N_PROBE = 6
# clustered search: clusters searched per partition, in all, for a query whose first answer is
# below the threshold (a flag that could be wrong); 0 or <= N_PROBE: no second pass
N_PROBE_LOW = 128
# ... in this many partitions (the first ones; 0: all). The partitions cover the same rows near
# a query, so depth in two finds what the same clusters spread over four find, and ranks half
# the centres: at 10^6 rows 2 x 96 matched 4 x 32's flags on ECFP-like and real molecules in
# 0.81-0.88x its query time; 2 x 64 was faster still but lost 0.16 points of flags on ECFP-like rows
# (RESULTS "The second pass in two partitions"). A domain fitted today has two partitions, so
# its second pass searches both; one saved with four searches its first two.
LOW_PARTITIONS = 2
# ... and whose first answer is at most this far below the threshold: a query far from every
# training molecule (its nearest neighbour far below the threshold) is out of domain whatever
# the first pass missed, and would pay the second pass for nothing. At 10^6 ECFP-like rows the
# first pass's wrongly low answers sat at most 0.18 below the threshold (99 % within 0.16).
LOW_BAND = 0.2
TOP_PASSES = 8  # `_top`: argmax passes up to this many, argpartition above
SEARCHES = ("auto", "exact", "clustered")
PACK_ROWS = 8192  # rows packed, counted or laid out as words at a time
# The threshold: exact NN similarity of at most this many validation rows (a seeded random
# sample above it), so the fit costs VALID_SAMPLE x n_train pairs, linear in n_train. The
# sampled 10th percentile sits at the population's 10 +- 0.47 percentile (one standard error,
# sqrt(0.1 * 0.9 / 4000)); benchmarks/domain_scale.py measures what that does to the flags.
VALID_SAMPLE = 4000
THRESHOLD_SEARCHES = ("exact", "domain")
# Clustered search: re-check answers below the threshold exactly (flags exact by construction)
CERTIFY = False
# Threads: queries go to the searches in blocks of at least this many rows, several blocks a
# thread (blocks differ in cost); the partition build assigns training rows this many at a
# time, a fixed size so the clusters do not depend on the number of threads (ties between
# centres are broken in scan order, which depends on the block).
THREAD_MIN_ROWS = 4 * TILE_QUERIES
BLOCKS_PER_THREAD = 4
PARTITION_ROWS = 16_384
B = TypeVar("B")  # a block of work for `_by_blocks`
R = TypeVar("R")  # its result


def morgan_bits(fingerprint: np.ndarray, n_bits: int) -> np.ndarray:
    """The Morgan part of `Features.fingerprint` as booleans (counts > 0 are on bits)."""
    fp = np.asarray(fingerprint)
    if fp.ndim != 2 or fp.shape[1] < n_bits:
        raise ValueError(f"need a fingerprint of at least {n_bits} columns, got shape {fp.shape}")
    return fp[:, :n_bits] > 0


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Boolean rows -> uint8 bytes, 8 bits a byte, little-endian bit order."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1, bitorder="little")


def _pack_morgan(
    fingerprint: np.ndarray, n_bits: int, rows: int = 65_536, take: np.ndarray | None = None
) -> np.ndarray:
    """`pack_bits(morgan_bits(...))` of the rows `take` (None: all), a slice of rows at a time
    (no full boolean copy, and no copy of the selected rows: at 10^6 molecules and 2048 columns
    `fingerprint[take]` alone would be 1.6 GB)."""
    fp = np.asarray(fingerprint)
    if fp.ndim != 2 or fp.shape[1] < n_bits:
        raise ValueError(f"need a fingerprint of at least {n_bits} columns, got shape {fp.shape}")
    index = None if take is None else np.asarray(take)
    n = len(fp) if index is None else len(index)
    out = np.empty((n, (n_bits + 7) // 8), dtype=np.uint8)
    for start in range(0, n, rows):
        part = slice(start, start + rows)  # all rows: a view of the slice, no gathered copy
        block = fp[part, :n_bits] if index is None else fp[index[part], :n_bits]
        out[part] = pack_bits(block > 0)
    return out


def _bit_counts(packed: np.ndarray, n_bits: int, rows: int) -> np.ndarray:
    """On bits among the first `n_bits` of every packed row, `rows` rows at a time, int64
    (the last byte's bits beyond `n_bits` are not counted, whatever a file put there): the
    kernels' own count, on one block of words at a time."""
    from toxmodel import tanimoto

    out = np.empty(len(packed), dtype=np.int64)
    for start in range(0, len(packed), rows):
        part = packed[start : start + rows]
        out[start : start + len(part)] = tanimoto.counts(tanimoto.words(part, n_bits))
    return out


def _count_bound(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """min(a, b) / max(a, b): no pair of fingerprints with a and b on bits has a higher
    Tanimoto (0 where either is empty)."""
    low, high = np.minimum(a, b), np.maximum(a, b)
    return np.divide(low, high, out=np.zeros(np.broadcast(low, high).shape), where=high > 0)


def _tile_shape(chunk_pairs: int) -> tuple[int, int]:
    """(queries, reference rows) of one tile of at most `chunk_pairs` pairs."""
    queries = max(1, min(TILE_QUERIES, chunk_pairs))
    return queries, max(1, chunk_pairs // queries)


def _threads(workers: int | None) -> int:
    """`workers`, or every CPU this process may use. The searches run in threads: the compiled
    kernels and numpy's loops release the GIL, so threads use the cores without copying the
    training rows into other processes."""
    if workers is not None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1 or None, got {workers}")
        return workers
    return available_cpus()


def _by_blocks(fn: Callable[[B], R], blocks: list[B], threads: int) -> list[R]:
    """`fn` of every block, in order: in `threads` threads when there is more than one block."""
    if threads <= 1 or len(blocks) <= 1:
        return [fn(block) for block in blocks]
    with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
        return list(pool.map(fn, blocks))


def _query_blocks(m: int, threads: int) -> list[slice]:
    """Contiguous blocks of `m` query rows: one without threads (or too few rows), else up to
    BLOCKS_PER_THREAD a thread of at least THREAD_MIN_ROWS rows each."""
    count = min(threads * BLOCKS_PER_THREAD, m // THREAD_MIN_ROWS) if threads > 1 else 1
    edges = np.linspace(0, m, max(count, 1) + 1).astype(int)
    return [slice(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _exact_nearest(
    query: np.ndarray,
    q_counts: np.ndarray,
    ref_t: np.ndarray,
    r_counts: np.ndarray,
    chunk_pairs: int = CHUNK_PAIRS,
    floor: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The exact max Tanimoto of each query row (`tanimoto.words`, bit counts `q_counts`) to
    the reference rows, and the row of one reference that reaches it first (-1 where the
    maximum is 0 and nothing had to be compared).

    `floor` (m,): a similarity each query is known to reach already (e.g. the clustered
    search's answer, the similarity of a real reference row); the scan starts from it, so rows
    whose count bound does not beat it are skipped, and where nothing beats it the answer is
    the floor itself (row -1).

    `ref_t` holds the reference rows' words transposed (`tanimoto.transposed_words`), sorted
    by bit count, `r_counts` (n,) ascending. Queries go in blocks of similar bit count; each
    block scans the reference outward from its median count, a chunk of rows at a time, taking
    the side whose remaining rows could still hold the higher similarity. A query takes part in
    a chunk only while the count bound of that chunk beats its best similarity, and leaves a
    side for good once the bound of everything left on that side does not (the bound only falls
    as the scan moves outward). A chunk's pairs are the compiled `tanimoto.best_in_range`.
    """
    from toxmodel import tanimoto

    m, n = len(query), len(r_counts)
    best = np.zeros(m)
    found = np.full(m, -1, dtype=np.int64)
    if n == 0:
        best[:] = np.nan
        return best, found
    block, rows = _tile_shape(chunk_pairs)
    order = np.argsort(q_counts, kind="stable")
    for start in range(0, m, block):
        members = order[start : start + block]
        q, a, q_int = query[members], q_counts[members].astype(np.float64), q_counts[members]
        top = np.zeros(len(members)) if floor is None else np.array(floor[members], np.float64)
        where = np.full(len(members), -1, dtype=np.int64)
        lo = hi = int(np.searchsorted(r_counts, np.median(a)))
        while True:
            # what the rows not yet scanned on each side could reach, per query
            right = _count_bound(a, np.maximum(a, r_counts[hi])) if hi < n else np.zeros_like(a)
            left = _count_bound(a, np.minimum(a, r_counts[lo - 1])) if lo > 0 else a * 0
            go_right, go_left = right > top, left > top
            if not (go_right.any() or go_left.any()):
                break
            if go_right.any() and (not go_left.any() or right.max() >= left.max()):
                stop = min(n, hi + rows)
                chunk, hi = slice(hi, stop), stop
            else:
                begin = max(0, lo - rows)
                chunk, lo = slice(begin, lo), begin
            reach = _count_bound(a, np.clip(a, r_counts[chunk.start], r_counts[chunk.stop - 1]))
            take = np.flatnonzero(reach > top)  # this chunk's own bound beats their best
            if len(take):
                tanimoto.best_in_range(
                    q, q_int, ref_t, r_counts, chunk.start, chunk.stop, take, top, where
                )
        best[members], found[members] = top, where
    return best, found


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest values along the last axis, largest first; overwrites
    `values`. Up to TOP_PASSES, by `k` argmax passes (ties: the lowest index; for the few
    clusters a query probes this is several times faster than `np.argpartition` over every
    centre: 2.4 ms against 18 ms for 128 queries x 6 x 1,789 centres, k = 3); above it, by
    `np.argpartition` and a stable sort of the `k` (ties at the k-th value: argpartition's
    choice, the same for the same values)."""
    if k > TOP_PASSES:
        part = np.argpartition(-values, k - 1, axis=-1)[..., :k]
        order = np.argsort(-np.take_along_axis(values, part, axis=-1), axis=-1, kind="stable")
        return np.take_along_axis(part, order, axis=-1).astype(np.int64)
    out = np.empty((*values.shape[:-1], k), dtype=np.int64)
    for j in range(k):
        top = values.argmax(axis=-1)
        out[..., j] = top
        np.put_along_axis(values, top[..., None], -np.inf, axis=-1)
    return out


def _clustered_nearest(
    packed: np.ndarray,
    n_bits: int,
    index: _Clusters,
    n_probe: int,
    threads: int = 1,
    skip: int = 0,
) -> np.ndarray:
    """Max Tanimoto of each query row (`pack_bits` rows of `n_bits` bits: 8x smaller than
    booleans) to the members of its `n_probe` most similar centres' clusters in each partition
    of `index`, leaving out the `skip` most similar (a second pass of more probes after a first
    of `skip`). With `skip` 0 the most similar centre of every partition is among the members
    (a centre is in its cluster).

    Both steps are compiled kernels (`toxmodel.tanimoto`), in `threads` threads: the centres
    ranked by blocks of queries, then the clusters in groups (each cluster's members gathered
    once, for all the queries that probe it)."""
    from toxmodel import tanimoto  # compiled on first use; see the module

    m = len(packed)
    n_parts, n_clusters = index.centres.shape
    if m == 0 or skip >= min(n_probe, n_clusters):  # nothing, or the first pass saw all
        return np.zeros(m)
    if n_probe >= n_clusters:  # every cluster, the first pass's too: which they were is not
        n_probe, skip = n_clusters, 0  # known here, and skipping by index would miss some
    query = tanimoto.words(packed, n_bits)
    q_counts = tanimoto.counts(query)

    def centres(part: slice) -> np.ndarray:
        """The clusters to probe, for the queries of `part`."""
        probes = np.empty((part.stop - part.start, n_parts, n_probe - skip), dtype=np.int64)
        for start in range(0, len(probes), TILE_QUERIES):
            tile = slice(part.start + start, min(part.stop, part.start + start + TILE_QUERIES))
            sims = tanimoto.ratio_scores(
                query[tile], q_counts[tile], index.centre_words, index.centre_counts
            ).reshape(tile.stop - tile.start, n_parts, n_clusters)
            here = slice(start, start + len(sims))
            if n_probe < n_clusters:
                probes[here] = _top(sims, n_probe)[..., skip:]
            else:
                probes[here] = np.arange(n_clusters)[None, None, :]
        return probes

    probes = np.concatenate(_by_blocks(centres, _query_blocks(m, threads), threads))
    # then cluster by cluster, with the queries that probe it
    width = n_parts * (n_probe - skip)
    cluster = (probes + (np.arange(n_parts) * n_clusters)[None, :, None]).ravel()
    by_cluster = np.argsort(cluster, kind="stable")
    asking = by_cluster // width
    bounds = np.searchsorted(cluster[by_cluster], np.arange(n_parts * n_clusters + 1))
    probed = np.flatnonzero(np.diff(bounds))
    groups = threads if m >= THREAD_MIN_ROWS else 1  # a few queries: no threads to start

    def members(share: int) -> np.ndarray:
        """Each query's best similarity among the members of every `groups`-th probed
        cluster from the `share`-th on."""
        local = np.zeros(m)
        tanimoto.best_in_clusters(
            query,
            q_counts,
            index.words,
            index.counts,
            index.members,
            index.member_starts,
            probed[share::groups],
            asking,
            bounds,
            local,
        )
        return local

    best = np.zeros(m)
    for local in _by_blocks(members, list(range(groups)), groups):
        np.maximum(best, local, out=best)
    return best


@dataclass(frozen=True, eq=False)
class _Search:
    """Reference rows sorted by bit count, their 64-bit words transposed, for the exact search."""

    words_t: np.ndarray  # (n_words, n) uint64
    counts: np.ndarray  # (n,) int64, ascending
    n_bits: int

    @classmethod
    def by_count(cls, packed: np.ndarray, n_bits: int) -> _Search:
        """`pack_bits` rows sorted by bit count (as they come when they are already: a domain
        fitted today stores them so)."""
        from toxmodel import tanimoto

        counts = _bit_counts(packed, n_bits, PACK_ROWS)
        order = None
        if np.any(counts[1:] < counts[:-1]):
            order = np.argsort(counts, kind="stable")
            counts = counts[order]
        return cls(tanimoto.transposed_words(packed, n_bits, order), counts, n_bits)

    def exact(
        self,
        packed: np.ndarray,
        chunk_pairs: int = CHUNK_PAIRS,
        floor: np.ndarray | None = None,
        workers: int | None = 1,
    ) -> np.ndarray:
        """The exact answer of every `pack_bits` query row (`_exact_nearest`), its rows split
        over `workers` threads (None: every CPU); the answer does not depend on the split."""
        from toxmodel import tanimoto

        def block(rows: slice) -> np.ndarray:
            query = tanimoto.words(packed[rows], self.n_bits)
            low = None if floor is None else floor[rows]
            counts = tanimoto.counts(query)
            return _exact_nearest(query, counts, self.words_t, self.counts, chunk_pairs, low)[0]

        threads = _threads(workers)
        parts = _by_blocks(block, _query_blocks(len(packed), threads), threads)
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True, eq=False)
class _Clusters:
    """The clustered search's partitions: in partition p, cluster c holds training rows
    `rows[p, starts[p, c]:starts[p, c + 1]]`, its centre is row `centres[p, c]`; and what the
    compiled kernels read: the training rows as 64-bit words, cluster g = p * n_clusters + c
    as `members[member_starts[g]:member_starts[g + 1]]`, the centres' words transposed."""

    rows: np.ndarray  # (n_partitions, n_train) int32
    starts: np.ndarray  # (n_partitions, n_clusters + 1) int64
    centres: np.ndarray  # (n_partitions, n_clusters) int64
    words: np.ndarray  # (n_train, n_words) uint64: the training rows
    counts: np.ndarray  # (n_train,) int64: their on bits
    centre_words: np.ndarray  # (n_words, n_partitions * n_clusters) uint64
    centre_counts: np.ndarray  # (n_partitions * n_clusters,) int64

    @classmethod
    def of(
        cls,
        rows: np.ndarray,
        starts: np.ndarray,
        centres: np.ndarray,
        words: np.ndarray,
        counts: np.ndarray,
    ) -> _Clusters:
        from toxmodel import tanimoto

        flat = centres.ravel()
        return cls(
            rows, starts, centres, words, counts, tanimoto.transposed(words[flat]), counts[flat]
        )

    @cached_property
    def members(self) -> np.ndarray:
        """Every partition's rows one after another (a view of `rows` when it is contiguous)."""
        return np.ascontiguousarray(self.rows).ravel()

    @cached_property
    def member_starts(self) -> np.ndarray:
        """Where cluster g = p * n_clusters + c starts in `members`, and the end (int64)."""
        parts, n = self.rows.shape
        flat = (self.starts[:, :-1] + (np.arange(parts) * n)[:, None]).ravel()
        return np.append(flat, parts * n).astype(np.int64)


def nearest_similarity(
    query: np.ndarray, reference: np.ndarray, chunk_pairs: int = CHUNK_PAIRS
) -> np.ndarray:
    """Exact max Tanimoto similarity of each boolean query row to any reference row (float64).

    Two empty fingerprints have similarity 0. An empty reference gives NaN. `chunk_pairs`
    bounds the query x reference pairs compared at once, not the answer.
    """
    q, ref = np.asarray(query, dtype=bool), np.asarray(reference, dtype=bool)
    if q.ndim != 2 or ref.ndim != 2 or q.shape[1] != ref.shape[1]:
        raise ValueError(f"query has shape {q.shape}, reference {ref.shape}")
    if len(ref) == 0:
        return np.full(len(q), np.nan)
    n_bits = ref.shape[1]
    return _Search.by_count(pack_bits(ref), n_bits).exact(pack_bits(q), chunk_pairs)


@dataclass(eq=False)
class Domain:
    """The training set's Morgan bits (packed), the in-domain threshold and, for a large
    training set, the partitions the clustered search probes."""

    train_packed: np.ndarray  # uint8 (n_train, ceil(n_bits / 8)), distinct, by bit count
    n_bits: int
    threshold: float  # in_domain = nn_similarity >= threshold
    percentile: float = DOMAIN_PERCENTILE  # how the threshold was chosen
    n_valid: int = 0  # validation molecules it was chosen on
    # clustered search (all None: exact); see _Clusters
    cluster_rows: np.ndarray | None = None  # int32 (n_partitions, n_train)
    cluster_starts: np.ndarray | None = None  # int64 (n_partitions, n_clusters + 1)
    centres: np.ndarray | None = None  # int64 (n_partitions, n_clusters)
    n_probe: int = 0  # clusters a query searches per partition
    n_probe_low: int = N_PROBE_LOW  # the same, in all, for an answer below the threshold
    low_partitions: int = LOW_PARTITIONS  # ... in this many partitions (0: all)
    certify: bool = CERTIFY  # clustered: answers below the threshold re-checked exactly

    @property
    def n_train(self) -> int:
        return int(self.train_packed.shape[0])

    @property
    def search(self) -> str:
        """ "exact" or "clustered": how `similarity` searches unless told `exact=True`."""
        return "exact" if self.cluster_rows is None else "clustered"

    @cached_property
    def _exact(self) -> _Search:
        return _Search.by_count(self.train_packed, self.n_bits)

    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray]:
        """The training rows as 64-bit words and their bit counts, for the clustered search
        (0.1 GB for 782,000 distinct molecules of 1024 bits; the exact search reads the same
        words transposed)."""
        from toxmodel import tanimoto

        words = tanimoto.words(self.train_packed, self.n_bits)
        return words, tanimoto.counts(words)

    @cached_property
    def _clusters(self) -> _Clusters:
        assert self.cluster_rows is not None and self.cluster_starts is not None
        assert self.centres is not None
        return _Clusters.of(self.cluster_rows, self.cluster_starts, self.centres, *self._words)

    def _low_clusters(self) -> _Clusters:
        """The partitions the second pass searches: the first `low_partitions` (0, or more
        than there are: all). Not cached: it follows `low_partitions`, and costs a gather of
        the centres' rows."""
        clusters, parts = self._clusters, self.low_partitions
        if parts == 0 or parts >= len(clusters.centres):
            return clusters
        return _Clusters.of(
            clusters.rows[:parts],
            clusters.starts[:parts],
            clusters.centres[:parts],
            clusters.words,
            clusters.counts,
        )

    def similarity(
        self,
        fingerprint: np.ndarray,
        exact: bool = False,
        chunk_pairs: int = CHUNK_PAIRS,
        certify: bool | None = None,
        workers: int | None = None,
    ) -> np.ndarray:
        """NN Tanimoto similarity to train of featurized rows (`Features.fingerprint`), by the
        domain's search; `exact` forces the exact search.

        `certify` (clustered search only; None: the domain's `certify`): every answer below
        the threshold is replaced by the exact one (an exact search that starts from the
        clustered answer), so `in_domain` of the result equals the exact search's flags;
        answers at or above the threshold stay the clustered lower bounds (their flag is
        already right). It costs the exact search for the queries below the threshold.

        `workers`: threads the queries are split over (None: every CPU this process may use);
        `chunk_pairs`: the exact search's query x row pairs a tile (where it scans); neither
        changes the answer."""
        threads = _threads(workers)
        # the queries packed a slice at a time: no boolean copy of them (100 MB at 10^5 rows)
        packed = _pack_morgan(fingerprint, self.n_bits, rows=PACK_ROWS)
        if exact or self.search == "exact":
            return self._exact.exact(packed, chunk_pairs, workers=threads)
        clusters = self._clusters  # built here, not in the threads
        sims = _clustered_nearest(packed, self.n_bits, clusters, self.n_probe, threads)
        near = np.flatnonzero((sims < self.threshold) & (sims >= self.threshold - LOW_BAND))
        if self.n_probe_low > self.n_probe and len(near):  # the flags that could be wrong
            more = _clustered_nearest(
                packed[near],
                self.n_bits,
                self._low_clusters(),
                self.n_probe_low,
                threads,
                skip=self.n_probe,
            )
            sims[near] = np.maximum(sims[near], more)
        low = np.flatnonzero(sims < self.threshold)
        if (self.certify if certify is None else certify) and len(low):
            sims[low] = self._exact.exact(packed[low], chunk_pairs, sims[low], workers=threads)
        return sims

    def drop_search(self) -> None:
        """Free what the searches built on the first query (the rows as words, 0.1 GB for the
        782,000 distinct molecules of a 10^6 job, and the partitions' centres); the next query
        builds them again."""
        for name in ("_exact", "_words", "_clusters"):
            self.__dict__.pop(name, None)

    def in_domain(self, similarity: np.ndarray) -> np.ndarray:
        """similarity >= threshold, elementwise (NaN similarity -> False)."""
        return np.asarray(similarity) >= self.threshold

    def to_blob(self) -> dict[str, Any]:
        """Plain numbers and arrays, for a weights_only checkpoint. An exact domain writes what
        toxtune wrote before the clustered search existed; a clustered one adds its partitions
        (a reader that ignores them searches the same rows exactly)."""
        blob: dict[str, Any] = {
            "train_bits": np.ascontiguousarray(self.train_packed, dtype=np.uint8),
            "n_bits": int(self.n_bits),
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "n_valid": int(self.n_valid),
        }
        if self.search == "clustered":
            blob["cluster_rows"] = np.asarray(self.cluster_rows, dtype=np.int32)
            blob["cluster_starts"] = np.asarray(self.cluster_starts, dtype=np.int64)
            blob["centres"] = np.asarray(self.centres, dtype=np.int64)
            blob["n_probe"] = int(self.n_probe)
            blob["n_probe_low"] = int(self.n_probe_low)
            blob["low_partitions"] = int(self.low_partitions)
        return blob

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> Domain:
        """What `to_blob` wrote (arrays may come back as tensors or numpy arrays)."""
        packed = _array(blob["train_bits"])
        n_bits = int(blob["n_bits"])
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != (n_bits + 7) // 8:
            raise ValueError(
                f"domain train_bits must be uint8 (n, {(n_bits + 7) // 8}), "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        rows = starts = centres = None
        n_probe, n_probe_low, low_partitions = 0, N_PROBE_LOW, LOW_PARTITIONS
        if blob.get("cluster_rows") is not None:
            rows = _array(blob["cluster_rows"]).astype(np.int32)
            starts = _array(blob["cluster_starts"]).astype(np.int64)
            centres = _array(blob["centres"]).astype(np.int64)
            n_probe = int(blob["n_probe"])
            if "n_probe_low" in blob:  # saved with its own second pass: over every partition
                n_probe_low = int(blob["n_probe_low"])  # until low_partitions was saved too
                low_partitions = int(blob.get("low_partitions", 0))
            _check_clusters(rows, starts, centres, len(packed), n_probe, low_partitions)
        return cls(
            train_packed=packed,
            n_bits=n_bits,
            threshold=float(blob["threshold"]),
            percentile=float(blob.get("percentile", DOMAIN_PERCENTILE)),
            n_valid=int(blob.get("n_valid", 0)),
            cluster_rows=rows,
            cluster_starts=starts,
            centres=centres,
            n_probe=n_probe,
            n_probe_low=n_probe_low,
            low_partitions=low_partitions,
        )


def _array(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _check_clusters(
    rows: np.ndarray,
    starts: np.ndarray,
    centres: np.ndarray,
    n_train: int,
    n_probe: int,
    low_partitions: int = 0,
) -> None:
    """A clustered domain's partitions, or ValueError saying what is inconsistent."""
    parts, k = centres.shape if centres.ndim == 2 else (0, 0)
    if k == 0 or rows.shape != (parts, n_train) or starts.shape != (parts, k + 1):
        raise ValueError(
            f"domain clusters: rows {rows.shape}, starts {starts.shape}, centres "
            f"{centres.shape} for {n_train} training rows"
        )
    if np.any(starts[:, 0] != 0) or np.any(starts[:, -1] != n_train):
        raise ValueError("domain clusters: starts must run from 0 to n_train")
    if np.any(np.diff(starts, axis=1) <= 0):
        raise ValueError("domain clusters: every cluster must hold at least its centre")
    for p in range(parts):
        if not np.array_equal(np.sort(rows[p]), np.arange(n_train)):
            raise ValueError(f"domain clusters: partition {p} is not a permutation of the rows")
        cluster = np.repeat(np.arange(k), np.diff(starts[p]))
        where = np.empty(n_train, dtype=np.int64)
        where[rows[p]] = cluster
        if not np.array_equal(where[centres[p]], np.arange(k)):
            raise ValueError(f"domain clusters: a centre of partition {p} is not in its cluster")
    if n_probe < 1:
        raise ValueError(f"domain clusters: n_probe must be >= 1, got {n_probe}")
    if low_partitions < 0:
        raise ValueError(f"domain clusters: low_partitions must be >= 0, got {low_partitions}")


def _partition(
    packed: np.ndarray,
    n_bits: int,
    n_clusters: int,
    rng: np.random.Generator,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One partition: rows cluster by cluster, cluster starts, centres.

    `n_clusters` rows drawn at random are the centres; each row (`packed`: the same rows)
    joins its most similar centre (exact search; a row sharing no bit with any centre joins the
    first cluster). Rows are assigned PARTITION_ROWS at a time, in `threads` threads."""
    from toxmodel import tanimoto

    n = len(packed)
    picked = np.sort(rng.choice(n, size=min(n_clusters, n), replace=False))
    centres = _Search.by_count(packed[picked], n_bits)
    counts = _bit_counts(packed[picked], n_bits, PACK_ROWS)
    centre_order = np.argsort(counts, kind="stable")  # as by_count sorts

    def nearest_centre(rows: slice) -> np.ndarray:
        query = tanimoto.words(packed[rows], n_bits)
        q_counts = tanimoto.counts(query)
        return _exact_nearest(query, q_counts, centres.words_t, centres.counts)[1]

    blocks = [slice(start, start + PARTITION_ROWS) for start in range(0, n, PARTITION_ROWS)]
    position = np.concatenate(_by_blocks(nearest_centre, blocks, threads))
    cluster = np.where(position >= 0, centre_order[np.maximum(position, 0)], 0)
    cluster[picked] = np.arange(len(picked))  # a centre is in its own cluster
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(len(picked) + 1))
    return order.astype(np.int32), starts.astype(np.int64), picked.astype(np.int64)


def threshold_rows(n_valid: int, valid_sample: int, seed: int = 0) -> np.ndarray:
    """The validation rows `fit_domain` chooses the threshold on when there are more than
    `valid_sample`: a seeded random sample, in row order."""
    rng = np.random.default_rng([seed, 23])
    return np.sort(rng.choice(n_valid, size=min(valid_sample, n_valid), replace=False))


def fit_domain(
    train_fingerprint: np.ndarray,
    valid_fingerprint: np.ndarray,
    n_bits: int,
    percentile: float = DOMAIN_PERCENTILE,
    search: str = "auto",
    n_partitions: int = N_PARTITIONS,
    n_probe: int = N_PROBE,
    n_probe_low: int = N_PROBE_LOW,
    low_partitions: int = LOW_PARTITIONS,
    n_clusters: int | None = None,
    seed: int = 0,
    valid_sample: int | None = VALID_SAMPLE,
    threshold_search: str = "exact",
    train_rows: np.ndarray | None = None,
    workers: int | None = None,
) -> Domain:
    """The domain of a model trained on `train_fingerprint` rows (`Features.fingerprint`), its
    threshold the `percentile` of the validation rows' NN similarity to train.

    `search`: "exact", "clustered" (`n_partitions` partitions of `n_clusters` clusters each,
    default `ceil(CLUSTERS_PER_SQRT * sqrt(n_train))`, centres drawn with `seed`; a query
    searches `n_probe` clusters per partition, and `n_probe_low` in all in each of the first
    `low_partitions` (0: all) where its answer is below the threshold) or "auto" (exact up
    to `EXACT_MAX_TRAIN` distinct training fingerprints, clustered above).

    The threshold: the `percentile` of the validation rows' NN similarity, over at most
    `valid_sample` of them (drawn with `seed`; None: all), computed by the exact search
    (`threshold_search="exact"`) or by the domain's own search ("domain": what toxtune did
    before; for a clustered domain it reads lower than the exact percentile, and as the
    threshold is not known yet, a clustered search makes no second pass).

    `train_rows`: the rows of `train_fingerprint` the model trained on (None: all), read in
    place, so the caller need not copy them out of the whole feature matrix.

    `workers`: threads for the partitions and the threshold's search (None: every CPU this
    process may use); the domain is the same for any number.

    Without validation rows the threshold is 0 (every valid molecule in domain) and says so by
    `n_valid == 0`.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    packed = _pack_morgan(train_fingerprint, n_bits, take=train_rows)
    if len(packed) == 0:
        raise ValueError("the applicability domain needs at least one training molecule")
    valid = np.asarray(valid_fingerprint)
    morgan_bits(valid[:0], n_bits)  # the shape check alone
    distinct = _distinct_rows_by_count(packed, n_bits)
    domain = Domain(distinct, n_bits, threshold=0.0, percentile=percentile)
    del packed, distinct
    n = domain.n_train
    if search == "clustered" or (search == "auto" and n > EXACT_MAX_TRAIN):
        if n_probe < 1 or n_partitions < 1 or n_probe_low < 0:
            raise ValueError(
                "n_probe and n_partitions must be >= 1, n_probe_low >= 0: "
                f"{n_probe}, {n_partitions}, {n_probe_low}"
            )
        if low_partitions < 0:
            raise ValueError(f"low_partitions must be >= 0 (0: all), got {low_partitions}")
        k = n_clusters or math.ceil(CLUSTERS_PER_SQRT * math.sqrt(n))
        k = max(1, min(k, n))
        rng, threads = np.random.default_rng(seed), _threads(workers)
        parts = [
            _partition(domain.train_packed, n_bits, k, rng, threads) for _ in range(n_partitions)
        ]
        domain.cluster_rows, domain.cluster_starts, domain.centres = (
            np.stack(arrays) for arrays in zip(*parts, strict=True)
        )
        domain.n_probe, domain.n_probe_low = int(n_probe), int(n_probe_low)
        domain.low_partitions = int(low_partitions)
    if threshold_search not in THRESHOLD_SEARCHES:
        raise ValueError(
            f"threshold_search must be one of {THRESHOLD_SEARCHES}, got {threshold_search!r}"
        )
    if valid_sample is not None and valid_sample < 1:
        raise ValueError(f"valid_sample must be >= 1 or None, got {valid_sample}")
    if valid_sample is not None and len(valid) > valid_sample:
        valid = valid[threshold_rows(len(valid), valid_sample, seed)]
    if len(valid):
        exact = threshold_search == "exact"
        sims = domain.similarity(valid, exact=exact, certify=False, workers=workers)
        domain.threshold = float(np.percentile(sims, percentile))
        domain.n_valid = len(valid)
    if not math.isfinite(domain.threshold):
        raise ValueError(f"domain threshold is not finite: {domain.threshold}")
    domain.drop_search()  # saved next, as a rule: the first query builds them again
    return domain


def _distinct_rows_by_count(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """The distinct rows of `packed` (which it sorts in place when contiguous) ordered by bit
    count, ties in byte order: `np.unique(packed, axis=0)` ordered by count, with one copy of
    the distinct rows instead of np.unique's sorted copy, its flattened copy and its result
    (0.1 GB each at 10^6 molecules of 1024 bits). The exact search scans these rows themselves."""
    packed = np.ascontiguousarray(packed)
    if len(packed) == 0:
        return packed
    rows = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()  # packed's memory
    rows.sort()  # byte order, as np.unique's
    first = np.empty(len(rows), dtype=bool)
    first[0] = True
    first[1:] = rows[1:] != rows[:-1]  # (the ufunc has no void loop; the operator has)
    distinct = np.flatnonzero(first)
    del first
    counts = _bit_counts(packed, n_bits, PACK_ROWS)[distinct]
    return packed[distinct[np.argsort(counts, kind="stable")]]
