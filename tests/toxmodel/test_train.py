"""fit(): learning, masking, weighting, reproducibility, early stopping, callbacks, divergence."""

from __future__ import annotations

import math
import pickle
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import toxmodel.train as train_module
from tests.toxmodel.conftest import Synthetic, make_features, make_split, same_weights, synthetic
from toxmodel.checkpoint import load_checkpoint
from toxmodel.featurize import DescriptorScaler
from toxmodel.metrics import evaluate
from toxmodel.model import ModelConfig
from toxmodel.train import (
    EpochResult,
    FitResult,
    TrainConfig,
    TrainingDiverged,
    fit,
    load_train_state,
    masked_bce,
    pairwise_auc_loss,
    pos_weights,
    resolve_device,
    save_train_state,
    training_loss,
)

SMALL = ModelConfig(hidden=(64,), dropout=0.0)
FAST = TrainConfig(epochs=12, batch_size=32, lr=1e-2, patience=0)
TIMING = {"seconds", "train_seconds"}


def run(d: Synthetic, model: ModelConfig = SMALL, train: TrainConfig = FAST, **kw) -> FitResult:
    return fit(d.features, d.labels, d.split, d.tasks, model, train, num_threads=1, **kw)


def probs_on(result: FitResult, d: Synthetic, rows: np.ndarray) -> np.ndarray:
    """Probabilities of the returned model on `rows` (held out from training and selection)."""
    x = torch.from_numpy(d.features.fingerprint[rows]).float()
    with torch.inference_mode():
        return torch.sigmoid(result.model(x)).numpy()


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# --- learning ---------------------------------------------------------------------------------


def test_learns_a_learnable_rule_and_not_shuffled_labels() -> None:
    d = synthetic()
    result = run(d)
    test = evaluate(d.labels[d.split.test], probs_on(result, d, d.split.test), d.tasks)
    assert result.best_valid.roc_auc > 0.9
    assert test.roc_auc > 0.9
    assert min(m["roc_auc"] for m in test.per_task.values()) > 0.85

    control = synthetic(shuffle=True)
    result = run(control)
    test = evaluate(
        control.labels[control.split.test], probs_on(result, control, control.split.test), d.tasks
    )
    assert abs(test.roc_auc - 0.5) < 0.1


def test_history_has_one_flat_record_per_epoch() -> None:
    d = synthetic(n=200)
    result = run(d, train=replace(FAST, epochs=3))
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for h in result.history:
        assert {"epoch", "train_loss", "lr", "seconds", "train_seconds", "val_loss"} <= set(h)
        assert {"val_roc_auc", "val_pr_auc", "val_accuracy", "val_balanced_accuracy"} <= set(h)
        assert {f"val_roc_auc/{t}" for t in d.tasks} <= set(h)
        assert all(isinstance(v, (int, float)) for v in h.values())
    assert result.stop_reason == "max_epochs"
    assert not result.model.training


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(hidden=(32, 16), activation="selu", dropout=0.1, input_dropout=0.1),
        ModelConfig(hidden=(32,), norm="batch", dropout=0.1),
        ModelConfig(hidden=(32,), norm="layer", activation="gelu"),
        ModelConfig(hidden=()),
    ],
    ids=["selu", "batchnorm", "layernorm", "linear"],
)
def test_architectures_train(model: ModelConfig) -> None:
    d = synthetic(n=141)  # 84 train rows: with batch 83 the last batch would be a single row
    result = run(d, model, replace(FAST, epochs=2, batch_size=83))
    assert len(result.history) == 2
    assert math.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
@pytest.mark.parametrize("scheduler", ["none", "cosine", "onecycle", "lambda"])
def test_optimizers_and_schedules_run_to_completion(optimizer: str, scheduler: str) -> None:
    d = synthetic(n=150)
    train = replace(FAST, epochs=3, optimizer=optimizer, scheduler=scheduler, lr=0.01)
    lrs = [h["lr"] for h in run(d, train=train).history]
    assert len(lrs) == 3
    if scheduler == "none":
        assert lrs == [0.01] * 3
    elif scheduler == "lambda":
        assert lrs == pytest.approx([0.01, 0.01 * 0.95, 0.01 * 0.95**2])
    elif scheduler == "cosine":
        assert lrs[0] > lrs[1] > lrs[2]


