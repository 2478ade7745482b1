"""One prepared GPU benchmark: training-loop speed, packing against fusion, and FLOP/s share.

Here, where RDKit and the data are (writes one compressed .npz of about 10 MB):

    python benchmarks/gpu.py prepare --out gpu_bench/

On a GPU machine (Python, PyTorch, numpy, pandas, scikit-learn; no RDKit, Ray, Optuna, MLflow
or numba needed: `run` imports none of them and checks so), about 5 minutes on an H100:

    python benchmarks/gpu.py run --data gpu_bench/tox21_features.npz --out OUT [--budget-s 420]

Anywhere, in seconds on the CPU with tiny sizes (synthetic data unless --data is given):

    python benchmarks/gpu.py --check --out tmp

Sections (one table printed last; the same figures in OUT/gpu_results.json):
  equivalence  fit_many against fit on the device (K=2): largest weight difference.
  loop         the Tox21 tutorial's per-item Dataset + DataLoader loop against toxmodel's
               (benchmarks/train_loop.py's experiment: NR-AR, 1024 bits, 1024-512-1), epochs/s.
  packing      K trial processes sharing the GPU (K = 1, 2, ..., 32): trials/hour, each
               process's peak GPU memory beside tune.resources' `gpus_per_trial: auto` estimate.
  fusion       K same-shape trials as one fit_many in one process (K = 1, ..., 64), with each
               member's own dropout stream (exact) and with one shared draw: trials/hour.
  flops        model FLOP/s of the best packing and the best fusion as a share of a bare fp32
               matmul's FLOP/s on the same GPU in the same run.
A trial is `trial_epochs` epochs (the config's max_epochs) of the search's default point
(1024-512 ReLU, batch 128, AdamW, cosine) on Tox21 with configs/tox21.yaml's features.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the GPU machine runs the carried tree without installing it
    sys.path.insert(0, str(ROOT))

from toxmodel.featurize import Features, FeaturizerConfig  # noqa: E402
from toxmodel.fused import fit_many  # noqa: E402
from toxmodel.model import ModelConfig  # noqa: E402
from toxmodel.split import Split  # noqa: E402
from toxmodel.train import EpochResult, TrainConfig, fit  # noqa: E402
from tune.resources import CUDA_CONTEXT_BYTES, TrialShape, estimate_trial_bytes, gpu_fraction  # noqa: E402

FORBIDDEN = ("rdkit", "ray", "optuna", "mlflow", "numba")  # absent on the GPU machine
DATA_FILE = "tox21_features.npz"
RESULTS_FILE = "gpu_results.json"
FULL = {  # sizes for a real run
    "pack_k": [1, 2, 4, 8, 16, 32],
    "fuse_k": [1, 2, 4, 8, 16, 32, 64],
    "pack_window_s": 15.0,  # steady-state window each packing K is measured over
    "fuse_epochs": 5,  # epochs per fused run (the first is warm-up and not counted)
    "loop_epochs": 3,
    "mm_size": 8192,
    "equivalence_epochs": 3,
}
CHECK = {
    "pack_k": [1, 2],
    "fuse_k": [1, 2, 3],
    "pack_window_s": 1.0,
    "fuse_epochs": 3,
    "loop_epochs": 2,
    "mm_size": 256,
    "equivalence_epochs": 2,
}


# --- data ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Bench:
    """The prepared arrays: Tox21 features for trials, and the tutorial's NR-AR experiment."""

    features: Features
    labels: np.ndarray
    split: Split
    tasks: list[str]
    model: ModelConfig
    train: TrainConfig  # one trial's settings (seed varies per trial)
    tutorial_x: np.ndarray  # uint8 bits (n, 1024)
    tutorial_y: np.ndarray  # float32 (n,)
    tutorial_split: Split
    meta: dict[str, Any]


def _features(
    fingerprint: np.ndarray, descriptors: np.ndarray, config: FeaturizerConfig
) -> Features:
    n = len(fingerprint)
    return Features(fingerprint, descriptors, np.arange(n, dtype=np.int64), [], config)


