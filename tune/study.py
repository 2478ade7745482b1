"""The job's Optuna study: sampler, persistent storage, and its bookkeeping across drivers.

The study lives in a database (`tracking.study_storage`, by default `optuna.db` beside the
results) under the job's name, so a killed driver resumes it and a larger `--num-samples` grows
it. Each study trial carries its Ray trial id (user attribute `ray_trial_id`).

The sampler is seeded from `search.seed` and the number of trials the study already holds
(`sampler_seed`): a new job is reproducible, and a resumed or grown one never replays an earlier
driver's draws. `check_job_stores` refuses to continue a job whose study or MLflow parent run
has vanished, before anything is written to either.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool, QueuePool

from tune.bridge import RAY_TRIAL_ATTR, StudySearch
from tune.config import JobConfig, SearchConfig
from tune.errors import JobMismatchError
from tune.space import Param, default_point, sample
from tune.tracking.backend import sqlite_path
from tune.tracking.names import JOB_TAG
from tune.tracking.runs import find_job_run
from tune.trainable import SCORE

log = logging.getLogger(__name__)

METRIC, MODE = SCORE, "max"
T = TypeVar("T")


class SpaceSampler:
    """Define-by-run space for Optuna; a class (not a lambda) so Ray can pickle the searcher."""

    def __init__(self, space: dict[str, Param]) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> None:
        sample(trial, self.space)


def rdb(url: str, pooled: bool = False) -> optuna.storages.RDBStorage:
    """Optuna's storage for `url`. A server database (PostgreSQL, MySQL) is reached without a
    connection pool: each call opens and closes its connection, so the many short looks a job
    and its commands take never pile up idle connections on a team's shared server (its
    `max_connections` is finite; pooled engines are only released at garbage collection).
    `pooled`: the one storage a driver keeps for the whole search (its searcher's) holds up to
    POOL_SIZE connections open instead, two of them idle at most: every Optuna call is a
    session, and a fresh connection for each cost a new trial's proposal and a trial's tell
    about 5 ms a session (RESULTS "A new trial's cost to the driver"). Once the server has
    answered, a connection it refuses (restarted, failing over) is retried for up to
    SERVER_PATIENCE_S (`WaitingNullPool`, `WaitingQueuePool`, which also replaces a pooled
    connection the restart cut) instead of failing the job.

    A database driver that is not installed is a ConfigError naming it and the extra that
    brings PostgreSQL's (`toxtune[team]`), not optuna's bare ImportError."""
    from tune.errors import ConfigError

    kwargs: dict[str, Any] = {}
    if not url.startswith("sqlite:"):
        engine: dict[str, Any] = {"poolclass": WaitingNullPool}
        if pooled:
            engine = {
                "poolclass": WaitingQueuePool,
                "pool_size": 2,  # kept open: the Tune loop's and the report thread's
                "max_overflow": POOL_SIZE - 2,
                "pool_pre_ping": True,
            }
        kwargs = {"engine_kwargs": engine}
    try:
        return _open_waiting(url, kwargs)
    except ImportError as exc:  # optuna re-raises SQLAlchemy's failed `import <driver>`
        cause = exc.__cause__ if isinstance(exc.__cause__, ImportError) else exc
        driver = cause.name or make_url(url).drivername
        fix = (
            "install the PostgreSQL drivers with: pip install 'toxtune[team]'"
            if make_url(url).get_backend_name() == "postgresql"
            else f"install the package that provides {driver!r} (toxtune[team] brings "
            "PostgreSQL's only)"
        )
        raise ConfigError(
            f"tracking.study_storage {shown(url)}: the database driver {driver!r} is not "
            f"installed; {fix}"
        ) from exc


SERVER_PATIENCE_S = 120.0  # how long a study access waits for a server that answered before
# Words of a refused or dropped connection (psycopg 2/3, PyMySQL): the server is down or
# restarting, not misconfigured.
_UNREACHABLE = (
    "connection refused",
    "could not connect",
    "can't connect",
    "server closed the connection",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "terminating connection",
    "connection timed out",
    "no such file or directory",  # its unix socket, while it restarts
)


POOL_SIZE = 4  # connections a driver's searcher storage holds at most (`rdb(pooled=True)`)


class _WaitsForServer:
    """A SQLAlchemy pool whose new connections wait through a server restart.

    Once a connection succeeded, a connection the server refuses (restarting, failing over) is
    retried with backoff for up to SERVER_PATIENCE_S: a team's PostgreSQL restarted mid-job
    stalls the job's study accesses (the Tune loop, the report thread) while it is down instead
    of ending the job with SQLAlchemy's OperationalError. An operation whose connection the
    restart cuts while it runs still fails. The pool makes every connection through its
    creator (SQLAlchemy 2's `Pool._invoke_creator`), a new one and one that replaces a pooled
    connection found dead by the pre-ping alike, so waiting there covers both. A plain
    module-level class: Tune pickles the storage with its searcher.
    """

    reached = False  # set on the instance by its first connection

    def __init__(self, creator: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(creator, *args, **kwargs)  # type: ignore[call-arg]
        connect = self._invoke_creator  # type: ignore[has-type]

        def waiting(record: Any) -> Any:
            connection = _waiting_for_server(
                lambda: connect(record), lambda: self.reached, Exception, "the study database"
            )
            self.reached = True
            return connection

        self._invoke_creator = waiting


class WaitingNullPool(_WaitsForServer, NullPool):
    """A NullPool (a fresh connection per use) that waits through a server restart; with no
    pool, a connection lives for one operation (milliseconds)."""


class WaitingQueuePool(_WaitsForServer, QueuePool):
    """A QueuePool that waits through a server restart; its pre-ping finds a pooled connection
    the restart cut, and the connection that replaces it waits for the server.

    Each is noted in `_KEEPING` (weakly) so that `release_connections` can close the kept
    connections when the search ends: the searcher outlives the search (Ray keeps it), and a
    notebook that ran ten jobs would otherwise hold twenty idle connections on the team's
    server. A restored searcher's pool is made by Ray's unpickling, out of toxtune's reach, so
    the pools note themselves."""

    def __init__(self, creator: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(creator, *args, **kwargs)
        _KEEPING.add(self)


_KEEPING: weakref.WeakSet[WaitingQueuePool] = weakref.WeakSet()


def release_connections() -> None:
    """Close the connections the searchers' storages keep (`rdb(pooled=True)`); a later use
    of such a storage opens them again."""
    for pool in list(_KEEPING):
        pool.dispose()


_ANSWERED: set[str] = set()  # study database URLs this process has opened


def _open_waiting(url: str, kwargs: dict) -> optuna.storages.RDBStorage:
    """Open the storage; a server this process opened before (a job's second look at its
    study) is waited for as its pools wait (`_WaitsForServer`), one never reached is refused
    at once (a wrong host or port is a configuration error, not a restart)."""
    storage = _waiting_for_server(
        lambda: _open_racing_creators(url, kwargs),
        lambda: url in _ANSWERED,
        (OperationalError, optuna.exceptions.StorageInternalError),
        f"the study database {shown(url)}",
    )
    _ANSWERED.add(url)
    return storage


def _waiting_for_server(
    call: Callable[[], T],
    may_wait: Callable[[], bool],
    errors: type[BaseException] | tuple[type[BaseException], ...],
    what: str,
) -> T:
    """`call()`, retried with backoff for up to SERVER_PATIENCE_S while it raises `errors`
    that say the server is down or restarting (`_unreachable`) and `may_wait()` holds (the
    server answered before: one never reached is a configuration error, refused at once)."""
    delay, deadline = 0.25, time.monotonic() + SERVER_PATIENCE_S
    while True:
        try:
            return call()
        except errors as exc:
            if not (may_wait() and _unreachable(exc)) or time.monotonic() > deadline:
                raise
            log.warning("%s is unreachable, waiting: %s", what, _first_line(exc))
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database server is down or restarting."""
    while exc is not None:
        if any(word in str(exc).lower() for word in _UNREACHABLE):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _open_racing_creators(url: str, kwargs: dict, attempts: int = 5) -> optuna.storages.RDBStorage:
    """RDBStorage(url), retried while another process creates the same new database's tables.

    Optuna creates missing tables on open (check, then CREATE TABLE), so a job starting while
    `toxtune status`, a second job or a test opens the same fresh database can lose that race
    with "table ... already exists" or a unique-constraint error on its version row. The
    winner's tables are complete moments later; a retry finds them and creates nothing."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            text = str(exc.orig if exc.orig is not None else exc).lower()
            racing = any(s in text for s in ("already exists", "duplicate", "unique constraint"))
            if not racing or attempt == attempts - 1:
                raise
            log.debug("%s: tables created concurrently, opening again", shown(url))
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for another database or an in-memory one)."""
    parsed = make_url(url)
    name = parsed.database
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:":
        return None
    return None if name.startswith("file:") else Path(name)


def shown(uri: str) -> str:
    """`uri` as a message may print it: without user, password or query string."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    netloc, slash, path = rest.partition("/")
    return f"{scheme}://{netloc.rpartition('@')[2]}{slash}{path.partition('?')[0]}"


def load(job: JobConfig) -> optuna.Study | None:
    """The job's study, or None when it has none yet. A missing SQLite database is not
    created (opening one would)."""
    path = sqlite_file(job.study_storage)
    if path is not None and not path.exists():
        return None
    try:
        return optuna.load_study(study_name=job.name, storage=rdb(job.study_storage))
    except KeyError:
        return None


# Counting and inspecting the study. `Study.trials` and `Study.get_trials` (any `states`) read
# every trial with all its intermediate values (an epoch each) through Optuna's cache, and
# `RDBStorage.get_n_trials` does the same (optuna 5.1.0): a resume read its study whole three
# times, growing with the results per trial (benchmarks/RESULTS.md, "Resume at scale"). So the
# study's storage is asked directly, through its public API, for only what is needed: the trial
# count (`n_trials`) and the RUNNING trials (`RDBStorage.get_all_trials` filters states in SQL).


def _opened(job: JobConfig) -> tuple[optuna.storages.RDBStorage, int] | None:
    """The job's study storage (uncached) and study id, or None when it has no study yet. A
    missing SQLite database is not created (as `load`)."""
    path = sqlite_file(job.study_storage)
    if path is not None and not path.exists():
        return None
    storage = rdb(job.study_storage)
    try:
        return storage, storage.get_study_id_from_name(job.name)
    except KeyError:
        return None


def n_trials(storage: optuna.storages.BaseStorage, study_id: int) -> int:
    """How many trials the study holds, in about 2 log2(n) one-row lookups (each its own
    connection on a server, `rdb`), none reading a trial: trial numbers are consecutive from 0
    in each study (`FrozenTrial.number`), so the count is one more than the largest number that
    exists, found by doubling, then bisecting, with `get_trial_id_from_study_id_trial_number`
    (KeyError for a number not there)."""

    def exists(number: int) -> bool:
        try:
            storage.get_trial_id_from_study_id_trial_number(study_id, number)
        except KeyError:
            return False
        return True

    if not exists(0):
        return 0
    low, high = 0, 1  # trial `low` exists; is `high` past the last?
    while exists(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if exists(middle):
            low = middle
        else:
            high = middle
    return low + 1


def running_trials(
    storage: optuna.storages.BaseStorage, study_id: int
) -> list[optuna.trial.FrozenTrial]:
    """The study's RUNNING trials (at most the trials in flight), read alone."""
    running = (optuna.trial.TrialState.RUNNING,)
    return storage.get_all_trials(study_id, deepcopy=False, states=running)


def count_trials(job: JobConfig) -> int:
    opened = _opened(job)
    return n_trials(*opened) if opened is not None else 0


def remaining(job: JobConfig) -> int:
    """Trials still to run for the study to reach `search.num_samples` finished trials (every
    trial not RUNNING counts as run)."""
    opened = _opened(job)
    if opened is None:
        return job.search.num_samples
    done = n_trials(*opened) - len(running_trials(*opened))
    return job.search.num_samples - done


def sampler_seed(seed: int, n_trials: int) -> int:
    """The sampler's seed for a study that already holds `n_trials` trials.

    `seed` itself for a new study, so a job run afresh chooses the same trials. A study that
    holds trials (resumed, grown) gets a seed derived from both: a sampler rebuilt with `seed`
    would repeat the first driver's random draws and propose its trials again. Every trial
    asked adds to the count, so a seed recurs only for a sampler after one that asked nothing.
    """
    if n_trials == 0:
        return seed
    digest = hashlib.sha256(f"toxtune-sampler/{seed}/{n_trials}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def make_sampler(search: SearchConfig, n_trials: int) -> optuna.samplers.BaseSampler:
    """The job's sampler for its study holding `n_trials` trials (seeded by `sampler_seed`)."""
    seed = sampler_seed(search.seed, n_trials)
    if seed != search.seed:
        log.info("the study holds %d trials: sampler seed %d", n_trials, seed)
    if search.searcher == "optuna":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)
    return optuna.samplers.RandomSampler(seed=seed)


def fresh_sampler(job: JobConfig) -> optuna.samplers.BaseSampler:
    """The job's sampler for its study as it stands (a restored searcher's: the trials asked
    since its snapshot count), counted without reading a trial."""
    storage = rdb(job.study_storage)
    return make_sampler(job.search, n_trials(storage, storage.get_study_id_from_name(job.name)))


def make_searcher(
    job: JobConfig, space: dict[str, Param], first_run: bool
) -> tuple[StudySearch, optuna.Study]:
    """Ray's searcher over the job's persistent study (created on the first run)."""
    storage = rdb(job.study_storage, pooled=True)
    found = optuna.create_study(
        storage=storage, study_name=job.name, direction="maximize", load_if_exists=True
    )
    held = n_trials(storage, storage.get_study_id_from_name(job.name))
    sampler = make_sampler(job.search, held)
    point = default_point(space) if job.search.evaluate_default and first_run else None
    if job.search.evaluate_default and first_run and point is None:
        log.warning("the default point lies outside search.space; not evaluating it first")
    searcher = StudySearch(
        space=SpaceSampler(space),
        metric=METRIC,
        mode=MODE,
        points_to_evaluate=[point] if point and held == 0 else None,
        sampler=sampler,
        resampler=functools.partial(fresh_sampler, job),
        study_name=job.name,
        storage=storage,
    )
    return searcher, found


def fail_stale_trials(job: JobConfig, keep: set[str] = frozenset()) -> int:  # type: ignore[assignment]
    """Mark study trials left RUNNING by a killed driver (and not being resumed) as failed.
    Only the RUNNING trials are read."""
    opened = _opened(job)
    if opened is None:
        return 0
    storage, study_id = opened
    stale = [
        frozen
        for frozen in running_trials(storage, study_id)
        if frozen.user_attrs.get(RAY_TRIAL_ATTR) not in keep
    ]
    if stale:
        found = optuna.load_study(study_name=job.name, storage=storage)
        for frozen in stale:
            found.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def finished_ray_ids(found: optuna.Study) -> dict[str, float]:
    """Ray trial id -> study value (NaN when it has none) of the study's finished trials
    (complete, pruned or failed). Reads the whole study (no public Optuna API returns trials
    without their intermediate values); only a restore asks."""
    return {
        str(t.user_attrs[RAY_TRIAL_ATTR]): float("nan") if t.value is None else float(t.value)
        for t in found.get_trials(deepcopy=False)
        if t.state.is_finished() and RAY_TRIAL_ATTR in t.user_attrs
    }


def check_job_stores(job: JobConfig, started: bool) -> None:
    """Refuse to continue a job that has `started` searching (it has Ray rounds) when its
    Optuna study or its MLflow parent run is gone: the search would silently start a new study
    (re-proposing the trials it already ran) or a new parent run (splitting its record).
    Nothing is created on the way: a missing SQLite database is named, not opened."""
    if not started:
        return
    missing = []
    path = sqlite_file(job.study_storage)
    if path is not None and not path.exists():
        missing.append(f"its Optuna study database {path} is missing")
    elif load(job) is None:
        missing.append(f"its Optuna study {job.name!r} is not in {shown(job.study_storage)}")
    uri = job.tracking_uri
    mlflow_db = sqlite_path(uri)
    experiment = job.tracking.experiment_name
    if mlflow_db is not None and not mlflow_db.exists():
        missing.append(f"its MLflow database {mlflow_db} is missing")
    elif find_job_run(uri, experiment, job.name) is None:
        missing.append(
            f"its MLflow parent run (tag {JOB_TAG}={job.name}) is not in experiment "
            f"{experiment!r} at {shown(uri)}"
        )
    if missing:
        raise JobMismatchError(
            f"job {job.name!r} has already searched, but {'; and '.join(missing)}. Restore "
            "what is missing (or point --study-storage/--tracking-uri at it); for a new "
            "search, leave out --resume/--run-name"
        )
