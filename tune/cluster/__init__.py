"""Running a job on a Ray cluster: what the cluster is, whether the job fits it, how it is sent.

- `info`: the cluster's alive nodes (dashboard state API) and whether it autoscales.
- `checks`: refuse, before anything is sent, a job the cluster cannot run correctly (tracking
  only one node sees, storage that is not shared, a trial no node can hold).
- `submission`: the Jobs API: the job's working directory and entrypoint, and a client whose
  failures are `ClusterError`s.
- `storage`: inside a running job, check that every node reads and writes the results folder.

Library only: `toxtune submit` / `toxtune jobs` (argparse and printing) live in `tune.cli.cluster`.
Ray is imported inside the functions that need it.
"""

from tune.cluster.checks import check_job
from tune.cluster.info import ClusterInfo, NodeInfo, cluster_info
from tune.cluster.storage import check_cluster_storage, check_shared_storage, is_cloud_uri
from tune.errors import ClusterError

__all__ = [
    "ClusterError",
    "ClusterInfo",
    "NodeInfo",
    "check_cluster_storage",
    "check_job",
    "check_shared_storage",
    "cluster_info",
    "is_cloud_uri",
]
