"""Resume after the driver is SIGKILLed, and growing a finished study."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import psutil
import pytest
import ray
import sqlalchemy.exc
import yaml
from mlflow.tracking import MlflowClient

from tests.services import MlflowServer, run_or_show_stacks
from toxmodel.checkpoint import load_checkpoint
from toxmodel.model import Ensemble
from tune.config import JobConfig, load_config
from tune.finalize import FINAL_DIR
from tune.interrupt import STOP_TIMEOUT_S
from tune.job import run_job
from tune.study import rdb
from tune.tracking import STATUS_TAG, TRIAL_TAG
from tune.trainable import CHECKPOINT_FILE, EARLIER_EPOCHS

pytestmark = pytest.mark.slow

TOXTUNE = str(Path(sys.executable).parent / "toxtune")


def write_config(
    tmp_path: Path,
    data: Path,
    num_samples: int,
    ray_: dict | None = None,
    tracking: dict | None = None,
    search: dict | None = None,
) -> Path:
    cfg = {
        "data": {"source": str(data), "cache_dir": str(tmp_path / "cache")},
        "featurizer": {"n_bits": 256},
        "search": {
            "num_samples": num_samples,
            "max_epochs": 3,
            "scheduler": "fifo",
            "max_concurrent": 2,
            "patience": 0,
            "space": {"n_layers": {"low": 1, "high": 1}, "width_0": {"choices": [32, 64]}},
            **(search or {}),
        },
        "resources": {"cpus_per_trial": 1},
        "ray": {"storage_path": str(tmp_path / "results"), "num_cpus": 2, **(ray_ or {})},
        "tracking": {"run_name": "killme", "experiment_name": "resume", **(tracking or {})},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finished_trials(storage: str, name: str) -> int:
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).exists():
        return 0
    try:
        study = optuna.load_study(study_name=name, storage=rdb(storage))
    except KeyError:
        return 0
    except sqlalchemy.exc.SQLAlchemyError:  # the driver is creating the database right now
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_driver_killed_mid_search_resumes_without_rerunning_or_orphans(
    tmp_path: Path, small_csv: Path
) -> None:
    """Cancelled as a batch scheduler cancels a job (Slurm's scancel or time limit, systemd's
    stop): SIGTERM to every process at once, its local Ray's included, then SIGKILL after a
    grace. Ray's own processes stop on the SIGTERM: Ray ends the driver at once (exit 1), or
    Ray Tune's cleanup waits on them (it used to wait for the SIGKILL, the runs left RUNNING) and
    after STOP_TIMEOUT_S the job ends its runs KILLED and exits 143 naming the resume. Either way
    the resume must lose, repeat and orphan nothing."""
    kill_and_resume(
        tmp_path,
        write_config(tmp_path, small_csv, num_samples=6),
        lose_newest_checkpoint=True,
        cancel_grace_s=STOP_TIMEOUT_S + 20,
    )


def test_a_killed_k_fold_job_resumes_its_fold_trials_through_ray(
    tmp_path: Path, small_csv: Path
) -> None:
    """The same drill with `search.folds: 3` and the driver killed alone: Ray restores each
    unfinished k-fold trial from its checkpoint (all three fold models) rather than training it
    from epoch 1 again, no epoch is logged twice, and the registered model is the best trial's
    three fold models."""
    config = write_config(tmp_path, small_csv, num_samples=6, search={"folds": 3})
    # 2.5 s epochs: the last four trials outlive several of Tune's 5-s snapshots (with 1 s, a
    # fast machine finished the search before a snapshot named a running trial's checkpoint)
    # The driver alone is SIGKILLed, as the kernel's OOM killer picks one process: its watcher
    # (tune.guard) ends the runs KILLED and says how to continue, and the resume still ends a
    # finished trial's run as it ended (its closing was lost with the driver).
    restorable = kill_and_resume(
        tmp_path, config, running_checkpoint=True, slow_epochs_s=2.5, driver_alone=True
    )
    assert restorable, "no unfinished trial had a checkpoint at the kill"
    job = load_config(config)
    for trial_id in restorable:
        (folder,) = job.job_dir.glob(f"train_trial_{trial_id}_*")
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
        # the report Tune gets first after the restore carries the epochs before the checkpoint
        resumed = [r for r in rows if EARLIER_EPOCHS in r]
        assert len(resumed) == 1, (folder.name, [r["epoch"] for r in rows])
        earlier = [r["epoch"] for r in json.loads(resumed[0][EARLIER_EPOCHS])]
        assert earlier == list(range(1, resumed[0]["epoch"]))
    final = load_checkpoint(job.job_dir / FINAL_DIR / CHECKPOINT_FILE)
    assert isinstance(final.model, Ensemble) and len(final.model.members) == 3
    assert final.extra["members"] == 3


def start_driver(
    tmp_path: Path, args: list[str], log_name: str, slow_epochs_s: float = 1.0, **kw: Any
) -> subprocess.Popen:
    """`toxtune tune ARGS` in its own session, epochs slowed to `slow_epochs_s` to widen the
    windows; its output goes to `log_name` (stderr too, unless `kw` says otherwise)."""
    env = {**os.environ, "TOXTUNE_FAULT_PLAN": json.dumps({"slow_epochs_s": slow_epochs_s})}
    log = open(tmp_path / log_name, "w")  # noqa: SIM115
    options = {"stdout": log, "stderr": subprocess.STDOUT, **kw}
    return subprocess.Popen([TOXTUNE, "tune", *args], env=env, start_new_session=True, **options)


def wait_for_trials(job: JobConfig, driver: subprocess.Popen, log: Path, complete: int) -> None:
    deadline = time.monotonic() + 240
    while finished_trials(job.study_storage, job.name) < complete:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.5)


def cancel_tree(driver: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM the driver and every process it started at once, as a batch scheduler cancels
    a job (Slurm signals every process of the job step), and wait up to `grace_s` for the
    driver to exit; its exit code, or None if it was still there (`kill_tree` then)."""
    with contextlib.suppress(psutil.Error):
        for proc in [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(True)]:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        return driver.wait(timeout=grace_s)
    return None