def load_bench(path: Path) -> Bench:
    """Read a prepared (or synthetic) .npz; no RDKit needed."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta_json"]))
        features = _features(
            f["fingerprint"],
            f["descriptors"].astype(np.float32),
            FeaturizerConfig(**meta["featurizer"]),
        )
        labels = f["labels"].astype(np.float32)
        split = Split(*(f[name].astype(np.int64) for name in ("train", "valid", "test")))
        bits = np.unpackbits(f["tutorial_bits"], axis=1)[:, : meta["tutorial_n_bits"]]
        tutorial_split = Split(
            *(f[f"tutorial_{name}"].astype(np.int64) for name in ("train", "valid", "test"))
        )
        tutorial_y = f["tutorial_labels"].astype(np.float32)
    model = meta["model_config"]
    model["hidden"] = tuple(model["hidden"])
    return Bench(
        features=features,
        labels=labels,
        split=split,
        tasks=list(meta["tasks"]),
        model=ModelConfig(**model),
        train=TrainConfig(**meta["train_config"]),
        tutorial_x=bits,
        tutorial_y=tutorial_y,
        tutorial_split=tutorial_split,
        meta=meta,
    )


def save_bench(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    """One compressed .npz: uint8 fingerprints, float32 descriptors, float16 labels (0/1/NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tutorial_bits = arrays.pop("tutorial_x")
    meta = {**meta, "tutorial_n_bits": int(tutorial_bits.shape[1])}
    np.savez_compressed(
        path,
        **arrays,
        tutorial_bits=np.packbits(tutorial_bits.astype(bool), axis=1),
        meta_json=np.array(json.dumps(meta)),
    )
    return path


def synthetic_bench(path: Path) -> Path:
    """A tiny stand-in with the prepared file's layout, for --check without --data."""
    rng = np.random.default_rng(0)
    n, n_fp, n_desc, n_tasks = 600, 64, 8, 4
    fp = rng.poisson(0.6, size=(n, n_fp)).clip(0, 255).astype(np.uint8)
    bits = fp > 0
    labels = np.stack([bits[:, 0] & bits[:, 1], bits[:, 2] | bits[:, 3], bits[:, 4], bits[:, 5]], 1)
    labels = labels.astype(np.float16)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    rows = rng.permutation(n).astype(np.int32)
    tut_n = 400
    tut_x = rng.random((tut_n, 64)) < 0.3
    tut_rows = rng.permutation(tut_n).astype(np.int32)
    model = ModelConfig(hidden=(32, 16), dropout=0.2, input_dropout=0.1)
    train = TrainConfig(epochs=3, batch_size=32, lr=1e-3, scheduler="cosine", patience=0)
    meta = {
        "source": "synthetic",
        "tasks": [f"task{j}" for j in range(n_tasks)],
        "featurizer": dataclasses.asdict(FeaturizerConfig(n_bits=n_fp)),
        "model_config": dataclasses.asdict(model),
        "train_config": dataclasses.asdict(train),
    }
    arrays = {
        "fingerprint": fp,
        "descriptors": rng.normal(size=(n, n_desc)).astype(np.float32),
        "labels": labels,
        "train": rows[:360],
        "valid": rows[360:480],
        "test": rows[480:],
        "tutorial_x": tut_x,
        "tutorial_labels": (tut_x[:, 0] ^ tut_x[:, 1]).astype(np.float16),
        "tutorial_train": tut_rows[:320],
        "tutorial_valid": tut_rows[320:360],
        "tutorial_test": tut_rows[360:],
    }
    return save_bench(path, arrays, meta)


def prepare(out: Path, config: str, data: str, cache: Path) -> Path:
    """Featurize Tox21 (the config's featurizer and split) and the tutorial experiment here."""
    from toxmodel.data import load_table
    from toxmodel.featurize import featurize_cached
    from toxmodel.split import SplitConfig, split_dataset
    from tune.config import load_config
    from tune.space import DEFAULT_POINT, to_run_configs

    job = load_config(config)
    table = load_table(data)
    features = featurize_cached(table.smiles, job.featurizer, cache, table.content_hash)
    labels = table.labels[features.valid_rows]
    smiles = [table.smiles[i] for i in features.valid_rows]
    split = split_dataset(smiles, labels, job.split)
    model, train = to_run_configs(DEFAULT_POINT, job.search.max_epochs, job.search.patience, 0)
    train = dataclasses.replace(train, patience=0)  # a trial runs its epochs: steady throughput

    # The tutorial's experiment, as benchmarks/train_loop.py sets it up.
    nr_ar = load_table(data, targets=["NR-AR"])
    tut_config = FeaturizerConfig(radius=2, n_bits=1024)
    tut = featurize_cached(nr_ar.smiles, tut_config, cache, nr_ar.content_hash)
    tut_labels = nr_ar.labels[tut.valid_rows]
    keep = ~np.isnan(tut_labels[:, 0])
    tut_smiles = [nr_ar.smiles[i] for i in tut.valid_rows[keep]]
    tut_split = split_dataset(tut_smiles, tut_labels[keep], SplitConfig(seed=0))
    meta = {
        "source": str(data),
        "content_hash": table.content_hash,
        "config": str(config),
        "prepared": dt.date.today().isoformat(),
        "tasks": list(table.tasks),
        "featurizer": dataclasses.asdict(job.featurizer),
        "model_config": dataclasses.asdict(model),
        "train_config": dataclasses.asdict(train),
    }
    arrays = {
        "fingerprint": features.fingerprint,
        "descriptors": features.descriptors.astype(np.float32),  # raw values reach 1e30: no fp16
        "labels": labels.astype(np.float16),
        "train": split.train.astype(np.int32),
        "valid": split.valid.astype(np.int32),
        "test": split.test.astype(np.int32),
        "tutorial_x": tut.fingerprint[keep],
        "tutorial_labels": tut_labels[keep, 0].astype(np.float16),
        "tutorial_train": tut_split.train.astype(np.int32),
        "tutorial_valid": tut_split.valid.astype(np.int32),
        "tutorial_test": tut_split.test.astype(np.int32),
    }
    path = save_bench(out / DATA_FILE, arrays, meta)
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): {len(features)} rows, "
        f"{features.n_features} inputs, {len(table.tasks)} tasks; tutorial {int(keep.sum())} rows"
    )
    return path


