"""The `toxtune` command as a user runs it: data summary, help, errors without tracebacks."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TOXTUNE = str(Path(sys.executable).parent / "toxtune")


def cli(capfd: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run `toxtune ARGV` in this process (the entry point's code, without the start-up cost
    of a new interpreter); returns the exit code, stdout and stderr."""
    from tune.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # --help, and argparse's usage errors
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return code, out, err


def test_help_lists_every_subcommand(capfd: pytest.CaptureFixture) -> None:
    code, out, _ = cli(capfd, "--help")
    assert code == 0
    for cmd in ("tune", "configs", "data", "predict", "explain", "ui", "submit", "jobs"):
        assert cmd in out


def test_data_summary_lists_invalid_rows_and_label_balance(
    tmp_path: Path, make_csv, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    csv = make_csv(
        "smiles,toxic,other\nCCO,0,1\nc1ccccc1,1,\nnot_a_smiles,0,0\nCCN,1,0\n", "mols.csv"
    )
    report = tmp_path / "invalid.csv"
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = cli(capfd, "data", "--data", str(csv), "--invalid-report", str(report))
    assert code == 0, err
    assert "not_a_smiles" in out
    assert "toxic" in out and "other" in out
    assert "not_a_smiles" in report.read_text()


def test_data_errors_name_the_column_without_traceback(
    make_csv, capfd: pytest.CaptureFixture
) -> None:
    csv = make_csv("smile,toxic\nCCO,0\n", "mols.csv")
    code, _, err = cli(capfd, "data", "--data", str(csv))
    assert code == 2
    assert "smiles" in err and "smile" in err
    assert "Traceback" not in err
    bad = make_csv("smiles,toxic\nCCO,0\nCCN,maybe\n", "bad.csv")
    code, _, err = cli(capfd, "data", "--data", str(bad), "--targets", "toxic")
    assert code == 2 and "toxic" in err and "Traceback" not in err


def test_missing_file_and_no_network_point_at_data_flag(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    code, _, err = cli(capfd, "data", "--data", str(tmp_path / "nope.csv"))
    assert code == 2 and "nope.csv" in err
    code, _, err = cli(
        capfd,
        "tune",
        "--data",
        "http://127.0.0.1:9/tox21.csv.gz",
        "--num-samples",
        "1",
        "--storage-path",
        str(tmp_path / "r"),
    )
    assert code == 2 and "--data" in err and "Traceback" not in err


def test_tune_refuses_bad_config_before_ray_starts(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    import ray

    code, _, err = cli(capfd, "tune", "--gpus-per-trial", "1.5", "--storage-path", str(tmp_path))
    assert code == 2
    assert "gpus_per_trial" in err
    assert list(tmp_path.iterdir()) == [] and not ray.is_initialized()


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_ui_refuses_a_port_in_use_and_one_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--port <in use>` used to print the banner, bury `Address already in use` in mlflow's
    log and exit 0; `--port 70000` gave an OverflowError traceback and exit 0."""
    from tune.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["ui", "--storage-path", str(tmp_path), "--port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.splitlines() == [err] and f"--port {port}" in err and "in use" in err
    for bad in ("70000", "0", "http"):
        with pytest.raises(SystemExit) as exit_:
            main(["ui", "--port", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "argument --port" in err and bad in err and "Traceback" not in err


@pytest.mark.slow
def test_ui_serves_on_loopback_only_and_sigterm_stops_the_whole_server(tmp_path: Path) -> None:
    """`kill <pid of toxtune ui>` used to end toxtune only, leaving `mlflow ui`, its uvicorn
    workers and job consumers running, re-parented to init and holding the port."""
    import urllib.request

    import psutil

    from tests.services import free_port, wait_http

    port = free_port()
    # Not a session of its own: a supervisor or `timeout` signals toxtune's pid alone.
    proc = subprocess.Popen(
        [TOXTUNE, "ui", "--storage-path", str(tmp_path / "results"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first and "sqlite:///" in first
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200 and b"MLflow" in resp.read()
        # Bound to 127.0.0.1: the machine's other addresses do not answer.
        others = [
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        ]
        for ip in others:
            with pytest.raises(OSError), socket.create_connection((ip, port), timeout=3):
                pass
        server = psutil.Process(proc.pid).children(recursive=True)
        assert len(server) >= 2, server  # mlflow ui, uvicorn, workers, job runner

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(server, timeout=5)
        assert alive == [], [(p.pid, p.cmdline()) for p in alive]
        assert _port_is_free(port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        for leftover in server:  # never leak a server when the test fails
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def test_ui_links_the_training_runs_view_of_the_job_experiment(tmp_path: Path) -> None:
    """MLflow 3's UI opens an experiment in its GenAI view unless the link asks for the
    model-training one; `toxtune ui` prints that link for the job's experiment."""
    from tune import tracking
    from tune.cli.ui import runs_link

    uri = tracking.default_tracking_uri(tmp_path / "store")
    assert runs_link(uri, "toxtune", "http://127.0.0.1:5000") is None
    assert not (tmp_path / "store").exists()  # looking did not create a store
    client = tracking.client_for(uri)
    exp_id = tracking.ensure_experiment(client, uri, "toxtune")
    link = runs_link(uri, "toxtune", "http://127.0.0.1:5000")
    assert (
        link == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    )
    assert runs_link(uri, "other", "http://127.0.0.1:5000") is None
