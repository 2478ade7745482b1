"""Real services for end-to-end tests: an `mlflow server` and Ray nodes on 127.0.0.1.

Each is started as a subprocess on a free loopback port and torn down even when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tune.cli.ui import SERVER_ENV

BIN = Path(sys.executable).parent
T = TypeVar("T")


# Ray's worker processes take ports 10002-19999 by default; ports we pick sit above them.
_PICKED_PORTS_FROM = 20000


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to `bind(port 0)`, e.g. (32768, 60999) on Linux."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the ephemeral range.

    A port from `bind(port 0)` is free only until the next process binds port 0, and every
    Ray node opens dozens: a CI run lost a test when its head node's GCS found the port this
    function had picked taken by the Ray of the test beside it ("Failed to start the grpc
    server"). The kernel never hands out a port below its ephemeral range, so one picked at
    random there can only be taken by another caller of this function.
    """
    low, _ = _ephemeral_ports()
    pick = random.SystemRandom()
    for _ in range(1000):
        port = pick.randrange(_PICKED_PORTS_FROM, max(low, _PICKED_PORTS_FROM + 1000))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PICKED_PORTS_FROM}-{low - 1} on 127.0.0.1")


def wait_http(url: str, timeout: float = 60.0, headers: dict[str, str] | None = None) -> None:
    """Poll `url` until it answers 200, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    request = urllib.request.Request(url, headers=headers or {})
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s: {last}")


def _kill_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def run_or_show_stacks(
    argv: list[str], timeout: float, merged: bool = False, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(argv, capture_output=True, text=True, ...)` (`merged`: stderr into
    stdout) for a toxtune command that, past `timeout` seconds, is told to print its threads'
    stacks (`tune.settings.STACKS_SIGNAL`) before its process group is killed, and fails the
    test with the tail of what it wrote: a hung command says where it hung (in CI too, where
    nobody can attach a debugger)."""
    from tune.settings import STACKS_SIGNAL

    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(STACKS_SIGNAL)
        time.sleep(3)
        _kill_group(proc, timeout=5)
        out, err = proc.communicate()
        raise AssertionError(
            f"{' '.join(argv)} ran past {timeout:.0f} s; its stdout ends:\n{out[-12000:]}\n"
            f"its stderr (with its threads' stacks) ends:\n{(err or '')[-12000:]}"
        ) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@dataclass
class MlflowServer:
    """A running `mlflow server` with served artifacts: by default a SQLite backend and
    artifacts under `root`; a team's server passes its database and bucket URIs."""

    url: str
    port: int
    root: Path
    proc: subprocess.Popen | None = None
    backend_uri: str | None = None  # default: sqlite:///<root>/mlflow.db
    artifacts: str | None = None  # default: <root>/artifacts

    def start(self) -> None:
        """Start (or restart, on the same port and store) the server and wait for it."""
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                self.backend_uri or f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                self.artifacts or str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**SERVER_ENV, **os.environ},
        )
        wait_http(f"{self.url}/health", timeout=120)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def bounce_later(self, after_s: float, down_s: float) -> threading.Thread:
        """In a thread: wait `after_s`, stop the server for `down_s`, start it again (same port
        and store). Join the thread before checking what arrived."""

        def bounce() -> None:
            time.sleep(after_s)
            self.stop()
            time.sleep(down_s)
            self.start()

        thread = threading.Thread(target=bounce)
        thread.start()
        return thread

    def log_tail(self, n: int = 40) -> str:
        path = self.root / "server.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""
        )


