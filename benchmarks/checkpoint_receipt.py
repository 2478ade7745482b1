"""The driver's CPU to receive a trial's checkpoint from a bucket, and a result without one.

    python benchmarks/checkpoint_receipt.py
    python benchmarks/checkpoint_receipt.py --results 300 --rounds 2

Every checkpoint a trial reports reaches the driver as a Ray object carrying its storage's
pyarrow filesystem; toxtune's trials checkpoint every epoch. A trial process (a Ray actor on a
local Ray) reports `--results` results, each a Tox21 trial's metrics
(`benchmarks.driver.tox21_result`), with or without a checkpoint on an S3 bucket's filesystem
(options as a `s3://` URI gives them, credentials from the environment; nothing is sent over
the network), set up two ways, alternated `--rounds` times:

- `Ray's default`: the trial process as Ray starts it (bare Tune's trials; toxtune's before
  2026-12-07): each checkpoint's filesystem is unpickled afresh in the driver;
- `toxtune`: the trial process set up as toxtune's trials are (`tune.settings
  .configure_trial_process`): the filesystem is sent by its options and the driver makes it
  once (`tune.storage.filesystem_from_options`).

Measured: the driver process's CPU ms per result received (`ray.get`, one at a time, after all
are in the object store), and how many distinct filesystem objects the driver ended with.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("Ray's default", "toxtune")
URI = "s3://toxtune-bench/results?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"


def trial_process(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class TrialProcess:
        """A trial's worker: reports results, each with or without a checkpoint."""

        def __init__(self, toxtune: bool) -> None:
            import pyarrow.fs as pafs

            from tune import settings

            if toxtune:
                settings.configure_trial_process()
            self.fs, self.root = pafs.FileSystem.from_uri(URI)
            self.rng = np.random.default_rng(0)

        def result(self, epoch: int, checkpoint: bool) -> Any:
            from ray import tune as ray_tune

            from benchmarks.driver import tox21_result

            metrics, _ = tox21_result(epoch, self.rng, 0.0, 0.1)
            if not checkpoint:
                return metrics, None
            path = f"{self.root}/trial/checkpoint_{epoch:06d}"
            return metrics, ray_tune.Checkpoint(path, filesystem=self.fs)

    return TrialProcess


def receive(ray: Any, trial: Any, results: int, checkpoint: bool) -> tuple[float, int]:
    """(driver CPU ms a result, distinct filesystems received)."""
    refs = [trial.result.remote(epoch, checkpoint) for epoch in range(1, results + 1)]
    ray.wait(refs, num_returns=len(refs))
    kept = []  # held, so that no two filesystems share an id
    start = time.process_time()
    for ref in refs:
        _, received = ray.get(ref)
        if received is not None:
            kept.append(received.filesystem)
    used = time.process_time() - start
    return 1000 * used / results, len({id(fs) for fs in kept})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # as a team's driver has them
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    import ray

    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; Ray {ray.__version__}")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    rows = []
    for round_ in range(1, args.rounds + 1):
        for mode in MODES:
            trial = trial_process(ray).remote(mode == "toxtune")
            receive(ray, trial, 5, True)  # the first unpickles (Ray's, pyarrow's) out of the way
            plain, _ = receive(ray, trial, args.results, False)
            with_checkpoint, systems = receive(ray, trial, args.results, True)
            rows.append((round_, mode, plain, with_checkpoint, systems))
            ray.kill(trial)
    print(f"\n{args.results} results a row; driver CPU ms a result received")
    head = f"{'round':>5}  {'trial process':<15}{'no checkpoint':>14}{'checkpoint':>11}"
    print(head + f"{'filesystems':>12}")
    for round_, mode, plain, with_checkpoint, systems in rows:
        print(f"{round_:>5}  {mode:<15}{plain:>14.3f}{with_checkpoint:>11.3f}{systems:>12}")


if __name__ == "__main__":
    main()
