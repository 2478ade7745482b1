"""Every `toxtune` subcommand on one bad input of each error class it can meet: the documented
exit code (2 for bad input, 1 for a job or service that failed) and one line on stderr, never a
traceback.

The commands run in this process through `tune.cli.main` (an exception escaping it would fail the
test as a traceback would); the case of issue 12, `toxtune submit` to an unreachable cluster, also
runs as a real process. Rows that must start Ray are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tune.errors import (
    ClusterError,
    ConfigError,
    JobMismatchError,
    SearchError,
    ServingError,
    ToxtuneError,
    TrackingError,
)

TOXTUNE = str(Path(sys.executable).parent / "toxtune")
UNREACHABLE = "http://127.0.0.1:1"
# 32 distinct molecules (alcohols and amines of growing chains): repeats would share a split part
ROWS = "smiles,t1,t2\n" + "".join(
    f"{'C' * (i // 2 + 1)}{'ON'[i % 2]},{(i // 2) % 2},{(i // 4) % 2}\n" for i in range(32)
)
# Over the csv module's default field limit (128 KiB): `_csv.Error` from data, tune and predict.
WIDE_HEADER = "x" * 200 * 1024
WIDE = (
    "wide.csv: line 1 (the header) names column 2 with 204,800 characters "
    f"('{WIDE_HEADER[:57]}...'); no column name is over 1,000: check that line 1 is the header "
    "and that its quotes are balanced"
)
UNPARSABLE = (
    "unparsable.csv: none of its 3 SMILES could be parsed, so there is nothing to train on "
    "(line 2 'xx': SMILES Parse Error: syntax error while parsing: xx; line 3 'yy': SMILES Parse "
    "Error: syntax error while parsing: yy; line 4 '': empty SMILES)"
)
# The module SQLAlchemy imports for postgresql:// (psycopg from SQLAlchemy 2.1, psycopg2 before)
PG_DRIVER = make_url("postgresql://db/x").get_dialect().driver
NO_PG_DRIVER = (
    f": the database driver {PG_DRIVER!r} is not installed; install the PostgreSQL drivers with: "
    "pip install 'toxtune[team]'"
)


@dataclass(frozen=True)
class Case:
    """One bad input: the argv (with {tmp} filled in), how to set the folder up, the error
    class it must meet, and a fragment the one error line must hold."""

    argv: str
    error: type[Exception] | str  # the class raised, or "argparse" for a usage error
    says: str
    setup: Callable[[Path], None] | None = None
    env: tuple[tuple[str, str], ...] = ()
    # Ray Tune logs each failed trial's traceback (its own log, by design); then only the
    # command's own error must come without one.
    trial_logs: bool = False

    @property
    def exit_code(self) -> int:
        if self.error == "argparse":
            return 2
        return getattr(self.error, "exit_code", 2)


def _data(tmp: Path) -> None:
    (tmp / "mols.csv").write_text(ROWS)
    (tmp / "nosmiles.csv").write_text("smile,t1\nCCO,0\nCCN,1\n")
    (tmp / "empty.csv").write_bytes(b"")
    (tmp / "unparsable.csv").write_text('smiles,t1\nxx,0\nyy,1\n"",0\n')
    (tmp / "wide.csv").write_text(f"smiles,{WIDE_HEADER}\nCCO,0\nCCN,1\n")


def _saved_job_on_other_data(tmp: Path) -> None:
    """A job `old` whose saved fingerprint is of other data than mols.csv."""
    from tune.config import dump_config, load_config
    from tune.flags import CONFIG_FILE
    from tune.identity import FINGERPRINT_FILE

    _data(tmp)
    job = load_config(overrides={"data.source": str(tmp / "mols.csv"), "tracking.run_name": "old"})
    folder = tmp / "results" / "old"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(dump_config(job))
    fingerprint = {"content_hash": "0" * 64, "tasks": ["t1", "t2"], "featurizer": {}, "split": {}}
    (folder / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))


def _empty_store(tmp: Path) -> None:
    """An MLflow store under ./results with no models in it."""
    from mlflow import MlflowClient

    _data(tmp)
    MlflowClient(f"sqlite:///{tmp / 'results' / 'mlflow.db'}").search_experiments()


def _model_with_a_bad_checkpoint(tmp: Path) -> None:
    """A pyfunc model folder whose checkpoint artifact is not a checkpoint."""
    import mlflow

    from tune.serving import CHECKPOINT_ARTIFACT, ENTRY_CODE, ENTRY_FILE

    _data(tmp)
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp / ENTRY_FILE).write_text(ENTRY_CODE)
    mlflow.pyfunc.save_model(
        path=str(tmp / "bad_model"),
        python_model=str(tmp / ENTRY_FILE),
        artifacts={CHECKPOINT_ARTIFACT: str(tmp / "garbage.pt")},
    )


def _port_in_use(tmp: Path) -> None:
    """Listen on a port and write it to {tmp}/port (the socket lives for the test)."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    _OPEN.append(taken)
    (tmp / "port").write_text(str(taken.getsockname()[1]))


