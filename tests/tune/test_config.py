"""Config errors are refused before Ray starts, with a message naming the field."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tune.cli import build_parser
from tune.cli.tune_job import resolve_job
from tune.config import ConfigError, JobConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid() -> None:
    job = load_config()
    assert isinstance(job, JobConfig)
    assert job.tracking_uri.startswith("sqlite:///")
    assert job.study_storage.startswith("sqlite:///")
    assert job.study_storage != job.tracking_uri  # both own an `alembic_version` table


@pytest.mark.parametrize("name", ["quick.yaml", "small.yaml", "tox21.yaml", "toxcast.yaml"])
def test_shipped_configs_load(name: str) -> None:
    job = load_config(REPO / "configs" / name)
    assert job.search.num_samples > 0
    # configs/ at the root is the package's own folder, not a copy that could drift
    assert (REPO / "configs" / name).resolve() == (REPO / "tune" / "configs" / name).resolve()


def test_an_unset_grace_period_fits_the_epoch_budget(tmp_path: Path) -> None:
    """`--max-epochs 2` used to be refused over a default the user never set:
    `search.grace_period (3) must not exceed search.max_epochs (2)`."""
    assert load_config().search.grace_period == 3
    assert load_config(overrides={"search.max_epochs": "2"}).search.grace_period == 2
    assert load_config(overrides={"search.max_epochs": 1}).search.grace_period == 1
    job = resolve_job(build_parser().parse_args(["tune", "--max-epochs", "2"]))
    assert (job.search.max_epochs, job.search.grace_period) == (2, 2)
    # what the user set is kept, and the saved config reloads as it ran
    chosen = load_config(overrides={"search.max_epochs": 10, "search.grace_period": 5})
    assert chosen.search.grace_period == 5
    saved = tmp_path / "job.yaml"
    saved.write_text(dump_config(job))
    assert load_config(saved) == job


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"search.grace_period": 3, "search.max_epochs": 2}, r"grace_period \(3\).*\(2\)"),
        ({"search.grace_period": 0}, r"search\.grace_period must be > 0"),
    ],
)
def test_a_grace_period_the_user_chose_is_checked(overrides: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        load_config(overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"search.bogus": 1}, "bogus"),
        ({"nosuchsection.x": 1}, "nosuchsection"),
        ({"search.num_samples": 0}, "search.num_samples"),
        ({"search.num_samples": -3}, "search.num_samples"),
        ({"search.num_samples": "many"}, "search.num_samples"),
        ({"search.num_samples": 2.5}, "search.num_samples"),
        ({"search.max_epochs": 0}, "search.max_epochs"),
        ({"search.ensemble": 0}, "search.ensemble"),
        ({"search.folds": 0}, "search.folds"),
        ({"search.folds": 2.5}, "search.folds"),
        ({"search.folds": True}, "search.folds"),
        ({"search.folds": 3, "search.ensemble": 2}, "set search.ensemble to 1"),
        ({"search.trees": True}, "search.trees needs search.folds > 1"),
        ({"search.trees": "yes", "search.folds": 3}, "search.trees"),
        ({"search.searcher": "grid"}, "search.searcher"),
        ({"search.scheduler": "pbt"}, "search.scheduler"),
        ({"search.reduction_factor": 1}, "search.reduction_factor"),
        ({"search.grace_period": 50, "search.max_epochs": 10}, "grace_period"),
        ({"search.time_limit_s": 0}, "search.time_limit_s"),
        ({"search.evaluate_default": "yes"}, "search.evaluate_default"),
        ({"resources.gpus_per_trial": 1.5}, "resources.gpus_per_trial"),
        ({"resources.gpus_per_trial": -0.25}, "resources.gpus_per_trial"),
        ({"resources.gpus_per_trial": "lots"}, "resources.gpus_per_trial"),
        ({"resources.cpus_per_trial": 0}, "resources.cpus_per_trial"),
        ({"faults.max_failed_trials": 0}, "faults.max_failed_trials"),
        ({"faults.max_retries": -1}, "faults.max_retries"),
        ({"data.targets": "NR-AR"}, "data.targets"),
        ({"data.source": ""}, "data.source"),
        (
            {"data.duplicates": "median"},
            "data.duplicates must be keep, average or drop, got 'median'",
        ),
        ({"featurizer.n_bits": 0}, "n_bits"),
        ({"featurizer.radius": -1}, "radius"),
        ({"search.space": {"lr": {"low": 1e-2, "high": 1e-4}}}, "low"),
        ({"search.space": {"activation": {"choices": []}}}, "activation"),
        ({"search.space": {"depth": {"low": 1, "high": 2}}}, "depth"),
        ({"search.space": {"lr": {"low": 0, "high": 1e-3, "log": True}}}, "lr"),
        ({"search.space": {"n_layers": {"low": 1, "high": 9}}}, "n_layers"),
        ({"search.space": {"activation": {"low": 1, "high": 2}}}, "categorical"),
        ({"tracking.tracking_uri": "postgresql://u:secret@db/mlflow"}, "password"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(overrides: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(overrides=overrides)


SECTIONS = "data, featurizer, split, search, resources, faults, ray, tracking"


def test_an_unknown_top_level_key_is_named_with_the_known_sections() -> None:
    """A bad top-level key used to read `: unknown key(s) base; ...`, with nothing before the
    colon."""
    from tune.config import _build

    with pytest.raises(ConfigError) as exc:
        load_config(text="base: 1\nsearch: {num_samples: 2}\n")
    assert str(exc.value) == f"config: unknown top-level key(s) base; known: {SECTIONS}"
    # the file the config was read from is named (load_config passes it as `source`); keys
    # YAML reads as numbers are listed too
    with pytest.raises(ConfigError) as exc:
        _build(JobConfig, {"base": 1, 2: "x", "search": {}}, "", "configs/mine.yaml")
    assert str(exc.value) == (
        f"config configs/mine.yaml: unknown top-level key(s) 2, base; known: {SECTIONS}"
    )
    with pytest.raises(ConfigError) as exc:
        _build(JobConfig, ["data"], "", "configs/mine.yaml")
    assert str(exc.value) == "config configs/mine.yaml: expected a mapping, got ['data']"
    # a section's unknown key names the section
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"faults.bogus": 1})
    assert str(exc.value) == ("faults: unknown key(s) bogus; known: max_retries, max_failed_trials")


def test_gpu_fraction_accepts_fraction_and_auto() -> None:
    assert (
        load_config(overrides={"resources.gpus_per_trial": "0.25"}).resources.gpus_per_trial == 0.25
    )
    assert (
        load_config(overrides={"resources.gpus_per_trial": "auto"}).resources.gpus_per_trial
        == "auto"
    )


def test_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    twice = tmp_path / "twice.yaml"  # PyYAML alone keeps the last and drops the first unsaid
    twice.write_text("search:\n  folds: 5\n  num_samples: 3\n  folds: 1\nsplit: {seed: 1}\n")
    with pytest.raises(ConfigError) as refused:
        load_config(twice)
    assert str(refused.value) == (
        f"{twice}: not valid YAML: 'folds' is given twice (lines 2 and 4); YAML would keep only "
        "the last, so remove one"
    )
    # one name in two sections is two keys
    twice.write_text("split: {seed: 1}\nsearch: {seed: 2}\n")
    assert (load_config(twice).split.seed, load_config(twice).search.seed) == (1, 2)


def test_flags_override_the_file_and_resume_reads_the_saved_config(tmp_path: Path) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text("search:\n  num_samples: 7\n  max_epochs: 5\n")
    args = build_parser().parse_args(["tune", "--config", str(cfg), "--max-epochs", "3"])
    job = resolve_job(args)
    assert (job.search.num_samples, job.search.max_epochs) == (7, 3)

    saved = tmp_path / "results" / "myjob" / "toxtune_job.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(dump_config(job))
    args = build_parser().parse_args(
        [
            "tune",
            "--resume",
            "myjob",
            "--storage-path",
            str(tmp_path / "results"),
            "--num-samples",
            "12",
        ]
    )
    resumed = resolve_job(args)
    assert resumed.name == "myjob"
    assert (resumed.search.num_samples, resumed.search.max_epochs) == (12, 3)


def test_resume_of_unknown_job_is_refused(tmp_path: Path) -> None:
    args = build_parser().parse_args(["tune", "--resume", "nope", "--storage-path", str(tmp_path)])
    with pytest.raises(ConfigError, match="nope"):
        resolve_job(args)


@pytest.mark.parametrize(
    "extra",
    [
        ["--config", "bad.yaml"],
        ["--run-name", "other"],
        ["--config", "x.yaml", "--run-name", "other"],
    ],
)
@pytest.mark.parametrize("name", ["myjob", "TYPO"])
def test_resume_refuses_flags_it_would_ignore_and_unknown_names(
    tmp_path: Path, extra: list[str], name: str
) -> None:
    """`--resume n1 --config bad.yaml --run-name other` used to run n1 and ignore both;
    `--resume TYPO --config x.yaml` used to start a brand-new search named TYPO."""
    saved = tmp_path / "results" / "myjob" / "toxtune_job.yaml"
    saved.parent.mkdir(parents=True)
    saved.write_text(dump_config(load_config(overrides={"tracking.run_name": "myjob"})))
    (tmp_path / "x.yaml").write_text("search:\n  num_samples: 3\n")
    argv = ["tune", "--resume", name, "--storage-path", str(tmp_path / "results"), *extra]
    with pytest.raises(ConfigError, match="--resume") as err:
        resolve_job(build_parser().parse_args(argv))
    assert extra[0] in str(err.value)
    alone = build_parser().parse_args(
        ["tune", "--resume", name, "--storage-path", str(saved.parents[1])]
    )
    if name == "TYPO":
        with pytest.raises(ConfigError, match=r"no saved job.*myjob"):
            resolve_job(alone)
    else:
        assert resolve_job(alone).name == "myjob"


def test_cli_reports_config_errors_without_traceback(capsys: pytest.CaptureFixture) -> None:
    from tune.cli import main

    assert main(["tune", "--num-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "search.num_samples" in err and "Traceback" not in err


def _every_field() -> list[tuple[str, str]]:
    job = JobConfig()
    return [
        (f"{section.name}.{f.name}", str(f.type))
        for section in dataclasses.fields(JobConfig)
        if dataclasses.is_dataclass(getattr(job, section.name))
        for f in dataclasses.fields(getattr(job, section.name))
    ]


@pytest.mark.parametrize(("key", "annotation"), _every_field())
def test_every_field_refuses_a_wrong_type_naming_it(key: str, annotation: str) -> None:
    wrong: object = [1, 2] if "dict" in annotation else {"x": 1}
    with pytest.raises(ConfigError, match=key.split(".")[1]):
        load_config(overrides={key: wrong})


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"resources.cpus_per_trial": "nan"}, "resources.cpus_per_trial"),
        ({"search.time_limit_s": float("nan")}, "search.time_limit_s"),
        ({"resources.gpus_per_trial": "inf"}, "resources.gpus_per_trial"),
        ({"search.seed": -1}, "search.seed"),
        ({"search.seed": 99999999999}, "search.seed"),
        ({"split.method": "bogus"}, "bogus"),
        ({"split.train": 1.3}, "sum to 1"),
        ({"split.valid": 0, "split.train": 0.9}, "split.valid"),
        ({"tracking.registered_model_name": "a/b:c"}, "registered_model_name"),
        ({"tracking.registered_model_name": ""}, "registered_model_name"),
        ({"tracking.alias": ""}, "tracking.alias"),
        ({"tracking.alias": "v3"}, "tracking.alias"),
        ({"tracking.run_name": "../escaped"}, "tracking.run_name"),
    ],
)
def test_values_that_would_fail_after_the_search_are_refused_at_load(
    overrides: dict[str, object], named: str
) -> None:
    """Each of these used to pass validation and fail later (after featurizing, after Ray
    started, or after the whole search, at registration)."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_config(overrides=overrides)