def kill_tree(driver: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its local Ray and trial workers), so
    no orphaned trial goes on writing into the job's folder."""
    with contextlib.suppress(psutil.Error):
        procs = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=15)
    driver.wait()


def watcher_of(driver: subprocess.Popen) -> psutil.Process:
    """The driver's watcher (`tune.guard`), which settles the record if the driver dies."""
    for child in psutil.Process(driver.pid).children():
        if "tune.guard" in child.cmdline():
            return child
    raise AssertionError("the driver started no watcher")


def kill_alone(driver: subprocess.Popen, watcher: psutil.Process | None) -> list[str]:
    """SIGKILL the driver alone, as the kernel's OOM killer does, and wait for its watcher,
    which ends what is left of the driver's local Ray (`tune.guard`). Returns the processes of
    the driver's session (`start_driver`) that outlived both, and kills them, so no orphaned
    trial goes on writing."""
    driver.kill()
    driver.wait()
    if watcher is not None:
        with contextlib.suppress(psutil.Error):
            watcher.wait(timeout=90)
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(proc.pid) == driver.pid and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(proc.cmdline())[:200] or proc.name())
                proc.kill()
    return left


def unfinished_trial_folders(folder: Path, done_ids: set[str]) -> list[Path]:
    return [
        d
        for d in folder.glob("train_trial_*")
        if d.name.split("_")[2] not in done_ids and list(d.glob("checkpoint_*"))
    ]


def completed_ray_ids(job: JobConfig) -> set[str]:
    """The Ray ids of the trials the study holds COMPLETE."""
    found = optuna.load_study(study_name=job.name, storage=rdb(job.study_storage))
    return {
        t.user_attrs.get("ray_trial_id")
        for t in found.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }


def wait_while_running(
    driver: subprocess.Popen, log: Path, ready: Callable[[], bool], what: str
) -> None:
    """Poll `ready` until it holds; fail, naming `what`, if the driver ends or 120 s pass."""
    deadline = time.monotonic() + 120
    while not ready():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def wait_for_checkpoint_of_running_trial(
    job: JobConfig, driver: subprocess.Popen, log: Path
) -> None:
    """Wait until an unfinished trial has written a checkpoint (a loaded CI machine can reach
    two finished trials before the next ones have written any)."""
    wait_while_running(
        driver,
        log,
        lambda: bool(unfinished_trial_folders(job.job_dir, completed_ray_ids(job))),
        "no running trial wrote a checkpoint in time",
    )


def snapshot_checkpoints(job: JobConfig) -> set[str]:
    """Ids of the trials the newest experiment snapshot (local storage) names an unfinished
    checkpoint of: what Tune would restore them from."""
    snapshots = sorted(job.job_dir.glob("experiment_state-*.json"))
    if not snapshots:
        return set()
    try:
        state = json.loads(snapshots[-1].read_text())
    except (OSError, json.JSONDecodeError):  # being written right now
        return set()
    found = set()
    for trial, run in state["trial_data"]:
        last = json.loads(run).get("last_result") or {}
        if last.get("checkpoint_dir_name") and not last.get("done"):
            found.add(json.loads(trial)["trial_id"])
    return found


def wait_for_snapshot_of_running_checkpoint(
    job: JobConfig, driver: subprocess.Popen, log: Path
) -> None:
    """Wait until Ray's newest snapshot names a checkpoint of a trial still unfinished."""
    wait_while_running(
        driver,
        log,
        lambda: bool(snapshot_checkpoints(job) - completed_ray_ids(job)),
        "no snapshot named a running trial's checkpoint",
    )


def reopen_a_finished_trial_run(job: JobConfig, done: set[str], status: str) -> str:
    """Put a finished trial's MLflow run in `status`, as when the driver died with the trial's
    closing still queued in its sender: RUNNING where nothing ended the runs (every process
    killed), KILLED where the driver's watcher or its stop's give-up ended them. The resume must
    end it FINISHED (Ray's state has the trial ended and never completes it again), not KILLED.
    Returns the run's id. When the kill already left a finished trial's run so, that run is the
    one."""
    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name(job.tracking.experiment_name)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    ended = [r for r in runs if r.data.tags.get(TRIAL_TAG) in done]
    assert ended, "no run of a finished trial: its start was lost too"
    open_ = [r for r in ended if r.info.status == status]
    if open_:
        return open_[0].info.run_id
    run = min(ended, key=lambda r: r.info.end_time)  # the likeliest in Ray's last snapshot
    client.update_run(run.info.run_id, status=status)
    client.set_tag(run.info.run_id, STATUS_TAG, status.lower())
    return run.info.run_id


