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


def test_help_and_the_jobs_commands_answer_without_loading_the_model_libraries() -> None:
    """`toxtune --help`, `toxtune jobs ...` and a command's usage error are answered without
    importing torch, RDKit, scikit-learn, pandas, MLflow or Ray Tune (3-4 s of start-up on a
    laptop, for a command that checks a job's status); `tune.flags` holds what parsing needs."""
    heavy = ("torch", "rdkit", "sklearn", "pandas", "mlflow", "ray.tune", "optuna")
    probe = (
        "import sys\n"
        "from tune.cli import build_parser, main\n"
        "build_parser().format_help()\n"
        "code = main(['jobs', 'list', '--address', 'http://127.0.0.1:9'])\n"
        f"print(code, sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, check=True
    )
    assert done.stdout.strip() == "1 []", done.stdout + done.stderr[-2000:]  # 1: unreachable
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in done.stderr


def test_the_command_freezes_its_heap_for_exit_and_a_caller_of_main_keeps_its_own(
    capfd: pytest.CaptureFixture,
) -> None:
    """A `toxtune` process ends with its command, so its heap is frozen first: Python's
    finalization would otherwise collect the imported libraries' objects again (3 s after a
    job's report; benchmarks/RESULTS.md). A program calling `main(argv)` goes on, and its
    collector is left as it was (frozen garbage is never freed)."""
    import gc

    before = gc.get_freeze_count()
    code, out, _ = cli(capfd, "configs")
    assert code == 0 and "quick" in out
    assert gc.get_freeze_count() == before
    probe = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('frozen at exit:', gc.get_freeze_count() > 0))\n"
        "sys.argv = ['toxtune', 'configs']\n"
        "from tune.cli import main\n"
        "sys.exit(main())\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "quick" in done.stdout  # the command's own output, whole
    assert done.stdout.rstrip().endswith("frozen at exit: True"), done.stdout


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
    written = report.read_text()
    # Again, from the feature cache (its matrices mapped, not read): the same summary and report.
    assert list((tmp_path / "cache" / "features").glob("*.npz"))
    again = cli(capfd, "data", "--data", str(csv), "--invalid-report", str(report), "--overwrite")
    assert again[0] == 0 and again[1] == out and report.read_text() == written


