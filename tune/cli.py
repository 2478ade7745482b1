"""The `toxtune` command: tune, data, predict, ui, submit, jobs. Thin: parses, then calls."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from toxmodel.checkpoint import CheckpointError
from toxmodel.data import DataError
from tune import settings
from tune.errors import ToxtuneError

# What the CLI reports as one line (the traceback only with --verbose). toxmodel's errors are
# bad input (exit code 2); each ToxtuneError carries its own exit code.
USER_ERRORS = (ToxtuneError, DataError, CheckpointError)

# Flag -> dotted config key. Flags override the config file.
TUNE_FLAGS: dict[str, tuple[str, str]] = {
    "data": ("data.source", "CSV path or URL of molecules (default: MoleculeNet Tox21)"),
    "smiles_column": ("data.smiles_column", "name of the SMILES column"),
    "num_samples": ("search.num_samples", "number of trials"),
    "max_epochs": ("search.max_epochs", "epochs per trial"),
    "searcher": ("search.searcher", "optuna (TPE) or random"),
    "scheduler": ("search.scheduler", "asha or fifo"),
    "max_concurrent": ("search.max_concurrent", "trials in flight at once"),
    "time_limit": ("search.time_limit_s", "wall-clock budget of the search in seconds"),
    "seed": ("search.seed", "seed of the sampler and of training"),
    "split": ("split.method", "random, stratified or scaffold"),
    "cpus_per_trial": ("resources.cpus_per_trial", "CPUs per trial"),
    "gpus_per_trial": ("resources.gpus_per_trial", "GPU share per trial, e.g. 0.25, or auto"),
    "address": ("ray.address", "Ray cluster to join: auto or HOST:PORT (default: local)"),
    "storage_path": ("ray.storage_path", "results folder (shared storage on a cluster)"),
    "num_gpus": ("ray.num_gpus", "GPUs of a local Ray (logical ones work on a CPU machine)"),
    "tracking_uri": ("tracking.tracking_uri", "MLflow tracking URI (default: SQLite)"),
    "experiment_name": ("tracking.experiment_name", "MLflow experiment"),
    "run_name": (
        "tracking.run_name",
        "job name (default: EXPERIMENT-TIMESTAMP); an existing name continues that job",
    ),
    "model_name": (
        "tracking.registered_model_name",
        "registered model name (default: toxtune-<data file stem>)",
    ),
}


def add_tune_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The `tune` flags (shared with `submit`, which passes them on to the cluster job)."""
    p.add_argument("--config", type=Path, help="YAML job config (flags override it)")
    for flag, (_, help_) in TUNE_FLAGS.items():
        if flag in skip:
            continue
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, help=help_)
    p.add_argument("--targets", nargs="+", help="target columns (default: every binary column)")
    p.add_argument("--resume", metavar="NAME", help="continue job NAME (its saved config + flags)")


