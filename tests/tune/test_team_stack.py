"""A team's stack, for real: results in an S3-compatible bucket, MLflow on PostgreSQL with its
artifacts in the bucket, the Optuna study in PostgreSQL. Nothing is left on the driver's disk."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.services import (
    BIN,
    MlflowServer,
    invoke,
    kill_ray_node,
    model_server,
    ray_cluster,
    run_or_show_stacks,
    start_submit,
    submitted_job_id,
    wait_for_trial_on,
)
from tests.team_stack import (
    SMALL_TARGETS,
    Postgres,
    S3Server,
    bucket_keys,
    job_environment,
    postgres_available,
    postgres_server,
    s3_server,
    small_tox21_job,
    submit_together,
    team_mlflow,
)
from tests.tune.conftest import children, tiny_job
from tune.cluster import submission
from tune.cluster.info import alive_nodes
from tune.config import JobConfig
from tune.drills import FaultPlan
from tune.job import JobResult, run_job

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server binaries not installed"),
]


@dataclass
class Stack:
    s3: S3Server
    pg: Postgres
    mlflow: MlflowServer
    study_storage: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One stack for the module's tests (starting it takes ~15 s): each test names its own job,
    experiment and model, so they share the bucket, the databases and the server as a team's
    jobs do."""
    with s3_server() as s3, postgres_server() as pg:
        backend = pg.create_database("mlflow")
        study = pg.create_database("optuna")
        root = tmp_path_factory.mktemp("team-mlflow")
        with team_mlflow(backend, f"{s3.uri}/mlartifacts", root) as server:
            yield Stack(s3, pg, server, study)


def _empty_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory for the driver: the tests check it stays empty."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    return workdir


def _team_job(
    tmp_path: Path, data: Path, stack: Stack, name: str, **overrides: object
) -> JobConfig:
    """The tiny job with its results in the bucket, MLflow on the team server, the study in
    PostgreSQL; `name` is its job, experiment and registered model (unique per test)."""
    return tiny_job(
        tmp_path,
        data,
        **{
            "ray.storage_path": f"{stack.s3.uri}/toxtune",
            "tracking.tracking_uri": stack.mlflow.url,
            "tracking.study_storage": stack.study_storage,
            "tracking.run_name": name,
            "tracking.experiment_name": name,
            "tracking.registered_model_name": name,
            **overrides,
        },
    )


def test_object_store_job_keeps_everything_in_the_bucket_and_registers_a_servable_model(
    tmp_path: Path,
    small_csv: Path,
    no_ray: None,
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = _empty_workdir(tmp_path, monkeypatch)
    table = pd.read_csv(small_csv)
    repeated = tmp_path / "repeated.csv"  # three molecules twice: averaged, and reported
    pd.concat([table, table.head(3)]).to_csv(repeated, index=False)
    overrides = {"search.ensemble": 2, "data.duplicates": "average"}
    job = _team_job(tmp_path, repeated, stack, "objects", **overrides)
    result = run_job(job, progress=False)

    keys = bucket_keys(stack.s3, f"toxtune/{result.name}/")
    names = {k.rsplit("/", 1)[-1] for k in keys}
    assert {"toxtune_job.yaml", "toxtune_fingerprint.json", "toxtune_done.json"} <= names
    assert {"invalid_smiles.csv", "duplicates.csv"} <= names
    assert any(k.rsplit("/", 1)[-1].startswith("experiment_state") for k in keys)
    checkpoints = [k for k in keys if "/checkpoint_" in k and k.endswith("/model.pt")]
    assert len(checkpoints) >= 1
    assert f"toxtune/{result.name}/final/model.pt" in keys
    assert result.experiment_path == f"{stack.s3.uri}/toxtune/{result.name}"
    # Nothing under the working directory: no ./s3:, no mlflow.db, no optuna.db.
    assert list(workdir.iterdir()) == []
    assert not (Path.cwd() / "s3:").exists()

    # The study is in PostgreSQL, with every trial.
    study = optuna.load_study(study_name=result.name, storage=stack.study_storage)
    assert len(study.trials) == job.search.num_samples

    # The model's artifacts went to the bucket through the server; it loads and predicts.
    assert any(k.startswith("mlartifacts/") for k in bucket_keys(stack.s3))
    client = MlflowClient(stack.mlflow.url)
    version = client.get_model_version_by_alias(job.model_name, "champion")
    assert version.tags["data_hash"]
    # Both data reports reach the job's run, read back from the bucket.
    folded = client.download_artifacts(result.parent_run_id, "dataset", str(tmp_path / "dl"))
    assert sorted(p.name for p in Path(folded).iterdir()) == [
        "duplicates.csv",
        "invalid_smiles.csv",
    ]
    listed = set(pd.read_csv(Path(folded) / "duplicates.csv")["line"])
    assert {len(table) + 2, len(table) + 3, len(table) + 4} <= listed  # the repeats' file lines
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow.url)
    model = mlflow.pyfunc.load_model(f"models:/{job.model_name}@champion")
    out = model.predict(pd.DataFrame({"smiles": ["CCO", "not a smiles"]}))
    assert out["error"].iloc[0] == "" and out["error"].iloc[1] != ""


