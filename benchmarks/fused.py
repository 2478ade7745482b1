"""Finalize-step retrains fused (`toxmodel.fused.fit_many`) against one by one (`fit`).

    python benchmarks/fused.py [--config configs/tox21.yaml] [--data ../shared/data/tox21.csv]
                               [--cache /tmp/toxtune-bench] [--device cpu] [--epochs N]

After a search, a job retrains the best trial's configuration with seeds search.seed + k for
k in {0..final_seeds-1} and {1..ensemble-1} (tune.search._finish; 5 retrains for tox21.yaml).
This trains those retrains of the search's default point (its first trial, a typical winner's
shape: 1024-512 ReLU) with the config's featurizer, split, max_epochs and patience, one by one
and then fused, in one process (with --repeats, alternately), and prints the wall times, the
ratio of the best of each (wall and process CPU time, the latter less sensitive to other load on
the machine), and whether every member's weights came out identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from toxmodel.data import load_table
from toxmodel.featurize import featurize_cached
from toxmodel.fused import fit_many
from toxmodel.split import split_dataset
from toxmodel.train import fit
from tune.config import load_config
from tune.space import DEFAULT_POINT, to_run_configs


def retrain_offsets(final_seeds: int, ensemble: int) -> list[int]:
    """The seed offsets the finalize step retrains (as tune.search._finish picks them)."""
    spread = range(final_seeds) if final_seeds > 1 else range(0)
    return sorted({*spread, *range(1, ensemble)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/tox21.yaml")
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--cache", default="/tmp/toxtune-bench", help="feature cache folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=None, help="override search.max_epochs")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each way, alternated")
    args = parser.parse_args()

    job = load_config(args.config)
    table = load_table(args.data)
    features = featurize_cached(table.smiles, job.featurizer, Path(args.cache), table.content_hash)
    labels = table.labels[features.valid_rows]
    split = split_dataset([table.smiles[i] for i in features.valid_rows], labels, job.split)
    s = job.search
    epochs = args.epochs or s.max_epochs
    offsets = retrain_offsets(s.final_seeds, s.ensemble)
    pairs = [to_run_configs(DEFAULT_POINT, epochs, s.patience, s.seed + k) for k in offsets]
    model_config = pairs[0][0]
    configs = [train for _, train in pairs]
    print(
        f"machine: {platform.machine()} {platform.platform()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | device {args.device}"
    )
    print(
        f"data: {len(features)} rows ({len(split.train)} train), {features.n_features} inputs, "
        f"{len(table.tasks)} tasks | {len(configs)} retrains (seed offsets {offsets}) of "
        f"{model_config.hidden} batch {configs[0].batch_size}, <= {epochs} epochs, "
        f"patience {s.patience}"
    )
    args_fit = (features, labels, split, table.tasks, model_config)
    walls: dict[str, list[float]] = {"one by one": [], "fused": []}
    cpus: dict[str, list[float]] = {"one by one": [], "fused": []}  # process CPU seconds
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    for rep in range(args.repeats):  # alternate the order: ABBA...
        order = ["one by one", "fused"] if rep % 2 == 0 else ["fused", "one by one"]
        for way in order:
            started, cpu_started = time.perf_counter(), time.process_time()
            if way == "fused":
                fused = fit_many(*args_fit, configs, device=args.device)
            else:
                one_by_one = [fit(*args_fit, cfg, device=args.device) for cfg in configs]
            walls[way].append(time.perf_counter() - started)
            cpus[way].append(time.process_time() - cpu_started)
            print(
                f"  {way}: {walls[way][-1]:.1f} s wall, {cpus[way][-1]:.1f} s CPU "
                f"(load average {os.getloadavg()[0]:.2f})"
            )

    identical = 0
    for cfg, a, b in zip(configs, one_by_one, fused, strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        same = all(torch.equal(sa[k], sb[k]) for k in sa) and a.best_epoch == b.best_epoch
        identical += same
        print(
            f"  seed {cfg.seed}: epochs {len(a.history)}/{len(b.history)}, best "
            f"{a.best_epoch}/{b.best_epoch}, val ROC-AUC {a.best_valid.roc_auc:.4f}/"
            f"{b.best_valid.roc_auc:.4f} (one by one/fused), identical weights: {same}"
        )
    t_seq, t_fused = min(walls["one by one"]), min(walls["fused"])
    n_epochs = sum(len(r.history) for r in fused)
    print(
        f"one by one: {t_seq:.1f} s | fused: {t_fused:.1f} s (best of {args.repeats}; "
        f"{n_epochs} member-epochs)"
    )
    print(f"fused / one by one: {t_fused / t_seq:.2f} (speed-up {t_seq / t_fused:.2f}x)")
    c_seq, c_fused = min(cpus["one by one"]), min(cpus["fused"])
    print(f"CPU time: one by one {c_seq:.1f} s, fused {c_fused:.1f} s, ratio {c_fused / c_seq:.2f}")
    print(f"members with identical weights and best epoch: {identical} of {len(configs)}")


if __name__ == "__main__":
    main()
