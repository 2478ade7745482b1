"""A learned model of the molecules beside a k-fold job's networks and trees (issue 26).

    python benchmarks/graph.py --split random --split-seed 0

Issue 26's goals were not met by any choice among fingerprint networks (RESULTS "What a k-fold
job's registered model is worth") nor by trees beside them ("Trees beside the networks"); the
sessions' reading was that they need a better model of the molecules. This measures the field's
usual one: a directed message-passing network over the molecular graph (Chemprop's D-MPNN:
atom and bond features, three steps of bond messages, the atoms' mean, then a feed-forward head
that also reads the job's scaled RDKit descriptors, as Chemprop's `--features_generator
rdkit_2d` does), trained on each fold of the default point's 5-fold job (fold i's network on
fold i's training rows, stopped on its validation rows' ROC-AUC, patience 5, at most
`--max-epochs`), then blended with the fold networks and their trees at the shares (in eighths)
whose out-of-fold ROC-AUC is best. Reports the three learners and both blends (networks +
trees; all three) out of fold and on the job's test split, which no choice reads.

Not in the product: the D-MPNN lives here only. One thread, Adam at 1e-3, batches of 50
molecules, hidden size 256, dropout 0.1; about 5 s an epoch of 6,300 molecules on one CPU.
Prints one JSON line (and one per fold as it goes).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
from ensembles import (  # benchmarks/ensembles.py: the same job and folds
    Bench,
    K,
    add_job_arguments,
    networks_and_trees,
    prepared,
    three_learners,
)
from rdkit import Chem, RDLogger
from torch import nn

from toxmodel.featurize import DescriptorScaler
from toxmodel.folds import out_of_fold
from toxmodel.metrics import evaluate
from tune import settings

ELEMENTS = [1, 5, 6, 7, 8, 9, 11, 14, 15, 16, 17, 19, 20, 26, 29, 30, 33, 34, 35, 50, 53]
HYBRIDS = [
    Chem.HybridizationType.SP,
    Chem.HybridizationType.SP2,
    Chem.HybridizationType.SP3,
    Chem.HybridizationType.SP3D,
    Chem.HybridizationType.SP3D2,
]
BONDS = [Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC]
BOND_FEATURES = 14
Graph = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # atoms, bond src, bond dst, bonds


def one_hot(value: Any, choices: list[Any]) -> list[float]:
    """`choices`' one-hot of `value`, with a last slot for anything else."""
    out = [0.0] * (len(choices) + 1)
    out[choices.index(value) if value in choices else -1] = 1.0
    return out


def atom_features(atom: Chem.Atom) -> list[float]:
    return (
        one_hot(atom.GetAtomicNum(), ELEMENTS)
        + one_hot(atom.GetTotalDegree(), [0, 1, 2, 3, 4, 5])
        + one_hot(atom.GetFormalCharge(), [-1, -2, 1, 2, 0])
        + one_hot(int(atom.GetChiralTag()), [0, 1, 2, 3])
        + one_hot(atom.GetTotalNumHs(), [0, 1, 2, 3, 4])
        + one_hot(atom.GetHybridization(), HYBRIDS)
        + [float(atom.GetIsAromatic()), atom.GetMass() * 0.01]
    )


def bond_features(bond: Chem.Bond) -> list[float]:
    kind, stereo = one_hot(bond.GetBondType(), BONDS), one_hot(int(bond.GetStereo()), [*range(6)])
    return [*kind, float(bond.GetIsConjugated()), float(bond.IsInRing()), *stereo]


def graphs(smiles: list[str]) -> list[Graph]:
    """Each molecule's atom features and its bonds as pairs of directed edges (2i, 2i + 1)."""
    out = []
    for text in smiles:
        mol = Chem.MolFromSmiles(text)
        atoms = np.array([atom_features(a) for a in mol.GetAtoms()], np.float32)
        src, dst, feats = [], [], []
        for bond in mol.GetBonds():
            i, j, f = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx(), bond_features(bond)
            src += [i, j]
            dst += [j, i]
            feats += [f, f]
        edges = np.array(feats, np.float32).reshape(-1, BOND_FEATURES)
        out.append((atoms, np.array(src, np.int64), np.array(dst, np.int64), edges))
    return out


def collate(gs: list[Graph], rows: np.ndarray) -> tuple[Any, ...]:
    """The molecules `rows` as one disjoint graph: atoms, edges (with each edge's reverse) and
    the molecule of each atom."""
    atoms, src, dst, edges, molecule = [], [], [], [], []
    n = 0
    for k, i in enumerate(rows):
        a, s, d, e = gs[i]
        atoms.append(a)
        src.append(s + n)
        dst.append(d + n)
        edges.append(e)
        molecule.append(np.full(len(a), k))
        n += len(a)
    s = np.concatenate(src)
    reverse = np.arange(len(s)) ^ 1  # edges come in pairs
    parts = (np.concatenate(atoms), s, np.concatenate(dst), reverse, np.concatenate(edges))
    return (*map(torch.from_numpy, parts), torch.from_numpy(np.concatenate(molecule)), len(rows))


