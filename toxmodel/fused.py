"""Fused training: K MLPs of one shape trained in one pass over stacked weights.

    results = fit_many(features, labels, split, tasks, model_config, [cfg_a, cfg_b, cfg_c])

returns what `[fit(..., cfg) for cfg in configs]` returns, member by member: each member has its
own seed (initial weights, shuffling, dropout masks), learning rate, weight decay, schedule,
patience and epoch limit, and gets its own `FitResult` (best-epoch weights, history, stop
reason), so `.predictor()` and `.save()` work as after `fit`. Why: one small MLP leaves a GPU
mostly idle, launch-bound; K of them as one batched product (`baddbmm`) share one copy of the
data on the device and one set of kernel launches per step. Uses: the finalize step's seed
retrains, same-shape trials of a search, or the k folds of one configuration (one split per
member, `toxmodel.folds`).

How it reproduces `fit` (tests/toxmodel/test_fused.py compares weights and histories):

- initial weights: each member seeds the global generator and builds `MLP(...)`, as `fit` does;
- dropout: each member draws its masks from its own generator, which starts where `fit`'s global
  generator is after initialisation, with the op `fit`'s dropout runs (CPU: `bernoulli_`; CUDA:
  `native_dropout` on the member's generator state), in the same order;
- shuffling: each member permutes the training rows with `torch.Generator().manual_seed(seed)`;
- optimiser: PyTorch's own fused kernels (`torch._fused_adamw_`, `_fused_adam_`, `_fused_sgd_`,
  what `fit`'s `fused=True` optimisers run), with the learning rate and betas/momentum read each
  step from a shadow optimiser driven by the scheduler `fit` builds;
- early stopping and best-epoch restore are per member; a member that stops leaves the stack.

On the CPU the result is bit-identical to `fit` at any thread count: there each member runs
`fit`'s own ops on views of the stack (see `_Stack` for why stacked CPU kernels round
differently), and fusion saves only per-step overhead. On a GPU the members run as batched ops
(`baddbmm`; BatchNorm as one `batch_norm` over K x H columns; one loss; one optimiser call per
group of equal settings) and equal `fit` within float tolerance (cuBLAS may pick other kernels
for a batched product). Members must share the model configuration (it is the shape), the batch
size and the optimiser. `exact_dropout=False` trades the mask reproduction for speed on a GPU:
one mask draw per layer for the whole stack from one generator (masks stay independent across
members, but a member's masks then depend on the group rather than on its seed alone).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toxmodel.featurize import DescriptorScaler, Features
from toxmodel.metrics import Metrics, evaluate
from toxmodel.model import MLP, ModelConfig
from toxmodel.split import Split
from toxmodel.train import (
    EVAL_BATCH,
    EpochResult,
    FitResult,
    RunContext,
    TrainConfig,
    TrainingDiverged,
    _batches,
    _blocks,
    _check_inputs,
    _DeviceData,
    _optimizer,
    _Scaling,
    _scheduler,
    block_rows,
    fit_scaler,
    masked_bce,
    pairwise_auc_loss,
    pos_weights,
    resolve_device,
    training_loss,
)

MemberCallback = Callable[[int, EpochResult], bool | None]
NoiseFn = Callable[[tuple[int, ...], float, bool], Tensor]  # (shape, p, alpha) -> keep masks
ALPHA_SELU = 1.7580993408473766  # AlphaDropout's -scale*alpha of SELU, as in ATen
EPS_ADAM = 1e-8  # torch.optim.Adam/AdamW defaults, which `fit` uses


@dataclass(frozen=True)
class _Layer:
    """One step of the MLP's forward pass, read off a template `MLP`."""

    kind: str  # linear | batch | layer | act | dropout | alpha_dropout
    prefix: str  # state-dict prefix, e.g. "body.0."
    p: float = 0.0  # dropout probability
    eps: float = 0.0  # norm epsilon
    momentum: float = 0.0  # BatchNorm running-stat momentum
    module: nn.Module | None = None  # the (stateless) activation


def _plan(template: MLP) -> list[_Layer]:
    """The forward pass of `template` as a list of layers (raises on a module it cannot stack)."""
    plan: list[_Layer] = []
    for i, module in enumerate(template.body):
        prefix = f"body.{i}."
        if isinstance(module, nn.Linear):
            plan.append(_Layer("linear", prefix))
        elif isinstance(module, nn.BatchNorm1d):
            if not (module.affine and module.track_running_stats and module.momentum is not None):
                raise ValueError("fused training supports affine BatchNorm with running stats")
            plan.append(_Layer("batch", prefix, eps=module.eps, momentum=module.momentum))
        elif isinstance(module, nn.LayerNorm):
            plan.append(_Layer("layer", prefix, eps=module.eps))
        elif isinstance(module, nn.AlphaDropout):
            plan.append(_Layer("alpha_dropout", prefix, p=module.p))
        elif isinstance(module, nn.Dropout):
            plan.append(_Layer("dropout", prefix, p=module.p))
        elif not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            plan.append(_Layer("act", prefix, module=module))
        else:
            raise ValueError(f"fused training cannot stack a {type(module).__name__} layer")
    plan.append(_Layer("linear", "head."))
    return plan


