"""The `toxtune` command as a user runs it: data summary, help, errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOXTUNE = str(Path(sys.executable).parent / "toxtune")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([TOXTUNE, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_help_lists_every_subcommand() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("tune", "data", "predict", "ui", "submit", "jobs"):
        assert cmd in out.stdout


def test_data_summary_lists_invalid_rows_and_label_balance(
    tmp_path: Path, make_csv, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = make_csv(
        "smiles,toxic,other\nCCO,0,1\nc1ccccc1,1,\nnot_a_smiles,0,0\nCCN,1,0\n", "mols.csv"
    )
    report = tmp_path / "invalid.csv"
    out = subprocess.run(
        [TOXTUNE, "data", "--data", str(csv), "--invalid-report", str(report)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TOXTUNE_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert "not_a_smiles" in out.stdout
    assert "toxic" in out.stdout and "other" in out.stdout
    assert "not_a_smiles" in report.read_text()


def test_data_errors_name_the_column_without_traceback(tmp_path: Path, make_csv) -> None:
    csv = make_csv("smile,toxic\nCCO,0\n", "mols.csv")
    out = run("data", "--data", str(csv))
    assert out.returncode == 2
    assert "smiles" in out.stderr and "smile" in out.stderr
    assert "Traceback" not in out.stderr
    bad = make_csv("smiles,toxic\nCCO,0\nCCN,maybe\n", "bad.csv")
    out = run("data", "--data", str(bad), "--targets", "toxic")
    assert out.returncode == 2 and "toxic" in out.stderr and "Traceback" not in out.stderr


def test_missing_file_and_no_network_point_at_data_flag(tmp_path: Path) -> None:
    out = run("data", "--data", str(tmp_path / "nope.csv"))
    assert out.returncode == 2 and "nope.csv" in out.stderr
    out = run(
        "tune",
        "--data",
        "http://127.0.0.1:9/tox21.csv.gz",
        "--num-samples",
        "1",
        "--storage-path",
        str(tmp_path / "r"),
    )
    assert out.returncode == 2 and "--data" in out.stderr and "Traceback" not in out.stderr


def test_tune_refuses_bad_config_before_ray_starts(tmp_path: Path) -> None:
    out = run("tune", "--gpus-per-trial", "1.5", "--storage-path", str(tmp_path))
    assert out.returncode == 2
    assert "gpus_per_trial" in out.stderr
    assert not (tmp_path / "toxtune").exists()


@pytest.mark.slow
def test_ui_serves_the_job_backend_on_loopback_only(tmp_path: Path) -> None:
    import os
    import signal
    import socket
    import urllib.request

    import psutil

    from tests.services import free_port, wait_http

    port = free_port()
    proc = subprocess.Popen(
        [TOXTUNE, "ui", "--storage-path", str(tmp_path / "results"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first and "sqlite:///" in first
        wait_http(f"http://127.0.0.1:{port}/health", timeout=90)
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
