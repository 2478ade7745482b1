"""The end-of-job report printed by `toxtune tune`: top trials, best config, test metrics, links."""

from __future__ import annotations

import pandas as pd

from tune.config import JobConfig
from tune.job import JobResult
from tune.search import resume_command
from tune.study import METRIC
from tune.trials import ended_by_time_limit

TOP = 5


def top_trials(trials: pd.DataFrame, n: int = TOP) -> pd.DataFrame:
    """The best `n` trials with the columns a reviewer reads first."""
    if trials.empty:
        return trials
    cols = ["trial_id", METRIC, "best_epoch", "epochs", "status"]
    cols += [c for c in trials.columns if c.startswith("config/") and not c.startswith("config/_")]
    cols = [c for c in cols if c in trials.columns]
    table = trials[cols].head(n).copy()
    table.columns = [c.removeprefix("config/") for c in table.columns]
    return table


def format_result(job: JobConfig, result: JobResult) -> str:
    lines = [f"== toxtune job {result.name}: {len(result.trials)} trials =="]
    # JobResult.search_seconds: the search's wall time (tune.search.SearchOutcome.seconds)
    seconds = result.search_seconds
    cut = ended_by_time_limit(job, seconds, len(result.trials))
    if cut:
        lines.append(
            f"{cut}. Run the rest with: {resume_command(job)} (add --time-limit SECONDS "
            "for another limit)"
        )
    if result.stopped:
        lines.append(
            f"search stopped early: {result.stopped}. The model is the best of the trials that "
            "finished; the failed trials' errors are in their MLflow runs (toxtune ui). Once "
            f"their cause is fixed, run the rest with: {resume_command(job)}"
        )
    for column, why in result.skipped_columns.items():
        lines.append(f"column {column!r} not used as a task: {why}")
    if result.failed_trials:
        lines.append(f"failed trials: {result.failed_trials}")
    with pd.option_context("display.width", 160, "display.max_columns", 30):
        lines += ["", "top trials:", top_trials(result.trials).to_string(index=False), ""]
    lines.append(f"best trial: {result.best_trial_id}")
    for key, value in sorted(result.best_config.items()):
        lines.append(f"  {key}: {value}")
    v = result.best_valid
    lines.append(
        f"validation: ROC-AUC {v.get('val_roc_auc', float('nan')):.4f}  "
        f"PR-AUC {v.get('val_pr_auc', float('nan')):.4f}"
    )
    t = result.test
    lines.append(f"test ({job.split.method} split): ROC-AUC {t.roc_auc:.4f}  PR-AUC {t.pr_auc:.4f}")
    for task, m in t.per_task.items():
        lines.append(f"  {task:<16} ROC-AUC {m['roc_auc']:.4f}  PR-AUC {m['pr_auc']:.4f}")
    if t.skipped:
        lines.append(f"  skipped (one class only in test): {', '.join(t.skipped)}")
    b = result.blend
    if b:
        lines.append(
            f"trees: {100 * b['tree_weight']:g} % of the blend, chosen out of fold (ROC-AUC: "
            f"networks {b['oof_roc_auc_networks']:.4f}, trees {b['oof_roc_auc_trees']:.4f}, "
            f"blend {b['oof_roc_auc_blend']:.4f})"
        )
    s = result.test_seeds
    if s:
        lines.append(
            f"retrained over {int(s['test_seeds'])} seeds: test ROC-AUC "
            f"{s['test_roc_auc_mean']:.4f} ± {s['test_roc_auc_std']:.4f}  PR-AUC "
            f"{s['test_pr_auc_mean']:.4f} ± {s['test_pr_auc_std']:.4f}"
        )
    lines += [
        "",
        f"Ray experiment: {result.experiment_path}",
        f"MLflow: {job.tracking_uri}  experiment {job.tracking.experiment_name!r}, "
        f"run {result.parent_run_id}",
        f"model: models:/{job.model_name}/{result.model_version} ({result.alias_note})",
        "review: toxtune ui"
        + (
            f" --tracking-uri {job.tracking_uri}"
            if job.tracking.tracking_uri
            else f" --storage-path {job.ray.storage_path}"
        ),
    ]
    return "\n".join(lines)


def print_result(job: JobConfig, result: JobResult) -> None:
    print(format_result(job, result))
