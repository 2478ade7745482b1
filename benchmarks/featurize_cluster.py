"""Featurization on a Ray cluster (issue 23 item 3): two 1-CPU nodes against one 1-CPU node.

    python benchmarks/featurize_cluster.py [--n 1000000] [--csv PATH] [--local]

The molecules are N unique, valid synthetic molecules derived from Tox21
(`benchmarks/synthetic.py`), read from `--csv` when that file holds at least N of them, else
generated and written there (default /tmp/toxtune-featurize-cluster-N.csv; never committed).

For each cluster (`ray.cluster_utils.Cluster` on this machine: a head node of 1 CPU, plus one
worker node of 1 CPU for the second), the driver joins it, warms one worker per node up (a few
small chunks: the Python start and the RDKit import are not the figure), then times
`tune.features.featurize_with_ray` of the N molecules with the default featurizer (Morgan,
radius 2, 2,048 bits) and the default chunking, and records how many chunks each node ran and a
digest of the result. Both runs must give the same digest. Then, on the two-node cluster, the
storage cache: writing the features to a local storage folder and reading them back (a resumed
driver's cache hit). `--keep-chunks` adds the two-node run keeping each chunk in a storage
folder as it arrives, as a job does (what resuming a killed driver costs up front). `--local`
adds `toxmodel.featurize.featurize(n_jobs=1)` in the driver (today's single-process path) as the
reference for what Ray's tasks cost on top.

Printed: a table of seconds, molecules per second and speed-up over the one-node run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toxmodel.featurize import Features, FeaturizerConfig, featurize
from tune.features import (
    ChunkParts,
    ClusterRun,
    cache_key,
    featurize_with_ray,
    read_cached,
    write_cached,
)
from tune.storage import Storage

OBJECT_STORE_BYTES = 2 * 2**30  # per node; the packed features of 10^6 molecules are ~0.3 GB


@dataclass
class Row:
    name: str
    seconds: float
    digest: str
    per_node: str


def molecules(n: int, path: Path) -> list[str]:
    """N synthetic SMILES: from `path` when it holds enough, else generated and written there."""
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            smiles = [row["smiles"] for row in csv.DictReader(fh)]
        if len(smiles) >= n:
            return smiles[:n]
    from benchmarks.synthetic import generate

    started = time.perf_counter()
    made = generate(n)
    made.write_csv(path)
    print(f"generated {n} molecules in {time.perf_counter() - started:.0f} s -> {path}")
    return made.smiles


def digest(features: Features) -> str:
    """A short hash of everything a job uses from the features (row for row)."""
    h = hashlib.sha256()
    h.update(features.fingerprint.tobytes())
    h.update(features.valid_rows.tobytes())
    h.update("\n".join(features.canonical or []).encode())
    h.update(repr(features.invalid).encode())
    return h.hexdigest()[:12]


def on_cluster(
    nodes: int, smiles: list[str], config: FeaturizerConfig, keep_chunks: bool = False
) -> tuple[Row, Features]:
    """Featurize on a fresh local cluster of `nodes` 1-CPU nodes; the run after a warm-up. With
    `keep_chunks`, each chunk is kept in a local storage folder as it arrives, as a job's
    featurization does (`tune.features.ChunkParts`)."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE_BYTES},
    )
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        warm = ClusterRun()
        featurize_with_ray(smiles[: 400 * nodes * 2], config, chunk_size=200, run=warm)
        run = ClusterRun()
        with tempfile.TemporaryDirectory(prefix="toxtune-chunks-") as tmp:
            parts = (
                ChunkParts(Storage.open(tmp), cache_key(smiles, config)) if keep_chunks else None
            )
            started = time.perf_counter()
            features = featurize_with_ray(smiles, config, run=run, parts=parts)
            seconds = time.perf_counter() - started
        spread = "/".join(str(c) for c in sorted(run.per_node.values(), reverse=True))
        name = f"Ray, {nodes} node{'s' if nodes > 1 else ''} x 1 CPU"
        name += ", chunks kept" if keep_chunks else ""
        return Row(name, seconds, digest(features), f"{spread} of {run.chunks}"), features
    finally:
        ray.shutdown()
        cluster.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="molecules (default 10^6)")
    parser.add_argument("--csv", type=Path, help="synthetic set to read or write")
    parser.add_argument("--local", action="store_true", help="also time featurize(n_jobs=1)")
    parser.add_argument(
        "--keep-chunks", action="store_true", help="also time 2 nodes keeping each chunk"
    )
    args = parser.parse_args()
    path = args.csv or Path(tempfile.gettempdir()) / f"toxtune-featurize-cluster-{args.n}.csv"
    smiles = molecules(args.n, path)
    config = FeaturizerConfig()
    print(
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs; "
        f"{len(smiles)} molecules; featurizer {config}"
    )
    rows: list[Row] = []
    if args.local:
        started = time.perf_counter()
        local = featurize(smiles, config, n_jobs=1)
        rows.append(Row("driver, 1 process", time.perf_counter() - started, digest(local), "-"))
        del local
    one, features = on_cluster(1, smiles, config)
    rows.append(one)
    del features
    if args.keep_chunks:
        kept, features = on_cluster(2, smiles, config, keep_chunks=True)
        rows.append(kept)
        del features
    two, features = on_cluster(2, smiles, config)
    rows.append(two)

    with tempfile.TemporaryDirectory(prefix="toxtune-feature-store-") as tmp:
        storage = Storage.open(tmp)
        key = cache_key(smiles, config)
        started = time.perf_counter()
        write_cached(storage, key, features, smiles)
        write_s = time.perf_counter() - started
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.npz"))
        del features
        started = time.perf_counter()
        hit = read_cached(Storage.open(tmp), key, config, smiles)
        hit_s = time.perf_counter() - started
        assert hit is not None
        hit_digest = digest(hit)
        del hit

    print("\n| run | seconds | molecules/s | speed-up vs 1 node | chunks per node | digest |")
    print("|---|---:|---:|---:|---|---|")
    for row in rows:
        print(
            f"| {row.name} | {row.seconds:.1f} | {len(smiles) / row.seconds:,.0f} | "
            f"{one.seconds / row.seconds:.2f}x | {row.per_node} | {row.digest} |"
        )
    print(
        f"\nstorage cache (local folder): write {write_s:.1f} s ({size / 2**20:.0f} MiB, bits "
        f"packed), hit {hit_s:.1f} s (digest {hit_digest})"
    )
    same = {row.digest for row in rows} | {hit_digest}
    print(f"identical results everywhere: {len(same) == 1}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"driver peak RSS: {peak:.1f} GiB")
    speedup = one.seconds / two.seconds
    print(
        f"two nodes vs one: {speedup:.2f}x (goal >= 1.6x: {'met' if speedup >= 1.6 else 'not met'})"
    )


if __name__ == "__main__":
    main()
