"""Job names and data fingerprints: what keeps two jobs from sharing one record."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from toxmodel.featurize import MOLECULE_KEY
from tune.config import load_config, named
from tune.errors import ConfigError, JobMismatchError
from tune.identity import (
    FINGERPRINT_FILE,
    Fingerprint,
    check_continuation,
    check_name,
    default_model_name,
    new_name,
    read_fingerprint,
    write_fingerprint,
)
from tune.storage import Storage

NOON = dt.datetime(2026, 11, 26, 12, 0, 5, tzinfo=dt.timezone.utc)


def test_default_names_are_timestamped_and_never_reuse_a_taken_one() -> None:
    taken = {"toxtune-20261126-120005", "toxtune-20261126-120005-2"}
    assert new_name("toxtune", now=NOON) == "toxtune-20261126-120005"
    assert new_name("toxtune", taken.__contains__, now=NOON) == "toxtune-20261126-120005-3"


def test_two_unnamed_jobs_get_different_names(tmp_path: Path) -> None:
    job = load_config(overrides={"ray.storage_path": str(tmp_path)})
    first = named(job)
    (tmp_path / first.name).mkdir()
    second = named(job, exists=lambda n: (tmp_path / n).exists())
    assert first.name != second.name
    assert first.name.startswith("toxtune-") and second.name.startswith("toxtune-")
    assert named(first).name == first.name  # a named job keeps its name


@pytest.mark.parametrize("bad", ["../escaped", "a/b", "..", ".hidden", "", "x" * 201, "a b"])
def test_unsafe_job_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a valid job name"):
        check_name(bad)
    with pytest.raises(ConfigError, match="run_name"):
        load_config(overrides={"tracking.run_name": bad})


@pytest.mark.parametrize(
    ("source", "model"),
    [
        ("default", "toxtune-tox21"),
        ("data/clintox_upper.csv", "toxtune-clintox_upper"),
        ("/x/sider.csv.gz", "toxtune-sider"),
        ("https://host/path/toxcast_data.csv.gz?x=1", "toxtune-toxcast_data"),
        ("odd name!.csv", "toxtune-odd-name"),
    ],
)
def test_registered_model_name_follows_the_data_unless_set(source: str, model: str) -> None:
    assert default_model_name(source) == model
    assert load_config(overrides={"data.source": source}).model_name == model
    job = load_config(overrides={"data.source": source, "tracking.registered_model_name": "mine"})
    assert job.model_name == "mine"


def _fp(**changes: object) -> Fingerprint:
    base: dict[str, object] = {
        "content_hash": "a" * 64,
        "tasks": ["t1", "t2"],
        "featurizer": {"n_bits": 1024, "radius": 2},
        "split": {"method": "random", "seed": 0, "folds": 1},
        "data": {"duplicates": "keep", "molecule_key": MOLECULE_KEY},
    }
    base.update(changes)
    return Fingerprint(**base)  # type: ignore[arg-type]


def test_fingerprint_round_trips_and_same_data_continues(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path))
    write_fingerprint(storage, "job", _fp())
    saved = read_fingerprint(storage, "job")
    assert saved == _fp()
    check_continuation("job", saved, _fp())  # nothing differs: no error
    assert read_fingerprint(storage, "none") is None


@pytest.mark.parametrize(
    ("change", "named_in_error"),
    [
        ({"content_hash": "b" * 64}, "data content"),
        ({"tasks": ["t1"]}, "targets"),
        ({"featurizer": {"n_bits": 2048, "radius": 2}}, "featurizer.n_bits"),
        ({"split": {"method": "scaffold", "seed": 0, "folds": 1}}, "split.method"),
        ({"split": {"method": "random", "seed": 0, "folds": 5}}, r"split.folds \(1 saved, 5 now\)"),
        (
            {"data": {"duplicates": "average", "molecule_key": MOLECULE_KEY}},
            r"data.duplicates \('keep' saved, 'average' now\)",
        ),
    ],
)
def test_continuation_on_changed_data_or_settings_is_refused_naming_what(
    change: dict[str, object], named_in_error: str
) -> None:
    with pytest.raises(JobMismatchError, match=named_in_error):
        check_continuation("job1", _fp(), _fp(**change))


def test_a_fingerprint_saved_before_the_duplicates_policy_means_keep(tmp_path: Path) -> None:
    import json

    storage = Storage.open(str(tmp_path))
    old = {k: v for k, v in dataclasses.asdict(_fp()).items() if k != "data"}
    storage.write_text("old", FINGERPRINT_FILE, text=json.dumps(old))
    saved = read_fingerprint(storage, "old")
    assert saved is not None and saved.data["duplicates"] == "keep"
    with pytest.raises(JobMismatchError, match=r"data\.duplicates") as refused:
        check_continuation("old", saved, _fp(data={"duplicates": "drop"}))
    assert "data.molecule_key" in str(refused.value)  # and its keys had stereo (below)


def test_a_job_keyed_with_stereo_is_not_continued_under_stereo_blind_keys(
    tmp_path: Path,
) -> None:
    """Jobs saved before the molecule key dropped stereo grouped stereoisomers apart: their
    split would change under today's keys, so continuing one is refused, by name."""
    import json

    storage = Storage.open(str(tmp_path))
    before = dataclasses.asdict(_fp(data={"duplicates": "keep"}))  # no molecule_key recorded
    storage.write_text("before", FINGERPRINT_FILE, text=json.dumps(before))
    saved = read_fingerprint(storage, "before")
    assert saved is not None
    with pytest.raises(JobMismatchError) as refused:
        check_continuation("before", saved, _fp())
    assert (
        "data.molecule_key ('canonical SMILES with stereo' saved, "
        "'canonical SMILES without stereo' now)"
    ) in str(refused.value)


def test_a_fingerprint_saved_before_folds_existed_continues_as_one_fold(tmp_path: Path) -> None:
    """Jobs saved before `search.folds` scored trials on one validation split: they continue
    with folds 1 and are refused with folds 5 (trials scored two ways in one study)."""
    import json

    storage = Storage.open(str(tmp_path))
    before = dataclasses.asdict(_fp(split={"method": "random", "seed": 0}))
    storage.write_text("before", FINGERPRINT_FILE, text=json.dumps(before))
    saved = read_fingerprint(storage, "before")
    check_continuation("before", saved, _fp())
    with pytest.raises(JobMismatchError, match=r"split\.folds \(1 saved, 5 now\)"):
        check_continuation("before", saved, _fp(split={"method": "random", "seed": 0, "folds": 5}))
