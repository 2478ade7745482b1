"""The alias moves only to a strictly better model whose validation score is comparable (issue 25
items 2 and 11): other tasks, split fractions or duplicates policy, an older holder without the
tags, or a tie keep it where it is; two jobs registering at the same moment end with the alias on
the better one. Real SQLite registry, tags as `tune.record` builds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tests.tune.conftest import tiny_fit
from toxmodel.sources import TOX21_TASKS
from tune.config import JobConfig, load_config
from tune.record import comparison_tags
from tune.tracking import Registration, register_best_model, registry, start_job_run
from tune.tracking.registry import COMPARABLE_TAGS

DATA_HASH = "f" * 64  # one data file for every job below


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_fit().save(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _job(**overrides: object) -> JobConfig:
    return load_config(overrides={k.replace("__", "."): v for k, v in overrides.items()})


def _register(
    uri: str,
    checkpoint: Path,
    score: str,
    job: JobConfig | None = None,
    tasks: list[str] = TOX21_TASKS,
    tags: dict[str, str] | None = None,
    alias: str = "champion",
) -> Registration:
    """Register `checkpoint` as record() does, with validation ROC-AUC `score`."""
    parent = start_job_run(uri, "exp", f"job-{score}-{len(tasks)}-{alias}", {}, resume=False)
    if tags is None:
        tags = comparison_tags(job or _job(), tasks, DATA_HASH)
    return register_best_model(
        uri, parent, checkpoint, "tox", alias=alias, tags={**tags, "val_roc_auc": score}
    )


def _register_plainly(uri: str, checkpoint: Path, score: str) -> Registration:
    """`_register` with the registry's own client (another job's registration)."""
    patched, registry.client_for = registry.client_for, MlflowClient
    try:
        return _register(uri, checkpoint, score)
    finally:
        registry.client_for = patched


def _champion(uri: str) -> str:
    return str(MlflowClient(uri).get_model_version_by_alias("tox", "champion").version)


def test_other_tasks_on_the_same_data_never_take_the_alias(sqlite_uri: str, checkpoint: Path):
    """`--targets SR-MMP NR-ER-LBD` on the 12-task file: a higher score, not comparable."""
    assert _register(sqlite_uri, checkpoint, "0.700000").alias_moved
    other = _register(sqlite_uri, checkpoint, "0.950000", tasks=["SR-MMP", "NR-ER-LBD"])
    assert (other.version, other.alias_moved) == ("2", False)
    assert _champion(sqlite_uri) == "1"
    assert "stays on version 1" in other.note and "not comparable" in other.note
    assert "tasks: 12 tasks (" in other.note and "2 tasks" in other.note
    assert "data_hash" not in other.note and "split" not in other.note  # only what differs
    tags = MlflowClient(sqlite_uri).get_model_version("tox", "2").tags
    assert tags["toxtune.alias_note"] == other.note


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"split__train": 0.7, "split__valid": 0.2}, "split_fractions"),
        ({"data__duplicates": "average"}, "duplicates"),
        # a k-fold job's score is a mean over every non-test row's folds, not the split's rows
        ({"search__folds": 5, "search__ensemble": 1}, "validation"),
    ],
)
def test_other_split_fractions_or_duplicates_policy_never_take_the_alias(
    sqlite_uri: str, checkpoint: Path, overrides: dict[str, object], key: str
):
    _register(sqlite_uri, checkpoint, "0.700000")
    other = _register(sqlite_uri, checkpoint, "0.950000", job=_job(**overrides))
    assert (other.version, other.alias_moved) == ("2", False)
    assert _champion(sqlite_uri) == "1"
    assert f"{key}: " in other.note and "not comparable" in other.note


def test_a_holder_without_the_new_tags_keeps_the_alias(sqlite_uri: str, checkpoint: Path):
    """A version registered by an older toxtune (only data_hash and split) may hold other tasks:
    its score is not known to be comparable, so it is not displaced automatically."""
    _register(
        sqlite_uri, checkpoint, "0.700000", tags={"data_hash": DATA_HASH, "split": "random:0"}
    )
    new = _register(sqlite_uri, checkpoint, "0.950000")
    assert (new.version, new.alias_moved) == ("2", False)
    assert _champion(sqlite_uri) == "1"
    assert new.note.endswith(
        "(version 1, from an older toxtune, has no tasks, split_fractions, duplicates, "
        "molecule_key, validation tag); move it by hand if this model should serve"
    )


def test_a_tie_keeps_the_alias_and_a_strictly_better_score_moves_it(
    sqlite_uri: str, checkpoint: Path
):
    _register(sqlite_uri, checkpoint, "0.700000")
    tie = _register(sqlite_uri, checkpoint, "0.700000", job=_job(featurizer__n_bits=256))
    assert (tie.version, tie.alias_moved) == ("2", False)
    assert _champion(sqlite_uri) == "1"
    assert "stays on version 1" in tie.note and "ties" in tie.note
    better = _register(sqlite_uri, checkpoint, "0.700001", job=_job(featurizer__n_bits=256))
    assert (better.version, better.alias_moved) == ("3", True)
    assert _champion(sqlite_uri) == "3"
    assert (
        better.note == "@champion moved to version 3 (val ROC-AUC 0.700001 > 0.700000 of version 1)"
    )


class _Concurrent:
    """A registry client whose first alias move, by the job under test, meets another job's:
    `before` runs just before that move (and the move then fails as PostgreSQL's unique key
    refuses the second insert of one alias), `after` just after it."""

    def __init__(self, uri: str, before: Any = None, after: Any = None) -> None:
        self.client, self.before, self.after = MlflowClient(uri), before, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        before, after, self.before, self.after = self.before, self.after, None, None
        if before is not None:
            before()
            raise MlflowException("duplicate key value violates unique constraint")
        self.client.set_registered_model_alias(name, alias, version)
        if after is not None:
            after()


@pytest.fixture
def concurrently(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install a `_Concurrent` client for the next registration (SETTLE_S shortened)."""
    monkeypatch.setattr(registry, "SETTLE_S", 0.01)

    def install(uri: str, **hooks: Any) -> None:
        monkeypatch.setattr(registry, "client_for", lambda _: _Concurrent(uri, **hooks))

    return install