class _Undo:
    """A setup's monkeypatch, undone when the test closes what setups opened (`_OPEN`)."""

    def __init__(self) -> None:
        self.patch = pytest.MonkeyPatch()

    def close(self) -> None:
        self.patch.undo()


def _without_postgres_drivers(tmp: Path) -> None:
    """The data, and PostgreSQL's drivers unimportable until the test ends, as after a plain
    `pip install toxtune` (issue 25 item 9c: a raw ImportError)."""
    _data(tmp)
    undo = _Undo()
    for name in ("psycopg", "psycopg2"):
        undo.patch.setitem(sys.modules, name, None)  # `import psycopg` raises ImportError
    _OPEN.append(undo)


_OPEN: list = []
TUNE = "tune --storage-path {tmp}/results --data {tmp}/mols.csv"
FAULTS = "--num-samples 1 --max-epochs 2 --run-name drill --cpus-per-trial 1"

CASES = {
    # toxtune tune
    "tune-config": Case(f"{TUNE} --gpus-per-trial 1.5", ConfigError, "gpus_per_trial", _data),
    "tune-unknown-config": Case("tune --config nosuch", "argparse", "built-in config"),
    "tune-data": Case(
        "tune --storage-path {tmp}/results --data {tmp}/nosmiles.csv",
        "DataError",
        "no SMILES column 'smiles'",
        _data,
    ),
    "tune-job-mismatch": Case(
        "tune --storage-path {tmp}/results --resume old --data {tmp}/mols.csv",
        JobMismatchError,
        "data content",
        _saved_job_on_other_data,
    ),
    "tune-tracking": Case(
        f"{TUNE} --tracking-uri {UNREACHABLE}", TrackingError, "unreachable", _data
    ),
    "tune-search": Case(  # every attempt runs out of (injected) memory before an epoch
        f"{TUNE} {FAULTS}",
        SearchError,
        "no trial of job drill finished",
        _data,
        env=(("TOXTUNE_FAULT_PLAN", json.dumps({"oom_below_share": 1.0})),),
        trial_logs=True,
    ),
    "tune-no-smiles-parsed": Case(  # issue 25 item 9a: `cannot split an empty dataset`
        "tune --storage-path {tmp}/results --data {tmp}/unparsable.csv",
        "DataError",
        UNPARSABLE + "; all 3 are listed in ",
        _data,
    ),
    "tune-wide-header": Case(
        "tune --storage-path {tmp}/results --data {tmp}/wide.csv", "DataError", WIDE, _data
    ),
    "tune-study-driver": Case(
        f"{TUNE} --study-storage postgresql://127.0.0.1:1/optuna",
        ConfigError,
        "tracking.study_storage postgresql://127.0.0.1:1/optuna" + NO_PG_DRIVER,
        _without_postgres_drivers,
    ),
    "tune-tracking-driver": Case(
        f"{TUNE} --tracking-uri postgresql://127.0.0.1:1/mlflow",
        TrackingError,
        "tracking URI postgresql://127.0.0.1:1/mlflow" + NO_PG_DRIVER,
        _without_postgres_drivers,
    ),
    # toxtune data
    "data-data": Case("data --data {tmp}/nosmiles.csv", "DataError", "'smile'", _data),
    "data-no-smiles-parsed": Case(  # issue 25 item 9a: exited 0 with "valid SMILES: 0"
        "data --data {tmp}/unparsable.csv", "DataError", UNPARSABLE, _data
    ),
    "data-wide-header": Case("data --data {tmp}/wide.csv", "DataError", WIDE, _data),
    # toxtune predict
    "predict-data": Case(
        "predict --model models:/m@champion {tmp}/empty.csv --storage-path {tmp}/results",
        "DataError",
        "empty",
        _data,
    ),
    "predict-wide-header": Case(
        "predict --model models:/m@champion {tmp}/wide.csv --storage-path {tmp}/results",
        "DataError",
        WIDE,
        _data,
    ),
    "predict-serving": Case(
        "predict --model models:/nope@champion {tmp}/mols.csv --output {tmp}/p.csv "
        "--storage-path {tmp}/results",
        ServingError,
        "models:/nope@champion",
        _empty_store,
    ),
    "predict-output": Case(
        "predict --model models:/m@champion {tmp}/mols.csv --output {tmp}/mols.csv",
        ServingError,
        "is the input file",
        _data,
    ),
    "predict-checkpoint": Case(
        "predict --model {tmp}/bad_model {tmp}/mols.csv --output {tmp}/p.csv",
        "CheckpointError",
        "not a toxtune checkpoint",
        _model_with_a_bad_checkpoint,
    ),
    # toxtune explain
    "explain-serving": Case(
        "explain --model models:/nope@champion CCO --task t1 --output {tmp}/x "
        "--storage-path {tmp}/results",
        ServingError,
        "models:/nope@champion",
        _empty_store,
    ),
    "explain-checkpoint": Case(
        "explain --model {tmp}/garbage.pt CCO --task t1 --output {tmp}/x",
        "CheckpointError",
        "not a toxtune checkpoint",
        _model_with_a_bad_checkpoint,
    ),
    # toxtune ui
    "ui-config": Case("ui --config {tmp}/missing.yaml", ConfigError, "not found"),
    "ui-port-in-use": Case(
        "ui --storage-path {tmp}/results --port {port}", ConfigError, "in use", _port_in_use
    ),
    "ui-port-range": Case("ui --port 70000", "argparse", "1-65535"),
    # toxtune submit
    "submit-config": Case(
        f"submit --address {UNREACHABLE} --num-samples 0", ConfigError, "search.num_samples"
    ),
    "submit-cluster": Case(
        f"submit --address {UNREACHABLE} --config quick", ClusterError, "cannot reach"
    ),
    "submit-address": Case("submit --address 10.0.0.1:6379", ClusterError, "not an http(s) URL"),
    # toxtune jobs
    "jobs-cluster": Case(f"jobs status raysubmit_x --address {UNREACHABLE}", ClusterError, "reach"),
    "jobs-no-id": Case(f"jobs logs --address {UNREACHABLE}", ClusterError, "needs a JOB_ID"),
}
SLOW = {"tune-search"}  # starts a local Ray and runs a trial