# --- measurements ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> tuple[float, str]:
    """This process's peak memory: the CUDA allocator's on a GPU, max RSS on the CPU."""
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "cpu_max_rss"


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def trial_configs(bench: Bench, k: int, epochs: int) -> list[TrainConfig]:
    """K search-like trials of one shape: own seed, learning rate and weight decay."""
    return [
        dataclasses.replace(
            bench.train,
            epochs=epochs,
            seed=i,
            lr=bench.train.lr * 2.0 ** ((i % 5 - 2) / 2),
            weight_decay=bench.train.weight_decay * 10.0 ** (i % 3 - 1),
        )
        for i in range(k)
    ]


def model_flops_per_epoch(bench: Bench) -> float:
    """Matmul FLOPs of one epoch of one trial: forward, weight and input gradients, validation."""
    sizes = [bench.features.n_features, *bench.model.hidden, len(bench.tasks)]
    layers = list(itertools.pairwise(sizes))
    per_row_train = sum((4 if i == 0 else 6) * a * b for i, (a, b) in enumerate(layers))
    per_row_valid = sum(2 * a * b for a, b in layers)
    return float(per_row_train * len(bench.split.train) + per_row_valid * len(bench.split.valid))


def estimate(bench: Bench, device: torch.device) -> dict[str, float]:
    """tune.resources' `gpus_per_trial: auto` sizing for this trial shape on this device."""
    shape = TrialShape(
        n_rows=len(bench.features),
        fp_bytes_per_row=bench.features.fingerprint.shape[1],
        n_descriptors=bench.features.descriptors.shape[1],
        n_tasks=len(bench.tasks),
        hidden=tuple(bench.model.hidden),
        batch_size=bench.train.batch_size,
    )
    total = estimate_trial_bytes(shape)
    return {
        "estimate_bytes": float(total),
        "estimate_bytes_without_context": float(total - CUDA_CONTEXT_BYTES),
        "auto_gpu_fraction": gpu_fraction(shape, _device_memory(device)),
    }