def test_two_jobs_that_both_find_no_holder_end_with_the_alias_on_the_better(
    sqlite_uri: str, checkpoint: Path, concurrently: Any
):
    """Both found no holder; the other job (0.90) moved the alias first, so this job's move (0.80)
    is refused by the unique key: it decides again, against 0.90, and leaves it there."""
    other: list[Registration] = []
    concurrently(
        sqlite_uri,
        before=lambda: other.append(_register_plainly(sqlite_uri, checkpoint, "0.900000")),
    )
    mine = _register(sqlite_uri, checkpoint, "0.800000")
    assert other[0].alias_moved and not mine.alias_moved
    assert _champion(sqlite_uri) == other[0].version
    assert mine.note.endswith("beats this version's 0.8000") and other[0].version in mine.note


def test_an_alias_moved_by_a_worse_job_just_after_this_one_is_taken_back(
    sqlite_uri: str, checkpoint: Path, concurrently: Any
):
    """The other job (0.80) decided while there was no holder and moved the alias just after this
    job (0.90) did: this job looks again after SETTLE_S and takes it back."""
    worse = _register(sqlite_uri, checkpoint, "0.800000", alias="staging")  # no @champion yet
    client = MlflowClient(sqlite_uri)
    concurrently(
        sqlite_uri,
        after=lambda: client.set_registered_model_alias("tox", "champion", worse.version),
    )
    better = _register(sqlite_uri, checkpoint, "0.900000")
    assert better.alias_moved and _champion(sqlite_uri) == better.version
    assert better.note == (
        f"@champion moved to version {better.version} (val ROC-AUC 0.9000 > 0.8000 of version "
        f"{worse.version})"
    )


def test_comparison_tags_are_short_and_ignore_the_featurizer() -> None:
    tags = comparison_tags(_job(), [f"task-{i}" for i in range(617)], DATA_HASH)  # ToxCast
    assert set(tags) == set(COMPARABLE_TAGS)
    assert all(len(v) < 100 for v in tags.values())
    assert tags["tasks"].startswith("617:")
    assert tags["split"] == "random:0" and tags["split_fractions"] == "0.8/0.1/0.1"
    assert tags["validation"] == "split"
    assert comparison_tags(_job(search__folds=3, search__ensemble=1), [], DATA_HASH)[
        "validation"
    ] == ("3 folds")
    same = comparison_tags(_job(featurizer__n_bits=256, featurizer__maccs=True), [], DATA_HASH)
    assert same == comparison_tags(_job(), [], DATA_HASH)
    assert comparison_tags(_job(), ["a", "b"], DATA_HASH) != comparison_tags(
        _job(), ["b", "a"], DATA_HASH
    )