def test_duplicates_policy_from_the_file_or_a_flag(tmp_path: Path) -> None:
    assert load_config().data.duplicates == "keep"
    cfg = tmp_path / "job.yaml"
    cfg.write_text("data:\n  duplicates: average\n")
    assert load_config(cfg).data.duplicates == "average"
    args = build_parser().parse_args(["tune", "--config", str(cfg), "--duplicates", "drop"])
    assert resolve_job(args).data.duplicates == "drop"
    cfg.write_text("data:\n  duplicates: Average\n")
    with pytest.raises(ConfigError, match="'Average'"):
        load_config(cfg)


_SAVED = "which would be saved with the job and logged to MLflow"
_DATABASE = (
    "remove it and give the password through the environment: PGPASSWORD or ~/.pgpass "
    "(mode 600) for PostgreSQL, the driver's own option file for another database"
)
_MLFLOW = (
    "remove it and give MLflow the credentials through the environment: MLFLOW_TRACKING_TOKEN, "
    "or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
)
_AWS = (
    "remove it and give the credentials through the environment: AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance profile)"
)
_PASSWORD = "a password in its user info (USER:PASSWORD@)"
_USER = "a credential in its user info (a USER@ is a login, token or key to this scheme)"
_OBJECT_STORE = {
    "tracking.tracking_uri": "http://h:5000",
    "tracking.study_storage": "postgresql://h/o",
}