class DMPNN(nn.Module):
    """Directed message passing (Yang et al. 2019, Chemprop): messages live on bonds, a bond's
    next message sums the messages into its source atom except its own reverse."""

    def __init__(self, atom: int, extra: int, tasks: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        self.w_in = nn.Linear(atom + BOND_FEATURES, hidden, bias=False)
        self.w_message = nn.Linear(hidden, hidden, bias=False)
        self.w_atom = nn.Linear(atom + hidden, hidden)
        self.depth = depth
        self.head = nn.Sequential(
            nn.Dropout(0.1),
            nn.Linear(hidden + extra, 256),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(256, tasks),
        )

    def forward(self, graph: tuple[Any, ...], extra: torch.Tensor) -> torch.Tensor:
        atoms, src, dst, reverse, edges, molecule, n = graph
        h0 = torch.relu(self.w_in(torch.cat([atoms[src], edges], 1)))
        h = h0
        for _ in range(self.depth - 1):
            into = torch.zeros(atoms.shape[0], h.shape[1]).index_add_(0, dst, h)
            h = torch.relu(h0 + self.w_message(into[src] - h[reverse]))
        into = torch.zeros(atoms.shape[0], h.shape[1]).index_add_(0, dst, h)
        per_atom = torch.relu(self.w_atom(torch.cat([atoms, into], 1)))
        pooled = torch.zeros(n, per_atom.shape[1]).index_add_(0, molecule, per_atom)
        counts = torch.bincount(molecule, minlength=n).clamp(min=1).unsqueeze(1)
        return self.head(torch.cat([pooled / counts, extra], 1))


def roc_auc(labels: np.ndarray, probs: np.ndarray, tasks: list[str]) -> float:
    return evaluate(labels, probs, tasks).roc_auc


@torch.no_grad()
def predict(model: DMPNN, gs: list[Graph], extra: np.ndarray, rows: np.ndarray) -> np.ndarray:
    model.eval()
    chunks = [rows[s : s + 500] for s in range(0, len(rows), 500)]
    out = [torch.sigmoid(model(collate(gs, c), torch.from_numpy(extra[c]))) for c in chunks]
    return torch.cat(out).numpy().astype(np.float64)


def train_fold(
    gs: list[Graph],
    extra: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    valid: np.ndarray,
    tasks: list[str],
    seed: int,
    max_epochs: int,
    patience: int = 5,
    batch: int = 50,
) -> tuple[DMPNN, float, int]:
    """One fold's network, its best validation ROC-AUC and the epochs it ran (masked BCE)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DMPNN(gs[0][0].shape[1], extra.shape[1], labels.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = torch.from_numpy(np.nan_to_num(labels, nan=0.0))
    known = torch.from_numpy(~np.isnan(labels))
    best, best_state, waited, epochs = -1.0, None, 0, 0
    for _ in range(max_epochs):
        model.train()
        order = rng.permutation(train)
        for s in range(0, len(order), batch):
            b = order[s : s + batch]
            logits = model(collate(gs, b), torch.from_numpy(extra[b]))
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y[b], reduction="none")
            loss = (loss * known[b]).sum() / known[b].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        score = roc_auc(labels[valid], predict(model, gs, extra, valid), tasks)
        epochs += 1
        if score > best:
            best, waited = score, 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    model.load_state_dict(best_state)
    return model, best, epochs


def run(b: Bench, max_epochs: int) -> dict[str, Any]:
    d, f = b.data, b.data.features
    tasks = list(d.table.tasks)
    folds = b.folds(K, b.seed)
    t0 = time.perf_counter()
    _, learners = networks_and_trees(b, folds)
    out: dict[str, Any] = {"networks_trees_seconds": round(time.perf_counter() - t0)}

    t0 = time.perf_counter()
    gs = graphs([d.table.smiles[i] for i in f.valid_rows])
    per_fold, graph_test, folds_run = [], [], []
    for i, s in enumerate(folds.splits):
        extra = DescriptorScaler.fit(f.descriptors[s.train]).transform(f.descriptors)
        model, best, epochs = train_fold(
            gs, extra, d.labels, s.train, s.valid, tasks, seed=i, max_epochs=max_epochs
        )
        per_fold.append((s.valid, predict(model, gs, extra, s.valid)))
        graph_test.append(predict(model, gs, extra, b.test))
        folds_run.append({"valid_roc_auc": round(best, 4), "epochs": epochs})
        print(json.dumps({"fold": i, **folds_run[-1]}), flush=True)
    graph_oof = out_of_fold(folds, per_fold)
    graph_test_mean = np.mean(graph_test, axis=0)
    out.update(graph_seconds=round(time.perf_counter() - t0), graph_folds=folds_run)

    learners["graph"] = (graph_oof, graph_test_mean)
    out.update(three_learners(b, folds, learners))
    return out


def main() -> None:
    settings.configure_process()
    torch.set_num_threads(1)
    RDLogger.DisableLog("rdApp.*")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_job_arguments(parser, split="random")
    parser.add_argument("--max-epochs", type=int, default=30)
    args = parser.parse_args()
    t0 = time.perf_counter()
    with prepared(args, "graph") as b:
        out = {"split": b.method, "split_seed": b.seed, **run(b, args.max_epochs)}
    out["seconds"] = round(time.perf_counter() - t0)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