class _Schedule:
    """The learning rate and betas/momentum `fit`'s optimiser would use, step by step.

    A shadow optimiser over one dummy weight, driven by the scheduler `fit` builds: the values
    are PyTorch's own, including OneCycle's momentum cycling and the cosine recursion.
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.optimizer = _optimizer(nn.Linear(1, 1), cfg, torch.device("cpu"))
        self.scheduler, self.per_batch = _scheduler(self.optimizer, cfg, steps_per_epoch)
        self.optimizer.step()  # no gradients, so nothing moves; the scheduler sees a step first

    def hyper(self) -> tuple[float, float, float, float, float]:
        """(lr, beta1, beta2, momentum, weight decay) for the coming step."""
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group.get("betas", (0.0, 0.0))
        return (
            float(group["lr"]),
            float(beta1),
            float(beta2),
            float(group.get("momentum", 0.0)),
            float(group["weight_decay"]),
        )

    def after_batch(self) -> None:
        if self.per_batch and self.scheduler is not None:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if self.scheduler is not None and not self.per_batch:
            self.scheduler.step()


class _Noise:
    """Dropout noise for the active members: each from its own generator, or one shared draw."""

    def __init__(self, device: torch.device, seeds: list[int], cpu_states: list[Tensor]) -> None:
        self.device = device
        self.generators: list[torch.Generator] = []
        for seed, state in zip(seeds, cpu_states, strict=True):
            gen = torch.Generator(device=device)
            if device.type == "cpu":
                gen.set_state(state)  # where `fit`'s global generator is after initialisation
            else:
                gen.manual_seed(seed)  # initialisation ran on the CPU: the CUDA state is fresh
            self.generators.append(gen)
        self.shared = torch.Generator(device=device)
        self.shared.manual_seed(hash(tuple(seeds)) % 2**63)  # ints hash alike in every run

    def draw(
        self, active: list[int], shape: tuple[int, ...], p: float, exact: bool, alpha: bool
    ) -> Tensor:
        """0/1 keep masks (K, *shape) with keep probability 1 - p (float32).

        `fit`'s CUDA `F.dropout` draws with `native_dropout`; everything else (CPU dropout,
        `F.alpha_dropout` anywhere) with `bernoulli_`: each member draws the way `fit` would.
        """
        noise = torch.empty((len(active), *shape), device=self.device)
        if not exact:
            return noise.bernoulli_(1 - p, generator=self.shared)
        for i, k in enumerate(active):
            if self.device.type == "cuda" and not alpha:
                noise[i] = self._native_dropout_mask(shape, p, self.generators[k])
            else:
                noise[i].bernoulli_(1 - p, generator=self.generators[k])
        return noise

    def _native_dropout_mask(
        self, shape: tuple[int, ...], p: float, gen: torch.Generator
    ) -> Tensor:
        """CUDA `F.dropout` runs `native_dropout` on the default generator, which takes no
        generator argument: run it there on this member's state, then swap the states back."""
        default = torch.cuda.default_generators[self.device.index or 0]
        saved = default.get_state()
        default.set_state(gen.get_state())
        _, mask = torch.native_dropout(torch.ones(shape, device=self.device), p, True)
        gen.set_state(default.get_state())
        default.set_state(saved)
        return mask.to(torch.float32)


