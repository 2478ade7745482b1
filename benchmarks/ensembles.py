"""What the registered model of a k-fold job is worth, and what does not lift it (issue 26).

    python benchmarks/ensembles.py members --split scaffold --split-seed 0
    python benchmarks/ensembles.py size --split scaffold --split-seed 0
    python benchmarks/ensembles.py blend --split scaffold --split-seed 0 --configs 8
    python benchmarks/ensembles.py trees --split scaffold --split-seed 0
    python benchmarks/ensembles.py tree-settings --split scaffold --split-seed 0
    python benchmarks/ensembles.py auxiliary --split random --split-seed 0
    python benchmarks/ensembles.py pick --split scaffold --split-seed 0 --configs 8
    python benchmarks/ensembles.py auc-loss --split scaffold --split-seed 0 --auc-weight 1
    python benchmarks/ensembles.py forest --split scaffold --split-seed 0
    python benchmarks/ensembles.py stack --split scaffold --split-seed 0
    python benchmarks/ensembles.py mordred --split scaffold --split-seed 0 --mordred-file /tmp/m.npy

One configuration or a few, trained with `toxmodel.fused.fit_many` on one split seed of Tox21
(`--config`'s features and limits, configs/tox21.yaml's: at most 40 epochs, patience 6), no Ray, no
search; every figure is the mean test ROC-AUC over tasks of an averaged set of networks. The
test split is the job's and plays no part in any choice.

`members`: at `tune.space.DEFAULT_POINT` (every search's first trial), the three ways to build
a five-network model: today's folds-1 ensemble (five seeds on the training split, each stopped
on validation), the fold ensemble of a `search.folds: 5` job (fold i's model trains on the other
four folds of the non-test rows and stops on its own fold), and a refit on every non-test row
(scikit-learn's `GridSearchCV(refit=True)` habit: five seeds, for the fold models' mean best
epoch, no early stopping; the epoch kept is the best on 2,000 of its own training rows, in
effect the last; `refit_kept` says which). `<name>_one_network`: the mean of its five networks' own
figures; `folds5_oof`: the fold models' out-of-fold ROC-AUC (what a choice may read).
`--set featurizer.radius=3` (repeatable) changes the job's config (features, limits, split) for
any part, as quality.py's `--set` does.

`size`: at the default point, whether more networks help: ten folds against five, five folds
repeated with a second fold seed (ten networks), ten seeds against five.

`blend`: fold ensembles of `--configs` configurations (the default point and the rest drawn at
random from the search space, Optuna's RandomSampler seeded 1000 + split seed), then which to
register, chosen on out-of-fold predictions only: the best configuration by OOF ROC-AUC (what a
k-fold job registers), the top 2/3/5 averaged, all of them, and Caruana's ensemble selection
(greedy, with replacement, 10 rounds, each adding the configuration that most raises the
averaged OOF ROC-AUC).

`trees`: a `search.folds: 5, search.trees: true` job's registered model at the default point,
built by the job's own code (`tune.finalize.fold_trees`): the five fold networks, LightGBM trees
trained on each fold (`toxmodel.trees`), and the trees' share chosen on out-of-fold predictions.
Reports the networks alone, the trees alone and the chosen blend on test (and every share tried,
out of fold and on test, so the choice can be judged); `--set featurizer.descriptors=false` and
the like give the trees of "LightGBM on fingerprints".

`tree-settings`: at the default point's fold networks, the trees of `trees` with other LightGBM
settings (`TREE_SETTINGS`: sparser column draws; smaller, more regularised trees), each blended
at its own share chosen out of fold; and two other blend rules for today's trees: a share per
task (each task's best out of fold) and averaging log-odds instead of probabilities.

`auxiliary`: whether ToxCast's 617 assays (`--auxiliary`, matched to the job's molecules by the
job's molecule key) learned beside the Tox21 tasks as extra outputs lift the Tox21 tasks: three
seeds of the default point on the job's own split, with and without them; the auxiliary labels
of validation and test molecules are hidden (only training molecules' are learned), so early
stopping and every score read the Tox21 tasks alone. `--aux-fraction F` (repeatable) also
trains with a random fraction F of those auxiliary labels kept (numpy `default_rng(0)`, the rest
hidden): the masked loss averages over the labels it sees, so this weights the auxiliary tasks by
about F against the Tox21 tasks (617 assays hold 14x Tox21's training labels).

`pick`: whether a k-fold job with trees should choose its trial by the blend rather than by the
networks alone. The configurations of `blend`, each a fold ensemble; one set of fold trees (they
read the same inputs whatever the configuration: the fold's scaled features); each configuration
blended with them at its own share chosen out of fold. Then the configuration a job would
register, chosen three ways on what a job may read: by the mean of its fold models' best
validation ROC-AUC (what the search ranks trials by: `FoldScores.best_mean`), by its
networks' pooled out-of-fold ROC-AUC, and by its blend's out-of-fold ROC-AUC; each reported as
its blend's test ROC-AUC, beside the default point's blend (every search's first trial).

`auc-loss`: whether a loss aimed at the ranking the figure measures lifts it. The default
point's fold ensemble trained with the masked cross-entropy alone (today) and with a pairwise
ROC-AUC surrogate added at each `--auc-weight` W: per member and task, over the batch's
labelled positive-negative pairs, the mean of (1 - (p_pos - p_neg))^2 on the sigmoid scores
(the square loss of Ying et al. 2016 and LibAUC's AUC-M, margin 1), times W, added to the
cross-entropy: the product's `TrainConfig.auc_weight` (`search.space.auc_weight`), which the
first sittings patched in before it was built. Early stopping still reads validation ROC-AUC.
Reports each loss's networks
out of fold and on test, and its blend with one set of fold trees (they read the fold's scaled
inputs, whatever the loss) at the share chosen out of fold.

`forest`: a random forest as a third learner beside the fold networks and their LightGBM trees
(DeepTox's and MoleculeNet's classic baseline; its trees are grown deep on bootstrap samples,
unlike LightGBM's shallow boosted ones). Per fold and task, scikit-learn's
`RandomForestClassifier` (`--forest-trees` trees, `max_features="sqrt"`, balanced class weights
per bootstrap sample) on the inputs the fold's network reads; then the three learners blended at
the shares (in eighths) that score best out of fold, as `graph.py` blends its D-MPNN.

`stack`: whether the other tasks' predictions lift a task's. Tox21's twelve assays share
mechanisms (the androgen and estrogen receptors' two assays each, aromatase against the estrogen
receptor), and a molecule active in one is more often active in another. The default point's
fold networks blended with their trees as a job blends them (share chosen out of fold), then
per task a logistic regression on the log-odds of all twelve tasks' blended probabilities
(scikit-learn, L2, `--stack-c` C), fitted on out-of-fold rows only: its own out-of-fold
predictions by the same folds (fold i's rows predicted by a regression fitted on the other
folds' rows), its test predictions by one fitted on every out-of-fold row. The stacked and the
plain blend are mixed at the share (in quarters) that scores best out of fold.

`mordred`: whether more descriptors lift the model: the 1,613 2D descriptors of Mordred
(`mordredcommunity`, not a toxtune dependency: `pip install mordredcommunity` to run this part),
appended to the job's RDKit descriptors (robust-scaled on each fold's training rows like them),
then `trees` on the wider inputs (the fold networks, their trees and the blend). Mordred takes
about 0.15 CPU-seconds a molecule; `--mordred-file PATH` keeps its matrix (one row a table row,
NaN where a molecule or a descriptor fails) for the next run, outside the repository: computed
and saved when PATH does not exist (with a digest of the SMILES beside it, `PATH.sha256`), read
when it does and the digest matches the table's, refused otherwise (`--mordred-procs` processes
compute it).

Each prints one JSON line. Nothing is kept (but `--mordred-file`): the job's feature cache lives
in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import torch
from quality import add_overrides, overrides  # benchmarks/quality.py: the same --set
from scipy.special import expit, logit

from toxmodel.checkpoint import Predictor
from toxmodel.featurize import canonical_smiles
from toxmodel.folds import Folds, make_folds, out_of_fold
from toxmodel.fused import fit_many
from toxmodel.metrics import evaluate
from toxmodel.model import Ensemble
from toxmodel.split import Split, molecule_groups
from toxmodel.train import FitResult
from toxmodel.trees import WEIGHTS, TreeConfig, blend_weight
from toxmodel.trees import blend as blend_of
from tune import settings
from tune.config import JobConfig, load_config
from tune.finalize import (
    fold_members,
    fold_trees,
    grow_fold_trees,
    out_of_fold_probabilities,
)
from tune.prepare import PreparedData, prepare_data
from tune.space import DEFAULT_POINT, build_space, sample, to_run_configs

K = 5  # folds of the k-fold job measured


class Bench:
    """One job's prepared data (its split method and seed, its epoch limits) and the scoring of
    averaged networks on its test split."""

    def __init__(self, job: JobConfig, data: PreparedData) -> None:
        self.job, self.data = job, data
        self.method, self.seed = job.split.method, job.split.seed
        self.test = data.split.test
        self.nontest = np.concatenate([data.split.train, data.split.valid])

    def fit(
        self, point: dict[str, Any], splits: Split | list[Split], seeds: range, **train: Any
    ) -> list[FitResult]:
        model, config = to_run_configs(
            point, self.job.search.max_epochs, self.job.search.patience, 0
        )
        configs = [replace(config, seed=s, **train) for s in seeds]
        d = self.data
        return fit_many(d.features, d.labels, splits, d.table.tasks, model, configs, num_threads=1)

    def probs(self, results: list[FitResult], rows: np.ndarray) -> list[np.ndarray]:
        f = self.data.features
        return [
            r.predictor().probabilities(f.fingerprint[rows], f.descriptors[rows]).astype(np.float64)
            for r in results
        ]

    def oof(self, models: list[FitResult], folds: Folds) -> np.ndarray:
        """Every non-test row's probabilities by the fold model that did not train on it."""
        per_fold = [
            (s.valid, self.probs([m], s.valid)[0])
            for m, s in zip(models, folds.splits, strict=True)
        ]
        return out_of_fold(folds, per_fold)

    def oof_auc(self, oof: np.ndarray, folds: Folds) -> float:
        d = self.data
        return evaluate(d.labels[folds.rows], oof, d.table.tasks).roc_auc

    def test_auc(self, probs: list[np.ndarray]) -> float:
        d = self.data
        return evaluate(d.labels[self.test], np.mean(probs, axis=0), d.table.tasks).roc_auc

    def folds(self, k: int, seed: int) -> Folds:
        """k folds of the non-test rows as a k-fold job makes them (fold seed `seed`)."""
        d = self.data
        f, table = d.features, d.table
        ids = molecule_groups(f.molecule_keys(), f.valid_rows, len(table))
        every = len(f.valid_rows) == len(table)
        groups = ids if every else molecule_groups(ids[f.valid_rows])
        smiles = table.smiles if every else [table.smiles[i] for i in f.valid_rows]
        return make_folds(
            self.nontest, k, method=self.method, seed=seed, labels=d.labels, groups=groups,
            smiles=smiles, test=self.test,
        )  # fmt: skip