def tune_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags the user gave, as dotted config keys (strings; the config coerces and checks)."""
    out: dict[str, Any] = {}
    for flag, (key, _) in TUNE_FLAGS.items():
        raw = getattr(args, flag, None)
        if raw is not None:
            out[key] = raw
    if getattr(args, "targets", None):
        out["data.targets"] = list(args.targets)
    if getattr(args, "resume", None):
        out["tracking.run_name"] = args.resume
    return out


def resolve_job(args: argparse.Namespace) -> Any:
    """The validated, named JobConfig this command means.

    `--resume NAME` continues the saved job NAME: its saved config plus the flags given (e.g. a
    larger `--num-samples`); `--config` and `--run-name` would be ignored, so they are refused,
    as is a NAME with no saved job. Otherwise a new job: `--config` plus flags, named by
    `--run-name` (an existing name continues that job) or a fresh `<experiment>-<timestamp>`.
    """
    from tune.config import CONFIG_FILE, load_config, named
    from tune.errors import ConfigError

    overrides = tune_overrides(args)
    storage = Path(overrides.get("ray.storage_path", "toxtune_results")).expanduser()
    if args.resume:
        ignored = [
            f"--{flag.replace('_', '-')}"
            for flag in ("config", "run_name")
            if getattr(args, flag, None)
        ]
        if ignored:
            raise ConfigError(
                f"--resume {args.resume} continues that job with its saved config; "
                f"{' and '.join(ignored)} would be ignored: leave them out"
            )
        saved = storage / args.resume / CONFIG_FILE
        if not saved.is_file():
            jobs = sorted(p.parent.name for p in storage.glob(f"*/{CONFIG_FILE}"))
            listed = ", ".join(jobs[-10:]) if jobs else "none"
            raise ConfigError(
                f"--resume {args.resume}: no saved job at {saved} (jobs under {storage}: {listed})"
            )
        return load_config(saved, overrides)
    job = load_config(args.config, overrides)
    return named(job, exists=lambda name: (job.storage_root / name).exists())


def cmd_tune(args: argparse.Namespace) -> int:
    job = resolve_job(args)
    from tune.drills import FaultPlan
    from tune.job import run_job
    from tune.report import print_result

    result = run_job(job, faults=FaultPlan.from_env())
    print_result(job, result)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from toxmodel.data import default_cache_dir, load_table, summarize
    from toxmodel.featurize import FeaturizerConfig, featurize_cached, write_invalid_report

    cache = default_cache_dir()
    table = load_table(args.data, args.smiles_column, args.targets, cache)
    features = featurize_cached(
        table.smiles, FeaturizerConfig(), cache, table.content_hash, progress=True
    )
    print(summarize(table, features))
    if args.invalid_report:
        path = write_invalid_report(features.invalid, Path(args.invalid_report), table.lines)
        print(f"invalid rows written to {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tune.serving import predict_file

    out = predict_file(
        args.model, Path(args.input), Path(args.output), args.tracking_uri, args.smiles_column
    )
    print(f"predictions written to {out}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from tune.config import load_config

    job = load_config(args.config, tune_overrides(args))
    uri = job.tracking_uri
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {uri} at {url}  (Ctrl-C to stop)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: the UI is reachable from other machines and has no authentication")
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if uri.startswith("sqlite:///"):
        cmd += ["--default-artifact-root", str(job.storage_root / "mlartifacts")]
    return subprocess.call(cmd)


def cmd_submit(args: argparse.Namespace) -> int:
    from tune.cluster import submit
    from tune.identity import new_name

    overrides = tune_overrides(args)
    if not args.resume and "tracking.run_name" not in overrides:
        # Named here, so the submitted command, the job's metadata and the record agree.
        base = overrides.get("tracking.experiment_name") or _config_experiment(args.config)
        overrides["tracking.run_name"] = new_name(base)
    return submit(args, overrides)


def _config_experiment(path: Path | None) -> str:
    from tune.config import load_config

    return load_config(path).tracking.experiment_name


def cmd_jobs(args: argparse.Namespace) -> int:
    from tune.cluster import jobs

    return jobs(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toxtune", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tune", help="run a hyperparameter search and register the best model")
    add_tune_flags(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("data", help="summarise a dataset before spending compute on it")
    p.add_argument("--data", default="default", help="CSV path or URL (default: Tox21)")
    p.add_argument("--smiles-column", default="smiles")
    p.add_argument("--targets", nargs="+")
    p.add_argument("--invalid-report", help="write the invalid SMILES rows to this CSV")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("predict", help="predict toxicity for a CSV of SMILES")
    p.add_argument("input", help="CSV with a SMILES column")
    p.add_argument("--model", required=True, help="e.g. models:/toxtune-tox21@champion")
    p.add_argument("--output", default="predictions.csv")
    p.add_argument("--smiles-column", default="smiles")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ui", help="start the MLflow UI on the job's tracking backend")
    p.add_argument("--config", type=Path)
    p.add_argument("--tracking-uri", dest="tracking_uri")
    p.add_argument("--storage-path", dest="storage_path")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    from tune import cluster

    p = sub.add_parser("submit", help="submit `toxtune tune` to a Ray cluster as a batch job")
    add_tune_flags(p, skip=("address",))
    cluster.add_submit_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    cluster.add_jobs_arguments(p)
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings.configure_process()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"toxtune {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))


if __name__ == "__main__":
    sys.exit(main())
