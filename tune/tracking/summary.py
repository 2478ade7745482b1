"""The job's summary on its parent run, once the search is over.

Contract: `log_job_summary(uri, run_id, summary)` writes what a reviewer reads first: the
dataset (as tags and as an MLflow dataset input), the cluster, the best trial, validation and
test metrics (`best_val_*`, `test_*`, per task too; `test_ece`, `test_brier` and their
`_uncalibrated` twins; the applicability domain's threshold and test share), the trials table,
the search space, each task's calibration (`calibration.json`), the plots under `plots/` (a plot
that cannot be drawn is skipped with a `toxtune.note.<plot>` tag saying why), and a short
markdown Description (`mlflow.note.content`) with the facts the terminal prints at the end: best
trial, validation and test ROC-AUC, calibration, domain, top trials, plot links.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.entities import Metric, RunTag

from tune import plots
from tune.tracking.backend import client_for
from tune.tracking.names import NOTE_TAG, STOPPED_TAG, jsonable, safe_key
from tune.tracking.provenance import DatasetInfo, data_stem, log_dataset

if TYPE_CHECKING:
    import optuna

    from toxmodel.metrics import Metrics

log = logging.getLogger(__name__)

BATCH = 1000  # MLflow's limit on metrics per log_batch
TOP = 5  # trials in the Description's table, as the terminal prints them
PLOTS = ("optimization_history", "param_importance", "roc_curves", "reliability")


@dataclass
class JobSummary:
    """What the parent run records once the search is over.

    `cluster` holds nodes/cpus/gpus. `best_valid` maps validation metric names (`val_roc_auc`,
    `val_roc_auc/<task>`, ...; the `val_` prefix is added when missing) to values, logged as
    `best_val_*`. `test_metrics` is a `toxmodel.metrics.Metrics` or a mapping such as
    {"roc_auc": .., "roc_auc/<task>": ..}, logged as `test_*`. `study` (an Optuna study) feeds
    the history and importance plots; `roc_data` is (y_true, y_prob, tasks) of the best model
    on the test split, for the ROC plot. `test_seeds` and `trust` hold extra metrics logged as
    named (`trust`: test_ece, test_ece_uncalibrated, test_brier, test_brier_uncalibrated,
    domain_threshold, test_in_domain, ...; a blend with trees: tree_weight, oof_roc_auc_networks,
    oof_roc_auc_trees, oof_roc_auc_blend). `reliability_data` is (y_true, calibrated,
    uncalibrated or None) on the test split, for the reliability diagram; `calibration` maps
    each task to its calibration method and why. `dataset` is the job's dataset input; without
    it one is made from the fields above.
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
    trust: dict[str, float] = field(default_factory=dict)
    reliability_data: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
    calibration: dict[str, str] = field(default_factory=dict)
    duplicates_report: Path | None = None  # rows folded into another row of their molecule
    stopped: str = ""  # why the search stopped before its trials ran (the error budget)

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
    out.update({k: float(v) for k, v in summary.trust.items()})
    return out


def log_job_summary(tracking_uri: str, parent_run_id: str, summary: JobSummary) -> None:
    """Dataset, search space, cluster, best trial, metrics, tables, plots and Description."""
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
    if summary.stopped:
        tags[STOPPED_TAG] = summary.stopped
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
    if summary.calibration:
        client.log_dict(run, jsonable(summary.calibration), "calibration.json")
    for report in (summary.invalid_report, summary.duplicates_report):
        if report and Path(report).is_file():
            client.log_artifact(run, str(report), "dataset")
    drawn = []
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
                drawn.append(f"plots/{name}.png")
    client.set_tag(run, NOTE_TAG, describe(summary, metrics, drawn, run))


def _draw(name: str, summary: JobSummary, path: Path) -> str:
    if name == "optimization_history":
        return plots.history(summary.study, path)
    if name == "param_importance":
        return plots.importance(summary.study, path)
    if name == "reliability":
        return plots.reliability(summary.reliability_data, path)
    return plots.roc_curves(summary.roc_data, path)


# --------------------------------------------------------------------------------------------
# The Description (markdown)