class _Stack:
    """The active members' weights, BatchNorm buffers and optimiser state, stacked on dim 0.

    `values` holds each weight once, as (K, ...). What autograd differentiates depends on the
    mode: on a GPU the stacked tensors themselves (one batched op per layer); on the CPU one
    leaf view per member (`leaves`), so each member runs exactly `fit`'s ops on its own tensors
    with no stacking copies. Why per member on the CPU: CPU kernels round a stacked tensor
    differently (BLAS splits a batched product across threads unlike a single one, and vector
    loops run a tensor's last numel-mod-width elements through scalar exp/tanh/log code), which
    would break bit-equality with `fit`; GPU kernels compute every element alike.
    """

    def __init__(
        self,
        states: list[dict[str, Tensor]],
        plan: list[_Layer],
        optimizer: str,
        device: torch.device,
    ) -> None:
        self.plan = plan
        self.optimizer = optimizer
        self.per_member = _per_member(device)
        self.values: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        self.counters: list[str] = []  # BatchNorm num_batches_tracked keys
        for key in states[0]:
            if key.endswith("num_batches_tracked"):
                self.counters.append(key)
            elif key.endswith(("running_mean", "running_var")):
                self.buffers[key] = torch.stack([s[key] for s in states])
            else:
                self.values[key] = torch.stack([s[key] for s in states])
        n_slots = 2 if optimizer in ("adam", "adamw") else 1  # exp_avg, exp_avg_sq | momentum
        self.slots = {
            k: [torch.zeros_like(v) for _ in range(n_slots)] for k, v in self.values.items()
        }
        # Optimiser steps per position (= BatchNorm's num_batches_tracked): members training on
        # rows of their own may take fewer steps an epoch than others.
        self.step_count = torch.zeros(len(states), dtype=torch.float32, device=device)
        self.steps = [0] * len(states)
        self.leaves: dict[str, list[Tensor]] = {}
        self._bind()

    def _bind(self) -> None:
        """Make the tensors autograd differentiates: the stacks, or one view per member."""
        if self.per_member:
            self.leaves = {
                k: [member.requires_grad_() for member in v.unbind(0)]
                for k, v in self.values.items()
            }
        else:
            for v in self.values.values():
                v.requires_grad_()

    def __len__(self) -> int:
        return len(next(iter(self.values.values())))

    def forward(
        self, x: Tensor, train: bool, noise: NoiseFn, positions: list[int] | None = None
    ) -> Tensor:
        """Logits (K, batch, tasks) for inputs (K, batch, n_inputs), or (batch, n_inputs) shared.

        `positions`: only those members (x then has one row block per position), each through
        `fit`'s own ops on its own tensors, on any device: a step where members' batches differ
        in size, or a member's own validation rows.
        """
        if positions is not None:
            xs = list(x.unbind(0)) if x.dim() == 3 else [x] * len(positions)
            return torch.stack(self._forward_members(xs, train, noise, positions))
        if self.per_member:
            xs = list(x.unbind(0)) if x.dim() == 3 else [x] * len(self)
            return torch.stack(self._forward_members(xs, train, noise))
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(len(self), -1, -1).contiguous()
        return self._forward_stacked(x, train, noise)

    def _forward_members(
        self, xs: list[Tensor], train: bool, noise: NoiseFn, positions: list[int] | None = None
    ) -> list[Tensor]:
        """Each member through `fit`'s own ops on its own tensors: its leaves on the CPU, views
        of the stacks elsewhere. xs[j] is the input of position positions[j] (default: j)."""
        at = list(range(len(xs))) if positions is None else positions
        tensors = (
            self.leaves
            if self.per_member
            else {k: list(v.unbind(0)) for k, v in self.values.items()}
        )
        for layer in self.plan:
            w, b = tensors.get(layer.prefix + "weight"), tensors.get(layer.prefix + "bias")
            if layer.kind == "linear":
                xs = [F.linear(x, w[i], b[i]) for i, x in zip(at, xs, strict=True)]
            elif layer.kind == "batch":
                mean = self.buffers[layer.prefix + "running_mean"]
                var = self.buffers[layer.prefix + "running_var"]
                xs = [
                    F.batch_norm(x, mean[i], var[i], w[i], b[i], train, layer.momentum, layer.eps)
                    for i, x in zip(at, xs, strict=True)
                ]
            elif layer.kind == "layer":
                xs = [
                    F.layer_norm(x, (x.shape[-1],), w[i], b[i], layer.eps)
                    for i, x in zip(at, xs, strict=True)
                ]
            elif layer.kind == "act":
                assert layer.module is not None
                xs = [layer.module(x) for x in xs]
            elif train:
                masks = noise(tuple(xs[0].shape), layer.p, layer.kind == "alpha_dropout")
                xs = [_dropout(x, mask, layer) for x, mask in zip(xs, masks, strict=True)]
        return xs

    def _forward_stacked(self, x: Tensor, train: bool, noise: NoiseFn) -> Tensor:
        """All members as batched ops on the stacks (a GPU)."""
        for layer in self.plan:
            w, b = self.values.get(layer.prefix + "weight"), self.values.get(layer.prefix + "bias")
            if layer.kind == "linear":
                x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            elif layer.kind == "batch":  # K BatchNorms as one over K x H columns
                k, rows, width = x.shape
                out = F.batch_norm(
                    x.transpose(0, 1).reshape(rows, k * width),
                    self.buffers[layer.prefix + "running_mean"].view(-1),
                    self.buffers[layer.prefix + "running_var"].view(-1),
                    w.reshape(-1),
                    b.reshape(-1),
                    train,
                    layer.momentum,
                    layer.eps,
                )
                x = out.view(rows, k, width).transpose(0, 1).contiguous()
            elif layer.kind == "layer":
                x = F.layer_norm(x, (x.shape[-1],), eps=layer.eps)
                x = x * w.unsqueeze(1) + b.unsqueeze(1)
            elif layer.kind == "act":
                assert layer.module is not None
                x = layer.module(x)
            elif train:
                x = _dropout(
                    x, noise(tuple(x.shape[1:]), layer.p, layer.kind == "alpha_dropout"), layer
                )
        return x

    def zero_grad(self) -> None:
        tensors = (
            [t for ts in self.leaves.values() for t in ts]
            if self.per_member
            else self.values.values()
        )
        for t in tensors:
            t.grad = None

    @torch.no_grad()
    def step(
        self,
        hyper: list[tuple[float, float, float, float, float]],
        positions: list[int] | None = None,
    ) -> None:
        """One optimiser step of `positions` (default: all; hyper[j] is positions[j]'s);
        members with the same hyperparameters and step count share one kernel call (on the CPU
        one call per member, as `fit` makes it)."""
        at = list(range(len(self))) if positions is None else positions
        for i in at:
            self.steps[i] += 1
        if len(at) == len(self):
            self.step_count += 1
        else:
            self.step_count[at] += 1
        groups: dict[tuple[float, ...], list[int]] = {}
        for i, h in zip(at, hyper, strict=True):  # on the CPU every member is a group of its own
            groups.setdefault((*h, i) if self.per_member else (*h, self.steps[i]), []).append(i)
        keys = list(self.values)
        for (lr, beta1, beta2, momentum, wd, *_), members in groups.items():
            params, grads, slots, counts = self._group(keys, members)
            if self.optimizer == "sgd":
                torch._fused_sgd_(
                    params,
                    grads,
                    [] if momentum == 0 else slots[0],
                    weight_decay=wd,
                    momentum=momentum,
                    lr=lr,
                    dampening=0.0,
                    nesterov=False,
                    maximize=False,
                    is_first_step=self.steps[members[0]] == 1 and momentum != 0,
                )
                continue
            kernel = torch._fused_adamw_ if self.optimizer == "adamw" else torch._fused_adam_
            kernel(
                params,
                grads,
                slots[0],
                slots[1],
                [],
                counts,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                weight_decay=wd,
                eps=EPS_ADAM,
                amsgrad=False,
                maximize=False,
            )

    def _group(
        self, keys: list[str], members: list[int]
    ) -> tuple[list[Tensor], list[Tensor], list[list[Tensor]], list[Tensor]]:
        """Params, grads, optimiser slots and step counts of `members`, one list each: whole
        stacks when a GPU steps every member alike, else one tensor per member and weight (as
        `fit` has)."""
        n_slots = len(self.slots[keys[0]])
        if not self.per_member and len(members) == len(self):
            params = [self.values[k].detach() for k in keys]
            grads = [self.values[k].grad for k in keys]
            slots = [[self.slots[k][j] for k in keys] for j in range(n_slots)]
            return params, grads, slots, [self.step_count[0]] * len(params)
        pairs = [(i, k) for i in members for k in keys]
        if self.per_member:
            params = [self.leaves[k][i] for i, k in pairs]
            grads = [p.grad for p in params]
        else:
            params = [self.values[k].detach()[i] for i, k in pairs]
            grads = [self.values[k].grad[i] for i, k in pairs]
        slots = [[self.slots[k][j][i] for i, k in pairs] for j in range(n_slots)]
        return params, grads, slots, [self.step_count[i] for i, _ in pairs]

    def keep(self, rows: list[int]) -> None:
        """Drop the members not in `rows` (positions in the stack) from every stacked tensor."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.step_count.device)
        with torch.no_grad():
            for key, v in self.values.items():
                self.values[key] = v.detach()[idx]
                self.slots[key] = [s[idx] for s in self.slots[key]]
            for key, b in self.buffers.items():
                self.buffers[key] = b[idx]
            self.step_count = self.step_count[idx]
        self.steps = [self.steps[i] for i in rows]
        self._bind()

    def member_state(self, i: int) -> dict[str, Tensor]:
        """Position `i`'s weights and buffers as an `MLP` state dict (copies)."""
        state = {k: v.detach()[i].clone() for k, v in self.values.items()}
        state.update({k: v[i].clone() for k, v in self.buffers.items()})
        device = self.step_count.device
        state.update({k: torch.tensor(self.steps[i], device=device) for k in self.counters})
        return state


