"""Applicability domain: NN Tanimoto on Morgan bits against RDKit and brute force, the
threshold, the clustered search, the blob."""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
import pytest
import torch
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from tests.conftest import traced_peak
from toxmodel import domain as domain_module
from toxmodel import tanimoto
from toxmodel.checkpoint import _plain
from toxmodel.domain import (
    DOMAIN_PERCENTILE,
    Domain,
    fit_domain,
    nearest_similarity,
    pack_bits,
    threshold_rows,
)
from toxmodel.featurize import FeaturizerConfig, featurize

TRAIN = [
    "CCO",
    "CCCO",
    "CCCCO",
    "CC(=O)O",
    "CCN",
    "c1ccccc1",
    "c1ccccc1O",
    "c1ccccc1N",
    "Cc1ccccc1",
    "c1ccncc1",
    "CC(C)CO",
    "OCCO",
]
VALID = ["CCCCCO", "c1ccccc1Cl", "CC(=O)OC", "Oc1ccncc1", "CCCN", "NCCO"]
QUERIES = ["CCCCCCO", "c1ccc(O)cc1C", "O=C(O)c1ccccc1", "C1CCCCC1", "[Na+].[Cl-]", "FC(F)(F)F"]


def rdkit_nn(queries: list[str], train: list[str], radius: int, n_bits: int) -> np.ndarray:
    """The reference: RDKit's own Morgan bit vectors and BulkTanimotoSimilarity, max per query."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    train_fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in train]
    return np.array(
        [
            max(
                DataStructs.BulkTanimotoSimilarity(
                    gen.GetFingerprint(Chem.MolFromSmiles(q)), train_fps
                )
            )
            for q in queries
        ]
    )


@pytest.mark.parametrize(
    "config",
    [
        FeaturizerConfig(radius=2, n_bits=256),
        FeaturizerConfig(radius=1, n_bits=128, counts=True, maccs=True),  # counts > 0 are on
    ],
)
def test_nearest_similarity_equals_rdkit_bulk_tanimoto(config: FeaturizerConfig) -> None:
    train = featurize(TRAIN, config, n_jobs=1).fingerprint
    query = featurize(QUERIES, config, n_jobs=1).fingerprint
    domain = fit_domain(train, train[:0], config.n_bits)
    want = rdkit_nn(QUERIES, TRAIN, config.radius, config.n_bits)
    np.testing.assert_allclose(domain.similarity(query), want, rtol=0, atol=1e-12)
    assert len(set(np.round(want, 6))) > 3  # the molecules are not all alike


def test_a_training_molecule_is_in_domain_and_an_unrelated_one_is_not() -> None:
    config = FeaturizerConfig(n_bits=2048, maccs=True)
    train = featurize(TRAIN, config, n_jobs=1).fingerprint
    valid = featurize(VALID, config, n_jobs=1).fingerprint
    domain = fit_domain(train, valid, config.n_bits)
    query = featurize(["c1ccccc1O", "[Na+].[Cl-]", "FC(F)(F)F"], config, n_jobs=1).fingerprint
    sims = domain.similarity(query)
    assert sims[0] == 1.0  # in the training set: its own neighbour
    assert sims[1] < 0.2 and sims[2] < 0.2  # nothing alike in training
    assert domain.in_domain(sims).tolist() == [True, False, False]


def test_threshold_is_the_validation_percentile_of_nn_similarity_to_train() -> None:
    config = FeaturizerConfig(n_bits=512)
    train = featurize(TRAIN, config, n_jobs=1).fingerprint
    valid = featurize(VALID, config, n_jobs=1).fingerprint
    domain = fit_domain(train, valid, config.n_bits)
    want = np.percentile(rdkit_nn(VALID, TRAIN, 2, 512), DOMAIN_PERCENTILE)
    assert domain.threshold == pytest.approx(want, abs=1e-12)
    assert 0.0 < domain.threshold < 1.0 and domain.n_valid == len(VALID)
    in_valid = domain.in_domain(domain.similarity(valid))
    assert in_valid.sum() == len(VALID) - 1  # 10th percentile of 6: one falls below
    assert domain.n_train == len(TRAIN)
    twice = fit_domain(np.concatenate([train, train]), valid, config.n_bits)
    assert twice.n_train == len(TRAIN)  # duplicate fingerprints are stored once


def test_chunks_do_not_change_the_answer() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((50, 64)) < 0.2
    query = rng.random((37, 64)) < 0.2
    query[0] = False  # an empty fingerprint: similarity 0, not NaN
    whole = nearest_similarity(query, ref)
    inter = (query[:, None, :] & ref[None]).sum(-1)
    union = (query[:, None, :] | ref[None]).sum(-1)
    brute = np.where(union > 0, inter / np.maximum(union, 1), 0.0).max(1)
    np.testing.assert_allclose(whole, brute, atol=1e-12)
    np.testing.assert_array_equal(nearest_similarity(query, ref, chunk_pairs=60), whole)
    assert whole[0] == 0.0


def test_packed_bits_and_blob_round_trip() -> None:
    rng = np.random.default_rng(1)
    bits = rng.random((9, 13)) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.shape == (9, 2)
    unpacked = np.unpackbits(packed, axis=1, count=13, bitorder="little").astype(bool)
    np.testing.assert_array_equal(unpacked, bits)
    fp = (rng.random((20, 40)) < 0.3).astype(np.uint8)
    domain = fit_domain(fp[:15], fp[15:], 40)
    again = Domain.from_blob(domain.to_blob())
    np.testing.assert_array_equal(again.train_packed, domain.train_packed)
    assert (again.threshold, again.n_bits, again.n_valid) == (domain.threshold, 40, 5)
    np.testing.assert_array_equal(again.similarity(fp), domain.similarity(fp))
    with pytest.raises(ValueError, match="uint8"):
        Domain.from_blob({**domain.to_blob(), "n_bits": 64})


# ---------------------------------------------------------------------------------------------
# The exact search against brute force; the clustered search against the exact one


def brute_force(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """max over reference rows of |a & b| / |a | b| (0 for two empty rows), all pairs."""
    q, r = query.astype(np.int64), reference.astype(np.int64)
    inter = q @ r.T
    union = q.sum(1)[:, None] + r.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0).max(axis=1)


def ecfp_like(n: int, n_bits: int, seed: int) -> np.ndarray:
    """Sparse rows like Morgan bits: a few bits in most rows, a long tail of rare ones, and
    series of close analogues (a parent with bits dropped and added)."""
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, n_bits + 1)
    weight = rng.permutation(weight / weight.sum())
    parents = np.zeros((max(1, n // 8), n_bits), dtype=bool)
    for row in parents:
        row[rng.choice(n_bits, size=rng.integers(5, 40), p=weight)] = True
    out = parents[rng.integers(0, len(parents), n)] & (rng.random((n, n_bits)) > 0.2)
    for row in out:
        row[rng.choice(n_bits, size=rng.integers(0, 6), p=weight)] = True
    return out


@pytest.mark.parametrize("n_bits", [1, 7, 64, 65, 200, 1024])
def test_exact_search_equals_brute_force_on_random_rows(n_bits: int) -> None:
    rng = np.random.default_rng(n_bits)
    for density in (0.02, 0.3, 0.9):
        ref = rng.random((97, n_bits)) < density
        query = rng.random((41, n_bits)) < density
        ref[3] = False  # an empty training row
        ref[4] = ref[5]  # a duplicate
        query[0] = False  # an empty query: 0
        query[1] = ref[7]  # a training row: 1 (unless empty)
        want = brute_force(query, ref)
        for chunk_pairs in (7, 300, domain_module.CHUNK_PAIRS):
            got = nearest_similarity(query, ref, chunk_pairs=chunk_pairs)
            np.testing.assert_array_equal(got, want)  # bit for bit: same integers, same division
        assert want[0] == 0.0


def test_exact_search_equals_brute_force_on_ecfp_like_rows_with_ties() -> None:
    ref = ecfp_like(3000, 1024, seed=0)
    query = np.concatenate([ecfp_like(400, 1024, seed=1), ref[:50], np.zeros((2, 1024), bool)])
    want = brute_force(query, ref)
    got = nearest_similarity(query, ref)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[400:450] == 1.0) and np.all(got[-2:] == 0.0)
    # many queries share their maximum with several training rows (ties), and counts vary
    q, r = query[:400].astype(np.int64), ref.astype(np.int64)
    inter = q @ r.T
    sims = inter / (q.sum(1)[:, None] + r.sum(1)[None, :] - inter)
    assert np.mean((sims == sims.max(1, keepdims=True)).sum(1) > 1) > 0.05
    assert np.ptp(ref.sum(1)) > 20


def test_the_exact_domain_answers_as_brute_force_and_writes_the_old_blob() -> None:
    train, valid = ecfp_like(600, 256, seed=3), ecfp_like(100, 256, seed=4)
    domain = fit_domain(train, valid, 256)
    assert domain.search == "exact"
    assert domain.threshold == np.percentile(brute_force(valid, train), DOMAIN_PERCENTILE)
    np.testing.assert_array_equal(domain.similarity(valid), brute_force(valid, train))
    assert set(domain.to_blob()) == {"train_bits", "n_bits", "threshold", "percentile", "n_valid"}


def test_a_domain_saved_before_the_clustered_search_loads_and_answers_exactly() -> None:
    """The blob today's code wrote before this change: np.unique rows, five keys."""
    train, query = ecfp_like(300, 128, seed=5), ecfp_like(60, 128, seed=6)
    old_blob = {
        "train_bits": torch.from_numpy(np.unique(pack_bits(train), axis=0)),
        "n_bits": 128,
        "threshold": 0.25,
        "percentile": 10.0,
        "n_valid": 40,
    }
    domain = Domain.from_blob(old_blob)
    assert domain.search == "exact" and domain.threshold == 0.25
    np.testing.assert_array_equal(domain.similarity(query), brute_force(query, train))


