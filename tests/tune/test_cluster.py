"""`toxtune submit` / `jobs`: the pre-submit checks, the entrypoint, cluster.yaml, and real runs.

The unit tests need no cluster. The shared-storage tests start a real 2-node Ray cluster on
127.0.0.1 (plus, where the machine allows mount namespaces, a node whose /tmp folder is private
to it). The submitted job end to end (two nodes, one lost mid-search) runs on the team stack:
tests/tune/test_team_stack.py.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml

from tests.services import (
    BIN,
    RayCluster,
    ray_cluster,
)
from tune.cli import cluster as cluster_cli
from tune.cluster import checks, storage, submission
from tune.cluster import info as cinfo
from tune.cluster.info import ClusterInfo, NodeInfo
from tune.config import JobConfig, RayConfig, ResourcesConfig, TrackingConfig
from tune.errors import ClusterError

REPO = Path(__file__).resolve().parents[2]
HINT = "--tracking-uri http://MLFLOW_HOST:5000"


def job(
    tracking_uri: str | None = None,
    storage: str = "toxtune_results",
    cpus: float = 1.0,
    gpus: float | str = 0.0,
) -> JobConfig:
    return JobConfig(
        tracking=TrackingConfig(tracking_uri=tracking_uri),
        ray=RayConfig(storage_path=storage),
        resources=ResourcesConfig(cpus_per_trial=cpus, gpus_per_trial=gpus),
    )


def node(i: int, ip: str = "10.0.0.1", cpus: float = 4, gpus: float = 0) -> NodeInfo:
    return NodeInfo(f"{i:02d}" * 28, ip, i == 0, {"CPU": cpus, "GPU": gpus})


ONE = ClusterInfo((node(0),))
TWO_ONE_MACHINE = ClusterInfo((node(0), node(1)))
TWO_MACHINES = ClusterInfo((node(0, "10.0.0.1"), node(1, "10.0.0.2")))
AUTOSCALING = ClusterInfo((node(0, gpus=0),), autoscaling="cluster.yaml autoscales")


# --- --address ---------------------------------------------------------------------------------


def test_address_explicit_wins_and_is_normalised() -> None:
    env = {"RAY_ADDRESS": "http://other:8265"}
    assert submission.resolve_address("http://head:8265/", env) == "http://head:8265"


def test_address_falls_back_to_ray_address_only_when_http() -> None:
    assert submission.resolve_address(None, {"RAY_ADDRESS": "https://h:8265"}) == "https://h:8265"
    with pytest.raises(ClusterError, match=r"--address is required.*RAY_ADDRESS=10.0.0.1:6379"):
        submission.resolve_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"})
    with pytest.raises(ClusterError, match=r"--address is required.*http://127.0.0.1:8265"):
        submission.resolve_address(None, {})


@pytest.mark.parametrize("bad", ["10.0.0.1:6379", "ray://head:10001", "auto", "http://"])
def test_address_must_be_the_dashboard_url(bad: str) -> None:
    with pytest.raises(ClusterError, match="not an http"):
        submission.resolve_address(bad, {})


def test_address_with_credentials_is_refused() -> None:
    with pytest.raises(ClusterError, match="credentials"):
        submission.resolve_address("http://u:p@head:8265", {})


# --- checks of a job against the cluster ------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        (None, "not set"),
        ("sqlite:////tmp/mlflow.db", "SQLite"),
        ("/tmp/mlruns", "local path"),
        ("file:///tmp/mlruns", "local path"),
        ("mlruns", "local path"),
    ],
)
@pytest.mark.parametrize("info", [TWO_ONE_MACHINE, TWO_MACHINES, AUTOSCALING])
def test_multi_node_job_refuses_tracking_only_one_node_sees(
    uri: str | None, problem: str, info: ClusterInfo
) -> None:
    with pytest.raises(ClusterError) as err:
        checks.check_job(job(uri, storage="/mnt/shared/r"), info)
    assert problem in str(err.value)
    assert HINT in str(err.value)


def test_single_node_cluster_accepts_the_default_tracking() -> None:
    warnings = checks.check_job(job(None, storage="/data/r"), ONE)
    assert not any("tracking" in w for w in warnings)


def test_multi_node_job_with_a_tracking_server_passes() -> None:
    for uri in ("http://10.0.0.5:5000", "https://mlflow.example.org", "postgresql://db/mlflow"):
        assert checks.check_job(job(uri, storage="/mnt/shared/r"), TWO_MACHINES) == []


def test_loopback_tracking_warns_on_one_machine_and_is_refused_across_machines() -> None:
    warnings = checks.check_job(job("http://127.0.0.1:5000", "/tmp/r"), TWO_ONE_MACHINE)
    assert any("127.0.0.1" in w and "one machine" in w for w in warnings)
    for uri in ("http://localhost:5000", "http://127.0.0.1:5000", "http://[::1]:5000"):
        with pytest.raises(ClusterError, match=r"each node itself.*MLFLOW_HOST:5000"):
            checks.check_job(job(uri, "/tmp/r"), TWO_MACHINES)
    with pytest.raises(ClusterError, match="each node itself"):
        checks.check_job(job("http://localhost:5000", "/tmp/r"), AUTOSCALING)


@pytest.mark.parametrize("storage", ["toxtune_results", "results/run1", "~/results"])
def test_multi_node_job_refuses_a_relative_storage_path(storage: str) -> None:
    with pytest.raises(ClusterError) as err:
        checks.check_job(job("http://10.0.0.5:5000", storage), TWO_ONE_MACHINE)
    assert "ray.storage_path" in str(err.value) and "not an absolute path" in str(err.value)
    assert "--storage-path" in str(err.value)


@pytest.mark.parametrize(
    "storage",
    ["/mnt/shared/r", "file:///mnt/shared/r", "s3://bucket/r", "gs://b/r", "abfss://c@a/r"],
)
def test_multi_node_job_accepts_shared_storage(storage: str) -> None:
    assert checks.check_job(job("http://10.0.0.5:5000", storage), TWO_MACHINES) == []


def test_single_node_relative_storage_is_a_warning() -> None:
    warnings = checks.check_job(job(None, "toxtune_results"), ONE)
    assert any("relative" in w and "--storage-path" in w for w in warnings)


def test_resume_without_config_only_warns_about_the_saved_tracking_uri() -> None:
    warnings = checks.check_job(job(None, "/mnt/r"), TWO_MACHINES, saved_config=True)
    assert any("saved job's tracking URI" in w for w in warnings)


def test_a_trial_no_node_can_hold_is_refused() -> None:
    with pytest.raises(ClusterError, match=r"no node can hold one trial.*8 CPU"):
        checks.check_job(job(None, "/r", cpus=16), ClusterInfo((node(0, cpus=8),)))
    with pytest.raises(ClusterError, match=r"gpus_per_trial=0\.5"):
        checks.check_job(job(None, "/r", gpus=0.5), ClusterInfo((node(0, gpus=0),)))
    # an autoscaling cluster may add the node the trial needs
    assert checks.check_job(job("http://h:5000", "/r", gpus=0.5), AUTOSCALING) == []


def test_cluster_info_says_why_it_is_multi_node() -> None:
    assert not ONE.multi_node and not ONE.multi_machine
    assert TWO_ONE_MACHINE.multi_node and not TWO_ONE_MACHINE.multi_machine
    assert AUTOSCALING.multi_node and AUTOSCALING.multi_machine
    assert "autoscales" in AUTOSCALING.describe()


def test_autoscaling_is_read_from_a_cluster_config(tmp_path: Path) -> None:
    assert "up to 4 worker node(s)" in (cinfo.autoscaling_from_config(REPO / "cluster.yaml") or "")
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(
        yaml.safe_dump(
            {
                "max_workers": 0,
                "head_node_type": "h",
                "available_node_types": {"h": {}, "w": {"max_workers": 3}},
            }
        )
    )
    assert cinfo.autoscaling_from_config(fixed) is None
    assert cinfo.cluster_config_path("none") is None
    with pytest.raises(ClusterError, match="no such file"):
        cinfo.cluster_config_path(tmp_path / "missing.yaml")


# --- the entrypoint, the working dir, the runtime env --------------------------------------------


def test_entrypoint_quotes_values_and_round_trips_through_the_cli() -> None:
    from tune.cli import build_parser
    from tune.cli.tune_job import tune_overrides

    overrides = {
        "search.num_samples": "4",
        "tracking.tracking_uri": "http://10.0.0.5:5000",
        "tracking.run_name": "it's a run; rm -rf /",
        "ray.storage_path": "/mnt/shared/my results",
        "data.targets": ["NR-AR", "SR p53"],
        "ray.address": "ignored",
    }
    line = submission.render_entrypoint(overrides)
    argv = shlex.split(line)
    assert argv[:6] == ["toxtune", "tune", "--config", "job.yaml", "--address", "auto"]
    assert "--run-name=it's a run; rm -rf /" in argv  # one argument, never a shell command
    assert "'--storage-path=/mnt/shared/my results'" in line
    args = build_parser().parse_args(argv[1:])
    expected = {k: v for k, v in overrides.items() if k != "ray.address"}
    assert tune_overrides(args) == {**expected, "ray.address": "auto"}
    assert args.config == Path("job.yaml")


def test_entrypoint_renders_resume_and_no_config() -> None:
    argv = shlex.split(
        submission.render_entrypoint({"tracking.run_name": "job1"}, config_name=None, resume="job1")
    )
    assert argv == ["toxtune", "tune", "--address", "auto", "--resume=job1"]


def test_a_stopped_submitted_job_is_continued_by_a_submit_that_ships_its_data_again() -> None:
    """What `submit --wait` prints for a stopped job: `toxtune submit --resume` to the same
    cluster with the flags given (not the job's own name) and the local data file shipped anew,
    not `toxtune tune --resume`, which would run the search on this machine."""
    given = {"tracking.run_name": "job1", "ray.storage_path": "s3://b/x", "data.targets": ["A"]}
    line = submission.resume_command("http://127.0.0.1:8265", "job1", given, "/home/me/t 1.csv")
    assert shlex.split(line) == [
        "toxtune", "submit", "--resume", "job1", "--address", "http://127.0.0.1:8265",
        "--storage-path=s3://b/x", "--targets", "A", "--data=/home/me/t 1.csv",
    ]  # fmt: skip
    assert "--data" not in submission.resume_command("http://h:8265", "job1", given, None)


def test_entrypoint_refuses_an_override_without_a_flag() -> None:
    with pytest.raises(ClusterError, match=r"featurizer.n_bits.*--config"):
        submission.render_entrypoint({"featurizer.n_bits": "512"})


def test_working_dir_holds_the_config_and_the_local_data(tmp_path: Path) -> None:
    config = tmp_path / "my.yaml"
    config.write_text("search: {num_samples: 2}\n")
    data = tmp_path / "mols.csv"
    data.write_text("smiles,y\nCCO,1\n")
    extra = tmp_path / "project"
    (extra / "sub").mkdir(parents=True)
    (extra / "sub" / "keep.py").write_text("x = 1\n")
    for secret in (".env", "id_rsa", "server.pem", "mlflow.db"):
        (extra / secret).write_text("secret")
    (extra / ".git").mkdir()
    (extra / ".git" / "config").write_text("x")
    root = tmp_path / "wd"
    root.mkdir()
    j = replace(job(), data=replace(job().data, source=str(data)))
    out, notes = submission.prepare_working_dir(root, j, {"search.seed": "1"}, config, extra)
    assert (root / "job.yaml").read_text() == config.read_text()
    assert (root / "_toxtune_data" / "mols.csv").read_text() == data.read_text()
    assert out == {"search.seed": "1", "data.source": "_toxtune_data/mols.csv"}
    assert any("shipping data.source" in n for n in notes)
    shipped = {p.relative_to(root).as_posix() for p in root.rglob("*")}
    assert "sub/keep.py" in shipped
    assert not shipped & {".env", "id_rsa", "server.pem", "mlflow.db", ".git"}


def test_a_data_file_too_big_to_ship_is_refused_naming_its_size(tmp_path: Path) -> None:
    """Ray's working directory travels through its object store: a file over 200 MiB must be on
    shared storage or at a URL instead."""
    big = tmp_path / "big.csv"
    with big.open("wb") as fh:  # sparse: takes no disk
        fh.truncate(submission.MAX_DATA_BYTES + 2**20)
    j = replace(job(), data=replace(job().data, source=str(big)))
    root = tmp_path / "wd"
    root.mkdir()
    with pytest.raises(ClusterError, match=r"big\.csv is 201 MiB, too big to ship with the job"):
        submission.prepare_working_dir(root, j, {}, None)
    assert not list(root.rglob("*.csv"))


def test_working_dir_refuses_a_missing_relative_data_file(tmp_path: Path) -> None:
    j = replace(job(), data=replace(job().data, source="nowhere/mols.csv"))
    with pytest.raises(ClusterError, match=r"nowhere/mols\.csv: no such file"):
        submission.prepare_working_dir(tmp_path, j, {}, None)
    j = replace(job(), data=replace(job().data, source="/cluster/only/mols.csv"))
    _, notes = submission.prepare_working_dir(tmp_path, j, {}, None)
    assert any("must exist on the cluster's head node" in n for n in notes)


def test_runtime_env_merges_and_refuses_secrets(tmp_path: Path) -> None:
    env = submission.runtime_env(tmp_path, json.dumps({"pip": ["xgboost"], "env_vars": {"A": "1"}}))
    assert env == {"pip": ["xgboost"], "env_vars": {"A": "1"}, "working_dir": str(tmp_path)}
    with pytest.raises(ClusterError, match="MLFLOW_TRACKING_PASSWORD, PGPASSWORD"):
        submission.runtime_env(
            tmp_path, json.dumps({"env_vars": {"PGPASSWORD": "x", "MLFLOW_TRACKING_PASSWORD": "y"}})
        )
    with pytest.raises(ClusterError, match="--working-dir"):
        submission.runtime_env(tmp_path, json.dumps({"working_dir": "."}))
    with pytest.raises(ClusterError, match="not valid JSON"):
        submission.runtime_env(tmp_path, "{pip")


def test_jobs_needs_a_job_id() -> None:
    from tune.cli import build_parser

    args = build_parser().parse_args(["jobs", "logs", "--address", "http://127.0.0.1:1"])
    with pytest.raises(ClusterError, match="needs a JOB_ID"):
        cluster_cli.cmd_jobs(args)


def test_submit_refuses_before_contacting_the_jobs_api(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tune.cli import build_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cinfo, "cluster_info", lambda address, config=None: TWO_MACHINES)

    class NoSubmit:
        def submit(self, *args: object, **kwargs: object) -> str:
            pytest.fail("submitted a job the checks should have refused")

    monkeypatch.setattr(cluster_cli, "job_client", lambda address: NoSubmit())
    args = build_parser().parse_args(
        ["submit", "--address", "http://10.0.0.1:8265", "--storage-path", "/mnt/shared/r"]
    )
    with pytest.raises(ClusterError, match=HINT):
        cluster_cli.cmd_submit(args)


def test_submit_names_the_job_as_the_config_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The config's tracking.run_name used to be replaced by a fresh <experiment>-<timestamp>,
    so the job ran under another name than the one the user gave."""
    from tune.cli import build_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cinfo, "cluster_info", lambda address, config=None: ONE)
    sent: list[tuple[str, dict, dict]] = []

    class Recorder:
        address = "http://10.0.0.1:8265"

        def submit(self, entrypoint: str, runtime_env: dict, metadata: dict, **kw: object) -> str:
            sent.append((entrypoint, metadata, runtime_env))
            return "raysubmit_1"

        def names(self) -> set[str]:
            return set()

    monkeypatch.setattr(cluster_cli, "job_client", lambda address: Recorder())
    config = tmp_path / "job.yaml"
    config.write_text("tracking: {run_name: cluster-e2e, experiment_name: exp}\n")
    base = ["submit", "--address", "http://10.0.0.1:8265", "--storage-path", "/mnt/r"]
    assert cluster_cli.cmd_submit(build_parser().parse_args([*base, "--config", str(config)])) == 0
    assert "--run-name=cluster-e2e" in sent[-1][0]
    # the job carries the submit that continues it: `jobs status` and its own stop line name it
    again = "toxtune submit --resume cluster-e2e --address http://10.0.0.1:8265 "
    again += "--storage-path=/mnt/r"
    assert sent[-1][1] == {"toxtune_job": "cluster-e2e", "toxtune_resume": again}
    # and Ray's stop gives its driver a minute to end its runs (Ray's own default: 3 s)
    grace = {submission.STOP_GRACE_ENV: "60"}
    assert sent[-1][2]["env_vars"] == {**grace, submission.CONTINUE_ENV: again}
    mine = '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "5", "A": "1"}}'
    args = [*base, "--config", str(config), "--runtime-env-json", mine]
    assert cluster_cli.cmd_submit(build_parser().parse_args(args)) == 0
    env = sent[-1][2]["env_vars"]
    assert env == {"RAY_JOB_STOP_WAIT_TIME_S": "5", "A": "1", submission.CONTINUE_ENV: again}
    config.write_text("tracking: {experiment_name: exp}\n")
    assert cluster_cli.cmd_submit(build_parser().parse_args([*base, "--config", str(config)])) == 0
    fresh = sent[-1][1]["toxtune_job"]
    assert fresh.startswith("exp-") and f"--run-name={fresh}" in sent[-1][0]
    assert "submitted job raysubmit_1" in capsys.readouterr().out


