"""Process-wide settings, made once by an entry point (the `toxtune` command, a benchmark
script, the test session), never by library code as a side effect of a call."""

from __future__ import annotations

import logging
import os

# Ray Tune environment variables toxtune relies on; a value the user set is kept.
TUNE_ENV = {
    # Snapshot the experiment every step, so a killed driver resumes from its latest state.
    "TUNE_GLOBAL_CHECKPOINT_S": "0",
    # One checkpoint kept per trial makes Tune snapshot after each new best epoch; Ray then
    # warns on every snapshot within 5 s. Expected here.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


def configure_process() -> None:
    """Set the environment toxtune's driver needs (before Ray starts)."""
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)


def quiet_worker_logs() -> None:
    """In a trial's worker process: Ray logs an INFO line per saved checkpoint, which with one
    checkpoint per best epoch floods the console."""
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
