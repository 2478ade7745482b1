"""Ray Job Submission: `toxtune submit` / `toxtune jobs`, and the checks a multi-node job needs.

`submit` resolves and validates the job config here, checks it against the cluster it is going to
(how many nodes, whether it autoscales), and then hands Ray's Jobs API a tiny working directory
(the config as `job.yaml`, a local data file if the job uses one) and the entrypoint
`toxtune tune --config job.yaml --address auto <the same flags>`. The search itself runs on the
cluster exactly as it would on a laptop; only where results and MLflow runs go has to change.

Ray is imported inside the functions that need it so `toxtune --help` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.errors import ClusterError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from tune.config import JobConfig

JOB_CONFIG_NAME = "job.yaml"  # the config file's name inside the job's working directory
DATA_DIR = "_toxtune_data"  # where a local data file is shipped inside the working directory
MAX_DATA_BYTES = 200 * 2**20  # above this, a data file must live on shared storage or a URL
CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs"})
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
DEFAULT_CLUSTER_CONFIG = Path("cluster.yaml")
TRACKING_HINT = "--tracking-uri http://MLFLOW_HOST:5000"
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


# ---------------------------------------------------------------------------------------------
# argument parsing


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `toxtune submit` (the `tune` flags are added by the CLI)."""
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
# what the cluster looks like


@dataclass(frozen=True)
class NodeInfo:
    """One alive node as the dashboard's state API reports it."""

    node_id: str
    ip: str
    is_head: bool = False
    resources: dict[str, float] = field(default_factory=dict)
    group: str | None = None  # ray.io/node-group (set by the cluster launcher / KubeRay)

    def describe(self) -> str:
        role = "head" if self.is_head else "worker"
        return f"{role} {self.node_id[:8]} ({self.ip})"


@dataclass(frozen=True)
class ClusterInfo:
    """The target cluster: its alive nodes and why it may grow (None: a fixed-size cluster)."""

    nodes: tuple[NodeInfo, ...]
    autoscaling: str | None = None

    @property
    def multi_node(self) -> bool:
        """Trials may run on more than one node (now, or once the autoscaler adds workers)."""
        return len(self.nodes) > 1 or self.autoscaling is not None

    @property
    def multi_machine(self) -> bool:
        """Nodes may sit on different machines (so 127.0.0.1 differs between them)."""
        return len({n.ip for n in self.nodes}) > 1 or self.autoscaling is not None

    def describe(self) -> str:
        ips = len({n.ip for n in self.nodes})
        text = f"{len(self.nodes)} alive node(s) on {ips} machine(s)"
        return f"{text}; {self.autoscaling}" if self.autoscaling else text


