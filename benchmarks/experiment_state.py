"""Tune's experiment state as a job's trials add up: its size, noted and without notes.

    python benchmarks/experiment_state.py
    python benchmarks/experiment_state.py --trials 50 200 --rows 600

Every 5 s Tune writes the experiment state (one JSON holding every trial's state, ended trials
included) and uploads it whole. Each trial's state pickles the trial's storage, which shares
the driver's syncer; toxtune's snapshot patch (`tune.bridge.consistent_experiment_uploads`)
notes on that syncer every file its uploads sent. Each trial's state also holds Ray's running
statistics of every metric it reports. Real toxtune jobs (`configs/quick.yaml`'s search: 8
epochs, ASHA, two trials at a time, on the first `--rows` rows of `--data`) with `--trials`
trials, three ways side by side:

- `noted`: what toxtune did before 2026-12-07 (the syncer pickled with its note: Ray's own
  `__getstate__`; statistics of every metric);
- `without notes`: `state_without_notes` leaves the note and the last upload's command out of
  the pickle (statistics of every metric);
- `one metric`: toxtune now, also with Ray's statistics of the search metric only
  (`tune.bridge.metric_statistics_only`).

Per job: the newest experiment state's size (MB), the largest trial's pickled storage (KB),
and the job's wall seconds. The jobs write to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune import bridge, settings
from tune.config import load_config
from tune.job import run_job

MODES = ("noted", "without notes", "one metric")
STATISTICS_ONLY = bridge.metric_statistics_only  # the job calls it; the first modes skip it
QUICK = Path(bridge.__file__).parent / "configs" / "quick.yaml"


def every_metric(metrics: object) -> None:
    """Ray's own statistics of every metric (what the job's call does in the first modes)."""
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    update = _TrainingRunMetadata.update_metric
    _TrainingRunMetadata.update_metric = getattr(update, "_toxtune_original", update)


def configured(mode: str, without_notes: object) -> None:
    """Make Tune's syncer pickle, and Ray keep statistics, as `mode` says. `without_notes`:
    the snapshot patch's `__getstate__` (the patch is applied once, before the first job; the
    job's own call then changes nothing)."""
    from ray.train._internal import storage
    from ray.train._internal.syncer import _BackgroundSyncer

    bridge.metric_statistics_only = STATISTICS_ONLY if mode == "one metric" else every_metric
    ray_own = _BackgroundSyncer.__getstate__
    storage._FilesystemSyncer.__getstate__ = ray_own if mode == "noted" else without_notes


def state_figures(job_dir: Path) -> tuple[float, float]:
    """(MB of the newest experiment state, KB of the largest trial's pickled storage)."""
    newest = max(job_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    trials = json.loads(newest.read_text())["trial_data"]
    storage_kb = max(len(json.loads(t)["storage"]["value"]) / 2 for t, _ in trials) / 1024
    return newest.stat().st_size / 1e6, storage_kb


def main() -> None:
    settings.configure_process()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--trials", type=int, nargs="+", default=[50, 200])
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or 'cpu'}")
    from ray.train._internal import storage

    bridge.consistent_experiment_uploads()
    without_notes = storage._FilesystemSyncer.__getstate__
    rows: list[tuple[int, str, float, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp, "molecules.csv")
        with open(args.data) as src:
            data.write_text("".join(itertools.islice(src, args.rows + 1)))
        for n in args.trials:
            for mode in MODES:
                configured(mode, without_notes)
                name = f"state-{n}-{mode.replace(' ', '-')}"
                job = load_config(
                    QUICK,
                    {
                        "data.source": str(data),
                        "search.num_samples": n,
                        "ray.storage_path": str(Path(tmp, "results")),
                        "tracking.run_name": name,
                        "tracking.registered_model_name": "state-benchmark",
                    },
                )
                start = time.perf_counter()
                run_job(job, progress=False)
                wall = time.perf_counter() - start
                mb, kb = state_figures(job.storage_root / job.name)
                rows.append((n, mode, mb, kb, wall))
                print(f"[{n} trials, {mode}: {mb:.1f} MB, {kb:.1f} KB, {wall:.0f} s]", flush=True)
    print(f"{'trials':>7} {'mode':<14}{'state MB':>9}{'storage KB':>11}{'wall s':>8}")
    for n, mode, mb, kb, wall in rows:
        print(f"{n:>7} {mode:<14}{mb:>9.1f}{kb:>11.1f}{wall:>8.0f}")


if __name__ == "__main__":
    main()