def test_clustered_search_never_exceeds_exact_and_probing_everything_is_exact() -> None:
    train, query = ecfp_like(4000, 512, seed=7), ecfp_like(600, 512, seed=8)
    exact = brute_force(query, train)
    domain = fit_domain(train, query[:0], 512, search="clustered", n_clusters=40)
    assert domain.search == "clustered"
    assert domain.centres is not None and domain.centres.shape == (
        domain_module.N_PARTITIONS,
        40,
    )
    approx = domain.similarity(query)
    assert np.all(approx <= exact)  # always the similarity of a real training row
    assert np.mean(approx == exact) > 0.5  # (the benchmark measures the error at scale)
    np.testing.assert_array_equal(domain.similarity(query, exact=True), exact)
    domain.n_probe = 40  # every cluster of every partition: the exact answer
    np.testing.assert_array_equal(domain.similarity(query), exact)
    # a training molecule probes its own cluster (its centre is the most similar one) unless
    # n_probe other centres tie with it
    assert np.mean(domain.similarity(train[:300]) == 1.0) > 0.99


@pytest.mark.parametrize("n_bits", [100, 2048, 4096])
def test_probing_every_cluster_is_exact_at_any_width(n_bits: int) -> None:
    """The clustered search's compiled kernels (rows as 64-bit words, fractions compared as
    integers) give brute force's answer bit for bit, also for widths that are not whole bytes
    or words."""
    train, query = ecfp_like(1500, n_bits, seed=21), ecfp_like(300, n_bits, seed=22)
    query[:20] = train[:20]  # similarity 1
    exact = brute_force(query, train)
    domain = fit_domain(train, query[:0], n_bits, search="clustered", n_clusters=12, n_probe=12)
    np.testing.assert_array_equal(domain.similarity(query), exact)


