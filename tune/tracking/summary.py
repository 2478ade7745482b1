"""The job's summary on its parent run, once the search is over.

Contract: `log_job_summary(uri, run_id, summary)` writes what a reviewer reads first: the
dataset (as tags and as an MLflow dataset input), the cluster, the best trial, validation and
test metrics (`best_val_*`, `test_*`, per task too), the trials table, the search space, and the
plots under `plots/` (a plot that cannot be drawn is skipped with a `toxtune.note.<plot>` tag
saying why).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, RunTag

from tune import plots
from tune.tracking.backend import client_for
from tune.tracking.names import jsonable, safe_key
from tune.tracking.provenance import DatasetInfo, data_stem, log_dataset

if TYPE_CHECKING:
    import optuna

    from toxmodel.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's limit on metrics per log_batch
PLOTS = ("optimization_history", "param_importance", "roc_curves")


@dataclass
class JobSummary:
    """What the parent run records once the search is over.

    `cluster` holds nodes/cpus/gpus. `best_valid` maps validation metric names (`val_roc_auc`,
    `val_roc_auc/<task>`, ...; the `val_` prefix is added when missing) to values, logged as
    `best_val_*`. `test_metrics` is a `toxmodel.metrics.Metrics` or a mapping such as
    {"roc_auc": .., "roc_auc/<task>": ..}, logged as `test_*`. `study` (an Optuna study) feeds
    the history and importance plots; `roc_data` is (y_true, y_prob, tasks) of the best model
    on the test split, for the ROC plot. `test_seeds` holds extra metrics logged as named.
    `dataset` is the job's dataset input; without it one is made from the fields above.
    """

    n_rows: int
    n_valid: int
    content_hash: str
    source: str
    invalid_report: Path | None
    search_space: dict[str, Any]
    ray_address: str
    cluster: dict[str, float]
    best_trial_id: str
    best_valid: dict[str, float]
    test_metrics: Metrics | Mapping[str, float]
    trials: pd.DataFrame
    best_params: dict[str, Any] = field(default_factory=dict)
    study: optuna.Study | None = None
    roc_data: tuple[np.ndarray, np.ndarray, list[str]] | None = None
    test_seeds: dict[str, float] = field(default_factory=dict)
    skipped_columns: dict[str, str] = field(default_factory=dict)  # column -> why not a task
    dataset: DatasetInfo | None = None

    def dataset_info(self) -> DatasetInfo:
        if self.dataset is not None:
            return self.dataset
        tasks = tuple(self.roc_data[2]) if self.roc_data is not None else ()
        return DatasetInfo(
            name=data_stem(str(self.source)),
            content_hash=self.content_hash,
            source=str(self.source),
            rows=self.n_rows,
            targets=tasks,
            split="",
        )


def summary_metrics(summary: JobSummary) -> dict[str, float]:
    """`best_val_*`, `test_*` and the seed metrics, as the parent run logs them."""
    out: dict[str, float] = {}
    for key, value in summary.best_valid.items():
        name = key if key.startswith("val_") else f"val_{key}"
        out[f"best_{name}"] = float(value)
    if hasattr(summary.test_metrics, "flat"):
        test = summary.test_metrics.flat("test")
    else:
        test = {
            (k if k.startswith("test_") else f"test_{k}"): v
            for k, v in dict(summary.test_metrics).items()
        }
    out.update({k: float(v) for k, v in test.items()})
    out.update({k: float(v) for k, v in summary.test_seeds.items()})
    return out


def log_job_summary(tracking_uri: str, parent_run_id: str, summary: JobSummary) -> None:
    """Dataset (tags and input), search space, cluster, best trial, metrics, tables and plots."""
    client = client_for(tracking_uri)
    run = parent_run_id
    tags = {
        "dataset.source": str(summary.source),
        "dataset.content_hash": summary.content_hash,
        "dataset.rows": str(summary.n_rows),
        "dataset.valid_rows": str(summary.n_valid),
        "dataset.invalid_rows": str(summary.n_rows - summary.n_valid),
        "ray.address": summary.ray_address,
        "ray.nodes": str(int(summary.cluster.get("nodes", 0))),
        "ray.cpus": str(summary.cluster.get("cpus", 0)),
        "ray.gpus": str(summary.cluster.get("gpus", 0)),
        "best_trial_id": summary.best_trial_id,
    }
    if summary.skipped_columns:
        tags["dataset.skipped_columns"] = json.dumps(summary.skipped_columns)
    client.log_batch(run, tags=[RunTag(k, v[:8000]) for k, v in tags.items()])
    log_dataset(client, run, summary.dataset_info())
    metrics = summary_metrics(summary)
    now = int(time.time() * 1000)
    batch = [Metric(safe_key(k), v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(batch), BATCH):
        client.log_batch(run, metrics=batch[i : i + BATCH])
    client.log_dict(run, jsonable(summary.search_space), "search_space.json")
    client.log_dict(run, jsonable(summary.best_params), "best_params.json")
    client.log_dict(run, jsonable(summary.cluster), "cluster.json")
    if summary.invalid_report and Path(summary.invalid_report).is_file():
        client.log_artifact(run, str(summary.invalid_report), "dataset")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        summary.trials.to_csv(out / "trials.csv", index=False)
        client.log_artifact(run, str(out / "trials.csv"))
        for name in PLOTS:
            path = out / f"{name}.png"
            try:
                skipped = _draw(name, summary, path)
            except Exception as exc:
                skipped = f"failed: {type(exc).__name__}: {exc}"
            if skipped:
                log.info("plot %s skipped: %s", name, skipped)
                client.set_tag(run, f"toxtune.note.{name}", skipped[:8000])
            else:
                client.log_artifact(run, str(path), "plots")


def _draw(name: str, summary: JobSummary, path: Path) -> str:
    if name == "optimization_history":
        return plots.history(summary.study, path)
    if name == "param_importance":
        return plots.importance(summary.study, path)
    return plots.roc_curves(summary.roc_data, path)