def test_jobs_submitted_in_the_same_second_get_names_of_their_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Fresh names are `<experiment>-<UTC second>`: two submits of one config within a second
    took the same name, and the second job continued the first's study and runs. Submits made
    at the same moment all see the same list of the cluster's jobs (here: none), so the name is
    claimed as the submission id, which the cluster gives to one job only (as Ray's job manager
    does); `toxtune jobs list` shows each job's name and state."""
    import datetime as dt
    import functools

    import tune.config
    from tune.cli import build_parser
    from tune.identity import new_name

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cinfo, "cluster_info", lambda address, config=None: ONE)
    second = dt.datetime(2026, 12, 4, 12, 0, 0, tzinfo=dt.timezone.utc)
    monkeypatch.setattr(tune.config, "new_name", functools.partial(new_name, now=second))
    jobs: list[submission.JobDetails] = []

    class Cluster:
        address = "http://10.0.0.1:8265"

        def submit(
            self,
            entrypoint: str,
            runtime_env: dict,
            metadata: dict,
            submission_id: str | None = None,
            **kw: object,
        ) -> str:
            job_id = submission_id or f"raysubmit_{len(jobs) + 1}"
            if any(j.job_id == job_id for j in jobs):
                raise submission.IdTakenError(
                    f"Job with submission_id {job_id} already exists. Please use a different "
                    "submission_id."
                )
            name = metadata[submission.JOB_METADATA]
            jobs.append(submission.JobDetails(job_id, "RUNNING", entrypoint, name=name))
            return job_id

        def names(self) -> set[str]:
            return set()  # what racing submits saw: the list before any of them was added

        def list(self) -> list[submission.JobDetails]:
            return jobs

    monkeypatch.setattr(cluster_cli, "job_client", lambda address: Cluster())
    config = tmp_path / "job.yaml"
    config.write_text("tracking: {experiment_name: exp}\n")
    args = ["submit", "--address", "http://10.0.0.1:8265", "--storage-path", "/mnt/r"]
    for _ in range(3):
        assert (
            cluster_cli.cmd_submit(build_parser().parse_args([*args, "--config", str(config)])) == 0
        )
    names = [j.name for j in jobs]
    assert names == ["exp-20261204-120000", "exp-20261204-120000-2", "exp-20261204-120000-3"]
    assert all(f"--run-name={n} " in j.entrypoint + " " for n, j in zip(names, jobs, strict=True))

    capsys.readouterr()
    jobs[0] = replace(jobs[0], status="SUCCEEDED")
    assert (
        cluster_cli.cmd_jobs(
            build_parser().parse_args(["jobs", "list", "--address", "http://10.0.0.1:8265"])
        )
        == 0
    )
    rows = capsys.readouterr().out.splitlines()[1:]
    shown = [(r.split()[0], r.split()[1], r.split()[2]) for r in rows]
    assert shown == [
        (f"toxtune-{names[0]}", names[0], "SUCCEEDED"),
        (f"toxtune-{names[1]}", names[1], "RUNNING"),
        (f"toxtune-{names[2]}", names[2], "RUNNING"),
    ]


