"""End-to-end searches through the real Ray, Optuna and MLflow (tiny data, few epochs)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.tune.conftest import children, tiny_job
from toxmodel.checkpoint import load_checkpoint
from toxmodel.model import Ensemble
from tune.drills import FaultPlan
from tune.finalize import FINAL_DIR, score_test
from tune.job import run_job
from tune.prepare import prepare_data
from tune.report import format_result
from tune.study import METRIC
from tune.tracking.names import NOTE_TAG, STOPPED_TAG
from tune.trainable import CHECKPOINT_FILE
from tune.trials import read_trials

pytestmark = pytest.mark.slow


def test_tiny_search_tracks_registers_and_scores_the_test_split(
    tmp_path: Path, small_csv: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tiny_job(tmp_path, small_csv)
    job = replace(job, search=replace(job.search, final_seeds=2, ensemble=3))
    result = run_job(job, progress=False)

    # Every trial ran, the best one is scored on the untouched test split.
    assert len(result.trials) == job.search.num_samples
    # The validation scores reported are those of the checkpointed (best) epoch.
    assert result.best_valid["val_roc_auc"] == pytest.approx(result.trials[METRIC].max())
    assert 0.0 <= result.test.roc_auc <= 1.0
    # The first trial evaluated the known-good default point.
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert len(study.trials) == job.search.num_samples
    assert study.trials[0].params["activation"] == "relu"

    client = MlflowClient(job.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    kids = children(client, result.parent_run_id)
    assert len(kids) == job.search.num_samples
    assert all(k.info.status in ("FINISHED", "FAILED", "KILLED") for k in kids)
    assert all("val_roc_auc" in k.data.metrics for k in kids)
    # The trials table says how far each trial ran and how it ended, as its MLflow run does.
    status = {k.data.tags["toxtune.trial_id"]: k.data.tags["toxtune.status"] for k in kids}
    for row in result.trials.itertuples():
        assert row.status == status[row.trial_id]
        assert row.best_epoch <= row.epochs <= job.search.max_epochs
        assert (row.status == "finished") == (row.epochs == job.search.max_epochs)
    assert "test_roc_auc" in parent.data.metrics
    # Each trial's row, read from its newest checkpoint, is its best epoch's report, the one
    # Ray's analysis finds among all the results in the trial's result file.
    assert best_results(Path(result.experiment_path)) == {
        row.trial_id: (row.epoch, row.val_roc_auc, row.best_epoch)
        for row in result.trials.itertuples()
    }
    # The winner was retrained over two more seeds; their spread is logged beside the score.
    assert result.test_seeds["test_seeds"] == 2
    assert 0.0 <= result.test_seeds["test_roc_auc_mean"] <= 1.0
    assert result.test_seeds["test_roc_auc_std"] >= 0.0
    assert parent.data.metrics["test_roc_auc_mean"] == pytest.approx(
        result.test_seeds["test_roc_auc_mean"]
    )
    version = client.get_model_version_by_alias(job.model_name, "champion")
    assert version.tags["trial_id"] == result.best_trial_id
    assert version.tags["data_hash"]
    # The registered model is the best trial plus two retrained seeds, averaged; the test score
    # reported is that ensemble's, scored once.
    assert version.tags["ensemble"] == "3"
    ensemble = load_checkpoint(Path(result.experiment_path) / FINAL_DIR / CHECKPOINT_FILE)
    assert isinstance(ensemble.model, Ensemble) and len(ensemble.model.members) == 3
    assert ensemble.extra["trial_id"] == result.best_trial_id
    data = prepare_data(job, progress=False)
    assert score_test(ensemble, data)[1].roc_auc == pytest.approx(result.test.roc_auc)

    # The registered model predicts from SMILES, flagging invalid rows.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", job.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{job.model_name}@champion")
    out = model.predict(pd.DataFrame({"smiles": ["CCO", "not a smiles"]}))
    assert out["error"].iloc[0] == "" and out["error"].iloc[1] != ""


def best_results(experiment: Path) -> dict[str, tuple[int, float, int]]:
    """Per trial of a Ray experiment folder, (epoch, val_roc_auc, best_epoch) of the first of
    its results in result.json with the highest METRIC."""
    found: dict[str, dict] = {}
    for path in experiment.glob("*/result.json"):
        for line in path.read_text().splitlines():
            result = json.loads(line)
            seen = found.get(result["trial_id"])
            if METRIC in result and (seen is None or result[METRIC] > seen[METRIC]):
                found[result["trial_id"]] = result
    return {k: (r["epoch"], r["val_roc_auc"], r["best_epoch"]) for k, r in found.items()}


def _overlap(trials: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in trials] + [(e, -1) for _, e in trials])
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize(("share", "expected"), [(0.25, 4), (0.5, 2)])
def test_fractional_gpus_pack_trials(
    tmp_path: Path, small_csv: Path, no_ray: None, share: float, expected: int
) -> None:
    """One logical GPU, plenty of CPUs: concurrency is what the GPU share allows."""
    job = tiny_job(
        tmp_path,
        small_csv,
        **{
            "resources.gpus_per_trial": share,
            "resources.cpus_per_trial": 0.5,
            "ray.num_cpus": 8,
            "ray.num_gpus": 1,
            "search.num_samples": 4,
            "search.max_concurrent": 8,
            "search.scheduler": "fifo",
            "search.max_epochs": 2,
        },
    )
    result = run_job(job, faults=FaultPlan(slow_epochs_s=3.0), progress=False)
    trials = result.trials
    assert (trials["gpu_fraction"] == share).all()
    assert set(trials["gpu_ids"].astype(str)) == {"0"}  # each trial saw its assigned GPU
    spans = list(zip(trials["trial_started_at"], trials["reported_at"], strict=True))
    assert _overlap(spans) == expected


def test_a_spent_error_budget_stops_the_search_and_the_job_says_why(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    """`faults.max_failed_trials: 2`: once two trials have failed for good no other starts; the
    model is the best of those that finished, and the report and the job's MLflow run say the
    search ended early, why, and how to run the rest."""
    job = tiny_job(
        tmp_path,
        small_csv,
        **{
            "search.num_samples": 6,
            "search.max_concurrent": 1,  # one trial at a time: the stop comes before trial 3
            "search.scheduler": "fifo",
            "faults.max_failed_trials": 2,
        },
    )
    result = run_job(job, faults=FaultPlan(raise_in=frozenset({1, 2})), progress=False)
    assert result.failed_trials == 2
    assert len(result.trials) == 3  # trial 0 finished, 1 and 2 failed, 3-5 never started
    said = "the error budget (faults.max_failed_trials = 2) was spent: 2 trials failed for good"
    assert result.stopped.startswith(said) and "2 code_error" in result.stopped
    assert sorted(result.trials["status"]) == ["failed", "failed", "finished"]
    # the failed trials scored an epoch before they raised; the model is still the finished one's
    assert result.trials.set_index("trial_id").loc[result.best_trial_id, "status"] == "finished"
    # the failed ones scored higher here; the table (and the report's top trials) lists them last
    assert list(result.trials["status"]) == ["finished", "failed", "failed"]
    assert result.model_version == "1"
    report = format_result(job, result)
    assert f"search stopped early: {result.stopped}" in report
    assert f"--resume {job.name}" in report
    run = MlflowClient(job.tracking_uri).get_run(result.parent_run_id)
    assert run.data.tags[STOPPED_TAG] == result.stopped
    assert f"**Search stopped early**: {result.stopped}." in run.data.tags[NOTE_TAG]
    found = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert sorted(t.state.name for t in found.get_trials()) == ["COMPLETE", "FAIL", "FAIL"]


def test_failed_and_diverged_trials_do_not_stop_the_search(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    job = tiny_job(tmp_path, small_csv, **{"search.num_samples": 4, "search.scheduler": "fifo"})
    result = run_job(job, faults=FaultPlan(raise_in=frozenset({1}), diverge_in=frozenset({2})))
    client = MlflowClient(job.tracking_uri)
    kids = children(client, result.parent_run_id)
    statuses = sorted(k.info.status for k in kids)
    assert statuses.count("FAILED") == 2 and statuses.count("FINISHED") == 2
    failed = [k for k in kids if k.info.status == "FAILED"]
    kinds = sorted(k.data.tags["toxtune.failure_kind"] for k in failed)
    assert kinds == ["code_error", "diverged"]
    assert result.failed_trials == 2
    assert len(result.trials) == 4
    # the study agrees: the two trials that raised are failed there too, not complete
    found = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert sorted(t.state.name for t in found.get_trials()) == [
        "COMPLETE",
        "COMPLETE",
        "FAIL",
        "FAIL",
    ]

    # A trial whose result files never reached the storage (it failed before they were
    # written, as under load) is still listed, from the experiment state, with its failure.
    storage = Path(job.storage.uri_of(job.name))
    # Ray's JSON and CSV result files are written, its TensorBoard files are not (settings).
    assert list(storage.rglob("result.json")) and list(storage.rglob("progress.csv"))
    assert not list(storage.rglob("events.out.tfevents*"))
    for written in [*storage.rglob("result.json"), *storage.rglob("progress.csv")]:
        written.unlink()
    records = read_trials(job, [job.name])
    assert len(records) == 4
    assert sorted(r.status for r in records).count("failed") == 2
    assert {r.trial_id for r in records} == set(result.trials["trial_id"])


def test_oom_is_retried_with_a_larger_gpu_share(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    job = tiny_job(
        tmp_path,
        small_csv,
        **{
            "resources.gpus_per_trial": 0.25,
            "resources.cpus_per_trial": 0.5,
            "ray.num_gpus": 1,
            "ray.num_cpus": 4,
            "search.num_samples": 2,
            "search.scheduler": "fifo",
        },
    )
    result = run_job(job, faults=FaultPlan(oom_below_share=0.5), progress=False)
    assert len(result.trials) == 2
    assert (result.trials["gpu_fraction"] == 0.5).all()
    assert result.failed_trials == 0


def test_trial_whose_worker_is_killed_is_retried_and_the_job_completes(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    job = tiny_job(tmp_path, small_csv, **{"search.num_samples": 3, "search.scheduler": "fifo"})
    faults = FaultPlan(kill_in=frozenset({1}), marker_dir=str(tmp_path))
    result = run_job(job, faults=faults, progress=False)

    assert (tmp_path / "toxtune-killed-1").exists()  # the worker really was SIGKILLed
    assert result.failed_trials == 0
    assert len(result.trials) == 3

    # One child run per trial, all finished: the retried trial kept its run and its error.
    client = MlflowClient(job.tracking_uri)
    kids = children(client, result.parent_run_id)
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    assert {k.data.tags["toxtune.status"] for k in kids} == {"finished"}
    retried = [k for k in kids if k.data.tags.get("toxtune.retries") == "1"]
    assert len(retried) == 1
    assert retried[0].data.tags["toxtune.last_failure_kind"] == "node_lost"


def test_a_time_limit_that_ends_the_search_early_is_named(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    """`--time-limit 1` used to end with 'no trial finished with a checkpoint' and nothing
    about the time limit."""
    from tune.errors import SearchError

    job = tiny_job(tmp_path, small_csv, **{"search.time_limit_s": 1})
    with pytest.raises(SearchError, match=r"time limit \(1 s"):
        run_job(job, faults=FaultPlan(slow_epochs_s=3.0), progress=False)


def test_trials_pending_on_a_cluster_fail_after_the_bound_naming_resources(
    tmp_path: Path, small_csv: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster pending can be legitimate (autoscaling), so it is bounded, not refused:
    3 CPUs per trial on a 2-CPU cluster fails after `resources.pending_timeout_s`."""
    from tests.services import ray_cluster
    from tune.errors import SearchError

    with ray_cluster(tmp_path / "ray", num_cpus=2) as cluster:
        from ray._raylet import Config

        # A driver joining a token-auth cluster must be in token mode too; Ray caches the mode
        # read when this process first touched its config, so read it again.
        monkeypatch.setenv("RAY_AUTH_MODE", cluster.env["RAY_AUTH_MODE"])
        Config.initialize("")
        job = tiny_job(
            tmp_path,
            small_csv,
            **{
                "ray.address": cluster.address,
                "ray.num_cpus": None,
                "resources.cpus_per_trial": 3,
                "resources.pending_timeout_s": 5,
            },
        )
        with pytest.raises(SearchError, match=r"3 CPU and 0.0 GPU.*'CPU': 2\.0"):
            run_job(job, progress=False)


