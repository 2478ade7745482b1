"""Experiment snapshots as a job grows: what one upload of Tune's state costs.

    python benchmarks/snapshots.py
    python benchmarks/snapshots.py --ended 0 250 1000 --running 64 --epochs 40

Every `TUNE_GLOBAL_CHECKPOINT_S` (5 s) Tune saves the experiment into the driver's staging folder
and uploads that folder to the job's storage. The folder holds, beside the state, each trial's
logs (`result.json`, `progress.csv`: one row per epoch), so an upload of the whole folder sends
every ended trial's history again, and its cost grows with the job's results so far. Here a
staging folder holds `--ended` ended trials of `--epochs` epochs and `--running` trials that
report one epoch between two snapshots (rows as a Tox21 trial reports them:
`benchmarks.driver.tox21_result`); it is uploaded `--snapshots` times to an S3 bucket (moto's
server in its own process, as the team stack's) through Tune's own syncer with toxtune's patch
(`tune.bridge.consistent_experiment_uploads`), two ways side by side:

- `every file`: what was uploaded before 2026-12-07 (the patch's record of what was sent is
  emptied before each upload: the whole folder goes each time);
- `changed`: toxtune now (`tune.bridge.upload_copy` leaves out what the last upload sent and
  nothing changed since).

Per snapshot (the first, which sends everything either way, left out): MB sent, wall seconds
of the upload, and the CPU seconds of this process (the driver's share) and of moto's server.
The data is generated in a temporary folder and removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.driver import tox21_result
from benchmarks.storage import BUCKET, moto_process
from tune import bridge

MODES = ("every file", "changed")


def trial_rows(epochs: int, rng: np.random.Generator) -> list[dict]:
    """A trial's reported rows, epoch by epoch (what Tune's JSON logger writes)."""
    rows = []
    for epoch in range(1, epochs + 1):
        row, _ = tox21_result(epoch, rng, 0.0, 0.1)
        rows.append({**row, "training_iteration": epoch, "time_this_iter_s": 0.1})
    return rows


def write_logs(folder: Path, rows: list[dict]) -> None:
    """A trial's `result.json` and `progress.csv`, as Tune's JSON and CSV loggers leave them."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = sorted(rows[0])
    with (folder / "result.json").open("w") as out:
        out.writelines(json.dumps(r) + "\n" for r in rows)
    with (folder / "progress.csv").open("w") as out:
        out.write(",".join(keys) + "\n")
        out.writelines(",".join(str(r.get(k, "")) for k in keys) + "\n" for r in rows)


def append_epoch(folder: Path, row: dict) -> None:
    keys = sorted(row)
    with (folder / "result.json").open("a") as out:
        out.write(json.dumps(row) + "\n")
    with (folder / "progress.csv").open("a") as out:
        out.write(",".join(str(row.get(k, "")) for k in keys) + "\n")


def moto_cpu() -> float:
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("moto_server" in part for part in proc.info["cmdline"] or []):
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def measure(
    mode: str, ended: int, running: int, epochs: int, snapshots: int, uri: str
) -> tuple[float, float, float, float]:
    """(MB sent, wall s, driver CPU s, moto CPU s) per snapshot after the first."""
    import pyarrow.fs
    from ray.train._internal import storage

    rng = np.random.default_rng(0)
    template = trial_rows(epochs, rng)
    root = Path(tempfile.mkdtemp(prefix="toxtune-snapshots-"))
    staging = root / "driver_artifacts"
    try:
        for i in range(ended):
            write_logs(staging / f"trial_{i:05d}", template)
        live = [staging / f"trial_r{i:03d}" for i in range(running)]
        for folder in live:
            write_logs(folder, template[:1])
        fs, path = pyarrow.fs.FileSystem.from_uri(f"{uri}/{mode.replace(' ', '-')}-{ended}")
        syncer = storage._FilesystemSyncer(storage_filesystem=fs, sync_period=0, sync_timeout=600)
        totals = np.zeros(4)
        for snapshot in range(snapshots + 1):
            state = {"snapshot": snapshot, "trials": ended + running}
            (staging / "experiment_state-x.json").write_text(json.dumps(state))
            for folder in live:
                append_epoch(folder, template[min(snapshot + 1, epochs - 1)])
            if mode == "every file" and snapshot:  # forget what was sent: all goes again
                assert syncer.__dict__.pop("_toxtune_sent", None) is not None, "patch renamed?"
            t0, c0, m0 = time.perf_counter(), time.process_time(), moto_cpu()
            assert syncer.sync_up(str(staging), path)
            upload_dir = syncer._toxtune_upload_dir
            sent = folder_mb(Path(upload_dir))
            syncer.wait()
            took = np.array(
                [sent, time.perf_counter() - t0, time.process_time() - c0, moto_cpu() - m0]
            )
            if snapshot:  # the first sends everything either way
                totals += took
        return tuple(totals / snapshots)  # type: ignore[return-value]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ended", type=int, nargs="+", default=[0, 250, 1000])
    parser.add_argument("--running", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40, help="epochs an ended trial ran")
    parser.add_argument("--snapshots", type=int, default=3, help="measured, after the first")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs")
    bridge.consistent_experiment_uploads()
    print(
        f"{'ended trials':>12}{'mode':>12}{'MB sent':>9}{'wall s':>8}{'driver CPU s':>13}"
        f"{'moto CPU s':>11}   (a snapshot, {args.running} trials running)"
    )
    with moto_process(Path(tempfile.mkdtemp()) / "moto.log"):
        for ended in args.ended:
            for mode in MODES:
                mb, wall, cpu, moto = measure(
                    mode, ended, args.running, args.epochs, args.snapshots, f"s3://{BUCKET}"
                )
                print(f"{ended:>12}{mode:>12}{mb:>9.1f}{wall:>8.2f}{cpu:>13.2f}{moto:>11.2f}")


if __name__ == "__main__":
    main()