def test_the_library_never_rewrites_the_environment_and_refuses_an_overriding_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ray's Jobs client lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS win over its argument: the
    library refuses to build a client for another cluster than asked; the CLI pins the variable
    for the duration of its command only."""
    url = "http://127.0.0.1:1"
    assert submission.address_override(url, {}) is None
    assert submission.address_override(url, {"RAY_ADDRESS": url + "/"}) is None
    assert submission.address_override(url, {"RAY_ADDRESS": "10.0.0.1:6379"}) == (
        "$RAY_ADDRESS=10.0.0.1:6379"
    )
    assert submission.address_override(
        url, {"RAY_API_SERVER_ADDRESS": "http://other:8265", "RAY_ADDRESS": url}
    ) == ("$RAY_API_SERVER_ADDRESS=http://other:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    import ray.job_submission  # noqa: F401 - importing Ray sets RAY_CLIENT_MODE itself

    before = dict(os.environ)
    with pytest.raises(ClusterError, match=r"\$RAY_ADDRESS=10\.0\.0\.1:6379 would override"):
        submission.JobsClient.connect(url)
    assert dict(os.environ) == before
    with cluster_cli.pinned_api_address(url):
        assert os.environ["RAY_API_SERVER_ADDRESS"] == url
        assert submission.address_override(url) is None
    assert dict(os.environ) == before


def test_submit_waits_for_a_starting_job_agent_and_reports_other_failures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head node that is still starting answers 500 "No available agent" (seen on a loaded
    machine right after `ray start`); nothing was submitted, so trying again is safe."""
    monkeypatch.setattr(submission.time, "sleep", lambda s: None)

    class Sdk:
        def __init__(self, failures: list[str]) -> None:
            self.failures = failures

        def submit_job(self, **kwargs: object) -> str:
            if self.failures:
                raise RuntimeError(self.failures.pop(0))
            return "raysubmit_1"

    busy = "Request failed with status code 500: No available agent to submit job"
    client = submission.JobsClient("http://h:8265", Sdk([busy, busy]))
    assert client.submit("toxtune tune", {}, {}) == "raysubmit_1"
    client = submission.JobsClient("http://h:8265", Sdk(["Request failed: 400 bad runtime_env"]))
    with pytest.raises(ClusterError, match="http://h:8265: Request failed: 400"):
        client.submit("toxtune tune", {}, {})
    client = submission.JobsClient("http://h:8265", Sdk([busy] * 3))
    with pytest.raises(ClusterError, match="No available agent"):
        client.submit("toxtune tune", {}, {}, agent_wait_s=-1)