def test_driver_killed_resumes_from_the_bucket_and_the_postgres_study(
    tmp_path: Path, small_csv: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver's working directory is gone with the driver; the job continues from what the
    bucket and PostgreSQL hold, with no trial lost or duplicated and no run left RUNNING."""
    from tests.tune.test_resume import kill_and_resume, write_config

    workdir = _empty_workdir(tmp_path, monkeypatch)
    config = write_config(
        tmp_path,
        small_csv,
        num_samples=6,
        ray_={"storage_path": f"{stack.s3.uri}/toxtune"},
        tracking={"tracking_uri": stack.mlflow.url, "study_storage": stack.study_storage},
    )
    kill_and_resume(tmp_path, config)
    assert [p.name for p in workdir.iterdir()] == []
    keys = bucket_keys(stack.s3, "toxtune/killme/")
    assert any(k.endswith("toxtune_done.json") for k in keys)


def test_trial_worker_killed_on_the_team_stack_is_retried_from_the_bucket(
    tmp_path: Path, small_csv: Path, no_ray: None, stack: Stack
) -> None:
    """The retried trial restores its checkpoint from the bucket; every trial finishes, one
    MLflow run each, and the study in PostgreSQL has them all."""
    job = _team_job(
        tmp_path,
        small_csv,
        stack,
        "worker-killed",
        **{"search.num_samples": 3, "search.scheduler": "fifo"},
    )
    faults = FaultPlan(kill_in=frozenset({1}), marker_dir=str(tmp_path))
    result = run_job(job, faults=faults, progress=False)

    assert (tmp_path / "toxtune-killed-1").exists()  # the worker really was SIGKILLed
    assert result.failed_trials == 0 and len(result.trials) == 3
    kids = children(MlflowClient(stack.mlflow.url), result.parent_run_id)
    assert len(kids) == 3 and {k.info.status for k in kids} == {"FINISHED"}
    retried = [k for k in kids if k.data.tags.get("toxtune.retries") == "1"]
    assert len(retried) == 1 and retried[0].data.tags["toxtune.last_failure_kind"] == "node_lost"
    study = optuna.load_study(study_name=result.name, storage=stack.study_storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


def test_team_mlflow_server_restarted_mid_job_loses_no_result(
    tmp_path: Path, small_csv: Path, no_ray: None, stack: Stack
) -> None:
    """The PostgreSQL-backed server is stopped for 8 s, 12 s into a job of 1-s epochs: every
    epoch of every trial still arrives (replayed), no run is left RUNNING, and the model is
    registered."""
    job = _team_job(
        tmp_path,
        small_csv,
        stack,
        "mlflow-restart",
        **{"search.max_epochs": 4, "search.scheduler": "fifo"},
    )

    thread = stack.mlflow.bounce_later(after_s=12, down_s=8)
    try:
        result = run_job(job, faults=FaultPlan(slow_epochs_s=1.0), progress=False)
    finally:
        thread.join()
    client = MlflowClient(stack.mlflow.url)
    kids = children(client, result.parent_run_id)
    assert len(kids) == job.search.num_samples
    for kid in kids:
        assert kid.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "train_loss")]
        assert steps == [1, 2, 3, 4]  # every epoch of every trial arrived
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias(job.model_name, "champion")


def _when_checkpointed(stack: Stack, name: str, fault: Callable[[], None]) -> threading.Thread:
    """In a thread: once the job `name` has a trial checkpoint in the bucket (it is mid-search,
    past its preparation), run `fault`. Join it before checking what arrived."""

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if any("/checkpoint_" in k for k in bucket_keys(stack.s3, f"toxtune/{name}/")):
                break
            time.sleep(0.5)
        fault()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def _assert_whole_record(stack: Stack, job: JobConfig, result: JobResult) -> None:
    """Every trial COMPLETE in the study, FINISHED in MLflow with every epoch, and the model
    registered: what a fault in the middle of the job must not take away."""
    study = optuna.load_study(study_name=result.name, storage=stack.study_storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * job.search.num_samples
    client = MlflowClient(stack.mlflow.url)
    kids = children(client, result.parent_run_id)
    assert len(kids) == job.search.num_samples
    for kid in kids:
        assert kid.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "train_loss")]
        assert steps == list(range(1, job.search.max_epochs + 1))  # every epoch arrived
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert client.get_model_version_by_alias(job.model_name, "champion")


def test_postgres_restarted_mid_job_loses_no_trial_and_no_epoch(
    tmp_path: Path, small_csv: Path, no_ray: None, stack: Stack
) -> None:
    """The team's PostgreSQL (the study and MLflow's backend both) is stopped for 5 s while
    trials train, then started again: the job waits for it and finishes whole."""
    name = "pg-restart"
    job = _team_job(
        tmp_path, small_csv, stack, name, **{"search.max_epochs": 4, "search.scheduler": "fifo"}
    )
    before = stack.pg.connections("optuna")  # earlier tests' looks at the study
    thread = _when_checkpointed(stack, name, lambda: _restart(stack.pg, down_s=5.0))
    try:
        result = run_job(job, faults=FaultPlan(slow_epochs_s=1.0), progress=False)
    finally:
        thread.join()
    # the searcher kept its study connections through the job, and closed them at its end
    # (before this test's own look at the study opens one)
    assert stack.pg.connections("optuna") <= before
    _assert_whole_record(stack, job, result)


def _restart(pg: Postgres, down_s: float) -> None:
    pg.stop()
    time.sleep(down_s)
    pg.start()


def test_object_store_unreachable_for_10_s_mid_job_loses_nothing(
    tmp_path: Path, small_csv: Path, no_ray: None, stack: Stack
) -> None:
    """The bucket cannot be reached for 10 s while trials train and checkpoint (connections
    refused, open ones reset; the store keeps its content, as a restarted or re-routed one
    does): the job finishes whole, its checkpoints and end marker in the bucket."""
    name = "s3-outage"
    job = _team_job(
        tmp_path, small_csv, stack, name, **{"search.max_epochs": 4, "search.scheduler": "fifo"}
    )

    def outage() -> None:
        stack.s3.proxy.cut()
        time.sleep(10.0)
        stack.s3.proxy.restore()

    thread = _when_checkpointed(stack, name, outage)
    try:
        result = run_job(job, faults=FaultPlan(slow_epochs_s=1.0), progress=False)
    finally:
        thread.join()
    _assert_whole_record(stack, job, result)
    keys = bucket_keys(stack.s3, f"toxtune/{name}/")
    assert any(k.endswith("toxtune_done.json") for k in keys)
    assert any(k.endswith("/final/model.pt") for k in keys)


def test_a_node_that_cannot_reach_the_bucket_fails_the_job_at_start_by_name(
    tmp_path: Path, small_csv: Path, stack: Stack
) -> None:
    """A worker whose S3 endpoint is wrong (as a node without credentials or a route to the
    bucket would be) fails the job before any trial runs, and only that node is blamed."""
    import sys

    from tests.services import _ray

    with ray_cluster(tmp_path / "ray", num_cpus=2, dashboard=True) as cluster:
        blind = Path(f"{cluster.temp_dir}_blind")
        cluster.node_dirs.append(blind)
        _ray(
            [
                "start",
                f"--address={cluster.address}",
                "--num-cpus=1",
                "--node-ip-address=127.0.0.1",
                f"--temp-dir={blind}",
            ],
            {**cluster.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},  # nothing listens there
        )
        config = tmp_path / "job.yaml"
        job = _team_job(
            tmp_path,
            small_csv,
            stack,
            "blind-node",
            **{"ray.address": cluster.address, "ray.num_cpus": None},
        )
        config.write_text(yaml.safe_dump(job.to_dict()))
        out = run_or_show_stacks(
            [str(Path(sys.executable).parent / "toxtune"), "tune", "--config", str(config)],
            timeout=600,
            env=cluster.env,
        )
        nodes = {n.node_id: n for n in alive_nodes(cluster.dashboard_url)}
    assert out.returncode == 1, out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("toxtune tune: error:")]
    assert len(error) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "not shared by all 2 nodes" in error[0]
    blamed = [n for n in nodes.values() if n.node_id[:8] in error[0]]
    assert len(blamed) == 1 and not blamed[0].is_head, error[0]  # the blind worker only
    client = MlflowClient(stack.mlflow.url)
    experiment = client.get_experiment_by_name(job.tracking.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]  # the job's run only: no trial ran


def _cluster_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 4-trial, 4-epoch job on 300 Tox21 rows (0.5 logical GPU per trial, 1-s epochs; a
    2-network ensemble registered), and the environment the cluster's nodes (started next)
    hand to it; returns the config."""
    job_environment(tmp_path, monkeypatch, epoch_s=1.0)
    return small_tox21_job(
        tmp_path,
        "tiny.yaml",
        search={
            "num_samples": 4,
            "max_epochs": 4,
            "max_concurrent": 2,
            "ensemble": 2,  # the registered model has a spread to serve
            "space": {
                "n_layers": {"low": 1, "high": 2},
                "width_0": {"choices": [64]},
                "width_1": {"choices": [32]},
                "batch_size": {"choices": [64]},
            },
        },
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0.5},
        tracking={
            "experiment_name": "toxtune-cluster-e2e",
            "run_name": "cluster-e2e",
            "registered_model_name": "toxtune-cluster-e2e",
        },
    )


