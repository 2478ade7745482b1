"""GPU-memory estimate, `auto` fractions and the failure/retry policy (plain code, no GPU)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from tune.config import load_config
from tune.errors import SearchError
from tune.resources import (
    CUDA_CONTEXT_BYTES,
    TrialShape,
    classify_failure,
    estimate_trial_bytes,
    gpu_fraction,
    is_retryable,
    next_gpu_share,
)
from tune.search import resources_for

GIB = 2**30
TOX21 = dict(n_rows=7823, fp_bytes_per_row=2048, n_descriptors=0, n_tasks=12)


def test_estimate_counts_weights_optimizer_data_and_activations() -> None:
    small = TrialShape(**TOX21, hidden=(256,), batch_size=64)
    big = TrialShape(**TOX21, hidden=(2048, 2048, 2048), batch_size=512)
    assert estimate_trial_bytes(small) > CUDA_CONTEXT_BYTES
    # 16 bytes per weight: fp32 weights + grads + two AdamW moments.
    assert estimate_trial_bytes(big) - estimate_trial_bytes(small) > 16 * (
        big.n_weights - small.n_weights
    )
    # Fingerprint bytes stay uint8 on the device: 7.8k x 2048 is ~16 MB, not ~64 MB.
    no_data = TrialShape(**{**TOX21, "n_rows": 0}, hidden=(256,), batch_size=64)
    assert estimate_trial_bytes(small) - estimate_trial_bytes(no_data) < 20 * 2**20
    # A k-fold trial trains k networks over one copy of the data: k x weights and activations.
    folds = TrialShape(**TOX21, hidden=(256,), batch_size=64, members=5)
    grown = estimate_trial_bytes(folds) - estimate_trial_bytes(small)
    assert grown == 4 * (estimate_trial_bytes(no_data) - CUDA_CONTEXT_BYTES)


def test_fraction_packs_small_trials_and_gives_big_ones_more() -> None:
    small = TrialShape(**TOX21, hidden=(512, 256), batch_size=128)
    huge = TrialShape(**{**TOX21, "n_rows": 10_000_000}, hidden=(2048, 2048, 2048), batch_size=512)
    f_small = gpu_fraction(small, 80 * GIB)
    assert 0 < f_small <= 0.05  # twenty such trials fit an 80 GB GPU
    assert gpu_fraction(small, 8 * GIB) > f_small
    assert gpu_fraction(huge, 16 * GIB) == 1.0
    with pytest.raises(ValueError, match="gpu_memory_bytes"):
        gpu_fraction(small, 0)


def test_oom_retry_doubles_the_share_up_to_one_gpu() -> None:
    assert next_gpu_share(0.25) == pytest.approx(0.5)
    assert next_gpu_share(0.05) == pytest.approx(0.1)
    assert next_gpu_share(0.75) == 1.0
    assert next_gpu_share(1.0) == 1.0


@pytest.mark.parametrize(
    ("text", "kind", "retry"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "gpu_oom", True),
        ("ray.exceptions.ActorDiedError: The actor died unexpectedly", "node_lost", True),
        ("ray.exceptions.NodeDiedError: node 1234 died", "node_lost", True),
        ("ray.exceptions.WorkerCrashedError: worker killed", "node_lost", True),
        (
            "The actor a5ee is unavailable: The actor is temporarily unavailable: RpcError: RPC "
            "error: Socket closed rpc_code: 14.",
            "node_lost",
            True,
        ),
        (
            "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on "
            "memory.",
            "node_lost",
            True,
        ),
        ("toxmodel.train.TrainingDiverged: non-finite training loss at epoch 3", "diverged", False),
        ("ValueError: unknown activation 'foo'", "code_error", False),
        ("", "code_error", False),
    ],
)
def test_failures_are_classified_and_only_some_retried(text: str, kind: str, retry: bool) -> None:
    assert classify_failure(text) == kind
    assert is_retryable(kind) is retry


def test_auto_sizes_each_trial_from_its_configuration_and_the_gpu_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--gpus-per-trial auto`: each trial's share is sized from its own configuration against
    one GPU's memory (the driver's GPU, or `resources.gpu_memory_gb` where it has none)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only driver
    rows = 500_000  # shapes only: broadcast views, no memory behind them
    data = SimpleNamespace(
        features=_Features(
            np.broadcast_to(np.uint8(0), (rows, 2048)), np.broadcast_to(np.float32(0), (rows, 200))
        ),
        labels=np.broadcast_to(np.float32(0), (rows, 12)),
    )
    job = load_config(overrides={"resources.gpus_per_trial": "auto"})
    with pytest.raises(SearchError, match=r"no GPU is visible.*resources\.gpu_memory_gb"):
        resources_for(job, data)
    small = {"n_layers": 1, "width_0": 256, "batch_size": 64}
    big = {"n_layers": 2, "width_0": 4096, "width_1": 4096, "batch_size": 1024}
    shares = {}
    for gb in (8, 24):
        on = replace(job.resources, gpu_memory_gb=gb)
        sized = resources_for(replace(job, resources=on), data)
        shares[gb] = (sized(small)["gpu"], sized(big)["gpu"])
        assert sized(small)["cpu"] == job.resources.cpus_per_trial
    assert shares[8][0] < shares[8][1]  # a bigger network asks for more of the same GPU
    assert shares[24][1] < shares[8][1]  # and for more of a smaller GPU


class _Features:
    """What `resources_for` reads of the job's features: their shapes."""

    def __init__(self, fingerprint: np.ndarray, descriptors: np.ndarray) -> None:
        self.fingerprint, self.descriptors = fingerprint, descriptors

    def __len__(self) -> int:
        return len(self.fingerprint)