def test_a_job_whose_driver_a_signal_ended_is_continued_and_one_that_failed_by_itself_is_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A FAILED job whose driver a signal ended (the kernel's OOM killer: SIGKILL, exit -9 or
    137 through a shell) left a killed driver's record, which `submit --resume` continues:
    `jobs status` and a watching `submit --wait` say so and print the command. A job that
    failed by its own error (exit 1 or 2) would fail the same way again: no command. Read
    through Ray's own JobDetails, as the Jobs API returns them."""
    from ray.job_submission import JobDetails, JobStatus, JobType

    from tune.cli import build_parser

    again = "toxtune submit --resume j --address http://h:8265 --data=/home/me/tox.csv"

    def ray_job(status: JobStatus, code: int | None) -> JobDetails:
        return JobDetails(
            type=JobType.SUBMISSION, submission_id="toxtune-j", status=status,
            entrypoint="toxtune tune", driver_exit_code=code,
            metadata={submission.JOB_METADATA: "j", submission.RESUME_METADATA: again},
        )  # fmt: skip

    class Sdk:
        job = ray_job(JobStatus.FAILED, -9)

        def get_job_info(self, job_id: str) -> JobDetails:
            return self.job

        def get_job_logs(self, job_id: str) -> str:
            return "search 1:10 | 2 running\n"

    sdk = Sdk()
    client = submission.JobsClient("http://h:8265", sdk)
    monkeypatch.setattr(cluster_cli, "job_client", lambda address: client)
    status = build_parser().parse_args(["jobs", "status", "toxtune-j", "--address", "http://h"])
    for ended, code, continued in [
        (JobStatus.FAILED, -9, True),  # SIGKILL to the driver itself
        (JobStatus.FAILED, 137, True),  # the same through a shell
        (JobStatus.FAILED, 143, True),  # toxtune's own stop that gave up (SIGTERM)
        (JobStatus.FAILED, 1, False),  # toxtune's error: bad input, a store it cannot reach
        (JobStatus.FAILED, None, False),  # never started (a runtime env that failed)
        (JobStatus.STOPPED, -15, True),  # `toxtune jobs stop`
        (JobStatus.SUCCEEDED, 0, False),
    ]:
        sdk.job = ray_job(ended, code)
        assert cluster_cli.cmd_jobs(status) == 0
        out = capsys.readouterr().out
        assert (f"continue:   {again}" in out) is continued, (ended, code, out)
        killed = ended == JobStatus.FAILED and continued
        assert ("driver:     its driver was ended by a signal" in out) is killed, out
        assert cluster_cli.finish(client, "toxtune-j", ended.value, tail_logs=True) == (
            0 if ended == JobStatus.SUCCEEDED else 1
        )
        err = capsys.readouterr().err
        assert (f"continue it with: {again}" in err) is continued, (ended, code, err)
        assert (f"exit code {code}: the kernel's out-of-memory killer" in err) is killed, err