def auth_headers() -> dict[str, str]:
    """The cluster's auth token as an HTTP header, if this machine holds one.

    Ray enables token authentication by default; the token lives in `RAY_AUTH_TOKEN`,
    the file `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`, read in that order (fresh on
    every call: Ray's own loader caches the first answer). Without it the dashboard answers 401.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(url: str, timeout: float = 15.0) -> Any:
    req = urllib.request.Request(url, headers={"Accept": "application/json", **auth_headers()})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def alive_nodes(address: str) -> list[NodeInfo]:
    """Alive nodes of the cluster behind the dashboard at `address` (its state API)."""
    try:
        data = _get_json(f"{address}/api/v0/nodes?limit=10000&detail=false")
        rows = data["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"cannot list the nodes of the cluster at {address}: {exc}") from exc
    nodes = []
    for row in rows:
        if row.get("state") != "ALIVE":
            continue
        labels = row.get("labels") or {}
        nodes.append(
            NodeInfo(
                node_id=str(row["node_id"]),
                ip=str(row.get("node_ip", "")),
                is_head=bool(row.get("is_head_node")),
                resources={k: float(v) for k, v in (row.get("resources_total") or {}).items()},
                group=labels.get("ray.io/node-group"),
            )
        )
    return nodes


def autoscaling_from_config(path: Path) -> str | None:
    """Why the cluster in a cluster-launcher YAML can grow, or None if it has no worker room."""
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ClusterError(f"cannot read the cluster config {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ClusterError(f"{path}: not a Ray cluster config (expected a mapping)")
    total = int(raw.get("max_workers", 2))  # Ray's default global cap
    types = raw.get("available_node_types") or {}
    head = raw.get("head_node_type")
    groups = {
        name: int(spec.get("max_workers", total))
        for name, spec in types.items()
        if name != head and isinstance(spec, dict)
    }
    room = min(total, sum(groups.values())) if types else total
    if room <= 0:
        return None
    names = ", ".join(n for n, m in groups.items() if m > 0) or "workers"
    return f"{path} autoscales ({names}: up to {room} worker node(s))"


def cluster_info(address: str, cluster_config: str | Path | None = None) -> ClusterInfo:
    """Alive nodes plus whether the cluster autoscales (from its YAML or its node labels)."""
    nodes = alive_nodes(address)
    autoscaling = None
    config = _cluster_config_path(cluster_config)
    if config is not None:
        autoscaling = autoscaling_from_config(config)
    if autoscaling is None:
        groups = sorted({n.group for n in nodes if n.group})
        if groups:
            autoscaling = f"nodes belong to autoscaler node groups ({', '.join(groups)})"
    return ClusterInfo(nodes=tuple(nodes), autoscaling=autoscaling)


def _cluster_config_path(value: str | Path | None) -> Path | None:
    if value is None:
        return DEFAULT_CLUSTER_CONFIG if DEFAULT_CLUSTER_CONFIG.is_file() else None
    if str(value).lower() in ("", "none"):
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ClusterError(f"--cluster-config {value}: no such file")
    return path


# ---------------------------------------------------------------------------------------------
# checks of a job against a cluster


def is_cloud_uri(path: str) -> bool:
    """s3://, gs://, abfss://, ... : storage every node reaches through Ray's filesystems."""
    scheme = urllib.parse.urlsplit(path).scheme.lower()
    return scheme in CLOUD_SCHEMES


def _local_path(path: str) -> Path:
    return Path(path[len("file://") :] if path.startswith("file://") else path).expanduser()


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "0.0.0.0", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.endswith(".localhost")


def _tracking_problem(uri: str | None) -> str | None:
    """Why workers on other nodes could not log to `uri` (None: a server/database URI)."""
    if uri is None:
        return (
            "tracking.tracking_uri is not set, so the job would log to the default SQLite file "
            "under ray.storage_path on whichever node runs the driver"
        )
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme == "sqlite":
        return f"tracking.tracking_uri {uri} is a SQLite file on one node"
    if scheme in ("", "file") or re.match(r"^[A-Za-z]:[\\/]", uri):
        return f"tracking.tracking_uri {uri} is a local path on one node"
    return None


def check_job(job: JobConfig, info: ClusterInfo, saved_config: bool = False) -> list[str]:
    """Refuse a job the cluster cannot run correctly (ClusterError); return warnings.

    `saved_config`: the job resumes a saved config on the cluster that cannot be read from here,
    so a missing tracking URI is only a warning (the saved one applies).
    """
    warnings: list[str] = []
    where = info.describe()
    uri = job.tracking.tracking_uri
    if info.multi_node:
        problem = _tracking_problem(uri)
        if problem and not (saved_config and uri is None):
            raise ClusterError(
                f"{problem}; the cluster has {where}, and trials on other nodes cannot reach it. "
                "Start an MLflow tracking server every node can reach (docs/CLUSTER.md) and pass "
                f"{TRACKING_HINT}"
            )
        if problem:
            warnings.append(
                "--resume without --config/--tracking-uri: the saved job's tracking URI is used; "
                f"it must be a server every node reaches ({TRACKING_HINT})"
            )
    if uri:
        host = urllib.parse.urlsplit(uri).hostname
        if host is not None and _is_loopback(host):
            if info.multi_machine:
                raise ClusterError(
                    f"tracking.tracking_uri {uri} points at {host}, which on a cluster means each "
                    f"node itself ({where}). Pass the tracking server's private address that "
                    f"every node reaches: {TRACKING_HINT}"
                )
            warnings.append(
                f"tracking.tracking_uri {uri} points at {host}: the job resolves it on the "
                "cluster, not on this machine; fine while the whole cluster is one machine, "
                "wrong as soon as nodes on other machines join"
            )
    storage = job.ray.storage_path
    raw = storage[len("file://") :] if storage.startswith("file://") else storage
    if not is_cloud_uri(storage) and not Path(raw).is_absolute():
        if info.multi_node:
            raise ClusterError(
                f"ray.storage_path {storage!r} is not an absolute path (~ is each node's own "
                f"home); the cluster has {where}, and every node must write trial checkpoints "
                "to the same shared folder: pass --storage-path /mnt/shared/toxtune_results "
                "(an NFS/EFS mount on every node) or a cloud URI such as s3://BUCKET/toxtune"
            )
        if not raw.startswith("~"):
            warnings.append(
                f"ray.storage_path {storage!r} is relative: on the cluster it resolves inside "
                "the job's temporary working directory, which Ray deletes; pass an absolute "
                "--storage-path to keep the results"
            )
    warnings += _resource_problems(job, info)
    return warnings


