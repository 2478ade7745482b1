"""Resume at scale: how long `toxtune tune --resume` takes over a job of many finished trials.

    python benchmarks/resume_scale.py                          # 100/300/1000 trials x 10/100
    python benchmarks/resume_scale.py --trials 1000 --results 10 100 --profile /tmp/resume.prof

Each cell first makes the state a killed driver leaves behind after `trials` trials of `results`
epochs each finished (simulated, no training): Ray Tune's experiment folder, written by Ray Tune
itself running a trivial trainable that reports a Tox21 trial's metrics (12 tasks) `results`
times with a small checkpoint at its end (holding its best report, as toxtune's trainable writes
it); the Optuna study (SQLite) with one COMPLETE trial per Ray trial, tagged with its Ray id and
holding an intermediate value per epoch; the MLflow parent run (SQLite); and the job's round
file saying the round did not finish. Then, timed, the resume's bookkeeping as `toxtune tune
--resume` runs it: the stores checked, the parent run reopened, and `tune.search.search` (Ray's
state restored with toxtune's callbacks, the restored Tune loop run, the round's end checked,
the study counted, every trial's record read). Data preparation (features cached) and the record
stage are not in the figure: neither reads the trials' results.

The goal: seconds at 1,000 trials, and no growth with the number of results per trial.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks.driver
from benchmarks.driver import tox21_result
from toxmodel.sources import TOX21_TASKS

TOX21 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tox21.csv"


def train_trial(config: dict[str, Any]) -> None:
    """Report `_results` epochs of a Tox21 trial's metrics at once, a checkpoint with the last
    (named as toxtune's trainable: Ray restores an experiment with a trainable of its name)."""
    import numpy as np
    from ray import tune as ray_tune

    from tune.trainable import BEST_ROW_FILE, BestReport

    rng = np.random.default_rng(int(config["seed"]))
    n = int(config["_results"])
    best, kept = 0.0, BestReport()
    for epoch in range(1, n + 1):
        metrics, best = tox21_result(epoch, rng, best, 0.1)
        metrics.update(
            {
                "finished_reason": "max_epochs" if epoch == n else "",
                "node_id": "simulated",
                "pid": os.getpid(),
            }
        )
        kept.offer(metrics)
        if epoch < n:
            ray_tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.pt").write_bytes(b"\0" * 65536)
            kept.write(Path(tmp) / BEST_ROW_FILE)  # as toxtune's trainable: its best report
            (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": epoch}))
            ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(tmp))


@dataclass
class Cell:
    trials: int
    results: int
    make_s: float = 0.0
    resume_s: float = 0.0
    found: int = 0  # trial records the resume read back
    phases: dict[str, float] = field(default_factory=dict)  # seconds in each timed step


# The steps of the resume timed apart: (module, function, label). Ray's restore reads every
# trial's result history once more inside "restore + Tune loop" (ray.tune ExperimentAnalysis).
PHASES = (
    ("tune.search", "init_ray", "Ray start"),
    ("tune.bridge", "restore_tuner", "Tune restore"),
    ("tune.search", "_all_ended", "end check"),
    ("tune.search", "read_trials", "trial records"),
    ("tune.study", "load", "study loads"),
)


@contextlib.contextmanager
def timed_phases(into: dict[str, float]) -> Iterator[None]:
    """Add the seconds spent in each of PHASES to `into` while the block runs."""
    import importlib

    saved = []
    for module_name, name, label in PHASES:
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def timed(*args: Any, _f: Any = original, _label: str = label, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _f(*args, **kwargs)
            finally:
                into[_label] = into.get(_label, 0.0) + time.perf_counter() - t0

        saved.append((module, name, original))
        setattr(module, name, timed)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


def job_for(root: Path, data: Path, trials: int, results: int) -> Any:
    """A job whose results, study and MLflow live under `root`."""
    from tune.config import load_config

    return load_config(
        overrides={
            "data.source": str(data),
            "data.targets": TOX21_TASKS,
            "data.cache_dir": str(root.parent / "cache"),
            "featurizer.n_bits": 256,
            "search.num_samples": trials,
            "search.max_epochs": results,
            "search.scheduler": "fifo",
            "resources.cpus_per_trial": 1,
            "ray.storage_path": str(root / "results"),
            "ray.num_cpus": 2,
            "tracking.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "tracking.run_name": f"resume-{trials}x{results}",
            "tracking.experiment_name": "resume-scale",
            "tracking.registered_model_name": None,
        }
    )


def make_state(job: Any, trials: int, results: int) -> None:
    """What a driver killed after `trials` finished trials leaves (see the module docstring)."""
    import optuna
    import ray
    from optuna.distributions import FloatDistribution
    from ray import tune as ray_tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tune import study, tracking
    from tune.bridge import RAY_TRIAL_ATTR
    from tune.search import Rounds

    # The trials run `tox21_result` from benchmarks/driver.py, which Ray's workers cannot import
    # (the repository is not on their path): ship that module's functions by value.
    ray.cloudpickle.register_pickle_by_value(benchmarks.driver)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = ray_tune.Tuner(
            ray_tune.with_resources(train_trial, {"cpu": 0.25}),
            param_space={
                "lr": ray_tune.loguniform(1e-4, 1e-2),
                "seed": ray_tune.randint(0, 2**31),
                "_results": results,
            },
            tune_config=ray_tune.TuneConfig(
                num_samples=trials, max_concurrent_trials=8, reuse_actors=True
            ),
            run_config=ray_tune.RunConfig(
                name=job.name,
                storage_path=job.ray.storage_path,
                verbose=0,
                # the result files toxtune's driver writes (tune.search.driver_callbacks)
                callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
            ),
        )
        grid = tuner.fit()
    finally:
        ray.shutdown()
    assert grid.num_errors == 0 and len(grid) == trials
    found = optuna.create_study(
        storage=study.rdb(job.study_storage), study_name=job.name, direction="maximize"
    )
    frozen = []
    for result in grid:
        curve = result.metrics_dataframe["best_val_roc_auc"].tolist()
        frozen.append(
            optuna.trial.create_trial(
                params={"lr": result.config["lr"]},
                distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)},
                value=curve[-1],
                intermediate_values=dict(enumerate(curve, start=1)),
                user_attrs={RAY_TRIAL_ATTR: result.metrics["trial_id"]},
            )
        )
    found.add_trials(frozen)
    tracking.start_job_run(
        job.tracking_uri, job.tracking.experiment_name, job.name, job.to_dict(), resume=False
    )
    Rounds([job.name], finished=False, location=job.storage.uri_of(job.name)).save(job)


