"""MLflow tracking against real backends: SQLite and a real `mlflow server`, driven by Ray Tune.

The callback tests run a real (tiny) Ray Tune experiment whose function trainable reports fake
metrics: one trial finishes, one is stopped early by a stopper, one fails on every attempt and
one fails once and then succeeds on retry. Everything is checked through `MlflowClient`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
import ray
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from ray import tune as ray_tune

from tests.services import MlflowServer, free_port
from toxmodel.metrics import evaluate
from tune.tracking import (
    JOB_TAG,
    PARENT_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    DatasetInfo,
    JobSummary,
    MlflowTrialCallback,
    TrackingError,
    TrialEnding,
    check_tracking,
    child_runs,
    close_orphans,
    default_tracking_uri,
    finish_job_run,
    log_job_summary,
    settle_trial_runs,
    source_tags,
    start_job_run,
)
from tune.tracking.backend import EXPERIMENT_KIND_TAG, experiment_url
from tune.trainable import EARLIER_EPOCHS, earlier_epochs

EPOCHS = 3
TASKS = ["NR-AR", "SR-p53"]
DATASET = DatasetInfo(
    name="tox21",
    content_hash="5e" * 32,
    source="/data/tox21.csv",
    rows=41,
    targets=tuple(TASKS),
    split="random:0 (0.8/0.1/0.1)",
)

# Ship this module's functions to Ray workers by value, so a worker does not import the test
# module (and with it MLflow, Optuna, torch): trial actors start seconds sooner.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One small local Ray instance for the module's Tune runs."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(params=["sqlite", "http"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, MlflowServer | None]:
    """Each backend's tracking URI: embedded SQLite, then a real tracking server."""
    if request.param == "sqlite":
        return default_tracking_uri(tmp_path / "store"), None
    server = request.getfixturevalue("mlflow_http")
    return server.url, server


def fake_trial(config: dict[str, Any]) -> None:
    """Reports the metric keys of the real trainable; misbehaves as `config["kind"]` says."""
    kind, epochs = config["kind"], config.get("epochs", EPOCHS)
    marker = Path(config["marker_dir"]) / f"{kind}.failed-once"
    start = 1
    checkpoint = ray_tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start = json.loads((Path(folder) / "state.json").read_text())["epoch"] + 1
    for epoch in range(start, epochs + 1):
        if kind == "crash" and epoch == 2:
            raise ValueError("deliberate bug in the crash trial")
        if kind == "flaky" and epoch == 2 and not marker.exists():
            marker.touch()
            raise RuntimeError("flaky trial fails once")
        if epoch == config.get("signal_at"):
            (Path(config["marker_dir"]) / f"at-{ray_tune.get_context().get_trial_id()}").touch()
        time.sleep(config.get("sleep", 0.0))
        metrics = {
            "train_loss": 1.0 / epoch,
            "val_loss": 1.2 / epoch,
            "val_roc_auc": 0.5 + 0.01 * epoch,
            "val_roc_auc/NR-AR": 0.6 + 0.01 * epoch,
            "val_pr_auc/SR-p53": np.float32(0.3),
            "val_pr_auc/NR-AR": float("nan"),  # a task lacking both classes
            "val_roc_auc/odd(task)": 0.5,  # not a valid MLflow name as it is
            "best_val_roc_auc": 0.5 + 0.01 * epoch,
            "lr": 0.01,
            "epoch_seconds": 0.01,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "device": "cpu",
            "gpu_ids": "",
            "gpu_fraction": 0.0,
            "doomed": kind == "stopped",
            "unrelated": 7.0,
            "finished_reason": "max_epochs" if epoch == epochs else "",
        }
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "state.json").write_text(json.dumps({"epoch": epoch}))
            ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(folder))


def stop_doomed(trial_id: str, result: dict[str, Any]) -> bool:
    """The stopper playing the ASHA scheduler: stops the `stopped` trial after epoch 2."""
    return bool(result.get("doomed")) and result["training_iteration"] >= 2


def run_tune(
    tmp_path: Path,
    callback: MlflowTrialCallback,
    kinds: list[str],
    **config: Any,
) -> ray_tune.ResultGrid:
    tuner = ray_tune.Tuner(
        fake_trial,
        param_space={
            "kind": ray_tune.grid_search(kinds),
            "marker_dir": str(tmp_path),
            "model": {"hidden": [8, 4], "dropout": 0.1},
            **config,
        },
        tune_config=ray_tune.TuneConfig(reuse_actors=True),
        run_config=ray_tune.RunConfig(
            name="job",
            storage_path=str(tmp_path / "ray"),
            callbacks=[callback],
            failure_config=ray_tune.FailureConfig(max_failures=1),
            checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=1),
            stop=stop_doomed,
            verbose=0,
        ),
    )
    return tuner.fit()


