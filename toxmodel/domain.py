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

Lookup: the training bits are stored packed (`np.packbits`, 8 bits a byte) and held as a sparse
CSR matrix once loaded; intersections are one sparse x dense product per chunk of queries
(`CHUNK_PAIRS` similarities at a time bounds memory), union = |a| + |b| - |a & b|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.sparse as sp

DOMAIN_PERCENTILE = 10.0  # threshold = this percentile of validation NN similarity to train
CHUNK_PAIRS = 4_000_000  # query x train pairs at once (three float32 arrays: 48 MB)


def morgan_bits(fingerprint: np.ndarray, n_bits: int) -> np.ndarray:
    """The Morgan part of `Features.fingerprint` as booleans (counts > 0 are on bits)."""
    fp = np.asarray(fingerprint)
    if fp.ndim != 2 or fp.shape[1] < n_bits:
        raise ValueError(f"need a fingerprint of at least {n_bits} columns, got shape {fp.shape}")
    return fp[:, :n_bits] > 0


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Boolean rows -> uint8 bytes, 8 bits a byte, little-endian bit order."""
    return np.packbits(np.asarray(bits, dtype=bool), axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """`pack_bits` undone: boolean rows of `n_bits`."""
    out = np.unpackbits(np.asarray(packed, np.uint8), axis=1, count=n_bits, bitorder="little")
    return out.astype(bool)


def _as_sparse(bits: np.ndarray) -> sp.csr_matrix:
    return sp.csr_matrix(np.asarray(bits, dtype=np.float32))


def nearest_similarity(
    query: np.ndarray, reference: np.ndarray | sp.csr_matrix, chunk_pairs: int = CHUNK_PAIRS
) -> np.ndarray:
    """Max Tanimoto similarity of each boolean query row to any reference row (float64).

    `reference` is boolean rows or their float32 CSR matrix (reused across calls). Two empty
    fingerprints have similarity 0. An empty reference gives NaN.
    """
    q = np.asarray(query, dtype=bool)
    ref = reference if sp.issparse(reference) else _as_sparse(reference)
    if q.ndim != 2 or q.shape[1] != ref.shape[1]:
        raise ValueError(f"query has shape {q.shape}, reference has {ref.shape[1]} bits")
    out = np.full(len(q), np.nan)
    n_ref = ref.shape[0]
    if n_ref == 0 or len(q) == 0:
        return out
    ref_counts = np.asarray(ref.sum(axis=1), dtype=np.float32)  # (n_ref, 1)
    step = max(1, chunk_pairs // n_ref)
    for start in range(0, len(q), step):
        block = q[start : start + step]
        dense = np.asfortranarray(block, dtype=np.float32)  # its transpose is C-ordered
        inter = np.asarray(ref @ dense.T, dtype=np.float32)  # (n_ref, block): exact counts
        union = ref_counts - inter
        union += block.sum(axis=1, dtype=np.float32)[None, :]
        out[start : start + len(block)] = _column_max_ratio(inter, union)
    return out


def _column_max_ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """max over rows of inter / union (0 where union is 0), exact in float64.

    The ratios are compared in float32 (fast); rounding is monotone, so the exact maximum is
    among the entries equal to the float32 maximum, which alone are divided again in float64
    (a column-wise argmax would pick one of them, but is slower along this axis).
    """
    ratio = np.zeros_like(inter)
    np.divide(inter, union, out=ratio, where=union > 0)
    rows, cols = np.nonzero(ratio == ratio.max(axis=0)[None, :])
    num, den = inter[rows, cols].astype(np.float64), union[rows, cols].astype(np.float64)
    exact = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    best = np.full(inter.shape[1], -np.inf)
    np.maximum.at(best, cols, exact)
    return best


@dataclass(eq=False)
class Domain:
    """The training set's Morgan bits (packed) and the in-domain threshold."""

    train_packed: np.ndarray  # uint8 (n_train, ceil(n_bits / 8)), duplicates removed
    n_bits: int
    threshold: float  # in_domain = nn_similarity >= threshold
    percentile: float = DOMAIN_PERCENTILE  # how the threshold was chosen
    n_valid: int = 0  # validation molecules it was chosen on

    @cached_property
    def _reference(self) -> sp.csr_matrix:
        return _as_sparse(unpack_bits(self.train_packed, self.n_bits))

    @property
    def n_train(self) -> int:
        return int(self.train_packed.shape[0])

    def similarity(self, fingerprint: np.ndarray) -> np.ndarray:
        """NN Tanimoto similarity to train of featurized rows (`Features.fingerprint`)."""
        return nearest_similarity(morgan_bits(fingerprint, self.n_bits), self._reference)

    def in_domain(self, similarity: np.ndarray) -> np.ndarray:
        """similarity >= threshold, elementwise (NaN similarity -> False)."""
        return np.asarray(similarity) >= self.threshold

    def to_blob(self) -> dict[str, Any]:
        """Plain numbers and one uint8 array, for a weights_only checkpoint."""
        return {
            "train_bits": np.ascontiguousarray(self.train_packed, dtype=np.uint8),
            "n_bits": int(self.n_bits),
            "threshold": float(self.threshold),
            "percentile": float(self.percentile),
            "n_valid": int(self.n_valid),
        }

    @classmethod
    def from_blob(cls, blob: dict[str, Any]) -> Domain:
        """What `to_blob` wrote (arrays may come back as tensors or numpy arrays)."""
        packed = blob["train_bits"]
        packed = packed.numpy() if hasattr(packed, "numpy") else np.asarray(packed)
        n_bits = int(blob["n_bits"])
        if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != (n_bits + 7) // 8:
            raise ValueError(
                f"domain train_bits must be uint8 (n, {(n_bits + 7) // 8}), "
                f"got {packed.dtype} {tuple(packed.shape)}"
            )
        return cls(
            train_packed=packed,
            n_bits=n_bits,
            threshold=float(blob["threshold"]),
            percentile=float(blob.get("percentile", DOMAIN_PERCENTILE)),
            n_valid=int(blob.get("n_valid", 0)),
        )


def fit_domain(
    train_fingerprint: np.ndarray,
    valid_fingerprint: np.ndarray,
    n_bits: int,
    percentile: float = DOMAIN_PERCENTILE,
) -> Domain:
    """The domain of a model trained on `train_fingerprint` rows (`Features.fingerprint`), its
    threshold the `percentile` of the validation rows' NN similarity to train.

    Without validation rows the threshold is 0 (every valid molecule in domain) and says so by
    `n_valid == 0`.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    train = morgan_bits(train_fingerprint, n_bits)
    if len(train) == 0:
        raise ValueError("the applicability domain needs at least one training molecule")
    packed = np.unique(pack_bits(train), axis=0)
    domain = Domain(packed, n_bits, threshold=0.0, percentile=percentile)
    valid = morgan_bits(valid_fingerprint, n_bits)
    if len(valid):
        sims = nearest_similarity(valid, domain._reference)
        domain.threshold = float(np.percentile(sims, percentile))
        domain.n_valid = len(valid)
    if not math.isfinite(domain.threshold):
        raise ValueError(f"domain threshold is not finite: {domain.threshold}")
    return domain
