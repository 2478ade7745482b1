"""The job's study across drivers: a resumed sampler never replays the first driver's draws, and
a job whose study or MLflow record has vanished is refused instead of silently starting over."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.team_stack import postgres_available, postgres_server
from tests.tune.conftest import tiny_job
from tune import study
from tune.config import JobConfig
from tune.errors import JobMismatchError
from tune.job import run_job
from tune.space import build_space
from tune.tracking import client_for


def propose(job: JobConfig, n: int, first_run: bool, tag: str) -> list[float]:
    """The learning rates of `n` trials a fresh searcher over the job's study proposes (each
    told a score before the next is asked, as one trial at a time)."""
    searcher, _ = study.make_searcher(job, build_space(job.search.space), first_run)
    rates = []
    for i in range(n):
        params = searcher.suggest(f"{tag}{i}")
        assert params is not None
        searcher.on_trial_complete(f"{tag}{i}", {study.METRIC: 0.5 + 0.01 * i})
        rates.append(params["lr"])
    return rates


@pytest.mark.parametrize("searcher", ["optuna", "random"])
def test_a_resumed_study_never_replays_the_first_drivers_proposals(
    tmp_path: Path, searcher: str
) -> None:
    """lr is continuous: an equal value means the sampler replayed a draw. The first of 3
    trials is still within TPE's 5 random start-up trials, where a replay would show."""

    def job_in(folder: Path) -> JobConfig:
        (folder / "results").mkdir(parents=True)
        return tiny_job(
            folder,
            folder / "unused.csv",
            search__searcher=searcher,
            search__evaluate_default=False,
        )

    job = job_in(tmp_path / "job")
    first = propose(job, 3, first_run=True, tag="a")
    resumed = propose(job, 3, first_run=False, tag="b")
    assert not set(resumed) & set(first), (first, resumed)
    assert len(optuna.load_study(study_name=job.name, storage=job.study_storage).trials) == 6
    # A new job with the same seed still chooses the same trials (reproducible searches).
    assert propose(job_in(tmp_path / "again"), 3, first_run=True, tag="c") == first


