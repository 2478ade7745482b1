"""A new trial's cost to the driver: how the study's suggest and tell grow with the trials it holds.

    python benchmarks/suggest_scale.py                   # 100/1000 finished, 1/64 in flight
    python benchmarks/suggest_scale.py --trials 100 1000 3000 --stores sqlite postgresql

With ASHA most trials stop at their grace period, so at tens of trials in flight with short GPU
epochs the Tune loop asks the searcher for a new trial every fraction of a second, and each ask
runs in that loop. This times what toxtune's searcher (`tune.study.make_searcher`: Ray's
OptunaSearch over the job's persistent study, TPE) costs the driver per new trial: `suggest`
(TPE samples the job's search space and the study stores each parameter) and the trial's
`on_trial_complete` (its epochs and its value told), against the number of finished trials the
study already holds and the number of trials running beside it (each with `--epochs`
intermediate values: Optuna's cached storage reads every unfinished trial again from the
database), on the embedded SQLite study and on PostgreSQL (a server of its own on this machine,
as the team stack runs it). Prints the median and 90th percentile wall per suggest, the
driver's CPU per suggest, and the median tell of the oldest running trial's end.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import optuna

from tune.bridge import RAY_TRIAL_ATTR
from tune.config import load_config
from tune.space import build_space, sample
from tune.study import METRIC, make_searcher

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tox21.yaml"


def finished_trials(n: int, epochs: int, seed: int) -> list[optuna.trial.FrozenTrial]:
    """`n` COMPLETE trials of the job's space (random points), `epochs` values each."""
    rng = np.random.default_rng(seed)
    memory = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space, out = build_space(), []
    for i in range(n):
        trial = memory.ask()
        sample(trial, space)
        curve = np.maximum.accumulate(0.6 + 0.25 * rng.random(epochs))
        out.append(
            optuna.trial.create_trial(
                params=trial.params,
                distributions=trial.distributions,
                value=float(curve[-1]),
                intermediate_values={e + 1: float(v) for e, v in enumerate(curve)},
                user_attrs={RAY_TRIAL_ATTR: f"filled_{i:05d}"},
            )
        )
    return out


@contextlib.contextmanager
def study_url(store: str) -> Iterator[str]:
    if store == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/optuna.db"
        return
    from tests.team_stack import postgres_server

    with postgres_server() as pg:
        yield pg.create_database("study")


def measure(store: str, n: int, in_flight: int, epochs: int, asks: int) -> dict[str, float]:
    """Per new trial, with `n` finished trials in the study and `in_flight` running, each of
    those with `epochs` values: the oldest running trial is told its end, a new one asked."""
    with study_url(store) as url, tempfile.TemporaryDirectory() as tmp:
        job = load_config(
            str(CONFIG),
            {
                "ray.storage_path": tmp,
                "tracking.study_storage": url,
                "tracking.run_name": "suggest",
            },
        )
        searcher, study = make_searcher(job, build_space(), first_run=False)
        study.add_trials(finished_trials(n, epochs, seed=n))
        searcher, _ = make_searcher(job, build_space(), first_run=False)  # as a driver starts

        def start(trial_id: str) -> None:
            searcher.suggest(trial_id)
            for e in range(1, epochs + 1):
                searcher.on_trial_result(trial_id, {METRIC: 0.7, "training_iteration": e})

        running = [f"running_{i:05d}" for i in range(in_flight - 1)]
        for trial_id in running:
            start(trial_id)
        walls, cpus, tells = [], [], []
        for i in range(asks):
            searcher._reports.wait()  # the running trials' epochs are in the study
            trial_id = f"new_{i:05d}"
            w, c = time.perf_counter(), time.process_time()
            searcher.suggest(trial_id)
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
            for e in range(1, epochs + 1):
                searcher.on_trial_result(trial_id, {METRIC: 0.7, "training_iteration": e})
            running.append(trial_id)
            oldest = running.pop(0)
            w = time.perf_counter()
            searcher.on_trial_complete(oldest, {METRIC: 0.7, "training_iteration": epochs})
            tells.append(time.perf_counter() - w)
        return {
            "suggest_ms": 1000 * statistics.median(walls),
            "suggest_p90_ms": 1000 * float(np.quantile(walls, 0.9)),
            "suggest_cpu_ms": 1000 * statistics.median(cpus),
            "tell_ms": 1000 * statistics.median(tells),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--stores", nargs="+", default=["sqlite"], choices=["sqlite", "postgresql"])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--epochs", type=int, default=10, help="values per trial")
    parser.add_argument("--asks", type=int, default=30, help="new trials timed per cell")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"# {platform.machine()}, {platform.python_version()}, optuna {optuna.__version__}")
    print(
        "| store | finished trials | in flight | suggest ms (median) | p90 | driver CPU ms "
        "| tell ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for store in args.stores:
        for n in args.trials:
            for k in args.in_flight:
                r = measure(store, n, k, args.epochs, args.asks)
                print(
                    f"| {store} | {n} | {k} | {r['suggest_ms']:.0f} | {r['suggest_p90_ms']:.0f} | "
                    f"{r['suggest_cpu_ms']:.0f} | {r['tell_ms']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
