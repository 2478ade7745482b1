"""Provenance without a server: the dataset MLflow shows, and the source tags of every run."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from mlflow.tracking import MlflowClient

from toxmodel.data import load_table
from toxmodel.split import SplitConfig
from tune.tracking import dataset_info, default_tracking_uri, source_tags, start_job_run
from tune.tracking.provenance import data_stem, git_commit, log_dataset

REPO = Path(__file__).resolve().parents[2]


def test_dataset_info_names_the_file_and_digests_the_table(tmp_path: Path) -> None:
    path = tmp_path / "clintox_upper.csv"
    path.write_text("smiles,A,B\nCCO,1,0\nCCN,0,1\nc1ccccc1,1,1\nCC,0,0\n")
    table = load_table(path, "smiles", None, tmp_path / "cache")
    info = dataset_info(table, SplitConfig(method="scaffold", seed=3))

    assert info.name == "clintox_upper"
    assert info.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.digest == info.content_hash[:16]
    assert (info.rows, info.targets) == (4, ("A", "B"))
    assert info.split == "scaffold:3 (0.8/0.1/0.1)"

    entity = info.entity()
    assert entity.source_type == "local"
    assert json.loads(entity.source) == {"uri": str(path.resolve())}
    profile = json.loads(entity.profile)
    assert profile == {
        "num_rows": 4,
        "num_targets": 2,
        "split": "scaffold:3 (0.8/0.1/0.1)",
        "content_hash": info.content_hash,
    }
    assert [c["name"] for c in json.loads(entity.schema)["mlflow_colspec"]] == ["A", "B"]


def test_data_stems_of_paths_and_urls() -> None:
    assert data_stem("/data/toxcast.csv.gz") == "toxcast"
    assert data_stem("https://host/files/tox21.csv.gz?raw=1") == "tox21"
    assert data_stem("sider.tsv") == "sider"


def test_a_dataset_logged_twice_is_one_input(tmp_path: Path) -> None:
    """Replays (a server that came back) and the summary log it again: MLflow keeps one."""
    path = tmp_path / "tox21.csv"
    path.write_text("smiles,A\nCCO,1\nCCN,0\n")
    info = dataset_info(load_table(path, "smiles", None, tmp_path / "cache"), SplitConfig())
    uri = default_tracking_uri(tmp_path / "store")
    run_id = start_job_run(uri, "exp", "job", {}, resume=False)
    client = MlflowClient(uri)
    log_dataset(client, run_id, info)
    log_dataset(client, run_id, info)
    inputs = client.get_run(run_id).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("tox21", info.digest)]
    assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "train"


def test_source_tags_name_toxtune_its_version_and_the_checkout() -> None:
    source_tags.cache_clear()  # read once per process; others may have committed since
    tags = source_tags()
    assert tags["mlflow.source.name"] == "toxtune"
    assert tags["toxtune.version"] not in ("", "unknown")
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None


def test_the_logged_dataset_holds_a_digest_and_profile_not_the_rows(tmp_path: Path) -> None:
    """Issue 23 item 6: at 10^6 rows a dataset input holding rows would be gigabytes in the
    tracking store. What MLflow keeps for 4,000 rows is what it keeps for 8, but the row count."""
    uri = default_tracking_uri(tmp_path / "store")
    client = MlflowClient(uri)
    logged = []
    for n in (8, 4000):
        path = tmp_path / f"rows{n}" / "tox.csv"
        path.parent.mkdir()
        smiles = [f"C{'C' * (i % 9)}O{'N' * (i // 9 % 5)}" for i in range(n)]
        path.write_text("smiles,A\n" + "".join(f"{s},{i % 2}\n" for i, s in enumerate(smiles)))
        info = dataset_info(load_table(path, "smiles", None, tmp_path / "cache"), SplitConfig())
        run_id = start_job_run(uri, "exp", f"job{n}", {}, resume=False)
        log_dataset(client, run_id, info)
        (entry,) = client.get_run(run_id).inputs.dataset_inputs
        dataset = entry.dataset
        stored = "".join([dataset.source, dataset.schema, dataset.profile, dataset.digest])
        assert not any(s in stored for s in smiles if len(s) > 3)  # no SMILES, no rows
        assert json.loads(dataset.profile)["num_rows"] == n
        logged.append(len(stored) - len(str(n)) - len(str(path.parent)))
    assert logged[0] == logged[1]
