"""The prepare stage refuses data no search could use, before featurizing or starting Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from tests.tune.conftest import tiny_job
from toxmodel.data import DataError
from toxmodel.split import Split
from tune.errors import ConfigError
from tune.job import run_job
from tune.prepare import check_validation


def test_validation_without_both_classes_of_any_task_is_refused_naming_counts() -> None:
    labels = np.array([[0], [1], [0], [0], [1], [0]], dtype=np.float32)
    split = Split(train=np.array([0, 1, 2, 4]), valid=np.array([3, 5]), test=np.array([], int))
    with pytest.raises(DataError, match=r"'toxic': 0 positives, 2 negatives in validation"):
        check_validation(labels, split, ["toxic"], "random")
    # One task with both classes in validation is enough (others are skipped in the mean).
    two = np.column_stack([labels[:, 0], [0, 1, 0, 1, 1, 0]]).astype(np.float32)
    check_validation(two, split, ["toxic", "other"], "random")


def test_a_task_with_two_positives_is_refused_before_ray_starts(
    tmp_path: Path, make_csv, no_ray: None
) -> None:
    rows = ["smiles,toxic"] + [
        f"{'C' * (i % 9 + 1)}{'O' * (i // 9)},{int(i < 2)}" for i in range(40)
    ]
    csv = make_csv("\n".join(rows) + "\n", "two_positives.csv")
    job = tiny_job(tmp_path, csv, **{"split.seed": 3})
    with pytest.raises(DataError, match="no task with both classes"):
        run_job(job, progress=False)
    assert not ray.is_initialized()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"resources.cpus_per_trial": 3, "ray.num_cpus": 2}, "has 2 CPUs"),
        ({"resources.gpus_per_trial": 0.5, "ray.num_gpus": 0}, "--num-gpus N"),
    ],
)
def test_impossible_local_requests_are_refused_before_ray_starts(
    tmp_path: Path, small_csv: Path, no_ray: None, overrides: dict[str, object], named: str
) -> None:
    """These used to leave every trial PENDING for ever."""
    job = tiny_job(tmp_path, small_csv, **overrides)
    with pytest.raises(ConfigError, match=named):
        run_job(job, progress=False)
    assert not ray.is_initialized()
    assert not (tmp_path / "results" / "tiny").exists()  # refused before any work


def test_an_unreachable_cluster_address_is_refused_at_once(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    """`--address 127.0.0.1:1` used to leave ray.init retrying for minutes."""
    import time

    from tune.errors import ClusterError

    job = tiny_job(tmp_path, small_csv, **{"ray.address": "127.0.0.1:1", "ray.num_cpus": None})
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"127\.0\.0\.1:1: no Ray cluster answers"):
        run_job(job, progress=False)
    assert time.monotonic() - started < 30
    assert not ray.is_initialized()