def run_equivalence(
    bench: Bench, device: torch.device, epochs: int, same_rates: bool
) -> dict[str, float]:
    """fit_many (K=2, own dropout streams) against two fit calls on the device.

    `same_rates`: the finalize step's members (seeds differ; one optimiser call for the stack);
    else search-like trials (rates differ too; one optimiser call per member).
    """
    configs = trial_configs(bench, 2, epochs)
    if same_rates:
        configs = [dataclasses.replace(bench.train, epochs=epochs, seed=c.seed) for c in configs]
    args = (bench.features, bench.labels, bench.split, bench.tasks, bench.model)
    single = [fit(*args, cfg, device=device) for cfg in configs]
    fused = fit_many(*args, configs, device=device)
    diff, scale, auc = 0.0, 0.0, 0.0
    identical = True
    for a, b in zip(single, fused, strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        for key in sa:
            delta = (sa[key].double() - sb[key].double()).abs().max().item()
            diff = max(diff, delta)
            scale = max(scale, sa[key].double().abs().max().item())
            identical &= bool(torch.equal(sa[key], sb[key]))
        auc = max(auc, abs(a.best_valid.roc_auc - b.best_valid.roc_auc))
    return {
        "members": 2.0,
        "epochs": float(epochs),
        "max_abs_weight_diff": diff,
        "max_abs_weight": scale,
        "max_val_roc_auc_diff": auc,
        "identical": float(identical),
    }


def run_loop(bench: Bench, device: torch.device, epochs: int) -> dict[str, float]:
    """Tutorial loop against ours on the tutorial's experiment (train_loop.py's settings)."""
    from train_loop import BATCH, HIDDEN, LR, tutorial_epochs  # beside this file (sys.path[0])

    split = bench.tutorial_split
    x, y = bench.tutorial_x, bench.tutorial_y
    train_x = x[split.train].astype(np.float32)
    tut = tutorial_epochs(train_x, y[split.train], str(device), epochs)
    features = _features(x, np.zeros((len(x), 0), np.float32), FeaturizerConfig(n_bits=x.shape[1]))
    result = fit(
        features,
        y[:, None],
        split,
        ["NR-AR"],
        ModelConfig(hidden=(HIDDEN,), activation="tanh", dropout=0.0),
        TrainConfig(
            epochs=epochs + 1,
            batch_size=BATCH,
            optimizer="sgd",
            lr=LR,
            momentum=0.0,
            weight_decay=0.0,
            patience=0,
        ),
        device=device,
        num_threads=1,
    )
    ours = [h["train_seconds"] for h in result.history][1:]  # the first epoch warms up
    t_tut, t_ours = float(np.median(tut)), float(np.median(ours))
    return {
        "train_rows": float(len(split.train)),
        "tutorial_s_per_epoch": t_tut,
        "toxmodel_s_per_epoch": t_ours,
        "tutorial_epochs_per_s": 1.0 / t_tut,
        "toxmodel_epochs_per_s": 1.0 / t_ours,
        "speedup": t_tut / t_ours,
        "target_speedup": 5.0,
    }


def worker(args: argparse.Namespace) -> None:
    """One packed trial process: warm up, say ready, wait for go, train trials until the window
    closes, write its figures as JSON."""
    device = torch.device(args.device)
    bench = load_bench(Path(args.data))
    fit_args = (bench.features, bench.labels, bench.split, bench.tasks, bench.model)
    warm = dataclasses.replace(bench.train, epochs=1, seed=1000 + args.index)
    fit(*fit_args, warm, device=device, num_threads=1)
    Path(args.ready).write_text("ready")
    go = Path(args.go)
    while not go.exists():
        time.sleep(0.005)
    start = float(go.read_text())
    time.sleep(max(0.0, start - time.time()))
    deadline = start + args.window_s
    epochs, trials, last, train_seconds = 0, 0, start, 0.0

    def count(result: EpochResult) -> bool:
        nonlocal epochs, last, train_seconds
        epochs += 1
        train_seconds += result.train_seconds
        last = time.time()
        return last >= deadline

    while time.time() < deadline:
        cfg = dataclasses.replace(bench.train, seed=args.index * 1000 + trials)
        fit(*fit_args, cfg, device=device, callback=count, num_threads=1)
        trials += 1
    peak, kind = _peak_bytes(device)
    out = {
        "epochs": epochs,
        "seconds": last - start,
        "train_seconds": train_seconds,
        "trials_started": trials,
        "peak_bytes": peak,
        "peak_kind": kind,
        "reserved_bytes": float(torch.cuda.max_memory_reserved(device))
        if device.type == "cuda"
        else None,
        "nvml_process_bytes": _nvml_process_bytes(),
    }
    Path(args.result).write_text(json.dumps(out))


def _nvml_process_bytes() -> float | None:
    """GPU memory NVML charges to this process (CUDA context included), where NVML answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return float(proc.usedGpuMemory)
    except Exception:  # optional: absent library, no permission, pid namespaces
        return None
    return None


def run_packing_k(
    data: Path, k: int, device: torch.device, window_s: float, workdir: Path
) -> dict[str, Any]:
    """K worker processes training trials side by side on one device."""
    folder = Path(tempfile.mkdtemp(prefix=f"pack{k}-", dir=workdir))
    go = folder / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    spawned = time.time()
    procs = []
    for i in range(k):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "worker",
            "--data", str(data),
            "--device", str(device),
            "--index", str(i),
            "--window-s", str(window_s),
            "--ready", str(folder / f"ready{i}"),
            "--go", str(go),
            "--result", str(folder / f"result{i}.json"),
        ]  # fmt: skip
        log = (folder / f"log{i}.txt").open("w")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    errors = []
    while not all((folder / f"ready{i}").exists() for i in range(k)):
        dead = [i for i, p in enumerate(procs) if p.poll() is not None]
        if dead or time.time() - spawned > 300:
            errors = [f"worker {i} ended before ready" for i in dead] or ["ready timeout"]
            break
        time.sleep(0.05)
    startup = time.time() - spawned
    # written whole under another name, then renamed: a worker polling for `go` could read it
    # empty between write_text's create and write (seen once in CI, on a loaded machine)
    staged = folder / "go.part"
    staged.write_text(repr(time.time() + 0.2))
    os.replace(staged, go)
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=window_s + 300)
        except subprocess.TimeoutExpired:
            p.kill()
            errors.append(f"worker {i} timed out")
    results = []
    for i in range(k):
        path = folder / f"result{i}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
        else:
            tail = (folder / f"log{i}.txt").read_text()[-600:]
            errors.append(f"worker {i}: no result; log tail: {tail}")
    row: dict[str, Any] = {"k": k, "startup_s": startup, "errors": errors}
    if len(results) == k:
        rate = sum(r["epochs"] / r["seconds"] for r in results if r["seconds"] > 0)
        peaks = [r["peak_bytes"] for r in results]
        nvml = [r["nvml_process_bytes"] for r in results if r["nvml_process_bytes"]]
        row.update(
            epochs_per_s=rate,
            epochs=float(sum(r["epochs"] for r in results)),
            non_training_share=1.0
            - sum(r["train_seconds"] for r in results) / sum(r["seconds"] for r in results),
            window_s=window_s,
            peak_bytes_max=max(peaks),
            peak_bytes_mean=float(np.mean(peaks)),
            peak_kind=results[0]["peak_kind"],
            nvml_process_bytes_max=max(nvml) if nvml else None,
        )
    return row


def run_fusion_k(
    bench: Bench, k: int, device: torch.device, epochs: int, exact: bool
) -> dict[str, Any]:
    """K trials as one fit_many; rates from epochs 2.. (the first warms up)."""
    _reset_peak(device)
    configs = trial_configs(bench, k, bench.train.epochs)
    configs = [dataclasses.replace(c, epochs=epochs) for c in configs]
    started = time.perf_counter()
    results = fit_many(
        bench.features,
        bench.labels,
        bench.split,
        bench.tasks,
        bench.model,
        configs,
        device=device,
        num_threads=1,
        exact_dropout=exact,
    )
    wall = time.perf_counter() - started
    history = results[0].history
    timed = history[1:] or history
    seconds = sum(h["seconds"] for h in timed)
    train_seconds = sum(h["train_seconds"] for h in timed)
    peak, kind = _peak_bytes(device)
    return {
        "k": k,
        "exact_dropout": exact,
        "epochs_per_s": k * len(timed) / seconds,
        "train_epochs_per_s": k * len(timed) / train_seconds,
        "non_training_share": 1.0 - train_seconds / seconds,
        "setup_s": wall - sum(h["seconds"] for h in history),
        "peak_bytes": peak,
        "peak_kind": kind,
    }


def bare_matmul_flops(device: torch.device, n: int, repeats: int = 10) -> float:
    """FLOP/s of fp32 n x n x n products (PyTorch's default matmul precision), best of runs."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * n**3 * repeats / best


# --- the run --------------------------------------------------------------------------------------


def check_imports() -> list[str]:
    """Modules the GPU machine lacks that were imported anyway (must be empty)."""
    return sorted(m for m in FORBIDDEN if m in sys.modules)


class Results:
    """The figures so far, rewritten to OUT/gpu_results.json after every section."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.path = out / RESULTS_FILE
        self.data: dict[str, Any] = {"meta": meta}
        out.mkdir(parents=True, exist_ok=True)

    def put(self, section: str, value: Any) -> None:
        self.data[section] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = CHECK if args.check else FULL
    device = torch.device("cpu" if args.check else args.device)
    out = Path(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    data = Path(args.data) if args.data else synthetic_bench(workdir / DATA_FILE)
    bench = load_bench(data)
    started = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    import train_loop  # noqa: F401  (imported now so that the import check below covers it)

    torch.set_num_threads(1)
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_memory_bytes": _device_memory(device),
        "cpus": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.platform()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "check": args.check,
        "data": bench.meta.get("source"),
        "rows": len(bench.features),
        "inputs": bench.features.n_features,
        "tasks": len(bench.tasks),
        "hidden": list(bench.model.hidden),
        "batch_size": bench.train.batch_size,
        "trial_epochs": bench.train.epochs,
        "budget_s": args.budget_s,
        "forbidden_imports": check_imports(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
    }
    if meta["forbidden_imports"]:
        raise SystemExit(f"run imported {meta['forbidden_imports']}: the GPU machine lacks them")
    results = Results(out, meta)
    print(
        f"benchmark on {meta['device']} | torch {meta['torch']} | {len(bench.features)} rows, "
        f"{bench.features.n_features} inputs | budget {args.budget_s:.0f} s",
        flush=True,
    )

    equivalence = {
        name: run_equivalence(bench, device, sizes["equivalence_epochs"], same)
        for name, same in (("finalize_like", True), ("search_like", False))
    }
    results.put("equivalence", equivalence)
    print(f"equivalence: {equivalence}", flush=True)
    results.put("loop", run_loop(bench, device, sizes["loop_epochs"]))
    print(f"loop: {results.data['loop']}", flush=True)

    flops_epoch = model_flops_per_epoch(bench)
    trial_epochs = bench.train.epochs
    est = estimate(bench, device)
    packing: dict[str, Any] = {"rows": [], "skipped": [], **est}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # leave the workers the memory this process cached so far
    for k in sizes["pack_k"]:
        previous = packing["rows"][-1]["startup_s"] if packing["rows"] else 10.0
        need = 2 * previous + sizes["pack_window_s"] + 20  # start-up grows with K
        if left() - need < 90:  # keep time for fusion and the matmul
            packing["skipped"].append(k)
            continue
        row = run_packing_k(data, k, device, sizes["pack_window_s"], workdir)
        if "epochs_per_s" in row:
            row["trials_per_hour"] = row["epochs_per_s"] * 3600 / trial_epochs
            row["model_flops_per_s"] = row["epochs_per_s"] * flops_epoch
        packing["rows"].append(row)
        results.put("packing", packing)
        print(f"packing K={k}: {row}", flush=True)
    results.put("packing", packing)

    fusion: dict[str, Any] = {"rows": [], "skipped": []}
    for k in sizes["fuse_k"]:
        for exact in (True, False):
            if left() < 30:
                fusion["skipped"].append([k, exact])
                continue
            row = run_fusion_k(bench, k, device, sizes["fuse_epochs"], exact)
            row["trials_per_hour"] = row["epochs_per_s"] * 3600 / trial_epochs
            row["model_flops_per_s"] = row["epochs_per_s"] * flops_epoch
            fusion["rows"].append(row)
            results.put("fusion", fusion)
            print(f"fusion K={k}: {row}", flush=True)
    by_k = {r["k"]: r for r in packing["rows"] if "trials_per_hour" in r}
    for row in fusion["rows"]:
        packed = by_k.get(row["k"])
        row["packing_trials_per_hour"] = packed["trials_per_hour"] if packed else None
        row["fusion_over_packing"] = (
            row["trials_per_hour"] / packed["trials_per_hour"] if packed else None
        )
    results.put("fusion", fusion)

    mm = bare_matmul_flops(device, sizes["mm_size"])
    best_pack = max((r for r in by_k.values()), key=lambda r: r["trials_per_hour"], default=None)
    best_fuse = max(fusion["rows"], key=lambda r: r["trials_per_hour"], default=None)
    flops = {
        "bare_matmul_flops_per_s": mm,
        "matmul_size": sizes["mm_size"],
        "model_flops_per_epoch": flops_epoch,
        "best_packing_k": best_pack["k"] if best_pack else None,
        "best_packing_flops_per_s": best_pack["model_flops_per_s"] if best_pack else None,
        "best_packing_share": best_pack["model_flops_per_s"] / mm if best_pack else None,
        "best_fusion_k": best_fuse["k"] if best_fuse else None,
        "best_fusion_exact_dropout": best_fuse["exact_dropout"] if best_fuse else None,
        "best_fusion_flops_per_s": best_fuse["model_flops_per_s"] if best_fuse else None,
        "best_fusion_share": best_fuse["model_flops_per_s"] / mm if best_fuse else None,
    }
    results.put("flops", flops)
    results.data["meta"]["seconds"] = time.perf_counter() - started
    results.put("meta", results.data["meta"])
    print_table(results.data)
    return results.data


def print_table(r: dict[str, Any]) -> None:
    """The summary: one table of packing against fusion, the loop, FLOP/s and equivalence."""
    m, loop, eq, fl = r["meta"], r["loop"], r["equivalence"], r["flops"]
    mib = 2**20
    print(f"\n== {m['device']} | torch {m['torch']} | {m['date']} | {m['seconds']:.0f} s ==")
    print(
        f"loop: tutorial {loop['tutorial_epochs_per_s']:.2f} epochs/s, toxmodel "
        f"{loop['toxmodel_epochs_per_s']:.2f} epochs/s: {loop['speedup']:.1f}x (target >= 5x)"
    )
    for name, e in eq.items():
        print(
            f"equivalence, {name} (fit_many vs fit, K=2, {e['epochs']:.0f} epochs): max |dw| "
            f"{e['max_abs_weight_diff']:.2e} (max |w| {e['max_abs_weight']:.2f}), val ROC-AUC "
            f"diff {e['max_val_roc_auc_diff']:.2e}, identical {bool(e['identical'])}"
        )
    pk = r["packing"]
    print(
        f"auto estimate per trial: {pk['estimate_bytes'] / mib:.0f} MiB "
        f"({pk['estimate_bytes_without_context'] / mib:.0f} MiB without the CUDA context), "
        f"fraction {pk['auto_gpu_fraction']}"
    )
    fused = {(row["k"], row["exact_dropout"]): row for row in r["fusion"]["rows"]}
    packed = {row["k"]: row for row in pk["rows"]}
    print(
        f"{'K':>3} | {'packing trials/h':>16} | {'peak MiB/proc':>13} | "
        f"{'fused exact t/h':>15} | {'fused shared t/h':>16} | {'fused/packing':>13}"
    )
    for k in sorted({*packed, *(k for k, _ in fused)}):
        p = packed.get(k, {})
        fe, fs = fused.get((k, True), {}), fused.get((k, False), {})

        def num(row: dict[str, Any], key: str, scale: float = 1.0) -> str:
            value = row.get(key)
            return "-" if value is None else f"{value / scale:.0f}"

        ratio = fe.get("fusion_over_packing")
        print(
            f"{k:>3} | {num(p, 'trials_per_hour'):>16} | {num(p, 'peak_bytes_max', mib):>13} | "
            f"{num(fe, 'trials_per_hour'):>15} | {num(fs, 'trials_per_hour'):>16} | "
            f"{'-' if ratio is None else f'{ratio:.2f}':>13}"
        )
    if pk["skipped"] or r["fusion"]["skipped"]:
        print(
            f"skipped for the time budget: packing {pk['skipped']}, fusion {r['fusion']['skipped']}"
        )
    print(
        f"bare fp32 matmul ({fl['matmul_size']}^3): "
        f"{fl['bare_matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
    )
    for kind in ("packing", "fusion"):
        share = fl[f"best_{kind}_share"]
        if share is not None:
            print(
                f"best {kind} (K={fl[f'best_{kind}_k']}): "
                f"{fl[f'best_{kind}_flops_per_s'] / 1e12:.3f} TFLOP/s = {share:.3f} of bare matmul"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="run", choices=["prepare", "run", "worker"])
    parser.add_argument("--out", default="gpu_bench", help="output folder")
    parser.add_argument("--data", default=None, help="prepared .npz (run) or Tox21 CSV (prepare)")
    parser.add_argument("--check", action="store_true", help="tiny CPU run, seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget of a run")
    parser.add_argument("--config", default="configs/tox21.yaml", help="prepare: job config")
    parser.add_argument("--cache", default="/tmp/toxtune-bench", help="prepare: feature cache")
    # worker-only arguments (run spawns workers itself)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--window-s", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--go", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode == "prepare":
        prepare(
            Path(args.out), args.config, args.data or "../shared/data/tox21.csv", Path(args.cache)
        )
    elif args.mode == "worker":
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