@pytest.mark.parametrize(
    ("key", "uri", "secret", "what", "advice"),
    [
        # a '/' in the password: SQLAlchemy (and the driver) read all of "se/cret" as it
        ("tracking.study_storage", "postgresql://alice:se/cret@db/optuna", "se/cret", _PASSWORD,
         _DATABASE),
        # libpq takes a password as a query parameter too
        ("tracking.study_storage", "postgresql://alice@db/optuna?password=s3cret", "s3cret",
         "a credential in its query parameter 'password'", _DATABASE),
        ("tracking.study_storage", "postgresql+psycopg2://alice@db/o?sslpassword=s3cret",
         "s3cret", "a credential in its query parameter 'sslpassword'", _DATABASE),
        ("tracking.tracking_uri", "mysql+pymysql://alice@db/mlflow?passwd=s3cret", "s3cret",
         "a credential in its query parameter 'passwd'", _DATABASE),
        # requests sends a bare TOKEN@ as a login
        ("tracking.tracking_uri", "https://ghp_T0k3n@host", "ghp_T0k3n", _USER, _MLFLOW),
        ("tracking.tracking_uri", "https://alice:se/cret@host", "se/cret", _PASSWORD, _MLFLOW),
        ("tracking.tracking_uri", "http://host:5000/?token=s3cret", "s3cret",
         "a credential in its query parameter 'token'", _MLFLOW),
        ("data.source", "https://ghp_T0k3n@host/tox21.csv", "ghp_T0k3n", _USER,
         "toxtune downloads without credentials: download the file yourself and pass its local "
         "path with --data"),
        ("data.source", "https://host/t.csv?X-Amz-Credential=AKIA&X-Amz-Signature=s3cret",
         "s3cret", "a credential in its query parameter 'X-Amz-Credential'",
         "toxtune downloads without credentials: download the file yourself and pass its local "
         "path with --data"),
        ("ray.storage_path", "s3://AKIA:s3cret@bucket/x", "s3cret", _PASSWORD, _AWS),
        ("ray.storage_path", "s3://AKIAKEYID@bucket/x", "AKIAKEYID", _USER, _AWS),
        ("ray.address", "alice:s3cret@head:6379", "s3cret", "a credential in its user info (USER@)",
         "remove it: a Ray address takes no credentials (HOST:PORT, auto or ray://HOST:PORT)"),
    ],
)  # fmt: skip
def test_a_credential_in_any_uri_is_refused_and_never_repeated(
    key: str, uri: str, secret: str, what: str, advice: str
) -> None:
    """Issue 25 item 7: `postgresql://alice:se/cret@db/optuna`, `...?password=s3cret` and
    `https://TOKEN@host` passed the check and were saved in toxtune_job.yaml and MLflow params
    (the last also printed in an error message)."""
    extra = _OBJECT_STORE if key == "ray.storage_path" else {}
    with pytest.raises(ConfigError) as err:
        load_config(overrides={key: uri, **extra})
    assert str(err.value) == f"{key} embeds {what}, {_SAVED}; {advice} (the value is not shown)"
    assert secret not in str(err.value)


