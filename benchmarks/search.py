"""Search benchmarks: trial utilisation, and TPE+ASHA against random search + FIFO.

    python benchmarks/search.py utilisation --data ../shared/data/tox21.csv
    python benchmarks/search.py compare --data ../shared/data/tox21.csv --seeds 0 1 2
    python benchmarks/search.py packing --per-gpu 1 2 4 8 --trials 32   # on a GPU machine

`utilisation`: two concurrent trials on a 2-CPU machine; the share of (wall time x concurrency),
counted from the moment Ray is up, that trials spend inside training epochs.
`compare`: the same trial budget and seeds for both; for each seed, the wall time TPE+ASHA needs
to reach the final best validation ROC-AUC of random+FIFO, as a share of random+FIFO's wall time.
`packing`: the same trials (random search, FIFO) with k trials sharing each GPU
(`gpus_per_trial = 1/k`, the machine's CPUs split evenly); prints trials per hour for each k.
Without a CUDA GPU it refuses, unless `--logical-gpus N` asks for Ray's logical GPUs on the CPU
(which checks the schedule, not GPU throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import torch
from ray import tune as ray_tune

from tune import settings
from tune.config import JobConfig, load_config
from tune.job import run_job
from tune.prepare import prepare_data
from tune.search import init_ray
from tune.study import METRIC, MODE


def job_for(args: argparse.Namespace, root: Path, name: str, **extra: object) -> JobConfig:
    overrides: dict[str, object] = {
        "data.source": args.data,
        "featurizer.n_bits": 2048,
        "search.num_samples": args.trials,
        "search.max_epochs": args.epochs,
        "search.max_concurrent": 2,
        "search.patience": 0,
        "search.grace_period": 2,
        "search.reduction_factor": 3,
        "resources.cpus_per_trial": 1,
        "ray.storage_path": str(root),
        "ray.num_cpus": 2,
        "tracking.run_name": name,
        "tracking.experiment_name": "benchmark",
        "tracking.registered_model_name": "benchmark",
    }
    overrides.update(extra)
    return load_config(overrides=overrides)


def histories(job: JobConfig) -> list[pd.DataFrame]:
    analysis = ray_tune.ExperimentAnalysis(
        str(job.storage_root / job.name), default_metric=METRIC, default_mode=MODE
    )
    return [df for df in analysis.trial_dataframes.values() if not df.empty]


def run_timed(job: JobConfig) -> tuple[float, float, list[pd.DataFrame]]:
    """(t0 after Ray is up, t_end, per-trial histories)."""
    if ray.is_initialized():
        ray.shutdown()
    init_ray(job)
    t0 = time.time()
    run_job(job, progress=False)
    t1 = time.time()
    ray.shutdown()
    return t0, t1, histories(job)


def utilisation(args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        job = job_for(args, Path(tmp), "util", **{"search.scheduler": "fifo"})
        # Warm the feature cache so the figure is about the search, not RDKit.
        prepare_data(job, progress=False)
        t0, _, hist = run_timed(job)
    # Search end = last trial report; registration and test scoring come after.
    end = max(float(h["reported_at"].max()) for h in hist)
    training = sum(float(h["epoch_seconds"].sum()) for h in hist)
    wall = end - t0
    share = training / (wall * 2)
    return {"trials": len(hist), "wall_s": wall, "training_s": training, "share": share}


def best_curve(t0: float, hist: list[pd.DataFrame]) -> pd.DataFrame:
    """Best validation ROC-AUC seen so far against seconds since Ray was up."""
    points = pd.concat([h[["reported_at", "val_roc_auc"]] for h in hist], ignore_index=True)
    points = points.sort_values("reported_at")
    points["t"] = points["reported_at"] - t0
    points["best"] = points["val_roc_auc"].cummax()
    return points[["t", "best"]]


def compare(args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            base = job_for(
                args,
                root,
                f"random-{seed}",
                **{"search.searcher": "random", "search.scheduler": "fifo", "search.seed": seed},
            )
            prepare_data(base, progress=False)
            r0, _, rh = run_timed(base)
            tuned = job_for(
                args,
                root,
                f"tpe-{seed}",
                **{"search.searcher": "optuna", "search.scheduler": "asha", "search.seed": seed},
            )
            t0, _, th = run_timed(tuned)
        rcurve, tcurve = best_curve(r0, rh), best_curve(t0, th)
        target = float(rcurve["best"].iloc[-1])
        r_wall = float(rcurve["t"].iloc[-1])
        reached = tcurve[tcurve["best"] >= target - 1e-12]
        t_reach = float(reached["t"].iloc[0]) if len(reached) else float("nan")
        rows.append(
            {
                "seed": seed,
                "random_fifo_best": target,
                "random_fifo_wall_s": r_wall,
                "tpe_asha_best": float(tcurve["best"].iloc[-1]),
                "tpe_asha_wall_s": float(tcurve["t"].iloc[-1]),
                "tpe_asha_time_to_random_best_s": t_reach,
                "ratio": t_reach / r_wall,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def packing(args: argparse.Namespace) -> list[dict[str, float]]:
    gpus = torch.cuda.device_count()
    if args.logical_gpus:
        gpus = args.logical_gpus
    elif gpus == 0:
        raise SystemExit(
            "packing needs a CUDA GPU (none visible); --logical-gpus N runs the same schedule "
            "on Ray's logical GPUs, which checks the script but measures no GPU"
        )
    cpus = os.cpu_count() or 1
    rows = []
    for k in args.per_gpu:
        with tempfile.TemporaryDirectory() as tmp:
            job = job_for(
                args,
                Path(tmp),
                f"pack-{k}",
                **{
                    "search.searcher": "random",
                    "search.scheduler": "fifo",
                    "search.max_concurrent": k * gpus,
                    "resources.gpus_per_trial": 1.0 / k,
                    "resources.cpus_per_trial": max(1.0, cpus // (k * gpus)),
                    "ray.num_cpus": cpus,
                    "ray.num_gpus": gpus,
                },
            )
            prepare_data(job, progress=False)
            t0, _, hist = run_timed(job)
        end = max(float(h["reported_at"].max()) for h in hist)
        rows.append(
            {
                "per_gpu": k,
                "gpus": gpus,
                "logical": bool(args.logical_gpus),
                "trials": len(hist),
                "wall_s": end - t0,
                "trials_per_hour": len(hist) / (end - t0) * 3600,
                "devices": sorted({str(d) for h in hist for d in h["device"].unique()}),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    settings.configure_process()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=["utilisation", "compare", "packing"])
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-gpu", type=int, nargs="+", default=[1, 2, 4, 8], help="packing")
    parser.add_argument("--logical-gpus", type=int, default=0, help="packing without a GPU")
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {platform.processor() or 'cpu'}")
    if args.what == "utilisation":
        out = utilisation(args)
        print(json.dumps(out))
        print(f"training share of wall x concurrency: {out['share']:.1%} (target >= 80%)")
    elif args.what == "packing":
        for row in packing(args):
            print(
                f"{row['per_gpu']} trial(s) per GPU: {row['trials_per_hour']:.0f} trials/hour "
                f"({row['trials']} trials in {row['wall_s']:.0f} s on {row['devices']})"
            )
    else:
        rows = compare(args)
        # A seed where TPE+ASHA never reached random+FIFO's best counts as never (inf).
        ratios = [r["ratio"] if np.isfinite(r["ratio"]) else float("inf") for r in rows]
        print(
            f"TPE+ASHA time to random+FIFO's best / random+FIFO wall: "
            f"median {np.median(ratios):.2f} (target <= 0.5); per seed {ratios}"
        )


if __name__ == "__main__":
    main()
