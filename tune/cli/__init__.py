"""The `toxtune` command: tune, configs, data, predict, explain, ui, submit, jobs. Thin: parses.

Each subcommand lives in a module of this package that adds its parser (`register`) and runs it:
`tune_job` (tune), `configs` (configs, and built-in config names for --config), `data`,
`predict`, `explain`, `ui`, `cluster` (submit, jobs). Errors a user can act on are caught here,
in one place: one line on stderr, `toxtune <command>: error: ...`, and the exit code of the error
(2 for bad input, 1 for a job or a service that failed); the traceback only with --verbose.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from toxmodel.errors import CheckpointError, DataError
from tune import settings
from tune.cli import cluster, configs, data, explain, predict, tune_job, ui
from tune.errors import ToxtuneError

# What the CLI reports as one line (the traceback only with --verbose). toxmodel's errors are
# bad input (exit code 2; it never imports tune); each ToxtuneError carries its own exit code.
USER_ERRORS = (ToxtuneError, DataError, CheckpointError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toxtune",
        description="Hyperparameter search for molecular toxicity models: Ray Tune trials chosen "
        "by Optuna, tracked in MLflow. `toxtune COMMAND --help` for each command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (tune_job, configs, data, predict, explain, ui, cluster):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. `argv` None is the process's own command line (the
    `toxtune` entry point): the process ends with the command, so the heap is frozen first
    (`settings.freeze_heap_for_exit`); a caller passing `argv` keeps its collector as it was."""
    try:
        return _run(argv)
    finally:
        if argv is None:
            settings.freeze_heap_for_exit()


def _run(argv: list[str] | None) -> int:
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


__all__ = ["USER_ERRORS", "build_parser", "main"]
