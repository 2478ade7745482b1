"""The compiled Tanimoto kernels of the clustered domain search, against brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tests.toxmodel.test_domain import brute_force, ecfp_like
from toxmodel import tanimoto
from toxmodel.domain import pack_bits


def best_of(query: np.ndarray, ref: np.ndarray, n_bits: int) -> np.ndarray:
    """`best_in_clusters` with every reference row in one cluster that every query asks for."""
    q, r = tanimoto.words(pack_bits(query), n_bits), tanimoto.words(pack_bits(ref), n_bits)
    best = np.zeros(len(query))
    tanimoto.best_in_clusters(
        q,
        tanimoto.counts(q),
        r,
        tanimoto.counts(r),
        np.arange(len(ref)),
        np.array([0, len(ref)]),
        np.array([0]),
        np.arange(len(query)),
        np.array([0, len(query)]),
        best,
    )
    return best


@pytest.mark.parametrize("n_bits", [2048, 16384])
def test_the_member_kernel_finds_the_exact_maximum_among_close_ratios(n_bits: int) -> None:
    """Dense rows give Tanimoto fractions with denominators in the thousands, many of them a
    few 1e-7 apart: the kernel compares them exactly and finds the largest."""
    rng = np.random.default_rng(n_bits)
    ref = rng.random((400, n_bits)) < 0.45
    query = rng.random((64, n_bits)) < 0.45
    np.testing.assert_array_equal(best_of(query, ref, n_bits), brute_force(query, ref))
    inter = query.astype(np.int64) @ ref.T.astype(np.int64)
    q_counts, ref_counts = query.sum(1), ref.sum(1)
    ratios = np.sort((inter / (q_counts[:, None] + ref_counts[None, :] - inter)).ravel())
    assert np.min(np.diff(ratios)[np.diff(ratios) > 0]) < 1e-6  # close fractions were there


def test_wide_rows_whose_ratios_round_alike_in_float32_still_give_the_larger() -> None:
    """At 16,384 bits 3846/8551 and 3649/8113 are one float32; the second row's larger
    similarity is the answer."""
    n_bits = 16384
    query = np.zeros((1, n_bits), bool)
    query[0, :8000] = True
    ref = np.zeros((2, n_bits), bool)
    ref[0, :3846], ref[0, 8000:8551] = True, True  # 3846 / (8000 + 4397 - 3846)
    ref[1, :3649], ref[1, 8000:8113] = True, True  # 3649 / (8000 + 3762 - 3649)
    assert np.float32(3846 / 8551) == np.float32(3649 / 8113) and 3649 / 8113 > 3846 / 8551
    assert best_of(query, ref, n_bits)[0] == 3649 / 8113


def test_empty_fingerprints_give_0_without_dividing_0_by_0() -> None:
    """An empty query against empty and non-empty rows: similarity 0, no warning; a query
    sharing no bit: 0; an empty row ranked first does not hide the row a query matches."""
    ref = np.zeros((3, 64), bool)
    ref[1, :5], ref[2, 3:9] = True, True  # row 0 empty
    query = np.zeros((3, 64), bool)
    query[1, :5], query[2, 40:44] = True, True  # query 0 empty; query 2 shares no bit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = best_of(query, ref, 64)
    np.testing.assert_array_equal(got, [0.0, 1.0, 0.0])


@pytest.mark.parametrize("n_bits", [1, 100, 1024, 1030])
def test_words_ignore_the_spare_bits_a_file_put_in_the_last_byte(n_bits: int) -> None:
    """Rows whose last byte carries set bits beyond `n_bits` (and rows of widths that are not
    whole bytes or words) count and compare only their first `n_bits` bits."""
    query, ref = ecfp_like(50, n_bits, seed=1), ecfp_like(80, n_bits, seed=2)
    query[:5] = ref[:5]
    dirty = pack_bits(ref)
    if n_bits % 8:
        dirty[:, -1] |= np.uint8(0xFF << (n_bits % 8) & 0xFF)
    words = tanimoto.words(dirty, n_bits)
    np.testing.assert_array_equal(tanimoto.counts(words), ref.sum(1))
    np.testing.assert_array_equal(best_of(query, ref, n_bits), brute_force(query, ref))


def test_centre_scores_are_numpys_float32_ratios_bit_for_bit() -> None:
    """The centres are ranked by |a & b| / (|a| + |b|) in float32, an empty centre counting
    0.5: the same floats numpy's float32 arithmetic gives, so ties and order are unchanged."""
    centres, query = ecfp_like(300, 512, seed=3), ecfp_like(90, 512, seed=4)
    centres[0] = False  # an empty centre
    query[0] = False
    q, c = tanimoto.words(pack_bits(query), 512), tanimoto.words(pack_bits(centres), 512)
    got = tanimoto.ratio_scores(q, tanimoto.counts(q), tanimoto.transposed(c), tanimoto.counts(c))
    inter = (query.astype(np.int64) @ centres.T.astype(np.int64)).astype(np.float32)
    sums = (
        np.maximum(centres.sum(1), 0.5).astype(np.float32)[None, :]
        + query.sum(1).astype(np.float32)[:, None]
    )
    np.testing.assert_array_equal(got, inter / sums)
    assert got.dtype == np.float32


