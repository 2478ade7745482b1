"""What the trial callback writes to MLflow per epoch for a ToxCast-size job, and what it costs.

The trials report exactly the keys of `tune.trainable` (headline metrics plus `val_roc_auc/<task>`
and `val_pr_auc/<task>` for every task), without training anything, so the MLflow rows and the
driver's CPU time are the callback's alone. As a test: each epoch writes only the headline
metrics, and the per-task scores are written once, at the trial's best epoch. As a measurement
(benchmarks/RESULTS.md):

    python -m tests.tune.test_tracking_volume --tasks 617 --trials 4 --epochs 8 --epoch-s 2

prints the metric rows written per epoch per trial (counted in the SQLite store) and the
driver's CPU share, with the callback and without it (the Tune loop alone).
"""

from __future__ import annotations

import argparse
import collections
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from toxmodel.metrics import Metrics
from tune.tracking import MlflowTrialCallback, child_runs, default_tracking_uri, start_job_run

# Ship this module's functions to Ray workers by value (workers need not import the tests).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def epoch_result(tasks: list[str], epoch: int, peak: int, best: dict[str, float]) -> dict:
    """One epoch as `tune.trainable` reports it; validation ROC-AUC rises until `peak`."""
    score = 0.6 + 0.02 * min(epoch, peak) - 0.01 * max(0, epoch - peak)
    valid = Metrics(
        loss=0.5 / epoch,
        roc_auc=score,
        pr_auc=score / 3,
        accuracy=0.9,
        balanced_accuracy=0.7,
        per_task={
            t: {"roc_auc": score + i * 1e-4, "pr_auc": score / 3 - i * 1e-4}
            for i, t in enumerate(tasks)
        },
    )
    if score > best["roc_auc"]:
        best.update(roc_auc=score, epoch=epoch)
    return {
        "epoch": epoch,
        "train_loss": 0.6 / epoch,
        **valid.flat("val"),
        "best_val_roc_auc": best["roc_auc"],
        "best_epoch": best["epoch"],
        "lr": 1e-3,
        "epoch_seconds": 0.01,
        "finished_reason": "",
        "trial_started_at": time.time(),
        "reported_at": time.time(),
        "device": "cpu",
        "gpu_ids": "",
        "gpu_fraction": 0.0,
        "node_id": "n",
        "node_ip": "127.0.0.1",
        "pid": 1,
        "trial_index": 0,
    }


def fake_trial(config: dict[str, Any]) -> None:
    best = {"roc_auc": float("-inf"), "epoch": 0}
    for epoch in range(1, config["epochs"] + 1):
        time.sleep(config["epoch_s"])
        ray_tune.report(epoch_result(config["tasks"], epoch, config["peak"], best))


def run_job(
    folder: Path, tasks: int, trials: int, epochs: int, epoch_s: float, callback: bool
) -> tuple[str, float, float]:
    """(tracking URI, driver CPU seconds, wall seconds) of one fake search."""
    uri = default_tracking_uri(folder / "store")
    parent = start_job_run(uri, "volume", "volume", {}, resume=False)
    callbacks = [MlflowTrialCallback(uri, "volume", parent, max_epochs=epochs)] if callback else []
    names = [f"assay_{i:03d}" for i in range(tasks)]
    tuner = ray_tune.Tuner(
        fake_trial,
        param_space={
            "tasks": names,
            "epochs": epochs,
            "epoch_s": epoch_s,
            "peak": ray_tune.grid_search([max(1, epochs - 2 * i) for i in range(trials)]),
        },
        tune_config=ray_tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=ray_tune.RunConfig(
            name="volume", storage_path=str(folder / "ray"), callbacks=callbacks, verbose=0
        ),
    )
    me = psutil.Process()
    cpu0, wall0 = me.cpu_times(), time.monotonic()
    tuner.fit()
    cpu1, wall = me.cpu_times(), time.monotonic() - wall0
    return uri, (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), wall


def rows_per_step(uri: str) -> dict[str, collections.Counter]:
    """Metric rows in the SQLite store, per trial run and step."""
    db = uri.removeprefix("sqlite:///")
    parent_tag = "mlflow.parentRunId"
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT m.run_uuid, m.step FROM metrics m JOIN tags t ON t.run_uuid = m.run_uuid "
            "WHERE t.key = ?",
            (parent_tag,),
        ).fetchall()
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for run, step in rows:
        out[run][step] += 1
    return out


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_epochs_log_headline_metrics_and_per_task_scores_once(
    tmp_path: Path, local_ray: None
) -> None:
    tasks, epochs = 40, 4
    uri, _, _ = run_job(tmp_path, tasks, trials=2, epochs=epochs, epoch_s=0.0, callback=True)
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("volume").experiment_id])[-1]
    kids = {k.data.params["peak"]: k for k in child_runs(client, parent.info.run_id)}
    assert set(kids) == {"4", "2"}  # one trial improves to the end, one peaks at epoch 2
    headline = {
        "train_loss",
        "val_loss",
        "val_roc_auc",
        "val_pr_auc",
        "val_accuracy",
        "val_balanced_accuracy",
        "best_val_roc_auc",
        "best_epoch",
        "lr",
        "epoch_seconds",
    }
    counts = rows_per_step(uri)
    for peak, kid in kids.items():
        best = int(peak)
        per_task = {k for k in kid.data.metrics if "/" in k}
        assert set(kid.data.metrics) - per_task == headline
        assert len(per_task) == 2 * tasks
        expected = {step: len(headline) for step in range(1, epochs + 1)}
        expected[best] += 2 * tasks
        assert dict(counts[kid.info.run_id]) == expected
        history = client.get_metric_history(kid.info.run_id, "val_roc_auc/assay_001")
        assert [(m.step, round(m.value, 6)) for m in history] == [
            (best, round(0.6 + 0.02 * best + 1e-4, 6))
        ]
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "val_roc_auc")]
        assert sorted(steps) == list(range(1, epochs + 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=617)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--epoch-s", type=float, default=2.0)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    for callback in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            uri, cpu, wall = run_job(
                Path(tmp), args.tasks, args.trials, args.epochs, args.epoch_s, callback
            )
            counts = rows_per_step(uri)
            total = sum(sum(c.values()) for c in counts.values())
            per_step = collections.Counter(n for c in counts.values() for n in c.values())
            print(
                f"callback={callback}: driver CPU {cpu:.1f} s over {wall:.1f} s wall = "
                f"{100 * cpu / wall:.1f} % of a CPU; metric rows {total} "
                f"({total / max(1, args.trials * args.epochs):.0f} per epoch per trial); "
                f"rows per (trial, epoch): {dict(sorted(per_step.items()))}",
                flush=True,
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
