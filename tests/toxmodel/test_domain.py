"""Applicability domain: NN Tanimoto on Morgan bits against RDKit, the threshold, the blob."""

from __future__ import annotations

import numpy as np
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from toxmodel.domain import (
    DOMAIN_PERCENTILE,
    Domain,
    fit_domain,
    nearest_similarity,
    pack_bits,
    unpack_bits,
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
    np.testing.assert_array_equal(unpack_bits(packed, 13), bits)
    fp = (rng.random((20, 40)) < 0.3).astype(np.uint8)
    domain = fit_domain(fp[:15], fp[15:], 40)
    again = Domain.from_blob(domain.to_blob())
    np.testing.assert_array_equal(again.train_packed, domain.train_packed)
    assert (again.threshold, again.n_bits, again.n_valid) == (domain.threshold, 40, 5)
    np.testing.assert_array_equal(again.similarity(fp), domain.similarity(fp))
    with pytest.raises(ValueError, match="uint8"):
        Domain.from_blob({**domain.to_blob(), "n_bits": 64})
