"""Model quality on Tox21 and ToxCast: baselines, and the tuned protocol of issue 7.

    python benchmarks/quality.py baseline --data ../shared/data/tox21.csv
    python benchmarks/quality.py protocol --config configs/tox21.yaml --split random
    python benchmarks/quality.py protocol --config configs/tox21.yaml --split scaffold
    python benchmarks/quality.py protocol --config configs/toxcast.yaml \
        --data ../shared/data/toxcast.csv.gz --split random
    python benchmarks/quality.py nr-ar --config configs/tox21.yaml
    python benchmarks/quality.py protocol --config configs/tox21.yaml --split scaffold \
        --repeats 2 --trust
    python benchmarks/quality.py folds --config configs/tox21.yaml --splits random scaffold \
        --folds 5
    python benchmarks/quality.py small --configs configs/small.yaml configs/tox21.yaml

`baseline`:
1. The Tox21 tutorial's experiment, reproduced as it is written: NR-AR only, 1024-bit radius-2
   Morgan bits, 80/10/10 random split, a 1024->512->1 tanh MLP, SGD lr 0.1, BCE-with-logits,
   100 epochs, batch 128, the last epoch's weights. Prints test accuracy (the tutorial's metric)
   beside the majority-class accuracy, and test ROC-AUC / PR-AUC.
2. toxtune's default configuration (`tune.space.DEFAULT_POINT`, the first trial of every
   search) trained for a fixed budget with early stopping on validation mean ROC-AUC, on a
   random split and on a scaffold split, for each split seed (training seed = split seed).

`protocol`: the MoleculeNet protocol (80/10/10, mean test ROC-AUC over tasks, mean and std over
split seeds). For each split seed a whole toxtune job runs (`tune.job.run_job`: Optuna TPE +
ASHA on Ray, MLflow in a temporary SQLite store) with the config file, its split seed and search
seed set to that seed. The search and the ensemble choose on validation only; the job scores the
test split once, for the registered model. That figure is the one reported.

With `--trust` each job's registered model is also asked what issue 16 added, on its test split
(`trust_figures`): ROC-AUC on the half of predictions with the smallest ensemble spread against
the half with the largest, the rank correlation of absolute error with spread, ROC-AUC in and out
of the applicability domain (and the share out), and ECE and Brier score before and after
calibration. `--repeats N` runs each split seed N times, so the spread of repeated runs of one
seed can be set beside the spread over seeds.

`folds`: issue 26 item 3. For each split seed, the config's job as it is (`search.folds: 1`) and
then the same job with `search.folds: K` (`--folds`, ensemble 1: the fold models are the
registered model), whose search is given the wall time the first job took less the non-search
time of the last k-fold job (`search.time_limit_s`), so both jobs take about the same wall time;
`--equal-trials-seeds` also runs the k-fold job without a time limit (the config's number of
trials) for those seeds; `--equal-trials-only` runs only that job, for every split seed (to set
beside an earlier sitting's folds 1 figures); `--trees` gives the k-fold variant
`search.trees: true` (its trees, trained in finalize, count in its non-search time). Reports
test ROC-AUC mean +- std over seeds, the validation-test gap (the winner's selection score, a
single split's or the fold mean, less the registered model's test ROC-AUC) and wall time, per
variant.

`small`: issue 26 item 4. A fixed random slice of Tox21 (`--slice` molecules, chosen with
numpy's default_rng(0), written to a temporary file, never kept), and on it each of `--configs`
(default configs/small.yaml against configs/tox21.yaml) once per split seed (`--repeats` times):
test ROC-AUC mean +- std over seeds, the std of repeated runs, the validation-test gap and wall.

`nr-ar`: the tutorial's setting (NR-AR only, its labelled rows, random split seed 0): the
tutorial's model and a toxtune job on the same rows and the same split, test ROC-AUC and PR-AUC
side by side.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn

from toxmodel.checkpoint import Predictor, load_checkpoint
from toxmodel.data import load_table
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.metrics import Metrics, brier_score, evaluate, expected_calibration_error
from toxmodel.split import SplitConfig, split_dataset
from toxmodel.train import FitResult, fit
from tune import settings
from tune.config import load_config
from tune.finalize import FINAL_DIR
from tune.job import JobResult, run_job
from tune.prepare import prepare_data
from tune.space import DEFAULT_POINT, to_run_configs
from tune.study import METRIC
from tune.trainable import CHECKPOINT_FILE


def tutorial_baseline(data: str, epochs: int) -> tuple[Metrics, list[str]]:
    """The tutorial's loop in plain PyTorch (full-batch evaluation of the last epoch).

    Returns the test metrics and the test SMILES (so a tuned model can be checked to share them).
    """
    table = load_table(data, targets=["NR-AR"])
    feats = featurize(table.smiles, FeaturizerConfig(radius=2, n_bits=1024))
    y = table.labels[feats.valid_rows, 0]
    keep = ~np.isnan(y)
    x = feats.fingerprint[keep].astype(np.float32)
    y = y[keep].astype(np.float32)
    smiles = [table.smiles[i] for i in feats.valid_rows[keep]]
    split = split_dataset(smiles, y[:, None], SplitConfig(method="random", seed=0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 512), nn.Tanh(), nn.Linear(512, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    train = torch.as_tensor(split.train)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for b in train[torch.randperm(len(train))].split(128):
            opt.zero_grad()
            loss_fn(model(xt[b]).squeeze(1), yt[b]).backward()
            opt.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        prob = torch.sigmoid(model(xt[split.test]).squeeze(1)).numpy()
    y_test = y[split.test]
    m = evaluate(y_test[:, None], prob[:, None], ["NR-AR"])
    accuracy = float(np.mean((prob >= 0.5) == (y_test == 1)))
    majority = float(max(y_test.mean(), 1 - y_test.mean()))
    print(
        f"tutorial NR-AR baseline ({epochs} epochs, {seconds:.0f} s): rows {len(y)} "
        f"(positive rate {y.mean():.3f}), test n={len(y_test)}"
    )
    print(
        f"  test accuracy {accuracy:.4f} (majority class {majority:.4f})  "
        f"ROC-AUC {m.roc_auc:.4f}  PR-AUC {m.pr_auc:.4f}"
    )
    return m, [smiles[i] for i in split.test]


def default_mlp(data: str, epochs: int, patience: int, threads: int, seeds: list[int]) -> None:
    """The default configuration on all tasks, random and scaffold split, per split seed."""
    table = load_table(data)
    feats = featurize(table.smiles, FeaturizerConfig())
    labels = table.labels[feats.valid_rows]
    smiles = [table.smiles[i] for i in feats.valid_rows]
    print(
        f"default MLP: {len(table.tasks)} tasks, {len(smiles)} molecules, "
        f"{feats.n_features} inputs, <= {epochs} epochs (patience {patience})"
    )
    for method in ("random", "scaffold"):
        tests = []
        for seed in seeds:
            model_config, train_config = to_run_configs(DEFAULT_POINT, epochs, patience, seed)
            split = split_dataset(smiles, labels, SplitConfig(method=method, seed=seed))
            t0 = time.perf_counter()
            result = fit(
                feats, labels, split, table.tasks, model_config, train_config, num_threads=threads
            )
            seconds = time.perf_counter() - t0
            test = _test_metrics(result, [smiles[i] for i in split.test], labels[split.test])
            tests.append(test.roc_auc)
            print(
                f"  {method:<8} split, seed {seed}: val mean ROC-AUC "
                f"{result.best_valid.roc_auc:.4f} (PR-AUC {result.best_valid.pr_auc:.4f}) at "
                f"epoch {result.best_epoch}; test ROC-AUC {test.roc_auc:.4f} PR-AUC "
                f"{test.pr_auc:.4f}; {seconds:.0f} s"
            )
        if len(tests) > 1:
            print(
                f"  {method:<8} split: test mean ROC-AUC over seeds {seeds}: "
                f"{np.mean(tests):.4f} +- {np.std(tests, ddof=1):.4f}"
            )


def _test_metrics(result: FitResult, smiles: list[str], labels: np.ndarray) -> Metrics:
    """Score the test rows through a saved checkpoint, from SMILES, as a user would."""
    with tempfile.TemporaryDirectory() as tmp:
        predictor = load_checkpoint(result.save(Path(tmp) / "model.pt"))
        prob = predictor.predict(smiles)[predictor.tasks].to_numpy(dtype=np.float32)
    return evaluate(labels, prob, predictor.tasks)


# Published references (test ROC-AUC, mean +- std), as the issue lists them.
REFERENCES = {
    ("tox21", "random"): "GraphConv 0.829 +- 0.006; Chemprop D-MPNN + RDKit 0.851 +- 0.002",
    ("tox21", "scaffold"): "D-MPNN 0.826 +- 0.023; GROVER 0.803 +- 0.020",
    ("toxcast", "random"): "Chemprop 0.748 +- 0.014; GraphConv 0.716 +- 0.014",
}
TARGETS = {("tox21", "random"): 0.85, ("tox21", "scaffold"): 0.80, ("toxcast", "random"): 0.75}


def tuned_job(
    config: str, data: str, split: str, seed: int, root: Path, name: str, extra: dict[str, Any]
) -> JobResult:
    """One whole toxtune job: search on validation, test scored once for the chosen model."""
    overrides: dict[str, Any] = {
        "data.source": data,
        "split.method": split,
        "split.seed": seed,
        "search.seed": seed,
        "ray.storage_path": str(root),
        "tracking.run_name": name,
        **extra,
    }
    return run_job(load_config(config, overrides=overrides), progress=False)


def _mean_auc(y: np.ndarray, p: np.ndarray, rows: list[np.ndarray]) -> float:
    """Mean over tasks of ROC-AUC on each task's chosen rows (tasks whose rows lack a class are
    left out); NaN when no task can be scored."""
    scores = []
    for j, chosen in enumerate(rows):
        yj, pj = y[chosen, j], p[chosen, j]
        if len(np.unique(yj)) == 2:
            scores.append(roc_auc_score(yj, pj))
    return float(np.mean(scores)) if scores else float("nan")


def trust_figures(predictor: Predictor, smiles: list[str], labels: np.ndarray) -> dict[str, float]:
    """What the spread, the domain flag and the calibration are worth on one test split.

    Per task over its labelled rows: the half with the smallest ensemble spread ("confident")
    against the rest; Spearman's rho of |label - calibrated probability| with the spread
    (pooled within a task, averaged over tasks); rows in the applicability domain against rows
    out of it. ECE and Brier over every labelled (row, task), raw and calibrated.
    """
    out = predictor.predict(smiles)
    raw = predictor.predict(smiles, calibrated=False)
    tasks = predictor.tasks
    p = out[tasks].to_numpy(dtype=np.float64)
    p_raw = raw[tasks].to_numpy(dtype=np.float64)
    spread = out[[f"{t}_std" for t in tasks]].to_numpy(dtype=np.float64)
    inside = out["in_domain"].to_numpy(dtype=bool)
    y = np.asarray(labels, dtype=np.float64)
    confident, doubtful, rhos = [], [], []
    for j in range(len(tasks)):
        rows = np.flatnonzero(~np.isnan(y[:, j]) & ~np.isnan(spread[:, j]))
        order = rows[np.argsort(spread[rows, j], kind="stable")]
        half = len(order) // 2
        confident.append(order[:half])
        doubtful.append(order[half:])
        if len(rows) > 2:
            rho = spearmanr(spread[rows, j], np.abs(y[rows, j] - p[rows, j])).statistic
            if np.isfinite(rho):
                rhos.append(rho)
    labelled = [np.flatnonzero(~np.isnan(y[:, j])) for j in range(len(tasks))]
    return {
        "auc_confident_half": _mean_auc(y, p, confident),
        "auc_doubtful_half": _mean_auc(y, p, doubtful),
        "spearman_error_spread": float(np.mean(rhos)) if rhos else float("nan"),
        "auc_in_domain": _mean_auc(y, p, [r[inside[r]] for r in labelled]),
        "auc_out_of_domain": _mean_auc(y, p, [r[~inside[r]] for r in labelled]),
        "out_of_domain_share": float(np.mean(~inside)),
        "ece_raw": expected_calibration_error(y, p_raw),
        "ece": expected_calibration_error(y, p),
        "brier_raw": brier_score(y, p_raw),
        "brier": brier_score(y, p),
    }


def _job_trust(
    config: str, data: str, split: str, seed: int, root: Path, name: str, extra: dict[str, Any]
) -> dict[str, float]:
    """trust_figures for a finished protocol job: its final checkpoint on its test split."""
    job = load_config(
        config,
        overrides={
            "data.source": data,
            "split.method": split,
            "split.seed": seed,
            "ray.storage_path": str(root),
            "tracking.run_name": name,
            **extra,
        },
    )
    prepared = prepare_data(job, progress=False)
    test = prepared.split.test
    smiles = [prepared.table.smiles[i] for i in prepared.features.valid_rows[test]]
    predictor = load_checkpoint(root / name / FINAL_DIR / CHECKPOINT_FILE)
    return trust_figures(predictor, smiles, prepared.labels[test])


def protocol(args: argparse.Namespace) -> None:
    """The config's job once per split seed; test ROC-AUC mean and std over the seeds."""
    dataset = "toxcast" if "toxcast" in Path(args.data).name else "tox21"
    rows, walls = [], []
    tests: dict[int, list[float]] = {}
    trust: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.split_seeds:
            for run in range(args.repeats):
                name = f"q-{seed}-{run}"
                t0 = time.perf_counter()
                result = tuned_job(
                    args.config, args.data, args.split, seed, Path(tmp), name, args.extra
                )
                wall = time.perf_counter() - t0
                tests.setdefault(seed, []).append(result.test.roc_auc)
                walls.append(wall)
                rows.append(
                    f"  split seed {seed} run {run}: {len(result.trials)} trials, best val "
                    f"ROC-AUC {result.trials[METRIC].max():.4f}; test ROC-AUC "
                    f"{result.test.roc_auc:.4f} PR-AUC {result.test.pr_auc:.4f} "
                    f"({len(result.test.per_task)} tasks scored); {wall:.0f} s"
                )
                print(rows[-1], flush=True)
                if args.trust:
                    figures = _job_trust(
                        args.config, args.data, args.split, seed, Path(tmp), name, args.extra
                    )
                    trust.append(figures)
                    print("    trust: " + json.dumps({k: round(v, 4) for k, v in figures.items()}))
    per_seed = [float(np.mean(v)) for v in tests.values()]
    mean = float(np.mean(per_seed))
    std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
    repeated = [float(np.std(v, ddof=1)) for v in tests.values() if len(v) > 1]
    if repeated:
        print(
            f"run-to-run: std of repeated runs of one seed (mean over seeds) "
            f"{np.mean(repeated):.4f}; std over seeds of the per-seed means {std:.4f}"
        )
    if trust:
        keys = trust[0].keys()
        print(
            "trust, mean over jobs: "
            + json.dumps({k: round(float(np.nanmean([t[k] for t in trust])), 4) for k in keys})
        )
    target = TARGETS.get((dataset, args.split))
    verdict = (
        "" if target is None else f" (target >= {target}: {'met' if mean >= target else 'NOT met'})"
    )
    print(
        f"{dataset} {args.split} split, {args.config}, seeds {args.split_seeds}: test mean "
        f"ROC-AUC {mean:.4f} +- {std:.4f}{verdict}; per seed "
        f"{', '.join(f'{t:.4f}' for t in per_seed)}; wall {sum(walls) / 60:.1f} min "
        f"({np.mean(walls):.0f} s per job); references: "
        f"{REFERENCES.get((dataset, args.split), '-')}"
    )


