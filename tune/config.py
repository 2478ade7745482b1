"""The job configuration: typed sections, YAML loading, flag overrides, validation at the edge.

Everything a tuning job needs is one `JobConfig`; it is validated once, before Ray starts,
and every later stage reads typed fields instead of raw dicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toxmodel.duplicates import DUPLICATE_POLICIES
from toxmodel.featurize import FeaturizerConfig
from toxmodel.split import SplitConfig, validate_split_config
from tune.credentials import credential_advice, credential_in
from tune.errors import ConfigError
from tune.identity import check_name, default_model_name, new_name
from tune.space import validate_overrides
from tune.storage import Storage


@dataclass(frozen=True)
class DataConfig:
    """Where the molecules come from."""

    source: str = "default"  # a path, a URL, or "default" (MoleculeNet Tox21)
    smiles_column: str = "smiles"
    targets: list[str] | None = None  # None: every binary 0/1 column
    cache_dir: str | None = None  # None: $TOXTUNE_CACHE_DIR or ~/.cache/toxtune
    allow_single_class: bool = False  # drop (and report) one-class tasks instead of refusing
    # Rows of one molecule (same canonical SMILES without stereo, after featurizer.standardize)
    # land in one split part. keep: every row stays; average: one row per molecule, each task
    # the majority label (a tie: missing); drop: one row per molecule, a conflicting task missing.
    duplicates: str = "keep"


DEFAULT_GRACE_PERIOD = 3  # ASHA's grace period when the config leaves it unset


@dataclass(frozen=True)
class SearchConfig:
    """The search: sampler, scheduler, budget."""

    searcher: str = "optuna"  # optuna (TPE) | random
    scheduler: str = "asha"  # asha | fifo
    num_samples: int = 20  # total trials of the study (a resumed job grows it to this)
    max_epochs: int = 30  # per trial
    patience: int = 8  # early stopping inside a trial (0 = off)
    time_limit_s: float | None = None  # wall-clock budget of the search
    # ASHA: epochs before a trial can be stopped; None (unset): min(3, max_epochs), so a small
    # --max-epochs is never refused over a default (validate() fills it in)
    grace_period: int | None = None
    reduction_factor: int = 3  # ASHA: keep 1/reduction_factor at each rung
    max_concurrent: int = 2  # trials in flight at once
    seed: int = 0
    evaluate_default: bool = True  # first trial = the known-good default point
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # overrides of tune.space
    final_seeds: int = 1  # retrain the best config over this many seeds, report mean/std
    ensemble: int = 1  # models in the registered one: the best trial + (ensemble - 1) retrains
    # k-fold selection: > 1 divides the non-test rows into k folds (split.method, split.seed),
    # scores each trial by its mean validation ROC-AUC over them and registers the best trial's
    # k fold models averaged (no retrain); 1 is the single train/valid split
    folds: int = 1
    # k-fold jobs: also train gradient-boosted trees (toxmodel.trees) on each fold and blend
    # them with the fold models at the trees' share that scores best out of fold (0 keeps none)
    trees: bool = False


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial asks Ray for."""

    cpus_per_trial: float = 1.0
    gpus_per_trial: float | str = 0.0  # a fraction in (0, 1], 0 for CPU only, or "auto"
    gpu_memory_gb: float | None = None  # for "auto" without a visible GPU: memory per GPU
    pending_timeout_s: float = 600.0  # on a cluster: fail when no trial starts within this


@dataclass(frozen=True)
class FaultConfig:
    """Retries and the error budget."""

    max_retries: int = 2  # per trial, for retryable failures only (OOM, lost node)
    max_failed_trials: int = 5  # no trial starts after this many failed for good (the report
    # and the job's MLflow run say so; the best finished trial is still registered)