def add_job_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    """The options that pick the job measured: its data, config, split method and seed."""
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--config", default="configs/tox21.yaml")
    parser.add_argument("--split", default=split, choices=["random", "scaffold"])
    parser.add_argument("--split-seed", type=int, default=0)


@contextlib.contextmanager
def prepared(
    args: argparse.Namespace, run_name: str, extra: dict[str, Any] | None = None
) -> Iterator[Bench]:
    """The job `args` pick (`add_job_arguments`; `extra`: more config overrides), its data
    prepared as a job prepares it, in a temporary results folder kept while the caller runs."""
    with tempfile.TemporaryDirectory() as tmp:
        job = load_config(
            args.config,
            {
                "split.method": args.split,
                "split.seed": args.split_seed,
                "data.source": str(Path(args.data).resolve()),
                "ray.storage_path": tmp,
                "tracking.run_name": run_name,
                **(extra or {}),
            },
        )
        yield Bench(job, prepare_data(job, progress=False))


def members(b: Bench) -> dict[str, Any]:
    point = dict(DEFAULT_POINT)
    folds = b.folds(K, b.seed)
    fold_models = b.fit(point, list(folds.splits), range(K))
    epochs = max(1, round(float(np.mean([r.best_epoch for r in fold_models]))))
    everything = Split(train=folds.rows, valid=folds.rows[:2000], test=b.test)
    refit = b.fit(point, everything, range(K), epochs=epochs, patience=0)
    built = {
        "folds1_seeds": b.fit(point, b.data.split, range(K)),
        "folds5": fold_models,
        "refit": refit,
    }
    out: dict[str, Any] = {}
    for name, results in built.items():
        probs = b.probs(results, b.test)
        out[name] = b.test_auc(probs)
        out[f"{name}_one_network"] = float(np.mean([b.test_auc([p]) for p in probs]))
    out["refit_epochs"], out["refit_kept"] = epochs, [r.best_epoch for r in refit]
    out["folds5_epochs"] = [r.best_epoch for r in fold_models]
    out["folds5_oof"] = b.oof_auc(b.oof(fold_models, folds), folds)
    return out