def bounce_when_signalled(server: MlflowServer, folder: Path, down_s: float) -> threading.Thread:
    """Restart the tracking server (same port and store) once a trial writes its marker."""

    def bounce() -> None:
        deadline = time.monotonic() + 120
        while not list(folder.glob("at-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.stop()
        time.sleep(down_s)
        server.start()

    thread = threading.Thread(target=bounce, daemon=True)
    thread.start()
    return thread


def by_kind(client: MlflowClient, parent: str) -> dict[str, Run]:
    kids = child_runs(client, parent)
    out = {k.data.params["kind"]: k for k in kids}
    assert len(out) == len(kids), "one child run per trial, no duplicates"
    return out


def steps(client: MlflowClient, run: Run, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def artifacts(client: MlflowClient, run: Run, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id, path)}


def datasets(client: MlflowClient, run_id: str) -> list[tuple[str, str, str]]:
    """(name, digest, context) of each dataset input of a run."""
    return [
        (d.dataset.name, d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in client.get_run(run_id).inputs.dataset_inputs
    ]


@pytest.mark.slow  # a local Ray, and over HTTP a real MLflow server stopped and restarted
def test_trial_runs_statuses_metrics_and_errors(
    backend: tuple[str, MlflowServer | None],
    tmp_path: Path,
    local_ray: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Over HTTP the server is also stopped and restarted mid-run: nothing may be lost."""
    uri, server = backend
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    check_tracking(uri)
    config = {"search": {"num_samples": 4}, "data": {"source": "x.csv"}}
    parent = start_job_run(uri, "exp", "job-1", config, resume=False)
    callback = MlflowTrialCallback(uri, "exp", parent, max_epochs=EPOCHS, dataset=DATASET)
    if server is None:
        grid = run_tune(tmp_path, callback, ["ok", "stopped", "crash", "flaky"])
    else:
        thread = bounce_when_signalled(server, tmp_path, down_s=2)
        try:
            grid = run_tune(
                tmp_path, callback, ["ok", "stopped", "crash", "flaky"], signal_at=2, sleep=0.3
            )
        finally:
            thread.join(timeout=120)
        assert callback.deferrals > 0, "the server was never seen down: the test proved nothing"
    finish_job_run(uri, parent, "FINISHED")

    assert callback.pending == 0 and callback.dropped == []
    client = MlflowClient(uri)
    parents = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`{JOB_TAG}` = 'job-1'"
    )
    assert [r.info.run_id for r in parents] == [parent]
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(parent).data.params["search.num_samples"] == "4"
    assert "config.json" in artifacts(client, client.get_run(parent))
    one_input = [("tox21", "5e" * 8, "train")]  # once, however often it was replayed
    assert datasets(client, parent) == one_input
    assert source_tags().items() <= client.get_run(parent).data.tags.items()

    kids = by_kind(client, parent)
    assert set(kids) == {"ok", "stopped", "crash", "flaky"}
    trial_ids = {r.metrics["trial_id"] for r in grid}
    assert len(trial_ids) == 4
    assert {k.data.tags[TRIAL_TAG] for k in kids.values()} == trial_ids
    for kid in kids.values():
        assert kid.data.tags[PARENT_TAG] == parent
        assert kid.info.status != "RUNNING"
        assert kid.data.params["model.hidden"] == "[8, 4]"
        assert kid.data.tags["device"] == "cpu" and kid.data.tags["node_id"]
        assert kid.data.tags["node_ip"] and kid.data.tags["gpu_fraction"] == "0.0"
        assert "unrelated" not in kid.data.metrics and "doomed" not in kid.data.metrics
        assert "training_iteration" not in kid.data.metrics
        assert datasets(client, kid.info.run_id) == one_input
        assert kid.data.tags["mlflow.source.name"] == "toxtune"
        assert source_tags().items() <= kid.data.tags.items()

    ok = kids["ok"]
    assert (ok.info.status, ok.data.tags[STATUS_TAG]) == ("FINISHED", "finished")
    assert ok.data.tags["toxtune.finished_reason"] == "max_epochs"
    for key in ("train_loss", "val_roc_auc", "best_val_roc_auc", "lr", "epoch_seconds"):
        assert steps(client, ok, key) == [1, 2, 3], key  # headline metrics: every epoch
    # Per-task scores: once, at the trial's end, from its best row (without a `best_epoch` in
    # the results, the latest) at that row's step.
    for key in ("val_roc_auc/NR-AR", "val_pr_auc/SR-p53", "val_roc_auc/odd_task_"):
        assert steps(client, ok, key) == [3], key
    nan_task = client.get_metric_history(ok.info.run_id, "val_pr_auc/NR-AR")
    assert len(nan_task) == 1 and math.isnan(nan_task[0].value)
    history = client.get_metric_history(ok.info.run_id, "val_roc_auc/NR-AR")
    assert [round(m.value, 4) for m in history] == [0.63]

    stopped = kids["stopped"]
    assert (stopped.info.status, stopped.data.tags[STATUS_TAG]) == ("FINISHED", "early_stopped")
    assert steps(client, stopped, "val_roc_auc") == [1, 2]
    assert steps(client, stopped, "val_roc_auc/NR-AR") == [2]

    crash = kids["crash"]
    assert (crash.info.status, crash.data.tags[STATUS_TAG]) == ("FAILED", "failed")
    assert "deliberate bug in the crash trial" in crash.data.tags["toxtune.error"]
    assert len(crash.data.tags["toxtune.error"]) <= 500
    assert crash.data.tags["toxtune.failure_kind"] == "code_error"
    assert crash.data.tags["toxtune.retries"] == "1"
    assert {"error.txt", "errors"} <= artifacts(client, crash)
    assert artifacts(client, crash, "errors") == {"errors/attempt-1.txt", "errors/attempt-2.txt"}
    full = client.download_artifacts(crash.info.run_id, "error.txt", str(tmp_path))
    text = Path(full).read_text()
    assert text.count("Failure # ") == 2 and "ValueError: deliberate bug" in text  # both attempts
    assert "\x1b[" not in text  # terminal colour codes are stripped
    assert steps(client, crash, "val_roc_auc") == [1]  # the retry resumed from epoch 1
    assert steps(client, crash, "val_roc_auc/NR-AR") == [1]  # a failed trial's too

    flaky = kids["flaky"]
    assert (flaky.info.status, flaky.data.tags[STATUS_TAG]) == ("FINISHED", "finished")
    assert flaky.data.tags["toxtune.retries"] == "1"
    assert artifacts(client, flaky, "errors") == {"errors/attempt-1.txt"}
    assert steps(client, flaky, "val_roc_auc") == [1, 2, 3]  # the same run continued
    assert steps(client, flaky, "val_roc_auc/NR-AR") == [3]

    if server is None:
        store = tmp_path / "store"
        assert (store / "mlflow.db").is_file() and (store / "mlartifacts").is_dir()
        assert ok.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert not {"mlruns", "mlflow.db", "mlartifacts"} & {p.name for p in tmp_path.iterdir()}


def test_check_tracking_refuses_an_unreachable_server_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError, match="unreachable") as err:
        check_tracking(url, timeout=2)
    assert url in str(err.value) and "--tracking-uri" in str(err.value)
    assert time.monotonic() - start < 5


def test_check_tracking_sqlite_paths(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "new" / "deeper")
    assert uri == f"sqlite:///{tmp_path.resolve()}/new/deeper/mlflow.db"
    check_tracking(uri)
    assert (tmp_path / "new" / "deeper").is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="cannot create"):
        check_tracking(f"sqlite:///{blocker}/mlflow.db")
    for bad in ("file:///tmp/mlruns", str(tmp_path / "mlruns")):
        with pytest.raises(TrackingError, match="file store"):
            check_tracking(bad)


def test_resume_reopens_the_same_job_run(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    config = {"search": {"num_samples": 4, "space": "default"}, "name": "it's; odd"}
    first = start_job_run(uri, "exp", "it's a job; rm -rf /", config, resume=False)
    client = MlflowClient(uri)
    assert client.get_run(first).data.params["search.num_samples"] == "4"
    assert {"config.json", "config.yaml"} <= {a.path for a in client.list_artifacts(first)}
    finish_job_run(uri, first, "KILLED")
    assert client.get_run(first).info.status == "KILLED"

    grown = {**config, "search": {"num_samples": 8, "space": "default"}}
    again = start_job_run(uri, "exp", "it's a job; rm -rf /", grown, resume=True)
    assert again == first
    run = client.get_run(again)
    assert run.info.status == "RUNNING" and run.data.tags["toxtune.resumes"] == "1"
    assert run.data.params["search.num_samples"] == "4"  # MLflow params are immutable
    assert "config/resume-1.json" in {a.path for a in client.list_artifacts(first, "config")}

    fresh = start_job_run(uri, "exp", "it's a job; rm -rf /", config, resume=False)
    other = start_job_run(uri, "exp", "another job", config, resume=True)
    assert len({first, fresh, other}) == 3
    assert start_job_run(uri, "exp", "it's a job; rm -rf /", config, resume=True) == fresh


def test_experiments_are_tagged_for_the_training_runs_view(tmp_path: Path) -> None:
    """MLflow 3 shows an experiment without a kind as GenAI (traces); toxtune's are training."""
    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    start_job_run(uri, "fresh", "job", {}, resume=False)
    kind = client.get_experiment_by_name("fresh").tags[EXPERIMENT_KIND_TAG]
    assert kind == "custom_model_development"

    older = client.create_experiment("older")  # made before toxtune tagged its experiments
    start_job_run(uri, "older", "job", {}, resume=False)
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"

    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    start_job_run(uri, "chosen", "job", {}, resume=False)
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"

    # MLflow 3.17's UI follows its workflow switch, not the tag: toxtune's links set it.
    assert experiment_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )
    assert experiment_url("http://h:5000", "7", "abc").endswith(
        "/#/experiments/7/runs/abc?workflowType=machine_learning"
    )


def test_close_orphans_kills_only_runs_that_will_not_continue(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path)
    parent = start_job_run(uri, "exp", "job", {}, resume=False)
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id

    def child(trial_id: str, status: str) -> str:
        run = client.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: trial_id})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    keep, lost, done = child("t1", "RUNNING"), child("t2", "RUNNING"), child("t3", "FINISHED")
    assert close_orphans(uri, parent, {"t1"}) == [lost]
    assert client.get_run(lost).info.status == "KILLED"
    assert client.get_run(lost).data.tags[STATUS_TAG] == "killed"
    assert client.get_run(keep).info.status == "RUNNING"
    assert client.get_run(done).info.status == "FINISHED"
    finish_job_run(uri, parent, "failed")
    assert client.get_run(keep).info.status == "KILLED"
    assert client.get_run(parent).info.status == "FAILED"


def test_settle_ends_runs_whose_trials_ended_before_the_kill_with_their_lost_epochs(
    tmp_path: Path,
) -> None:
    """A driver killed just after a trial ended took that trial's last epoch and its closing
    with it: the run is RUNNING with epoch 1 only, while Ray's state has the trial finished.
    Settling gives it the lost epochs once (also those a restored report carried), its best
    report's per-task scores at the best step, its ending tags and FINISHED; a run whose trial
    is still unfinished stays open for close_orphans, and a closed run is left alone. A run
    the driver's watcher (or a stop that gave up) ended KILLED is open in this sense: its trial
    ended in Ray's state, so it was not the stop's to end."""
    uri = default_tracking_uri(tmp_path)
    parent = start_job_run(uri, "exp", "job", {}, resume=False)
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id

    def child(trial_id: str, status: str = "RUNNING") -> str:
        run_id = client.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: trial_id}).info.run_id
        client.log_metric(run_id, "train_loss", 0.9, step=1)
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    lost, failed, running, closed = child("t1"), child("t2"), child("t3"), child("t4", "FINISHED")
    watched, restored = child("t5", "KILLED"), child("t6", "KILLED")  # the watcher's doing
    reports = [  # epoch 2 came back in a restored trial's first report (epoch 3)
        {"training_iteration": 1, "epoch": 1, "train_loss": 0.9, "val_roc_auc": 0.6},
        {
            "training_iteration": 3,
            "epoch": 3,
            "train_loss": 0.5,
            "val_roc_auc": 0.7,
            EARLIER_EPOCHS: json.dumps([{"epoch": 2, "train_loss": 0.7, "val_roc_auc": 0.8}]),
            "config/lr": 0.01,
        },
    ]
    best = {"epoch": 2, "val_roc_auc": 0.8, "val_roc_auc/NR-AR": 0.75, "config/lr": 0.01}
    read: list[str] = []

    def ending(trial_id: str, status: str, epochs: int) -> TrialEnding:
        def history() -> list[dict[str, Any]]:
            read.append(trial_id)
            return reports[:epochs]

        reason = "max_epochs" if status == "finished" else ""
        return TrialEnding(trial_id, status, reason, epochs, best, history)

    endings = [
        ending("t1", "finished", 3),
        ending("t2", "failed", 1),
        ending("t3", "running", 2),
        ending("t4", "finished", 3),
        ending("t5", "finished", 3),
        ending("t6", "running", 2),
    ]
    assert sorted(settle_trial_runs(uri, parent, endings)) == sorted([lost, failed, watched])

    run = client.get_run(lost)
    assert run.info.status == "FINISHED"
    assert run.data.tags[STATUS_TAG] == "finished"
    assert run.data.tags["toxtune.epochs"] == "3"
    assert run.data.tags["toxtune.finished_reason"] == "max_epochs"
    steps = [(m.step, m.value) for m in client.get_metric_history(lost, "train_loss")]
    assert sorted(steps) == [(1, 0.9), (2, 0.7), (3, 0.5)]
    per_task = client.get_metric_history(lost, "val_roc_auc/NR-AR")
    assert [(m.step, m.value) for m in per_task] == [(2, 0.75)]
    assert not [k for k in run.data.metrics if k.startswith("config")]
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(failed).data.tags[STATUS_TAG] == "failed"
    assert sorted(read) == ["t1", "t5"]  # the failed run had its one epoch: no result file read
    assert client.get_run(watched).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(watched, "train_loss")) == [1, 2, 3]
    assert client.get_run(restored).info.status == "KILLED"  # its restored trial reopens it
    assert client.get_run(running).info.status == "RUNNING"
    assert client.get_run(closed).info.status == "FINISHED"
    assert STATUS_TAG not in client.get_run(closed).data.tags
    assert settle_trial_runs(uri, parent, endings) == []  # a second pass changes nothing


