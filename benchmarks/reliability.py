"""Fault drills, repeated: each injects a real fault through its end-to-end test, N times.

    python benchmarks/reliability.py --runs 3
    python benchmarks/reliability.py --runs 2 --stack team   # the drills on the team stack

Each drill is a test that really injects the fault (SIGKILL of the driver, of a trial's worker,
of a whole Ray node; an MLflow server stopped and restarted; a trial that raises or diverges; a
CUDA OOM) and asserts that every trial finished (or failed as intended) and that no result was
lost. A passing run therefore means: trials finished as listed, results lost 0. Prints a
markdown table for `benchmarks/RESULTS.md`.

`--stack team` runs the drills on a team's stack (tests/tune/test_team_stack.py): results in an
S3-compatible bucket (moto's server), MLflow on PostgreSQL with its artifacts in the bucket, the
Optuna study in PostgreSQL; the nodes of the cluster drill share no folder. Whole jobs through
a node loss, an MLflow restart, a PostgreSQL restart and a 10-s loss of the object store are
drilled there only (the test suite runs each once). The object store is lost by cutting a TCP
proxy in front of moto (tests/team_stack.py `TcpProxy`): moto keeps its buckets in memory, so
the store's content survives, as a restarted or re-routed store's does.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Drill:
    fault: str
    test: str
    finished: str  # what a passing run guarantees about the trials


DRILLS = [
    Drill(
        "driver SIGKILLed mid-search, then `--resume`",
        "tests/tune/test_resume.py::test_driver_killed_mid_search_resumes_without_rerunning_or_orphans",
        "6 of 6; finished ones not retrained; no RUNNING or duplicate MLflow runs",
    ),
    Drill(
        "a trial's worker process SIGKILLed at epoch 2",
        "tests/tune/test_search.py::test_trial_whose_worker_is_killed_is_retried_and_the_job_completes",
        "3 of 3 (the killed one retried in its own MLflow run)",
    ),
    Drill(
        "MLflow server (SQLite) stopped for 2 s while 4 trials report, restarted",
        "tests/tune/test_tracking.py::test_trial_runs_statuses_metrics_and_errors[http]",
        "4 of 4 runs with every epoch's metrics (replayed); none RUNNING",
    ),
    Drill(
        "MLflow server unreachable at start",
        "tests/tune/test_tracking_server.py::test_unreachable_server_is_refused_before_any_trial",
        "0 started: refused before any trial, naming the URI",
    ),
    Drill(
        "one trial raises, one diverges (NaN)",
        "tests/tune/test_search.py::test_failed_and_diverged_trials_do_not_stop_the_search",
        "2 of 4 finished, 2 failed with their error and kind in MLflow; search went on",
    ),
    Drill(
        "CUDA out-of-memory below a 0.5 GPU share",
        "tests/tune/test_search.py::test_oom_is_retried_with_a_larger_gpu_share",
        "2 of 2, retried at share 0.5",
    ),
]

TEAM = "tests/tune/test_team_stack.py::"
TEAM_DRILLS = [
    Drill(
        "driver SIGKILLed mid-search, then `--resume` (from the bucket and the PostgreSQL study)",
        TEAM + "test_driver_killed_resumes_from_the_bucket_and_the_postgres_study",
        "6 of 6; finished ones not retrained; no RUNNING or duplicate MLflow runs",
    ),
    Drill(
        "a trial's worker process SIGKILLed at epoch 2 (its checkpoint in the bucket)",
        TEAM + "test_trial_worker_killed_on_the_team_stack_is_retried_from_the_bucket",
        "3 of 3 (the killed one retried in its own MLflow run); 3 COMPLETE in the study",
    ),
    Drill(
        "a Ray worker node SIGKILLed mid-job (2 nodes sharing no folder, submitted job)",
        TEAM + "test_submitted_job_on_two_nodes_sharing_no_folder_survives_losing_a_node",
        "4 of 4 (retried on the head node); model served from the bucket",
    ),
    Drill(
        "MLflow server (PostgreSQL, artifacts in the bucket) stopped for 8 s mid-job, restarted",
        TEAM + "test_team_mlflow_server_restarted_mid_job_loses_no_result",
        "4 of 4; every epoch of every trial in MLflow; model registered",
    ),
    Drill(
        "PostgreSQL (the study and MLflow's backend) stopped for 5 s mid-job, restarted",
        TEAM + "test_postgres_restarted_mid_job_loses_no_trial_and_no_epoch",
        "4 of 4 COMPLETE in the study; every epoch of every trial in MLflow; model registered",
    ),
    Drill(
        "object store unreachable for 10 s mid-job (connections refused and reset), back",
        TEAM + "test_object_store_unreachable_for_10_s_mid_job_loses_nothing",
        "4 of 4 COMPLETE in the study; every epoch in MLflow; model registered; end marker "
        "and final model in the bucket",
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stack", choices=["local", "team"], default="local")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, python {platform.python_version()}")
    rows = []
    for drill in TEAM_DRILLS if args.stack == "team" else DRILLS:
        passed, seconds = 0, []
        for _ in range(args.runs):
            t0 = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", drill.test],
                capture_output=True,
                text=True,
            )
            seconds.append(time.monotonic() - t0)
            ok = out.returncode == 0 and " passed" in out.stdout and "skipped" not in out.stdout
            passed += ok
            if not ok:
                print(out.stdout[-3000:], file=sys.stderr)
        lost = "0" if passed == args.runs else f"see {args.runs - passed} failed run(s)"
        rows.append(
            f"| {drill.fault} | {args.runs} | {passed} | {drill.finished} | {lost} "
            f"| {sum(seconds) / len(seconds):.0f} s |"
        )
        print(rows[-1], flush=True)
    print()
    print("| fault injected | times tried | runs passed | trials finished | results lost | run |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
