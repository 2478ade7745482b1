"""`toxtune ui`: the MLflow UI on the job's tracking backend, stopped as a whole.

`mlflow ui` runs uvicorn workers as child processes. It is started without MLflow 3's job
runner (`SERVER_ENV`; a user's own setting of the variable wins): toxtune uses none of its jobs
(GenAI evaluation, trace rollups), and its seven consumer processes cost a UI about 1.4 GiB of
memory and 17 s of CPU as it starts (`benchmarks/mlflow_server.py`). It is started in a process
group of its own; SIGTERM, SIGINT or SIGHUP to toxtune (a supervisor, `timeout`, Ctrl-C, a
closed terminal) stops that whole group and every descendant, so nothing is left holding the
port. The port is checked before the server starts (mlflow ui itself exits 0 when it cannot
bind), and a server that exits before it ever answered is an error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tune.cli.configs import config_arg
from tune.cli.tune_job import tune_overrides
from tune.errors import ConfigError, TrackingError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_GRACE_S = 10.0  # after SIGTERM, how long the server may take before SIGKILL
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_EXPERIMENT_ID = "0"  # MLflow's `Default` experiment, created with every store
MAX_LINKS = 20  # experiment links printed before the rest is only counted
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # the job runner off (above)


def port_number(value: str) -> int:
    """argparse type of --port: an integer TCP port, 1-65535."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (1-65535)")
    return port


def check_port_free(host: str, port: int) -> None:
    """ConfigError if nothing could listen on host:port now (in use, or an unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host}: cannot resolve it ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As uvicorn binds: a port in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); another "
                "server holds it: stop it or choose another --port"
            ) from exc


def stop_process_tree(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group of `proc` (its own session) and every descendant, SIGKILL
    what is still alive after `grace_s`, and reap `proc`."""
    import psutil

    tree: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in tree:  # descendants that left the group (setsid) are not reached by killpg
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
        return resp.status == 200
    return False


def serve(cmd: list[str], health_url: str) -> int:
    """Run the server command until it exits or toxtune is told to stop; returns the exit code
    (128 + the signal number when stopped by a signal)."""
    proc = subprocess.Popen(cmd, start_new_session=True, env={**SERVER_ENV, **os.environ})
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    answered = False
    try:
        while not received and proc.poll() is None:
            answered = answered or _answers(health_url)
            time.sleep(0.3)
    finally:
        stop_process_tree(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        print(f"stopped the MLflow UI ({signal.Signals(received[0]).name})", file=sys.stderr)
        return 128 + received[0]
    if not answered:
        raise TrackingError(
            f"the MLflow UI exited (code {proc.returncode}) before it served {health_url}; "
            "its log is above"
        )
    return proc.returncode or 0


def runs_links(tracking_uri: str, ui_url: str, first: str = "") -> list[tuple[str, str]]:
    """(experiment, UI link to its training-runs table) for every active experiment in the
    store: `first` (the config's experiment) first, then by name. MLflow's own `Default`
    experiment is left out while it holds no run. [] when there is no store yet, or it cannot
    be read (the UI still starts; the links are a convenience)."""
    from mlflow.entities import ViewType

    from tune import tracking

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        return []  # no store yet: do not create one just to look
    try:
        client = tracking.client_for(tracking_uri)
        experiments = [
            e
            for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
            if e.experiment_id != DEFAULT_EXPERIMENT_ID
            or client.search_runs([e.experiment_id], max_results=1)
        ]
    except Exception:
        return []
    experiments.sort(key=lambda e: (e.name != first, e.name))
    return [(e.name, tracking.experiment_url(ui_url, e.experiment_id)) for e in experiments]


def cmd_ui(args: argparse.Namespace) -> int:
    from tune.config import load_config

    job = load_config(args.config, tune_overrides(args))
    check_port_free(args.host, args.port)
    uri = job.tracking_uri
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {url}  (Ctrl-C to stop)", flush=True)
    # MLflow 3's UI opens an experiment in its GenAI view unless the link asks for the
    # model-training one (tune.tracking.experiment_url): a link for every experiment, so a job
    # run with --experiment-name has one too.
    links = runs_links(uri, url, job.tracking.experiment_name)
    for name, link in links[:MAX_LINKS]:
        print(f"training runs of {name!r}: {link}", flush=True)
    if len(links) > MAX_LINKS:
        print(f"... and {len(links) - MAX_LINKS} more experiment(s): {url}", flush=True)
    if args.host not in LOOPBACK:
        print("warning: the UI is reachable from other machines and has no authentication")
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", str(job.storage_root / "mlartifacts")]
    probe_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "::1": "[::1]"}.get(args.host, args.host)
    return serve(cmd, f"http://{probe_host}:{args.port}/health")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the job's tracking backend")
    p.add_argument("--config", type=config_arg, help="job config whose tracking URI to show")
    p.add_argument("--tracking-uri", dest="tracking_uri")
    p.add_argument("--storage-path", dest="storage_path")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=port_number, default=5000, help="TCP port (default: 5000)")
    p.set_defaults(func=cmd_ui)