def resume(job: Any, data: Any) -> int:
    """The resume's bookkeeping, as `toxtune tune --resume` runs it; the trials read back."""
    import ray

    from tune import study, tracking
    from tune.search import Rounds, search

    study.check_job_stores(job, started=bool(Rounds.load(job).names))
    parent = tracking.start_job_run(
        job.tracking_uri, job.tracking.experiment_name, job.name, job.to_dict(), resume=True
    )
    try:
        outcome = search(job, data, parent)
    finally:
        ray.shutdown()
    return len(outcome.trials)


def run_cell(root: Path, data_csv: Path, cell: Cell, profile: Path | None) -> Cell:
    from tune.prepare import load_job_table, prepare_data

    folder = root / f"{cell.trials}x{cell.results}"
    folder.mkdir()
    job = job_for(folder, data_csv, cell.trials, cell.results)
    t0 = time.perf_counter()
    make_state(job, cell.trials, cell.results)
    cell.make_s = time.perf_counter() - t0
    data = prepare_data(job, progress=False, table=load_job_table(job))  # features cached
    profiler = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    with profiler or contextlib.nullcontext(), timed_phases(cell.phases):
        cell.found = resume(job, data)
    cell.resume_s = time.perf_counter() - t0
    if profiler is not None and profile is not None:
        profiler.dump_stats(f"{profile}.{cell.trials}x{cell.results}")
    return cell


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--results", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--profile", type=Path, help="write cProfile stats to PROFILE.<cell>")
    args = parser.parse_args()

    import pandas as pd

    from tune import settings

    settings.configure_process()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    cells = []
    with tempfile.TemporaryDirectory(prefix="toxtune-resume-") as tmp:
        root = Path(tmp)
        data_csv = root / "tox21_small.csv"
        pd.read_csv(TOX21)[["smiles", *TOX21_TASKS]].head(300).to_csv(data_csv, index=False)
        for trials in args.trials:
            for results in args.results:
                cell = run_cell(root, data_csv, Cell(trials, results), args.profile)
                cells.append(cell)
                print(
                    f"{trials} trials x {results} results: state made in {cell.make_s:.0f} s, "
                    f"resumed in {cell.resume_s:.1f} s ({cell.found} trials read)",
                    flush=True,
                )
    print()
    labels = [label for _, _, label in PHASES]
    head = " | ".join(labels)
    print(f"| trials | results per trial | resume s | {head} | Tune loop, rest | trials read |")
    print("|---|---|---|" + "---|" * len(labels) + "---|---|")
    for c in cells:
        steps = " | ".join(f"{c.phases.get(label, 0.0):.1f}" for label in labels)
        rest = c.resume_s - sum(c.phases.values())
        print(f"| {c.trials} | {c.results} | {c.resume_s:.1f} | {steps} | {rest:.1f} | {c.found} |")
    by_trials: dict[int, list[Cell]] = {}
    for c in cells:
        by_trials.setdefault(c.trials, []).append(c)
    for trials, row in by_trials.items():
        row.sort(key=lambda c: c.results)
        if len(row) > 1:
            ratio = row[-1].resume_s / row[0].resume_s
            print(
                f"{trials} trials: {row[-1].results} results per trial resume in {ratio:.2f}x "
                f"the time of {row[0].results}"
            )


if __name__ == "__main__":
    main()
