"""What the README promises for a reproducible search: with one trial at a time, the same job
run twice chooses the same trials, scores them the same and registers the same model."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.tune.conftest import tiny_job
from tune.job import run_job

pytestmark = pytest.mark.slow


def test_one_trial_at_a_time_gives_the_same_search_twice(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    results = []
    for run in ("first", "second"):
        job = tiny_job(
            tmp_path / run,
            small_csv,
            **{"search.max_concurrent": 1, "search.num_samples": 4, "search.ensemble": 2},
        )
        results.append(run_job(job, progress=False))
    first, second = results
    # Everything but ids, clocks and places: scores, epochs, statuses and every setting.
    varying = ("trial_id", "seconds", "time", "_at", "date", "node", "host", "pid", "ip", "logdir")
    varying += ("path", "experiment_tag", "checkpoint")
    columns = [c for c in first.trials.columns if not any(v in c for v in varying)]
    assert {"val_roc_auc", "lr", "status"} <= set(columns), list(first.trials.columns)
    pd.testing.assert_frame_equal(
        first.trials[columns].reset_index(drop=True),
        second.trials[columns].reset_index(drop=True),
    )
    assert first.best_config == second.best_config
    assert first.test.roc_auc == second.test.roc_auc
