"""Synthetic data for the model, training and checkpoint tests: bits whose labels follow rules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toxmodel.featurize import Features, FeaturizerConfig
from toxmodel.split import Split

TASKS = ["and01", "or23", "xor45"]


@dataclass
class Synthetic:
    """Features, aligned labels (NaN = missing) and a split."""

    features: Features
    labels: np.ndarray
    split: Split
    tasks: list[str]


def make_features(fingerprint: np.ndarray, descriptors: np.ndarray | None = None) -> Features:
    """A `Features` built straight from arrays (no RDKit)."""
    n = fingerprint.shape[0]
    if descriptors is None:
        descriptors = np.zeros((n, 0), dtype=np.float32)
    return Features(
        fingerprint=fingerprint.astype(np.uint8),
        descriptors=descriptors.astype(np.float32),
        valid_rows=np.arange(n, dtype=np.int64),
        invalid=[],
        config=FeaturizerConfig(n_bits=fingerprint.shape[1]),
    )


def rule_labels(fp: np.ndarray) -> np.ndarray:
    """Task 0 = bit0 AND bit1, task 1 = bit2 OR bit3, task 2 = bit4 XOR bit5."""
    b = fp.astype(bool)
    return np.stack([b[:, 0] & b[:, 1], b[:, 2] | b[:, 3], b[:, 4] ^ b[:, 5]], 1).astype(np.float32)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Identical parameter and buffer tensors, key by key."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def make_split(n: int, train: float = 0.6, valid: float = 0.2) -> Split:
    a, b = int(n * train), int(n * (train + valid))
    rows = np.arange(n, dtype=np.int64)
    return Split(train=rows[:a], valid=rows[a:b], test=rows[b:])


def synthetic(
    n: int = 800, n_bits: int = 32, missing: float = 0.3, seed: int = 0, shuffle: bool = False
) -> Synthetic:
    """Random bits (p = 0.5) labelled by `rule_labels`, a share of labels hidden as NaN.

    `shuffle=True` permutes the label rows: the control where nothing is learnable.
    """
    rng = np.random.default_rng(seed)
    fp = (rng.random((n, n_bits)) < 0.5).astype(np.uint8)
    labels = rule_labels(fp)
    if shuffle:
        labels = labels[rng.permutation(n)]
    labels[rng.random(labels.shape) < missing] = np.nan
    return Synthetic(make_features(fp), labels, make_split(n), list(TASKS))