def _num(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "n/a"
    return str(int(number)) if number.is_integer() and abs(number) < 1e6 else f"{number:.4g}"


def _score(metrics: Mapping[str, float], key: str) -> str:
    value = metrics.get(key)
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _cell(value: Any) -> str:
    return _num(value).replace("|", "\\|")


def top_trials(trials: pd.DataFrame, n: int = TOP) -> pd.DataFrame:
    """The best `n` trials with the columns the terminal's table shows (config names bare)."""
    if trials.empty:
        return trials
    score = next((c for c in ("best_val_roc_auc", "val_roc_auc") if c in trials.columns), None)
    cols = ["trial_id", score, "best_epoch", "epochs", "status"]
    cols += [c for c in trials.columns if c.startswith("config/") and not c.startswith("config/_")]
    table = trials[[c for c in cols if c and c in trials.columns]]
    if score is not None:
        table = table.sort_values(score, ascending=False, na_position="last")
    table = table.head(n)
    return table.rename(columns=lambda c: c.removeprefix("config/"))


def _markdown_table(frame: pd.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |"]
    lines.append("|" + "---|" * len(frame.columns))
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return lines


def artifact_link(run_id: str, path: str) -> str:
    """A link to one artifact, relative to the MLflow UI's root (the server's `get-artifact`)."""
    return "get-artifact?" + urllib.parse.urlencode({"path": path, "run_uuid": run_id})


def _trust_lines(metrics: Mapping[str, float], calibration: Mapping[str, str]) -> list[str]:
    """Calibration (ECE, Brier before -> after) and the domain, when the job measured them."""
    lines = []
    if "test_ece" in metrics:
        methods = [note.split(":")[0] for note in calibration.values()]
        counted = ", ".join(f"{m} {methods.count(m)}" for m in sorted(set(methods)))
        lines.append(
            f"Calibration (test, all tasks pooled): ECE {_score(metrics, 'test_ece_uncalibrated')}"
            f" -> {_score(metrics, 'test_ece')}, Brier "
            f"{_score(metrics, 'test_brier_uncalibrated')} -> {_score(metrics, 'test_brier')}"
            + (f"; tasks: {counted}" if counted else "")
            + " (ROC-AUC unchanged by construction)."
        )
    if "domain_threshold" in metrics:
        share = metrics.get("test_in_domain", math.nan)
        inside, outside = "test_roc_auc_in_domain", "test_roc_auc_out_of_domain"
        lines.append(
            f"Applicability domain: nearest-neighbour Tanimoto >= "
            f"{_score(metrics, 'domain_threshold')}; {_num(100 * share)} % of test molecules "
            f"inside (ROC-AUC {_score(metrics, inside)} inside, {_score(metrics, outside)} "
            "outside)."
        )
    if "tree_weight" in metrics:
        lines.append(
            f"Trees: {_num(100 * metrics['tree_weight'])} % of the blend, chosen out of fold "
            f"(ROC-AUC: networks {_score(metrics, 'oof_roc_auc_networks')}, trees "
            f"{_score(metrics, 'oof_roc_auc_trees')}, "
            f"blend {_score(metrics, 'oof_roc_auc_blend')})."
        )
    return ["", *lines] if lines else []


def describe(
    summary: JobSummary, metrics: Mapping[str, float], plot_paths: list[str], run_id: str
) -> str:
    """The parent run's Description: the end-of-job facts in a few markdown lines."""
    info = summary.dataset_info()
    test_name = f"test ({info.split.split(' ')[0]} split)" if info.split else "test"
    lines = [
        f"**Best trial `{summary.best_trial_id}`** of {len(summary.trials)} on "
        f"`{info.name}` ({summary.n_valid} of {summary.n_rows} molecules valid, "
        f"{len(info.targets) or '?'} tasks, digest `{info.digest}`).",
        "",
        "| | ROC-AUC | PR-AUC |",
        "|---|---|---|",
        f"| validation (best trial) | {_score(metrics, 'best_val_roc_auc')} | "
        f"{_score(metrics, 'best_val_pr_auc')} |",
        f"| {test_name} | {_score(metrics, 'test_roc_auc')} | {_score(metrics, 'test_pr_auc')} |",
    ]
    if summary.stopped:
        lines[1:1] = ["", f"**Search stopped early**: {summary.stopped}."]
    seeds = summary.test_seeds
    if seeds.get("test_seeds"):
        lines.append(
            f"| test, retrained over {int(seeds['test_seeds'])} seeds | "
            f"{_score(seeds, 'test_roc_auc_mean')} ± {_score(seeds, 'test_roc_auc_std')} | "
            f"{_score(seeds, 'test_pr_auc_mean')} ± {_score(seeds, 'test_pr_auc_std')} |"
        )
    lines += _trust_lines(metrics, summary.calibration)
    top = top_trials(summary.trials)
    if not top.empty:
        lines += ["", f"Top {len(top)} trials (validation):", "", *_markdown_table(top)]
    if summary.best_params:
        shown = ", ".join(f"{k}={_num(v)}" for k, v in sorted(summary.best_params.items()))
        lines += ["", f"Best configuration: {shown}"]
    if plot_paths:
        links = " · ".join(f"[{Path(p).stem}]({artifact_link(run_id, p)})" for p in plot_paths)
        lines += ["", f"Plots (Artifacts tab, `plots/`): {links}"]
    return "\n".join(lines)[:60000]