def _resource_problems(job: JobConfig, info: ClusterInfo) -> list[str]:
    """Refuse trials no node can ever hold (the job would wait forever); warn on GPU-less runs."""
    if info.autoscaling is not None or not info.nodes:
        return []
    cpus = job.resources.cpus_per_trial
    gpus = job.resources.gpus_per_trial
    need_gpu = gpus == "auto" or (isinstance(gpus, float | int) and gpus > 0)
    gpu_amount = float(gpus) if isinstance(gpus, float | int) else 0.0
    fits = [
        n
        for n in info.nodes
        if n.resources.get("CPU", 0.0) >= cpus
        and (not need_gpu or n.resources.get("GPU", 0.0) >= max(gpu_amount, 1e-9))
    ]
    if not fits:
        biggest = ", ".join(
            f"{n.describe()}: {n.resources.get('CPU', 0):g} CPU / {n.resources.get('GPU', 0):g} GPU"
            for n in info.nodes
        )
        raise ClusterError(
            f"no node can hold one trial (cpus_per_trial={cpus:g}, gpus_per_trial={gpus}); "
            f"the cluster has {biggest}. Lower --cpus-per-trial/--gpus-per-trial or add nodes"
        )
    if not need_gpu and any(n.resources.get("GPU", 0.0) > 0 for n in info.nodes):
        return ["the cluster has GPUs but gpus_per_trial is 0: trials train on CPU"]
    return []


# ---------------------------------------------------------------------------------------------
# what is shipped, and the command that runs


def render_entrypoint(
    overrides: dict[str, Any], config_name: str | None = JOB_CONFIG_NAME, resume: str | None = None
) -> str:
    """The job's shell command: `toxtune tune` with the user's flags, each value shell-quoted."""
    from tune.cli import TUNE_FLAGS

    flag_of = {key: flag for flag, (key, _) in TUNE_FLAGS.items()}
    argv = ["toxtune", "tune"]
    if config_name:
        argv += ["--config", config_name]
    argv += ["--address", "auto"]
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
    if resume:
        argv.append(f"--resume={resume}")
    return shlex.join(argv)


def _ignore(_: str, names: list[str]) -> set[str]:
    import fnmatch

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
        path = _local_path(source)
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


@contextlib.contextmanager
def _api_address(address: str) -> Iterator[None]:
    """Ray lets $RAY_ADDRESS override an explicit address; pin the one we were given."""
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


def job_client(address: str) -> JobSubmissionClient:
    """A JobSubmissionClient for the dashboard at `address`, or a ClusterError saying why not."""
    from ray.job_submission import JobSubmissionClient

    with _api_address(address):
        try:
            return JobSubmissionClient(address, headers=auth_headers())
        except (ConnectionError, RuntimeError, OSError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Ray Jobs API at {address}: {str(exc).rstrip('.')}. Is the "
                "cluster up and the dashboard forwarded (`ray dashboard cluster.yaml`)?"
            ) from exc


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