def test_many_queries_on_one_small_cluster_hold_no_pairs_in_memory() -> None:
    """Three clusters of about 100 rows, 6,000 queries probing each: the kernels hold a
    cluster's rows and one row of counts per query, never a queries x members block (the
    sparse product's tiles peaked at 27 MB here, whole-cluster tiles at 97 MB)."""
    train, query = ecfp_like(300, 1024, seed=23), ecfp_like(6000, 1024, seed=24)
    domain = fit_domain(
        train, query[:0], 1024, search="clustered", n_clusters=3, n_probe=3, n_partitions=1
    )
    domain.similarity(query[:10])  # builds the index outside the measurement
    got, peak = traced_peak(lambda: domain.similarity(query))
    np.testing.assert_array_equal(got, brute_force(query, train))
    assert peak < 12 * 2**20, peak  # 7.3 MB measured: packing a slice of the boolean rows


def test_the_clustered_search_never_holds_the_queries_as_booleans() -> None:
    """The queries are packed a slice at a time (8 bits a byte): 40,000 rows of 1,024 bits
    would be a 41 MB boolean copy."""
    train, valid = ecfp_like(2000, 1024, seed=25), ecfp_like(200, 1024, seed=26)
    query = ecfp_like(40_000, 1024, seed=27).view(np.uint8)  # as featurize gives them
    domain = fit_domain(train, valid, 1024, search="clustered", n_clusters=40)
    want = domain.similarity(query[:500])  # builds the index outside the measurement
    got, peak = traced_peak(lambda: domain.similarity(query))
    np.testing.assert_array_equal(got[:500], want)
    assert peak < 60 * 2**20, peak  # 42 MB measured; 84 MB with the boolean copy


