"""What the trust columns (spread, applicability domain, calibration) cost at prediction time.

    python benchmarks/trust.py speed [--data ../shared/data/tox21.csv] [--queries 10000]
                                     [--train 6000] [--members 5] [--repeats 3]

`speed`: a predictor shaped like the one a Tox21 job registers (configs/tox21.yaml: an ensemble
of 5 networks of the search's default point, 1024-512 ReLU, on 2048-bit ECFP4; weights are
random, which changes no timing) with an applicability domain over `--train` Tox21 molecules
drawn at random (about the 80 % a random split trains on) and an isotonic calibration of every
task. It predicts `--queries` SMILES (every Tox21 SMILES, then Tox21 SMILES with a methyl
appended, so that no two queries are alike) with the domain check and without it (the same
predictor with `domain=None`), alternately, `--repeats` times, and prints the best wall time of
each as predictions per second, with the parts measured alone on the featurized queries: the
domain lookup, the ensemble's forward pass and the calibration. Prints the machine and its load
average (the host may be shared).

    python benchmarks/trust.py uncertainty [--data ../shared/data/tox21.csv]
                                           [--splits random scaffold] [--seeds 0 1 2]

`uncertainty`: which measure of "how sure" earns its place, and why the ensemble's probability
spread fails issue 16's half-split test. For each split method and seed, a 5-member ensemble of
the search's default point (configs/tox21.yaml features; the members differ by seed, trained in
one fused pass as the finalize stage does) predicts the test split, and each measure is scored
per task over the labelled test rows:
- `half`: ROC-AUC of the half with the smallest measure ("confident") and of the other half;
- `rho`: Spearman's rho of the measure with |label - mean probability|;
- `matched`: the same halves taken within each decile of the mean probability, scored by Brier
  score (confident vs doubtful): what the measure says beyond the probability itself.
Measures: `spread` (population std of the members' probabilities: the `<task>_std` column),
`entropy` (of the mean probability: no ensemble needed, the reference), `logit_spread` (std of
the members' logits) and `rank_spread` (std of each member's percentile among its own
validation probabilities).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from toxmodel.calibration import Calibration, TaskCalibration
from toxmodel.checkpoint import Predictor
from toxmodel.domain import fit_domain
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.model import MLP, Ensemble
from tune.space import DEFAULT_POINT, to_run_configs

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tox21.csv"
TOX21_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tox21.yaml"


def machine() -> str:
    """CPU model, cores available, torch threads and version: what the figures depend on."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model} | {cpus} CPUs available | torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads | {platform.platform()}"
    )


def queries(smiles: list[str], n: int) -> list[str]:
    """`n` query SMILES: the dataset's own, then each with a methyl appended (a new molecule)."""
    out = list(smiles[:n])
    for smi in smiles:
        if len(out) >= n:
            break
        out.append(f"{smi}C")
    return out


def build_predictor(
    train_fp: np.ndarray,
    valid_fp: np.ndarray,
    featurizer: FeaturizerConfig,
    tasks: list[str],
    members: int,
) -> Predictor:
    """Random-weight ensemble of the default point, with a domain and an isotonic calibration."""
    model_config, _ = to_run_configs(DEFAULT_POINT, 1, 0, 0)
    n_inputs = train_fp.shape[1]
    torch.manual_seed(0)
    nets = [MLP(n_inputs, len(tasks), model_config) for _ in range(members)]
    model: MLP | Ensemble = nets[0] if members == 1 else Ensemble(nets)
    rng = np.random.default_rng(0)
    knots = [np.sort(rng.random(40)) for _ in tasks]
    calibration = Calibration(
        tuple(tasks),
        tuple(
            TaskCalibration("isotonic", knots_x=k, knots_y=np.sort(rng.random(40))) for k in knots
        ),
    )
    return Predictor(
        model=model.eval(),
        featurizer=featurizer,
        tasks=tasks,
        n_inputs=n_inputs,
        model_config=model_config,
        calibration=calibration,
        domain=fit_domain(train_fp, valid_fp, featurizer.n_bits),
    )