def test_descriptors_are_scaled_on_train_rows_and_nan_tolerated() -> None:
    rng = np.random.default_rng(1)
    n = 600
    fp = (rng.random((n, 16)) < 0.5).astype(np.uint8)
    desc = rng.normal(5.0, 3.0, (n, 4)).astype(np.float32)
    labels = (desc[:, :1] > 5.0).astype(np.float32)
    desc[rng.random(desc.shape) < 0.05] = np.nan  # missing descriptor values
    desc[0, 1] = np.inf
    d = Synthetic(make_features(fp, desc), labels, make_split(n), ["d0"])
    result = run(d)
    expected = DescriptorScaler.fit(desc[d.split.train])
    assert result.scaler is not None
    np.testing.assert_allclose(result.scaler.center, expected.center)
    np.testing.assert_allclose(result.scaler.scale, expected.scale)
    assert result.n_inputs == 20
    assert result.best_valid.roc_auc > 0.9


# --- masked loss and positive weighting --------------------------------------------------------


def test_masked_bce_ignores_missing_labels() -> None:
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 1.1]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    loss = masked_bce(logits, targets, mask)
    loss.backward()
    assert torch.all(logits.grad[mask == 0] == 0)
    assert torch.all(logits.grad[mask == 1] != 0)
    labelled = mask.bool()
    expected = F.binary_cross_entropy_with_logits(logits[labelled], targets[labelled])
    assert loss.item() == pytest.approx(expected.item())

    for placeholder in (1.0, -5.0, float("nan")):
        other = targets.clone()
        other[mask == 0] = placeholder
        x = logits.detach().clone().requires_grad_(True)
        again = masked_bce(x, other, mask)
        again.backward()
        assert again.item() == loss.item()
        assert torch.equal(x.grad, logits.grad)


