"""`toxtune tune`: which job the flags mean (a new one, or one to continue), then run it.

The tune flags (`tune.flags.TUNE_FLAGS`) are shared with `toxtune submit`, which passes them on
to the job it sends, and partly with `toxtune ui`.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from tune.cli.configs import config_arg
from tune.flags import CONFIG_FILE, TUNE_FLAGS
from tune.identity import check_name
from tune.storage import Storage

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
    from tune.config import load_config, named
    from tune.errors import ConfigError

    overrides = tune_overrides(args)
    storage = Storage.open(str(overrides.get("ray.storage_path", "toxtune_results")))
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
        check_name(args.resume, "--resume")
        where = storage.uri_of(args.resume, CONFIG_FILE)
        saved = storage.read_text(args.resume, CONFIG_FILE)
        if saved is None:
            raise ConfigError(
                f"--resume {args.resume}: no saved job at {where} (jobs there: {_listed(storage)})"
            )
        return load_config(None, overrides, text=saved, where=where)
    job = load_config(args.config, overrides)
    return named(job, exists=job.storage.exists)


def _listed(storage: Storage) -> str:
    """The newest saved jobs under a local results folder ("not listed" for an object store)."""
    if not storage.is_local:
        return "not listed for an object store"
    jobs = sorted(p.parent.name for p in storage.local().glob(f"*/{CONFIG_FILE}"))
    return ", ".join(jobs[-10:]) if jobs else "none"


def cmd_tune(args: argparse.Namespace) -> int:
    job = resolve_job(args)
    from tune.drills import FaultPlan
    from tune.interrupt import STOP_TIMEOUT_S, shut_down_ray
    from tune.job import run_job
    from tune.report import print_result

    result = run_job(job, faults=FaultPlan.from_env(), stop_timeout_s=STOP_TIMEOUT_S)
    # The job is whole: a Ctrl-C while Ray stops changes nothing and says nothing. Ray stops
    # before the summary, so its workers' last lines ("Restored ... from checkpoint") come
    # before it rather than after the summary's last line.
    shut_down_ray()
    print_result(job, result)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="run a hyperparameter search and register the best model")
    add_tune_flags(p)
    p.set_defaults(func=cmd_tune)