def test_the_clusters_a_query_probes_are_its_most_similar_centres() -> None:
    """`_top` gives the k largest per row, largest first, the lowest index among ties: what
    a stable descending sort gives."""
    rng = np.random.default_rng(5)
    values = rng.integers(0, 6, size=(50, 3, 40)).astype(float)  # many ties
    want = np.argsort(-values, axis=-1, kind="stable")[..., :4]
    np.testing.assert_array_equal(domain_module._top(values.copy(), 4), want)
    # above TOP_PASSES (argpartition): the k largest, largest first; ties in any order
    k = domain_module.TOP_PASSES + 4
    got = domain_module._top(values.copy(), k)
    want = np.argsort(-values, axis=-1, kind="stable")[..., :k]
    np.testing.assert_array_equal(
        np.take_along_axis(values, got, axis=-1), np.take_along_axis(values, want, axis=-1)
    )
    assert all(len(set(row)) == k for row in got.reshape(-1, k))
    distinct = rng.permutation(50 * 3 * 40).reshape(50, 3, 40).astype(float)
    want = np.argsort(-distinct, axis=-1)[..., :k]
    np.testing.assert_array_equal(domain_module._top(distinct.copy(), k), want)


def test_threads_split_the_work_and_change_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 3 threads the partitions, the threshold and every search (exact, clustered,
    certified) give what one thread gives, bit for bit, and the work ran in several threads."""
    monkeypatch.setattr(domain_module, "THREAD_MIN_ROWS", 64)
    monkeypatch.setattr(domain_module, "PARTITION_ROWS", 500)
    train, valid = ecfp_like(3000, 256, seed=21), ecfp_like(400, 256, seed=22)
    query = ecfp_like(700, 256, seed=23)
    seen: set[int] = set()
    for name in ("_exact_nearest", "_clustered_nearest"):
        real = getattr(domain_module, name)

        def spy(*args: object, _real: Any = real, **kw: object) -> Any:
            seen.add(threading.get_ident())
            return _real(*args, **kw)

        monkeypatch.setattr(domain_module, name, spy)
    kw = {"search": "clustered", "n_clusters": 30, "n_probe": 2}
    one, three = (
        fit_domain(train, valid, 256, workers=1, **kw),
        fit_domain(train, valid, 256, workers=3, **kw),
    )
    for field in ("cluster_rows", "cluster_starts", "centres"):
        np.testing.assert_array_equal(getattr(one, field), getattr(three, field))
    assert one.threshold == three.threshold
    assert one.threshold == np.percentile(brute_force(valid, train), DOMAIN_PERCENTILE)
    seen.clear()
    for args in ({}, {"exact": True}, {"certify": True}):
        want = one.similarity(query, workers=1, **args)
        np.testing.assert_array_equal(three.similarity(query, workers=3, **args), want)
    np.testing.assert_array_equal(one.similarity(query, exact=True), brute_force(query, train))
    assert len(seen) > 1, "the searches ran in one thread"
    with pytest.raises(ValueError, match="workers"):
        one.similarity(query, workers=0)


def test_auto_search_clusters_above_exact_max_train(monkeypatch: pytest.MonkeyPatch) -> None:
    train, valid = ecfp_like(700, 256, seed=9), ecfp_like(150, 256, seed=10)
    monkeypatch.setattr(domain_module, "EXACT_MAX_TRAIN", 10_000)
    assert fit_domain(train, valid, 256).search == "exact"
    monkeypatch.setattr(domain_module, "EXACT_MAX_TRAIN", 100)
    domain = fit_domain(train, valid, 256)
    assert domain.search == "clustered" and domain.n_probe == domain_module.N_PROBE
    # the threshold comes from the exact search, whatever search the domain answers with
    assert domain.threshold == np.percentile(brute_force(valid, train), DOMAIN_PERCENTILE)
    assert np.all(domain.similarity(valid) <= brute_force(valid, train))
    again = fit_domain(train, valid, 256)  # seeded: the same clusters
    np.testing.assert_array_equal(again.cluster_rows, domain.cluster_rows)
    with pytest.raises(ValueError, match="search"):
        fit_domain(train, valid, 256, search="fast")


def test_clustered_domain_travels_in_a_weights_only_blob() -> None:
    train, valid = ecfp_like(900, 128, seed=11), ecfp_like(100, 128, seed=12)
    domain = fit_domain(train, valid, 128, search="clustered", n_clusters=12)
    buffer = io.BytesIO()
    torch.save(_plain(domain.to_blob(), "domain"), buffer)
    buffer.seek(0)
    again = Domain.from_blob(torch.load(buffer, weights_only=True))
    assert again.search == "clustered" and again.threshold == domain.threshold
    assert again.n_probe == domain.n_probe and again.n_probe_low == domain.n_probe_low
    np.testing.assert_array_equal(again.similarity(valid), domain.similarity(valid))
    blob = domain.to_blob()
    assert blob["low_partitions"] == domain_module.LOW_PARTITIONS == again.low_partitions
    # saved before the second pass existed: it gets today's second pass over the same index
    older = Domain.from_blob(
        {k: v for k, v in blob.items() if k not in ("n_probe_low", "low_partitions")}
    )
    assert older.n_probe_low == domain_module.N_PROBE_LOW
    assert older.low_partitions == domain_module.LOW_PARTITIONS
    # saved with a second pass over every partition: it keeps that pass
    every = Domain.from_blob({k: v for k, v in blob.items() if k != "low_partitions"})
    assert every.n_probe_low == domain.n_probe_low and every.low_partitions == 0
    with pytest.raises(ValueError, match="low_partitions"):
        Domain.from_blob({**blob, "low_partitions": -1})
    bad_starts = blob["cluster_starts"].copy()
    bad_starts[0, 1] = bad_starts[0, 0]  # an empty cluster
    with pytest.raises(ValueError, match="cluster"):
        Domain.from_blob({**blob, "cluster_starts": bad_starts})
    rows = blob["cluster_rows"].copy()
    rows[0, 0] = rows[0, 1]  # not a permutation
    with pytest.raises(ValueError, match="permutation"):
        Domain.from_blob({**blob, "cluster_rows": rows})


def test_certified_clustered_flags_equal_the_exact_flags() -> None:
    """A clustered answer below the threshold is re-checked exactly; one at or above it is a
    real training row's similarity, so the flag is right either way."""
    train, valid = ecfp_like(3000, 256, seed=13), ecfp_like(300, 256, seed=14)
    query = np.concatenate([ecfp_like(500, 256, seed=15), ecfp_like(100, 256, seed=99)])
    domain = fit_domain(
        train, valid, 256, search="clustered", n_clusters=40, n_probe=1, n_probe_low=0
    )
    exact = brute_force(query, train)
    plain = domain.similarity(query)
    certified = domain.similarity(query, certify=True)
    want = exact >= domain.threshold
    assert np.any(domain.in_domain(plain) != want)  # one probe misses some neighbours
    np.testing.assert_array_equal(domain.in_domain(certified), want)
    low = certified < domain.threshold
    np.testing.assert_array_equal(certified[low], exact[low])  # below: the exact answer
    assert np.all(certified <= exact) and np.all(certified >= plain)
    above = plain >= domain.threshold
    np.testing.assert_array_equal(certified[above], plain[above])  # left as it was
    np.testing.assert_array_equal(certified[~above], exact[~above])  # re-checked: exact