def size(b: Bench) -> dict[str, Any]:
    point, out = dict(DEFAULT_POINT), {}
    ten = b.probs(b.fit(point, list(b.folds(10, b.seed).splits), range(10)), b.test)
    out["folds10"] = b.test_auc(ten)
    first = b.probs(b.fit(point, list(b.folds(K, b.seed).splits), range(K)), b.test)
    second = b.probs(b.fit(point, list(b.folds(K, b.seed + 100).splits), range(K, 2 * K)), b.test)
    out["folds5"], out["folds5_second_seed"] = b.test_auc(first), b.test_auc(second)
    out["folds5x2"] = b.test_auc(first + second)
    seeds = b.probs(b.fit(point, b.data.split, range(2 * K)), b.test)
    out["seeds5"], out["seeds10"] = b.test_auc(seeds[:K]), b.test_auc(seeds)
    return out


def configurations(b: Bench, n: int) -> list[dict[str, Any]]:
    """The default point and n - 1 configurations drawn at random from the search space
    (Optuna's RandomSampler, seeded 1000 + split seed): the same n for `blend` and `pick`."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1000 + b.seed))
    space = build_space()
    return [dict(DEFAULT_POINT)] + [sample(study.ask(), space) for _ in range(n - 1)]


def blend(b: Bench, n: int) -> dict[str, Any]:
    folds = b.folds(K, b.seed)
    oofs, tests = [], []
    for point in configurations(b, n):
        models = b.fit(point, list(folds.splits), range(K))
        oofs.append(b.oof(models, folds))
        tests.append(np.mean(b.probs(models, b.test), axis=0))

    def oof_auc(chosen: list[int]) -> float:
        return b.oof_auc(np.mean([oofs[i] for i in chosen], axis=0), folds)

    def test_auc(chosen: list[int]) -> float:
        return b.test_auc([tests[i] for i in chosen])

    order = sorted(range(n), key=lambda i: -oof_auc([i]))
    out: dict[str, Any] = {
        "configs": [{"oof": oof_auc([i]), "test": test_auc([i])} for i in range(n)],
        "default": test_auc([0]),
        "best_by_oof": test_auc(order[:1]),
    }
    for m in (2, 3, 5):
        out[f"top{m}"] = test_auc(order[:m])
    out["all"] = test_auc(list(range(n)))
    chosen: list[int] = []
    for _ in range(10):  # Caruana et al. 2004: greedy ensemble selection with replacement
        chosen.append(max(range(n), key=lambda i: oof_auc([*chosen, i])))
    out["greedy"], out["greedy_chosen"] = test_auc(chosen), chosen
    return out


def pick(b: Bench, n: int) -> dict[str, Any]:
    folds = b.folds(K, b.seed)
    data = replace(b.data, folds=folds)
    y_oof, tasks = b.data.labels[folds.rows], list(b.data.table.tasks)
    configs, tree_test = [], None
    for i, point in enumerate(configurations(b, n)):
        models = b.fit(point, list(folds.splits), range(K))
        net_oof = b.oof(models, folds)
        net_test = np.mean(b.probs(models, b.test), axis=0)
        if tree_test is None:  # the trees read each fold's scaled inputs: one set serves all
            tree_oof, tree_test = fold_trees_of(b, _ensemble(models), data, folds)
        share, scores = blend_weight(y_oof, net_oof, tree_oof, tasks)
        configs.append(
            {
                "point": i,
                "fold_mean": float(np.mean([r.best_valid.roc_auc for r in models])),
                "oof_networks": scores[0.0],
                "oof_blend": scores[share],
                "share": share,
                "test_networks": b.test_auc([net_test]),
                "test_blend": b.test_auc([blend_of(net_test, tree_test, share)]),
            }
        )
    out: dict[str, Any] = {"configs": configs, "test_trees": b.test_auc([tree_test])}
    out["default_blend"] = configs[0]["test_blend"]
    for rule in ("fold_mean", "oof_networks", "oof_blend"):
        chosen = max(configs, key=lambda c: c[rule])
        out[f"by_{rule}"], out[f"by_{rule}_point"] = chosen["test_blend"], chosen["point"]
    return out


def auc_loss(b: Bench, weights: list[float]) -> dict[str, Any]:
    folds = b.folds(K, b.seed)
    data = replace(b.data, folds=folds)
    y_oof, tasks = b.data.labels[folds.rows], list(b.data.table.tasks)
    out: dict[str, Any] = {}
    tree_oof = tree_test = None
    for w in [0.0, *weights]:
        t0 = time.perf_counter()
        models = b.fit(dict(DEFAULT_POINT), list(folds.splits), range(K), auc_weight=w)
        seconds = round(time.perf_counter() - t0, 1)
        net_oof = b.oof(models, folds)
        net_test = np.mean(b.probs(models, b.test), axis=0)
        if tree_test is None:  # the trees read each fold's scaled inputs: one set serves all
            tree_oof, tree_test = fold_trees_of(b, _ensemble(models), data, folds)
            out["test_trees"] = b.test_auc([tree_test])
        share, scores = blend_weight(y_oof, net_oof, tree_oof, tasks)
        out[f"auc_weight_{w:g}"] = {
            "oof_networks": scores[0.0],
            "test_networks": b.test_auc([net_test]),
            "share": share,
            "oof_blend": scores[share],
            "test_blend": b.test_auc([blend_of(net_test, tree_test, share)]),
            "epochs": [r.best_epoch for r in models],
            "seconds": seconds,
        }
    return out


def fold_trees_of(
    b: Bench, networks: Predictor, data: PreparedData, folds: Folds
) -> tuple[np.ndarray, np.ndarray]:
    """The fold trees of a fold ensemble (`networks`), as a k-fold job with trees grows them:
    their out-of-fold probabilities (aligned with `folds.rows`) and their test probabilities."""
    f = data.features
    grown, tree_oof = grow_fold_trees(networks, data, folds, b.seed)
    inputs = networks.inputs(f.fingerprint[b.test], f.descriptors[b.test])
    return tree_oof, replace(networks, trees=grown).tree_probabilities(inputs)


def networks_and_trees(
    b: Bench, folds: Folds
) -> tuple[Predictor, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The default point's fold ensemble and its fold trees: the ensemble, and each learner's
    (out-of-fold, test) probabilities, the first two learners of `three_learners`."""
    data = replace(b.data, folds=folds)
    f = data.features
    networks = fold_networks(b, folds)
    tree_oof, tree_test = fold_trees_of(b, networks, data, folds)
    net_oof = out_of_fold_probabilities(networks, data, folds)
    net = networks.probabilities(f.fingerprint[b.test], f.descriptors[b.test]).astype(np.float64)
    return networks, {"networks": (net_oof, net), "trees": (tree_oof, tree_test)}