def test_a_query_is_compared_only_with_the_clusters_it_asks_for() -> None:
    """Three clusters; each query asks for some of them: its answer is the best over exactly
    those clusters' rows, and a cluster nobody asks for is not read."""
    ref, query = ecfp_like(90, 256, seed=5), ecfp_like(12, 256, seed=6)
    members = np.random.default_rng(0).permutation(90)
    starts = np.array([0, 25, 60, 90])
    asks = [(q, g) for q in range(12) for g in (0, 1, 2) if (q + g) % 3]  # two clusters each
    order = sorted(asks, key=lambda pair: pair[1])
    asking = np.array([q for q, _ in order])
    ask_starts = np.searchsorted([g for _, g in order], np.arange(4))
    q, r = tanimoto.words(pack_bits(query), 256), tanimoto.words(pack_bits(ref), 256)
    best = np.zeros(12)
    clusters = np.array([0, 2])  # cluster 1 left out
    tanimoto.best_in_clusters(
        q,
        tanimoto.counts(q),
        r,
        tanimoto.counts(r),
        members,
        starts,
        clusters,
        asking,
        ask_starts,
        best,
    )
    for i in range(12):
        rows = [members[starts[g] : starts[g + 1]] for g in (0, 2) if (i + g) % 3]
        want = brute_force(query[i : i + 1], ref[np.concatenate(rows)])[0] if rows else 0.0
        assert best[i] == want, i


def test_a_range_gives_each_query_its_best_and_the_first_row_reaching_it() -> None:
    """Over rows spanning several of the kernel's blocks, each query's answer is brute force's
    over the range, its row the first that reaches it (duplicates of the best row sit in two
    blocks); a query whose known floor is not beaten keeps it and row -1."""
    n_bits = 512
    ref, query = ecfp_like(2 * tanimoto.RANGE_BLOCK + 300, n_bits, seed=7), ecfp_like(40, n_bits, 8)
    dup = [5, tanimoto.RANGE_BLOCK + 20, 2 * tanimoto.RANGE_BLOCK + 7]
    ref[dup] = query[0]
    lo, hi = 3, len(ref) - 2
    q, r = tanimoto.words(pack_bits(query), n_bits), tanimoto.words(pack_bits(ref), n_bits)
    top, where = np.zeros(40), np.full(40, -1)
    top[1] = 1.0  # a floor nothing beats
    take = np.arange(40)
    tanimoto.best_in_range(
        q, tanimoto.counts(q), tanimoto.transposed(r), tanimoto.counts(r), lo, hi, take, top, where
    )
    inter = query.astype(np.int64) @ ref[lo:hi].T.astype(np.int64)
    union = query.sum(1)[:, None] + ref[lo:hi].sum(1)[None, :] - inter
    sims = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    others = np.delete(np.arange(40), 1)
    np.testing.assert_array_equal(top[others], sims[others].max(axis=1))
    np.testing.assert_array_equal(where[others], lo + sims[others].argmax(axis=1))
    assert where[0] == dup[0] and top[0] == 1.0  # the first of the three copies of query 0
    assert (top[1], where[1]) == (1.0, -1)


def test_a_kernel_numba_cannot_cache_is_compiled_without_the_cache() -> None:
    """numba refuses `cache=True` where it finds no folder to cache in (a function without a
    source file stands in for a read-only install here); the kernel still compiles and runs."""
    namespace: dict[str, object] = {}
    exec("def add_one(x):\n    return x + 1\n", namespace)  # no file: no cache locator
    kernel = tanimoto.compiled(namespace["add_one"])
    assert kernel(41) == 42