def test_data_never_writes_its_report_over_the_data_or_an_earlier_file(
    tmp_path: Path, make_csv, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """`--invalid-report` used to be written wherever it pointed: over the data file itself
    (`--data mols.csv --invalid-report mols.csv` left only the invalid rows) or over an earlier
    file. Each is refused in one line, before anything is read, and --overwrite replaces an
    earlier report, never the data."""
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    body = "smiles,toxic\nCCO,0\nnot_a_smiles,1\nCCN,1\n"
    csv = make_csv(body, "mols.csv")
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("a file the user keeps\n")
    data = ["data", "--data", str(csv), "--invalid-report"]
    for target, extra, said in (
        (csv, [], "is the data file; write the report to another file"),
        (csv, ["--overwrite"], "is the data file; write the report to another file"),
        (earlier, [], "exists (an earlier report?); pass --overwrite to replace it"),
        (tmp_path, [], "is a folder; give a file name"),
    ):
        code, out, err = cli(capfd, *data, str(target), *extra)
        assert code == 2 and out == "", err
        (line,) = err.splitlines()
        assert line.startswith(f"toxtune data: error: --invalid-report {target} {said}"), line
    assert csv.read_text() == body and earlier.read_text() == "a file the user keeps\n"
    assert not (tmp_path / "cache").exists()  # refused before anything was read

    code, _, err = cli(capfd, *data, str(earlier), "--overwrite")
    assert code == 0, err
    assert earlier.read_text().splitlines()[1].startswith("3,1,not_a_smiles,")


def test_data_shows_progress_and_prints_a_summary_that_does_not_grow_with_the_rows(
    tmp_path: Path, make_csv, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """Issue 23 item 6: bars for reading and featurizing on stderr; 10x the invalid rows print
    the same number of lines (the report file lists them all)."""
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    printed = []
    for n_bad in (60, 600):
        body = "".join(f"bad{i}(,{i % 2}\n" for i in range(n_bad)) + "CCO,1\nCCN,0\n"
        csv = make_csv("smiles,toxic\n" + body, f"mols{n_bad}.csv")
        report = tmp_path / f"invalid{n_bad}.csv"
        code, out, err = cli(capfd, "data", "--data", str(csv), "--invalid-report", str(report))
        assert code == 0, err
        assert "read" in err and "featurize" in err  # the two progress bars
        assert f"invalid SMILES: {n_bad}" in out
        assert len(report.read_text().splitlines()) == n_bad + 1
        printed.append(len(out.splitlines()))
    assert printed[0] == printed[1]


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


def test_tune_folds_flag_reaches_the_config_and_is_checked_there(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """`--folds` sets search.folds (issue 26); a bad count is refused by name before Ray."""
    import ray

    code, _, err = cli(capfd, "tune", "--folds", "0", "--storage-path", str(tmp_path))
    assert code == 2 and "search.folds" in err and "Traceback" not in err
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
    workers and job consumers running, re-parented to init and holding the port. The server
    runs without MLflow's job runner (seven consumer processes, 1.4 GiB)."""
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
        assert len(server) >= 2, server  # mlflow ui, uvicorn and its workers
        lines = [" ".join(p.cmdline()) for p in server]
        assert not [ln for ln in lines if "huey" in ln or "_job_runner" in ln], lines

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


def test_ui_links_the_training_runs_view_of_every_experiment(tmp_path: Path) -> None:
    """MLflow 3's UI opens an experiment in its GenAI view unless the link asks for the
    model-training one; `toxtune ui` prints that link for every experiment in the store, the
    config's first (it used to print the config's experiment only)."""
    from tune import tracking
    from tune.cli.ui import runs_links

    ui = "http://127.0.0.1:5000"
    uri = tracking.default_tracking_uri(tmp_path / "store")
    assert runs_links(uri, ui, "toxtune") == []
    assert not (tmp_path / "store").exists()  # looking did not create a store
    client = tracking.client_for(uri)
    ids = {n: tracking.ensure_experiment(client, uri, n) for n in ("zeta", "toxtune", "mine")}
    client.delete_experiment(tracking.ensure_experiment(client, uri, "gone"))

    def link(name: str) -> str:
        return f"{ui}/#/experiments/{ids[name]}/runs?workflowType=machine_learning"

    # MLflow's empty Default experiment and a deleted one are left out
    want = [(n, link(n)) for n in ("toxtune", "mine", "zeta")]
    assert runs_links(uri, ui, "toxtune") == want
    assert runs_links(uri, ui, "other") == [want[1], want[0], want[2]]
    # Default, once it holds a run, is listed like any other
    client.create_run("0")
    ids["Default"] = "0"
    assert runs_links(uri, ui, "mine") == [
        (n, link(n)) for n in ("mine", "Default", "toxtune", "zeta")
    ]


def test_ui_prints_a_link_per_experiment_before_serving(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job run with `--experiment-name mine` had no link: only the config's experiment got
    one, and `mine` opened in MLflow's GenAI view."""
    from tests.services import free_port
    from tune import tracking
    from tune.cli import ui

    served: list[list[str]] = []
    monkeypatch.setattr(ui, "serve", lambda cmd, health: served.append(cmd) or 0)
    uri = tracking.default_tracking_uri(tmp_path / "results")
    client = tracking.client_for(uri)
    ids = {n: tracking.ensure_experiment(client, uri, n) for n in ("mine", "toxtune")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code, out, err = cli(
        capfd, "ui", "--storage-path", str(tmp_path / "results"), "--port", str(port)
    )
    assert code == 0, err
    assert out.splitlines() == [
        f"MLflow UI for {uri} at {url}  (Ctrl-C to stop)",
        f"training runs of 'toxtune': {url}/#/experiments/{ids['toxtune']}/runs?"
        "workflowType=machine_learning",
        f"training runs of 'mine': {url}/#/experiments/{ids['mine']}/runs?"
        "workflowType=machine_learning",
    ]
    assert len(served) == 1 and uri in served[0]

    monkeypatch.setattr(ui, "MAX_LINKS", 1)
    code, out, err = cli(
        capfd, "ui", "--storage-path", str(tmp_path / "results"), "--port", str(port)
    )
    assert code == 0, err
    assert out.splitlines()[1:] == [
        f"training runs of 'toxtune': {url}/#/experiments/{ids['toxtune']}/runs?"
        "workflowType=machine_learning",
        f"... and 1 more experiment(s): {url}",
    ]


def test_ui_on_every_interface_warns_that_it_has_no_authentication(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.services import free_port
    from tune.cli import ui

    served: list[list[str]] = []
    monkeypatch.setattr(ui, "serve", lambda cmd, health: served.append(cmd) or 0)
    port = free_port()
    results = str(tmp_path / "results")
    code, out, err = cli(capfd, "ui", "--storage-path", results, "--port", str(port))
    assert code == 0, err
    assert "warning" not in out  # loopback (the default): no warning
    code, out, err = cli(
        capfd, "ui", "--storage-path", results, "--port", str(port), "--host", "0.0.0.0"
    )
    assert code == 0, err
    warned = "warning: the UI is reachable from other machines and has no authentication"
    assert warned in out.splitlines()
    host = served[-1][served[-1].index("--host") + 1]
    assert host == "0.0.0.0"


def _finished_job(tmp_path: Path, ran: int, search_seconds: float, **overrides: object) -> tuple:
    """A job config and a fabricated JobResult of `ran` trials whose search took
    `search_seconds` (what `toxtune tune` hands `print_result`)."""
    import pandas as pd

    from toxmodel.metrics import Metrics
    from tune.config import load_config
    from tune.job import JobResult

    settings = {
        "search.num_samples": 20,
        "ray.storage_path": str(tmp_path / "results"),
        "tracking.run_name": "quick-1",
        **overrides,
    }
    job = load_config(overrides=settings)
    trials = pd.DataFrame(
        {
            "trial_id": [f"t{i}" for i in range(ran)],
            "val_roc_auc": [0.8 - i / 100 for i in range(ran)],
            "best_epoch": [3] * ran,
            "epochs": [4] * ran,
            "status": ["finished"] * ran,
        }
    )
    result = JobResult(
        name="quick-1",
        experiment_path=str(tmp_path / "results" / "quick-1"),
        trials=trials,
        best_trial_id="t0",
        best_config={"lr": 0.001},
        best_valid={"val_roc_auc": 0.8, "val_pr_auc": 0.4},
        test=Metrics(loss=0.3, roc_auc=0.78, pr_auc=0.35, accuracy=0.9, balanced_accuracy=0.7),
        parent_run_id="run1",
        model_version="1",
        alias_note="champion moved to version 1",
    )
    result.search_seconds = search_seconds  # the search's wall time (JobResult.search_seconds)
    return job, result


def test_the_report_says_when_the_time_limit_ended_the_search(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A search the time limit ended after 3 of 20 trials used to be reported like one that ran
    all it was asked for."""
    from tune.report import print_result

    job, result = _finished_job(tmp_path, 3, 75.4, **{"search.time_limit_s": 60})
    print_result(job, result)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "== toxtune job quick-1: 3 trials ==",
        "the search's time limit (60 s, search.time_limit_s / --time-limit) ended the search "
        "after 75 s, with 3 of 20 trials run; the model is the best of those 3. Run the rest "
        f"with: toxtune tune --resume quick-1 --storage-path {tmp_path / 'results'} (add "
        "--time-limit SECONDS for another limit)",
    ]


@pytest.mark.parametrize(
    ("limit", "ran", "seconds"),
    [
        (None, 3, 75.4),  # no time limit: fewer trials for another reason (failures)
        (60, 3, 59.0),  # ended before its limit
        (60, 20, 75.4),  # every trial ran, the limit came after (or cut the last ones short)
    ],
)
def test_the_report_blames_the_time_limit_only_when_it_ended_the_search(
    tmp_path: Path, capsys: pytest.CaptureFixture, limit: float | None, ran: int, seconds: float
) -> None:
    from tune.report import print_result

    job, result = _finished_job(tmp_path, ran, seconds, **{"search.time_limit_s": limit})
    print_result(job, result)
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [f"== toxtune job quick-1: {ran} trials ==", ""]
    assert "time limit" not in out


def test_the_report_lists_a_one_class_task_the_job_dropped(
    tmp_path: Path, make_csv, capsys: pytest.CaptureFixture
) -> None:
    """`data.allow_single_class: true` drops a task with one class instead of refusing the
    data; the end-of-job report must say which and why, not leave it to be missed."""
    from toxmodel.data import load_table
    from tune.report import print_result

    rows = "".join(f"{'C' * (i + 1)}O,{i % 2},0\n" for i in range(12))
    table = load_table(make_csv("smiles,toxic,inert\n" + rows), allow_single_class=True)
    assert table.tasks == ["toxic"]
    job, result = _finished_job(tmp_path, 3, 10.0)
    result.skipped_columns = dict(table.skipped_columns)  # as run_job hands them on
    print_result(job, result)
    said = [line for line in capsys.readouterr().out.splitlines() if "'inert'" in line]
    assert len(said) == 1 and said[0].startswith("column 'inert' not used as a task: ")
    assert "12" in said[0]  # its counts: 12 of class 0, none of class 1


def _registered_tiny_model(folder: Path) -> list[str]:
    """A one-epoch model registered as toxtune-mols@champion in `folder`'s default store (the
    caller's working folder) and five molecules in mols.csv; returns `toxtune predict`'s argv
    up to its --output value."""
    from tests.tune.conftest import tiny_fit
    from tune.tracking import default_tracking_uri, register_best_model, start_job_run

    checkpoint = tiny_fit(epochs=1).save(folder / "model.pt")
    uri = default_tracking_uri(folder / "toxtune_results")
    parent = start_job_run(uri, "exp", "job", {}, resume=False)
    tags = {"searcher": "optuna", "seed": "0", "split": "random:0", "data_hash": "abc"}
    register_best_model(uri, parent, checkpoint, "toxtune-mols", tags={**tags, "trial_id": "t1"})
    (folder / "mols.csv").write_text(
        "smiles,id\nCCO,a\nnot-a-smiles,b\nc1ccccc1N,c\nCCN,d\nCCCl,e\n"
    )
    return ["predict", "--model", "models:/toxtune-mols@champion", "mols.csv", "--output"]


def test_predict_compresses_an_output_named_gz(
    tmp_path: Path,
    capfd: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--output preds.csv.gz` used to write plain CSV under a .gz name (which gzip, pandas
    and zcat then refuse); another compression suffix is refused before the model loads."""
    import gzip

    import pandas as pd

    from tune import serving

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(serving, "PREDICT_CHUNK", 2)  # several chunks into one gzip stream
    predict = _registered_tiny_model(tmp_path)

    code, out, err = cli(capfd, *predict, "preds.csv")
    assert code == 0, err
    code, out, err = cli(capfd, *predict, "preds.csv.gz")
    assert code == 0, err
    assert out.splitlines()[0] == "predictions written to preds.csv.gz"
    packed = Path("preds.csv.gz").read_bytes()
    assert packed[:2] == b"\x1f\x8b"  # gzip's magic number
    assert gzip.decompress(packed) == Path("preds.csv").read_bytes()
    assert list(pd.read_csv("preds.csv.gz")["id"]) == list("abcde")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    for name in ("preds.csv.bz2", "preds.csv.xz", "preds.zip", "preds.csv.zst"):
        code, out, err = cli(capfd, *predict, name)
        assert code == 2 and out == ""
        assert err.splitlines() == [
            f"toxtune predict: error: --output {name}: only gzip compression is written; "
            "name the file .csv, or .csv.gz for gzip"
        ]
        assert not Path(name).exists()
    code, out, _ = cli(capfd, "predict", "--help")
    assert code == 0 and "gzip-compressed when the name ends in .gz" in " ".join(out.split())


def test_predict_refuses_to_replace_earlier_predictions_unless_told(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second `toxtune predict` to the same --output (the default predictions.csv included)
    used to replace the first one's predictions without a word; now it is refused before the
    model loads, naming the file and --overwrite, and --overwrite replaces it whole."""
    import pandas as pd

    from tune import serving

    monkeypatch.chdir(tmp_path)
    predict = _registered_tiny_model(tmp_path)[:-1]  # without --output: predictions.csv
    code, out, err = cli(capfd, *predict)
    assert code == 0 and out.splitlines()[0] == "predictions written to predictions.csv", err
    first = Path("predictions.csv").read_bytes()
    Path("mols.csv").write_text("smiles,id\nCCCC,z\n")  # other molecules, same default output

    def must_not_load(*args: object, **kwargs: object) -> None:
        pytest.fail("the model was loaded although its output would be refused")

    with monkeypatch.context() as m:
        m.setattr(serving, "load_model", must_not_load)
        code, out, err = cli(capfd, *predict)
    assert code == 2 and out == ""
    assert err.splitlines() == [
        "toxtune predict: error: --output predictions.csv exists (earlier predictions?); pass "
        "--overwrite to replace it, or give another --output"
    ]
    assert Path("predictions.csv").read_bytes() == first  # untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    code, out, err = cli(capfd, *predict, "--overwrite")
    assert code == 0, err
    assert list(pd.read_csv("predictions.csv")["id"]) == ["z"]  # replaced whole
