"""Model quality on Tox21: the tutorial's NR-AR baseline, and the default MLP on all 12 tasks.

    python benchmarks/quality.py --data ../shared/data/tox21.csv [--epochs 30] [--threads 2]

1. The Tox21 tutorial's experiment, reproduced as it is written: NR-AR only, 1024-bit radius-2
   Morgan bits, 80/10/10 random split, a 1024->512->1 tanh MLP, SGD lr 0.1, BCE-with-logits,
   100 epochs, batch 128, the last epoch's weights. Prints test accuracy (the tutorial's metric)
   beside the majority-class accuracy, and test ROC-AUC / PR-AUC.
2. toxtune's default configuration (`tune.space.DEFAULT_POINT`, the first trial of every
   search) trained for a fixed budget with early stopping on validation mean ROC-AUC, on a
   random split and on a scaffold split, for each split seed (training seed = split seed).
   Prints validation and test figures per seed, and the test mean and std over the seeds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toxmodel.checkpoint import load_checkpoint
from toxmodel.data import load_table
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.metrics import Metrics, evaluate
from toxmodel.split import SplitConfig, split_dataset
from toxmodel.train import FitResult, fit
from tune.space import DEFAULT_POINT, to_run_configs


def tutorial_baseline(data: str, epochs: int) -> None:
    """The tutorial's loop in plain PyTorch (full-batch evaluation of the last epoch)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--epochs", type=int, default=30, help="budget of the default MLP")
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument("--tutorial-epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.platform()} | torch {torch.__version__} | threads {args.threads}")
    tutorial_baseline(args.data, args.tutorial_epochs)
    default_mlp(args.data, args.epochs, args.patience, args.threads, args.split_seeds)


if __name__ == "__main__":
    main()
