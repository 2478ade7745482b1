"""Whether a job can run correctly on a cluster, decided before anything is submitted.

`check_job` refuses (ClusterError) what would fail or lose results on a multi-node cluster: a
tracking backend only one node sees, a loopback tracking address across machines, a results
folder that is not shared, a trial no node can ever hold; and returns warnings for what is only
risky.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from tune.cluster.info import ClusterInfo
from tune.cluster.storage import is_cloud_uri
from tune.errors import ClusterError

if TYPE_CHECKING:
    from tune.config import JobConfig

TRACKING_HINT = "--tracking-uri http://MLFLOW_HOST:5000"


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
    warnings = _tracking_warnings(job, info, saved_config)
    warnings += _storage_warnings(job, info)
    warnings += _resource_problems(job, info)
    return warnings


def _tracking_warnings(job: JobConfig, info: ClusterInfo, saved_config: bool) -> list[str]:
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
    return warnings


def _storage_warnings(job: JobConfig, info: ClusterInfo) -> list[str]:
    storage = job.ray.storage_path
    raw = storage[len("file://") :] if storage.startswith("file://") else storage
    if is_cloud_uri(storage) or Path(raw).is_absolute():
        return []
    if info.multi_node:
        raise ClusterError(
            f"ray.storage_path {storage!r} is not an absolute path (~ is each node's own "
            f"home); the cluster has {info.describe()}, and every node must write trial "
            "checkpoints to the same shared folder: pass --storage-path "
            "/mnt/shared/toxtune_results (an NFS/EFS mount on every node) or a cloud URI such "
            "as s3://BUCKET/toxtune"
        )
    if raw.startswith("~"):
        return []
    return [
        f"ray.storage_path {storage!r} is relative: on the cluster it resolves inside "
        "the job's temporary working directory, which Ray deletes; pass an absolute "
        "--storage-path to keep the results"
    ]


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