def best_of(repeats: int, fn: Callable[[], Any]) -> float:
    """Fastest wall time of `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(args: argparse.Namespace) -> None:
    frame = pd.read_csv(args.data)
    tasks = [c for c in frame.columns if c != "smiles"]
    featurizer = FeaturizerConfig()  # 2048-bit ECFP4, as configs/tox21.yaml
    feats = featurize(frame["smiles"].tolist(), featurizer)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(feats))
    train, valid = order[: args.train], order[args.train : args.train + 800]
    predictor = build_predictor(
        feats.fingerprint[train], feats.fingerprint[valid], featurizer, tasks, args.members
    )
    without = dataclasses.replace(predictor, domain=None)
    smiles = queries(frame["smiles"].tolist(), args.queries)
    domain = predictor.domain
    assert domain is not None
    print(f"machine: {machine()}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print(
        f"predictor: {args.members} x MLP {DEFAULT_POINT['width_0']}-{DEFAULT_POINT['width_1']} "
        f"on {featurizer.n_bits}-bit ECFP4, {len(tasks)} tasks, isotonic calibration; domain "
        f"over {args.train} training molecules ({domain.n_train} distinct fingerprints, "
        f"{domain.train_packed.nbytes / 1e6:.2f} MB packed), threshold {domain.threshold:.3f}"
    )
    predictor.predict(smiles[:200])  # warm up: pool, RDKit, torch
    with_s = without_s = float("inf")
    for _ in range(args.repeats):  # alternate, so load on the host hits both alike
        with_s = min(with_s, best_of(1, lambda: predictor.predict(smiles)))
        without_s = min(without_s, best_of(1, lambda: without.predict(smiles)))
    n = len(smiles)
    print(f"{n} queries, best of {args.repeats}:")
    for name, seconds in (("with", with_s), ("without", without_s)):
        label = f"predict {name} the domain check:"
        print(f"  {label:35s} {seconds:6.2f} s  {n / seconds:8.0f} predictions/s")
    qf = featurize(smiles, featurizer)
    lookup = best_of(args.repeats, lambda: domain.similarity(qf.fingerprint))
    raw = predictor.probabilities(qf.fingerprint, qf.descriptors, 4096)
    forward = best_of(
        args.repeats,
        lambda: predictor._probabilities_and_spread(qf.fingerprint, qf.descriptors, 4096),
    )
    calibrate = best_of(args.repeats, lambda: predictor.calibrate(raw))
    featurize_s = best_of(args.repeats, lambda: featurize(smiles, featurizer))
    print("  parts alone, on the same queries:")
    print(f"    featurize (RDKit, process pool):  {featurize_s:6.2f} s")
    print(f"    forward + spread ({args.members} members):    {forward:6.2f} s")
    print(f"    domain lookup (NN Tanimoto):      {lookup:6.2f} s  {n / lookup:8.0f} molecules/s")
    print(f"    calibration:                      {calibrate:6.3f} s")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def _spreads(members: np.ndarray, valid_members: np.ndarray) -> dict[str, np.ndarray]:
    """The candidate measures of doubt, each (n, n_tasks), from (k, n, n_tasks) probabilities
    and the members' (k, n_valid, n_tasks) validation probabilities."""
    eps = 1e-6
    clipped = np.clip(members, eps, 1 - eps)
    mean = clipped.mean(axis=0)
    logits = np.log(clipped / (1 - clipped))
    ranks = np.empty_like(members)
    for k in range(members.shape[0]):
        for j in range(members.shape[2]):
            ordered = np.sort(valid_members[k, :, j])
            ranks[k, :, j] = np.searchsorted(ordered, members[k, :, j]) / len(ordered)
    return {
        "spread": members.std(axis=0),
        "entropy": -(mean * np.log(mean) + (1 - mean) * np.log(1 - mean)),
        "logit_spread": logits.std(axis=0),
        "rank_spread": ranks.std(axis=0),
    }


