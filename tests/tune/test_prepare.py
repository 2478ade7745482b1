"""The prepare stage refuses data no search could use, before featurizing or starting Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from tests.tune.conftest import tiny_job
from toxmodel.errors import DataError
from toxmodel.folds import make_folds
from toxmodel.split import Split
from toxmodel.trees import fit_bytes
from tune.errors import ConfigError
from tune.job import run_job
from tune.prepare import check_trees_memory, check_validation


def test_validation_without_both_classes_of_any_task_is_refused_naming_counts() -> None:
    labels = np.array([[0], [1], [0], [0], [1], [0]], dtype=np.float32)
    split = Split(train=np.array([0, 1, 2, 4]), valid=np.array([3, 5]), test=np.array([], int))
    with pytest.raises(DataError, match=r"'toxic': 0 positives, 2 negatives in validation"):
        check_validation(labels, split, ["toxic"], "random")
    # One task with both classes in validation is enough (others are skipped in the mean).
    two = np.column_stack([labels[:, 0], [0, 1, 0, 1, 1, 0]]).astype(np.float32)
    check_validation(two, split, ["toxic", "other"], "random")


def test_a_task_with_two_positives_is_refused_before_ray_starts(
    tmp_path: Path, make_csv, no_ray: None
) -> None:
    rows = ["smiles,toxic"] + [
        f"{'C' * (i % 9 + 1)}{'O' * (i // 9)},{int(i < 2)}" for i in range(40)
    ]
    csv = make_csv("\n".join(rows) + "\n", "two_positives.csv")
    job = tiny_job(tmp_path, csv, **{"split.seed": 3})
    with pytest.raises(DataError, match="no task with both classes"):
        run_job(job, progress=False)
    assert not ray.is_initialized()


def test_a_file_of_unparsable_smiles_only_is_refused_before_split_and_ray(
    tmp_path: Path, make_csv, no_ray: None
) -> None:
    """Issue 25 item 9a: this was `ValueError: cannot split an empty dataset` after
    featurizing. Every row's reason is in the job's invalid-SMILES report."""
    csv = make_csv('smiles,toxic\nxx,1\nyy,0\n"",1\n', "unparsable.csv")
    job = tiny_job(tmp_path, csv)
    report = tmp_path / "results" / "tiny" / "invalid_smiles.csv"
    with pytest.raises(DataError) as err:
        run_job(job, progress=False)
    assert str(err.value) == (
        f"{csv}: none of its 3 SMILES could be parsed, so there is nothing to train on (line 2 "
        "'xx': SMILES Parse Error: syntax error while parsing: xx; line 3 'yy': SMILES Parse "
        f"Error: syntax error while parsing: yy; line 4 '': empty SMILES); all 3 are listed in "
        f"{report}"
    )
    assert not ray.is_initialized()
    assert [row.split(",")[0] for row in report.read_text().splitlines()] == ["line", "2", "3", "4"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"resources.cpus_per_trial": 3, "ray.num_cpus": 2}, "has 2 CPUs"),
        ({"resources.gpus_per_trial": 0.5, "ray.num_gpus": 0}, "--num-gpus N"),
    ],
)
def test_impossible_local_requests_are_refused_before_ray_starts(
    tmp_path: Path, small_csv: Path, no_ray: None, overrides: dict[str, object], named: str
) -> None:
    """These used to leave every trial PENDING for ever."""
    job = tiny_job(tmp_path, small_csv, **overrides)
    with pytest.raises(ConfigError, match=named):
        run_job(job, progress=False)
    assert not ray.is_initialized()
    assert not (tmp_path / "results" / "tiny").exists()  # refused before any work


def test_an_unreachable_cluster_address_is_refused_at_once(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    """`--address 127.0.0.1:1` used to leave ray.init retrying for minutes."""
    import time

    from tune.errors import ClusterError

    job = tiny_job(tmp_path, small_csv, **{"ray.address": "127.0.0.1:1", "ray.num_cpus": None})
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"127\.0\.0\.1:1: no Ray cluster answers"):
        run_job(job, progress=False)
    assert time.monotonic() - started < 30
    assert not ray.is_initialized()


# ------------------------------------------------------------ repeated molecules in a job


def _repeats_csv(make_csv) -> Path:
    """60 molecules, many written two or three ways (atom order, a sodium salt), one invalid
    row; task `toxic` follows the molecule, `noisy` conflicts within some molecules."""
    from rdkit import Chem

    heads = ["C" * k for k in range(1, 11)] + ["c1ccccc1", "C1CCCCC1"]
    tails = ["O", "N", "Cl", "C(=O)O", "S"]
    rows = ["smiles,toxic,noisy"]
    for i, smi in enumerate(h + t for h in heads for t in tails):
        toxic = int("N" in smi or "Cl" in smi)
        mol = Chem.MolFromSmiles(smi)
        forms = [smi, Chem.MolToSmiles(mol, doRandom=True, canonical=False)][: 1 + i % 2]
        if i % 5 == 3:
            forms.append(smi.replace("C(=O)O", "C(=O)[O-].[Na+]"))
        for j, form in enumerate(forms):
            rows.append(f"{form},{toxic},{(i + j) % 2}")
    rows.insert(5, "not_a_smiles(,1,0")
    return make_csv("\n".join(rows) + "\n", "repeats.csv")


@pytest.mark.parametrize("policy", ["keep", "average", "drop"])
def test_prepared_split_never_shares_a_molecule_and_reports_merges(
    tmp_path: Path, make_csv, policy: str
) -> None:
    import csv

    from toxmodel.featurize import FeaturizerConfig, canonical_smiles
    from tune.prepare import (
        DUPLICATES_REPORT,
        INVALID_REPORT,
        claim_job,
        load_job_table,
        prepare_data,
    )

    path = _repeats_csv(make_csv)
    job = tiny_job(
        tmp_path,
        path,
        **{"data.duplicates": policy, "featurizer.standardize": True, "split.seed": 1},
    )
    (tmp_path / "results").mkdir()
    table = load_job_table(job)
    claim_job(job, table)
    data = prepare_data(job, progress=False, table=table)
    keys = canonical_smiles(data.table.smiles, FeaturizerConfig(standardize=True))
    part_of: dict[str, set[str]] = {}
    for name in ("train", "valid", "test"):
        for row in data.features.valid_rows[getattr(data.split, name)]:
            part_of.setdefault(keys[row], set()).add(name)
    assert all(len(parts) == 1 for parts in part_of.values())
    n_molecules = len(part_of)
    assert n_molecules < len(table) - 1  # the file really repeats molecules
    folder = tmp_path / "results" / "tiny"
    invalid = list(csv.DictReader((folder / INVALID_REPORT).open()))
    assert [(r["line"], r["smiles"]) for r in invalid] == [("6", "not_a_smiles(")]
    report = folder / DUPLICATES_REPORT
    if policy == "keep":
        assert len(data.table) == len(table) and not report.exists()
        return
    assert len(data.table) == n_molecules + 1  # one row per molecule, plus the invalid row
    merged = list(csv.DictReader(report.open()))
    assert len(merged) == len(table) - len(data.table)  # every folded row is listed
    lines = {int(r["line"]) for r in merged} | {int(x) for x in data.table.lines}
    assert lines == {int(x) for x in table.lines}  # no input line lost without a trace
    noisy = data.table.tasks.index("noisy")
    conflicted = np.isnan(data.table.labels[:, noisy]).sum()
    assert conflicted > 0 and not np.isnan(data.table.labels[:, 0]).any()


def test_resume_with_another_duplicates_policy_is_refused(tmp_path: Path, make_csv) -> None:
    from tune.config import dump_config
    from tune.errors import JobMismatchError
    from tune.flags import CONFIG_FILE
    from tune.prepare import claim_job, load_job_table

    path = _repeats_csv(make_csv)
    (tmp_path / "results").mkdir()
    job = tiny_job(tmp_path, path, **{"data.duplicates": "keep"})
    claim_job(job, load_job_table(job))
    job.storage.write_text(job.name, CONFIG_FILE, text=dump_config(job))  # the job now exists
    claim_job(job, load_job_table(job))  # same settings: continues
    other = tiny_job(tmp_path, path, **{"data.duplicates": "average"})
    with pytest.raises(JobMismatchError, match=r"data\.duplicates \('keep' saved, 'average'"):
        claim_job(other, load_job_table(other))


def test_a_new_job_whose_name_already_has_a_study_in_a_shared_database_is_refused(
    tmp_path: Path, make_csv
) -> None:
    """Two machines sharing one study database but not a results folder: a new job named like
    another's study would continue that job's trials as its own."""
    import optuna

    from tune.errors import JobMismatchError
    from tune.prepare import claim_job, load_job_table

    shared = f"sqlite:///{tmp_path / 'team-optuna.db'}"
    other = optuna.create_study(study_name="tiny", storage=shared)
    other.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    job = tiny_job(tmp_path, _repeats_csv(make_csv), **{"tracking.study_storage": shared})
    said = r"job 'tiny' is new in .* but the study database .* study of that name with 3 trials"
    with pytest.raises(JobMismatchError, match=said):
        claim_job(job, load_job_table(job))
    assert not job.storage.exists(job.name)  # nothing of the job written
    mine = tiny_job(tmp_path, _repeats_csv(make_csv), **{"tracking.run_name": "mine"})
    claim_job(mine, load_job_table(mine))  # another name (or an empty study) is fine


def test_toxtune_data_prints_repeated_molecules(
    tmp_path: Path, make_csv, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tune.cli import main

    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "cache"))
    path = make_csv("smiles,A\nCCO,1\nOCC,0\nCCO.[Na+],1\nCO,0\nOC,0\nc1ccccc1,1\n", "d.csv")
    assert main(["data", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rows sharing a molecule with another row: 4 (2 molecules" in out
    assert "molecules with conflicting labels: 1" in out
    assert main(["data", "--data", str(path), "--standardize"]) == 0
    out = capsys.readouterr().out
    assert "rows sharing a molecule with another row: 5 (2 molecules" in out
    assert "by standardized canonical SMILES" in out


def test_conflicting_repeats_are_not_said_to_be_kept_when_the_policy_merges_them(
    tmp_path: Path, make_csv, caplog: pytest.LogCaptureFixture
) -> None:
    from tune.prepare import load_job_table

    path = make_csv("smiles,toxic\nCCO,1\nCCO,0\nCCN,1\nCCC,0\n", "conflicts.csv")
    job = tiny_job(tmp_path, path, **{"data.duplicates": "average"})
    with caplog.at_level("WARNING"):
        table = load_job_table(job)
    assert table.conflicts == ["CCO"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "conflicting labels" in said and "CCO" in said
    assert "all rows kept" not in said


def test_trees_that_would_not_fit_the_drivers_memory_are_refused_before_the_search(
    tmp_path: Path, small_csv: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trees are trained in finalize, after every trial: a driver without the memory for
    them must hear so before the search, not be killed after it."""
    import psutil

    tight = psutil.virtual_memory()._replace(available=2**16)  # 64 KiB free
    monkeypatch.setattr(psutil, "virtual_memory", lambda: tight)
    job = tiny_job(tmp_path, small_csv, search__folds=3, search__trees=True)
    named = r"needs about [\d.]+ MiB .* x 256 input columns .* 0.1 MiB available"
    with pytest.raises(ConfigError, match=named):
        run_job(job, progress=False)
    assert not ray.is_initialized()


def test_the_trees_memory_check_reads_the_largest_fold() -> None:
    rows = np.arange(100)
    folds = make_folds(rows, 3, method="random", seed=0)
    train, valid = max((s.train.size, s.valid.size) for s in folds.splits)
    assert train == 67  # 100 rows in folds of 34, 33, 33: the largest training part
    need = fit_bytes(train, valid, 500)
    check_trees_memory(folds, 500, available=need)
    with pytest.raises(ConfigError, match="67 training and 33 validation rows x 500 input"):
        check_trees_memory(folds, 500, available=need - 1)