def _per_member(device: torch.device) -> bool:
    """Train member by member on views (the CPU: see `_Stack`) rather than on the stacks."""
    return device.type == "cpu"


def _dropout(x: Tensor, mask: Tensor, layer: _Layer) -> Tensor:
    """F.dropout's (or F.alpha_dropout's) arithmetic with a given 0/1 keep mask.

    Out of place: a member's mask is a view of the stack's, which autograd saved for the
    members before it.
    """
    if layer.kind == "dropout":
        return x * mask.div(1 - layer.p)
    a = 1.0 / math.sqrt((ALPHA_SELU**2 * layer.p + 1) * (1 - layer.p))
    shift = mask.add(-1).mul(ALPHA_SELU * a).add(ALPHA_SELU * a * layer.p)
    return x * mask.mul(a) + shift


def _training_loss_many(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    weight: Tensor | None,
    weighted: list[bool] | None,
    auc_weights: list[float],
    per_member: bool,
) -> Tensor:
    """`training_loss` per member: (K,) losses for logits (K, batch, tasks).

    `weight`: (tasks,) shared, or (K, tasks), one row per member (members on rows of their
    own). `weighted` picks the positive-weighted loss for the members that asked for it when
    only some did; `auc_weights` is each member's pairwise ROC-AUC weight (each member's loss
    is then exactly the one `fit` computes). `per_member`: one `training_loss` per member, as
    on the CPU (see `_Stack`).
    """
    if per_member:
        parts = zip(logits.unbind(0), targets.unbind(0), mask.unbind(0), strict=True)
        own = weight is not None and weight.dim() == 2
        return torch.stack(
            [
                training_loss(
                    x,
                    t,
                    m,
                    (weight[i] if own else weight) if weighted is None or weighted[i] else None,
                    auc_weights[i],
                )
                for i, (x, t, m) in enumerate(parts)
            ]
        )
    if weight is not None and weight.dim() == 2:
        weight = weight.unsqueeze(1)
    float_mask = mask.to(logits.dtype)
    zeroed = torch.where(float_mask > 0, targets, torch.zeros_like(targets))
    loss = F.binary_cross_entropy_with_logits(
        logits, zeroed, pos_weight=weight if weighted is None else None, reduction="none"
    )
    if weighted is not None:
        with_weight = F.binary_cross_entropy_with_logits(
            logits, zeroed, pos_weight=weight, reduction="none"
        )
        use = torch.tensor(weighted, device=logits.device)[:, None, None]
        loss = torch.where(use, with_weight, loss)
    loss = (loss * float_mask).flatten(1).sum(1) / float_mask.flatten(1).sum(1).clamp_min(1.0)
    if any(auc_weights):
        auc = torch.tensor(auc_weights, dtype=loss.dtype, device=loss.device)
        loss = loss + auc * pairwise_auc_loss(logits, targets, mask)
    return loss