def score_measure(y: np.ndarray, p: np.ndarray, doubt: np.ndarray) -> dict[str, float]:
    """Half-split ROC-AUC, Spearman with the error, and probability-matched Brier halves."""
    from quality import _mean_auc  # benchmarks/quality.py: the same per-task ROC-AUC mean
    from scipy.stats import spearmanr

    confident, doubtful, rhos, brier_c, brier_d = [], [], [], [], []
    for j in range(y.shape[1]):
        rows = np.flatnonzero(~np.isnan(y[:, j]))
        order = rows[np.argsort(doubt[rows, j], kind="stable")]
        confident.append(order[: len(order) // 2])
        doubtful.append(order[len(order) // 2 :])
        rhos.append(spearmanr(doubt[rows, j], np.abs(y[rows, j] - p[rows, j])).statistic)
        edges = np.quantile(p[rows, j], np.linspace(0, 1, 11)[1:-1])
        decile = np.searchsorted(edges, p[rows, j])
        low, high = [], []
        for d in range(10):
            part = rows[decile == d]
            part = part[np.argsort(doubt[part, j], kind="stable")]
            low += list(part[: len(part) // 2])
            high += list(part[len(part) // 2 :])
        brier_c.append(np.mean((y[low, j] - p[low, j]) ** 2))
        brier_d.append(np.mean((y[high, j] - p[high, j]) ** 2))
    return {
        "auc_confident": _mean_auc(y, p, confident),
        "auc_doubtful": _mean_auc(y, p, doubtful),
        "rho": float(np.nanmean(rhos)),
        "brier_confident": float(np.mean(brier_c)),
        "brier_doubtful": float(np.mean(brier_d)),
    }


def uncertainty(args: argparse.Namespace) -> None:
    from tune import settings
    from tune.config import load_config
    from tune.finalize import predict_split, retrain
    from tune.prepare import prepare_data

    settings.configure_process()
    print(f"machine: {machine()}; load average at start: {os.getloadavg()[0]:.2f}")
    header = f"{'split':8s} {'seed':>4s} {'measure':13s} {'AUC conf/doubt':>15s} {'rho':>6s}"
    print(f"{header} {'Brier matched conf/doubt':>25s}")
    for split in args.splits:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                job = load_config(
                    str(TOX21_CONFIG),
                    overrides={
                        "data.source": args.data,
                        "split.method": split,
                        "split.seed": seed,
                        "ray.storage_path": tmp,
                        "tracking.run_name": f"uncertainty-{split}-{seed}",
                    },
                )
                data = prepare_data(job, progress=False)
                fits = retrain(job, data, dict(DEFAULT_POINT), list(range(args.members)))
                probs = {"test": [], "valid": []}
                for fit in fits.values():
                    member = fit.predictor()
                    for part in probs:
                        rows = getattr(data.split, part)
                        frame = predict_split(member, data, rows)
                        probs[part].append(frame[member.tasks].to_numpy(np.float64))
            members, valid_members = np.stack(probs["test"]), np.stack(probs["valid"])
            y, p = data.labels[data.split.test].astype(np.float64), members.mean(axis=0)
            for name, doubt in _spreads(members, valid_members).items():
                f = score_measure(y, p, doubt)
                print(
                    f"{split:8s} {seed:4d} {name:13s} {f['auc_confident']:7.3f}/"
                    f"{f['auc_doubtful']:.3f} {f['rho']:6.3f} {f['brier_confident']:16.4f}/"
                    f"{f['brier_doubtful']:.4f}",
                    flush=True,
                )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="predictions per second with and without the domain check")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Tox21 CSV (smiles + task columns)")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--train", type=int, default=6_000, help="training molecules in the domain")
    p.add_argument("--members", type=int, default=5, help="ensemble size (tox21.yaml: 5)")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(func=speed)
    p = sub.add_parser("uncertainty", help="which measure of doubt earns its place")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="Tox21 CSV (smiles + task columns)")
    p.add_argument("--splits", nargs="+", default=["random", "scaffold"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--members", type=int, default=5, help="ensemble size (tox21.yaml: 5)")
    p.set_defaults(func=uncertainty)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
