"""What a team's `mlflow server` costs in CPU: to start, idle, and a trial's epochs per request.

    python benchmarks/mlflow_server.py
    python benchmarks/mlflow_server.py --epochs-per-request 1 2 4 8 16 --requests 150

The server runs on PostgreSQL (the team stack's backend, `tests.team_stack`), one worker,
artifacts in a local folder. CPU is the machine's (every process but this one: the server's
processes and PostgreSQL's), so run it on a quiet machine.

- start and idle, with MLflow 3's job runner (its default) and without it
  (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`, as `toxtune ui`, cluster.yaml and the tests
  start it): wall time to answer /health, the machine's CPU over the first SETTLE_S seconds
  from launch (the job runner's consumers start after /health answers), CPU a second over the
  `--idle-s` seconds of nothing after that, and the server's processes and their memory (PSS);
- per request: `log_batch` requests as toxtune's trial callback sends them (one request per
  trial, a trial's queued epochs together, each epoch the headline metrics a simulated Tox21
  result logs), spread over 64 runs: server CPU and client CPU a request and an epoch, by
  epochs per request. How many epochs a request carries is what the trial callback's pacing
  (`tune.tracking.callback.send_interval`) decides;
- a trial's run: `--trials` trial runs started, given three epochs each and ended by toxtune's
  trial callback (`tune.tracking.MlflowTrialCallback`, with the job's dataset as their input),
  phase by phase: server CPU, the callback's CPU and HTTP requests a trial; then `--trials`
  more whose whole lives (start, three epochs, end) are queued before one send, as with ASHA
  at many trials in flight: a trial that stops at its grace period lives a few seconds, the
  sender sends every trials / 8 s (`send_interval`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.driver import tox21_result
from tests.team_stack import postgres_server, team_mlflow

SETTLE_S = 40.0
PARTS = ("start", "requests", "lives")


def machine_cpu_but_me() -> float:
    """CPU seconds of the whole machine, less this process's."""
    t = psutil.cpu_times()
    me = psutil.Process().cpu_times()
    return t.user + t.system + t.nice - (me.user + me.system)


def start_and_idle(
    pg_url: str, idle_s: float, job_runner: bool
) -> tuple[float, float, float, int, float]:
    """One server: (wall s to answer /health, machine CPU s over the first SETTLE_S from
    launch, CPU s a second idle after that, its processes, their memory in GiB (PSS))."""
    runner = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if job_runner else "false"}
    # the tests' server takes the environment's setting first
    with mock.patch.dict(os.environ, runner):
        c0, t0 = machine_cpu_but_me(), time.monotonic()
        with team_mlflow(pg_url, tempfile.mkdtemp(), Path(tempfile.mkdtemp())) as server:
            wall = time.monotonic() - t0
            time.sleep(max(SETTLE_S - wall, 0.0))  # its job consumers start after /health
            c1 = machine_cpu_but_me()
            time.sleep(idle_s)
            idle = (machine_cpu_but_me() - c1) / idle_s
            assert server.proc is not None
            root = psutil.Process(server.proc.pid)
            procs = [root, *root.children(recursive=True)]
            memory = sum(p.memory_full_info().pss for p in procs) / 2**30
    return wall, c1 - c0, idle, len(procs), memory


def per_request(pg_url: str, epochs: list[int], requests: int) -> list[tuple[int, float, float]]:
    """(epochs a request, server CPU ms a request, client CPU ms a request); the tests' server
    runs without the job runner unless the environment says otherwise."""
    from mlflow.tracking import MlflowClient

    from tune.tracking.callback import result_metrics

    rng = np.random.default_rng(0)
    out = []
    with team_mlflow(pg_url, tempfile.mkdtemp(), Path(tempfile.mkdtemp())) as server:
        client = MlflowClient(server.url)
        exp = client.create_experiment("requests")
        runs = [client.create_run(exp).info.run_id for _ in range(64)]
        step = {r: 0 for r in runs}
        for k in [epochs[0], *epochs]:  # the first size twice: the first pass warms up
            c0, p0 = machine_cpu_but_me(), time.process_time()
            for i in range(requests):
                run = runs[i % len(runs)]
                metrics = []
                for _ in range(k):
                    step[run] += 1
                    row, _ = tox21_result(step[run], rng, 0.0, 0.1)
                    headline = {key: v for key, v in row.items() if "/" not in key}
                    metrics += result_metrics(headline, step[run], int(time.time() * 1000))
                client.log_batch(run, metrics=metrics)
            server_ms = 1000 * (machine_cpu_but_me() - c0) / requests
            client_ms = 1000 * (time.process_time() - p0) / requests
            out.append((k, server_ms, client_ms))
        per_epoch = len(metrics) // k
    print(f"(each epoch: {per_epoch} metrics)")
    return out[1:]