# One job of the `folds` comparison: test ROC-AUC, validation-test gap, wall s, trials.
FoldRow = tuple[float, float, float, int]


def scored_job(
    label: str,
    config: str,
    data: str,
    split: str,
    seed: int,
    root: Path,
    name: str,
    extra: dict[str, Any],
) -> tuple[JobResult, float, float]:
    """`tuned_job`, timed and printed as one line: (result, wall seconds, gap), the gap being
    the winner's selection score less the registered model's test ROC-AUC."""
    t0 = time.perf_counter()
    result = tuned_job(config, data, split, seed, root, name, extra)
    wall = time.perf_counter() - t0
    chosen = float(result.trials[METRIC].max())
    gap = chosen - result.test.roc_auc
    print(
        f"  {label}: {len(result.trials)} trials, chosen on {chosen:.4f}, test ROC-AUC "
        f"{result.test.roc_auc:.4f} (gap {gap:+.4f}; {len(result.test.per_task)} tasks scored); "
        f"wall {wall:.0f} s, search {result.search_seconds:.0f} s",
        flush=True,
    )
    return result, wall, gap


def _fold_job(
    args: argparse.Namespace, split: str, seed: int, variant: str, extra: dict[str, Any], root: Path
) -> tuple[FoldRow, float]:
    """One whole job of the `folds` comparison; its row and its search's wall seconds."""
    name = f"f-{split}-{seed}-{variant.replace(' ', '_')}"
    label = f"{split} seed {seed} {variant}"
    result, wall, gap = scored_job(
        label, args.config, args.data, split, seed, root, name, {**args.extra, **extra}
    )
    return (result.test.roc_auc, gap, wall, len(result.trials)), result.search_seconds


