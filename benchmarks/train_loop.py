"""Our tensor-resident training loop against the tutorial's per-item Dataset + DataLoader loop.

    python benchmarks/train_loop.py --data ../shared/data/tox21.csv [--device cuda] [--threads 2]

Same data (Tox21 NR-AR, 1024-bit radius-2 Morgan bits), same model (1024->512->1 tanh MLP),
same optimiser (SGD, lr 0.1), batch 128, in one process. Prints both epoch times and the ratio.
On the CPU it also prints our loop's achieved FLOP/s as a share of bare `torch.mm` calls doing
the same forward+backward matmuls (what the hardware gives PyTorch for these shapes).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from toxmodel.data import load_table
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.model import ModelConfig
from toxmodel.split import SplitConfig, split_dataset
from toxmodel.train import TrainConfig, fit

HIDDEN, BATCH, LR = 512, 128, 0.1


class TutorialDataset(Dataset):
    """The tutorial's per-item dataset: one float tensor per molecule."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.x[i], dtype=torch.float32), torch.tensor(
            self.y[i], dtype=torch.float32
        )


def tutorial_epochs(x: np.ndarray, y: np.ndarray, device: str, epochs: int) -> list[float]:
    model = nn.Sequential(nn.Linear(x.shape[1], HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.BCEWithLogitsLoss()
    loader = DataLoader(TutorialDataset(x, y), batch_size=BATCH, shuffle=True)
    times = []
    for _ in range(epochs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad()
            loss = loss_fn(model(xb).squeeze(1), yb)
            loss.backward()
            opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def bare_mm_seconds(n_rows: int, n_in: int, device: str, repeats: int = 3) -> float:
    """One epoch's forward+backward matmuls of the same MLP, as bare torch.mm calls."""
    shapes = [(n_in, HIDDEN), (HIDDEN, 1)]
    a = [torch.randn(BATCH, i, device=device) for i, _ in shapes]
    w = [torch.randn(i, o, device=device) for i, o in shapes]
    g = [torch.randn(BATCH, o, device=device) for _, o in shapes]
    steps = n_rows // BATCH
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            for k in range(2):
                torch.mm(a[k], w[k])  # forward
                torch.mm(a[k].t(), g[k])  # weight gradient
                if k > 0:
                    torch.mm(g[k], w[k].t())  # input gradient (not needed for the input layer)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(n_rows: int, n_in: int) -> float:
    steps = n_rows // BATCH
    per_step = 2 * BATCH * (2 * n_in * HIDDEN + 3 * HIDDEN * 1)
    return float(steps * per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    table = load_table(args.data, targets=["NR-AR"])
    feats = featurize(table.smiles, FeaturizerConfig(radius=2, n_bits=1024))
    labels = table.labels[feats.valid_rows]
    keep = ~np.isnan(labels[:, 0])
    feats.fingerprint, labels = feats.fingerprint[keep], labels[keep]
    feats.descriptors = feats.descriptors[keep]
    feats.valid_rows = feats.valid_rows[keep]
    split = split_dataset([table.smiles[i] for i in feats.valid_rows], labels, SplitConfig(seed=0))
    train_x = feats.fingerprint[split.train].astype(np.float32)
    train_y = labels[split.train, 0]
    n_train = len(split.train)
    print(f"machine: {platform.platform()} | device {args.device} | threads {args.threads}")
    print(f"NR-AR rows: {len(labels)} (train {n_train}), inputs {train_x.shape[1]}")

    tut = tutorial_epochs(train_x, train_y, args.device, args.epochs)
    result = fit(
        feats,
        labels,
        split,
        ["NR-AR"],
        ModelConfig(hidden=(HIDDEN,), activation="tanh", dropout=0.0),
        TrainConfig(
            epochs=args.epochs + 1,
            batch_size=BATCH,
            optimizer="sgd",
            lr=LR,
            momentum=0.0,
            weight_decay=0.0,
            patience=0,
        ),
        device=args.device,
        num_threads=args.threads,
    )
    ours = [h["train_seconds"] for h in result.history][1:]  # first epoch warms up
    t_tut, t_ours = float(np.median(tut)), float(np.median(ours))
    print(f"tutorial loop: {t_tut:.3f} s/epoch (median of {len(tut)})")
    print(f"toxmodel loop: {t_ours:.3f} s/epoch (median of {len(ours)})")
    print(f"speed-up: {t_tut / t_ours:.2f}x (target on a GPU: >= 5x)")
    if not args.device.startswith("cuda"):
        mm = bare_mm_seconds(n_train, train_x.shape[1], args.device)
        flops = matmul_flops(n_train, train_x.shape[1])
        print(
            f"matmul FLOP/s: ours {flops / t_ours / 1e9:.1f} GFLOP/s, bare torch.mm "
            f"{flops / mm / 1e9:.1f} GFLOP/s, share {mm / t_ours:.2f} (target >= 0.7)"
        )


if __name__ == "__main__":
    main()
