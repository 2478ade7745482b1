"""`toxtune explain` on a checkpoint file and on a registered model, its one-line errors, and
`log_explanations` into a local MLflow (SQLite) run."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.tune.conftest import TINY_TASKS, tiny_fit
from toxmodel.checkpoint import load_checkpoint
from tune.tracking import default_tracking_uri, register_best_model, start_job_run
from tune.tracking.explanations import log_explanations

TASKS = TINY_TASKS
TAGS = {"searcher": "optuna", "seed": "0", "split": "random:0", "data_hash": "abc"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MLP trained for a few epochs on 48 SMILES, saved as a checkpoint file."""
    return tiny_fit(epochs=3).save(tmp_path_factory.mktemp("ckpt") / "model.pt")


def cli(capfd: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """`toxtune ARGV` in this process: exit code, stdout, stderr."""
    from tune.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return code, out, err


def _index(folder: Path) -> list[dict[str, str]]:
    with (folder / "explanations.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_explain_a_checkpoint_writes_pictures_and_flags_bad_smiles(
    checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    smiles = ["OC(=O)c1ccccc1", "not-a-smiles", "CCN"]
    args = ["explain", "--model", str(checkpoint), *smiles, "--output", str(out)]
    code, stdout, err = cli(capfd, *args, "--task", "NR-AR", "--task", "SR-p53")
    assert code == 0, err
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["000_NR-AR.png", "000_SR-p53.png", "002_NR-AR.png", "002_SR-p53.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in out.glob("*.png"))
    assert "4 pictures" in stdout
    assert "row 1" in err and "not-a-smiles" in err and "Traceback" not in err
    index = _index(out)
    assert [(r["row"], r["task"]) for r in index] == [
        ("0", "NR-AR"),
        ("1", "NR-AR"),
        ("2", "NR-AR"),
        ("0", "SR-p53"),
        ("1", "SR-p53"),
        ("2", "SR-p53"),
    ]
    want = load_checkpoint(checkpoint).predict(smiles)
    assert float(index[2]["probability"]) == pytest.approx(float(want["NR-AR"][2]), abs=1e-5)
    assert index[1]["error"] and not index[1]["picture"]

    code, _, err = cli(capfd, *args, "--task", "NR-AR", "--format", "svg", "--overwrite")
    assert code == 0, err
    assert (out / "000_NR-AR.svg").read_text().lstrip().startswith(("<?xml", "<svg"))


def test_a_folder_holding_an_earlier_explanation_is_replaced_only_with_overwrite(
    checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """A second `explain --output DIR` used to leave the first one's pictures and atom weights
    beside the new ones, named as if they belonged to it (000_SR-p53.png, 001_NR-AR.png, ...)."""
    from toxmodel.explain import INDEX_FILE
    from tune.cli.explain import INDEX_NAME

    assert INDEX_NAME == INDEX_FILE
    out = tmp_path / "out"
    out.mkdir()
    mine = {"notes.txt": "mine", "my_plot.png": "mine", "000_summary.md": "mine"}
    for name, text in mine.items():
        (out / name).write_text(text)
    first = ["explain", "--model", str(checkpoint), "CCN", "c1ccccc1N", "--output", str(out)]
    code, _, err = cli(capfd, *first, "--task", "NR-AR", "--task", "SR-p53")
    assert code == 0, err
    written = {
        f"{r}_{t}.{x}" for r in ("000", "001") for t in ("NR-AR", "SR-p53") for x in ["png", "csv"]
    }
    assert {p.name for p in out.iterdir()} == {*mine, *written, "explanations.csv"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    second = ["explain", "--model", str(checkpoint), "CCO", "--output", str(out), "--task", "NR-AR"]
    code, stdout, err = cli(capfd, *second, "--format", "svg")
    assert code == 2 and stdout == ""
    assert err.splitlines() == [
        f"toxtune explain: error: --output {out} holds an earlier explanation (9 files: "
        "000_NR-AR.csv, 000_NR-AR.png, 000_SR-p53.csv, 000_SR-p53.png, 001_NR-AR.csv and 4 "
        "more); pass --overwrite to replace those files (other files are kept), or give another "
        "folder"
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    code, stdout, err = cli(capfd, *second, "--format", "svg", "--overwrite")
    assert code == 0, err
    assert stdout.splitlines() == [
        f"removed the earlier explanation from {out} (9 files: 000_NR-AR.csv, 000_NR-AR.png, "
        "000_SR-p53.csv, 000_SR-p53.png, 001_NR-AR.csv and 4 more)",
        f"1 pictures and explanations.csv written to {out}",
    ]
    # only the new explanation and the user's own files are left
    assert {p.name for p in out.iterdir()} == {
        *mine,
        "000_NR-AR.svg",
        "000_NR-AR.csv",
        "explanations.csv",
    }
    assert all((out / name).read_text() == text for name, text in mine.items())
    assert [(r["row"], r["smiles"], r["picture"]) for r in _index(out)] == [
        ("0", "CCO", "000_NR-AR.svg")
    ]
    # a folder with the user's files only needs no --overwrite, and keeps them
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    code, _, err = cli(capfd, *second[:-4], "--output", str(other), "--task", "NR-AR")
    assert code == 0, err
    assert {p.name for p in other.iterdir()} == {
        "notes.txt",
        "000_NR-AR.png",
        "000_NR-AR.csv",
        "explanations.csv",
    }


def test_explain_help_says_what_happens_to_an_earlier_explanation(
    capfd: pytest.CaptureFixture,
) -> None:
    code, out, _ = cli(capfd, "explain", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "one that holds an earlier explanation is refused unless --overwrite" in text
    assert "--overwrite replace an earlier explanation in --output: remove its " in text
    assert "other files are kept" in text


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("task", "--task NR-XX: not a task of this model; its tasks: NR-AR, SR-p53"),
        ("output-file", "is a file"),
        ("no-file", "no such checkpoint file"),
        ("not-checkpoint", "not a toxtune checkpoint"),
        ("garbage", "refused: the file holds objects other than plain types"),
        ("all-invalid", ""),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    case: str, says: str, checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    model, task, out, smiles = str(checkpoint), "NR-AR", tmp_path / "out", "CCO"
    if case == "task":
        task = "NR-XX"
    elif case == "output-file":
        out.write_text("a file")
    elif case == "no-file":
        model = str(tmp_path / "missing.pt")
    elif case == "not-checkpoint":
        model = str(tmp_path / "other.pt")
        torch.save({"weights": torch.zeros(2)}, model)
    elif case == "garbage":  # torch's unpickling error runs to several lines
        model = str(tmp_path / "bad.pt")
        Path(model).write_bytes(b"not a checkpoint")
    elif case == "all-invalid":
        smiles = "C1CC"
    code, _, err = cli(
        capfd, "explain", "--model", model, smiles, "--task", task, "--output", str(out)
    )
    assert code == 2, err
    assert "Traceback" not in err
    if says:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("toxtune explain: error: "), err
        assert says in lines[0]
    else:  # nothing could be explained: the reason per molecule, no picture
        assert "row 0 ('C1CC'): not explained" in err
        assert not list(out.glob("*.png"))


def test_explain_a_registered_model_found_where_tune_put_it(
    checkpoint: Path, tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(tmp_path / "toxtune_results")
    parent = start_job_run(uri, "exp", "job", {}, resume=False)
    tags = {**TAGS, "trial_id": "t1", "val_roc_auc": "0.7"}
    register_best_model(uri, parent, checkpoint, "toxtune-tox21", tags=tags)
    model = "models:/toxtune-tox21@champion"
    args = ["explain", "--model", model, "c1ccccc1N", "--task", "NR-AR"]
    code, _, err = cli(capfd, *args, "--output", "default")  # the default store: ./toxtune_results
    assert code == 0, err
    assert (tmp_path / "default" / "000_NR-AR.png").is_file()
    code, _, err = cli(capfd, *args, "--output", "by-uri", "--tracking-uri", uri)
    assert code == 0, err
    want = load_checkpoint(checkpoint).predict(["c1ccccc1N"])["NR-AR"][0]
    got = _index(tmp_path / "by-uri")[0]["probability"]
    assert float(got) == pytest.approx(float(want), abs=1e-5)

    for bad, says in (
        ("models:/toxtune-tox21@nope", "cannot load model models:/toxtune-tox21@nope"),
        ("models:/unknown/1", "cannot load model models:/unknown/1"),
    ):
        code, _, err = cli(
            capfd, "explain", "--model", bad, "CCO", "--task", "NR-AR", "--output", "x"
        )
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and says in lines[0], err
    code, _, err = cli(capfd, *args, "--output", "x", "--storage-path", str(tmp_path / "elsewhere"))
    assert code == 2 and "no MLflow store" in err and "Traceback" not in err


def test_log_explanations_logs_the_most_confident_true_positives(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(tmp_path / "store")
    run_id = start_job_run(uri, "exp", "job", {}, resume=False)
    predictor = load_checkpoint(checkpoint)
    smiles = ["CCN", "c1ccccc1N", "CCO", "OCCN", "c1ccncc1N", "CCCl"]
    nan = float("nan")
    # tasks: NR-AR has 4 positives (one with no probability), "other" is not a model task,
    # SR-p53 has a single positive
    labels = np.array(
        [[1, 0, 0], [1, 1, 0], [0, 0, 1], [1, 0, nan], [1, 0, 0], [nan, 0, 0]], np.float64
    )
    probs = np.array(
        [
            [0.9, 0.1, 0.5],
            [0.7, 0.2, 0.5],
            [0.99, 0.3, 0.5],
            [0.8, 0.4, 0.5],
            [nan, 0.5, 0.5],
            [0.95, 0.6, 0.5],
        ],
        np.float64,
    )
    tasks = ["NR-AR", "SR-p53", "other"]
    logged = log_explanations(uri, run_id, predictor, smiles, labels, probs, tasks, per_task=3)
    assert logged == {"NR-AR": 3, "SR-p53": 1}
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(run_id, "explanations")}
    assert names == {"explanations/NR-AR", "explanations/SR-p53"}
    files = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run_id, "explanations/NR-AR")}
    assert {"000_NR-AR.png", "001_NR-AR.png", "002_NR-AR.png", "explanations.csv"} <= files
    local = client.download_artifacts(run_id, "explanations/NR-AR", str(tmp_path / "dl"))
    index = _index(Path(local))
    assert [r["smiles"] for r in index] == ["CCN", "OCCN", "c1ccccc1N"]  # 0.9, 0.8, 0.7
    assert Path(local, "000_NR-AR.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="molecules, tasks"):
        log_explanations(uri, run_id, predictor, smiles[:2], labels, probs, tasks)
