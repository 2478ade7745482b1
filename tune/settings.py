"""Process-wide settings, made once by an entry point (the `toxtune` command, a benchmark
script, the test session), never by library code as a side effect of a call."""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal

# Ray Tune environment variables toxtune relies on; a value the user set is kept.
TUNE_ENV = {
    # Snapshot the experiment (trial statuses, checkpoints, searcher) at most every 5 s, not
    # every loop step: a snapshot is a save and an upload of the whole experiment folder, which
    # at 64 trials in flight cost the driver most of its time (benchmarks/driver.py). Resume
    # after a killed driver stays exact because it trusts the study and the checkpoints, not
    # the snapshot: a trial the study finished is never trained again (tune.trainable), an
    # unfinished one continues from its newest checkpoint (bridge.NewestCheckpoint), and one
    # the snapshot never saw (started in its last 5 s) is failed in the study and replaced by a
    # new trial. `bridge.snapshots_by_time_only` stops `num_to_keep` forcing extra snapshots.
    "TUNE_GLOBAL_CHECKPOINT_S": "5",
    # Ray adds a JSON, a CSV and a TensorBoard logger per trial by default; the TensorBoard one
    # (its own thread and an event file per trial) took about 6 % of the driver's samples at 32
    # trials in flight (py-spy, benchmarks/driver.py) and nothing reads it: MLflow holds the
    # curves.
    # `tune.search.driver_callbacks` adds the JSON and CSV loggers (each trial's history).
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Ray warns when snapshots come faster than this; none are forced now, but keep it quiet.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


# The cyclic garbage collector runs a young collection every GC_THRESHOLDS[0] allocations of
# containers (Python's default: 700). Reading a 10^6-row file allocates a list per row, and with
# the ~400,000 objects imported Ray, MLflow and pandas leave in the heap the default let 11 full
# collections rescan them all: loading 10^6 rows took 4.3-4.7 s in the job's driver against
# 2.6-2.7 s with 10,000 (0.24 s for 10^5 either way: the cost appeared only past 10^5 rows).
GC_THRESHOLDS = (10_000, 10, 10)


# `kill -USR2 <pid>` makes a toxtune process print every thread's Python stack to its stderr and
# go on: where a job that looks stuck waits, without a debugger (py-spy needs ptrace, which
# containers often refuse). SIGUSR1 is not free: Ray Tune stops a run on it.
STACKS_SIGNAL = signal.SIGUSR2


class _RayResumeHint(logging.Filter):
    """Drops Ray Tune's "Resume experiment with: Tuner.restore(path=..., trainable=...)" after a
    stop. A toxtune job continues with the `--resume` command its own stop line names; a bare
    `Tuner.restore` would run the trials without the job's study, MLflow runs and registration."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def configure_process() -> None:
    """Set the environment toxtune's driver needs (before Ray starts), the collector's
    thresholds (GC_THRESHOLDS), the stacks on STACKS_SIGNAL and the filter of Ray Tune's
    resume hint."""
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)
    gc.set_threshold(*GC_THRESHOLDS)
    faulthandler.register(STACKS_SIGNAL, file=2, all_threads=True)  # stderr, even when captured
    tune_log = logging.getLogger("ray.tune.tune")  # the logger of ray/tune/tune.py (2.60.0)
    if not any(isinstance(f, _RayResumeHint) for f in tune_log.filters):
        tune_log.addFilter(_RayResumeHint())


def freeze_heap_for_exit() -> None:
    """Let a `toxtune` process end as soon as its command has: move every object into the
    collector's permanent generation. Python's finalization otherwise runs the collector over
    the whole heap the imports left (Ray, MLflow, torch, pandas): a small `toxtune tune` took
    2.9 s from its last line to its exit, 0.4 s with the heap frozen (benchmarks/cli_start.py
    --jobs). Only unreachable cycles then go without their
    finalizers; `atexit` handlers (Ray's shutdown, logging's flush, weakref finalizers such as
    temporary folders') and the flush of the standard streams still run. For the entry point
    only: in a process that goes on, frozen garbage would never be freed."""
    gc.freeze()


def configure_trial_process() -> None:
    """In a trial's worker process, at each trial's start (idempotent): quiet Ray's INFO line
    per saved checkpoint (one per epoch floods the console); send an object store's
    filesystem by its options, so the driver makes it once rather than once per checkpoint
    (`storage.filesystem_from_options`); upload a checkpoint to a bucket one request a file
    (`bridge.object_store_uploads`)."""
    import ray

    from tune import bridge, storage

    bridge.object_store_uploads()

    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    for cls in storage.SENT_BY_OPTIONS:
        ray.util.register_serializer(
            cls,
            serializer=storage.filesystem_options,
            deserializer=storage.filesystem_from_options,
        )