def _params() -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in CASES]


def test_the_table_covers_every_subcommand_and_error_class() -> None:
    commands = {case.argv.split()[0] for case in CASES.values()}
    assert commands == {"tune", "data", "predict", "explain", "ui", "submit", "jobs"}
    classes = {c.error if isinstance(c.error, str) else c.error.__name__ for c in CASES.values()}
    # A stop signal is not bad input: its one line and exit code (130) are checked by the Ctrl-C
    # drill, test_resume.py::test_ctrl_c_stops_the_job_unregistered_and_resume_completes_it.
    every = {cls.__name__ for cls in ToxtuneError.__subclasses__()} - {
        "DataError",
        "JobInterruptedError",
    }
    assert every <= classes, every - classes
    assert {"DataError", "CheckpointError", "argparse"} <= classes


@pytest.mark.parametrize("name", _params())
def test_bad_input_gives_one_line_and_the_documented_exit_code(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture,
) -> None:
    from tune.cli import main

    case = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in case.env:
        monkeypatch.setenv(key, value)
    if case.setup is not None:
        case.setup(tmp_path)
    port = (tmp_path / "port").read_text() if (tmp_path / "port").exists() else ""
    argv = case.argv.format(tmp=tmp_path, port=port).split()
    try:
        if case.error == "argparse":
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            code = exit_.value.code
        else:
            code = main(argv)
    finally:
        while _OPEN:
            _OPEN.pop().close()
        import ray

        if ray.is_initialized():  # a job that got as far as Ray leaves this process's Ray up
            ray.shutdown()
    err = capfd.readouterr().err
    if case.trial_logs:
        assert "tune.errors." not in err and "Error: " not in err.splitlines()[-1], err
    else:
        assert "Traceback" not in err, err
    assert code == case.exit_code, err
    lines = [ln for ln in err.splitlines() if f"toxtune {argv[0]}: error:" in ln]
    assert len(lines) == 1, err
    assert case.says in lines[0], lines[0]


def test_submit_to_an_unreachable_cluster_is_one_line_from_a_real_process() -> None:
    """Issue 12: this printed a Python traceback ending in `tune.cluster.ClusterError`."""
    out = subprocess.run(
        [TOXTUNE, "submit", "--address", "http://127.0.0.1:1", "--config", "configs/quick.yaml"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 1
    assert out.stderr.startswith("toxtune submit: error: cannot reach "), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