# --- cluster.yaml ------------------------------------------------------------------------------

CREDENTIAL_KEY = (
    "password",
    "secret",
    "token",
    "access_key",
    "aws_access_key_id",
    "aws_secret_access_key",
    "ssh_private_key",
    "private_key",
    "credentials",
)


def _walk(value: object, path: str = "") -> Iterator[tuple[str, str, object]]:
    """("key" | "value", where, item) for every mapping key and scalar of a parsed YAML."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield "key", f"{path}.{k}", k
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield "value", path, value


def test_cluster_yaml_is_a_valid_ray_cluster_config() -> None:
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    validate_config(prepare_config(raw))  # as `ray up` fills and checks it
    assert raw["provider"]["type"] == "aws"
    workers = raw["available_node_types"]["ray.worker.gpu"]
    assert workers["min_workers"] == 0 and workers["max_workers"] == 4
    assert workers["resources"]["GPU"] >= 1
    # every node gets the team extra: the PostgreSQL drivers and S3 client of a team stack
    assert any("pip install" in c and "toxtune[team]" in c for c in raw["setup_commands"])


def test_cluster_yaml_holds_no_credentials_and_keeps_ports_private() -> None:
    import re

    text = (REPO / "cluster.yaml").read_text()
    raw = yaml.safe_load(text)
    for kind, where, item in _walk(raw):
        if kind == "key":
            assert not any(word in str(item).lower() for word in CREDENTIAL_KEY), where
        elif isinstance(item, str):
            assert not re.search(r"(AKIA|ASIA)[0-9A-Z]{16}|-----BEGIN|://[^/\s]*:[^/\s]*@", item)
            assert not re.search(r"(?i)(password|secret|token)\s*[=:]", item), where
    assert "ssh_private_key" not in raw.get("auth", {})
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    for command in starts:
        assert "0.0.0.0" not in command, command
        assert "--host 0.0.0.0" not in command
    ray_starts = [c for c in starts if "ray start" in c]
    assert ray_starts and all("--dashboard-host=127.0.0.1" in c for c in ray_starts)
    assert "0.0.0.0" not in json.dumps(raw)


# --- a real 2-node cluster ---------------------------------------------------------------------


@pytest.fixture(scope="class")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A head (dashboard on) plus one worker node, both on 127.0.0.1."""
    with ray_cluster(tmp_path_factory.mktemp("ray"), num_cpus=1, num_gpus=0, dashboard=True) as c:
        c.add_node(num_cpus=1)
        yield c