def test_stores_are_only_checked_once_the_job_has_searched(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    job = tiny_job(tmp_path, tmp_path / "unused.csv")
    study.check_job_stores(job, started=False)  # a new job: nothing to find yet
    assert not (tmp_path / "results" / "optuna.db").exists()
    assert not (tmp_path / "results" / "mlflow.db").exists()

    optuna.create_study(study_name="another-job", storage=job.study_storage)
    client_for(job.tracking_uri).create_experiment(job.tracking.experiment_name)
    with pytest.raises(JobMismatchError) as refused:
        study.check_job_stores(job, started=True)
    message = str(refused.value)
    assert f"Optuna study 'tiny' is not in {job.study_storage}" in message
    assert "MLflow parent run (tag toxtune.job=tiny) is not in experiment 'tiny-exp'" in message

    assert (
        study.shown("postgresql://me:pw@db:5432/optuna?password=x") == "postgresql://db:5432/optuna"
    )


def mlflow_state(uri: str) -> list[tuple[str, str, dict[str, str]]]:
    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, max_results=1000)
    return sorted((r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs)


def trials_of(job: JobConfig) -> list[tuple[int, str]]:
    found = optuna.load_study(study_name=job.name, storage=job.study_storage)
    return [(t.number, t.state.name) for t in found.trials]


@pytest.mark.slow
def test_a_job_whose_study_or_mlflow_database_vanished_is_refused(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    """One tiny job, copied: its mlflow.db deleted in the copy, its optuna.db in the original
    (a copied mlflow.db is refused for another reason: its artifacts live in the original).
    Growing either is refused before anything is written: no store is recreated, no run or
    trial is added."""
    first = tmp_path / "first"
    run_job(tiny_job(first, small_csv, search__num_samples=2), progress=False)
    copy = tmp_path / "copy"
    shutil.copytree(first, copy, symlinks=True)

    # The MLflow store is gone: a new one would hold a second, partial parent run.
    grown = tiny_job(copy, small_csv, search__num_samples=3)
    db = copy / "results" / "mlflow.db"
    db.unlink()
    trials = trials_of(grown)
    with pytest.raises(JobMismatchError, match=f"MLflow database {db} is missing"):
        run_job(grown, progress=False)
    assert not db.exists()
    assert trials_of(grown) == trials

    # The study is gone: a fresh one would re-propose the trials already run.
    grown = tiny_job(first, small_csv, search__num_samples=3)
    db = first / "results" / "optuna.db"
    db.unlink()
    before = mlflow_state(grown.tracking_uri)
    with pytest.raises(JobMismatchError, match=f"Optuna study database {db} is missing"):
        run_job(grown, progress=False)
    assert not db.exists()
    assert mlflow_state(grown.tracking_uri) == before


def _losing_the_create_race(real: type, error: Exception, times: int) -> type:
    """RDBStorage that fails its first `times` opens with `error`, as a process does when
    another one creates the same new database's tables between Optuna's check and CREATE."""

    class Racing(real):  # type: ignore[misc, valid-type]
        calls = 0

        def __init__(self, url: str, **kwargs: object) -> None:
            Racing.calls += 1
            if Racing.calls <= times:
                raise error
            super().__init__(url, **kwargs)

    return Racing


def test_a_database_created_by_another_process_at_the_same_moment_is_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seen in CI: a job died with "table study_directions already exists" because another
    process opened its new optuna.db at the same instant (6 processes at once failed 15 of 36
    opens before the retry, 0 after)."""
    import sqlite3

    from sqlalchemy.exc import IntegrityError, OperationalError

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    real = optuna.storages.RDBStorage
    for error in (
        OperationalError(
            "CREATE TABLE studies", {}, sqlite3.OperationalError("table studies already exists")
        ),
        IntegrityError(
            "INSERT",
            {},
            sqlite3.IntegrityError("UNIQUE constraint failed: alembic_version.version_num"),
        ),
    ):
        monkeypatch.setattr(optuna.storages, "RDBStorage", _losing_the_create_race(real, error, 2))
        optuna.create_study(study_name="s", storage=study.rdb(url), load_if_exists=True)
    assert optuna.load_study(study_name="s", storage=url).study_name == "s"

    # Any other database error is the user's to see, at once.
    broken = OperationalError("SELECT", {}, sqlite3.OperationalError("disk I/O error"))
    monkeypatch.setattr(optuna.storages, "RDBStorage", _losing_the_create_race(real, broken, 1))
    with pytest.raises(OperationalError, match="disk I/O error"):
        study.rdb(url)


def _fresh_searcher(
    tmp_path: Path, small_csv: Path
) -> tuple[JobConfig, study.StudySearch, optuna.Study]:
    """A tiny job's searcher over a new SQLite study, told the metric, as Tune sets it up."""
    job = tiny_job(tmp_path, small_csv, **{"search.evaluate_default": False})
    db = study.sqlite_file(job.study_storage)
    assert db is not None
    db.parent.mkdir(parents=True, exist_ok=True)
    searcher, found = study.make_searcher(job, build_space(job.search.space), first_run=True)
    searcher.set_search_properties(study.METRIC, study.MODE, config={})
    return job, searcher, found


def test_results_are_told_without_reading_the_whole_study(
    tmp_path: Path, small_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each epoch's result attaches to its Optuna trial by one trial's row: reading every trial
    with its intermediate values per result cost the driver 57 ms a result at 64 trials in
    flight and grew with the epochs. Values queued meanwhile are written in one transaction,
    and a snapshot of the searcher waits for them. A trial the study finished behind a restored
    driver's back is still not told (that check is made once, from its own row)."""
    job, searcher, found = _fresh_searcher(tmp_path, small_csv)
    ids = [f"t{i}" for i in range(4)]
    for trial_id in ids:
        assert searcher.suggest(trial_id) is not None
    storage = searcher._ot_study._storage
    reads: list[int] = []
    real = storage.get_all_trials
    monkeypatch.setattr(storage, "get_all_trials", lambda *a, **k: reads.append(1) or real(*a, **k))
    with searcher._reports._cond:  # the writer thread is busy: the 80 values queue up
        for epoch in range(1, 21):
            for trial_id in ids:
                result = {study.METRIC: 0.5 + epoch / 100, "training_iteration": epoch}
                searcher.on_trial_result(trial_id, result)
    assert reads == []
    monkeypatch.undo()  # a patched storage would not pickle
    searcher.save(str(tmp_path / "searcher.pkl"))  # as Tune's snapshot: after the writes
    assert searcher._reports.batches == 1  # queued values go in one transaction
    for trial in found.get_trials(deepcopy=False):
        assert trial.intermediate_values == {e: 0.5 + e / 100 for e in range(1, 21)}

    # A driver restored from an older snapshot: the study finished t0 meanwhile.
    restored = study.make_searcher(job, build_space(job.search.space), first_run=False)[0]
    restored.__setstate__(searcher.__getstate__())
    found.tell(searcher._ot_trials["t0"], 0.7)
    restored.on_trial_result("t0", {study.METRIC: 0.9, "training_iteration": 21})
    restored.on_trial_result("t1", {study.METRIC: 0.9, "training_iteration": 21})
    restored._reports.wait()
    values = {t.user_attrs["ray_trial_id"]: t.intermediate_values for t in found.get_trials()}
    assert 21 not in values["t0"] and values["t1"][21] == 0.9


def test_the_epoch_a_trial_ends_on_is_in_the_study_as_mlflow_has_it(
    tmp_path: Path, small_csv: Path
) -> None:
    """Tune hands a trial's last result (its final epoch, or the one ASHA stopped it at) to the
    searcher's `on_trial_complete` only, not to `on_trial_result`: the study must still hold it
    as an intermediate value, as the trial's MLflow run does, besides the value told. A failed
    trial's last result is not reported, and the trial is failed in the study."""
    _, searcher, found = _fresh_searcher(tmp_path, small_csv)
    for trial_id in ("done", "failed"):
        assert searcher.suggest(trial_id) is not None
        for epoch in (1, 2, 3):
            result = {study.METRIC: 0.5 + epoch / 100, "training_iteration": epoch}
            searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete("done", {study.METRIC: 0.6, "training_iteration": 4})
    searcher.on_trial_complete("failed", {study.METRIC: 0.6, "training_iteration": 4}, error=True)
    trials = {t.user_attrs["ray_trial_id"]: t for t in found.get_trials()}
    assert trials["done"].intermediate_values == {1: 0.51, 2: 0.52, 3: 0.53, 4: 0.6}
    assert trials["done"].value == 0.6
    assert trials["failed"].intermediate_values == {1: 0.51, 2: 0.52, 3: 0.53}
    # a trial that errored is failed in the study, as in the trial table and MLflow (Ray's
    # OptunaSearch told it COMPLETE with its last value, which the history plot then drew)
    assert trials["done"].state == optuna.trial.TrialState.COMPLETE
    assert trials["failed"].state == optuna.trial.TrialState.FAIL
    assert trials["failed"].value is None


def test_the_study_is_counted_and_its_orphans_failed_without_reading_its_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """How many trials the study holds, how many are still due, the sampler's seed and the
    orphans a killed driver left RUNNING are found without reading the finished trials: each
    read every trial with its intermediate values (Optuna's `Study.trials` and `get_trials`
    read all, whatever `states`), so a resume grew with the epochs per trial
    (benchmarks/RESULTS.md, "Resume at scale")."""
    from optuna.distributions import FloatDistribution

    from tune.bridge import RAY_TRIAL_ATTR

    (tmp_path / "results").mkdir()
    job = tiny_job(tmp_path, tmp_path / "unused.csv", search__num_samples=40)
    found = optuna.create_study(
        storage=study.rdb(job.study_storage), study_name=job.name, direction="maximize"
    )
    lr = {"lr": FloatDistribution(1e-4, 1e-2, log=True)}
    ended = [optuna.trial.TrialState.COMPLETE] * 20 + [optuna.trial.TrialState.FAIL] * 5
    found.add_trials(
        optuna.trial.create_trial(
            state=state,
            params={"lr": 1e-3},
            distributions=lr,
            value=0.5 if state == optuna.trial.TrialState.COMPLETE else None,
            intermediate_values={epoch: 0.5 for epoch in range(1, 31)},
            user_attrs={RAY_TRIAL_ATTR: f"ended{i}"},
        )
        for i, state in enumerate(ended)
    )
    for i in range(3):  # in flight when the driver was killed
        live = found.ask()
        live.set_user_attr(RAY_TRIAL_ATTR, f"live{i}")
        live.report(0.5, 1)

    read: list[str] = []  # the Ray id of each trial read from the database
    build = optuna.storages.RDBStorage._build_frozen_trial_from_trial_model

    def reading(self: optuna.storages.RDBStorage, model: object) -> optuna.trial.FrozenTrial:
        frozen = build(self, model)
        read.append(frozen.user_attrs.get(RAY_TRIAL_ATTR, ""))
        return frozen

    def ended_read() -> int:  # the live trials (and those told to fail) may be read
        return sum(not ray_id.startswith("live") for ray_id in read)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_build_frozen_trial_from_trial_model", reading)
    assert study.count_trials(job) == 28
    assert ended_read() == 0
    assert study.remaining(job) == 40 - 25  # a RUNNING trial is still due
    assert ended_read() == 0
    seeded: list[int] = []
    real_sampler = study.make_sampler
    monkeypatch.setattr(study, "make_sampler", lambda s, n: seeded.append(n) or real_sampler(s, n))
    searcher, _ = study.make_searcher(job, build_space(job.search.space), first_run=False)
    assert seeded == [28] and ended_read() == 0
    # Tune restores the searcher it saved: a fresh sampler for the study as it stands
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.restore(str(tmp_path / "searcher.pkl"))
    assert seeded == [28, 28] and ended_read() == 0
    assert study.fail_stale_trials(job, keep={"live0"}) == 2
    assert ended_read() == 0
    monkeypatch.undo()
    # a searcher an earlier toxtune pickled holds a resampler that takes the count: still restored
    searcher._resampler = functools.partial(study.make_sampler, job.search)
    searcher.save(str(tmp_path / "older.pkl"))
    searcher.restore(str(tmp_path / "older.pkl"))
    assert isinstance(searcher._sampler, optuna.samplers.TPESampler)

    states = {t.user_attrs[RAY_TRIAL_ATTR]: t.state for t in found.get_trials()}
    assert [states[f"live{i}"].name for i in range(3)] == ["RUNNING", "FAIL", "FAIL"]
    assert study.remaining(job) == 40 - 27
    assert study.count_trials(job) == 28


@pytest.mark.slow
@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server binaries not installed")
def test_a_drivers_pooled_study_waits_through_a_server_restart_and_holds_few_connections() -> None:
    """The searcher's study storage keeps its connections (a fresh one per Optuna call cost a
    proposal and a tell 5 ms a call), at most POOL_SIZE open from two threads at once, and a
    pooled connection that a server restart cut is replaced by one that waits for the server
    back: the next ask succeeds once it is, instead of failing the job. The search's end
    closes the kept connections."""
    import threading
    import time

    with postgres_server() as pg:
        url = pg.create_database("study")
        storage = study.rdb(url, pooled=True)
        found = optuna.create_study(storage=storage, study_name="s", direction="maximize")

        def connections() -> int:
            return pg.connections("study")

        def asks(n: int) -> None:
            for _ in range(n):
                found.tell(found.ask(), 0.5)

        workers = [threading.Thread(target=asks, args=(10,)) for _ in range(2)]
        for w in workers:
            w.start()
        seen = []
        while any(w.is_alive() for w in workers):
            seen.append(connections())
            time.sleep(0.01)
        for w in workers:
            w.join()
        assert 1 <= max(seen) <= study.POOL_SIZE, seen
        assert 1 <= connections() <= 2  # kept open for the next call, no more

        pg.stop()  # the pooled connections are cut
        restarted = threading.Timer(3.0, pg.start)
        restarted.start()
        started = time.monotonic()
        try:
            trial = found.ask()
        finally:
            restarted.join()
        assert time.monotonic() - started >= 2.5  # it waited for the server
        found.tell(trial, 0.7)
        reread = optuna.load_study(study_name="s", storage=study.rdb(url))
        assert len(reread.trials) == 21 and reread.best_value == 0.7
        # the search's end closes what the searcher kept, though the storage lives on
        study.release_connections()
        assert connections() == 0