@dataclass
class SimTrial:
    """What the trial callback reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"train_trial_{self.trial_id}"


def trial_lives(pg_url: str, n: int) -> list[tuple[str, float, float, float]]:
    """(phase, server CPU ms, client CPU ms, requests) a trial, for `n` trials' runs as the
    trial callback makes them: their starts, then three epochs each (one request a trial),
    then their ends (the best epoch's 24 per-task scores, the ending tags, the end); then
    `n` more trials' whole lives in one send."""
    import mlflow.store.tracking.rest_store as rest_store

    from tune.tracking import MlflowTrialCallback, start_job_run
    from tune.tracking.provenance import DatasetInfo

    real, count = rest_store.call_endpoint, [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real(*args, **kwargs)

    rng = np.random.default_rng(0)
    space = {"lr": 1e-3, "n_layers": 2, "width": 512, "dropout": 0.2, "batch_size": 128}
    trials = [SimTrial(f"{i:05d}", {**space, "seed": i}) for i in range(2 * n)]
    tasks = tuple(f"task_{t}" for t in range(12))
    dataset = DatasetInfo("tox21", "0" * 64, "/data/tox21.csv", 7831, tasks, "random:0")
    out = []
    with team_mlflow(pg_url, tempfile.mkdtemp(), Path(tempfile.mkdtemp())) as server:
        parent = start_job_run(server.url, "lives", "job", {}, resume=False)
        callback = MlflowTrialCallback(server.url, "lives", parent, max_epochs=3, dataset=dataset)

        def live(trial: SimTrial, phase: str) -> None:
            if phase in ("start", "whole life"):
                callback.on_trial_start(0, [], trial)
            if phase in ("3 epochs", "whole life"):
                for epoch in range(1, 4):
                    row, _ = tox21_result(epoch, rng, 0.0, 0.1)
                    result = {**row, "training_iteration": epoch}
                    callback.on_trial_result(0, [], trial, result)
                    trial.last_result = {**result, "finished_reason": "max_epochs"}
            if phase in ("end", "whole life"):
                callback.on_trial_complete(0, [], trial)

        with mock.patch.object(rest_store, "call_endpoint", counted):
            for phase in ("start", "3 epochs", "end", "whole life"):
                c0, p0, r0 = machine_cpu_but_me(), time.process_time(), count[0]
                with callback._sending:  # queued first, then sent: each trial's epochs together
                    for trial in trials[n:] if phase == "whole life" else trials[:n]:
                        live(trial, phase)
                assert callback.flush(timeout_s=600)
                server_ms = 1000 * (machine_cpu_but_me() - c0) / n
                client_ms = 1000 * (time.process_time() - p0) / n
                out.append((phase, server_ms, client_ms, (count[0] - r0) / n))
        callback.on_experiment_end([])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs-per-request", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--trials", type=int, default=64, help="trial runs started and ended")
    parser.add_argument(
        "--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure"
    )
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs")
    with postgres_server() as pg:
        if "start" in args.parts:
            print(
                f"{'job runner':<12}{'start wall s':>13}{'CPU s, first 40 s':>18}"
                f"{'idle CPU s/s':>13}{'processes':>10}{'memory GiB':>11}"
            )
            for on in (True, False):
                db = pg.create_database(f"idle{int(on)}")
                wall, cpu, idle, n, memory = start_and_idle(db, args.idle_s, on)
                print(
                    f"{'on' if on else 'off':<12}{wall:>13.1f}{cpu:>18.1f}{idle:>13.3f}{n:>10}"
                    f"{memory:>11.2f}",
                    flush=True,
                )
        if "requests" in args.parts:
            db = pg.create_database("requests")
            rows = per_request(db, args.epochs_per_request, args.requests)
            print(
                f"{'epochs/req':>10}{'server ms/req':>14}{'server ms/epoch':>16}"
                f"{'client ms/epoch':>16}"
            )
            for k, server_ms, client_ms in rows:
                print(f"{k:>10}{server_ms:>14.1f}{server_ms / k:>16.2f}{client_ms / k:>16.2f}")
        if "lives" in args.parts:
            lives = trial_lives(pg.create_database("lives"), args.trials)
            print(f"{args.trials} trial runs, a trial: {'server ms':>10}{'client ms':>10}"
                  f"{'requests':>9}")  # fmt: skip
            for phase, server_ms, client_ms, requests in lives:
                print(f"{phase:>24}: {server_ms:>10.1f}{client_ms:>10.1f}{requests:>9.1f}")


if __name__ == "__main__":
    main()