def kill_and_resume(
    tmp_path: Path,
    config: Path,
    lose_newest_checkpoint: bool = False,
    running_checkpoint: bool = False,
    slow_epochs_s: float = 1.0,
    cancel_grace_s: float | None = None,
    driver_alone: bool = False,
) -> set[str]:
    """SIGKILL the driver after two trials finished, `--resume` it, and check that no trial was
    lost, duplicated or trained twice and no run was left RUNNING (any storage/tracking).

    `lose_newest_checkpoint` (local storage): the unfinished trials' newest checkpoints are
    deleted before the resume, as when Ray's experiment snapshot lagged the checkpoints; they
    must continue from the newest one left, never fail and never log an epoch twice.
    `running_checkpoint`: kill only once Ray's experiment snapshot names a checkpoint of an
    unfinished trial. Returns the ids of the unfinished trials the snapshot had a checkpoint of
    at the kill: the resume must restore these from it. `slow_epochs_s`: each epoch's sleep in
    the first run (Tune snapshots every 5 s: the trials must outlive a snapshot).
    `cancel_grace_s`: first SIGTERM every process of the job, as a batch scheduler's cancel
    does, and SIGKILL them this many seconds later (`cancel_tree`). `driver_alone`: SIGKILL the
    driver alone (`kill_alone`), not every process it started. Either way its watcher outlives
    the driver, ends its runs KILLED and says how to continue, checked before the resume.
    """
    job = load_config(config)
    driver = start_driver(tmp_path, ["--config", str(config)], "driver1.log", slow_epochs_s)
    watcher = None
    try:
        wait_for_trials(job, driver, tmp_path / "driver1.log", complete=2)
        if lose_newest_checkpoint:  # kill only once a running trial has a checkpoint to lose
            wait_for_checkpoint_of_running_trial(job, driver, tmp_path / "driver1.log")
        if running_checkpoint:
            wait_for_snapshot_of_running_checkpoint(job, driver, tmp_path / "driver1.log")
        watcher = watcher_of(driver)
    finally:
        code = cancel_tree(driver, cancel_grace_s) if cancel_grace_s is not None else None
        left = kill_alone(driver, watcher) if driver_alone else []
        kill_tree(driver)
    settled = cancel_grace_s is not None or driver_alone  # the watcher lived on: runs ended
    if settled:
        watcher.wait(timeout=90)
        log = (tmp_path / "driver1.log").read_text()
        last = log.strip().splitlines()[-1]
        assert f"Continue it with: toxtune tune --resume {job.name}" in last, log[-3000:]
        client = MlflowClient(job.tracking_uri)
        exp = client.get_experiment_by_name("resume").experiment_id
        statuses = {r.info.status for r in client.search_runs([exp], max_results=200)}
        assert "RUNNING" not in statuses and "KILLED" in statuses, statuses
    if driver_alone:
        assert "its driver (pid" in last and "was killed" in last, last  # the watcher's word
        assert "processes its local Ray left were ended" in last, last
        assert not left, left  # nothing of the driver's own Ray outlived it
    if cancel_grace_s is not None:
        # Ray's processes stop with the driver. Which first is a race: Ray's core worker ends
        # the driver at once when its raylet is gone (exit 1: its watcher ends the runs and
        # says how to continue), or Tune's stop waits on them and the job gives up after
        # STOP_TIMEOUT_S (143: the job ends its runs and says it itself).
        assert code in (1, 128 + signal.SIGTERM), log[-3000:]
        if code == 128 + signal.SIGTERM:
            said = f"toxtune tune: SIGTERM received: stopping job {job.name!r} unfinished"
            assert said in log, log[-3000:]  # at once, 20 s before
            assert "did not finish stopping" in last, last
    # the newest snapshot, as the resume will read it (local storage only)
    snapshot = snapshot_checkpoints(job) if running_checkpoint else set()
    done_before = finished_trials(job.study_storage, job.name)
    assert done_before < 6, "the search finished before the kill: widen the window"
    before = {
        t.user_attrs["ray_trial_id"]: t.params
        for t in optuna.load_study(study_name=job.name, storage=job.study_storage).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    if lose_newest_checkpoint:
        cut = unfinished_trial_folders(job.job_dir, set(before))
        assert cut, "no unfinished trial had a checkpoint at the kill: widen the window"
        for folder in cut:
            shutil.rmtree(max(folder.glob("checkpoint_*")))
    restorable = snapshot - set(before)
    reopened = reopen_a_finished_trial_run(job, set(before), "KILLED" if settled else "RUNNING")

    out = run_or_show_stacks(
        [TOXTUNE, "tune", "--resume", job.name, "--storage-path", job.storage.uri], timeout=400
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    # Trials finished before the kill kept their results and were not trained again.
    for t in complete:
        if t.user_attrs["ray_trial_id"] in before:
            assert t.params == before[t.user_attrs["ray_trial_id"]]
    client = MlflowClient(job.tracking_uri)
    exp = client.get_experiment_by_name("resume")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_ids = [k.data.tags["toxtune.trial_id"] for k in kids]
    assert len(trial_ids) == len(set(trial_ids))  # no duplicate child per trial
    finished = [k for k in kids if k.info.status == "FINISHED"]
    assert len(finished) >= 6
    assert client.get_run(reopened).data.tags[STATUS_TAG] in ("finished", "early_stopped")
    for k in finished:
        # One value per epoch, restored trials included: none trained or logged twice.
        steps = [m.step for m in client.get_metric_history(k.info.run_id, "train_loss")]
        assert sorted(steps) == [1, 2, 3], (k.data.tags["toxtune.trial_id"], steps)
    return restorable


def test_finished_study_grows_and_learns_from_earlier_trials(
    tmp_path: Path, small_csv: Path
) -> None:
    config = write_config(tmp_path, small_csv, num_samples=3)
    job = load_config(config, {"ray.num_cpus": 2})
    try:
        first = run_job(job, progress=False)
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    before = [(t.number, t.params, t.value) for t in study.trials]
    assert len(before) == 3

    grown = load_config(config, {"ray.num_cpus": 2, "search.num_samples": 5})
    try:
        second = run_job(grown, progress=False)
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert len(study.trials) == 5
    assert [(t.number, t.params, t.value) for t in study.trials[:3]] == before
    assert second.parent_run_id == first.parent_run_id  # one MLflow job run, grown
    client = MlflowClient(grown.tracking_uri)
    exp = client.get_run(first.parent_run_id).info.experiment_id
    kids = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{first.parent_run_id}'"
    )
    assert len(kids) == 5
    assert len(second.trials) == 5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_the_job_unregistered_and_resume_completes_it(
    tmp_path: Path, small_csv: Path, sig: signal.Signals
) -> None:
    """SIGINT (or a scheduler's SIGTERM) during a trial: exit 130 (143) with one line naming the
    resume command, nothing registered, the study's trial left to continue; `--resume` then
    finishes every trial with one metric per epoch and registers the model (after SIGINT: the
    stopped job is the same either way)."""
    config = write_config(tmp_path, small_csv, num_samples=3)
    cfg = yaml.safe_load(config.read_text())
    cfg["search"].update(max_epochs=4, max_concurrent=1)
    config.write_text(yaml.safe_dump(cfg))
    job = load_config(config)
    driver = start_driver(
        tmp_path, ["--config", str(config)], "sigint.log", stderr=subprocess.PIPE, text=True
    )
    # Interrupt once the second trial has a checkpoint (and so an epoch behind it).
    deadline = time.monotonic() + 240
    while (
        not unfinished_trial_folders(job.job_dir, done_ids(job))
        or finished_trials(job.study_storage, job.name) < 1
    ):
        assert driver.poll() is None, (tmp_path / "sigint.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no second trial started in time"
        time.sleep(0.3)
    driver.send_signal(sig)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"toxtune tune: error: job 'killme' stopped by {sig.name}")
    assert "nothing was finalized or registered" in last
    storage = f"--storage-path {job.storage.uri}"
    assert f"toxtune tune --resume killme {storage}" in last
    assert "Tuner.restore(" not in err, err[-3000:]  # Ray's own hint, which would run it bare
    # and it said so the moment the signal came, before Ray's stop (`tune.job._announce`)
    said = f"toxtune tune: {sig.name} received: stopping job 'killme' unfinished"
    (early,) = [ln for ln in err.strip().splitlines()[:-1] if ln.startswith(said)]
    assert early.endswith(f"Continue it with: toxtune tune --resume killme {storage}"), early

    client = MlflowClient(job.tracking_uri)
    assert client.search_model_versions(f"name = '{job.model_name}'") == []
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("resume").experiment_id],
        filter_string="tags.`toxtune.kind` = 'job'",
    )
    assert parent.info.status == "KILLED"
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.FAIL not in states  # the interrupted trial is to continue
    assert json.loads((job.job_dir / "toxtune_done.json").read_text())["finished"] is False
    if sig == signal.SIGTERM:
        return

    out = run_or_show_stacks(
        [TOXTUNE, "tune", "--resume", job.name, "--storage-path", job.storage.uri],
        timeout=400,
        merged=True,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    # the summary is the last word: Ray stopped before it, its workers' lines came first
    assert out.stdout.strip().splitlines()[-1].startswith("review: toxtune ui"), out.stdout[-3000:]
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    kids = [
        r
        for r in client.search_runs([parent.info.experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    ]
    assert len(kids) == 3
    for kid in kids:
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "train_loss")]
        assert sorted(steps) == [1, 2, 3, 4], steps  # the interrupted trial continued
    versions = client.search_model_versions(f"name = '{job.model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def done_ids(job: JobConfig) -> set[str]:
    """Ray trial ids of the study's complete trials."""
    try:
        study = optuna.load_study(study_name=job.name, storage=rdb(job.study_storage))
    except (KeyError, sqlalchemy.exc.SQLAlchemyError):
        return set()
    return {
        str(t.user_attrs.get("ray_trial_id"))
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }


def test_a_copied_job_folder_resumes_in_the_copy_and_leaves_the_original_alone(
    tmp_path: Path, small_csv: Path, mlflow_http: MlflowServer
) -> None:
    """`cp -a` a killed job's working folder and `--resume` it inside the copy: the study, Ray's
    state and the checkpoints written are the copy's, which finishes with the trials due. (With
    the embedded SQLite tracking store the copy is refused instead: see test_tracking_backend.)
    """
    work = tmp_path / "j8"
    work.mkdir()
    server = {"tracking_uri": mlflow_http.url}
    config = write_config(work, small_csv, num_samples=3, tracking=server)
    cfg = yaml.safe_load(config.read_text())
    cfg["ray"]["storage_path"] = "toxtune_results"  # relative, as the CLI's default
    cfg["search"]["max_concurrent"] = 1
    config.write_text(yaml.safe_dump(cfg))
    job = load_config(config)
    study_db = work / "toxtune_results" / "optuna.db"
    driver = start_driver(work, ["--config", str(config)], "driver1.log", cwd=work)
    try:
        deadline = time.monotonic() + 240
        while finished_trials(f"sqlite:///{study_db}", job.name) < 1:
            assert driver.poll() is None, (work / "driver1.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
    finally:
        kill_tree(driver)
    copy = tmp_path / "j8b"
    shutil.copytree(work, copy, symlinks=True)

    def snapshot(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file()
        }

    original = snapshot(work)
    out = subprocess.run(
        [TOXTUNE, "tune", "--resume", job.name],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=copy,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert snapshot(work) == original  # nothing written into the original folder
    assert "was started at" in out.stderr and str(copy / "toxtune_results") in out.stderr
    study = optuna.load_study(
        study_name=job.name, storage=f"sqlite:///{copy / 'toxtune_results' / 'optuna.db'}"
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert str(copy / "toxtune_results") in out.stdout  # the report names the copy


def test_a_stop_between_two_trials_registers_nothing_and_resume_runs_the_rest(
    tmp_path: Path, small_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI caught it: a Ctrl-C that lands after one trial ended and before the next started
    left no trial unfinished, and the job registered a 1-of-3-trial model with exit code 0.
    Here SIGINT arrives exactly then (from the first trial's completion): the job must stop
    unregistered, and a resume must run the two trials still due."""
    from ray import tune as ray_tune

    import tune.search
    from tune.errors import JobInterruptedError

    class StopAfterFirstTrial(ray_tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if sum(t.status == "TERMINATED" for t in trials) <= 1:
                os.kill(os.getpid(), signal.SIGINT)

    real = tune.search.driver_callbacks
    monkeypatch.setattr(
        tune.search, "driver_callbacks", lambda *a: [*real(*a), StopAfterFirstTrial()]
    )
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as the CLI has it
    config = write_config(tmp_path, small_csv, num_samples=3)
    job = load_config(config, {"ray.num_cpus": 2, "search.max_concurrent": 1})
    try:
        with pytest.raises(JobInterruptedError, match="stopped by SIGINT during its search"):
            run_job(job, progress=False)
        # Tune's own handler does not outlive the search: a later Ctrl-C interrupts.
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        ray.shutdown()
        signal.signal(signal.SIGINT, before)
    client = MlflowClient(job.tracking_uri)
    assert client.search_model_versions(f"name = '{job.model_name}'") == []
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]

    monkeypatch.setattr(tune.search, "driver_callbacks", real)
    try:
        result = run_job(job, progress=False)
    finally:
        ray.shutdown()
    study = optuna.load_study(study_name=job.name, storage=job.study_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert len(result.trials) == 3
    assert len(client.search_model_versions(f"name = '{job.model_name}'")) == 1
