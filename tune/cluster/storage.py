"""Inside a running job: does every node of the cluster see the same results folder?

A multi-node search writes each trial's checkpoints from the node that ran it into
`ray.storage_path`; a node that sees another disk at that path (the shared mount missing there)
would lose its trials' checkpoints silently. `check_cluster_storage` finds out before the search.
"""

from __future__ import annotations

import contextlib
import urllib.parse
import uuid
from pathlib import Path

from tune.cluster.info import NodeInfo
from tune.errors import ClusterError, ToxtuneError

CLOUD_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs"})


def is_cloud_uri(path: str) -> bool:
    """s3://, gs://, abfss://, ... : storage every node reaches through Ray's filesystems."""
    scheme = urllib.parse.urlsplit(path).scheme.lower()
    return scheme in CLOUD_SCHEMES


def local_path(path: str) -> Path:
    """A local path, or a file:// URI as a path (~ expanded)."""
    return Path(path[len("file://") :] if path.startswith("file://") else path).expanduser()


def _probe_marker(location: str, marker: str, token: str) -> tuple[bool, str]:
    """Runs on one node: is the driver's marker there, and can this node write beside it?"""
    import ray

    from tune.storage import Storage

    storage = Storage.open(location)
    try:
        seen = storage.read_text(marker)
    except (OSError, ToxtuneError) as exc:
        return False, f"cannot read {storage.uri_of(marker)}: {exc}"
    if seen is None:
        return False, f"{storage.uri_of(marker)} does not exist there"
    if seen != token:
        return False, f"{storage.uri_of(marker)} holds other content (another file system there)"
    reply = f"{marker}.{ray.get_runtime_context().get_node_id()}"
    try:
        storage.write_text(reply, text=token)
    except (OSError, ToxtuneError) as exc:
        return False, f"cannot write in {storage.uri}: {exc}"
    return True, ""


def check_shared_storage(path: str, timeout_s: float = 120.0) -> None:
    """Check every alive node of the connected Ray cluster reads and writes the same storage.

    `path` is a local path or an object-store URI. The driver writes a marker there; one tiny
    task pinned to each alive node reads it and writes a reply the driver must then see.
    Raises ClusterError naming the nodes that cannot (no shared mount, no credentials or no
    route to the object store on that node).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from tune.storage import Storage

    if not ray.is_initialized():
        raise ClusterError("check_shared_storage runs inside a Ray job: call ray.init() first")
    storage = Storage.open(path)
    token = uuid.uuid4().hex
    marker = f".toxtune-shared-check-{token}"
    try:
        storage.write_text(marker, text=token)
    except (OSError, ToxtuneError) as exc:
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
            ).remote(storage.uri, marker, token): node_id
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
            if ok and not storage.exists(f"{marker}.{node.node_id}"):
                ok, why = False, "its reply file is not visible to the driver"
            if not ok:
                failures.append(f"{node.describe()}: {why}")
    finally:
        for name in [marker, *(f"{marker}.{node_id}" for node_id in nodes)]:
            with contextlib.suppress(OSError):
                storage.fs.delete_file(storage.path(name))
    if failures:
        raise ClusterError(
            f"ray.storage_path {path} is not shared by all {len(nodes)} nodes: "
            + "; ".join(sorted(failures))
            + ". Mount the same shared folder (NFS/EFS) at this path on every node, or use an "
            "object store (s3://...) every node can reach with its credentials"
        )


def check_cluster_storage(storage_path: str, timeout_s: float = 120.0) -> int:
    """Driver-side pre-flight: on a connected cluster of more than one alive node, run
    `check_shared_storage(storage_path)`. Returns the number of alive nodes."""
    import ray

    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    if alive > 1:
        check_shared_storage(storage_path, timeout_s=timeout_s)
    return alive
