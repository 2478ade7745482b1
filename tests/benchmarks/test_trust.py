"""benchmarks/trust.py uncertainty: its scoring tells a measure of doubt that tracks the error
from one that does not."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from trust import score_measure

N_ROWS, N_TASKS = 4000, 3


@pytest.fixture
def noisy_predictions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, and predictions pulled away from them by `doubt` (so the error grows with it)."""
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(N_ROWS, N_TASKS)) < 0.3).astype(np.float64)
    doubt = rng.uniform(0, 1.0, y.shape)
    p = np.abs(y - rng.uniform(0, doubt))  # |y - p| is uniform on [0, doubt]
    y[rng.uniform(size=y.shape) < 0.1] = np.nan  # unlabelled cells, as in Tox21
    return y, p, doubt


def test_a_measure_that_tracks_the_error_scores_better_than_noise(noisy_predictions) -> None:
    y, p, doubt = noisy_predictions
    informative = score_measure(y, p, doubt)
    noise = score_measure(y, p, np.random.default_rng(1).uniform(size=doubt.shape))
    assert informative["rho"] > 0.2 > abs(noise["rho"])
    assert informative["brier_confident"] < informative["brier_doubtful"] - 0.05
    assert abs(noise["brier_confident"] - noise["brier_doubtful"]) < 0.01
    assert informative["auc_confident"] > informative["auc_doubtful"] + 0.1
    assert abs(noise["auc_confident"] - noise["auc_doubtful"]) < 0.03