def folds(args: argparse.Namespace) -> None:
    """Folds 1 against folds K per split seed, at equal wall time (and, for some seeds, at the
    same number of trials): test ROC-AUC, validation-test gap, wall."""
    # non-search seconds of a k-fold job until one has been measured (with trees: their 130 s
    # more, RESULTS "Trees beside the networks", so the first pair's walls match too)
    k_overhead = 30.0
    k_set = {"search.folds": args.folds, "search.ensemble": 1, "search.final_seeds": 1}
    if args.trees:
        k_set["search.trees"] = True  # the k-fold variant's model: fold networks + trees
        k_overhead += 130.0
    timed, untimed = f"folds {args.folds} equal wall", f"folds {args.folds} equal trials"
    for split in args.splits:
        found: dict[str, list[FoldRow]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for seed in args.split_seeds:
                if not args.equal_trials_only:
                    row, _ = _fold_job(args, split, seed, "folds 1", {"search.folds": 1}, Path(tmp))
                    found.setdefault("folds 1", []).append(row)
                    limit = max(row[2] - k_overhead, 60.0)
                    extra = {**k_set, "search.time_limit_s": limit}
                    row, search_s = _fold_job(args, split, seed, timed, extra, Path(tmp))
                    found.setdefault(timed, []).append(row)
                    k_overhead = row[2] - search_s
                if args.equal_trials_only or seed in args.equal_trials_seeds:
                    row, _ = _fold_job(args, split, seed, untimed, k_set, Path(tmp))
                    found.setdefault(untimed, []).append(row)
        for variant, rows in found.items():
            tests, gaps, walls, trials = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
            std = float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0
            print(
                f"tox21 {split}, {variant}, {len(rows)} seeds: test ROC-AUC {tests.mean():.4f} "
                f"+- {std:.4f} (per seed {', '.join(f'{t:.4f}' for t in tests)}); gap "
                f"{gaps.mean():+.4f}; wall {walls.mean():.0f} s per job; {trials.mean():.1f} "
                "trials per job",
                flush=True,
            )


def tox21_slice(data: str, n: int, out: Path) -> Path:
    """A fixed random subset of `n` rows of the data file (default_rng(0)), in file order."""
    table = pd.read_csv(data)
    rows = np.sort(np.random.default_rng(0).choice(len(table), size=n, replace=False))
    table.iloc[rows].to_csv(out, index=False)
    return out


def small(args: argparse.Namespace) -> None:
    """Each config on a fixed slice of the data, per split seed and repeat: test ROC-AUC, its
    spread over seeds and over repeated runs, the validation-test gap, wall. The configs take
    turns within each seed, so a stopped run still leaves paired figures."""
    # config -> seed -> (test ROC-AUC, gap, wall) per run
    found: dict[str, dict[int, list[tuple[float, float, float]]]] = {c: {} for c in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(tox21_slice(args.data, args.slice, Path(tmp) / f"tox21-slice-{args.slice}.csv"))
        print(f"slice: {args.slice} rows of {args.data} (default_rng(0))", flush=True)
        for seed in args.split_seeds:
            for run in range(args.repeats):
                for config in args.configs:
                    stem = Path(config).stem
                    extra = {**args.extra, "tracking.experiment_name": f"small-{stem}"}
                    name, label = f"s-{stem}-{seed}-{run}", f"{stem} seed {seed} run {run}"
                    result, wall, gap = scored_job(
                        label, config, data, "random", seed, Path(tmp), name, extra
                    )
                    found[config].setdefault(seed, []).append((result.test.roc_auc, gap, wall))
    for config, seeds in found.items():
        runs = [r for rows in seeds.values() for r in rows]
        per_seed = [float(np.mean([r[0] for r in rows])) for rows in seeds.values()]
        std = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0
        repeated = [
            float(np.std([r[0] for r in rows], ddof=1)) for rows in seeds.values() if len(rows) > 1
        ]
        print(
            f"{config}: test ROC-AUC {np.mean(per_seed):.4f} +- {std:.4f} over seeds "
            f"{list(seeds)} (per seed {', '.join(f'{t:.4f}' for t in per_seed)})"
            + (f"; std of repeated runs {np.mean(repeated):.4f}" if repeated else "")
            + f"; gap {np.mean([r[1] for r in runs]):+.4f}; wall "
            f"{np.mean([r[2] for r in runs]):.0f} s per job",
            flush=True,
        )


def nr_ar(args: argparse.Namespace) -> None:
    """The tutorial's model and a toxtune job on the tutorial's rows and split, side by side."""
    table = load_table(args.data, targets=["NR-AR"])
    labelled = ~np.isnan(table.labels[:, 0])
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "nr_ar.csv"  # the labelled NR-AR rows, in their original order
        pd.DataFrame(
            {
                "smiles": np.asarray(table.smiles, dtype=object)[labelled],
                "NR-AR": table.labels[labelled, 0],
            }
        ).to_csv(rows, index=False)
        tutorial, tutorial_test = tutorial_baseline(str(rows), args.tutorial_epochs)
        t0 = time.perf_counter()
        result = tuned_job(args.config, str(rows), "random", 0, Path(tmp), "nr-ar", args.extra)
        wall = time.perf_counter() - t0
        job = load_config(
            args.config, overrides={"data.source": str(rows), "ray.storage_path": tmp}
        )
        data = prepare_data(job, progress=False)
        ours_test = [data.table.smiles[i] for i in data.features.valid_rows[data.split.test]]
    if ours_test != tutorial_test:
        raise SystemExit("the tuned job's test split differs from the tutorial's: not comparable")
    print(
        f"NR-AR, tutorial rows and split (test n={len(ours_test)}): tutorial ROC-AUC "
        f"{tutorial.roc_auc:.4f} PR-AUC {tutorial.pr_auc:.4f}; toxtune ({args.config}, "
        f"{len(result.trials)} trials, {wall:.0f} s) ROC-AUC {result.test.roc_auc:.4f} "
        f"PR-AUC {result.test.pr_auc:.4f}"
    )


def main() -> None:
    settings.configure_process()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("command", choices=["baseline", "protocol", "nr-ar", "folds", "small"])
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--config", default="configs/tox21.yaml", help="protocol, nr-ar")
    parser.add_argument("--split", default="random", choices=["random", "scaffold"])
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--splits", nargs="+", default=["random", "scaffold"], choices=["random", "scaffold"]
    )
    parser.add_argument(
        "--configs", nargs="+", default=["configs/small.yaml", "configs/tox21.yaml"], help="small"
    )
    parser.add_argument("--slice", type=int, default=1500, help="small: rows of the data")
    parser.add_argument("--folds", type=int, default=5, help="folds: k of the k-fold variant")
    parser.add_argument(
        "--trees", action="store_true", help="folds: the k-fold variant sets search.trees"
    )
    parser.add_argument(
        "--equal-trials-seeds", type=int, nargs="*", default=[], help="folds: also untimed"
    )
    parser.add_argument(
        "--equal-trials-only", action="store_true", help="folds: only the untimed k-fold job"
    )
    add_overrides(parser, "config override for protocol/nr-ar, e.g. --set search.num_samples=20")
    parser.add_argument("--repeats", type=int, default=1, help="protocol: runs per split seed")
    parser.add_argument(
        "--trust", action="store_true", help="protocol: spread, domain, calibration figures"
    )
    parser.add_argument("--epochs", type=int, default=30, help="baseline: default MLP budget")
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--tutorial-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.extra = overrides(args.extra)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.platform()} | torch {torch.__version__} | threads {args.threads}")
    if args.command == "baseline":
        tutorial_baseline(args.data, args.tutorial_epochs)
        default_mlp(args.data, args.epochs, args.patience, args.threads, args.split_seeds)
    elif args.command == "protocol":
        protocol(args)
    elif args.command == "folds":
        folds(args)
    elif args.command == "small":
        small(args)
    else:
        nr_ar(args)


def add_overrides(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.extra`, read by `overrides`."""
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def overrides(items: list[str]) -> dict[str, Any]:
    """The config overrides of `--set KEY=VALUE` flags, values read as YAML."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


if __name__ == "__main__":
    main()
