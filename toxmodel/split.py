"""Train/validation/test splits: random, stratified by label, Bemis-Murcko scaffold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitConfig:
    """How rows are divided; deterministic for a seed."""

    method: str = "random"  # random | stratified | scaffold
    train: float = 0.8
    valid: float = 0.1
    test: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Split:
    """Disjoint int64 row indices."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
