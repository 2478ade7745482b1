"""What settles a job's record when its driver dies without ending it.

A driver killed outright (SIGKILL, the kernel's OOM killer, a node shutting down) or ended at
once by its own Ray (a batch scheduler's cancel stops Ray's local processes too, and Ray's core
worker then exits the driver with code 1) runs no `finally`: its MLflow runs stayed RUNNING
until a resume settled them, and its log said nothing of how to continue. The `toxtune` command
starts this watcher beside the job (`watch`): a small process holding the read end of a pipe
whose write end only the driver holds. The driver writes `settled` once it has ended its job run
itself (`Watch.settled`); a pipe that closes without that word means the driver died, and the
watcher then ends the job's runs KILLED, as a stop that gives up does, and says how to continue.

The watcher ignores SIGINT, SIGTERM and SIGHUP (a scheduler's cancel signals every process of
the job; Ctrl-C is the driver's to handle) and runs in a session of its own, so a terminal's
Ctrl-C never reaches it; a SIGKILL to every process (a node lost) ends it with the driver, which
leaves the runs for the resume to settle, as before. `watch` returns once the watcher ignores
those signals (its start costs the job about 40 ms and the machine 13 MB); it imports MLflow
only after the driver died.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

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


def watch(tracking_uri: str, parent_run_id: str, job_name: str, resume: str) -> Watch:
    """Start the watcher for this process's job run `parent_run_id`; `resume` is the command
    that continues the job, printed if the driver dies."""
    args = [sys.executable, "-m", "tune.guard", tracking_uri, parent_run_id, job_name, resume]
    args.append(str(os.getpid()))
    process = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    with process.stdout:  # wait until it ignores the signals (Python's start-up: ~0.1 s)
        process.stdout.readline()
    return Watch(process)


def _settle(tracking_uri: str, parent_run_id: str, job_name: str, resume: str, pid: str) -> int:
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
        f"stopping under it): {runs}. Continue it with: {resume}\n"
    )
    sys.stderr.flush()
    return 0


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sys.stdout.write("ready\n")
    sys.stdout.close()
    tracking_uri, parent_run_id, job_name, resume, pid = argv
    said = sys.stdin.buffer.read()  # until the driver's end closes: its exit, however it came
    if said.startswith(SETTLED):  # (the stop's give-up and the job's end may both say it)
        return 0
    return _settle(tracking_uri, parent_run_id, job_name, resume, pid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
