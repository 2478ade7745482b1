"""The feature matrices shared through Ray's object store: the driver keeps reading the store's
copy (not a private one), and trials receive a reference, not a second pickled copy."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import ray

from tests.tune.conftest import tiny_job
from tune.bridge import init_local_ray
from tune.prepare import prepare_data
from tune.search import _trial_data
from tune.shared import share_matrices
from tune.trainable import TrialData


@ray.remote
def _in_a_trial(trial: TrialData) -> tuple[int, float, bool, bool]:
    """What a trial's process sees of the matrices: rows, a checksum, writeable flags."""
    features = trial.shared_features()
    return (
        len(features),
        float(features.fingerprint.sum(dtype=np.int64) + features.descriptors.sum()),
        bool(features.fingerprint.flags.writeable),
        bool(features.descriptors.flags.writeable),
    )


def test_the_driver_and_its_trials_read_one_shared_copy_of_the_matrices(
    no_ray: None, small_csv: Path, tmp_path: Path
) -> None:
    job = tiny_job(tmp_path, small_csv)
    data = prepare_data(job, progress=False)
    assert data.matrices is None
    init_local_ray(2, 0, logging_level=logging.WARNING, log_to_driver=False)
    shared = share_matrices(data)
    assert shared.matrices is not None and share_matrices(shared) is shared
    for name in ("fingerprint", "descriptors"):
        mine, theirs = getattr(data.features, name), getattr(shared.features, name)
        np.testing.assert_array_equal(theirs, mine)
        # the store's pages, read in place: not the driver's own (writeable) array
        assert not theirs.flags.writeable and not np.shares_memory(theirs, mine)
    assert shared.features.canonical == data.features.canonical  # the keys stay in the driver
    assert shared.split is data.split and shared.labels is data.labels

    trial = _trial_data(job, shared, None)
    # only the reference travels with the parameters: no second copy of the rows
    assert len(trial.features) == 0 and trial.matrices is shared.matrices
    assert trial.features.n_features == data.features.n_features
    rows, checksum, *writeable = ray.get(_in_a_trial.remote(trial))
    want = float(data.features.fingerprint.sum(dtype=np.int64) + data.features.descriptors.sum())
    assert rows == len(data.features) and checksum == want
    assert writeable == [False, False]  # mapped from the store, not unpickled privately
    plain = _trial_data(job, data, None)  # not shared (e.g. a library caller): the arrays travel
    assert plain.matrices is None and len(plain.features) == len(data.features)
