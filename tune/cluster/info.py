"""What the target cluster looks like: its alive nodes and whether it can grow.

Read over HTTP from the Ray dashboard's state API (no Ray client needed), plus, when given, the
cluster-launcher YAML the cluster was started from.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tune.errors import ClusterError

DEFAULT_CLUSTER_CONFIG = Path("cluster.yaml")


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


def cluster_config_path(value: str | Path | None) -> Path | None:
    """The cluster-launcher YAML to read: the one given, ./cluster.yaml if present, or none
    ('none' or '' skips it)."""
    if value is None:
        return DEFAULT_CLUSTER_CONFIG if DEFAULT_CLUSTER_CONFIG.is_file() else None
    if str(value).lower() in ("", "none"):
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise ClusterError(f"--cluster-config {value}: no such file")
    return path


def cluster_info(address: str, cluster_config: str | Path | None = None) -> ClusterInfo:
    """Alive nodes plus whether the cluster autoscales (from its YAML or its node labels)."""
    nodes = alive_nodes(address)
    autoscaling = None
    config = cluster_config_path(cluster_config)
    if config is not None:
        autoscaling = autoscaling_from_config(config)
    if autoscaling is None:
        groups = sorted({n.group for n in nodes if n.group})
        if groups:
            autoscaling = f"nodes belong to autoscaler node groups ({', '.join(groups)})"
    return ClusterInfo(nodes=tuple(nodes), autoscaling=autoscaling)