def test_masked_bce_with_no_labels_is_zero_not_nan() -> None:
    loss = masked_bce(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    assert loss.item() == 0.0


def test_pos_weight_scales_positive_terms_only() -> None:
    logits = torch.tensor([[0.2, -0.4], [1.5, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.ones(2, 2)
    w = torch.tensor([3.0, 0.5])
    plain = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (plain * torch.where(targets == 1, w, torch.ones(2))).mean()
    assert masked_bce(logits, targets, mask, w).item() == pytest.approx(expected.item())


def test_pos_weights_from_label_counts() -> None:
    nan = np.nan
    labels = np.array(
        [[1, 0, 1, 1], [0, 0, 1, 0], [0, nan, 1, 1], [0, 0, nan, 1], [nan, 0, 1, 1]],
        dtype=np.float32,
    )
    w = pos_weights(labels)
    assert w[0] == pytest.approx(3.0)  # 3 negatives / 1 positive, NaN ignored
    assert w[1] == 1.0  # no positives: neutral
    assert w[2] == 1.0  # no negatives: neutral
    assert w[3] == pytest.approx(0.25)
    rare = np.zeros((1001, 1), dtype=np.float32)
    rare[0] = 1
    assert pos_weights(rare)[0] == 100.0  # clamped


def test_pos_weight_changes_training() -> None:
    d = synthetic(n=200)
    train = replace(FAST, epochs=2)
    plain = run(d, train=train).history
    weighted = run(d, train=replace(train, pos_weight=True)).history
    assert plain[0]["train_loss"] != weighted[0]["train_loss"]


def brute_force_pairwise(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> float:
    """The pairwise ROC-AUC surrogate by its definition: a loop over tasks and pairs."""
    p = torch.sigmoid(logits)
    per_task = []
    for t in range(logits.shape[1]):
        labelled = [i for i in range(logits.shape[0]) if mask[i, t] > 0]
        pos = [i for i in labelled if targets[i, t] == 1]
        neg = [j for j in labelled if targets[j, t] == 0]
        if pos and neg:
            pairs = [(1 - (p[i, t] - p[j, t])) ** 2 for i in pos for j in neg]
            per_task.append(float(sum(pairs)) / len(pairs))
    return sum(per_task) / len(per_task) if per_task else 0.0


def test_pairwise_auc_loss_is_the_mean_over_each_tasks_positive_negative_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 24, 5, generator=gen)  # three members of a fused stack
    targets = (torch.rand(3, 24, 5, generator=gen) < 0.3).float()
    mask = (torch.rand(3, 24, 5, generator=gen) < 0.7).float()
    targets[mask == 0] = float("nan")  # unlabelled: any placeholder
    mask[0, :, 1] = mask[0, :, 1] * (targets[0, :, 1] == 0).float()  # only negatives labelled
    mask[1, :, 2] = 0  # nothing labelled
    loss = pairwise_auc_loss(logits, targets, mask)
    assert loss.shape == (3,)
    for k in range(3):
        expected = brute_force_pairwise(logits[k], targets[k], mask[k])
        assert loss[k].item() == pytest.approx(expected, rel=1e-5)
        assert pairwise_auc_loss(logits[k], targets[k], mask[k]).item() == pytest.approx(expected)
    # A batch where no task has both classes adds nothing (not NaN).
    assert pairwise_auc_loss(logits[0], torch.ones(24, 5), torch.ones(24, 5)).item() == 0.0


def test_training_loss_adds_the_weighted_pairwise_term_and_its_gradient_ranks() -> None:
    logits = torch.tensor([[0.5], [0.4], [-0.2], [0.6]], requires_grad=True)
    targets = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
    mask = torch.ones(4, 1)
    loss = training_loss(logits, targets, mask, auc_weight=0.5)
    pairwise = pairwise_auc_loss(logits, targets, mask)
    assert loss.item() == pytest.approx((masked_bce(logits, targets, mask) + 0.5 * pairwise).item())
    # The pairwise term alone lifts every positive and lowers every negative, the most where
    # a negative outranks a positive (row 3 above rows 0 and 1).
    logits.grad = None
    pairwise.backward()
    grad = logits.grad[:, 0]
    assert grad[0] < 0 and grad[1] < 0 and grad[2] > 0 and grad[3] > 0
    assert grad[3] > grad[2]


def test_the_pairwise_term_trains_a_model_that_learns_the_rule() -> None:
    d = synthetic()
    plain = run(d)
    ranked = run(d, train=replace(FAST, auc_weight=1.0))
    assert without_timing(ranked.history) != without_timing(plain.history)
    test = evaluate(d.labels[d.split.test], probs_on(ranked, d, d.split.test), d.tasks)
    assert ranked.best_valid.roc_auc > 0.9 and test.roc_auc > 0.9


# --- reproducibility ---------------------------------------------------------------------------


def test_same_seed_same_history_different_seed_differs() -> None:
    d = synthetic(n=300)
    model = ModelConfig(hidden=(32,), dropout=0.3)  # dropout exercises the global RNG too
    train = replace(FAST, epochs=3)
    a, b = run(d, model, train), run(d, model, train)
    assert without_timing(a.history) == without_timing(b.history)
    assert same_weights(a.model, b.model)
    c = run(d, model, replace(train, seed=1))
    assert without_timing(c.history) != without_timing(a.history)


def test_fit_restores_thread_count_and_global_rng() -> None:
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run(synthetic(n=100), train=replace(FAST, epochs=1))
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


# --- early stopping and callbacks --------------------------------------------------------------


def test_early_stopping_stops_and_restores_best_weights() -> None:
    d = synthetic(n=400, shuffle=True)  # noise: validation ROC-AUC stops improving quickly
    result = run(d, ModelConfig(hidden=(64,), dropout=0.0), replace(FAST, epochs=60, patience=3))
    h = result.history
    assert result.stop_reason == "early_stopping"
    assert len(h) == result.best_epoch + 3 < 60
    best = h[result.best_epoch - 1]["val_roc_auc"]
    assert best == max(r["val_roc_auc"] for r in h) == result.best_valid.roc_auc
    assert h[-1]["val_roc_auc"] < best
    valid = evaluate(d.labels[d.split.valid], probs_on(result, d, d.split.valid), d.tasks)
    assert valid.roc_auc == pytest.approx(best)  # the returned weights are the best epoch's


def test_callback_sees_every_epoch_and_can_stop() -> None:
    seen: list[EpochResult] = []

    def stop_at_three(epoch: EpochResult) -> bool:
        seen.append(epoch)
        return epoch.epoch == 3

    result = run(synthetic(n=200), callback=stop_at_three)
    assert [e.epoch for e in seen] == [1, 2, 3]
    assert seen[0].is_best
    assert all(e.stop_reason == "" for e in seen)
    assert len(result.history) == 3
    assert result.stop_reason == "callback"


def test_last_epoch_reports_its_stop_reason() -> None:
    seen: list[EpochResult] = []
    run(synthetic(n=100), train=replace(FAST, epochs=2), callback=seen.append)
    assert [e.stop_reason for e in seen] == ["", "max_epochs"]


def test_epoch_checkpoint_is_loadable(tmp_path: Path) -> None:
    d = synthetic(n=200)
    paths: list[Path] = []

    def save_best(epoch: EpochResult) -> None:
        if epoch.is_best:
            paths.append(epoch.checkpoint(tmp_path / f"e{epoch.epoch}.pt", extra={"trial": "t1"}))

    result = run(d, train=replace(FAST, epochs=3), callback=save_best)
    predictor = load_checkpoint(paths[-1])
    assert predictor.tasks == d.tasks
    assert predictor.extra["trial"] == "t1"
    assert predictor.extra["epoch"] == result.best_epoch
    assert same_weights(predictor.model, result.model)


@pytest.mark.parametrize("scheduler", ["none", "onecycle", "lambda"])
def test_resumed_run_continues_exactly_where_the_state_was_taken(
    tmp_path: Path, scheduler: str
) -> None:
    """A run stopped after epoch 3 and resumed from its saved state trains epochs 4-8 as the
    uninterrupted run did (dropout and shuffling included), and keeps the best epoch it had."""
    d = synthetic(n=300)
    model = ModelConfig(hidden=(32,), dropout=0.3)
    train = replace(FAST, epochs=8, scheduler=scheduler, optimizer="adamw")
    whole = run(d, model, train)

    def stop_at_three(epoch: EpochResult) -> bool:
        if epoch.epoch == 3:
            assert epoch.state is not None
            save_train_state(tmp_path / "state.pt", epoch.state())
        return epoch.epoch == 3

    run(d, model, train, callback=stop_at_three)
    seen: list[int] = []
    resumed = run(
        d,
        model,
        train,
        resume=load_train_state(tmp_path / "state.pt"),
        callback=lambda e: seen.append(e.epoch),
    )
    assert seen == [4, 5, 6, 7, 8]
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert resumed.best_epoch == whole.best_epoch
    assert same_weights(resumed.model, whole.model)


def test_a_finished_state_resumes_without_training(tmp_path: Path) -> None:
    d = synthetic(n=200)
    states: list[dict] = []
    train = replace(FAST, epochs=2)
    first = run(d, train=train, callback=lambda e: states.append(e.state()))
    save_train_state(tmp_path / "s.pt", states[-1])
    seen: list[int] = []
    again = run(d, train=train, resume=load_train_state(tmp_path / "s.pt"), callback=seen.append)
    assert seen == []
    assert again.best_epoch == first.best_epoch and same_weights(again.model, first.model)


def test_best_epoch_checkpoint_from_a_later_epoch(tmp_path: Path) -> None:
    """`checkpoint(best=True)` on an epoch that is not the best writes the best epoch's model."""
    d = synthetic(n=400, shuffle=True)
    last: list[EpochResult] = []
    result = run(d, train=replace(FAST, epochs=6), callback=last.append)
    assert not last[-1].is_best or result.best_epoch == 6
    path = last[-1].checkpoint(tmp_path / "best.pt", best=True)
    predictor = load_checkpoint(path)
    assert predictor.extra["epoch"] == result.best_epoch
    assert same_weights(predictor.model, result.model)


# --- divergence and bad input ------------------------------------------------------------------


def test_exploding_learning_rate_raises_training_diverged() -> None:
    with pytest.raises(TrainingDiverged, match=r"non-finite .* epoch \d") as info:
        run(synthetic(n=200), train=replace(FAST, optimizer="sgd", lr=1e30, epochs=3))
    assert info.value.epoch >= 1


def test_poisoned_weights_raise_training_diverged_naming_the_epoch() -> None:
    def poison(epoch: EpochResult) -> None:
        if epoch.epoch == 1:
            with torch.no_grad():
                for p in epoch.model.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match="epoch 2") as info:
        run(synthetic(n=100), train=replace(FAST, epochs=3), callback=poison)
    assert isinstance(info.value, RuntimeError)
    again = pickle.loads(pickle.dumps(info.value))  # Ray ships trial errors between processes
    assert (str(again), again.epoch) == (str(info.value), 2)


def test_misaligned_labels_are_rejected() -> None:
    d = synthetic(n=100)
    with pytest.raises(ValueError, match="aligned"):
        fit(d.features, d.labels[:-1], d.split, d.tasks, SMALL, FAST)
    with pytest.raises(ValueError, match="0, 1 or NaN"):
        fit(d.features, d.labels * 2, d.split, d.tasks, SMALL, FAST)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"batch_size": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"optimizer": "lbfgs"},
        {"scheduler": "step"},
        {"patience": -1},
        {"momentum": 1.0},
        {"weight_decay": -1.0},
        {"auc_weight": -0.1},
        {"auc_weight": float("nan")},
        {"auc_weight": True},
    ],
)
def test_train_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda:0")