def _study(n: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(
        lambda t: (
            -((t.suggest_float("lr", 1e-4, 1e-1, log=True) - 0.01) ** 2)
            - 0.1 * t.suggest_int("layers", 1, 3)
        ),
        n_trials=n,
    )
    return study


def _summary(tmp_path: Path, study: optuna.Study | None, test_metrics: Any) -> JobSummary:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(40, 2)).astype(float)
    y[0, 1] = np.nan
    p = np.clip(y * 0.6 + rng.random((40, 2)) * 0.4, 0, 1)
    p[np.isnan(p)] = 0.5
    report = tmp_path / "invalid_smiles.csv"
    report.write_text("row,smiles,reason\n3,xyz,SMILES Parse Error\n")
    return JobSummary(
        n_rows=41,
        n_valid=40,
        content_hash="abc123",
        source="tox21.csv",
        invalid_report=report,
        search_space={"lr": {"kind": "float", "low": 1e-4, "high": 0.1, "log": True}},
        ray_address="local",
        cluster={"nodes": 1, "cpus": 2.0, "gpus": 0.0},
        best_trial_id="t_00001",
        best_valid={"val_roc_auc": 0.8, "val_roc_auc/NR-AR": 0.75, "pr_auc": 0.4},
        test_metrics=test_metrics,
        trials=pd.DataFrame({"trial_id": ["t_00000", "t_00001"], "val_roc_auc": [0.7, 0.8]}),
        best_params={"lr": 0.01},
        study=study,
        roc_data=(y, p, TASKS),
    )