def test_submitted_job_on_two_nodes_sharing_no_folder_survives_losing_a_node(
    tmp_path: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`toxtune submit --follow` to a head and a worker node (logical GPUs, 0.5 per trial), each
    with its own temp dir, the job with its own working directory: the bucket and PostgreSQL
    are all they share. A trial trains on the worker, the worker is then SIGKILLed, and the
    job still succeeds with every trial finished (the lost one retried on the head from its
    checkpoint in the bucket); the model is registered, and `toxtune predict` and `mlflow
    models serve` load it from the object store."""
    config = _cluster_job(tmp_path, monkeypatch)
    client = MlflowClient(stack.mlflow.url)
    with ray_cluster(tmp_path / "ray", num_cpus=1, num_gpus=2, dashboard=True) as ray_c:
        head = {n.node_id for n in alive_nodes(ray_c.dashboard_url)}
        ray_c.add_node(num_cpus=1, num_gpus=2)
        worker = {n.node_id for n in alive_nodes(ray_c.dashboard_url)} - head
        assert len(worker) == 1
        cmd = [
            str(BIN / "toxtune"), "submit", "--address", ray_c.dashboard_url,
            "--config", str(config), "--tracking-uri", stack.mlflow.url,
            "--storage-path", f"{stack.s3.uri}/team", "--study-storage", stack.study_storage,
            "--follow",
        ]  # fmt: skip
        proc, out_path, err_path = start_submit(cmd, tmp_path)
        try:
            job_id = submitted_job_id(proc, out_path, err_path, timeout_s=300)
            jobs = submission.JobsClient.connect(ray_c.dashboard_url)
            # Wait until a trial is training on the worker node (so both nodes ran trials),
            # then take the node away; that trial's run then carries the node it retried on.
            experiment_id = wait_for_trial_on(
                jobs, job_id, client, "toxtune-cluster-e2e", worker, timeout_s=300
            )
            assert kill_ray_node(ray_c.node_dirs[0]) > 0
            proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        stdout, stderr = out_path.read_text(), err_path.read_text()
        report = f"rc={proc.returncode}\n{stdout[-4000:]}\n{stderr[-3000:]}"
        assert proc.returncode == 0, report + stack.mlflow.log_tail()
        assert jobs.status(job_id) == "SUCCEEDED", jobs.logs(job_id)[-6000:]
        assert "--address auto" in stdout and "--tracking-uri=" in stdout
        assert "best trial:" in stdout  # --follow streamed the job's own report
        assert {n.node_id for n in alive_nodes(ray_c.dashboard_url)} == head  # it really left

    runs = client.search_runs([experiment_id], max_results=500)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    kids = [r for r in runs if r is not parents[0]]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in kids)
    trials = [r for r in runs if "node_id" in r.data.tags]
    states = [{k: v for k, v in r.data.tags.items() if k.startswith("toxtune.")} for r in trials]
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}, states
    retried = [r for r in trials if r.data.tags.get("toxtune.retries")]
    assert retried and all(r.data.tags["node_id"] in head for r in retried), states
    champion = client.get_model_version_by_alias("toxtune-cluster-e2e", "champion")
    assert champion.version and champion.status == "READY"
    keys = bucket_keys(stack.s3, "team/cluster-e2e/")
    assert any(k.endswith("toxtune_done.json") for k in keys)
    assert any("/checkpoint_" in k for k in keys)
    assert not (tmp_path / "s3:").exists()  # the URI was not taken for a local folder

    # The registered model, from the object store: toxtune predict and the REST server.
    source = tmp_path / "in.csv"
    source.write_text("smiles\nCCO\nnot-a-smiles\n")
    out = subprocess.run(
        [
            str(BIN / "toxtune"), "predict", "--model", "models:/toxtune-cluster-e2e@champion",
            str(source), "--output", str(tmp_path / "p.csv"), "--tracking-uri", stack.mlflow.url,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    predicted = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert predicted["error"][0] == "" and predicted["error"][1] != ""
    with model_server("models:/toxtune-cluster-e2e@champion", stack.mlflow.url, tmp_path) as url:
        rows = invoke(url, ["CCO", "not-a-smiles"])
    assert rows[0]["error"] == "" and rows[1]["error"] != ""
    assert all(value is None for key, value in rows[1].items() if key not in ("smiles", "error"))
    # Both read the same registered model (an ensemble, calibrated, with its domain): the same
    # probabilities, spreads and similarity for the same molecule.
    for task in SMALL_TARGETS:
        for served, written in ((task, f"p_{task}"), (f"{task}_std", f"p_{task}_std")):
            assert rows[0][served] == pytest.approx(float(predicted[written][0]), abs=1e-6)
    assert rows[0]["nn_similarity"] == pytest.approx(float(predicted["nn_similarity"][0]))
    assert str(rows[0]["in_domain"]) == predicted["in_domain"][0]


def _shared_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, experiment: str) -> Path:
    """A 2-trial, 2-epoch job on 300 Tox21 rows (1 logical CPU per trial, 5-s epochs, so the
    jobs' searches last long enough to overlap), and the environment the cluster's node
    (started next) hands to its jobs; returns the config. No run name: each submit names its
    job afresh."""
    job_environment(tmp_path, monkeypatch, epoch_s=5.0)
    return small_tox21_job(
        tmp_path,
        "shared.yaml",
        search={"num_samples": 2, "max_epochs": 2, "max_concurrent": 2},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0},
        tracking={"experiment_name": experiment, "registered_model_name": experiment},
    )


def test_two_jobs_submitted_together_share_the_cluster_and_keep_their_records_apart(
    tmp_path: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `toxtune submit` of one config at once, to one Ray cluster with room for both
    (4 logical CPUs, 2 trials of 1 CPU each per job), one bucket, one MLflow server, one
    PostgreSQL: each job gets a name of its own, both succeed, `toxtune jobs list` shows both
    with their state, their trials run side by side (neither waits for the other to finish),
    and each job's study, runs, bucket folder and model version are its own."""
    experiment = "shared-stack"
    config = _shared_config(tmp_path, monkeypatch, experiment)
    with ray_cluster(tmp_path / "ray", num_cpus=4, dashboard=True) as ray_c:
        ids = submit_together(
            tmp_path,
            config,
            stack.s3,
            stack.mlflow.url,
            stack.study_storage,
            ray_c.dashboard_url,
            n=2,
        )
        jobs = submission.JobsClient.connect(ray_c.dashboard_url)
        for job_id in ids:
            status = jobs.wait(job_id, poll_s=1.0)
            assert status == "SUCCEEDED", jobs.logs(job_id)[-6000:]
        names = {job_id: jobs.details(job_id).name for job_id in ids}
        listed = subprocess.run(
            [str(BIN / "toxtune"), "jobs", "list", "--address", ray_c.dashboard_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert listed.returncode == 0, listed.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:3] for line in listed.stdout.splitlines()[1:]}
    assert {i: rows[i] for i in ids} == {i: [names[i], "SUCCEEDED"] for i in ids}
    assert len(set(names.values())) == 2 and all(names.values())

    client = MlflowClient(stack.mlflow.url)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = {
        r.data.tags["toxtune.job"]: r for r in runs if "mlflow.parentRunId" not in r.data.tags
    }
    assert set(parents) == set(names.values())
    spans = {}
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED"
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(kids) == 2 and {k.info.status for k in kids} == {"FINISHED"}
        for kid in kids:
            steps = [m.step for m in client.get_metric_history(kid.info.run_id, "train_loss")]
            assert steps == [1, 2]
        spans[name] = (min(k.info.start_time for k in kids), max(k.info.end_time for k in kids))
        study = optuna.load_study(study_name=name, storage=stack.study_storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        ray_ids = {t.user_attrs["ray_trial_id"] for t in study.trials}
        assert ray_ids == {k.data.tags["toxtune.trial_id"] for k in kids}  # its own trials
        keys = bucket_keys(stack.s3, f"shared/{name}/")
        assert any(k.endswith("toxtune_done.json") for k in keys)
    # Shared, not queued: each job's first trial started before the other's last one ended.
    (a_first, a_last), (b_first, b_last) = spans.values()
    assert a_first < b_last and b_first < a_last, spans
    # One model, a version from each job's run; the alias on the better one (same data).
    versions = client.search_model_versions(f"name='{experiment}'")
    assert sorted(v.run_id for v in versions) == sorted(p.info.run_id for p in parents.values())
    best = max(versions, key=lambda v: float(v.tags["val_roc_auc"]))
    champion = client.get_model_version_by_alias(experiment, "champion")
    assert float(champion.tags["val_roc_auc"]) == float(best.tags["val_roc_auc"])
