"""The watcher that settles a job's record when its driver dies outright (tune.guard).

The drills with a real job are in test_resume.py (a scheduler's cancel, a driver killed alone)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from mlflow import MlflowClient

from tune.settings import STACKS_SIGNAL
from tune.tracking import PARENT_TAG, STATUS_TAG, TRIAL_TAG, start_job_run

RESUME = "toxtune tune --resume job"
DRIVER = """
import sys, time
from tune.guard import watch
from tune.tracking import finish_job_run
uri, parent, end = sys.argv[1:]
guard = watch(uri, parent, "job", {resume!r})
print(guard.process.pid, flush=True)
if end == "settled":
    finish_job_run(uri, parent, "FINISHED")
    guard.settled()
else:
    time.sleep(120)  # until the test kills it
"""


RAY_DRIVER = """
import pathlib, subprocess, sys, time
from tune import bridge
from tune.guard import watch
uri, parent = sys.argv[1:]
bridge.init_local_ray(1, 0)
session = bridge.local_ray_session_dir()
guard = watch(uri, parent, "job", {resume!r}, session)
log = sorted(pathlib.Path(session, "logs").glob("*.out"))[0]
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tail = subprocess.Popen(["tail", "-f", str(log)], **quiet)  # the user's, in the same terminal
print(guard.process.pid, session, tail.pid, flush=True)
time.sleep(300)  # until the test kills it
"""


def _processes_with_files_under(folder: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if any(f.path.startswith(folder + "/") for f in proc.open_files()):
                found.append(proc)
    return found


def _job_with_a_trial(uri: str) -> tuple[MlflowClient, str, str]:
    parent = start_job_run(uri, "exp", "job", {}, resume=False)
    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    trial = client.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: "t1"}).info.run_id
    return client, parent, trial


def _driver(uri: str, parent: str, end: str) -> tuple[subprocess.Popen[str], psutil.Process]:
    """A driver that starts the watcher as `toxtune tune` does; its stdout names the watcher."""
    script = DRIVER.format(resume=RESUME)
    driver = subprocess.Popen(
        [sys.executable, "-c", script, uri, parent, end],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert driver.stdout is not None
    return driver, psutil.Process(int(driver.stdout.readline()))


def test_a_driver_killed_outright_has_its_runs_ended_killed_and_the_resume_said(
    sqlite_uri: str,
) -> None:
    """The OOM killer, or a scheduler's cancel whose SIGTERM stopped the job's local Ray first
    (Ray then exits the driver at once): no `finally` runs in the driver. The watcher outlives
    the cancel's signals (which reach every process of the job), then ends the job run and its
    open trial runs KILLED and prints the command that continues the job, as the last line.
    Asked for its stacks (`kill -USR2`, as for its driver), it prints them into the job's log
    and goes on."""
    client, parent, trial = _job_with_a_trial(sqlite_uri)
    driver, watcher = _driver(sqlite_uri, parent, "killed")
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, STACKS_SIGNAL):
        watcher.send_signal(signum)
    time.sleep(1.0)
    assert watcher.is_running() and watcher.status() != psutil.STATUS_ZOMBIE
    assert client.get_run(parent).info.status == "RUNNING"  # the driver lives: nothing done
    driver.kill()
    _, err = driver.communicate(timeout=90)  # its stderr closes once the watcher is done
    assert err.strip().splitlines()[-1].endswith(f"Continue it with: {RESUME}"), err
    assert "guard.py" in err and " in main" in err, err  # its stack, waiting on its driver
    assert "ended unfinished" in err and f"pid {driver.pid}" in err
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(trial).info.status == "KILLED"
    assert client.get_run(trial).data.tags[STATUS_TAG] == "killed"


def test_a_driver_that_ended_its_run_leaves_the_watcher_nothing_to_do(sqlite_uri: str) -> None:
    client, parent, trial = _job_with_a_trial(sqlite_uri)
    driver, watcher = _driver(sqlite_uri, parent, "settled")
    _, err = driver.communicate(timeout=90)
    assert driver.returncode == 0, err
    watcher.wait(timeout=30)
    assert "Continue it with" not in err, err
    assert client.get_run(parent).info.status == "FINISHED"
    assert client.get_run(trial).info.status == "KILLED"  # ended by the driver's own finish


def test_a_tracking_server_gone_with_the_driver_is_named_and_the_resume_still_said() -> None:
    """A scheduler's cancel may stop the job's MLflow server with it: the watcher cannot end
    the runs, says so in one line (no traceback) and still names the command that continues
    the job, before the scheduler's SIGKILL would come (Slurm's default grace: 30 s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    driver, _ = _driver(f"http://127.0.0.1:{port}", "0123456789abcdef", "killed")
    started = time.monotonic()
    driver.kill()
    _, err = driver.communicate(timeout=90)
    assert time.monotonic() - started < 30, err
    last = err.strip().splitlines()[-1]
    assert "its MLflow runs could not be ended" in last, err
    assert last.endswith(f"Continue it with: {RESUME}"), err
    assert "Traceback" not in err, err


@pytest.mark.slow
def test_a_killed_driver_leaves_no_process_of_its_own_ray(sqlite_uri: str) -> None:
    """The OOM killer takes the driver alone: Ray's dashboard and runtime-env agents outlived
    it (about 250 MB until the machine restarted). The watcher ends every process of the
    driver's own Ray before it says how to continue, and leaves the user's `tail -f` of a Ray
    log in the same terminal."""
    _, parent, _ = _job_with_a_trial(sqlite_uri)
    driver = subprocess.Popen(
        [sys.executable, "-c", RAY_DRIVER.format(resume=RESUME), sqlite_uri, parent],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # as a job's own terminal or batch step
    )
    try:
        assert driver.stdout is not None
        _, session, tail_pid = driver.stdout.readline().split()
        tail = psutil.Process(int(tail_pid))
        ray_processes = [p for p in _processes_with_files_under(session) if p != tail]
        assert len(ray_processes) >= 3, ray_processes  # its GCS, raylet and agents
        driver.kill()
        _, err = driver.communicate(timeout=90)  # its stderr closes once the watcher is done
        last = err.strip().splitlines()[-1]
        assert last.endswith(f"Continue it with: {RESUME}"), err
        assert "processes its local Ray left were ended" in last, err
        left = [p for p in _processes_with_files_under(session) if p.status() != "zombie"]
        assert left == [tail], [p.cmdline() for p in left]
    finally:
        for proc in psutil.process_iter():  # nothing of this test's Ray outlives it
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(proc.pid) == driver.pid:
                    proc.kill()
