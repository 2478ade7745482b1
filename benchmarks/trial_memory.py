"""Per-trial memory of trials that share a node: the feature matrix read in place from Ray's
object store (now) against each trial's private copy of it (before), side by side in one run.

    python benchmarks/trial_memory.py                 # 10^6 rows x 2048 bits, 12 tasks, 2 trials
    python benchmarks/trial_memory.py --rows 250000 --fp-columns 2215 --descriptors 217

The default data has the default featurizer's shape (`FeaturizerConfig()`: 2048 Morgan bits as
uint8 columns, no descriptors); `--fp-columns 2215 --descriptors 217` is configs/tox21.yaml's
(2048 bits + 167 MACCS keys, RDKit 2D descriptors). Rows are random ECFP-like bits (about 2 % on),
normal descriptors with a few NaN, labels with 30 % missing, a random 80/10/10 split; the
molecule keys (one canonical SMILES string per row, as `prepare` makes them) come along.

Each way runs on a fresh local Ray (`ray.init(num_cpus=trials)`): the driver puts a
`tune.trainable.TrialData` in the object store once, as `tune.with_parameters` does, and
`--trials` actors (1 CPU each) get it, build the trainer's data and train one epoch together:

- `copy` (before): toxmodel.train up to commit ed11203, reproduced here (`copy_epoch`): the
  read-only fingerprint matrix copied (`_tensor`), the descriptors scaled into a float32 copy of
  the whole matrix, float32 targets and mask made from the labels, one gather of the whole
  shuffled training set per epoch; and the molecule keys unpickled in every trial.
- `shared` (now): `toxmodel.train.fit` as `tune.trainable.train_trial` calls it (on the
  `TrialData` as it now travels, without the molecule keys).

Memory of each trial process, from /proc/PID/smaps_rollup, at the end of its epoch (data still
held) and the peak of 0.2 s samples over the run: USS (Private_Clean + Private_Dirty: pages only
this process maps, i.e. its own copies), PSS (shared pages split among the processes that map
them), RSS (shared object-store pages counted whole in every trial that read them) and Anon
(anonymous memory: private heap only, no object-store page). The object store's share is
printed too (the node holds it once).
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from toxmodel.featurize import DescriptorScaler, Features, FeaturizerConfig, fingerprint_width
from toxmodel.model import MLP, ModelConfig
from toxmodel.split import Split
from toxmodel.train import (
    EVAL_BATCH,
    EpochResult,
    TrainConfig,
    _batches,
    _optimizer,
    fit,
    masked_bce,
)
from tune.bridge import init_local_ray
from tune.trainable import TrialData

MODEL = ModelConfig(hidden=(64,), dropout=0.1)  # small: the epoch is short, the data is not
TRAIN = TrainConfig(epochs=1, batch_size=256, lr=1e-3, patience=0)
FIELDS = ("uss", "pss", "rss", "anon")
GB = 1e9


def memory(pid: int | str = "self") -> dict[str, int]:
    """USS, PSS, RSS and anonymous bytes of a process (Linux smaps_rollup)."""
    kb: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                kb[parts[0][:-1]] = int(parts[1])
    return {
        "uss": 1024 * (kb["Private_Clean"] + kb["Private_Dirty"]),
        "pss": 1024 * kb["Pss"],
        "rss": 1024 * kb["Rss"],
        "anon": 1024 * kb["Anonymous"],
    }


class Peak:
    """The largest of each memory figure, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.top = dict.fromkeys(FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for key, value in memory().items():
            self.top[key] = max(self.top[key], value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Peak:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def copy_epoch(data: TrialData, on_epoch: Any) -> None:
    """One epoch the way toxmodel.train held its data up to commit ed11203 (see the module
    docstring); the model, loss and optimiser are the library's."""
    features, split, cfg = data.features, data.split, TRAIN
    labels = np.asarray(data.labels, dtype=np.float32)
    torch.manual_seed(cfg.seed)
    descriptors = None
    if features.descriptors.shape[1]:
        scaler = DescriptorScaler.fit(features.descriptors[split.train])
        descriptors = torch.from_numpy(scaler.transform(features.descriptors))
    fingerprint = torch.from_numpy(np.array(features.fingerprint))  # `_tensor`: read-only: copy
    targets = torch.from_numpy(np.nan_to_num(labels, nan=0.0))
    mask = torch.from_numpy((~np.isnan(labels)).astype(np.float32))
    n_desc = 0 if descriptors is None else descriptors.shape[1]
    model = MLP(fingerprint.shape[1] + n_desc, labels.shape[1], MODEL)
    optimizer = _optimizer(model, cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(cfg.seed)
    train_idx = torch.tensor(np.asarray(split.train), dtype=torch.long)

    def inputs(fp: torch.Tensor, desc: torch.Tensor | None) -> torch.Tensor:
        x = fp.float()
        return x if desc is None else torch.cat([x, desc], 1)

    model.train()
    order = train_idx[torch.randperm(len(train_idx), generator=generator)]
    # the old `_DeviceData.take(order)`: the whole shuffled training set gathered at once
    ep_fp, ep_t, ep_m = fingerprint[order], targets[order], mask[order]
    ep_desc = None if descriptors is None else descriptors[order]
    for start, stop in _batches(len(order), cfg.batch_size):
        x = inputs(ep_fp[start:stop], None if ep_desc is None else ep_desc[start:stop])
        loss = masked_bce(model(x), ep_t[start:stop], ep_m[start:stop])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    valid = torch.tensor(np.asarray(split.valid), dtype=torch.long)
    with torch.inference_mode():
        for s in range(0, len(valid), EVAL_BATCH):
            idx = valid[s : s + EVAL_BATCH]
            model(inputs(fingerprint[idx], None if descriptors is None else descriptors[idx]))
    on_epoch()


@ray.remote(num_cpus=1)
class Trial:
    """One trial's process: gets the shared data, trains one epoch, reports its memory."""

    def run(self, refs: list[ray.ObjectRef], mode: str) -> dict[str, Any]:
        torch.set_num_threads(1)
        out: dict[str, Any] = {"pid": os.getpid(), "start": memory()}
        started = time.perf_counter()
        with Peak() as peak:
            data: TrialData = ray.get(refs[0])
            out["fetched"] = memory()
            out["keys_held"] = data.features.canonical is not None

            def on_epoch(epoch: EpochResult | None = None) -> None:
                out["epoch"] = memory()

            if mode == "copy":
                copy_epoch(data, on_epoch)
            else:
                fit(
                    data.features,
                    data.labels,
                    data.split,
                    data.tasks,
                    MODEL,
                    TRAIN,
                    callback=on_epoch,
                    num_threads=1,
                )
            del data
        out["peak"] = peak.top
        out["seconds"] = time.perf_counter() - started
        return out


@dataclass
class Synthetic:
    features: Features
    labels: np.ndarray
    split: Split
    tasks: list[str]


def synthetic(rows: int, fp_columns: int, n_desc: int, n_tasks: int, seed: int = 0) -> Synthetic:
    """Random data of the real shapes and dtypes, built a slice at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    fp = np.empty((rows, fp_columns), dtype=np.uint8)
    desc = np.empty((rows, n_desc), dtype=np.float32)
    step = 50_000
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        fp[start:stop] = rng.random((stop - start, fp_columns), dtype=np.float32) < 0.02
        if n_desc:
            block = rng.normal(size=(stop - start, n_desc)).astype(np.float32)
            block[rng.random(block.shape) < 0.01] = np.nan
            desc[start:stop] = block
    labels = fp[:, :n_tasks].astype(np.float32)  # learnable: task j is bit j
    labels[rng.random(labels.shape) < 0.3] = np.nan
    order = rng.permutation(rows)
    a, b = int(0.8 * rows), int(0.9 * rows)
    split = Split(train=np.sort(order[:a]), valid=np.sort(order[a:b]), test=np.sort(order[b:]))
    features = Features(
        fingerprint=fp,
        descriptors=desc,
        valid_rows=np.arange(rows, dtype=np.int64),
        invalid=[],
        config=FeaturizerConfig(descriptors=n_desc > 0),
        canonical=[f"C{i:07d}c1ccc(cc1)C(=O)N[C@@H](C)CO" for i in range(rows)],
    )
    return Synthetic(features, labels, split, [f"task{j}" for j in range(n_tasks)])


def node_in_use() -> int:
    """Bytes of memory in use on the machine, all processes (MemTotal - MemAvailable)."""
    kb = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, value = line.split(":", 1)
            kb[name] = int(value.split()[0])
    return 1024 * (kb["MemTotal"] - kb["MemAvailable"])


class NodePeak(Peak):
    """The machine's peak memory in use, sampled in a thread."""

    def _sample(self) -> None:
        self.top["node"] = max(self.top.get("node", 0), node_in_use())


def run_mode(args: argparse.Namespace, mode: str) -> tuple[list[dict[str, Any]], int]:
    """`args.trials` actors on a fresh local Ray, each one epoch on data put in the object
    store once: their figures, and the machine's peak memory in use above its level before
    the data was built (the driver keeps no copy of the data once it is stored)."""
    idle = node_in_use()
    init_local_ray(
        args.trials, 0, address="local", logging_level="ERROR", log_to_driver=False
    )  # "local": a new private Ray, even where another runs on this machine
    try:
        data = synthetic(args.rows, args.fp_columns, args.descriptors, args.tasks)
        trial_data = TrialData(
            features=data.features,
            labels=data.labels,
            split=data.split,
            tasks=data.tasks,
            featurizer=data.features.config,
            max_epochs=1,
            patience=0,
            seed=0,
        )
        if mode == "copy":  # before: the molecule keys travelled with every trial's data
            trial_data.features = data.features
        ref = ray.put(trial_data)
        del trial_data, data
        actors = [Trial.remote() for _ in range(args.trials)]
        with NodePeak(interval=0.5) as node:
            results = ray.get([a.run.remote([ref], mode) for a in actors])
        return results, node.top["node"] - idle
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--fp-columns", type=int, default=fingerprint_width(FeaturizerConfig()))
    parser.add_argument("--descriptors", type=int, default=0)
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--modes", default="shared,copy", help="comma-separated: copy, shared")
    args = parser.parse_args()

    matrix = args.rows * (args.fp_columns + 4 * args.descriptors)
    print(
        f"{args.rows:,} rows: fingerprint {args.fp_columns} uint8 columns, {args.descriptors} "
        f"float32 descriptors, {args.tasks} tasks; matrix {matrix / GB:.2f} GB (in the object "
        f"store once per node); {args.trials} trials of 1 CPU"
    )
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"ray {ray.__version__}, model {MODEL.hidden}, batch {TRAIN.batch_size}, 1 epoch"
    )
    table: dict[str, list[dict[str, Any]]] = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        results, node = run_mode(args, mode)
        table[mode] = results
        print(f"\n{mode}: machine's peak memory in use above idle {node / GB:.2f} GB")
        print(
            f"{'trial':>5} {'when':>6} "
            + " ".join(f"{k.upper() + ' GB':>8}" for k in FIELDS)
            + f" {'keys':>5} {'s':>5}"
        )
        for i, r in enumerate(results):
            for when in ("epoch", "peak"):
                row = " ".join(f"{r[when][k] / GB:8.2f}" for k in FIELDS)
                print(f"{i:>5} {when:>6} {row} {r['keys_held']!s:>5} {r['seconds']:5.0f}")
    if {"copy", "shared"} <= table.keys():
        print("\nper trial, mean over trials: before (copy) -> now (shared), ratio")
        for when in ("epoch", "peak"):
            for k in FIELDS:
                old = np.mean([r[when][k] for r in table["copy"]])
                new = np.mean([r[when][k] for r in table["shared"]])
                print(
                    f"  {when:>5} {k.upper():>4}: {old / GB:6.2f} GB -> {new / GB:6.2f} GB  "
                    f"({new / old:.2f}x)"
                )
        print("USS above each trial process's own start (torch and Ray loaded, no data yet):")
        for when in ("epoch", "peak"):
            old, new = (
                np.mean([r[when]["uss"] - r["start"]["uss"] for r in table[m]])
                for m in ("copy", "shared")
            )
            print(f"  {when:>5}  USS: {old / GB:6.2f} GB -> {new / GB:6.2f} GB  ({new / old:.2f}x)")


if __name__ == "__main__":
    main()
