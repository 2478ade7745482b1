"""Ray Job Submission: what is sent (working directory, entrypoint, runtime env) and a client.

A submitted job is `toxtune tune --config job.yaml --address auto <the same flags>` run on the
cluster, with a tiny working directory: the config as `job.yaml`, a local data file if the job
uses one, and `--working-dir` if given (without local state and secret-looking files). The search
runs on the cluster exactly as on a laptop.

`JobsClient` wraps Ray's `JobSubmissionClient` for one dashboard address; every failure it meets
is a `ClusterError`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.cluster.storage import local_path
from tune.errors import ClusterError
from tune.flags import TUNE_FLAGS

if TYPE_CHECKING:
    from tune.config import JobConfig

JOB_CONFIG_NAME = "job.yaml"  # the config file's name inside the job's working directory
DATA_DIR = "_toxtune_data"  # where a local data file is shipped inside the working directory
MAX_DATA_BYTES = 200 * 2**20  # above this, a data file must live on shared storage or a URL
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
JOB_METADATA = "toxtune_job"  # the submitted job's metadata key holding the toxtune job's name
# The `toxtune submit --resume` that continues a submitted job from where it was submitted: in
# its metadata (`toxtune jobs status` prints it for a stopped job) and in its driver's
# environment (`tune.search.resume_command` names it in the job's own stop line).
RESUME_METADATA = "toxtune_resume"
CONTINUE_ENV = "TOXTUNE_CONTINUE_WITH"
# `toxtune jobs stop` is Ray's stop: SIGTERM to the driver, SIGKILL after this many seconds (Ray's
# default is 3). A driver killed before it has stopped its trials and ended their MLflow runs
# leaves them RUNNING until the job is resumed; a local job with 2-4 trials in flight and an
# MLflow server exited 4.3-4.5 s after SIGTERM here. The driver exits as soon as it is done; the
# grace only bounds a stop that hangs. A value the user sets in --runtime-env-json is kept.
STOP_GRACE_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
STOP_GRACE_S = 60
CLAIM_PREFIX = "toxtune-"  # a fresh-named job's submission id: `toxtune-<name>`, its claim


class IdTakenError(ClusterError):
    """The submission id (a fresh job name's claim) is held by a job the cluster already has."""


def claim_id(name: str) -> str:
    """The submission id that claims the fresh job name `name` on a cluster. Ray adds a job
    under a given id only if no job holds it (one atomic put in the GCS), so two submits that
    chose the same name at once cannot both have it: the second is refused and picks another."""
    return f"{CLAIM_PREFIX}{name}"


AGENT_WAIT_S = 60.0  # how long a submission waits for a starting head node's job agent
# The variables Ray's JobSubmissionClient lets override the address it is given, in its order.
RAY_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
ADDRESS_HINT = (
    "the Ray dashboard URL, e.g. http://127.0.0.1:8265 while `ray dashboard cluster.yaml` "
    "forwards it from the head node"
)
# Names never copied out of --working-dir: local state, and files that usually hold secrets.
WORKING_DIR_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.egg-info",
    "toxtune_results",
    "mlruns",
    "mlartifacts",
    "*.db",
    ".env",
    ".env.*",
    ".netrc",
    ".aws",
    ".ssh",
    ".gnupg",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    "credentials*",
    "*.kubeconfig",
)
_SECRET_NAME = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY|AUTH", re.I
)


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """The Jobs API URL: `--address`, else $RAY_ADDRESS when it is http(s); no trailing slash."""
    env = os.environ if environ is None else environ
    source = "--address"
    if not address:
        address, source = env.get("RAY_ADDRESS", ""), "$RAY_ADDRESS"
        if not address.startswith(("http://", "https://")):
            shown = f" ($RAY_ADDRESS={address} is not a dashboard URL)" if address else ""
            raise ClusterError(f"--address is required{shown}: {ADDRESS_HINT}")
    parsed = urllib.parse.urlsplit(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterError(
            f"{source} {address!r} is not an http(s) URL: give {ADDRESS_HINT} "
            "(not the GCS address HOST:6379 nor ray://)"
        )
    if parsed.username or parsed.password:
        raise ClusterError(f"{source} must not embed credentials")
    return address.rstrip("/")


# ---------------------------------------------------------------------------------------------
# what is shipped, and the command that runs


def render_entrypoint(
    overrides: dict[str, Any], config_name: str | None = JOB_CONFIG_NAME, resume: str | None = None
) -> str:
    """The job's shell command: `toxtune tune` with the user's flags, each value shell-quoted."""
    argv = ["toxtune", "tune"]
    if config_name:
        argv += ["--config", config_name]
    argv += ["--address", "auto", *_flag_args(overrides, resume)]
    if resume:
        argv.append(f"--resume={resume}")
    return shlex.join(argv)


def resume_command(address: str, name: str, overrides: dict[str, Any], shipped: str | None) -> str:
    """The `toxtune submit` that continues the submitted job `name` from its saved config: the
    flags this submission gave again (where its results, tracking and study live), and the data
    file shipped from here (`shipped`) shipped anew, since the stopped job's working directory
    is gone with it."""
    again = dict(overrides)
    if shipped:
        again["data.source"] = shipped
    argv = ["toxtune", "submit", "--resume", name, "--address", address]
    return shlex.join(argv + _flag_args(again, resume=name))


def _flag_args(overrides: dict[str, Any], resume: str | None) -> list[str]:
    """`--flag=value` for each override (`--targets A B` for the targets); the job's own name
    is left out when it continues (`resume`), as is the address."""
    flag_of = {key: flag for flag, (key, _) in TUNE_FLAGS.items()}
    argv: list[str] = []
    for key, value in overrides.items():
        if key == "ray.address" or (key == "tracking.run_name" and resume and value == resume):
            continue
        if key == "data.targets":
            targets = [str(t) for t in value]
            if any(t.startswith("-") for t in targets):
                raise ClusterError(f"--targets {targets}: a target name must not start with '-'")
            argv += ["--targets", *targets]
            continue
        flag = flag_of.get(key)
        if flag is None:
            raise ClusterError(f"no `toxtune tune` flag sets {key}; put it in the --config file")
        argv.append(f"--{flag.replace('_', '-')}={value}")
    return argv


def _ignore(_: str, names: list[str]) -> set[str]:
    return {n for n in names for pat in WORKING_DIR_EXCLUDES if fnmatch.fnmatch(n, pat)}


def prepare_working_dir(
    root: Path,
    job: JobConfig,
    overrides: dict[str, Any],
    config_path: Path | None,
    extra_dir: Path | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Fill `root` (the job's working_dir) and return the overrides to render, plus notes.

    The config file is copied as `job.yaml`; a local data file is copied under `_toxtune_data/`
    and `data.source` points there, so a laptop path works on the cluster.
    """
    notes: list[str] = []
    out = dict(overrides)
    if extra_dir is not None:
        if not extra_dir.is_dir():
            raise ClusterError(f"--working-dir {extra_dir}: no such folder")
        shutil.copytree(extra_dir, root, ignore=_ignore, dirs_exist_ok=True, symlinks=True)
    if config_path is not None:
        shutil.copyfile(config_path, root / JOB_CONFIG_NAME)
    source = job.data.source
    if source != "default" and "://" not in source:
        path = local_path(source)
        if path.is_file():
            size = path.stat().st_size
            if size > MAX_DATA_BYTES:
                raise ClusterError(
                    f"data.source {source} is {size / 2**20:.0f} MiB, too big to ship with the "
                    "job; put it on shared storage (an absolute path every node sees) or at a URL"
                )
            (root / DATA_DIR).mkdir(exist_ok=True)
            shutil.copyfile(path, root / DATA_DIR / path.name)
            out["data.source"] = f"{DATA_DIR}/{path.name}"
            notes.append(f"shipping data.source {source} with the job ({size / 2**10:.0f} KiB)")
        elif path.is_absolute():
            notes.append(
                f"data.source {source} does not exist on this machine; it must exist on the "
                "cluster's head node"
            )
        elif extra_dir is None or not (extra_dir / path).is_file():
            raise ClusterError(
                f"data.source {source}: no such file here (nor in --working-dir); give a path "
                "that exists on this machine, an absolute path on the cluster, or a URL"
            )
    return out, notes


def runtime_env(working_dir: Path, extra_json: str | None = None) -> dict[str, Any]:
    """The job's runtime_env: `--runtime-env-json` plus our working_dir; refuses secrets."""
    env: dict[str, Any] = {}
    if extra_json:
        try:
            env = json.loads(extra_json)
        except json.JSONDecodeError as exc:
            raise ClusterError(f"--runtime-env-json is not valid JSON: {exc}") from exc
        if not isinstance(env, dict):
            raise ClusterError("--runtime-env-json must be a JSON object")
    if "working_dir" in env:
        raise ClusterError("--runtime-env-json must not set working_dir; use --working-dir")
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise ClusterError("--runtime-env-json: env_vars must be an object")
    secret = sorted(k for k in env_vars if _SECRET_NAME.search(k))
    if secret:
        raise ClusterError(
            f"--runtime-env-json env_vars {', '.join(secret)} look like credentials; a runtime "
            "env is stored on the cluster in plain text and shown in the dashboard. Give the "
            "nodes access instead (instance profile / IAM role, or the env of `ray start`)"
        )
    env["working_dir"] = str(working_dir)
    return env


# ---------------------------------------------------------------------------------------------
# the Jobs API


def address_override(address: str, environ: dict[str, str] | None = None) -> str | None:
    """The `VAR=value` that would make Ray's JobSubmissionClient talk to another address than
    `address`, or None.

    Ray (checked on 2.60: ray.dashboard.utils.get_address_for_submission_client) always lets
    $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, replace the address a JobSubmissionClient is
    given, and has no argument to turn that off. toxtune does not rewrite the environment from
    library code to win that race; the `toxtune submit` / `jobs` commands pin
    $RAY_API_SERVER_ADDRESS to their resolved address at the entry point (tune.cli.cluster).
    """
    env = os.environ if environ is None else environ
    for var in RAY_ADDRESS_VARS:
        value = env.get(var, "")
        if value:
            return None if value.rstrip("/") == address else f"${var}={value}"
    return None


@dataclass(frozen=True)
class JobDetails:
    """What `toxtune jobs` shows of one job."""

    job_id: str
    status: str
    entrypoint: str = ""
    message: str = ""
    start_ms: int | None = None
    end_ms: int | None = None
    name: str = ""  # the toxtune job's name (its `toxtune_job` metadata; "" for other jobs)
    resume: str = ""  # the `toxtune submit --resume` that continues it (RESUME_METADATA)
    driver_exit_code: int | None = None  # the entrypoint's, once it has ended (Ray's)

    @property
    def driver_killed(self) -> bool:
        """A FAILED job whose driver a signal ended (the kernel's out-of-memory killer, a node
        shutting down, a stop toxtune gave up on): its record is a killed driver's, which a
        resume continues exactly. A job that failed by an error of its own (exit 1 or 2: bad
        input, a store it cannot reach) would fail the same way again."""
        code = self.driver_exit_code
        return self.status == "FAILED" and code is not None and (code < 0 or code >= 128)

    @property
    def continues_with(self) -> str:
        """The command that continues the job from where it ended; "" when there is none to
        give (it succeeded, is still running, failed by its own error, or is not toxtune's)."""
        return self.resume if self.status == "STOPPED" or self.driver_killed else ""


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


def _details(info: Any, job_id: str | None = None) -> JobDetails:
    return JobDetails(
        job_id=job_id or info.submission_id or info.job_id or "-",
        status=_status(info.status),
        entrypoint=info.entrypoint or "",
        message=info.message or "",
        start_ms=info.start_time,
        end_ms=info.end_time,
        name=str((info.metadata or {}).get(JOB_METADATA, "")),
        resume=str((info.metadata or {}).get(RESUME_METADATA, "")),
        driver_exit_code=getattr(info, "driver_exit_code", None),
    )


@dataclass
class JobsClient:
    """Ray's Jobs API at one dashboard address; every failure is a ClusterError."""

    address: str
    sdk: Any = field(repr=False)  # ray.job_submission.JobSubmissionClient

    @classmethod
    def connect(cls, address: str) -> JobsClient:
        """A client for the dashboard at `address`, or a ClusterError saying why not."""
        from ray.job_submission import JobSubmissionClient

        from tune.cluster.info import auth_headers

        override = address_override(address)
        if override:
            raise ClusterError(
                f"{override} would override the address {address} inside Ray's Jobs client; "
                "unset it, or make it the same address"
            )
        try:
            client = JobSubmissionClient(address, headers=auth_headers())
        except (ConnectionError, RuntimeError, OSError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Ray Jobs API at {address}: {str(exc).rstrip('.')}. Is the "
                "cluster up and the dashboard forwarded (`ray dashboard cluster.yaml`)?"
            ) from exc
        return cls(address, client)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` (a method of `sdk`), its failures as ClusterError."""
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ConnectionError, OSError) as exc:
            raise ClusterError(f"Ray Jobs API at {self.address}: {exc}") from exc

    def submit(
        self,
        entrypoint: str,
        runtime_env: dict[str, Any],
        metadata: dict,
        agent_wait_s: float = AGENT_WAIT_S,
        submission_id: str | None = None,
    ) -> str:
        """Submit; the job's id (`submission_id` when given, IdTakenError when a job holds it).
        A head node still starting its job agent answers "No available agent" (HTTP 500,
        nothing submitted): that is retried for up to `agent_wait_s`."""
        deadline = time.monotonic() + agent_wait_s
        while True:
            try:
                return str(
                    self.call(
                        self.sdk.submit_job,
                        entrypoint=entrypoint,
                        runtime_env=runtime_env,
                        metadata=metadata,
                        submission_id=submission_id,
                    )
                )
            except ClusterError as exc:
                if submission_id and f"submission_id {submission_id} already exists" in str(exc):
                    raise IdTakenError(str(exc)) from exc
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    def status(self, job_id: str) -> str:
        return _status(self.call(self.sdk.get_job_status, job_id))

    def details(self, job_id: str) -> JobDetails:
        return _details(self.call(self.sdk.get_job_info, job_id), job_id)

    def list(self) -> list[JobDetails]:
        """Every job the cluster knows, oldest first."""
        rows = sorted(self.call(self.sdk.list_jobs), key=lambda j: j.start_time or 0)
        return [_details(j) for j in rows]

    def names(self) -> set[str]:
        """The toxtune job names the cluster knows (any status): a new job takes none of them."""
        return {j.name for j in self.list() if j.name}

    def logs(self, job_id: str) -> str:
        return str(self.call(self.sdk.get_job_logs, job_id) or "")

    def stop(self, job_id: str) -> bool:
        return bool(self.call(self.sdk.stop_job, job_id))

    def tail(self, job_id: str) -> AsyncIterator[str]:
        """The job's log as it is written (ends when the job does)."""
        return self.sdk.tail_job_logs(job_id)

    def wait(
        self, job_id: str, poll_s: float = 2.0, on_status: Callable[[str], None] | None = None
    ) -> str:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED; return that status.
        `on_status` is called with each new status."""
        last = None
        while True:
            status = self.status(job_id)
            if status != last and on_status is not None:
                on_status(status)
            last = status
            if status in TERMINAL:
                return status
            time.sleep(poll_s)


@dataclass(frozen=True)
class Submission:
    """A job handed to the cluster."""

    job_id: str
    name: str  # the job's name (its study, runs and results folder)
    entrypoint: str
    notes: list[str]  # what was shipped, and what must exist on the cluster
    shipped: str | None = None  # the data file shipped from here (its absolute path here)


def submit_job(
    client: JobsClient,
    job: JobConfig,
    overrides: dict[str, Any],
    config_path: Path | None,
    resume: str | None = None,
    extra_dir: Path | None = None,
    runtime_env_json: str | None = None,
    submission_id: str | None = None,
) -> Submission:
    """Ship the job's working directory and submit `toxtune tune` with the same flags, under
    `submission_id` when given (`claim_id`: IdTakenError when another job holds it).

    `job` must already be checked against the cluster (`tune.cluster.checks.check_job`).
    """
    with tempfile.TemporaryDirectory(prefix="toxtune-job-") as tmp:
        root = Path(tmp)
        rendered, notes = prepare_working_dir(root, job, overrides, config_path, extra_dir)
        moved = rendered.get("data.source") != overrides.get("data.source")  # shipped from here
        shipped = str(local_path(job.data.source)) if moved else None
        again = resume_command(client.address, job.name, overrides, shipped)
        env = runtime_env(root, runtime_env_json)
        env["env_vars"] = {
            STOP_GRACE_ENV: str(STOP_GRACE_S),
            **(env.get("env_vars") or {}),
            CONTINUE_ENV: again,
        }
        entrypoint = render_entrypoint(rendered, JOB_CONFIG_NAME if config_path else None, resume)
        metadata = {JOB_METADATA: job.name, RESUME_METADATA: again}
        job_id = client.submit(entrypoint, env, metadata, submission_id=submission_id)
    return Submission(job_id, job.name, entrypoint, notes, shipped)