def test_answers_below_the_threshold_probe_further_and_only_they_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second pass (n_probe_low clusters a partition) looks again only where the first
    answer is below the threshold (by at most LOW_BAND): those answers can only rise towards
    the exact one, the rest stay as they were, and a second pass over every cluster gives the
    exact flags."""
    monkeypatch.setattr(domain_module, "LOW_BAND", 1.0)  # every answer below the threshold
    train, valid = ecfp_like(3000, 256, seed=13), ecfp_like(300, 256, seed=14)
    query = np.concatenate([ecfp_like(500, 256, seed=15), ecfp_like(100, 256, seed=99)])
    exact = brute_force(query, train)
    kw = {"search": "clustered", "n_clusters": 40, "n_probe": 1}
    first = fit_domain(train, valid, 256, n_probe_low=0, **kw)
    plain = first.similarity(query)
    want = exact >= first.threshold
    wrong = np.sum(first.in_domain(plain) != want)
    assert wrong > 0  # one probe misses some neighbours
    for n_probe_low, exact_flags in ((8, False), (40, True)):
        domain = fit_domain(train, valid, 256, n_probe_low=n_probe_low, **kw)
        assert domain.n_probe_low == n_probe_low and domain.threshold == first.threshold
        again = domain.similarity(query)
        above = plain >= domain.threshold
        np.testing.assert_array_equal(again[above], plain[above])  # not looked at again
        assert np.all(again >= plain) and np.all(again <= exact)
        assert np.sum(domain.in_domain(again) != want) < wrong
        if exact_flags:
            np.testing.assert_array_equal(domain.in_domain(again), want)
            np.testing.assert_array_equal(again[~above], exact[~above])
        blob = Domain.from_blob(domain.to_blob())
        assert blob.n_probe_low == n_probe_low
        np.testing.assert_array_equal(blob.similarity(query), again)
    # answers further below the threshold than LOW_BAND: far from every training molecule,
    # out of domain whatever the first pass missed; left as they were
    monkeypatch.setattr(domain_module, "LOW_BAND", 0.02)
    banded = domain.similarity(query)
    far = plain < domain.threshold - 0.02
    near = (plain < domain.threshold) & ~far
    assert far.any() and near.any()
    np.testing.assert_array_equal(banded[far], plain[far])
    np.testing.assert_array_equal(banded[near], exact[near])  # every cluster: exact
    with pytest.raises(ValueError, match="n_probe_low"):
        fit_domain(train, valid, 256, n_probe_low=-1, **kw)
    with pytest.raises(ValueError, match="low_partitions"):
        fit_domain(train, valid, 256, low_partitions=-1, **kw)


@pytest.mark.parametrize("low_partitions", [1, 2, 0])
def test_a_second_pass_over_every_cluster_of_fewer_partitions_is_exact(
    monkeypatch: pytest.MonkeyPatch, low_partitions: int
) -> None:
    """The second pass searches the first `low_partitions` partitions (0: all) deeper; probing
    every cluster of even one partition gives the exact answer below the threshold, the first
    pass's clusters included (their indices are not known to the second pass)."""
    monkeypatch.setattr(domain_module, "LOW_BAND", 1.0)
    train, valid = ecfp_like(3000, 256, seed=13), ecfp_like(300, 256, seed=14)
    query = np.concatenate([ecfp_like(500, 256, seed=15), ecfp_like(100, 256, seed=99)])
    exact = brute_force(query, train)
    kw = {"search": "clustered", "n_clusters": 40, "n_probe": 1, "n_partitions": 4}
    plain = fit_domain(train, valid, 256, n_probe_low=0, **kw).similarity(query)
    domain = fit_domain(train, valid, 256, n_probe_low=40, low_partitions=low_partitions, **kw)
    assert domain.low_partitions == low_partitions
    again = domain.similarity(query)
    below = plain < domain.threshold
    np.testing.assert_array_equal(again[below], exact[below])
    np.testing.assert_array_equal(again[~below], plain[~below])
    assert Domain.from_blob(domain.to_blob()).low_partitions == low_partitions