# --- memory: the inputs are read in place, an epoch gathers bounded blocks ---------------------


def read_only(array: np.ndarray) -> np.ndarray:
    """`array` as Ray's object store hands it to a trial: a read-only view."""
    view = np.array(array)
    view.flags.writeable = False
    return view


def with_descriptor_quirks(d: Synthetic, n_desc: int = 33) -> Synthetic:
    """`d` plus descriptors with NaN, +-inf, a constant column and a huge value (every branch
    of the scaler), all arrays read-only as a Ray trial gets them."""
    rng = np.random.default_rng(4)
    n = len(d.features)
    desc = rng.normal(5.0, 3.0, (n, n_desc)).astype(np.float32)
    desc[rng.random(desc.shape) < 0.05] = np.nan
    desc[0, 1], desc[2, 3], desc[5, 5] = np.inf, -np.inf, 1e30
    desc[:, 4] = 2.0
    desc[: n // 2, 6] = 0.0  # IQR 0 over the training rows: the std fallback
    features = make_features(d.features.fingerprint, desc)
    features.fingerprint = read_only(features.fingerprint)
    features.descriptors = read_only(features.descriptors)
    return Synthetic(features, read_only(d.labels), d.split, d.tasks)


def test_training_reads_read_only_inputs_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial's feature matrix, descriptors and labels are tensors over the arrays it was given
    (Ray's shared store), not private copies; and torch's not-writable warning is not raised."""
    d = with_descriptor_quirks(synthetic(n=300))
    seen: list[train_module._DeviceData] = []
    of = train_module._DeviceData.of

    def spy(*args: object, **kwargs: object) -> train_module._DeviceData:
        seen.append(of(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(train_module._DeviceData, "of", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(d, train=replace(FAST, epochs=2))
    (data,) = seen
    assert data.descriptors is not None
    for tensor, array in (
        (data.fingerprint, d.features.fingerprint),
        (data.descriptors, d.features.descriptors),
        (data.labels, d.labels),
    ):
        assert tensor.data_ptr() == array.ctypes.data
        assert np.shares_memory(tensor.numpy(), array)


def test_read_only_inputs_and_block_size_leave_training_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Read-only or writable inputs, one gather per batch or one per epoch: the same model and
    history, bit for bit (dropout, batch norm, positive weights, a per-batch schedule)."""
    d = with_descriptor_quirks(synthetic(n=500))
    model = ModelConfig(hidden=(32, 16), dropout=0.2, norm="batch")
    train = TrainConfig(epochs=3, batch_size=40, pos_weight=True, scheduler="cosine", seed=3)
    reference = run(d, model, train)
    writable = Synthetic(
        make_features(np.array(d.features.fingerprint), np.array(d.features.descriptors)),
        np.array(d.labels),
        d.split,
        d.tasks,
    )
    monkeypatch.setattr(train_module, "EPOCH_BLOCK_BYTES", 1)  # one batch per gather
    for result in (run(d, model, train), run(writable, model, train)):
        assert same_weights(result.model, reference.model)
        assert without_timing(result.history) == without_timing(reference.history)


def test_descriptors_are_scaled_per_block_as_the_scaler_transforms() -> None:
    """The on-device scaling of gathered rows equals `DescriptorScaler.transform` bit for bit,
    and the scaler fitted a few columns at a time equals one fitted on the whole block (both
    below and above numpy's 600-row median switch, with a 1-column remainder merged)."""
    for n in (300, 1100):  # 180 and 660 training rows
        d = with_descriptor_quirks(synthetic(n=n))
        desc, rows = d.features.descriptors, d.split.train
        scaler = train_module.fit_scaler(desc, rows)
        whole = DescriptorScaler.fit(desc[rows])
        np.testing.assert_array_equal(scaler.center, whole.center)
        np.testing.assert_array_equal(scaler.scale, whole.scale)
        data = train_module._DeviceData.of(d.features, d.labels, scaler, torch.device("cpu"))
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        got = data.take(idx).descriptors
        assert got is not None
        want = scaler.transform(desc[idx.numpy()])
        np.testing.assert_array_equal(got.numpy(), want)


def test_an_epoch_gathers_bounded_blocks_of_whole_batches() -> None:
    bounds = [(0, 32), (32, 64), (64, 96), (96, 129)]
    assert train_module._blocks(bounds, 64) == [bounds[:2], bounds[2:3], bounds[3:]]
    assert train_module._blocks(bounds, 1) == [[b] for b in bounds]
    assert train_module._blocks(bounds, 10**6) == [bounds]
    assert train_module.block_rows(2048) == train_module.EPOCH_BLOCK_BYTES // 2048