@dataclass(frozen=True)
class RayConfig:
    """Where trials run and where results are stored."""

    address: str | None = None  # None: a local Ray; "auto" or host:port: join a cluster
    storage_path: str = "toxtune_results"  # Ray experiment folder (shared storage on clusters)
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only; logical GPUs work on a CPU machine


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow and the Optuna study storage."""

    tracking_uri: str | None = None  # None: sqlite:///<storage_path>/mlflow.db
    experiment_name: str = "toxtune"
    run_name: str | None = None  # the job's name; None: <experiment_name>-<UTC timestamp>
    registered_model_name: str | None = None  # None: toxtune-<data file stem>
    alias: str = "champion"
    study_storage: str | None = None  # None: sqlite:///<storage_path>/optuna.db


@dataclass(frozen=True)
class JobConfig:
    """A whole tuning job."""

    data: DataConfig = field(default_factory=DataConfig)
    featurizer: FeaturizerConfig = field(default_factory=FeaturizerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def name(self) -> str:
        """The job's name: the Ray experiment folder, the Optuna study and the MLflow parent run.

        Set by `named()` (the CLI and `run_job` call it); a job is never named by default, so two
        commands cannot share one record by accident.
        """
        if not self.tracking.run_name:
            raise ConfigError("the job has no name yet (tracking.run_name); see config.named()")
        return self.tracking.run_name

    @property
    def model_name(self) -> str:
        """The registered model's name: set, or derived from the data file (toxtune-<stem>)."""
        return self.tracking.registered_model_name or default_model_name(self.data.source)

    @property
    def storage(self) -> Storage:
        """Where the job's results live (a local folder or an object store; tune.storage)."""
        return Storage.open(self.ray.storage_path)

    @property
    def job_dir(self) -> Path:
        """The job's local folder; only for local storage (use `storage` for any URI)."""
        return self.storage_root / self.name

    @property
    def storage_root(self) -> Path:
        """The results folder as a local path; ConfigError for an object-store URI."""
        storage = self.storage
        if not storage.is_local:
            raise ConfigError(f"ray.storage_path {storage.uri} is not a local folder")
        return storage.local()

    @property
    def tracking_uri(self) -> str:
        uri = self.tracking.tracking_uri
        return uri or f"sqlite:///{self.storage_root / 'mlflow.db'}"

    @property
    def study_storage(self) -> str:
        """Optuna's database. A file of its own: MLflow and Optuna both own `alembic_version`."""
        return self.tracking.study_storage or f"sqlite:///{self.storage_root / 'optuna.db'}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; convert YAML/CLI scalars where lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is typing.Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build(cls: type, raw: Any, where: str, source: str = "") -> Any:
    """`cls` from the mapping `raw` at `where` (a dotted section; "" for the whole config) of
    the config read from `source` (a file or a saved job; "" for the defaults and flags)."""
    whole = f"config {source}" if source else "config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or whole}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))
    if unknown:
        what = f"{where}: unknown key(s)" if where else f"{whole}: unknown top-level key(s)"
        raise ConfigError(f"{what} {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        sub = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, sub, source)
        else:
            kwargs[name] = _coerce(value, tp, sub)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or whole}: {exc}") from exc