def shares(step: float = 0.125) -> list[tuple[float, float]]:
    """(networks, trees) shares in steps of `step`; a third learner has the rest."""
    grid = np.arange(0, 1 + 1e-9, step)
    return [(float(a), float(t)) for a in grid for t in grid if a + t <= 1 + 1e-9]


def three_learners(
    b: Bench, folds: Folds, learners: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """Networks, trees and a third learner (`learners`: name -> (out-of-fold, test)
    probabilities, in that order) blended at the shares that score best out of fold, the
    networks and trees alone likewise; each learner's and blend's ROC-AUC out of fold and on
    test, and the shares chosen."""
    (net_oof, net_test), (tree_oof, tree_test), (third_oof, third_test) = learners.values()
    third = list(learners)[2]
    tasks, d = list(b.data.table.tasks), b.data

    def mix(n: np.ndarray, t: np.ndarray, g: np.ndarray, w: tuple[float, float]) -> np.ndarray:
        return w[0] * n + w[1] * t + (1 - w[0] - w[1]) * g

    oof_labels, test_labels = d.labels[folds.rows], d.labels[b.test]
    scores = {
        w: evaluate(oof_labels, mix(net_oof, tree_oof, third_oof, w), tasks).roc_auc
        for w in shares()
    }
    two = max((w for w in scores if abs(sum(w) - 1) < 1e-9), key=scores.get)
    three = max(scores, key=scores.get)
    out: dict[str, Any] = {
        "oof": {k: evaluate(oof_labels, v[0], tasks).roc_auc for k, v in learners.items()},
        "test": {k: evaluate(test_labels, v[1], tasks).roc_auc for k, v in learners.items()},
    }
    for name, w in (("networks+trees", two), ("all_three", three)):
        out["oof"][name] = scores[w]
        out["test"][name] = evaluate(
            test_labels, mix(net_test, tree_test, third_test, w), tasks
        ).roc_auc
        out[f"shares_{name}"] = {"networks": w[0], "trees": w[1], third: 1 - w[0] - w[1]}
    return out


def forest(b: Bench, n_trees: int) -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier

    d, f = b.data, b.data.features
    folds = b.folds(K, b.seed)
    t0 = time.perf_counter()
    networks, learners = networks_and_trees(b, folds)
    out: dict[str, Any] = {"networks_trees_seconds": round(time.perf_counter() - t0)}
    t0 = time.perf_counter()
    per_fold, forest_test = [], []
    for i, (single, split) in enumerate(zip(fold_members(networks), folds.splits, strict=True)):

        def inputs(rows: np.ndarray, single: Predictor = single) -> np.ndarray:
            return single.inputs(f.fingerprint[rows], f.descriptors[rows])[0]

        train, valid, test = inputs(split.train), inputs(split.valid), inputs(b.test)
        valid_p = np.full((len(split.valid), d.labels.shape[1]), np.nan)
        test_p = np.full((len(b.test), d.labels.shape[1]), np.nan)
        for j in range(d.labels.shape[1]):
            y = d.labels[split.train, j]
            known = ~np.isnan(y)
            model = RandomForestClassifier(
                n_estimators=n_trees, max_features="sqrt", class_weight="balanced_subsample",
                n_jobs=1, random_state=b.seed + 100 * i + j,
            ).fit(train[known], y[known].astype(int))  # fmt: skip
            valid_p[:, j] = model.predict_proba(valid)[:, 1]
            test_p[:, j] = model.predict_proba(test)[:, 1]
        per_fold.append((split.valid, valid_p))
        forest_test.append(test_p)
        print(json.dumps({"fold": i, "seconds": round(time.perf_counter() - t0)}), flush=True)
    out["forest_seconds"] = round(time.perf_counter() - t0)
    learners["forest"] = (out_of_fold(folds, per_fold), np.mean(forest_test, axis=0))
    out.update(three_learners(b, folds, learners))
    return out


def stack(b: Bench, c: float) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression

    d = b.data
    folds = b.folds(K, b.seed)
    _, learners = networks_and_trees(b, folds)
    (net_oof, net_test), (tree_oof, tree_test) = learners.values()
    tasks = list(d.table.tasks)
    y_oof = d.labels[folds.rows]
    share, _ = blend_weight(y_oof, net_oof, tree_oof, tasks)
    plain_oof, plain_test = blend_of(net_oof, tree_oof, share), blend_of(net_test, tree_test, share)

    x_oof, x_test = _logit(plain_oof), _logit(plain_test)

    def fitted(rows: np.ndarray, j: int) -> LogisticRegression | None:
        y = y_oof[rows, j]
        known = ~np.isnan(y)
        if len(np.unique(y[known])) < 2:
            return None
        return LogisticRegression(C=c, max_iter=2000).fit(x_oof[rows][known], y[known].astype(int))

    stacked_oof = np.array(plain_oof)
    stacked_test = np.array(plain_test)
    for j in range(len(tasks)):
        for i in range(len(folds.splits)):
            inner, held = folds.fold != i, folds.fold == i
            model = fitted(np.flatnonzero(inner), j)
            if model is not None:
                stacked_oof[held, j] = model.predict_proba(x_oof[held])[:, 1]
        model = fitted(np.arange(len(folds.rows)), j)
        if model is not None:
            stacked_test[:, j] = model.predict_proba(x_test)[:, 1]
    oof = {w: evaluate(y_oof, blend_of(plain_oof, stacked_oof, w), tasks).roc_auc for w in WEIGHTS}
    w = max(sorted(oof), key=oof.get)
    return {
        "trees_share": share,
        "oof_blend": oof[0.0],
        "oof_stacked": oof[1.0],
        "stacked_share": w,
        "oof_chosen": oof[w],
        "test_networks": b.test_auc([net_test]),
        "test_blend": b.test_auc([plain_test]),
        "test_stacked": b.test_auc([stacked_test]),
        "test_chosen": b.test_auc([blend_of(plain_test, stacked_test, w)]),
        "oof_shares": oof,
    }


def _ensemble(results: list[FitResult]) -> Predictor:
    """Fold models as one averaged predictor with each fold's own descriptor scaler."""
    scalers = [r.scaler for r in results]
    return replace(
        results[0].predictor(),
        model=Ensemble([r.model for r in results]).eval(),
        scaler=None,
        member_scalers=None if all(x is None for x in scalers) else scalers,
    )


def fold_networks(b: Bench, folds: Folds) -> Predictor:
    """The default point's fold ensemble, as a k-fold job registers it (before trees)."""
    return _ensemble(b.fit(dict(DEFAULT_POINT), list(folds.splits), range(K)))


def trees(b: Bench) -> dict[str, Any]:
    folds = b.folds(K, b.seed)
    networks = fold_networks(b, folds)
    t0 = time.perf_counter()
    blended, scores = fold_trees(networks, replace(b.data, folds=folds), folds, b.seed)
    out: dict[str, Any] = {"trees_seconds": round(time.perf_counter() - t0, 1), **scores}
    f = b.data.features
    fp, desc = f.fingerprint[b.test], f.descriptors[b.test]
    net = networks.probabilities(fp, desc).astype(np.float64)
    grown = replace(networks, trees=blended.trees or None)
    if grown.trees:
        tree = grown.tree_probabilities(networks.inputs(fp, desc))
        out["test_trees"] = b.test_auc([tree])
        out["test_shares"] = {w: b.test_auc([blend_of(net, tree, w)]) for w in (0.25, 0.5, 0.75)}
    out["test_networks"] = b.test_auc([net])
    out["test_blend"] = b.test_auc([blended.probabilities(fp, desc).astype(np.float64)])
    out["rounds"] = [t.rounds for t in blended.trees or []]
    return out


def mordred_matrix(smiles: list[str], path: Path | None, procs: int) -> np.ndarray:
    """Mordred's 2D descriptors of each SMILES, read from `path` when it was computed for these
    SMILES (a digest of them sits beside it in `<path>.sha256`), else computed (and saved to
    `path`, with its digest)."""
    if path is None:
        return _mordred_of(smiles, procs)
    digest = hashlib.sha256("\n".join(smiles).encode()).hexdigest()
    sidecar = path.with_name(path.name + ".sha256")
    if path.exists():
        kept = sidecar.read_text().strip() if sidecar.exists() else "none"
        if kept != digest:
            raise SystemExit(f"{path} was computed for other SMILES (digest {kept}); remove it")
        return np.load(path)
    matrix = _mordred_of(smiles, procs)
    np.save(path, matrix)
    sidecar.write_text(digest + "\n")
    return matrix


def _mordred_of(smiles: list[str], procs: int) -> np.ndarray:
    """Mordred's 2D descriptors as float32, NaN where RDKit or a descriptor fails."""
    from mordred import Calculator, descriptors  # pip install mordredcommunity
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    calc = Calculator(descriptors, ignore_3D=True)
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    parsed = [i for i, m in enumerate(mols) if m is not None]
    values = calc.pandas([mols[i] for i in parsed], nproc=procs, quiet=True)
    block = values.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    block[~np.isfinite(block) | (np.abs(block) > 3e38)] = np.nan  # float32 would overflow
    matrix = np.full((len(smiles), len(calc.descriptors)), np.nan, np.float32)
    matrix[parsed] = block.astype(np.float32)
    return matrix


def mordred(b: Bench, path: Path | None, procs: int) -> dict[str, Any]:
    """`trees` with Mordred's descriptors appended to the job's RDKit descriptors."""
    f = b.data.features
    extra = mordred_matrix(list(b.data.table.smiles), path, procs)[f.valid_rows]
    wider = replace(f, descriptors=np.concatenate([f.descriptors, extra], axis=1))
    b.data = replace(b.data, features=wider)
    out = {"descriptors": int(wider.descriptors.shape[1])}
    return {**out, **trees(b)}


TREE_SETTINGS = {
    "default": TreeConfig(),
    "sparser_columns": TreeConfig(colsample_bytree=0.1),
    "smaller_trees": TreeConfig(
        learning_rate=0.05, num_leaves=15, min_child_samples=20, colsample_bytree=0.2,
        reg_lambda=5.0,
    ),
}  # fmt: skip


def tree_settings(b: Bench) -> dict[str, Any]:
    folds = b.folds(K, b.seed)
    networks = fold_networks(b, folds)
    data = replace(b.data, folds=folds)
    f, labels, tasks = data.features, data.labels, list(networks.tasks)
    y_oof = labels[folds.rows]
    net_oof = out_of_fold_probabilities(networks, data, folds)
    net_test = networks.probabilities(f.fingerprint[b.test], f.descriptors[b.test])
    net_test = net_test.astype(np.float64)
    out: dict[str, Any] = {"networks": b.test_auc([net_test])}
    inputs = networks.inputs(f.fingerprint[b.test], f.descriptors[b.test])
    for name, config in TREE_SETTINGS.items():
        t0 = time.perf_counter()
        grown, tree_oof = grow_fold_trees(networks, data, folds, b.seed, config)
        tree_test = replace(networks, trees=grown).tree_probabilities(inputs)
        weight, scores = blend_weight(y_oof, net_oof, tree_oof, tasks)
        out[name] = {
            "trees": b.test_auc([tree_test]),
            "trees_oof": scores[1.0],
            "share": weight,
            "blend": b.test_auc([blend_of(net_test, tree_test, weight)]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if name == "default":
            per_task = _per_task_blend(y_oof, net_oof, tree_oof, net_test, tree_test)
            out["per_task_share"] = b.test_auc([per_task])
            scored = [_log_odds_blend(y_oof, net_oof, tree_oof, tasks, w) for w in WEIGHTS]
            w = max(WEIGHTS, key=lambda w: (scored[WEIGHTS.index(w)], -w))
            out["log_odds_share"] = w
            out["log_odds_blend"] = b.test_auc([_log_odds(net_test, tree_test, w)])
    return out


def _logit(p: np.ndarray) -> np.ndarray:
    """Log-odds of probabilities, kept finite at 0 and 1."""
    return logit(np.clip(p, 1e-6, 1 - 1e-6))


def _log_odds(networks: np.ndarray, trees: np.ndarray, weight: float) -> np.ndarray:
    return expit((1 - weight) * _logit(networks) + weight * _logit(trees))


def _log_odds_blend(
    y: np.ndarray, networks: np.ndarray, trees: np.ndarray, tasks: list[str], weight: float
) -> float:
    return evaluate(y, _log_odds(networks, trees, weight), tasks).roc_auc


def _per_task_blend(
    y_oof: np.ndarray, net_oof: np.ndarray, tree_oof: np.ndarray, net: np.ndarray, tree: np.ndarray
) -> np.ndarray:
    """Each task blended at the share that scores its own out-of-fold ROC-AUC best (a task
    lacking a class out of fold keeps share 0)."""
    tasks = [str(j) for j in range(y_oof.shape[1])]
    per_task = [evaluate(y_oof, blend_of(net_oof, tree_oof, w), tasks).per_task for w in WEIGHTS]
    shares = [
        max(WEIGHTS, key=lambda w: per_task[WEIGHTS.index(w)].get(t, {}).get("roc_auc", -1.0))
        for t in tasks
    ]
    w = np.array(shares)
    return (1 - w) * net + w * tree


def auxiliary(b: Bench, path: str, fractions: list[float]) -> dict[str, Any]:
    d = b.data
    table = pd.read_csv(path)
    keys = canonical_smiles(table.pop("smiles").astype(str).tolist(), b.job.featurizer)
    table.index = keys
    assays = table[table.index != ""].groupby(level=0).max()  # a molecule's rows: any positive
    aux = assays.reindex(d.features.molecule_keys()).to_numpy(np.float32)
    matched = int((~np.isnan(aux)).any(axis=1).sum())
    aux[d.split.valid], aux[d.split.test] = np.nan, np.nan  # training molecules' labels only
    n_tasks = d.labels.shape[1]
    out: dict[str, Any] = {"assays": aux.shape[1], "molecules_matched": matched}
    variants = [("tox21_only", d.labels), ("with_auxiliary", np.hstack([d.labels, aux]))]
    for fraction in fractions:
        kept = np.where(np.random.default_rng(0).random(aux.shape) < fraction, aux, np.nan)
        variants.append((f"with_auxiliary_{fraction:g}", np.hstack([d.labels, kept])))
    for name, labels in variants:
        tasks = list(d.table.tasks) + [f"aux {i}" for i in range(labels.shape[1] - n_tasks)]
        model, config = to_run_configs(
            dict(DEFAULT_POINT), b.job.search.max_epochs, b.job.search.patience, 0
        )
        t0 = time.perf_counter()
        results = fit_many(
            d.features, labels, d.split, tasks, model,
            [replace(config, seed=s) for s in range(3)], num_threads=1,
        )  # fmt: skip
        probs = [p[:, :n_tasks] for p in b.probs(results, b.test)]
        out[name] = {
            "one_network": [b.test_auc([p]) for p in probs],
            "mean_of_3": b.test_auc(probs),
            "epochs": [len(r.history) for r in results],
            "seconds": round(time.perf_counter() - t0, 1),
            "auxiliary_labels": int((~np.isnan(labels[:, n_tasks:])).sum()),
        }
    return out


def main() -> None:
    settings.configure_process()
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "part",
        choices=[
            "members", "size", "blend", "pick", "trees", "tree-settings", "auxiliary", "auc-loss",
            "forest", "stack", "mordred",
        ],
    )  # fmt: skip
    parser.add_argument(
        "--auc-weight", type=float, action="append", default=[],
        help="auc-loss: also with the pairwise ROC-AUC surrogate at this weight (repeatable)",
    )  # fmt: skip
    parser.add_argument("--auxiliary", default="../shared/data/toxcast.csv.gz")
    parser.add_argument(
        "--aux-fraction", type=float, action="append", default=[],
        help="auxiliary: also with this fraction of the auxiliary labels kept (repeatable)",
    )  # fmt: skip
    add_job_arguments(parser, split="scaffold")
    parser.add_argument("--configs", type=int, default=8, help="blend, pick: configurations")
    parser.add_argument("--forest-trees", type=int, default=250, help="forest: trees a forest")
    parser.add_argument("--stack-c", type=float, default=1.0, help="stack: the regressions' C")
    parser.add_argument("--mordred-file", type=Path, help="mordred: the matrix kept between runs")
    parser.add_argument("--mordred-procs", type=int, default=1, help="mordred: processes")
    add_overrides(parser, "config override, e.g. --set featurizer.radius=3 (repeatable)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    with prepared(args, "ensembles", overrides(args.extra)) as b:
        out = {
            "part": args.part,
            "split": b.method,
            "split_seed": b.seed,
            "set": args.extra,
        }
        if args.part == "members":
            out.update(members(b))
        elif args.part == "size":
            out.update(size(b))
        elif args.part == "trees":
            out.update(trees(b))
        elif args.part == "tree-settings":
            out.update(tree_settings(b))
        elif args.part == "auxiliary":
            out.update(auxiliary(b, args.auxiliary, args.aux_fraction))
        elif args.part == "pick":
            out.update(pick(b, args.configs))
        elif args.part == "auc-loss":
            out.update(auc_loss(b, args.auc_weight))
        elif args.part == "forest":
            out.update(forest(b, args.forest_trees))
        elif args.part == "stack":
            out.update(stack(b, args.stack_c))
        elif args.part == "mordred":
            out.update(mordred(b, args.mordred_file, args.mordred_procs))
        else:
            out.update(blend(b, args.configs))
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