def _check_configs(configs: Sequence[TrainConfig]) -> None:
    if not configs:
        raise ValueError("fit_many needs at least one TrainConfig")
    for name in ("batch_size", "optimizer"):
        values = {getattr(c, name) for c in configs}
        if len(values) > 1:
            raise ValueError(f"fused members must share {name}, got {sorted(map(str, values))}")


def fit_many(
    features: Features,
    labels: np.ndarray,
    split: Split | Sequence[Split],
    tasks: Sequence[str],
    model_config: ModelConfig,
    train_configs: Sequence[TrainConfig],
    device: str | torch.device = "cpu",
    callback: MemberCallback | None = None,
    num_threads: int | None = None,
    exact_dropout: bool = True,
) -> list[FitResult]:
    """Train one MLP per `train_configs` entry in one fused pass; results in the same order.

    Each result is what `fit(features, labels, split, tasks, model_config, cfg, device)` returns
    for that config (bit for bit on the CPU; see the module docstring, and `exact_dropout`);
    history "seconds" are the fused epoch's, shared by the members still training. Members must
    share `batch_size` and `optimizer`. `callback(member, epoch_result)` runs per member after
    each epoch; True stops that member. A member whose loss turns non-finite raises
    TrainingDiverged for the whole call (the message names it). The caller's RNG state and
    thread count are restored afterwards.

    `split`: one for every member, or a sequence with one per member (the folds of a
    cross-validation): each member then trains and validates on its own rows with its own
    descriptor scaler and positive weights, still equal to its own `fit`. Epochs of different
    lengths stay in step: at step j each member takes its batch j, a member with fewer batches
    sits the last steps out, and batches of unequal size (an epoch's last) run member by member.
    """
    dev = resolve_device(device)
    tasks = list(tasks)
    labels = np.asarray(labels, dtype=np.float32)
    _check_configs(train_configs)
    splits = [split] * len(train_configs) if isinstance(split, Split) else list(split)
    if len(splits) != len(train_configs):
        raise ValueError(
            f"{len(splits)} splits for {len(train_configs)} members: give one split for all, "
            "or one per member"
        )
    for s in {id(s): s for s in splits}.values():
        _check_inputs(features, labels, s, tasks, model_config)
    threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(max(1, int(num_threads)))
    rng_devices = [dev.index] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices, device_type="cuda"):
            run = _FusedRun(features, labels, splits, tasks, model_config, list(train_configs), dev)
            return run.fit(callback, exact_dropout)
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Record:
    """One member's progress: best epoch so far, epochs without improvement, history."""

    cfg: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0
    best_valid: Metrics | None = None
    best_state: dict[str, Tensor] = field(default_factory=dict)
    stop_reason: str = "max_epochs"

    def score(self, epoch: int, valid: Metrics) -> tuple[bool, str]:
        """`fit`'s bookkeeping for one epoch: (is this the best epoch, stop reason or "")."""
        score = valid.roc_auc if math.isfinite(valid.roc_auc) else -valid.loss
        is_best = score > self.best_score
        if is_best:
            self.best_score, self.best_epoch, self.best_valid = score, epoch, valid
            self.since_best = 0
        else:
            self.since_best += 1
        if epoch == self.cfg.epochs:
            return is_best, "max_epochs"
        if self.cfg.patience and self.since_best >= self.cfg.patience:
            return is_best, "early_stopping"
        return is_best, ""