def _positive(value: float, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{where} must be {bound}, got {value}")


def validate(job: JobConfig) -> JobConfig:
    """Range checks that span fields; raises ConfigError naming the field.

    Returns the job with the values it leaves to the budget filled in (search.grace_period).
    """
    _no_credentials(job)  # first: no later message may repeat a URI that holds one
    s, r, f = job.search, job.resources, job.faults
    if s.searcher not in ("optuna", "random"):
        raise ConfigError(f"search.searcher must be optuna or random, got {s.searcher!r}")
    if s.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"search.scheduler must be asha or fifo, got {s.scheduler!r}")
    for name in ("num_samples", "max_epochs", "max_concurrent", "final_seeds", "ensemble", "folds"):
        _positive(getattr(s, name), f"search.{name}")
    if s.folds > 1 and s.ensemble > 1:
        raise ConfigError(
            f"search.folds ({s.folds}) and search.ensemble ({s.ensemble}) both choose the "
            "registered model: a k-fold job registers its k fold models averaged; set "
            "search.ensemble to 1"
        )
    if s.trees and s.folds < 2:
        raise ConfigError(
            "search.trees needs search.folds > 1: the trees' share of the blend is chosen on "
            "out-of-fold predictions, which only a k-fold job has"
        )
    _positive(s.patience, "search.patience", allow_zero=True)
    if s.reduction_factor < 2:
        raise ConfigError(f"search.reduction_factor must be >= 2, got {s.reduction_factor}")
    if s.time_limit_s is not None:
        _positive(s.time_limit_s, "search.time_limit_s")
    if s.grace_period is None:
        s = dataclasses.replace(s, grace_period=min(DEFAULT_GRACE_PERIOD, s.max_epochs))
        job = dataclasses.replace(job, search=s)
    _positive(s.grace_period, "search.grace_period")
    if s.grace_period > s.max_epochs:
        raise ConfigError(
            f"search.grace_period ({s.grace_period}) must not exceed "
            f"search.max_epochs ({s.max_epochs}); lower it, or leave it unset to fit the budget"
        )
    _positive(r.cpus_per_trial, "resources.cpus_per_trial")
    if isinstance(r.gpus_per_trial, str):
        if r.gpus_per_trial != "auto":
            raise ConfigError(
                f"resources.gpus_per_trial must be a number in [0, 1] or 'auto', "
                f"got {r.gpus_per_trial!r}"
            )
    elif not 0 <= r.gpus_per_trial <= 1:
        raise ConfigError(
            f"resources.gpus_per_trial must be in (0, 1] (or 0 for CPU only), "
            f"got {r.gpus_per_trial}"
        )
    _positive(r.pending_timeout_s, "resources.pending_timeout_s")
    if r.gpu_memory_gb is not None:
        _positive(r.gpu_memory_gb, "resources.gpu_memory_gb")
    _positive(f.max_retries, "faults.max_retries", allow_zero=True)
    _positive(f.max_failed_trials, "faults.max_failed_trials")
    for name in ("num_cpus", "num_gpus"):
        value = getattr(job.ray, name)
        if value is not None:
            _positive(value, f"ray.{name}", allow_zero=name == "num_gpus")
    if not job.data.source:
        raise ConfigError("data.source must not be empty")
    if job.data.duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(
            f"data.duplicates must be {', '.join(DUPLICATE_POLICIES[:-1])} or "
            f"{DUPLICATE_POLICIES[-1]}, got {job.data.duplicates!r}"
        )
    if not job.tracking.experiment_name:
        raise ConfigError("tracking.experiment_name must not be empty")
    _check_names(job)
    _check_storage(job)
    if not 0 <= s.seed < 2**32:
        raise ConfigError(f"search.seed must be in [0, 2**32), got {s.seed}")
    if not 0 <= job.split.seed < 2**32:
        raise ConfigError(f"split.seed must be in [0, 2**32), got {job.split.seed}")
    try:
        validate_split_config(job.split)
    except ValueError as exc:
        raise ConfigError(f"split: {exc}") from exc
    if job.split.valid <= 0:
        raise ConfigError(
            f"split.valid must be > 0 (trials are chosen on the validation split), "
            f"got {job.split.valid}"
        )
    validate_overrides(s.space)
    return job


# MLflow refuses registered-model names and aliases with these (its server answers 400).
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,255}$")


def _check_names(job: JobConfig) -> None:
    """Job, model and alias names MLflow and the storage accept; checked before any work."""
    if job.tracking.run_name is not None:
        check_name(job.tracking.run_name)
    if job.tracking.registered_model_name is not None and not _MODEL_NAME.match(
        job.tracking.registered_model_name
    ):
        raise ConfigError(
            f"tracking.registered_model_name {job.tracking.registered_model_name!r} is not a "
            "valid model name: use letters, digits, '_', '.' and '-'"
        )
    alias = job.tracking.alias
    if not _ALIAS.match(alias) or re.fullmatch(r"[vV]\d+|latest", alias):
        raise ConfigError(
            f"tracking.alias {alias!r} is not a valid alias: letters, digits, '_' and '-', "
            "starting with a letter, not 'latest' or v<number>"
        )