def test_threshold_on_a_validation_sample_is_the_exact_percentile_of_that_sample() -> None:
    train, valid = ecfp_like(800, 256, seed=16), ecfp_like(300, 256, seed=17)
    exact = brute_force(valid, train)
    whole = fit_domain(train, valid, 256, valid_sample=None)
    assert whole.threshold == np.percentile(exact, DOMAIN_PERCENTILE) and whole.n_valid == 300
    assert fit_domain(train, valid, 256, valid_sample=300).threshold == whole.threshold
    sampled = fit_domain(train, valid, 256, valid_sample=120, seed=4)
    rows = threshold_rows(300, 120, seed=4)
    assert len(np.unique(rows)) == 120 and sampled.n_valid == 120
    assert sampled.threshold == np.percentile(exact[rows], DOMAIN_PERCENTILE)
    assert fit_domain(train, valid, 256, valid_sample=120, seed=4).threshold == sampled.threshold
    with pytest.raises(ValueError, match="valid_sample"):
        fit_domain(train, valid, 256, valid_sample=0)


def test_a_clustered_threshold_by_its_own_search_is_what_toxtune_did_before() -> None:
    train, valid = ecfp_like(3000, 256, seed=18), ecfp_like(400, 256, seed=19)
    old = fit_domain(  # before: no second pass either
        train,
        valid,
        256,
        search="clustered",
        n_clusters=40,
        n_probe=1,
        n_probe_low=0,
        threshold_search="domain",
    )
    assert old.threshold == np.percentile(old.similarity(valid), DOMAIN_PERCENTILE)
    new = fit_domain(train, valid, 256, search="clustered", n_clusters=40, n_probe=1)
    assert new.threshold == np.percentile(brute_force(valid, train), DOMAIN_PERCENTILE)
    assert old.threshold <= new.threshold  # lower bounds give a lower percentile
    with pytest.raises(ValueError, match="threshold_search"):
        fit_domain(train, valid, 256, threshold_search="fast")


