"""`toxtune tune`: which job the flags mean (a new one, or one to continue), then run it.

The tune flags (`tune.config.TUNE_FLAGS`) are shared with `toxtune submit`, which passes them on
to the job it sends, and partly with `toxtune ui`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tune.cli.configs import config_arg
from tune.config import TUNE_FLAGS

if TYPE_CHECKING:
    from tune.config import JobConfig


def add_tune_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The `tune` flags (shared with `submit`, which passes them on to the cluster job)."""
    p.add_argument(
        "--config",
        type=config_arg,
        help="YAML job config: a file, or a built-in name (see `toxtune configs`); flags "
        "override it",
    )
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


def resolve_job(args: argparse.Namespace) -> JobConfig:
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="run a hyperparameter search and register the best model")
    add_tune_flags(p)
    p.set_defaults(func=cmd_tune)
