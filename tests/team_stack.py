"""A team's storage and tracking stack, started for real on 127.0.0.1 for the tests.

- an S3-compatible object store: moto's server (`ThreadedMotoServer`), with a bucket, reached
  through a TCP proxy (`TcpProxy`) that a drill cuts to make the store unreachable while moto,
  and the bucket's content, stay up;
- PostgreSQL from Debian's packages (`initdb` + `pg_ctl`, run as the `postgres` user when the
  tests run as root, since the server refuses to run as root), with one database for MLflow's
  backend store and one for the Optuna study;
- an `mlflow server` on that PostgreSQL, its artifacts in the bucket.

Each starts on a free port and is torn down even when a test fails. Credentials are fake and
live in the environment only (`AWS_ACCESS_KEY_ID` ...), as a team's would.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.services import (
    MlflowServer,
    free_port,
    mlflow_server,
    start_submit,
    submitted_job_id,
)

# Debian's PostgreSQL server binaries (the newest installed major version).
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/nonexistent"), key=str)
BIN = Path(sys.executable).parent


def postgres_available() -> bool:
    return (PG_BIN / "initdb").exists()


class TcpProxy:
    """Forwards 127.0.0.1:`port` to `upstream`; `cut()` makes the port unreachable (listener
    closed: connections refused; open connections reset) until `restore()` listens again on the
    same port.

    The drill for an object store that goes away: moto keeps its buckets in this process's
    memory, and its threaded server, once shut down, neither frees its port nor drops the
    connections it holds; cutting the proxy takes away the route, not the data.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            victims, self._open = self._open, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            listener.close()
        for sock in victims:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes its pump; the peer sees it dropped
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    return
                self._open |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                gone = src in self._open and dst not in self._open
                self._open.discard(src)
            if gone:
                src.close()
                dst.close()


@dataclass
class S3Server:
    endpoint: str  # the proxy's address, which every client is given
    bucket: str
    env: dict[str, str]  # what a process needs to reach the bucket
    proxy: TcpProxy

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables that point pyarrow, boto3 and MLflow at the S3 server (fake credentials)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
    }


@contextlib.contextmanager
def s3_server(bucket: str = "toxtune-team") -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port behind a `TcpProxy`, with `bucket` made; the
    variables to reach it (through the proxy) are set in os.environ for the block (pyarrow,
    boto3 and MLflow all read them)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = TcpProxy(("127.0.0.1", port))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    env = s3_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3
        import requests

        # moto keeps its buckets in process-wide state that outlives a server: start empty, or a
        # job of an earlier test (same name, same bucket) would be found and continued.
        requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, env, proxy)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proxy.cut()
        server.stop()


def bucket_keys(s3: S3Server, prefix: str = "") -> list[str]:
    """Every object key in the bucket under `prefix` (not pyarrow's folder markers)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return keys


@dataclass
class Postgres:
    port: int
    root: Path

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        _as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), name])
        return self.url(name)

    def connections(self, database: str) -> int:
        """Sessions open on `database` now, this look's own aside."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.url("postgres"), poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as conn:
                return conn.execute(
                    sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": database},
                ).scalar_one()
        finally:
            engine.dispose()

    def stop(self) -> None:
        """Stop the server as a restart does (`-m fast`: open sessions are terminated)."""
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.root / "pgdata"), "-m", "fast",
                      "-w", "stop"])  # fmt: skip

    def start(self) -> None:
        """Start the server (again), on the same port and data folder."""
        data = self.root / "pgdata"
        opts = f"-p {self.port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        log = str(self.root / "server.log")  # without -l the server keeps pg_ctl's pipes open
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", log, "-w",
                      "start"])  # fmt: skip


def _as_postgres(cmd: list[str]) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A PostgreSQL server of its own (trust auth on loopback only), stopped afterwards.

    Its data folder is a fresh /tmp folder, owned by `postgres` when the tests run as root
    (pytest's tmp_path sits under a root-only folder the server user cannot enter).
    """
    root = Path(tempfile.mkdtemp(prefix="toxtune-pg-"))
    data = root / "pgdata"
    data.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, data):
            os.chown(path, user.pw_uid, user.pw_gid)
    _as_postgres(
        [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    )
    server = Postgres(free_port(), root)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def team_mlflow(backend_uri: str, artifacts_uri: str, root: Path) -> Iterator[MlflowServer]:
    """`mlflow server` on PostgreSQL with artifacts in the bucket (proxied: clients need no S3
    access of their own for artifacts); `stop()`/`start()` restart it on the same port."""
    with mlflow_server(root, backend_uri, artifacts_uri) as server:
        yield server


def submit_together(
    folder: Path,
    config: Path,
    s3: S3Server,
    tracking_uri: str,
    study_storage: str,
    dashboard: str,
    n: int,
) -> list[str]:
    """Run `n` `toxtune submit` commands of `config` at once, all to the dashboard's cluster,
    `s3`'s bucket (under shared/), the MLflow server and the study database; their job ids once
    each has submitted (the commands' output in `folder`)."""
    cmd = [
        str(BIN / "toxtune"), "submit", "--address", dashboard, "--config", str(config),
        "--tracking-uri", tracking_uri, "--storage-path", f"{s3.uri}/shared",
        "--study-storage", study_storage,
    ]  # fmt: skip
    procs = [start_submit(cmd, folder, f"submit{i}") for i in range(n)]
    ids = [submitted_job_id(p, out, err, timeout_s=300) for p, out, err in procs]
    for p, out, err in procs:
        assert p.wait(timeout=120) == 0, out.read_text() + err.read_text()
    return ids


TOX21 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tox21.csv"
SMALL_TARGETS = ["NR-AhR", "SR-ARE", "SR-MMP"]


def small_tox21_job(
    folder: Path,
    name: str,
    *,
    search: dict,
    resources: dict,
    tracking: dict,
) -> Path:
    """A job config on 300 Tox21 rows (3 tasks, 256-bit fingerprints, random split seed 0),
    written to `folder/name` beside its data slice; `search` adds to (or replaces) a FIFO,
    Optuna, no-patience search with a one-layer space. What the team-stack tests and
    benchmarks/shared_stack.py submit."""
    import pandas as pd
    import yaml

    csv = folder / "tox21_small.csv"
    pd.read_csv(TOX21)[["smiles", *SMALL_TARGETS]].dropna().head(300).to_csv(csv, index=False)
    config = {
        "data": {"source": str(csv), "targets": SMALL_TARGETS},
        "featurizer": {"radius": 2, "n_bits": 256},
        "split": {"method": "random", "seed": 0},
        "search": {
            "searcher": "optuna",
            "scheduler": "fifo",
            "patience": 0,
            "space": {
                "n_layers": {"low": 1, "high": 1},
                "width_0": {"choices": [32, 64]},
                "batch_size": {"choices": [64]},
            },
            **search,
        },
        "resources": resources,
        "tracking": tracking,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def job_environment(tmp_path: Path, monkeypatch: Any, epoch_s: float) -> None:
    """What a Ray cluster's nodes (started next) hand to their jobs: toxtune on PATH, a feature
    cache, and epochs held `epoch_s` seconds (a drill's fault plan); skips the test without a
    local Tox21 copy (the jobs run on a slice of it)."""
    import json

    import pytest

    if not TOX21.is_file():
        pytest.skip(f"no local Tox21 copy at {TOX21}")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TOXTUNE_FAULT_PLAN", json.dumps({"slow_epochs_s": epoch_s}))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