@contextlib.contextmanager
def mlflow_server(
    root: Path, backend_uri: str | None = None, artifacts: str | None = None
) -> Iterator[MlflowServer]:
    """Run a real tracking server on a free loopback port for the duration of the block."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = MlflowServer(f"http://127.0.0.1:{port}", port, root, None, backend_uri, artifacts)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@dataclass
class RayCluster:
    """A local multi-process Ray cluster started with `ray start` (head + optional workers)."""

    address: str
    dashboard_url: str
    temp_dir: Path
    env: dict[str, str]
    node_dirs: list[Path] = field(default_factory=list)

    def add_node(self, num_cpus: int = 1, num_gpus: int = 0) -> None:
        """Join one more node (its own raylet) to the cluster.

        Each node gets its own temp dir, as on separate machines: nodes sharing one would
        share a runtime-env cache, and a node fetching a job's working_dir replaces the very
        directory the job's driver runs in on another node.
        """
        temp = Path(f"{self.temp_dir}_n{len(self.node_dirs)}")
        self.node_dirs.append(temp)
        _on_fresh_ports(
            lambda: _ray_start(
                [
                    "start",
                    f"--address={self.address}",
                    f"--num-cpus={num_cpus}",
                    f"--num-gpus={num_gpus}",
                    "--node-ip-address=127.0.0.1",
                    f"--temp-dir={temp}",
                    *_agent_port(),  # a fresh port each try
                ],
                self.env,
                temp,
            )
        )

    def stop(self) -> None:
        for path in [self.temp_dir, *self.node_dirs]:
            kill_ray_node(path)
            shutil.rmtree(path, ignore_errors=True)


def kill_ray_node(temp_dir: Path) -> int:
    """SIGKILL every process of the Ray node whose temp dir is `temp_dir`, and their children.

    Scoped by temp dir on purpose: `ray stop` stops every Ray on the machine, a user's own
    running jobs included.
    """
    import psutil

    victims: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(temp_dir) in arg for arg in proc.info["cmdline"] or []):
                victims[proc.pid] = proc
                victims.update((c.pid, c) for c in proc.children(recursive=True))
    victims.pop(os.getpid(), None)
    for proc in victims.values():
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(list(victims.values()), timeout=10)
    return len(victims)


def _agent_port() -> list[str]:
    """A free port for the node's dashboard agent. Its default, 52365, is fixed: a second Ray
    on the machine (another test run, a user's own) holds it, the agent of this node cannot
    start, and job submission answers "No available agent" for ever."""
    return [f"--dashboard-agent-listen-port={free_port()}"]


def _ray(args: list[str], env: dict[str, str], check: bool = True) -> str:
    out = subprocess.run(
        [str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=180
    )
    if check and out.returncode != 0:
        raise RuntimeError(f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


# What `ray start` prints when a port it was given (or picked for itself) was taken before
# its server bound it: two test runs' Ray nodes race for ports on one machine.
_PORT_TAKEN = ("Address already in use", "Failed to start the grpc server")


class _PortTakenError(RuntimeError):
    """`ray start` lost a port to another process (its node was cleaned up)."""


def _ray_start(args: list[str], env: dict[str, str], temp: Path) -> None:
    """`ray start ARGS` for the node whose temp dir is `temp`; a node that failed is killed and
    its folder removed, and one that lost a port raises `_PortTakenError`."""
    try:
        _ray(args, env)
    except RuntimeError as exc:
        kill_ray_node(temp)
        shutil.rmtree(temp, ignore_errors=True)
        if any(sign in str(exc) for sign in _PORT_TAKEN):
            raise _PortTakenError(str(exc)) from exc
        raise


def _on_fresh_ports(start: Callable[[], T], tries: int = 3) -> T:
    """`start()` (which picks fresh ports each call) again while it loses a port."""
    for attempt in range(tries):
        try:
            return start()
        except _PortTakenError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _start_head(env: dict[str, str], num_cpus: int, num_gpus: int, dashboard: bool) -> RayCluster:
    """`ray start --head` on fresh free ports."""
    # Ray's unix sockets need a short path.
    short = Path(f"/tmp/rt{os.getpid()}_{free_port()}")
    port, dash_port = free_port(), free_port()
    args = [
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        f"--temp-dir={short}",
        "--disable-usage-stats",
        *_agent_port(),
    ]
    if dashboard:
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
        args += [f"--dashboard-port={dash_port}"]
    else:
        args += ["--include-dashboard=false"]
    _ray_start(args, env, short)
    return RayCluster(
        address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dash_port}",
        temp_dir=short,
        env=env,
    )


@contextlib.contextmanager
def ray_cluster(
    temp_dir: Path, num_cpus: int = 2, num_gpus: int = 0, dashboard: bool = False
) -> Iterator[RayCluster]:
    """Start a real Ray head node on 127.0.0.1 (free ports); stop every node afterwards."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    # Token auth as Ray defaults to for a new cluster, set explicitly so worker nodes and
    # drivers agree with the head; the token is the user's default one, made if missing.
    env["RAY_AUTH_MODE"] = "token"
    _ray(["get-auth-token", "--generate"], env)
    cluster = _on_fresh_ports(lambda: _start_head(env, num_cpus, num_gpus, dashboard))
    try:
        if dashboard:
            from tune.cluster.info import auth_headers

            wait_http(f"{cluster.dashboard_url}/api/version", timeout=90, headers=auth_headers())
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def model_server(model_uri: str, tracking_uri: str, log_dir: Path) -> Iterator[str]:
    """Run `mlflow models serve` for `model_uri` on a free loopback port; yield its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # as in an activated venv
    }
    log = log_dir / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=log_dir, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", timeout=120)
        except TimeoutError as exc:
            raise AssertionError(log.read_text()[-3000:]) from exc
        yield f"http://127.0.0.1:{port}"
    finally:
        _kill_group(proc, timeout=30)


def invoke_raw(url: str, smiles: list[str]) -> bytes:
    """POST a `smiles` table to a served model's /invocations; return the body as sent."""
    body = {"dataframe_split": {"columns": ["smiles"], "data": [[s] for s in smiles]}}
    request = urllib.request.Request(
        f"{url}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return resp.read()


def strict_json(raw: bytes) -> object:
    """Parse JSON as strict parsers (JavaScript's JSON.parse) do: NaN/Infinity are errors."""

    def refuse(token: str) -> object:
        raise ValueError(f"{token} is not JSON")

    return json.loads(raw, parse_constant=refuse)


def invoke(url: str, smiles: list[str]) -> list[dict]:
    """POST a `smiles` table to a served model's /invocations; return its prediction rows."""
    return json.loads(invoke_raw(url, smiles))["predictions"]


def wait_for_trial_on(
    jobs: Any, job_id: str, mlflow: Any, experiment: str, nodes: set[str], timeout_s: float
) -> str:
    """Block until an MLflow trial run of the submitted job is tagged with one of `nodes`
    (a trial is training there); returns the experiment's id. Fails the test, with the job's
    log, if the job ends first or nothing shows up in `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, jobs.logs(job_id)[-4000:]
        assert jobs.status(job_id) in ("PENDING", "RUNNING"), jobs.logs(job_id)[-4000:]
        found = mlflow.get_experiment_by_name(experiment)
        runs = mlflow.search_runs([found.experiment_id]) if found else []
        if any(r.data.tags.get("node_id") in nodes for r in runs):
            return found.experiment_id
        time.sleep(0.5)


def start_submit(
    cmd: list[str], folder: Path, name: str = "submit"
) -> tuple[subprocess.Popen, Path, Path]:
    """Start a `toxtune submit` command in `folder`, its stdout and stderr going to
    `folder/<name>.out` and `.err`; (the process, those two paths)."""
    out_path, err_path = folder / f"{name}.out", folder / f"{name}.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=folder, stdout=out, stderr=err, text=True)
    return proc, out_path, err_path


def submitted_job_id(
    proc: subprocess.Popen, out_path: Path, err_path: Path, timeout_s: float
) -> str:
    """The job id a running `toxtune submit` (writing to `out_path`) prints first
    (`submitted job <id> ...`); fails the test if it exits or says nothing in `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in out_path.read_text().splitlines():
            if line.startswith("submitted job"):
                return line.split()[2]
        assert proc.poll() is None, out_path.read_text() + err_path.read_text()
        time.sleep(0.5)
    raise AssertionError(f"no job id within {timeout_s:.0f}s: {out_path.read_text()}")
