"""Several jobs on one team stack: one Ray cluster, one MLflow server, one PostgreSQL, one bucket.

    python benchmarks/shared_stack.py                    # 1 job alone, then 4 submitted together
    python benchmarks/shared_stack.py --jobs 4 --cpus 4  # a cluster with room for 2 jobs' trials

Starts the stack on this machine (moto's S3 server, PostgreSQL, `mlflow server` on it with its
artifacts in the bucket; tests/team_stack.py) and a Ray head node with `--cpus` logical CPUs,
then submits with `toxtune submit` the same small job (300 Tox21 rows, `--trials` trials of
`--epochs` epochs, 1 logical CPU per trial, each epoch held `--epoch-s` seconds so the searches
last long enough to overlap) first alone, then `--jobs` times at once. For every job it reads
back, from the cluster and the stores: its state, the seconds from its submission to its first
trial's start and to its end, and whether its record is whole (every trial COMPLETE in its own
study and FINISHED in its own MLflow runs, its end marker in the bucket). The figures: the
together round's makespan against the lone job's wall time, and whether any job waited for
another to finish before its first trial started.

What shares the cluster is Ray's resource scheduling: each job's driver asks Ray for its trials
(1 CPU each, at most `search.max_concurrent` at once), and Ray starts any request that fits
the free resources, whichever job it comes from; no job-level queue or priority sits above it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EXPERIMENT = "shared-stack-bench"


@dataclass
class JobRow:
    round: str
    job_id: str
    name: str
    status: str
    first_trial_s: float  # submission -> its first trial's MLflow run started
    end_s: float  # submission -> the Ray job ended
    whole: str  # "yes", or what its record lacks


@dataclass
class Stack:
    s3: object
    tracking_uri: str
    study_storage: str


@contextlib.contextmanager
def team_stack(root: Path) -> Iterator[Stack]:
    from tests.team_stack import postgres_server, s3_server, team_mlflow

    with s3_server() as s3, postgres_server() as pg:
        backend, study = pg.create_database("mlflow"), pg.create_database("optuna")
        with team_mlflow(backend, f"{s3.uri}/mlartifacts", root / "mlflow") as server:
            yield Stack(s3, server.url, study)


def write_config(root: Path, trials: int, epochs: int) -> Path:
    """The job every submit runs (tests.team_stack.small_tox21_job): `trials` trials at once."""
    from tests.team_stack import small_tox21_job

    return small_tox21_job(
        root,
        "job.yaml",
        search={"num_samples": trials, "max_epochs": epochs, "max_concurrent": trials},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0},
        tracking={"experiment_name": EXPERIMENT, "registered_model_name": EXPERIMENT},
    )


def run_round(
    label: str, n: int, folder: Path, config: Path, stack: Stack, dashboard: str
) -> tuple[list[JobRow], float]:
    """Submit `n` jobs at once, wait for all; their rows and the round's makespan (s)."""
    from tests.team_stack import submit_together
    from tune.cluster.submission import JobsClient

    folder.mkdir()
    submitted = time.time()
    ids = submit_together(folder, config, stack.s3, stack.tracking_uri, stack.study_storage,
                          dashboard, n)  # fmt: skip
    jobs = JobsClient.connect(dashboard)
    for job_id in ids:
        jobs.wait(job_id, poll_s=1.0)
    makespan = time.time() - submitted
    rows = [read_job(label, jobs.details(job_id), submitted, stack) for job_id in ids]
    return rows, makespan


def read_job(label: str, details: object, submitted: float, stack: Stack) -> JobRow:
    """One job's row, read back from MLflow, the study and the bucket."""
    import optuna
    from mlflow.tracking import MlflowClient

    from tests.team_stack import bucket_keys

    name = details.name
    client = MlflowClient(stack.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.`toxtune.job` = '{name}'")
    lacks = []
    first = float("nan")
    if len(runs) != 1:
        lacks.append(f"{len(runs)} parent runs")
    else:
        kids = client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{runs[0].info.run_id}'"
        )
        if not kids or {k.info.status for k in kids} != {"FINISHED"}:
            lacks.append("trial runs " + ",".join(k.info.status for k in kids))
        if kids:
            first = min(k.info.start_time for k in kids) / 1000 - submitted
    try:
        study = optuna.load_study(study_name=name, storage=stack.study_storage)
        states = {t.state.name for t in study.trials}
        if states != {"COMPLETE"}:
            lacks.append(f"study {sorted(states)}")
    except KeyError:
        lacks.append("no study")
    if not any(k.endswith("toxtune_done.json") for k in bucket_keys(stack.s3, f"shared/{name}/")):
        lacks.append("no end marker")
    end = (details.end_ms or 0) / 1000 - submitted
    return JobRow(
        label, details.job_id, name, details.status, first, end, "; ".join(lacks) or "yes"
    )


def spans_waited(rows: list[JobRow], stack: Stack) -> int:
    """How many jobs' first trial started only after another job's last trial had ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    spans = {}
    for row in rows:
        parent = client.search_runs([exp.experiment_id], f"tags.`toxtune.job` = '{row.name}'")
        kids = client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'"
        )
        spans[row.name] = (
            min(k.info.start_time for k in kids),
            max(k.info.end_time for k in kids),
        )
    return sum(
        any(other_end < first for o, (_, other_end) in spans.items() if o != name)
        for name, (first, _) in spans.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=8, help="the Ray head's logical CPUs")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-s", type=float, default=3.0)
    args = parser.parse_args()

    from tests.services import BIN, ray_cluster

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    # The jobs' drivers and trials inherit the environment of `ray start`.
    os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TOXTUNE_FAULT_PLAN"] = json.dumps({"slow_epochs_s": args.epoch_s})
    os.environ.pop("RAY_ADDRESS", None)
    with tempfile.TemporaryDirectory(prefix="toxtune-shared-") as tmp:
        root = Path(tmp)
        os.environ["TOXTUNE_CACHE_DIR"] = str(root / "cache")
        config = write_config(root, args.trials, args.epochs)
        with team_stack(root) as stack, ray_cluster(root / "ray", args.cpus, dashboard=True) as rc:
            alone, alone_s = run_round("alone", 1, root / "alone", config, stack, rc.dashboard_url)
            together, together_s = run_round(
                "together", args.jobs, root / "together", config, stack, rc.dashboard_url
            )
            waited = spans_waited(together, stack)
    print()
    print(f"cluster: {args.cpus} logical CPUs; each job {args.trials} trials x {args.epochs} "
          f"epochs of {args.epoch_s:g} s, 1 CPU per trial")  # fmt: skip
    print("| round | job | state | s to first trial | s to end | record whole |")
    print("|---|---|---|---|---|---|")
    for r in alone + together:
        print(
            f"| {r.round} | {r.name} | {r.status} | {r.first_trial_s:.0f} | {r.end_s:.0f} "
            f"| {r.whole} |"
        )
    print()
    print(
        f"{args.jobs} jobs together: makespan {together_s:.0f} s = {together_s / alone_s:.2f}x "
        f"one job alone ({alone_s:.0f} s; {args.jobs} in a row would be {args.jobs}x); "
        f"jobs whose first trial waited for another job to finish: {waited} of {args.jobs}"
    )


if __name__ == "__main__":
    main()