def test_training_rows_chosen_by_index_give_the_domain_of_those_rows() -> None:
    """finalize passes the whole feature matrix and the training rows' indices (no 1.6 GB copy
    at 10^6 molecules); the domain must be the one of exactly those rows."""
    rng = np.random.default_rng(3)
    fingerprint = (rng.random((300, 64)) < 0.2).astype(np.uint8)
    rows = rng.permutation(300)[:200]
    valid = fingerprint[:40]
    by_index = fit_domain(fingerprint, valid, n_bits=64, train_rows=rows)
    copied = fit_domain(fingerprint[rows], valid, n_bits=64)
    assert by_index.n_train == copied.n_train
    assert by_index.threshold == copied.threshold
    queries = (rng.random((50, 64)) < 0.2).astype(np.uint8)
    np.testing.assert_array_equal(by_index.similarity(queries), copied.similarity(queries))
    whole = fit_domain(fingerprint, valid, n_bits=64)
    assert whole.n_train > by_index.n_train  # the index really selects


@pytest.mark.parametrize("block", [1, 7, 64, 8192])
def test_the_searched_words_are_the_rows_words_transposed_block_by_block(block: int) -> None:
    """The exact search's layout (words transposed, rows in a given order) built `block` rows
    at a time equals the whole rows' words transposed, for empty rows and an empty set too."""
    bits = ecfp_like(300, 200, seed=5)
    bits[[0, 17, 299]] = False  # empty rows, one of them last
    packed = pack_bits(bits)
    order = np.random.default_rng(0).permutation(300)
    got = tanimoto.transposed_words(packed, 200, order, block=block)
    want = np.ascontiguousarray(tanimoto.words(packed[order], 200).T)
    assert got.dtype == np.uint64 and got.shape == (4, 300) and got.flags.c_contiguous
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        tanimoto.transposed_words(packed, 200, block=block), tanimoto.words(packed, 200).T
    )
    assert tanimoto.transposed_words(packed[:0], 200, block=block).shape == (4, 0)


def test_building_the_searched_words_holds_the_result_and_one_block() -> None:
    """The transposed words are built a block at a time (tracemalloc sees numpy's buffers, so
    the figure is exact, not timed): no whole copy of the rows in the other layout beside them
    (0.1 GB at 782,000 rows of 1024 bits)."""
    packed = pack_bits(ecfp_like(20_000, 1024, seed=6))
    block = 50
    words, peak = traced_peak(lambda: tanimoto.transposed_words(packed, 1024, block=block))
    assert peak < words.nbytes + 4 * block * 128, (peak, words.nbytes)


def test_a_domain_whose_file_set_the_last_bytes_spare_bits_answers_as_a_clean_one() -> None:
    """203 bits take 26 bytes, 5 bits of the last one spare: a domain read from a file with
    those bits set answers as one with them clear, by either search."""
    train, query = ecfp_like(400, 203, seed=7), ecfp_like(100, 203, seed=8)
    clean = fit_domain(train, query[:0], 203, search="clustered", n_clusters=8)
    dirty_bits = clean.train_packed.copy()
    dirty_bits[::3, -1] |= 0b11111000
    dirty = Domain.from_blob({**clean.to_blob(), "train_bits": dirty_bits})
    want = brute_force(query, train)
    np.testing.assert_array_equal(dirty.similarity(query, exact=True), want)
    dirty.n_probe = 8  # every cluster: the exact answer
    np.testing.assert_array_equal(dirty.similarity(query), want)


