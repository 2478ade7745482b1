"""`toxtune submit` and `toxtune jobs`: send a job to a Ray cluster, then watch or stop it.

`submit` validates the job config here, checks it against the cluster it is going to
(`tune.cluster.checks`), and hands Ray's Jobs API the job's working directory and the entrypoint
`toxtune tune --config job.yaml --address auto <the same flags>` (`tune.cluster.submission`).
This module only parses and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.cli.tune_job import add_tune_flags, tune_overrides
from tune.errors import ClusterError

if TYPE_CHECKING:
    from tune.cluster.submission import JobDetails, JobsClient, Submission
    from tune.config import JobConfig


@contextlib.contextmanager
def pinned_api_address(address: str) -> Iterator[None]:
    """For the duration of one command, make $RAY_API_SERVER_ADDRESS the address it resolved.

    Ray's JobSubmissionClient lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address
    it is given and has no way to turn that off (see
    `tune.cluster.submission.address_override`); a user's RAY_ADDRESS=HOST:6379 would otherwise
    send `--address http://...` elsewhere. The entry point owns the environment, so it is
    set here, and restored afterwards (tests call main() in-process).
    """
    key = "RAY_API_SERVER_ADDRESS"
    saved = os.environ.get(key)
    os.environ[key] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def job_client(address: str) -> JobsClient:
    from tune.cluster.submission import JobsClient

    return JobsClient.connect(address)


def _print_status(job_id: str) -> Callable[[str], None]:
    return lambda status: print(f"{job_id}: {status}", flush=True)


def follow_logs(client: JobsClient, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except (RuntimeError, OSError) as exc:  # the stream broke: fall back to polling
        print(f"(log stream ended: {exc}; polling the status)", file=sys.stderr)
    return client.wait(job_id)


def finish(client: JobsClient, job_id: str, status: str, tail_logs: bool) -> int:
    """Print how the job ended; exit code 0 iff it SUCCEEDED (the log's tail otherwise, and
    for a job stopped, or whose driver a signal ended, the command that continues it)."""
    details = client.details(job_id)
    message = f": {details.message}" if details.message else ""
    print(f"job {job_id} {status}{message}", flush=True)
    if status == "SUCCEEDED":
        return 0
    if tail_logs:
        lines = client.logs(job_id).splitlines()[-40:]
        print("--- last lines of the job's log ---", *lines, sep="\n", file=sys.stderr)
    if details.driver_killed:
        print(_killed(details), file=sys.stderr)
    if details.continues_with:
        print(f"continue it with: {details.continues_with}", file=sys.stderr, flush=True)
    return 1


def _killed(details: JobDetails) -> str:
    return (
        f"its driver was ended by a signal (exit code {details.driver_exit_code}: the kernel's "
        "out-of-memory killer, a node shutting down), not by an error of the job: it continues "
        "as after a killed driver"
    )


# ---------------------------------------------------------------------------------------------
# toxtune submit


def cmd_submit(args: argparse.Namespace) -> int:
    """Check the job against the cluster, submit it, optionally wait or follow."""
    from tune.cluster.checks import check_job
    from tune.cluster.info import cluster_info
    from tune.cluster.submission import resolve_address
    from tune.config import load_config

    overrides = tune_overrides(args)
    config_path: Path | None = Path(args.config) if args.config else None
    job = load_config(config_path, overrides)  # validates; ConfigError names the field
    address = resolve_address(args.address)
    with pinned_api_address(address):
        client = job_client(address)  # fails early, with the tunnel hint, if unreachable
        info = cluster_info(address, args.cluster_config)
        saved = bool(args.resume) and config_path is None
        saved = saved and "tracking.tracking_uri" not in overrides
        warnings = check_job(job, info, saved_config=saved)  # refusals: nothing is submitted
        print(f"cluster: {info.describe()}", file=sys.stderr)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        sent = _submit_named(client, job, overrides, config_path, args)
        for line in sent.notes:
            print(line, file=sys.stderr)
        job_id, q = sent.job_id, shlex.quote(address)
        print(f"submitted job {job_id} to {address}")
        print(f"  entrypoint: {sent.entrypoint}")
        print(f"  status: toxtune jobs status {job_id} --address {q}")
        print(f"  logs:   toxtune jobs logs {job_id} --address {q} --follow")
        print(f"  stop:   toxtune jobs stop {job_id} --address {q}")
        print(f"  dashboard: {address}/#/jobs/{job_id}", flush=True)
        try:
            if args.follow:
                status = follow_logs(client, job_id)
                return finish(client, job_id, status, tail_logs=False)
            if args.wait:
                status = client.wait(job_id, on_status=_print_status(job_id))
                return finish(client, job_id, status, tail_logs=True)
        except KeyboardInterrupt:
            print(f"\nstopped watching; job {job_id} keeps running (toxtune jobs stop {job_id})")
            return 130
    return 0


CLAIM_ATTEMPTS = 20  # fresh names tried when jobs submitted at the same moment chose the same


def _submit_named(
    client: JobsClient,
    job: JobConfig,
    overrides: dict[str, Any],
    config_path: Path | None,
    args: argparse.Namespace,
) -> Submission:
    """Submit the job under its name: `--resume`'s, the config's `run_name`, or a fresh
    `<experiment>-<UTC second>` that skips the names of the cluster's jobs and is claimed as
    the submission id (`submission.claim_id`), so that jobs submitted at the same moment, which
    all saw the same list, still end with names of their own (the loser of a claim takes the
    next suffix) instead of one sharing another's study and runs."""
    from tune.cluster.submission import IdTakenError, claim_id, submit_job
    from tune.config import named

    fresh = not args.resume and not job.tracking.run_name
    taken = client.names() if fresh else set()
    for _ in range(CLAIM_ATTEMPTS):
        candidate = named(job, exists=taken.__contains__)
        if not args.resume:
            overrides["tracking.run_name"] = candidate.name
        try:
            return submit_job(
                client,
                candidate,
                overrides,
                config_path,
                resume=args.resume,
                extra_dir=args.working_dir,
                runtime_env_json=args.runtime_env_json,
                submission_id=claim_id(candidate.name) if fresh else None,
            )
        except IdTakenError:
            taken.add(candidate.name)
    raise ClusterError(f"no free job name after {CLAIM_ATTEMPTS} tries; set one with --run-name")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `toxtune submit` besides the `tune` flags."""
    parser.add_argument(
        "--address",
        help="Ray dashboard / Jobs API URL, http://HEAD:8265 (default: $RAY_ADDRESS if it is "
        "an http(s) URL)",
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's logs until it ends; exit 0 iff it SUCCEEDED",
    )
    how.add_argument(
        "--wait", action="store_true", help="poll until the job ends; exit 0 iff it SUCCEEDED"
    )
    parser.add_argument(
        "--working-dir",
        type=Path,
        help="extra local folder to ship with the job (copied without .git/.venv/results and "
        "secret-looking files); the job runs inside it",
    )
    parser.add_argument(
        "--runtime-env-json",
        help='extra Ray runtime_env as JSON, e.g. \'{"pip": ["xgboost"]}\' (no secrets: it is '
        "stored on the cluster in plain text)",
    )
    parser.add_argument(
        "--cluster-config",
        help="cluster-launcher YAML of the target cluster; autoscaling worker groups make the "
        "job multi-node for the checks (default: ./cluster.yaml if present; 'none' to skip)",
    )


# ---------------------------------------------------------------------------------------------
# toxtune jobs


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")


def cmd_jobs(args: argparse.Namespace) -> int:
    """`toxtune jobs status|logs|stop|list [JOB_ID]`."""
    from tune.cluster.submission import resolve_address

    address = resolve_address(args.address)
    action, job_id = args.action, args.job_id
    if action != "list" and not job_id:
        raise ClusterError(f"toxtune jobs {action} needs a JOB_ID (see `toxtune jobs list`)")
    with pinned_api_address(address):
        client = job_client(address)
        if action == "list":
            jobs = client.list()
            wide = max([len(j.name) for j in jobs] + [4])
            print(f"{'JOB_ID':<30} {'NAME':<{wide}} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
            for j in jobs:
                entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
                name = j.name or "-"
                print(
                    f"{j.job_id:<30} {name:<{wide}} {j.status:<10} {_when(j.start_ms):<20} {entry}"
                )
            return 0
        if action == "status":
            d = client.details(job_id)
            print(f"job:        {job_id}")
            print(f"status:     {d.status}")
            if d.message:
                print(f"message:    {d.message}")
            print(f"entrypoint: {d.entrypoint}")
            print(f"started:    {_when(d.start_ms)}")
            print(f"ended:      {_when(d.end_ms)}")
            if d.driver_killed:
                print(f"driver:     {_killed(d)}")
            if d.continues_with:
                print(f"continue:   {d.continues_with}")
            return 0
        if action == "logs":
            if args.follow:
                status = follow_logs(client, job_id)
                return finish(client, job_id, status, tail_logs=False)
            sys.stdout.write(client.logs(job_id))
            return 0
        if client.stop(job_id):
            print(f"stop requested for {job_id}")
        else:
            print(f"{job_id} was not running ({client.status(job_id)})")
        return 0


def add_jobs_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `toxtune jobs status|logs|stop|list [JOB_ID]`."""
    parser.add_argument("action", choices=("status", "logs", "stop", "list"))
    parser.add_argument("job_id", nargs="?", metavar="JOB_ID", help="submission id (raysubmit_…)")
    parser.add_argument(
        "--address", help="Ray dashboard / Jobs API URL, http://HEAD:8265 (default: $RAY_ADDRESS)"
    )
    parser.add_argument(
        "--follow", action="store_true", help="logs: stream until the job ends, exit with it"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit `toxtune tune` to a Ray cluster as a batch job")
    add_tune_flags(p, skip=("address",))
    add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    add_jobs_arguments(p)
    p.set_defaults(func=cmd_jobs)