@dataclass
class _SplitRows:
    """One split's rows as its members train on them: scaler, scaled view of the data, batches,
    positive weights, training and validation rows."""

    data: _DeviceData
    scaler: DescriptorScaler | None
    bounds: list[tuple[int, int]]
    weight: Tensor | None
    train_idx: Tensor  # on the CPU (each epoch permutes it there, as `fit` does)
    valid_idx: Tensor
    valid_labels: np.ndarray


class _FusedRun:
    """The data on the device, the stacked members and their schedules, for one `fit_many`."""

    def __init__(
        self,
        features: Features,
        labels: np.ndarray,
        splits: list[Split],
        tasks: list[str],
        model_config: ModelConfig,
        configs: list[TrainConfig],
        dev: torch.device,
    ) -> None:
        self.features, self.tasks, self.dev = features, tasks, dev
        self.model_config, self.configs = model_config, configs
        weighted = any(c.pos_weight for c in configs)
        by_split: dict[int, _SplitRows] = {}
        base: _DeviceData | None = None  # one copy of the data; other splits rescale its rows
        for split in splits:
            if id(split) in by_split:
                continue
            scaler = None
            if features.descriptors.shape[1]:
                scaler = fit_scaler(features.descriptors, np.asarray(split.train))
            if base is None:
                data = base = _DeviceData.of(features, labels, scaler, dev)
            else:
                data = base if scaler is None else replace(base, scaling=_Scaling.of(scaler, dev))
            weight = None
            if weighted:
                weight = torch.from_numpy(pos_weights(labels[split.train])).to(dev)
            by_split[id(split)] = _SplitRows(
                data=data,
                scaler=scaler,
                bounds=_batches(len(split.train), configs[0].batch_size),
                weight=weight,
                train_idx=torch.tensor(np.asarray(split.train), dtype=torch.long),
                valid_idx=torch.tensor(np.asarray(split.valid), dtype=torch.long).to(dev),
                valid_labels=labels[np.asarray(split.valid)],
            )
        self.rows = [by_split[id(split)] for split in splits]  # per member
        self.own_rows = len(by_split) > 1  # members train on rows of their own
        self.data = self.rows[0].data
        # Initial weights, and the global RNG state after them, member by member as `fit` does.
        self.models: list[MLP] = []
        cpu_states: list[Tensor] = []
        for cfg in configs:
            torch.manual_seed(cfg.seed)
            self.models.append(MLP(self.data.n_inputs, len(tasks), model_config))
            cpu_states.append(torch.get_rng_state())
        states = [{k: v.to(dev) for k, v in m.state_dict().items()} for m in self.models]
        self.stack = _Stack(states, _plan(self.models[0]), configs[0].optimizer, dev)
        self.noise = _Noise(dev, [c.seed for c in configs], cpu_states)
        # Members that differ only in seed (and train on as many batches) share one schedule.
        shared: dict[tuple[TrainConfig, int], _Schedule] = {}
        keys = [(_schedule_key(c), len(r.bounds)) for c, r in zip(configs, self.rows, strict=True)]
        for cfg, key in zip(configs, keys, strict=True):
            if key not in shared:
                shared[key] = _Schedule(cfg, key[1])
        self.schedules = [shared[key] for key in keys]
        self.shufflers = [torch.Generator().manual_seed(c.seed) for c in configs]
        self.active = list(range(len(configs)))  # the member at each stack position

    def fit(self, callback: MemberCallback | None, exact_dropout: bool) -> list[FitResult]:
        """Train until every member has stopped; each member's best epoch restored."""
        records = [_Record(c) for c in self.configs]
        contexts = [
            RunContext(
                self.model_config,
                self.features.config,
                tuple(self.tasks),
                self.data.n_inputs,
                rows.scaler,
            )
            for rows in self.rows
        ]
        if callback is not None:
            for model in self.models:
                model.to(self.dev)
        for epoch in range(1, max(c.epochs for c in self.configs) + 1):
            started = time.perf_counter()
            if self.own_rows:
                train_losses, lrs = self._train_epoch_own_rows(exact_dropout)
            else:
                train_losses, lrs = self._train_epoch(exact_dropout)
            train_seconds = time.perf_counter() - started
            for i, k in enumerate(self.active):
                if not math.isfinite(train_losses[i]):
                    raise TrainingDiverged(
                        f"member {k} (seed {self.configs[k].seed}): non-finite training loss "
                        f"({train_losses[i]}) at epoch {epoch}: lower its learning rate",
                        epoch,
                    )
            if self.own_rows:  # each member on its own validation rows
                valids = [
                    _validate_many(
                        self.stack,
                        self.rows[k].data,
                        self.rows[k].valid_idx,
                        self.rows[k].valid_labels,
                        self.tasks,
                        epoch,
                        [k],
                        [i],
                    )[0]
                    for i, k in enumerate(self.active)
                ]
            else:
                rows = self.rows[0]
                valids = _validate_many(
                    self.stack,
                    rows.data,
                    rows.valid_idx,
                    rows.valid_labels,
                    self.tasks,
                    epoch,
                    self.active,
                )
            seconds = time.perf_counter() - started
            keep = []
            for i, k in enumerate(self.active):
                record = records[k]
                is_best, reason = record.score(epoch, valids[i])
                if is_best:
                    record.best_state = self.stack.member_state(i)
                record.history.append(
                    {
                        "epoch": epoch,
                        "train_loss": train_losses[i],
                        **valids[i].flat("val"),
                        "lr": lrs[i],
                        "seconds": seconds,
                        "train_seconds": train_seconds,
                    }
                )
                if callback is not None:
                    model = self.models[k]
                    model.load_state_dict(self.stack.member_state(i))
                    model.eval()
                    result = EpochResult(
                        epoch=epoch,
                        train_loss=train_losses[i],
                        valid=valids[i],
                        is_best=is_best,
                        seconds=seconds,
                        lr=lrs[i],
                        model=model,
                        stop_reason=reason,
                        train_seconds=train_seconds,
                        context=contexts[k],
                    )
                    if callback(k, result) is True and not reason:
                        reason = "callback"
                if reason:
                    record.stop_reason = reason
                else:
                    keep.append(i)
            if len(keep) < len(self.active):
                if keep:
                    self.stack.keep(keep)
                self.active = [self.active[i] for i in keep]
            if not self.active:
                break
        return [
            self._result(model, record, rows.scaler)
            for model, record, rows in zip(self.models, records, self.rows, strict=True)
        ]

    def _train_epoch(self, exact_dropout: bool) -> tuple[list[float], list[float]]:
        """One epoch for the active members: (mean training loss, last step's lr) per member."""
        active, stack, dev, split = self.active, self.stack, self.dev, self.rows[0]
        orders = torch.stack(
            [
                split.train_idx[torch.randperm(len(split.train_idx), generator=self.shufflers[k])]
                for k in active
            ]
        ).to(dev)
        n_active = orders.shape[0]
        use = [self.configs[k].pos_weight for k in active]
        weight = split.weight if any(use) else None
        weighted = None if all(use) or not any(use) else use
        auc = [self.configs[k].auc_weight for k in active]
        schedules = [self.schedules[k] for k in active]
        distinct = list(dict.fromkeys(schedules))

        def noise(shape: tuple[int, ...], p: float, alpha: bool) -> Tensor:
            return self.noise.draw(active, shape, p, exact_dropout, alpha)

        loss_sum = torch.zeros(n_active, device=dev)
        count = torch.zeros(n_active, device=dev)
        hyper = [s.hyper() for s in schedules]
        for block in _blocks(split.bounds, block_rows(self.data.row_bytes, n_active)):
            # One gather per block of batches for all members; batches are slices, as in `fit`.
            first, size = block[0][0], block[-1][1] - block[0][0]
            rows = self.data.take(orders[:, first : first + size].reshape(-1))
            fp = rows.fingerprint.view(n_active, size, -1)
            desc = None if rows.descriptors is None else rows.descriptors.view(n_active, size, -1)
            targets = rows.targets.view(n_active, size, -1)
            masks = rows.mask.view(n_active, size, -1)
            for start, stop in block:
                a, b = start - first, stop - first
                x = fp[:, a:b].float()
                if desc is not None:
                    x = torch.cat([x, desc[:, a:b]], 2)
                mask = masks[:, a:b]
                logits = stack.forward(x, True, noise)
                loss = _training_loss_many(
                    logits, targets[:, a:b], mask, weight, weighted, auc, stack.per_member
                )
                stack.zero_grad()
                loss.sum().backward()
                hyper = [s.hyper() for s in schedules]
                stack.step(hyper)
                for schedule in distinct:
                    schedule.after_batch()
                n = mask.flatten(1).sum(1)
                loss_sum += loss.detach() * n
                count += n
            del rows, fp, desc, targets, masks
        for schedule in distinct:
            schedule.after_epoch()
        return (loss_sum / count.clamp_min(1.0)).tolist(), [h[0] for h in hyper]

    def _train_epoch_own_rows(self, exact_dropout: bool) -> tuple[list[float], list[float]]:
        """`_train_epoch` for members on rows of their own: at step j each member takes its own
        batch j, gathered with its own scaler. When every active member has one and all are of
        one size they run as a stack; else (an epoch's last batches) each member runs alone and
        a member whose epoch has fewer batches sits the step out."""
        active, stack, dev = self.active, self.stack, self.dev
        splits = [self.rows[k] for k in active]
        orders = [
            s.train_idx[torch.randperm(len(s.train_idx), generator=self.shufflers[k])].to(dev)
            for s, k in zip(splits, active, strict=True)
        ]
        use = [self.configs[k].pos_weight for k in active]
        weight = (
            torch.stack([s.weight for s in splits if s.weight is not None]) if any(use) else None
        )
        weighted = None if all(use) or not any(use) else use
        auc = [self.configs[k].auc_weight for k in active]
        schedules = [self.schedules[k] for k in active]
        loss_sum = torch.zeros(len(active), device=dev)
        count = torch.zeros(len(active), device=dev)
        lrs = [0.0] * len(active)
        for j in range(max(len(s.bounds) for s in splits)):
            going = [i for i, s in enumerate(splits) if j < len(s.bounds)]
            rows = [splits[i].data.take(orders[i][slice(*splits[i].bounds[j])]) for i in going]
            sizes = [len(r.targets) for r in rows]
            stack.zero_grad()
            if len(going) == len(active) and len(set(sizes)) == 1:
                mask = torch.stack([r.mask for r in rows])
                logits = stack.forward(
                    torch.stack([r.rows(0, sizes[0]) for r in rows]),
                    True,
                    self._noise(active, exact_dropout),
                )
                targets = torch.stack([r.targets for r in rows])
                loss = _training_loss_many(
                    logits, targets, mask, weight, weighted, auc, stack.per_member
                )
                loss.sum().backward()
                losses, n = loss.detach(), mask.flatten(1).sum(1)
            else:
                alone = []
                for i, r, size in zip(going, rows, sizes, strict=True):
                    noise = self._noise([active[i]], exact_dropout)
                    logits = stack.forward(r.rows(0, size)[None], True, noise, [i])[0]
                    own = weight[i] if weight is not None and use[i] else None
                    auc_weight = self.configs[active[i]].auc_weight
                    alone.append(training_loss(logits, r.targets, r.mask, own, auc_weight))
                    alone[-1].backward()
                losses = torch.stack([loss.detach() for loss in alone])
                n = torch.stack([r.mask.sum() for r in rows])
            hyper = [schedules[i].hyper() for i in going]
            stack.step(hyper, going)
            for schedule in dict.fromkeys(schedules[i] for i in going):
                schedule.after_batch()
            loss_sum[going] += losses * n
            count[going] += n
            for i, h in zip(going, hyper, strict=True):
                lrs[i] = h[0]
        for schedule in dict.fromkeys(schedules):
            schedule.after_epoch()
        return (loss_sum / count.clamp_min(1.0)).tolist(), lrs

    def _noise(self, members: list[int], exact_dropout: bool) -> NoiseFn:
        """Dropout masks for `members` (stack order), drawn as `_Noise.draw` does."""

        def noise(shape: tuple[int, ...], p: float, alpha: bool) -> Tensor:
            return self.noise.draw(members, shape, p, exact_dropout, alpha)

        return noise

    def _result(self, model: MLP, record: _Record, scaler: DescriptorScaler | None) -> FitResult:
        model.to(self.dev)
        model.load_state_dict(record.best_state)
        model.eval()
        assert record.best_valid is not None  # epochs >= 1: the first finite score is best
        return FitResult(
            model=model,
            best_epoch=record.best_epoch,
            best_valid=record.best_valid,
            history=record.history,
            scaler=scaler,
            model_config=self.model_config,
            featurizer=self.features.config,
            tasks=list(self.tasks),
            n_inputs=self.data.n_inputs,
            stop_reason=record.stop_reason,
        )


