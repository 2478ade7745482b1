"""Training: masked multitask BCE on device-resident tensors, early stopping, epoch callbacks.

The whole feature matrix is on the device once (fingerprints as compact uint8; on the CPU the
caller's arrays themselves, so trials of one node share Ray's object-store copy). Each epoch
gathers its shuffled rows a block at a time (`EPOCH_BLOCK_BYTES`) and every batch is a slice of
the block: no per-sample Dataset/DataLoader, which dominates epoch time for small MLPs, and no
copy of the whole training set. Descriptors are scaled, and labels turned into targets and
masks, only in the gathered blocks.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from toxmodel.checkpoint import Predictor, save_checkpoint
from toxmodel.featurize import DescriptorScaler, Features, FeaturizerConfig
from toxmodel.metrics import Metrics, evaluate
from toxmodel.model import MLP, ModelConfig
from toxmodel.split import Split

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle", "lambda")
POS_WEIGHT_LIMIT = 100.0  # per-task positive weights are clamped to [1/limit, limit]
EVAL_BATCH = 4096  # rows per forward pass when scoring the validation split
# Bytes of gathered rows an epoch holds at once: a bounded block instead of a copy of the whole
# shuffled training set (1.6 GB at 8 * 10^5 training rows of 2048 bits).
EPOCH_BLOCK_BYTES = 32 * 2**20
SCALER_COLUMNS = 16  # descriptor columns the scaler is fitted on at a time (see fit_scaler)
LAMBDA_DECAY = 0.95  # the PyTorch Tox21 tutorial's per-epoch LambdaLR factor


class TrainingDiverged(RuntimeError):  # noqa: N818 (the tuner matches this name)
    """The loss or the predictions became non-finite; the trial should be marked failed."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch

    def __reduce__(self) -> tuple[type[TrainingDiverged], tuple[str, int]]:
        """Picklable with its epoch (Ray ships trial exceptions between processes)."""
        return type(self), (str(self), self.epoch)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; validated on construction."""

    epochs: int = 30
    batch_size: int = 256
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | cosine | onecycle | lambda (0.95**epoch)
    pos_weight: bool = False  # weight positives by n_neg/n_pos per task (train rows)
    auc_weight: float = 0.0  # weight of the pairwise ROC-AUC loss beside the cross-entropy
    patience: int = 10  # epochs without a better val ROC-AUC before stopping; 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("patience", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (
            isinstance(self.auc_weight, int | float)
            and not isinstance(self.auc_weight, bool)
            and math.isfinite(self.auc_weight)
            and self.auc_weight >= 0
        ):
            raise ValueError(f"auc_weight must be a finite number >= 0, got {self.auc_weight!r}")


@dataclass(frozen=True)
class RunContext:
    """What a checkpoint needs besides the weights."""

    model_config: ModelConfig
    featurizer: FeaturizerConfig
    tasks: tuple[str, ...]
    n_inputs: int
    scaler: DescriptorScaler | None


@dataclass
class EpochResult:
    """One finished epoch, handed to the callback after validation."""

    epoch: int  # 1-based
    train_loss: float
    valid: Metrics
    is_best: bool  # best validation score so far (this epoch's weights are kept)
    seconds: float  # training + validation
    lr: float  # learning rate of the epoch's last step
    model: MLP  # the live model, in eval mode
    stop_reason: str  # "" if training goes on; "max_epochs" or "early_stopping" on the last
    train_seconds: float = 0.0  # the training part of `seconds`
    context: RunContext | None = field(default=None, repr=False)
    # The whole training state after this epoch (what `fit(resume=...)` continues from).
    state: Callable[[], dict[str, Any]] | None = field(default=None, repr=False)

    def checkpoint(
        self, path: str | Path, extra: Mapping[str, Any] | None = None, best: bool = False
    ) -> Path:
        """Save the current model (or, `best`, the best epoch's so far) as a toxmodel
        checkpoint (see `load_checkpoint`)."""
        if self.context is None:
            raise ValueError("this EpochResult carries no run context to checkpoint with")
        c = self.context
        model, meta = self.model, {"epoch": self.epoch, "val_roc_auc": self.valid.roc_auc}
        if best and not self.is_best:
            if self.state is None:
                raise ValueError("this EpochResult carries no training state")
            state = self.state()
            model = copy.deepcopy(self.model)
            model.load_state_dict(state["best_weights"])
            meta = {"epoch": state["best_epoch"], "val_roc_auc": state["best_valid"]["roc_auc"]}
        return save_checkpoint(
            path,
            model,
            c.model_config,
            c.featurizer,
            c.tasks,
            c.n_inputs,
            c.scaler,
            {**meta, **(extra or {})},
        )


EpochCallback = Callable[[EpochResult], bool | None]


@dataclass
class FitResult:
    """The trained model (best-epoch weights loaded) and its training record."""

    model: MLP
    best_epoch: int
    best_valid: Metrics
    history: list[dict[str, float]]  # one flat dict per epoch
    scaler: DescriptorScaler | None
    model_config: ModelConfig
    featurizer: FeaturizerConfig
    tasks: list[str]
    n_inputs: int
    stop_reason: str  # max_epochs | early_stopping | callback

    def save(
        self,
        path: str | Path,
        featurizer: FeaturizerConfig | None = None,
        tasks: Sequence[str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save the best model as a checkpoint (featurizer and tasks default to the fit's)."""
        meta = {"epoch": self.best_epoch, "val_roc_auc": self.best_valid.roc_auc, **(extra or {})}
        return save_checkpoint(
            path,
            self.model,
            self.model_config,
            featurizer or self.featurizer,
            list(tasks) if tasks is not None else self.tasks,
            self.n_inputs,
            self.scaler,
            meta,
        )

    def predictor(self) -> Predictor:
        """The trained model as a `Predictor`, in memory (what loading its checkpoint gives)."""
        return Predictor(
            model=self.model.eval(),
            featurizer=self.featurizer,
            tasks=list(self.tasks),
            n_inputs=self.n_inputs,
            model_config=self.model_config,
            scaler=self.scaler,
        )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" -> the GPU when there is one, else the CPU; "cuda" must be available."""
    if device is None or device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device("cuda", index)


def masked_bce(
    logits: Tensor, targets: Tensor, mask: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """Mean BCE-with-logits over labelled entries only (mask 1); missing labels add nothing.

    Targets under mask 0 may hold any placeholder (NaN included): they are zeroed first, so they
    reach neither the loss nor the gradient.
    """
    mask = mask.to(logits.dtype)
    targets = torch.where(mask > 0, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=pos_weight, reduction="none"
    )
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


def pairwise_auc_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Square pairwise ROC-AUC surrogate for logits (..., batch, tasks): (...) losses.

    Per task, the mean over the batch's labelled positives i and negatives j of
    (1 - (p_i - p_j))^2 (Ying et al. 2016), averaged over the tasks that have both classes in
    the batch (0 where none has). Cross-entropy scores each molecule alone; this term scores
    the order of positives over negatives, which is what ROC-AUC measures. Computed in closed
    form, E_pos[(1-p)^2] + 2 E_pos[1-p] E_neg[p] + E_neg[p^2], so it costs O(batch x tasks)
    rather than a (batch x batch) matrix per task. Unlabelled entries (mask 0, any placeholder
    target) take no part.
    """
    p = torch.sigmoid(logits)
    m = mask.to(p.dtype)
    positive = torch.where(m > 0, targets, torch.zeros_like(targets)) > 0.5
    pos, neg = m * positive.to(p.dtype), m * (~positive).to(p.dtype)
    n_pos, n_neg = pos.sum(-2), neg.sum(-2)  # (..., tasks)
    miss = 1.0 - p
    mean_miss = (miss * pos).sum(-2) / n_pos.clamp_min(1.0)
    mean_miss_sq = (miss.square() * pos).sum(-2) / n_pos.clamp_min(1.0)
    mean_neg = (p * neg).sum(-2) / n_neg.clamp_min(1.0)
    mean_neg_sq = (p.square() * neg).sum(-2) / n_neg.clamp_min(1.0)
    per_task = mean_miss_sq + 2.0 * mean_miss * mean_neg + mean_neg_sq
    both = ((n_pos > 0) & (n_neg > 0)).to(p.dtype)
    return (per_task * both).sum(-1) / both.sum(-1).clamp_min(1.0)


def training_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    pos_weight: Tensor | None = None,
    auc_weight: float = 0.0,
) -> Tensor:
    """The loss a training step minimises: `masked_bce`, plus `auc_weight` x
    `pairwise_auc_loss` when asked for. Validation scores the cross-entropy alone."""
    loss = masked_bce(logits, targets, mask, pos_weight)
    if auc_weight:
        loss = loss + auc_weight * pairwise_auc_loss(logits, targets, mask)
    return loss


def pos_weights(labels: np.ndarray) -> np.ndarray:
    """Per-task n_neg / n_pos over labelled rows, clamped; 1 for a task lacking a class."""
    labels = np.asarray(labels, dtype=np.float64)
    pos = np.nansum(labels == 1, axis=0).astype(np.float64)
    neg = np.nansum(labels == 0, axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        weight = np.where((pos > 0) & (neg > 0), neg / pos, 1.0)
    return np.clip(weight, 1.0 / POS_WEIGHT_LIMIT, POS_WEIGHT_LIMIT).astype(np.float32)


def shared_tensor(array: np.ndarray) -> Tensor:
    """A CPU tensor over `array`'s own memory: no copy, also when the array is read-only.

    Arrays a Ray trial gets from the object store are read-only views of shared memory, and
    copying them gave every trial a private copy of the feature matrix (2 GB at 10^6 molecules
    of 2048 bits). Torch warns that writing to a tensor over a read-only array is undefined;
    the tensors made here are only ever read (batches are gathered copies of their rows), so
    that one warning is silenced here and nowhere else.
    """
    array = np.ascontiguousarray(array)  # no copy for the C-ordered arrays featurize makes
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        return torch.from_numpy(array)


def fit_scaler(descriptors: np.ndarray, rows: np.ndarray) -> DescriptorScaler:
    """`DescriptorScaler.fit(descriptors[rows])`, equal bit for bit, a few columns at a time.

    The scaler works per column, in float64 with several temporaries: on the whole training
    block that is several float64 copies at once (each 1.4 GB at 8 x 10^5 rows of 217
    descriptors), in every trial. Blocks keep at least 2 columns (numpy sums one column
    pairwise, several row by row, so a 1-column block could round the std fallback otherwise).
    """
    n_cols = descriptors.shape[1]
    edges = [*range(0, n_cols, SCALER_COLUMNS), n_cols]
    if len(edges) > 2 and edges[-1] - edges[-2] == 1:
        del edges[-2]
    parts = [
        DescriptorScaler.fit(descriptors[rows, start:stop])
        for start, stop in itertools.pairwise(edges)
    ]
    return DescriptorScaler(
        np.concatenate([p.center for p in parts]), np.concatenate([p.scale for p in parts])
    )


@dataclass(frozen=True)
class _Scaling:
    """`DescriptorScaler.transform` on the device, applied to gathered rows only."""

    center: Tensor  # float64 (n_desc,)
    scale: Tensor  # float64 (n_desc,)

    @classmethod
    def of(cls, scaler: DescriptorScaler, dev: torch.device) -> _Scaling:
        def as64(values: np.ndarray) -> Tensor:
            return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(dev)

        return cls(as64(scaler.center), as64(scaler.scale))

    def __call__(self, raw: Tensor) -> Tensor:
        """Scaled float32 rows, as `transform` computes them: float64 (x - center) / scale,
        missing (NaN/inf) -> 0, clipped to +-10 (IEEE sub and div: the same bits)."""
        x = raw.double()
        z = torch.where(torch.isfinite(x), (x - self.center) / self.scale, 0.0)
        z = torch.nan_to_num(z, nan=0.0, posinf=10.0, neginf=-10.0)
        return z.clamp(-10.0, 10.0).float()


@dataclass
class _Rows:
    """Gathered rows of the dataset, in order, ready for the model (a block of an epoch)."""

    fingerprint: Tensor  # uint8 (m, n_fp)
    descriptors: Tensor | None  # float32 (m, n_desc), scaled
    targets: Tensor  # float32 (m, t), NaN where missing (masked_bce ignores them)
    mask: Tensor  # float32 (m, t), 1 where labelled

    def rows(self, start: int, stop: int) -> Tensor:
        """Float model inputs of rows start:stop (uint8 bits expanded only for this batch)."""
        x = self.fingerprint[start:stop].float()
        if self.descriptors is None:
            return x
        return torch.cat([x, self.descriptors[start:stop]], 1)


@dataclass
class _DeviceData:
    """The whole dataset on the training device, as given: rows are gathered per block.

    On the CPU the tensors share the caller's arrays (a trial's are Ray's object-store copy,
    read by every trial of the node); on a GPU each is one copy in device memory. Descriptors
    stay raw and labels keep NaN for missing; both are turned into model inputs, targets and
    masks only for the rows a block gathers, so no per-trial copy of the matrix is made.
    """

    fingerprint: Tensor  # uint8 (n, n_fp)
    descriptors: Tensor | None  # float32 (n, n_desc), raw
    labels: Tensor  # float32 (n, t), NaN where missing
    scaling: _Scaling | None

    @classmethod
    def of(
        cls,
        features: Features,
        labels: np.ndarray,
        scaler: DescriptorScaler | None,
        dev: torch.device,
    ) -> _DeviceData:
        fingerprint = features.fingerprint
        if fingerprint.dtype == np.bool_:
            fingerprint = fingerprint.view(np.uint8)
        descriptors = scaling = None
        if scaler is not None and features.descriptors.shape[1]:
            descriptors = shared_tensor(features.descriptors).to(dev)
            scaling = _Scaling.of(scaler, dev)
        return cls(
            shared_tensor(fingerprint).to(dev), descriptors, shared_tensor(labels).to(dev), scaling
        )

    @property
    def n_inputs(self) -> int:
        n_desc = 0 if self.descriptors is None else self.descriptors.shape[1]
        return int(self.fingerprint.shape[1] + n_desc)

    @property
    def row_bytes(self) -> int:
        """Bytes one gathered row takes (raw and scaled descriptors, targets and mask)."""
        n_desc = 0 if self.descriptors is None else self.descriptors.shape[1]
        return int(self.fingerprint.shape[1] + 12 * n_desc + 8 * self.labels.shape[1])

    def take(self, idx: Tensor) -> _Rows:
        """The rows `idx` in that order, as model-ready copies (still compact uint8 bits)."""
        descriptors = None
        if self.descriptors is not None and self.scaling is not None:
            descriptors = self.scaling(self.descriptors[idx])
        targets = self.labels[idx]
        return _Rows(
            fingerprint=self.fingerprint[idx],
            descriptors=descriptors,
            targets=targets,
            mask=(~torch.isnan(targets)).to(targets.dtype),
        )

    def inputs(self, idx: Tensor) -> Tensor:
        """Float model inputs of rows `idx`."""
        return self.take(idx).rows(0, len(idx))


def _blocks(bounds: list[tuple[int, int]], rows_per_block: int) -> list[list[tuple[int, int]]]:
    """Consecutive batches grouped so a group spans about `rows_per_block` rows (at least one
    batch): an epoch gathers its shuffled rows group by group, never all at once."""
    groups: list[list[tuple[int, int]]] = []
    for start, stop in bounds:
        if groups and stop - groups[-1][0][0] <= rows_per_block:
            groups[-1].append((start, stop))
        else:
            groups.append([(start, stop)])
    return groups


def block_rows(row_bytes: int, copies: int = 1) -> int:
    """Rows an epoch gathers at once: `EPOCH_BLOCK_BYTES` of `copies` x `row_bytes` each."""
    return max(1, EPOCH_BLOCK_BYTES // max(1, row_bytes * copies))


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Batch bounds; a trailing single row joins the previous batch (BatchNorm needs >= 2)."""
    bounds = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _optimizer(model: MLP, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimiser; fused kernels (one per step, ~10x faster on CPU) where offered."""
    params = list(model.parameters())
    fused = device.type in ("cpu", "cuda")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
    )


def _lambda_decay(epoch: int) -> float:
    return LAMBDA_DECAY**epoch


def _scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]:
    """The LR schedule and whether it steps per batch (True) or per epoch (False)."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total), True
    if cfg.scheduler == "onecycle":
        cycle_momentum = cfg.optimizer != "sgd" or cfg.momentum > 0
        return (
            torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=cfg.lr, total_steps=total, cycle_momentum=cycle_momentum
            ),
            True,
        )
    if cfg.scheduler == "lambda":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda_decay), False
    return None, False


