"""Object storage against a shared folder: the wall-time cost of results in a bucket.

    python benchmarks/storage.py --repeats 2

The same 2-node job (a local Ray cluster of two 1-CPU nodes, each with its own temp dir; Tox21,
2048-bit ECFP4, 8 trials x 4 epochs, two at a time, FIFO) runs alternately with its results in a
shared folder and in an S3-compatible bucket (moto's server in its own process, so it does not
share the driver's interpreter). Tracking is the same for both: `mlflow server` on PostgreSQL
with its artifacts in the bucket, and the Optuna study in PostgreSQL; only `--storage-path`
differs. Wall time is the `toxtune tune` command's, from start to exit (search, finalize and
registration). Prints one row per run and the ratio bucket / folder of the median walls.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.services import free_port, ray_cluster, wait_http
from tests.team_stack import postgres_server, s3_env, team_mlflow

BIN = Path(sys.executable).parent
BUCKET = "toxtune-bench"


@contextlib.contextmanager
def moto_process(log: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server as its own process, with the bucket made; yields the variables that
    reach it (also set in os.environ for the block, so nodes started inside inherit them)."""
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    env = s3_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_http(f"{endpoint}/moto-api/", timeout=60)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=30)


def job_config(path: Path, data: str, address: str, tracking: str, study: str) -> Path:
    """The 2-node job, results location left to --storage-path."""
    config = {
        "data": {"source": data},
        "featurizer": {"radius": 2, "n_bits": 2048},
        "split": {"method": "random", "seed": 0},
        "search": {
            "searcher": "optuna",
            "scheduler": "fifo",
            "num_samples": 8,
            "max_epochs": 4,
            "max_concurrent": 2,
            "patience": 0,
            "seed": 0,
        },
        "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0},
        "ray": {"address": address, "num_cpus": None},
        "tracking": {
            "tracking_uri": tracking,
            "study_storage": study,
            "experiment_name": "storage-bench",
            "registered_model_name": "storage-bench",
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(config: Path, storage: str, name: str, env: dict[str, str], cwd: Path) -> float:
    """Wall seconds of one `toxtune tune` (raises with its output if it fails)."""
    cmd = [str(BIN / "toxtune"), "tune", "--config", str(config), "--storage-path", storage]
    cmd += ["--run-name", name]
    t0 = time.monotonic()
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data = str(Path(args.data).resolve())
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs")
    walls: dict[str, list[float]] = {"folder": [], "bucket": []}
    with tempfile.TemporaryDirectory(prefix="toxtune-storage-bench-") as tmp:
        root = Path(tmp)
        with (
            moto_process(root / "moto.log"),
            postgres_server() as pg,
            team_mlflow(
                pg.create_database("mlflow"), f"s3://{BUCKET}/mlartifacts", root / "mlflow"
            ) as server,
            ray_cluster(root / "ray", num_cpus=1) as cluster,
        ):
            cluster.add_node(num_cpus=1)
            config = job_config(
                root / "job.yaml", data, cluster.address, server.url, pg.create_database("optuna")
            )
            env = {**cluster.env, "TOXTUNE_CACHE_DIR": str(root / "cache")}
            # Warm the feature cache (and Ray's first start) outside the timed runs.
            run(config, str(root / "warm"), "warm", env, root)
            for i in range(args.repeats):
                for kind, storage in (
                    ("folder", str(root / "shared")),
                    ("bucket", f"s3://{BUCKET}/results"),
                ):
                    load = os.getloadavg()[0]
                    wall = run(config, storage, f"{kind}-{i}", env, root)
                    walls[kind].append(wall)
                    print(f"{kind} run {i}: {wall:.1f} s (load average {load:.1f})", flush=True)
    folder, bucket = statistics.median(walls["folder"]), statistics.median(walls["bucket"])
    print(f"median wall: folder {folder:.1f} s, bucket {bucket:.1f} s; ratio {bucket / folder:.2f}")


if __name__ == "__main__":
    main()