def _schedule_key(cfg: TrainConfig) -> TrainConfig:
    """What a learning-rate schedule depends on: the config without seed, patience, losses."""
    return replace(cfg, seed=0, patience=0, pos_weight=False, auc_weight=0.0)


def _validate_many(
    stack: _Stack,
    data: _DeviceData,
    idx: Tensor,
    labels: np.ndarray,
    tasks: list[str],
    epoch: int,
    active: list[int],
    positions: list[int] | None = None,
) -> list[Metrics]:
    """`fit`'s validation for every active member (or, `positions`, those stack positions):
    same batches, loss and metrics."""
    n_active = len(active)
    with torch.inference_mode():
        chunks = []
        for s in range(0, len(idx), EVAL_BATCH):
            x = data.inputs(idx[s : s + EVAL_BATCH])
            chunks.append(stack.forward(x, False, _no_noise, positions))
        logits = torch.cat(chunks, 1)
        finite = torch.isfinite(logits).flatten(1).all(1).tolist()
        targets = data.labels[idx]
        mask = (~torch.isnan(targets)).to(targets.dtype)
        losses = [float(masked_bce(logits[i], targets, mask).item()) for i in range(n_active)]
        if stack.per_member:  # as `fit` computes them (see `_Stack`)
            probs = torch.stack([torch.sigmoid(x) for x in logits.unbind(0)]).cpu().numpy()
        else:
            probs = torch.sigmoid(logits).cpu().numpy()
    for i, k in enumerate(active):
        if not finite[i]:
            raise TrainingDiverged(
                f"member {k}: non-finite validation predictions at epoch {epoch}", epoch
            )
    return [evaluate(labels, probs[i], tasks, losses[i]) for i in range(n_active)]


def _no_noise(shape: tuple[int, ...], p: float, alpha: bool) -> Tensor:
    raise AssertionError("no dropout at evaluation")