def test_a_credential_is_refused_by_the_cli_and_by_resume_without_repeating_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tune.cli import main

    uri = "postgresql://alice:se/cret@db/optuna"
    assert main(["tune", "--study-storage", uri, "--storage-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "tracking.study_storage embeds a password" in err and "cret" not in err
    # a job saved before the check holds the URI in its toxtune_job.yaml: --resume refuses it
    saved = tmp_path / "myjob" / "toxtune_job.yaml"
    saved.parent.mkdir()
    job = load_config(overrides={"tracking.run_name": "myjob", "ray.storage_path": str(tmp_path)})
    saved.write_text(dump_config(job).replace("study_storage: null", f"study_storage: {uri}"))
    args = build_parser().parse_args(["tune", "--resume", "myjob", "--storage-path", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"^tracking\.study_storage embeds a password") as refused:
        resolve_job(args)
    assert "cret" not in str(refused.value)


@pytest.mark.parametrize(
    ("key", "uri"),
    [
        ("tracking.study_storage", "postgresql+psycopg2://postgres@127.0.0.1:5432/optuna"),
        # libpq's passfile, sslkey and sslcert are file paths, not secrets
        ("tracking.study_storage", "postgresql://alice@db/o?sslmode=verify-full&passfile=/p"),
        ("tracking.study_storage", "postgresql://alice@db/o?sslkey=/k.pem&sslcert=/c.pem"),
        ("tracking.study_storage", "sqlite:////data/run@2/optuna.db"),
        ("tracking.tracking_uri", "http://127.0.0.1:5000"),
        ("tracking.tracking_uri", "databricks://scope:prefix"),  # names a secret scope
        ("data.source", "https://host:8080/files/tox21@v2.csv"),
        ("data.source", "/data/tox21@v2.csv"),
        ("ray.address", "10.0.1.23:6379"),
        ("ray.address", "ray://head:10001"),
    ],
)
def test_uris_without_a_credential_are_accepted(key: str, uri: str) -> None:
    assert load_config(overrides={key: uri})


@pytest.mark.parametrize(
    "uri",
    [
        "hdfs://alice@namenode:8020/toxtune",  # a user name, not a credential
        "abfs://container@account.dfs.core.windows.net/toxtune",  # the container
    ],
)
def test_object_store_uris_that_name_a_user_or_container_are_accepted(uri: str) -> None:
    assert load_config(overrides={"ray.storage_path": uri, **_OBJECT_STORE})


def test_an_unknown_top_level_key_names_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from tune.cli import main

    cfg = tmp_path / "mine.yaml"
    cfg.write_text("base: quick\nsearch: {num_samples: 2}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert str(exc.value) == f"config {cfg}: unknown top-level key(s) base; known: {SECTIONS}"
    assert main(["tune", "--config", str(cfg), "--storage-path", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"toxtune tune: error: config {cfg}: unknown top-level key(s) base; known: {SECTIONS}"
    ]