def test_job_summary_metrics_artifacts_and_plots(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "store")
    client = MlflowClient(uri)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=(30, 2)).astype(np.float32)
    metrics = evaluate(y, np.clip(y * 0.5 + rng.random((30, 2)) * 0.5, 0, 1), TASKS)

    parent = start_job_run(uri, "exp", "summary", {}, resume=False)
    duplicates = tmp_path / "duplicates.csv"  # as prepare writes it when rows were folded
    duplicates.write_text("line,row,smiles,molecule,kept_line\n7,5,OCC,CCO,3\n")
    summary = dataclasses.replace(
        _summary(tmp_path, _study(6), metrics), duplicates_report=duplicates
    )
    log_job_summary(uri, parent, summary)
    run = client.get_run(parent)
    assert run.data.tags["dataset.content_hash"] == "abc123"
    assert datasets(client, parent) == [("tox21", "abc123", "train")]
    profile = json.loads(run.inputs.dataset_inputs[0].dataset.profile)
    assert (profile["num_rows"], profile["num_targets"]) == (41, 2)
    assert run.data.tags["dataset.invalid_rows"] == "1"
    assert (run.data.tags["ray.nodes"], run.data.tags["ray.cpus"]) == ("1", "2.0")
    assert run.data.tags["best_trial_id"] == "t_00001"
    assert run.data.metrics["best_val_roc_auc"] == pytest.approx(0.8)
    assert run.data.metrics["best_val_roc_auc/NR-AR"] == pytest.approx(0.75)
    assert run.data.metrics["best_val_pr_auc"] == pytest.approx(0.4)
    assert run.data.metrics["test_roc_auc"] == pytest.approx(metrics.roc_auc)
    for task in TASKS:
        assert run.data.metrics[f"test_roc_auc/{task}"] == pytest.approx(
            metrics.per_task[task]["roc_auc"]
        )
    names = {a.path for a in client.list_artifacts(parent)}
    assert {"trials.csv", "search_space.json", "best_params.json", "dataset", "plots"} <= names
    assert {a.path for a in client.list_artifacts(parent, "dataset")} == {
        "dataset/invalid_smiles.csv",
        "dataset/duplicates.csv",  # beside it, so a reviewer finds both reports in one place
    }
    folded = client.download_artifacts(parent, "dataset/duplicates.csv", str(tmp_path / "dl"))
    assert Path(folded).read_text() == duplicates.read_text()
    plots = {a.path for a in client.list_artifacts(parent, "plots")}
    assert plots == {
        "plots/optimization_history.png",
        "plots/param_importance.png",
        "plots/roc_curves.png",
    }
    local = Path(client.download_artifacts(parent, "plots/roc_curves.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trials = pd.read_csv(client.download_artifacts(parent, "trials.csv", str(tmp_path)))
    assert list(trials["trial_id"]) == ["t_00000", "t_00001"]

    # A single complete trial: no importance plot, a note saying why; a plain test dict.
    other = start_job_run(uri, "exp", "summary-1", {}, resume=False)
    log_job_summary(
        uri, other, _summary(tmp_path, _study(1), {"roc_auc": 0.7, "roc_auc/NR-AR": 0.65})
    )
    run = client.get_run(other)
    assert "at least 2 complete trials" in run.data.tags["toxtune.note.param_importance"]
    assert {a.path for a in client.list_artifacts(other, "plots")} == {
        "plots/optimization_history.png",
        "plots/roc_curves.png",
    }
    assert run.data.metrics["test_roc_auc"] == pytest.approx(0.7)
    assert run.data.metrics["test_roc_auc/NR-AR"] == pytest.approx(0.65)
    assert not math.isnan(run.data.metrics["best_val_roc_auc"])


def test_job_summary_description_says_what_the_terminal_says(tmp_path: Path) -> None:
    uri = default_tracking_uri(tmp_path / "store")
    client = MlflowClient(uri)
    trials = pd.DataFrame(
        {
            "trial_id": [f"t_{i:05d}" for i in range(7)],
            "best_val_roc_auc": [0.70, 0.81, 0.65, 0.79, float("nan"), 0.74, 0.72],
            "best_epoch": [3, 4, 2, 5, 0, 3, 1],
            "epochs": [5, 6, 2, 8, 1, 4, 2],
            "status": ["finished"] * 4 + ["failed", "early_stopped", "finished"],
            "config/lr": [0.01, 0.003, 0.1, 0.02, 0.05, 0.2, 0.3],
            "config/_index": list(range(7)),
        }
    )
    summary = dataclasses.replace(
        _summary(tmp_path, _study(6), {"roc_auc": 0.7712, "pr_auc": 0.3321}),
        trials=trials,
        best_trial_id="t_00001",
        best_valid={"val_roc_auc": 0.81, "val_pr_auc": 0.4567},
        test_seeds={
            "test_seeds": 3.0,
            "test_roc_auc_mean": 0.765,
            "test_roc_auc_std": 0.012,
            "test_pr_auc_mean": 0.33,
            "test_pr_auc_std": 0.02,
        },
        dataset=DATASET,
    )
    parent = start_job_run(uri, "exp", "described", {}, resume=False)
    log_job_summary(uri, parent, summary)
    note = client.get_run(parent).data.tags["mlflow.note.content"]

    assert "**Best trial `t_00001`** of 7 on `tox21`" in note
    assert "| validation (best trial) | 0.8100 | 0.4567 |" in note
    assert "| test (random:0 split) | 0.7712 | 0.3321 |" in note
    assert "| test, retrained over 3 seeds | 0.7650 ± 0.0120 | 0.3300 ± 0.0200 |" in note
    table = [line for line in note.splitlines() if line.startswith("| t_")]
    assert [row.split(" | ")[0] for row in table] == [
        "| t_00001",
        "| t_00003",
        "| t_00005",
        "| t_00006",
        "| t_00000",
    ]  # the best 5 by validation, as the terminal lists them; no `_index` column
    assert "| trial_id | best_val_roc_auc | best_epoch | epochs | status | lr |" in note
    assert "Best configuration: lr=0.01" in note
    for name in ("optimization_history", "param_importance", "roc_curves"):
        link = f"get-artifact?path=plots%2F{name}.png&run_uuid={parent}"
        assert f"[{name}]({link})" in note


@dataclasses.dataclass
class _Trial:
    """What the callback reads of a Tune trial."""

    trial_id: str
    config: dict[str, Any]
    last_result: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        return f"train_trial_{self.trial_id}"


def test_results_wait_for_no_request_and_go_one_request_per_trial(tmp_path: Path) -> None:
    """The Tune loop hands results over and goes on while MLflow is busy (a request in flight);
    what piled up meanwhile goes as one request per trial, in order, every epoch logged once."""
    uri = default_tracking_uri(tmp_path / "store")
    check_tracking(uri)
    parent = start_job_run(uri, "exp", "job-1", {"search": {"num_samples": 3}}, resume=False)
    callback = MlflowTrialCallback(uri, "exp", parent, max_epochs=EPOCHS)
    trials = [_Trial(f"t{i}", {"lr": 0.01 * (i + 1)}) for i in range(3)]
    for trial in trials:
        callback.on_trial_start(0, [], trial)
    assert callback.flush(timeout_s=60)
    started = callback.requests
    with callback._sending:  # a request in flight: the sender cannot start another
        for epoch in range(1, EPOCHS + 1):
            for trial in trials:
                result = {"training_iteration": epoch, "train_loss": 1 / epoch, "epoch": epoch}
                result.update({"val_roc_auc/NR-AR": 0.5 + epoch / 100, "device": "cpu"})
                callback.on_trial_result(0, [], trial, result)  # returns at once
                trial.last_result = {**result, "finished_reason": "max_epochs"}
        assert callback.pending == len(trials) * EPOCHS
    assert callback.flush(timeout_s=60)
    assert callback.requests - started == len(trials)  # nine epochs, three requests
    for trial in trials:
        callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    assert callback.pending == 0 and callback.dropped == []
    client = MlflowClient(uri)
    kids = {k.data.tags[TRIAL_TAG]: k for k in child_runs(client, parent)}
    assert set(kids) == {"t0", "t1", "t2"}
    for kid in kids.values():
        assert steps(client, kid, "train_loss") == [1, 2, 3]
        assert steps(client, kid, "val_roc_auc/NR-AR") == [3]  # per task: once, at the end
        assert kid.data.tags["device"] == "cpu"
        assert (kid.info.status, kid.data.tags[STATUS_TAG]) == ("FINISHED", "finished")


def test_trials_the_search_ended_are_told_apart_from_those_the_scheduler_stopped(
    tmp_path: Path,
) -> None:
    """Each way a trial completes, as its run and the trials table say it: its own stop
    (`finished`), the scheduler's after an epoch (`early_stopped`), and the search's end (the
    time limit or the error budget) before its first epoch: `stopped`, run KILLED, 0 epochs. It
    used to read as `early_stopped` with 0 epochs, a scheduler decision no epoch was behind."""
    from tune.config import load_config
    from tune.trials import _ending

    uri = default_tracking_uri(tmp_path / "store")
    check_tracking(uri)
    parent = start_job_run(uri, "exp", "job-1", {"search": {"num_samples": 3}}, resume=False)
    callback = MlflowTrialCallback(uri, "exp", parent, max_epochs=EPOCHS)
    own = _Trial("own", {}, {**_epoch(2), "finished_reason": "patience"})
    asha, never = _Trial("asha", {}, _epoch(1)), _Trial("never", {})
    for trial in (own, asha):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, trial.last_result)
    for trial in (own, asha, never):
        callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    kids = {k.data.tags[TRIAL_TAG]: k for k in child_runs(MlflowClient(uri), parent)}
    seen = {
        name: (k.info.status, k.data.tags[STATUS_TAG], k.data.tags["toxtune.epochs"])
        for name, k in kids.items()
    }
    assert seen == {
        "own": ("FINISHED", "finished", "2"),
        "asha": ("FINISHED", "early_stopped", "1"),
        "never": ("KILLED", "stopped", "0"),
    }
    job = load_config(overrides={"search.max_epochs": EPOCHS})
    assert _ending(job, "TERMINATED", {}) == (0, "stopped", "")  # the trials table's word
    assert _ending(job, "TERMINATED", _epoch(1)) == (1, "early_stopped", "")


def _epoch(epoch: int) -> dict[str, Any]:
    return {"training_iteration": epoch, "epoch": epoch, "train_loss": 1 / epoch}


def test_results_pass_other_trials_starts_and_ends_but_never_their_own(tmp_path: Path) -> None:
    """With trials starting and ending between their results (ASHA at many trials in flight),
    each trial's queued epochs still go as one request a send: a result may pass another
    trial's start or end in the queue, never its own trial's, nor the job's own operations."""
    uri = default_tracking_uri(tmp_path / "store")
    check_tracking(uri)
    parent = start_job_run(uri, "exp", "job-1", {"search": {"num_samples": 4}}, resume=False)
    callback = MlflowTrialCallback(uri, "exp", parent, max_epochs=EPOCHS)
    t0, t1, t2, t3 = trials = [_Trial(f"t{i}", {"lr": 0.01}) for i in range(4)]
    for trial in trials[:3]:
        callback.on_trial_start(0, [], trial)
    assert callback.flush(timeout_s=60)
    started = callback.requests
    with callback._sending:  # nothing goes while the queue builds up
        for trial in (t0, t1, t2):
            callback.on_trial_result(0, [], trial, _epoch(1))
        t0.last_result = {**_epoch(1), "finished_reason": "patience"}
        callback.on_trial_complete(0, [], t0)
        callback.on_trial_result(0, [], t1, _epoch(2))
        callback.on_trial_start(0, [], t3)
        callback.on_trial_result(0, [], t3, _epoch(1))  # waits for its run to exist
        callback.on_trial_result(0, [], t2, _epoch(2))
        callback.on_trial_result(0, [], t1, _epoch(3))
    assert callback.flush(timeout_s=60)
    # one a trial, t0's end and t3's start with their epochs (seven when results stopped at
    # each start and end)
    assert callback.requests - started == 4
    for trial, epochs in ((t1, 3), (t2, 2), (t3, 1)):
        trial.last_result = {**_epoch(epochs), "finished_reason": "max_epochs"}
        callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    assert callback.pending == 0 and callback.dropped == []
    client = MlflowClient(uri)
    kids = {k.data.tags[TRIAL_TAG]: k for k in child_runs(client, parent)}
    for name, epochs in (("t0", 1), ("t1", 3), ("t2", 2), ("t3", 1)):
        assert steps(client, kids[name], "train_loss") == list(range(1, epochs + 1)), name
        assert kids[name].info.status == "FINISHED", name


def test_a_result_never_passes_its_own_trials_operation_or_the_jobs() -> None:
    """What one send takes from the queue: the results that may go now, each trial's in order;
    a result behind an operation of its own trial, or behind one of the job's, waits."""
    from tune.tracking.callback import _Op

    callback = MlflowTrialCallback("sqlite:///unused.db", "exp", "parent", max_epochs=EPOCHS)
    a, b, c = (_Trial(name, {}) for name in "abc")

    def result(trial: _Trial, step: int) -> _Op:
        return _Op(f"result {trial.trial_id}#{step}", trial=trial, step=step)

    queue = [
        result(a, 1),
        result(b, 1),
        _Op("end a", lambda: None, "a"),
        result(a, 2),  # behind its own trial's end: waits
        result(b, 2),  # passes a's end
        _Op("job", lambda: None),  # the job's own: nothing later passes it
        result(c, 1),
    ]
    callback._queue.extend(queue)
    assert [op.what for op in callback._take()] == ["result a#1", "result b#1", "result b#2"]
    assert [op.what for op in callback._queue] == ["end a", "result a#2", "job", "result c#1"]
    assert [op.what for op in callback._take()] == ["end a"]
    assert [op.what for op in callback._take()] == ["result a#2"]


def test_a_trials_start_and_end_go_with_its_epochs_and_nothing_of_it_passes_its_end() -> None:
    """What one send takes when trials start and end between sends (ASHA's churn): a trial's
    start, its epochs and its closing together, in order; after its closing nothing of that
    trial goes in the same send."""
    from tune.tracking.callback import _Closing, _Op

    callback = MlflowTrialCallback("sqlite:///unused.db", "exp", "parent", max_epochs=EPOCHS)
    a, b = (_Trial(name, {}) for name in "ab")
    ending = _Closing("FINISHED", {}, [])
    callback._queue.extend(
        [
            _Op("start a", trial=a, opening=True),
            _Op("result a#1", trial=a, step=1),
            _Op("start b", trial=b, opening=True),
            _Op("complete a", trial=a, closing=ending),
            _Op("restore a", trial=a, opening=True),  # after its own end: the next send
            _Op("result b#1", trial=b, step=1),
        ]
    )
    assert [op.what for op in callback._take()] == [
        "start a",
        "result a#1",
        "start b",
        "complete a",
        "result b#1",
    ]
    assert [op.what for op in callback._queue] == ["restore a"]


def test_a_trial_started_alone_has_its_params_before_its_first_epoch(tmp_path: Path) -> None:
    """A start sent before any epoch of the trial arrived (a long first epoch) makes the run
    with its params at once: the MLflow UI never shows a running trial without its config."""
    uri = default_tracking_uri(tmp_path / "store")
    check_tracking(uri)
    parent = start_job_run(uri, "exp", "job-1", {"search": {"num_samples": 1}}, resume=False)
    callback = MlflowTrialCallback(uri, "exp", parent, max_epochs=EPOCHS)
    trial = _Trial("t0", {"lr": 0.01, "width": 256})
    callback.on_trial_start(0, [], trial)
    assert callback.flush(timeout_s=60)
    (kid,) = child_runs(MlflowClient(uri), parent)
    assert kid.data.params == {"lr": "0.01", "width": "256"}
    assert kid.info.status == "RUNNING" and kid.data.tags[STATUS_TAG] == "running"
    callback.on_trial_result(0, [], trial, _epoch(1))
    trial.last_result = {**_epoch(1), "finished_reason": "max_epochs"}
    callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    (kid,) = child_runs(MlflowClient(uri), parent)
    assert kid.data.params == {"lr": "0.01", "width": "256"}
    assert steps(MlflowClient(uri), kid, "train_loss") == [1]
    assert kid.info.status == "FINISHED" and callback.dropped == []


def test_the_sender_spaces_its_sends_by_the_trials_it_sends_for() -> None:
    """One request per trial a send: with 32 trials reporting, the sender waits 32 /
    REQUESTS_PER_S = 4 s before its next send, so a team's server gets about 8 requests a
    second, each with more epochs; with 4 trials it sends again after SEND_EVERY_S."""
    from tune.tracking import callback as cb

    assert (cb.REQUESTS_PER_S, cb.SEND_EVERY_S) == (8.0, 1.0)

    def gaps(n_trials: int) -> float:
        callback = MlflowTrialCallback("sqlite:///unused.db", "exp", "parent", max_epochs=9)
        sent: list[tuple[float, str, list[int]]] = []
        callback._log_results = lambda ops: sent.append(  # type: ignore[method-assign]
            (time.monotonic(), ops[0].trial.trial_id, [op.step for op in ops])
        )
        trials = [_Trial(f"t{i}", {}) for i in range(n_trials)]
        with callback._sending:  # the first send takes every trial's first epoch
            for trial in trials:
                callback.on_trial_result(0, [], trial, _epoch(1))
        deadline = time.monotonic() + 30
        while len(sent) < n_trials and time.monotonic() < deadline:
            time.sleep(0.01)
        for trial in trials:
            callback.on_trial_result(0, [], trial, _epoch(2))
        while len(sent) < 2 * n_trials and time.monotonic() < deadline:
            time.sleep(0.01)
        callback._stop_sender(5)
        assert sorted((t, steps) for _, t, steps in sent) == sorted(
            [(t.trial_id, [1]) for t in trials] + [(t.trial_id, [2]) for t in trials]
        )  # one request a trial a send, each epoch once
        return sent[n_trials][0] - sent[0][0]

    assert 3.5 <= gaps(32) <= 6.0
    assert 0.8 <= gaps(4) <= 2.5


def test_a_trials_run_costs_the_server_three_requests_and_the_console_nothing(
    mlflow_http: MlflowServer, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """At many trials in flight every trial's start and end reaches the team's server: a new
    trial's run is made without a search (the job's earlier runs are listed once), running and
    tagged so when made; its params, its epochs queued meanwhile, its best row's scores and
    its ending tags go in one request, without reading the run back; and one request ends it,
    without MLflow's read of the whole run and two "View run" console lines a trial."""
    import mlflow.store.tracking.rest_store as rest_store

    calls: collections.Counter[str] = collections.Counter()
    real = rest_store.call_endpoint

    def counted(creds: Any, endpoint: str, *args: Any, **kwargs: Any) -> Any:
        calls[endpoint.rsplit("/mlflow/", 1)[-1]] += 1
        return real(creds, endpoint, *args, **kwargs)

    uri = mlflow_http.url
    parent = start_job_run(uri, "exp", "job-1", {"search": {"num_samples": 4}}, resume=False)
    callback = MlflowTrialCallback(uri, "exp", parent, max_epochs=2)
    trials = [_Trial(f"t{i}", {"lr": 0.01 * (i + 1), "width": 256}) for i in range(4)]
    capfd.readouterr()
    monkeypatch.setattr(rest_store, "call_endpoint", counted)
    with callback._sending:  # each trial's epochs go together
        for trial in trials:
            callback.on_trial_start(0, [], trial)
            for epoch in (1, 2):
                result = {**_epoch(epoch), "val_roc_auc/NR-AR": 0.6, "best_epoch": epoch}
                callback.on_trial_result(0, [], trial, result)
                trial.last_result = {**result, "finished_reason": "max_epochs"}
            callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    monkeypatch.setattr(rest_store, "call_endpoint", real)
    assert callback.pending == 0 and callback.dropped == []
    assert "View run" not in capfd.readouterr().out
    assert calls["runs/search"] == 1 and calls["runs/get"] <= 2, calls  # once, not per trial
    assert calls["runs/set-tag"] == 0 and calls["runs/create"] == 4, calls
    # per trial: create, its params + epochs + ending, the end; the job's run read once (5 a
    # trial when the params and the ending went alone; 8 before that: a search, two reads, two
    # tags, separate ending metrics and tags)
    assert calls["runs/log-batch"] == 4 and calls["runs/update"] == 4, calls
    assert sum(calls.values()) <= 4 * 3 + 3, calls
    client = MlflowClient(uri)
    kids = {k.data.tags[TRIAL_TAG]: k for k in child_runs(client, parent)}
    for trial in trials:
        kid = kids[trial.trial_id]
        assert kid.info.status == "FINISHED" and kid.info.end_time, trial
        assert kid.data.tags[STATUS_TAG] == "finished"
        assert kid.data.tags["toxtune.finished_reason"] == "max_epochs"
        assert kid.data.params["lr"] == str(trial.config["lr"])
        assert steps(client, kid, "train_loss") == [1, 2]
        assert steps(client, kid, "val_roc_auc/NR-AR") == [2]


def test_a_restored_trial_logs_the_epochs_a_killed_driver_never_sent(tmp_path: Path) -> None:
    """Epochs 3-4 were still queued for MLflow when the driver died; the restored trial's first
    report (epoch 5, from its checkpoint) carries its history, and its run ends with every
    epoch once, with the values the trial trained to."""
    uri = default_tracking_uri(tmp_path / "store")
    check_tracking(uri)
    parent = start_job_run(uri, "exp", "job-1", {"search": {"num_samples": 1}}, resume=False)
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_roc_auc": 0.5 + e / 20, "val_roc_auc/NR-AR": 0.6}
        | {"val_loss": 0.7, "lr": 0.01, "seconds": 0.1 * e, "train_seconds": 0.05}
        for e in range(1, 6)
    ]

    def result(row: dict[str, Any], **extra: Any) -> dict[str, Any]:
        headline = {k: v for k, v in row.items() if k not in ("seconds", "train_seconds")}
        best = {"best_val_roc_auc": row["val_roc_auc"]}  # rising: each epoch is the best
        return {
            **headline,
            **best,
            "training_iteration": row["epoch"],
            "epoch_seconds": 0.1,
            **extra,
        }

    first = MlflowTrialCallback(uri, "exp", parent, max_epochs=5)
    trial = _Trial("t0", {"lr": 0.01})
    first.on_trial_start(0, [], trial)
    for row in history[:2]:
        first.on_trial_result(0, [], trial, result(row))
    first.on_experiment_end([])  # epochs 1-2 reached MLflow; 3-4 died in the killed driver

    second = MlflowTrialCallback(uri, "exp", parent, max_epochs=5)
    second.on_trial_restore(0, [], trial)
    earlier = json.dumps(earlier_epochs(history[:-1]))
    second.on_trial_result(0, [], trial, result(history[-1], **{EARLIER_EPOCHS: earlier}))
    trial.last_result = {**result(history[-1]), "finished_reason": "max_epochs"}
    second.on_trial_complete(0, [], trial)
    second.on_experiment_end([])

    assert second.pending == 0 and second.dropped == []
    client = MlflowClient(uri)
    (kid,) = child_runs(client, parent)
    losses = client.get_metric_history(kid.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in losses) == [(e, 1 / e) for e in range(1, 6)]
    for key in ("val_roc_auc", "val_loss", "lr", "epoch_seconds", "best_val_roc_auc"):
        assert steps(client, kid, key) == [1, 2, 3, 4, 5], key
    best = client.get_metric_history(kid.info.run_id, "best_val_roc_auc")
    assert {m.step: m.value for m in best}[4] == pytest.approx(0.7)
    assert steps(client, kid, "train_seconds") == []  # a result names no such metric