def _check_inputs(
    features: Features, labels: np.ndarray, split: Split, tasks: list[str], mc: ModelConfig
) -> None:
    n = len(features)
    if features.fingerprint.dtype not in (np.uint8, np.bool_):
        raise TypeError(f"fingerprint must be uint8, got {features.fingerprint.dtype}")
    if features.descriptors.shape[0] != n:
        raise ValueError(f"descriptors have {features.descriptors.shape[0]} rows, fingerprint {n}")
    if labels.shape != (n, len(tasks)):
        raise ValueError(
            f"labels must have shape (n_rows, n_tasks) = ({n}, {len(tasks)}) aligned with "
            f"features rows, got {labels.shape}"
        )
    known = labels[~np.isnan(labels)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (missing)")
    for name in ("train", "valid"):
        idx = getattr(split, name)
        if len(idx) == 0:
            raise ValueError(f"the {name} split is empty")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"the {name} split has row indices outside [0, {n})")
    if mc.norm == "batch" and len(split.train) < 2:
        raise ValueError("batch norm needs at least 2 training rows")


def save_train_state(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write a training state (`EpochResult.state()`) atomically; plain types and tensors only,
    so `load_train_state` reads it with `torch.load(weights_only=True)`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    """A training state written by `save_train_state`, for `fit(resume=...)`."""
    return dict(torch.load(Path(path), map_location="cpu", weights_only=True))


def fit(
    features: Features,
    labels: np.ndarray,
    split: Split,
    tasks: Sequence[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    device: str | torch.device = "cpu",
    callback: EpochCallback | None = None,
    num_threads: int | None = None,
    resume: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train an MLP on `split.train`, validating every epoch; returns the best epoch's model.

    `labels` are aligned with the feature rows. Early stopping watches the validation mean
    ROC-AUC (the validation loss when no task has both classes there). `callback` runs after
    each epoch; returning True stops training. Raises TrainingDiverged on a non-finite loss.
    Deterministic for `train_config.seed` on a given device; the caller's RNG state and thread
    count are restored afterwards. `resume`, a state an epoch handed out (`EpochResult.state`),
    continues that run at its next epoch: weights, optimiser, schedule, random streams and the
    best epoch so far, so the epochs that follow are those an uninterrupted run would have had.
    """
    dev = resolve_device(device)
    tasks = list(tasks)
    labels = np.asarray(labels, dtype=np.float32)
    _check_inputs(features, labels, split, tasks, model_config)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    rng_devices = [dev.index] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, device_type="cuda"):
            return _fit(
                features, labels, split, tasks, model_config, train_config, dev, callback, resume
            )
    finally:
        torch.set_num_threads(threads)


def _fit(
    features: Features,
    labels: np.ndarray,
    split: Split,
    tasks: list[str],
    model_config: ModelConfig,
    cfg: TrainConfig,
    dev: torch.device,
    callback: EpochCallback | None,
    resume: Mapping[str, Any] | None = None,
) -> FitResult:
    torch.manual_seed(cfg.seed)
    scaler = None
    if features.descriptors.shape[1]:
        scaler = fit_scaler(features.descriptors, np.asarray(split.train))
    data = _DeviceData.of(features, labels, scaler, dev)
    context = RunContext(model_config, features.config, tuple(tasks), data.n_inputs, scaler)
    model = MLP(data.n_inputs, len(tasks), model_config).to(dev)
    optimizer = _optimizer(model, cfg, dev)
    bounds = _batches(len(split.train), cfg.batch_size)
    blocks = _blocks(bounds, block_rows(data.row_bytes))
    scheduler, per_batch = _scheduler(optimizer, cfg, len(bounds))
    weight = None
    if cfg.pos_weight:
        weight = torch.from_numpy(pos_weights(labels[split.train])).to(dev)
    generator = torch.Generator().manual_seed(cfg.seed)
    # Copies: a split shipped through Ray's object store is a read-only view.
    train_idx = torch.tensor(np.asarray(split.train), dtype=torch.long)
    valid_idx = torch.tensor(np.asarray(split.valid), dtype=torch.long).to(dev)
    valid_labels = labels[np.asarray(split.valid)]

    history: list[dict[str, float]] = []
    best_score, best_epoch, since_best = -math.inf, 0, 0
    best_valid: Metrics | None = None
    best_state: dict[str, Tensor] = {}
    stop_reason = "max_epochs"
    first = 1
    if resume is not None:
        model.load_state_dict(resume["weights"])
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["cpu_rng"])
        if dev.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], dev)
        best_score, best_epoch = float(resume["best_score"]), int(resume["best_epoch"])
        best_valid, since_best = Metrics(**resume["best_valid"]), int(resume["since_best"])
        best_state = {k: v.to(dev) for k, v in resume["best_weights"].items()}
        history = [dict(h) for h in resume["history"]]
        stop_reason = str(resume["stop_reason"]) or stop_reason
        # A run that had already stopped has no epoch left to train.
        first = cfg.epochs + 1 if resume["stop_reason"] else int(resume["epoch"]) + 1

    def state_after(epoch: int, reason: str) -> dict[str, Any]:
        assert best_valid is not None
        cuda_rng = torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None
        return {
            "epoch": epoch,
            "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": copy.deepcopy(_cpu(optimizer.state_dict())),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": generator.get_state(),
            "cpu_rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "best_valid": asdict(best_valid),
            "best_weights": {k: v.detach().cpu().clone() for k, v in best_state.items()},
            "since_best": since_best,
            "history": [dict(h) for h in history],
            "stop_reason": reason,
        }

    for epoch in range(first, cfg.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=generator)].to(dev)
        loss_sum = torch.zeros((), device=dev)
        count = torch.zeros((), device=dev)
        lr = optimizer.param_groups[0]["lr"]
        for block in blocks:
            # One gather per block of batches; every batch is then a contiguous slice of it.
            first_row = block[0][0]
            rows = data.take(order[first_row : block[-1][1]])
            for start, stop in block:
                a, b = start - first_row, stop - first_row
                mask = rows.mask[a:b]
                loss = training_loss(
                    model(rows.rows(a, b)), rows.targets[a:b], mask, weight, cfg.auc_weight
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr = optimizer.param_groups[0]["lr"]
                if per_batch and scheduler is not None:
                    scheduler.step()
                n = mask.sum()
                loss_sum += loss.detach() * n
                count += n
            del rows
        if scheduler is not None and not per_batch:
            scheduler.step()
        train_loss = float((loss_sum / count.clamp_min(1.0)).item())
        train_seconds = time.perf_counter() - started
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"non-finite training loss ({train_loss}) at epoch {epoch}: lower the learning "
                "rate or check the inputs",
                epoch,
            )
        valid = _validate(model, data, valid_idx, valid_labels, tasks, epoch)
        score = valid.roc_auc if math.isfinite(valid.roc_auc) else -valid.loss
        is_best = score > best_score
        if is_best:
            best_score, best_epoch, best_valid, since_best = score, epoch, valid, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since_best += 1
        seconds = time.perf_counter() - started
        reason = ""
        if epoch == cfg.epochs:
            reason = "max_epochs"
        elif cfg.patience and since_best >= cfg.patience:
            reason = "early_stopping"
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                **valid.flat("val"),
                "lr": lr,
                "seconds": seconds,
                "train_seconds": train_seconds,
            }
        )
        if callback is not None:
            result = EpochResult(
                epoch=epoch,
                train_loss=train_loss,
                valid=valid,
                is_best=is_best,
                seconds=seconds,
                lr=lr,
                model=model,
                stop_reason=reason,
                train_seconds=train_seconds,
                context=context,
                # built once on first use: a caller saving the checkpoint and the state asks twice
                state=functools.cache(functools.partial(state_after, epoch, reason)),
            )
            if callback(result) is True and not reason:
                reason = "callback"
        if reason:
            stop_reason = reason
            break
    model.load_state_dict(best_state)
    model.eval()
    assert best_valid is not None  # epochs >= 1, and the first finite score is always best
    return FitResult(
        model=model,
        best_epoch=best_epoch,
        best_valid=best_valid,
        history=history,
        scaler=scaler,
        model_config=model_config,
        featurizer=features.config,
        tasks=tasks,
        n_inputs=data.n_inputs,
        stop_reason=stop_reason,
    )


def _cpu(value: Any) -> Any:
    """`value` (an optimiser state) with every tensor on the CPU."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value


def _validate(
    model: MLP,
    data: _DeviceData,
    idx: Tensor,
    labels: np.ndarray,
    tasks: list[str],
    epoch: int,
) -> Metrics:
    """Score the validation rows in large batches (unweighted masked BCE + metrics)."""
    model.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [model(data.inputs(idx[s : s + EVAL_BATCH])) for s in range(0, len(idx), EVAL_BATCH)]
        )
        if not bool(torch.isfinite(logits).all()):
            raise TrainingDiverged(f"non-finite validation predictions at epoch {epoch}", epoch)
        targets = data.labels[idx]
        mask = (~torch.isnan(targets)).to(targets.dtype)
        loss = float(masked_bce(logits, targets, mask).item())
        probs = torch.sigmoid(logits).cpu().numpy()
    return evaluate(labels, probs, tasks, loss)