def test_a_resume_reads_each_round_once_and_the_study_whole_once(
    tmp_path: Path, small_csv: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume's own bookkeeping must not grow with the results per trial (issue 24 item 5):
    Ray's saved state of a round is read once for the end check and the trial records
    together (it was read twice), no trial's result file is parsed when its checkpoint carries
    its best report (every one was parsed, three times before `bridge.ray_results_unread`),
    and the study with all its intermediate values once, for the finished trials a restore
    must not train again (it was read three times). The state is a killed driver's after 4
    simulated trials (no training), as benchmarks/resume_scale.py makes it; one trial's
    checkpoint lacks the best report (as an earlier toxtune wrote it) and only its results are
    read. Each record's row is the one Ray's own analysis picks (its best epoch, not its last),
    and the records are those a fresh reading gives."""
    import json
    import tempfile

    import ray
    from optuna.distributions import FloatDistribution
    from ray import tune as ray_tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from tune import bridge, study, tracking
    from tune.bridge import RAY_TRIAL_ATTR
    from tune.search import Rounds, search

    job = tiny_job(tmp_path, small_csv, search__scheduler="fifo")

    def train_trial(config: dict) -> None:  # named as toxtune's: Ray restores by the name
        from tune.trainable import BEST_ROW_FILE, BestReport

        best, kept = 0.0, BestReport()
        for epoch in range(1, 4):
            value = 0.5 + 0.1 * ((epoch * config["k"]) % 3)  # best epoch: 2, 1, 1, 1
            best = max(best, value)
            metrics = {
                "epoch": epoch,
                "val_roc_auc": value,
                METRIC: best,
                "finished_reason": "max_epochs" if epoch == 3 else "",
            }
            kept.offer(metrics)
            if epoch < 3:
                ray_tune.report(metrics)
                continue
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": epoch}))
                if config["k"] != 4:  # k=4: a checkpoint without it, as earlier toxtunes wrote
                    kept.write(Path(tmp) / BEST_ROW_FILE)
                ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(tmp))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    grid = ray_tune.Tuner(
        ray_tune.with_resources(train_trial, {"cpu": 0.5}),
        param_space={"k": ray_tune.grid_search([1, 2, 3, 4])},
        run_config=ray_tune.RunConfig(
            name=job.name,
            storage_path=job.ray.storage_path,
            verbose=0,
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
        ),
    ).fit()
    assert grid.num_errors == 0 and len(grid) == 4
    found = optuna.create_study(
        storage=study.rdb(job.study_storage), study_name=job.name, direction="maximize"
    )
    found.add_trials(
        optuna.trial.create_trial(
            params={"k": float(r.config["k"])},
            distributions={"k": FloatDistribution(0, 5)},
            value=r.metrics[METRIC],
            intermediate_values=dict(enumerate(r.metrics_dataframe[METRIC], start=1)),
            user_attrs={RAY_TRIAL_ATTR: r.metrics["trial_id"]},
        )
        for r in grid
    )
    uri, experiment = job.tracking_uri, job.tracking.experiment_name
    tracking.start_job_run(uri, experiment, job.name, job.to_dict(), resume=False)
    Rounds([job.name], finished=False, location=job.storage.uri_of(job.name)).save(job)
    data = prepare_data(job, progress=False)
    parent = tracking.start_job_run(uri, experiment, job.name, job.to_dict(), resume=True)

    analyses: list[str] = []  # toxtune's readings of a round's saved state (Ray's own aside)

    saved_experiment = bridge.saved_experiment

    def counted(path: str, *args: object) -> object:
        analyses.append(path)
        return saved_experiment(path, *args)

    read: list[str] = []  # the Ray id of each study trial read from the database
    build = optuna.storages.RDBStorage._build_frozen_trial_from_trial_model

    def reading(self: optuna.storages.RDBStorage, model: object) -> optuna.trial.FrozenTrial:
        frozen = build(self, model)
        read.append(frozen.user_attrs[RAY_TRIAL_ATTR])
        return frozen

    parsed: list[str] = []  # each trial's result file parsed, by anyone (Ray's own builds too)
    parse = ray_tune.ExperimentAnalysis._fetch_trial_dataframe

    def parsing(self: ray_tune.ExperimentAnalysis, trial: object) -> object:
        parsed.append(trial.trial_id)  # type: ignore[attr-defined]
        return parse(self, trial)

    monkeypatch.setattr(ray_tune.ExperimentAnalysis, "_fetch_trial_dataframe", parsing)
    monkeypatch.setattr(bridge, "saved_experiment", counted)
    monkeypatch.setattr(optuna.storages.RDBStorage, "_build_frozen_trial_from_trial_model", reading)
    outcome = search(job, data, parent)
    monkeypatch.undo()

    assert analyses == [job.storage.uri_of(job.name)]
    # Tuner.restore and the end of tune.run built one each, parsing every result again; now
    # only the trial whose checkpoint has no best report is read among its results, once
    assert parsed == [r.metrics["trial_id"] for r in grid if r.config["k"] == 4]
    for r in grid:  # the row of each record is the best epoch's, as Ray's analysis picks it
        frame = r.metrics_dataframe
        expected = frame.loc[frame[METRIC].idxmax()]
        row = next(t.row for t in outcome.trials if t.trial_id == r.metrics["trial_id"])
        assert row["epoch"] == expected["epoch"] and row["config/k"] == r.config["k"]
        assert row["val_roc_auc"] == pytest.approx(expected["val_roc_auc"])
    assert {int(t.row["epoch"]) for t in outcome.trials} == {1, 2}
    assert sorted(read) == sorted(r.metrics["trial_id"] for r in grid)  # each trial once
    fresh = read_trials(job, [job.name])

    def shown(records: list) -> list[str]:
        return [
            json.dumps({**vars(r), "checkpoint": r.checkpoint.path}, sort_keys=True, default=str)
            for r in records
        ]

    assert len(outcome.trials) == 4 and shown(outcome.trials) == shown(fresh)