def wait_for_job(
    client: JobSubmissionClient, job_id: str, poll_s: float = 2.0, quiet: bool = False
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; return that status."""
    last = None
    while True:
        status = _status(_call(client.get_job_status, job_id))
        if status != last and not quiet:
            print(f"{job_id}: {status}", flush=True)
        last = status
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def follow_logs(client: JobSubmissionClient, job_id: str) -> str:
    """Stream the job's logs to stdout until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the stream broke: fall back to polling
        print(f"(log stream ended: {exc}; polling the status)", file=sys.stderr)
    return wait_for_job(client, job_id, quiet=True)


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (RuntimeError, ConnectionError, OSError) as exc:
        raise ClusterError(str(exc)) from exc


def _finish(client: JobSubmissionClient, job_id: str, status: str, tail_logs: bool) -> int:
    info = _call(client.get_job_info, job_id)
    print(f"job {job_id} {status}" + (f": {info.message}" if info.message else ""), flush=True)
    if status == "SUCCEEDED":
        return 0
    if tail_logs:
        lines = (_call(client.get_job_logs, job_id) or "").splitlines()[-40:]
        print("--- last lines of the job's log ---", *lines, sep="\n", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------
# commands


def submit(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """`toxtune submit`: check the job against the cluster, submit it, optionally wait."""
    from tune.config import load_config

    address = resolve_address(getattr(args, "address", None))
    config_path: Path | None = Path(args.config) if getattr(args, "config", None) else None
    resume = getattr(args, "resume", None)
    job = load_config(config_path, overrides)  # validates; ConfigError names the field
    client = job_client(address)  # fails early, with the tunnel hint, if unreachable
    info = cluster_info(address, getattr(args, "cluster_config", None))
    saved = bool(resume) and config_path is None and "tracking.tracking_uri" not in overrides
    warnings = check_job(job, info, saved_config=saved)  # refusals: nothing is submitted
    with tempfile.TemporaryDirectory(prefix="toxtune-job-") as tmp:
        root = Path(tmp)
        rendered, notes = prepare_working_dir(
            root, job, overrides, config_path, getattr(args, "working_dir", None)
        )
        env = runtime_env(root, getattr(args, "runtime_env_json", None))
        entrypoint = render_entrypoint(rendered, JOB_CONFIG_NAME if config_path else None, resume)
        print(f"cluster: {info.describe()}", file=sys.stderr)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
        for line in notes:
            print(line, file=sys.stderr)
        job_id = _call(
            lambda: client.submit_job(
                entrypoint=entrypoint, runtime_env=env, metadata={"toxtune_job": job.name}
            )
        )
    q = shlex.quote(address)
    print(f"submitted job {job_id} to {address}")
    print(f"  entrypoint: {entrypoint}")
    print(f"  status: toxtune jobs status {job_id} --address {q}")
    print(f"  logs:   toxtune jobs logs {job_id} --address {q} --follow")
    print(f"  stop:   toxtune jobs stop {job_id} --address {q}")
    print(f"  dashboard: {address}/#/jobs/{job_id}", flush=True)
    try:
        if getattr(args, "follow", False):
            return _finish(client, job_id, follow_logs(client, job_id), tail_logs=False)
        if getattr(args, "wait", False):
            return _finish(client, job_id, wait_for_job(client, job_id), tail_logs=True)
    except KeyboardInterrupt:
        print(f"\nstopped watching; job {job_id} keeps running (toxtune jobs stop {job_id})")
        return 130
    return 0


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000).isoformat(sep=" ", timespec="seconds")


def jobs(args: argparse.Namespace) -> int:
    """`toxtune jobs status|logs|stop|list [JOB_ID]`."""
    address = resolve_address(getattr(args, "address", None))
    action, job_id = args.action, getattr(args, "job_id", None)
    if action != "list" and not job_id:
        raise ClusterError(f"toxtune jobs {action} needs a JOB_ID (see `toxtune jobs list`)")
    client = job_client(address)
    if action == "list":
        rows = sorted(_call(client.list_jobs), key=lambda j: j.start_time or 0)
        print(f"{'JOB_ID':<30} {'STATUS':<10} {'STARTED':<20} ENTRYPOINT")
        for j in rows:
            entry = j.entrypoint if len(j.entrypoint) <= 70 else j.entrypoint[:67] + "..."
            sid = j.submission_id or j.job_id or "-"
            print(f"{sid:<30} {_status(j.status):<10} {_when(j.start_time):<20} {entry}")
        return 0
    assert job_id is not None
    if action == "status":
        info = _call(client.get_job_info, job_id)
        print(f"job:        {job_id}")
        print(f"status:     {_status(info.status)}")
        if info.message:
            print(f"message:    {info.message}")
        print(f"entrypoint: {info.entrypoint}")
        print(f"started:    {_when(info.start_time)}")
        print(f"ended:      {_when(info.end_time)}")
        return 0
    if action == "logs":
        if getattr(args, "follow", False):
            status = follow_logs(client, job_id)
            return _finish(client, job_id, status, tail_logs=False)
        sys.stdout.write(_call(client.get_job_logs, job_id))
        return 0
    stopped = _call(client.stop_job, job_id)
    if stopped:
        print(f"stop requested for {job_id}")
    else:
        print(f"{job_id} was not running ({_status(_call(client.get_job_status, job_id))})")
    return 0


# ---------------------------------------------------------------------------------------------
# inside the job: is the results folder shared?


def _probe_marker(marker: str, token: str) -> tuple[bool, str]:
    """Runs on one node: is the driver's marker there, and can this node write beside it?"""
    import ray

    path = Path(marker)
    try:
        seen = path.read_text()
    except FileNotFoundError:
        return False, f"{path} does not exist there"
    except OSError as exc:
        return False, f"cannot read {path}: {exc}"
    if seen != token:
        return False, f"{path} holds other content (a different file system at the same path)"
    reply = path.parent / f"{path.name}.{ray.get_runtime_context().get_node_id()}"
    try:
        reply.write_text(token)
    except OSError as exc:
        return False, f"cannot write in {path.parent}: {exc}"
    return True, ""


def check_shared_storage(path: str, timeout_s: float = 120.0) -> None:
    """Check every alive node of the connected Ray cluster reads and writes the same `path`.

    The driver writes a marker under `path`; one tiny task pinned to each alive node reads it
    and writes a reply the driver must then see. Raises ClusterError naming the nodes that
    cannot. Cloud URIs are skipped (Ray's pyarrow filesystems reach them from every node).
    """
    if is_cloud_uri(path):
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        raise ClusterError("check_shared_storage runs inside a Ray job: call ray.init() first")
    root = _local_path(path).resolve()
    token = uuid.uuid4().hex
    marker = root / f".toxtune-shared-check-{token}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        marker.write_text(token)
    except OSError as exc:
        raise ClusterError(f"ray.storage_path {path}: cannot write {marker}: {exc}") from exc
    nodes = {
        n["NodeID"]: NodeInfo(
            node_id=n["NodeID"],
            ip=n.get("NodeManagerAddress", "?"),
            is_head="node:__internal_head__" in (n.get("Resources") or {}),
        )
        for n in ray.nodes()
        if n.get("Alive")
    }
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe_marker)
    failures: list[str] = []
    try:
        refs = {
            probe.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
            ).remote(str(marker), token): node_id
            for node_id in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in pending:
            failures.append(f"{nodes[refs[ref]].describe()}: no answer within {timeout_s:.0f}s")
            ray.cancel(ref, force=True)
        for ref in ready:
            node = nodes[refs[ref]]
            try:
                ok, why = ray.get(ref)
            except Exception as exc:  # the node died, or the task could not run there
                ok, why = False, f"the check failed there: {exc}"
            if ok and not (marker.parent / f"{marker.name}.{node.node_id}").is_file():
                ok, why = False, "its reply file is not visible to the driver"
            if not ok:
                failures.append(f"{node.describe()}: {why}")
    finally:
        for leftover in root.glob(f"{marker.name}*"):
            with contextlib.suppress(OSError):
                leftover.unlink()
    if failures:
        raise ClusterError(
            f"ray.storage_path {path} is not shared by all {len(nodes)} nodes: "
            + "; ".join(sorted(failures))
            + ". Mount the same shared folder (NFS/EFS) at this path on every node, or use a "
            "cloud URI (s3://...)"
        )


def check_cluster_storage(storage_path: str, timeout_s: float = 120.0) -> int:
    """Driver-side pre-flight: on a connected cluster of more than one alive node, run
    `check_shared_storage(storage_path)`. Returns the number of alive nodes."""
    import ray

    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    if alive > 1:
        check_shared_storage(storage_path, timeout_s=timeout_s)
    return alive


__all__ = [
    "ClusterError",
    "ClusterInfo",
    "NodeInfo",
    "add_jobs_arguments",
    "add_submit_arguments",
    "alive_nodes",
    "autoscaling_from_config",
    "check_cluster_storage",
    "check_job",
    "check_shared_storage",
    "cluster_info",
    "is_cloud_uri",
    "jobs",
    "prepare_working_dir",
    "render_entrypoint",
    "resolve_address",
    "runtime_env",
    "submit",
]
