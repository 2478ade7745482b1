"""The errors a user of `toxtune` can meet, under one base class the CLI catches.

This module sits at the bottom of the import graph: it imports nothing from toxtune, so every
other module can raise these. Each class carries the exit code the CLI returns for it: 2 for
input the user can fix (a config value, a data file, a job name), 1 for a job that could not
run or finish. `toxmodel` raises its own `DataError` and `CheckpointError` (it never imports
`tune`); `tune.cli` maps those to exit code 2 as well.
"""

from __future__ import annotations


class ToxtuneError(Exception):
    """Base of every error toxtune reports to a user as one line (no traceback)."""

    exit_code = 1


class ConfigError(ToxtuneError, ValueError):
    """A configuration value or flag is unknown, of the wrong type, out of range, or conflicts
    with another; raised before Ray starts."""

    exit_code = 2


class JobMismatchError(ToxtuneError):
    """A command would continue a job whose data, targets, featurizer or split differ from what
    the saved job was run on (its record would mix two experiments)."""

    exit_code = 2


class SearchError(ToxtuneError, RuntimeError):
    """The search could not run or finish (error budget spent, nothing succeeded, ...)."""


class TrackingError(ToxtuneError, RuntimeError):
    """The tracking backend cannot be used, or a model cannot be registered."""


class ClusterError(ToxtuneError, RuntimeError):
    """A Ray cluster cannot be reached or cannot run the job as configured."""


class ServingError(ToxtuneError):
    """A model cannot be loaded or predictions cannot be written."""

    exit_code = 2


class JobInterruptedError(ToxtuneError):
    """SIGINT (Ctrl-C) or SIGTERM stopped a job before it finished. Nothing was finalized or
    registered and the job's state is kept: `--resume` continues it. The exit code is the
    shell's for a process stopped by that signal, 128 + its number (130, 143)."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number