def test_the_distinct_rows_are_np_uniques_ordered_by_bit_count_with_one_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What fit_domain stores: every distinct row once, by bit count, ties in byte order (as
    np.unique then a stable sort by count gave), also from a non-contiguous array; built with
    one copy of the distinct rows beside the sorted input (np.unique held three)."""
    bits = ecfp_like(6000, 1024, seed=40)
    bits[3000:] = bits[:3000]  # every row twice
    bits[10] = False  # an empty row
    packed = pack_bits(bits)
    unique = np.unique(packed, axis=0)
    want = unique[np.argsort(np.bitwise_count(unique).sum(axis=1), kind="stable")]
    wide = np.zeros((len(packed), 2 * packed.shape[1]), np.uint8)
    wide[:, ::2] = packed
    got = domain_module._distinct_rows_by_count(wide[:, ::2], 1024)  # not contiguous
    np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(41)
    shuffled = packed[rng.permutation(len(packed))]
    monkeypatch.setattr(domain_module, "PACK_ROWS", 256)  # bit counts a slice at a time
    got, peak = traced_peak(lambda: domain_module._distinct_rows_by_count(shuffled, 1024))
    np.testing.assert_array_equal(got, want)
    assert peak < 1.6 * got.nbytes, (peak, got.nbytes)  # np.unique's copies: about 3x
    assert len(domain_module._distinct_rows_by_count(packed[:0], 1024)) == 0


def test_a_fitted_domain_keeps_no_search_structures_and_answers_alike_after() -> None:
    """fit_domain returns the domain without the words and partitions' centres its search
    built (a job saves it next: 0.3 GB at 10^6 molecules); the first query builds them again
    and answers as the search inside fit_domain did."""
    train, valid = ecfp_like(3000, 512, seed=42), ecfp_like(300, 512, seed=43)
    domain = fit_domain(train, valid, 512, search="clustered", n_clusters=20)
    assert not {"_exact", "_words", "_clusters"} & set(vars(domain))
    sims = domain.similarity(valid)
    assert {"_words", "_clusters"} <= set(vars(domain))  # built again by the query
    domain.drop_search()
    np.testing.assert_array_equal(domain.similarity(valid), sims)
    exact = domain.similarity(valid, exact=True, certify=False)
    assert domain.threshold == float(np.percentile(exact, domain.percentile))


def test_a_fitted_domain_keeps_its_rows_by_bit_count_and_any_order_answers_exactly() -> None:
    """The exact search scans rows sorted by bit count; a domain fitted today stores them so,
    and the search reads them in that order. A domain saved with its rows in another order
    still answers exactly, from a sorted copy."""
    train, query = ecfp_like(800, 256, seed=31), ecfp_like(120, 256, seed=32)
    domain = fit_domain(train, query[:0], 256, search="exact")
    counts = np.bitwise_count(domain.train_packed).sum(axis=1)
    assert np.all(np.diff(counts) >= 0) and counts[0] < counts[-1]
    np.testing.assert_array_equal(domain._exact.words_t, tanimoto.words(domain.train_packed, 256).T)
    np.testing.assert_array_equal(domain.similarity(query), brute_force(query, train))
    shuffled = Domain.from_blob(
        {**domain.to_blob(), "train_bits": domain.train_packed[::-1].copy()}
    )
    assert np.all(np.diff(shuffled._exact.counts) >= 0)
    np.testing.assert_array_equal(shuffled.similarity(query), brute_force(query, train))


def test_the_clustered_search_on_real_molecules_agrees_with_brute_force(tox21_path) -> None:
    """Tox21 molecules, 1,024 Morgan bits, 2,000 training rows, default partitions and probes:
    no answer exceeds brute force, the flags agree with the exact flags on >= 99 % of 800
    queries (the stated error; the scale benchmarks measure it at 10^6), certified flags on
    all of them, and probing every cluster is brute force bit for bit."""
    import pandas as pd

    smiles = pd.read_csv(tox21_path, usecols=["smiles"])["smiles"].tolist()[:3100]
    fingerprint = featurize(smiles, FeaturizerConfig(n_bits=1024), n_jobs=1).fingerprint
    train, valid, query = fingerprint[:2000], fingerprint[2000:2300], fingerprint[2300:]
    domain = fit_domain(train, valid, 1024, search="clustered")
    exact = brute_force(query, train)
    approx = domain.similarity(query)
    assert np.all(approx <= exact)
    want = exact >= domain.threshold
    assert np.mean(domain.in_domain(approx) == want) >= 0.99
    np.testing.assert_array_equal(domain.in_domain(domain.similarity(query, certify=True)), want)
    domain.n_probe = domain.centres.shape[1]  # every cluster of every partition
    np.testing.assert_array_equal(domain.similarity(query), exact)
    assert 0.05 < np.mean(want) < 0.95  # the queries are on both sides of the threshold