def named(job: JobConfig, exists: Any = None) -> JobConfig:
    """The job with a name: its own, or a fresh `<experiment_name>-<UTC timestamp>`.

    `exists(name) -> bool` says whether a name is taken (the fresh name then gets a suffix).
    """
    if job.tracking.run_name:
        return job
    name = new_name(job.tracking.experiment_name, exists)
    return dataclasses.replace(job, tracking=dataclasses.replace(job.tracking, run_name=name))


def _check_storage(job: JobConfig) -> None:
    """An object-store job keeps nothing on the driver's disk: its MLflow backend and Optuna
    study must be servers every node and a restarted driver reach, not SQLite files."""
    storage = job.storage
    if storage.is_local:
        return
    for where, uri, what in (
        ("tracking.tracking_uri", job.tracking.tracking_uri, "an MLflow server (http://...)"),
        ("tracking.study_storage", job.tracking.study_storage, "a database URL (postgresql://...)"),
    ):
        if not uri or uri.startswith("sqlite:"):
            raise ConfigError(
                f"ray.storage_path is the object store {storage.uri}, so {where} must be "
                f"{what}: a SQLite file would live in the driver's working directory and be "
                "lost with it (set it with a flag or in the config)"
            )


def _no_credentials(job: JobConfig) -> None:
    """Refuse URIs that carry a credential: the config is saved in the job's folder and logged to
    MLflow as params, and URIs appear in messages. Each is parsed as its client parses it
    (SQLAlchemy for a database, urllib for the rest), and the message never repeats the value."""
    for where, uri in (
        ("tracking.tracking_uri", job.tracking.tracking_uri),
        ("tracking.study_storage", job.tracking.study_storage),
        ("data.source", job.data.source),
        ("ray.storage_path", job.ray.storage_path),
        ("ray.address", job.ray.address),
    ):
        found = credential_in(where, uri) if uri else None
        if found is None:
            continue
        what, family = found
        advice = credential_advice(where, family)
        raise ConfigError(
            f"{where} embeds {what}, which would be saved with the job and logged to MLflow; "
            f"{advice} (the value is not shown)"
        )


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    text: str | None = None,
    where: str = "",
) -> JobConfig:
    """Read a YAML config (a file, or `text` read from `where`, or the defaults), apply
    dotted-key overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        text, where = p.read_text(), str(p)
    if text is not None:
        try:
            loaded = yaml.load(text, Loader=_UniqueKeys)  # a SafeLoader: no Python objects
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{where}: the top level must be a mapping of sections")
        raw = loaded or {}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(f"override {dotted!r} must be section.key")
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"{section}: expected a mapping")
        target[key] = value
    job = _build(JobConfig, raw, "", where)
    if isinstance(job.featurizer.n_bits, int) and job.featurizer.n_bits <= 0:
        raise ConfigError(f"featurizer.n_bits must be > 0, got {job.featurizer.n_bits}")
    if job.featurizer.radius < 0:
        raise ConfigError(f"featurizer.radius must be >= 0, got {job.featurizer.radius}")
    return validate(job)


class _UniqueKeys(yaml.SafeLoader):
    """`yaml.safe_load` that refuses a key given twice in one mapping: PyYAML would keep the
    last one without a word, so a setting the user wrote would be silently ignored."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool):
            continue  # a list or mapping as a key: construct_mapping says what is wrong
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"{key!r} is given twice (lines {seen[key]} and {line}); "
                "YAML would keep only the last, so remove one",
            )  # fmt: skip (no mark: the lines are named, and the CLI's error is one line)
        seen[key] = line
    return loader.construct_mapping(node)


_UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def dump_config(job: JobConfig) -> str:
    """The resolved config as YAML (what MLflow stores and `--resume` compares)."""
    return yaml.safe_dump(job.to_dict(), sort_keys=False)