@pytest.fixture
def connected(two_nodes: RayCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayCluster]:
    import ray
    from ray._raylet import Config

    # A driver joining a token-auth cluster must be in token mode too (Ray caches the mode).
    monkeypatch.setenv("RAY_AUTH_MODE", two_nodes.env["RAY_AUTH_MODE"])
    if ray.is_initialized():  # an earlier test's in-process job left its local Ray up
        ray.shutdown()
    Config.initialize("")
    ray.init(address=two_nodes.address, logging_level="WARNING", log_to_driver=False)
    try:
        _wait_alive(2)
        yield two_nodes
    finally:
        ray.shutdown()


def _wait_alive(n: int, timeout: float = 60) -> list[dict]:
    import ray

    deadline = time.monotonic() + timeout
    while True:
        alive = [x for x in ray.nodes() if x.get("Alive")]
        if len(alive) >= n or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _can_unshare() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
class TestRealCluster:
    """One head + one worker on 127.0.0.1, torn down before the end-to-end test starts."""

    def test_node_listing_of_a_real_cluster(self, two_nodes: RayCluster) -> None:
        nodes = cinfo.alive_nodes(two_nodes.dashboard_url)
        assert len(nodes) == 2 and sum(n.is_head for n in nodes) == 1
        info = cinfo.cluster_info(two_nodes.dashboard_url, "none")
        assert info.multi_node and not info.multi_machine and info.autoscaling is None
        # one machine: a loopback tracking server is accepted with a warning, SQLite is not
        warnings = checks.check_job(job("http://127.0.0.1:5000", "/tmp/r"), info)
        assert any("one machine" in w for w in warnings)
        with pytest.raises(ClusterError, match="SQLite"):
            checks.check_job(job("sqlite:////tmp/m.db", "/tmp/r"), info)

    def test_shared_storage_seen_by_every_node(self, connected: RayCluster, tmp_path: Path) -> None:
        results = tmp_path / "results"
        storage.check_shared_storage(str(results), timeout_s=90)
        assert results.is_dir() and list(results.iterdir()) == []  # markers cleaned up
        assert storage.check_cluster_storage(str(results), timeout_s=90) == 2
        # An object store is checked too (tests/tune/test_team_stack.py checks a real bucket);
        # one the driver itself cannot reach is refused by name.
        with pytest.raises(ClusterError, match="s3://bucket/never-touched"):
            storage.check_shared_storage("s3://bucket/never-touched")

    @pytest.mark.skipif(not _can_unshare(), reason="needs root and mount namespaces (unshare)")
    def test_storage_one_node_cannot_see_is_refused(
        self, connected: RayCluster, tmp_path: Path
    ) -> None:
        """A third node runs in its own mount namespace with a tmpfs over `private`: the same path
        holds different files there, as on a cluster whose nodes each have a local /mnt/shared."""
        import ray

        private = tmp_path / "private"
        private.mkdir()
        before = {n["NodeID"] for n in _wait_alive(2)}
        script = 'mount -t tmpfs toxtune-private "$1" && shift && exec "$@"'
        subprocess.run(
            [
                "unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                str(private), str(BIN / "ray"), "start", f"--address={connected.address}",
                "--num-cpus=1", "--num-gpus=0", "--node-ip-address=127.0.0.1",
            ],
            env=connected.env, check=True, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        alive = _wait_alive(3)
        isolated = [n["NodeID"] for n in alive if n["NodeID"] not in before]
        assert len(isolated) == 1, alive
        with pytest.raises(ClusterError) as err:
            storage.check_shared_storage(str(private / "results"), timeout_s=90)
        message = str(err.value)
        assert isolated[0][:8] in message and "does not exist there" in message
        for other in before:
            assert other[:8] not in message  # the nodes that do see it are not blamed
        # a path outside the private mount is still shared by all three
        storage.check_shared_storage(str(tmp_path / "shared"), timeout_s=90)
        assert len([n for n in ray.nodes() if n.get("Alive")]) == 3


def test_the_auth_token_is_read_from_the_variable_then_its_file_then_the_home_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's token authentication answers 401 without it: the token is found where Ray keeps
    it, in Ray's order, and read fresh on every call (a token rotated mid-session is used)."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert cinfo.auth_headers() == {}  # none anywhere: no header, not an empty bearer
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert cinfo.auth_headers() == {"Authorization": "Bearer from-home"}
    named = tmp_path / "token"
    named.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert cinfo.auth_headers() == {"Authorization": "Bearer from-path"}
    named.write_text("rotated")
    assert cinfo.auth_headers() == {"Authorization": "Bearer rotated"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-variable ")
    assert cinfo.auth_headers() == {"Authorization": "Bearer from-variable"}


# --- a submitted job stopped -------------------------------------------------------------------


@pytest.mark.slow
def test_a_submitted_job_stopped_by_jobs_stop_continues_with_the_submit_it_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`toxtune jobs stop` mid-search: Ray's Jobs API sends the driver SIGTERM (and SIGKILL after
    `RAY_JOB_STOP_WAIT_TIME_S`, 60 s as submitted), and the job stops as after Ctrl-C: its log
    ends with toxtune's stop line, its MLflow run is KILLED, nothing is registered. `toxtune
    submit --wait` watching it exits 1 with the log's last lines (docs/CLUSTER.md: 0 only if
    the job SUCCEEDED) and the `toxtune submit --resume` that continues it, its data file
    shipped anew, which the job's own stop line and `jobs status` name too; `jobs status` says
    STOPPED and a second `jobs stop` that it was not running. That command, run as printed,
    finishes every trial and registers the model. Beside it, Ray's exit codes for a driver a
    signal ended and one that failed by its own error, as `jobs status` reads them."""
    from mlflow.tracking import MlflowClient

    from tests.services import start_submit, submitted_job_id
    from tests.team_stack import job_environment, small_tox21_job

    job_environment(tmp_path, monkeypatch, epoch_s=1.0)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = small_tox21_job(
        tmp_path,
        "long.yaml",
        search={"num_samples": 5, "max_epochs": 3, "max_concurrent": 1},
        resources={"cpus_per_trial": 1, "gpus_per_trial": 0},
        tracking={"tracking_uri": tracking, "experiment_name": "stopped", "run_name": "stopme"},
    )
    with ray_cluster(tmp_path / "ray", num_cpus=2, dashboard=True) as ray_c:
        toxtune = [str(BIN / "toxtune")]
        address = ["--address", ray_c.dashboard_url]
        cmd = [*toxtune, "submit", *address, "--config", str(config), "--wait"]
        results = tmp_path / "results"
        cmd += ["--storage-path", str(results)]
        proc, out_path, err_path = start_submit(cmd, tmp_path)
        try:
            job_id = submitted_job_id(proc, out_path, err_path, timeout_s=300)
            jobs = submission.JobsClient.connect(ray_c.dashboard_url)
            deadline = time.monotonic() + 300
            while "ended after" not in jobs.logs(job_id):  # a trial has finished
                assert jobs.status(job_id) in ("PENDING", "RUNNING"), jobs.logs(job_id)[-4000:]
                assert time.monotonic() < deadline, jobs.logs(job_id)[-4000:]
                time.sleep(0.5)
            stop = subprocess.run(
                [*toxtune, "jobs", "stop", job_id, *address], capture_output=True, text=True
            )
            assert stop.returncode == 0 and f"stop requested for {job_id}" in stop.stdout
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        status = subprocess.run(
            [*toxtune, "jobs", "status", job_id, *address], capture_output=True, text=True
        )
        again = subprocess.run(
            [*toxtune, "jobs", "stop", job_id, *address], capture_output=True, text=True
        )
        log = jobs.logs(job_id)
        stdout, stderr = out_path.read_text(), err_path.read_text()
        assert proc.returncode == 1, stdout[-3000:] + stderr[-3000:]
        assert f"job {job_id} STOPPED" in stdout
        assert "--- last lines of the job's log ---" in stderr
        stopped = "toxtune tune: error: job 'stopme' stopped by SIGTERM"
        assert stopped in log and "nothing was finalized or registered" in log, log[-3000:]
        assert stopped in stderr  # the job's last lines, where --wait shows them
        assert "status:     STOPPED" in status.stdout, status.stdout
        assert f"{job_id} was not running (STOPPED)" in again.stdout, again.stdout
        client = MlflowClient(tracking)
        experiment = client.get_experiment_by_name("stopped").experiment_id
        (parent,) = client.search_runs([experiment], "tags.`mlflow.runName` = 'stopme'")
        assert parent.info.status == "KILLED"
        assert client.search_registered_models() == []
        # a driver a signal ended (the OOM killer's SIGKILL) is continued, one that failed by
        # its own error is not: Ray's exit codes for them, as `jobs status` reads them
        meta = {submission.RESUME_METADATA: "toxtune submit --resume x"}
        py = shlex.quote(sys.executable)
        killed = jobs.submit(f"{py} -c 'import os; os.kill(os.getpid(), 9)'", {}, meta)
        erred = jobs.submit(f"{py} -c 'raise SystemExit(2)'", {}, meta)
        assert jobs.wait(killed, poll_s=0.5) == jobs.wait(erred, poll_s=0.5) == "FAILED"
        assert jobs.details(killed).continues_with == "toxtune submit --resume x"
        assert jobs.details(erred).continues_with == ""

        (resume,) = [ln for ln in stderr.splitlines() if ln.startswith("continue it with: ")]
        resume = resume.removeprefix("continue it with: ")
        # the same command in the job's own stop line and in `jobs status`, for whoever reads
        # the log later or did not watch the job
        assert f"Continue it with: {resume}" in log, log[-3000:]
        assert f"continue:   {resume}" in status.stdout, status.stdout
        argv = shlex.split(resume)
        assert argv[:4] == ["toxtune", "submit", "--resume", "stopme"], resume
        assert f"--data={tmp_path / 'tox21_small.csv'}" in argv  # shipped again
        resumed = subprocess.run(
            [*toxtune, *argv[1:], "--wait"], capture_output=True, text=True, timeout=600
        )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"  # the same run
    study = optuna.load_study(study_name="stopme", storage=f"sqlite:///{results}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    (version,) = client.search_model_versions("name = 'toxtune-tox21_small'")
    assert version.run_id == parent.info.run_id
