"""What settles a job's record when its driver dies without ending it.

A driver killed outright (SIGKILL, the kernel's OOM killer, a node shutting down) or ended at
once by its own Ray (a batch scheduler's cancel stops Ray's local processes too, and Ray's core
worker then exits the driver with code 1) runs no `finally`: its MLflow runs stayed RUNNING
until a resume settled them, and its log said nothing of how to continue. The `toxtune` command
starts this watcher beside the job (`watch`): a small process holding the read end of a pipe
whose write end only the driver holds. The driver writes `settled` once it has ended its job run
itself (`Watch.settled`); a pipe that closes without that word means the driver died, and the
watcher then ends the job's runs KILLED, as a stop that gives up does, and says how to continue.
If the driver had started a Ray of its own (no cluster named), the watcher also ends what is left
of it: Ray 2.60.0's dashboard and runtime-env agents outlive a killed driver (about 250 MB,
until the machine restarts). They are found as the processes of the driver's session (`getsid`)
that run Ray's programs and hold files open in that Ray's session folder; a cluster's processes
are never touched.

The watcher ignores SIGINT, SIGTERM and SIGHUP (a scheduler's cancel signals every process of
the job; Ctrl-C is the driver's to handle), prints its stacks on `settings.STACKS_SIGNAL` as the
driver does, and runs in a session of its own, so a terminal's
Ctrl-C never reaches it; a SIGKILL to every process (a node lost) ends it with the driver, which
leaves the runs for the resume to settle, as before. `watch` returns once the watcher ignores
those signals (its start costs the job about 40 ms and the machine 13 MB); it imports MLflow
only after the driver died.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from tune.settings import STACKS_SIGNAL

SETTLED = b"settled\n"  # the driver's word: it ended its job run itself


@dataclass
class Watch:
    """The driver's end of the watcher: `settled()` once the job run is ended."""

    process: subprocess.Popen[bytes]

    def settled(self) -> None:
        """The driver ended its job run itself (any status): the watcher leaves quietly.
        Safe to call twice, and after the watcher died."""
        pipe = self.process.stdin
        if pipe is None or pipe.closed:
            return
        try:
            pipe.write(SETTLED)
            pipe.close()
        except OSError:  # the watcher is gone (killed with the node's other processes)
            pass


def watch(
    tracking_uri: str,
    parent_run_id: str,
    job_name: str,
    resume: str,
    ray_session: str | None = None,
) -> Watch:
    """Start the watcher for this process's job run `parent_run_id`; `resume` is the command
    that continues the job, printed if the driver dies; `ray_session`, the session folder of a
    Ray this process started itself, whose leftovers the watcher then ends."""
    args = [sys.executable, "-m", "tune.guard", tracking_uri, parent_run_id, job_name, resume]
    args += [str(os.getpid()), ray_session or ""]
    process = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    with process.stdout:  # wait until it ignores the signals (Python's start-up: ~0.1 s)
        process.stdout.readline()
    return Watch(process)


def _ray_programs() -> tuple[str, str]:
    """What a local Ray's processes run: this Python (the driver's, which Ray starts its
    workers and agents with) and the binaries in Ray's package (its GCS server, raylet)."""
    spec = importlib.util.find_spec("ray")
    package = os.path.dirname(spec.origin) if spec is not None and spec.origin else ""
    return os.path.realpath(sys.executable), package + os.sep if package else ""


def _end_local_ray(session_dir: str, driver_sid: int) -> int:
    """End the processes of the driver's own Ray that outlived it: those of the driver's
    session that run Ray's programs (`_ray_programs`) and hold files open under Ray's
    `session_dir` (its logs); a `tail -f` of a Ray log in the driver's terminal is not Ray's
    and is left. SIGKILL at once: their driver is gone, and the agents ignore SIGTERM.
    Returns how many there were."""
    import psutil

    prefix = session_dir.rstrip("/") + "/"
    python, package = _ray_programs()
    left = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid == os.getpid() or os.getsid(proc.pid) != driver_sid:
                continue
            exe = proc.exe()
            if exe != python and not (package and exe.startswith(package)):
                continue
            if any(f.path.startswith(prefix) for f in proc.open_files()):
                left.append(proc)
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    return len(left)


def _settle(
    tracking_uri: str, parent_run_id: str, job_name: str, resume: str, pid: str, ray_note: str
) -> int:
    """The driver died: end its runs KILLED if it left them open, and say so."""
    from tune.tracking import client_for, fast_fail_http, finish_job_run

    try:
        with fast_fail_http():
            status = client_for(tracking_uri).get_run(parent_run_id).info.status
    except Exception as exc:  # the tracking server went down with the job
        runs = f"its MLflow runs could not be ended ({type(exc).__name__}: {exc})"
    else:
        if status != "RUNNING":  # ended by the driver (or a resume) after all
            return 0
        finish_job_run(tracking_uri, parent_run_id, "KILLED")
        runs = "its MLflow runs ended KILLED"
    sys.stderr.write(
        f"toxtune tune: job {job_name!r} ended unfinished: its driver (pid {pid}) was killed "
        "before it could stop the job (a signal, the kernel's OOM killer, or its local Ray "
        f"stopping under it): {runs}{ray_note}. Continue it with: {resume}\n"
    )
    sys.stderr.flush()
    return 0


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    faulthandler.register(STACKS_SIGNAL, file=2, all_threads=True)  # as its driver does
    sys.stdout.write("ready\n")
    sys.stdout.close()
    tracking_uri, parent_run_id, job_name, resume, pid, ray_session = argv
    driver_sid = None
    with contextlib.suppress(OSError):  # (the driver may die before its watcher starts)
        driver_sid = os.getsid(int(pid))
    said = sys.stdin.buffer.read()  # until the driver's end closes: its exit, however it came
    if said.startswith(SETTLED):  # (the stop's give-up and the job's end may both say it)
        return 0
    ray_note = ""
    if ray_session and driver_sid is not None:
        ended = _end_local_ray(ray_session, driver_sid)
        ray_note = f"; the {ended} processes its local Ray left were ended" if ended else ""
    return _settle(tracking_uri, parent_run_id, job_name, resume, pid, ray_note)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
