"""RDKit featurization: Morgan/ECFP bits or counts, MACCS keys, 2D descriptors, cached on disk."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FeaturizerConfig:
    """Which features to compute; the same settings are stored in every checkpoint."""

    radius: int = 2  # Morgan radius (2 = ECFP4)
    n_bits: int = 2048  # Morgan fingerprint length
    counts: bool = False  # Morgan count vector (clipped to 255) instead of bits
    maccs: bool = False  # append the 167 MACCS keys
    descriptors: bool = False  # append RDKit 2D descriptors (float32)
    standardize: bool = False  # keep the largest fragment and clean up before featurizing

    def key(self) -> str:
        """A stable short hash of the settings, used in cache file names."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class InvalidSmiles:
    """One input row that could not be featurized, and why."""

    row: int
    smiles: str
    reason: str


@dataclass
class Features:
    """A featurized table: compact fingerprint bytes plus optional float descriptors."""

    fingerprint: np.ndarray  # uint8 (n_valid, n_fp)
    descriptors: np.ndarray  # float32 (n_valid, n_desc); n_desc may be 0
    valid_rows: np.ndarray  # int64 indices of the input rows that featurized
    invalid: list[InvalidSmiles]
    config: FeaturizerConfig

    @property
    def n_features(self) -> int:
        return int(self.fingerprint.shape[1] + self.descriptors.shape[1])

    def __len__(self) -> int:
        return int(self.fingerprint.shape[0])


@dataclass(frozen=True)
class DescriptorScaler:
    """Robust (median/IQR) scaling fit on training rows only."""

    center: np.ndarray
    scale: np.ndarray
