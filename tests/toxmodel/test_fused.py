"""fit_many(): K members in one fused pass give what K separate fit() calls give, bit for bit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import toxmodel.fused as fused_module
import toxmodel.train as train_module
from tests.toxmodel.conftest import Synthetic, same_weights, synthetic
from toxmodel.checkpoint import load_checkpoint, save_ensemble
from toxmodel.fused import fit_many
from toxmodel.model import ModelConfig
from toxmodel.split import Split
from toxmodel.train import EpochResult, FitResult, TrainConfig, TrainingDiverged, fit

TIMING = {"seconds", "train_seconds"}
BASE = TrainConfig(epochs=8, batch_size=32, lr=3e-3, patience=3, scheduler="cosine")
# Three members that differ in seed, learning rate and weight decay.
MEMBERS = [
    replace(BASE, seed=0, lr=3e-3, weight_decay=1e-5),
    replace(BASE, seed=1, lr=1e-3, weight_decay=1e-4),
    replace(BASE, seed=2, lr=3e-3, weight_decay=1e-5),
]


def with_descriptors(d: Synthetic, n_desc: int = 5) -> Synthetic:
    """`d` plus random float descriptors (exercises the descriptor scaler path)."""
    rng = np.random.default_rng(1)
    n = len(d.features)
    d.features.descriptors = rng.normal(size=(n, n_desc)).astype(np.float32)
    return d


def both_ways(
    d: Synthetic, model: ModelConfig, configs: list[TrainConfig]
) -> tuple[list[FitResult], list[FitResult]]:
    """The members trained one by one with `fit`, then together with `fit_many`."""
    args = (d.features, d.labels, d.split, d.tasks, model)
    one_by_one = [fit(*args, cfg, num_threads=1) for cfg in configs]
    fused = fit_many(*args, configs, num_threads=1)
    return one_by_one, fused


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def assert_same(one_by_one: list[FitResult], fused: list[FitResult]) -> None:
    """Bit-identical weights, histories, best epochs, scores and stop reasons, member by member."""
    assert len(one_by_one) == len(fused)
    for k, (a, b) in enumerate(zip(one_by_one, fused, strict=True)):
        assert same_weights(a.model, b.model), f"member {k}: weights differ"
        assert a.best_epoch == b.best_epoch, k
        assert a.stop_reason == b.stop_reason, k
        assert a.best_valid.roc_auc == b.best_valid.roc_auc, k
        assert without_timing(a.history) == without_timing(b.history), k
        assert a.n_inputs == b.n_inputs and a.tasks == b.tasks
        if a.scaler is not None:
            assert b.scaler is not None
            np.testing.assert_array_equal(a.scaler.center, b.scaler.center)


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(hidden=(64, 32), dropout=0.3, input_dropout=0.1),
        ModelConfig(hidden=(64,), dropout=0.2, norm="batch"),
        ModelConfig(hidden=(64,), activation="gelu", dropout=0.2, norm="layer"),
        ModelConfig(hidden=(64, 32), activation="selu", dropout=0.2, input_dropout=0.1),
    ],
    ids=["relu-dropout", "batchnorm", "gelu-layernorm", "selu-alphadropout"],
)
def test_fused_members_equal_separate_fits(model: ModelConfig) -> None:
    d = with_descriptors(synthetic(n=600, n_bits=48))
    one_by_one, fused = both_ways(d, model, MEMBERS)
    assert_same(one_by_one, fused)
    # The members really are different models (own seeds, rates and dropout masks).
    assert not same_weights(fused[0].model, fused[2].model)


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "lr"),
    [("sgd", "onecycle", 0.05), ("adam", "lambda", 1e-3), ("adamw", "onecycle", 3e-3)],
)
def test_optimizers_schedules_and_mixed_settings_equal_separate_fits(
    optimizer: str, scheduler: str, lr: float
) -> None:
    d = synthetic(n=500, n_bits=32)
    configs = [
        TrainConfig(
            epochs=4 + k,  # members stop at different epoch limits
            batch_size=50,
            optimizer=optimizer,
            lr=lr * (1 + k),
            weight_decay=1e-4 * k,
            scheduler=scheduler,
            pos_weight=k == 1,  # only one member weights positives
            auc_weight=0.5 * (k == 2),  # only one adds the pairwise ROC-AUC loss
            patience=0,
            seed=10 + k,
        )
        for k in range(3)
    ]
    one_by_one, fused = both_ways(d, ModelConfig(hidden=(32,), dropout=0.1), configs)
    assert_same(one_by_one, fused)
    assert [len(r.history) for r in fused] == [4, 5, 6]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_equal_with_two_threads_and_wide_layers(norm: str) -> None:
    """Products large enough for the CPU's BLAS to split them across threads."""
    d = with_descriptors(synthetic(n=400, n_bits=2048), n_desc=40)
    model = ModelConfig(hidden=(1024, 64), dropout=0.2, input_dropout=0.1, norm=norm)
    configs = [replace(c, epochs=2, batch_size=128) for c in MEMBERS]
    args = (d.features, d.labels, d.split, d.tasks, model)
    one_by_one = [fit(*args, cfg, num_threads=2) for cfg in configs]
    assert_same(one_by_one, fit_many(*args, configs, num_threads=2))


def test_members_early_stop_at_their_own_epochs_and_keep_their_best_weights() -> None:
    d = synthetic(n=600, n_bits=48)
    configs = [
        TrainConfig(epochs=25, batch_size=32, lr=lr, patience=2, seed=k)
        for k, lr in enumerate((3e-2, 1e-2, 3e-3))
    ]
    one_by_one, fused = both_ways(d, ModelConfig(hidden=(64,), dropout=0.2), configs)
    assert_same(one_by_one, fused)
    assert {r.stop_reason for r in fused} == {"early_stopping"}
    # Each member left the stack at its own epoch, and the best epoch is not the last.
    assert len({len(r.history) for r in fused}) > 1
    assert all(r.best_epoch < len(r.history) for r in fused)


def test_results_save_load_and_ensemble_like_fit_results(tmp_path: Path) -> None:
    d = with_descriptors(synthetic(n=400, n_bits=32))
    fused = fit_many(
        d.features,
        d.labels,
        d.split,
        d.tasks,
        ModelConfig(hidden=(32,), dropout=0.1),
        [replace(c, epochs=3) for c in MEMBERS],
        num_threads=1,
    )
    path = fused[1].save(tmp_path / "member1.pt")
    loaded = load_checkpoint(path)
    assert same_weights(loaded.model, fused[1].model)
    assert loaded.extra["epoch"] == fused[1].best_epoch
    test = d.split.test
    fp, desc = d.features.fingerprint[test], d.features.descriptors[test]
    in_memory = fused[1].predictor().probabilities(fp, desc, 64)
    np.testing.assert_array_equal(loaded.probabilities(fp, desc, 64), in_memory)
    members = [(r.model, r.model_config) for r in fused]
    ensemble = save_ensemble(
        tmp_path / "ens.pt",
        members,
        fused[0].featurizer,
        d.tasks,
        fused[0].n_inputs,
        fused[0].scaler,
    )
    probs = load_checkpoint(ensemble).probabilities(fp, desc, 64)
    singles = np.mean([r.predictor().probabilities(fp, desc, 64) for r in fused], axis=0)
    np.testing.assert_allclose(probs, singles, rtol=1e-5, atol=1e-6)


def test_callback_sees_each_member_and_can_stop_one() -> None:
    d = synthetic(n=300, n_bits=32)
    seen: list[tuple[int, int]] = []

    def callback(member: int, result: EpochResult) -> bool:
        seen.append((member, result.epoch))
        assert not result.model.training
        return member == 1 and result.epoch == 2

    configs = [replace(c, epochs=4, patience=0) for c in MEMBERS]
    fused = fit_many(
        d.features,
        d.labels,
        d.split,
        d.tasks,
        ModelConfig(hidden=(16,)),
        configs,
        callback=callback,
        num_threads=1,
    )
    assert [r.stop_reason for r in fused] == ["max_epochs", "callback", "max_epochs"]
    assert [len(r.history) for r in fused] == [4, 2, 4]
    assert sorted(seen) == sorted(
        [(0, e) for e in range(1, 5)] + [(1, 1), (1, 2)] + [(2, e) for e in range(1, 5)]
    )


def test_restores_caller_rng_and_threads() -> None:
    d = synthetic(n=200, n_bits=16)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fit_many(
        d.features, d.labels, d.split, d.tasks, ModelConfig(hidden=(8,)), MEMBERS[:2], num_threads=1
    )
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.get_num_threads() == threads


def test_diverging_member_raises_naming_it() -> None:
    d = synthetic(n=200, n_bits=16)
    configs = [
        replace(BASE, optimizer="sgd", epochs=3, lr=1e-2, seed=0),
        replace(BASE, optimizer="sgd", epochs=3, lr=1e30, seed=1),
    ]
    with pytest.raises(TrainingDiverged, match=r"member 1 .*non-finite") as info:
        fit_many(d.features, d.labels, d.split, d.tasks, ModelConfig(hidden=(8,)), configs)
    assert info.value.epoch >= 1


@pytest.mark.parametrize(
    ("configs", "message"),
    [
        ([], "at least one"),
        ([BASE, replace(BASE, batch_size=64)], "batch_size"),
        ([BASE, replace(BASE, optimizer="sgd")], "optimizer"),
    ],
)
def test_members_must_share_batch_size_and_optimizer(configs: list, message: str) -> None:
    d = synthetic(n=100, n_bits=8)
    with pytest.raises(ValueError, match=message):
        fit_many(d.features, d.labels, d.split, d.tasks, ModelConfig(hidden=(8,)), configs)


def test_shared_dropout_draw_learns_as_well_but_is_not_fits() -> None:
    """exact_dropout=False (one mask draw for the stack): a different stream, same learning."""
    d = synthetic(n=800, n_bits=32)
    model = ModelConfig(hidden=(64,), dropout=0.2)
    configs = [TrainConfig(epochs=12, batch_size=32, lr=1e-2, patience=0, seed=k) for k in range(3)]
    args = (d.features, d.labels, d.split, d.tasks, model, configs)
    exact = fit_many(*args, num_threads=1)
    shared = fit_many(*args, num_threads=1, exact_dropout=False)
    assert not any(same_weights(a.model, b.model) for a, b in zip(exact, shared, strict=True))
    assert not same_weights(shared[0].model, shared[1].model)
    for a, b in zip(exact, shared, strict=True):
        assert b.best_valid.roc_auc > 0.95
        assert abs(a.best_valid.roc_auc - b.best_valid.roc_auc) < 0.02


@pytest.mark.parametrize(
    ("model", "same_rates"),
    [
        (ModelConfig(hidden=(64, 32), dropout=0.3, input_dropout=0.1), True),
        (ModelConfig(hidden=(64, 32), dropout=0.3, input_dropout=0.1), False),
        (ModelConfig(hidden=(64,), activation="gelu", dropout=0.2, norm="layer"), True),
        (ModelConfig(hidden=(64,), dropout=0.2, norm="batch"), True),
    ],
    ids=["finalize-like", "search-like", "gelu-layernorm", "batchnorm"],
)
def test_stacked_gpu_code_path_agrees_with_fit_on_the_cpu(
    model: ModelConfig, same_rates: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU's arithmetic (batched products, stacked losses, norms and optimiser calls), run
    on the CPU: equal to `fit` within float tolerance (dropout masks are still the members')."""
    monkeypatch.setattr(fused_module, "_per_member", lambda x: False)
    d = with_descriptors(synthetic(n=600, n_bits=48))
    members = [replace(BASE, seed=k) for k in range(3)] if same_rates else MEMBERS
    if model.norm == "batch":
        # A Linear bias before a BatchNorm has no true gradient, so Adam's normalised steps
        # turn rounding noise into lr-sized moves of it (in `fit` too): SGD keeps it still.
        members = [replace(c, optimizer="sgd", lr=0.05, scheduler="onecycle") for c in members]
    configs = [
        replace(c, epochs=4, patience=0, pos_weight=k == 1, auc_weight=0.5 * (k != 1))
        for k, c in enumerate(members)
    ]
    one_by_one, fused = both_ways(d, model, configs)
    for a, b in zip(one_by_one, fused, strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)
        assert a.best_epoch == b.best_epoch
        assert a.best_valid.roc_auc == pytest.approx(b.best_valid.roc_auc, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_members_match_separate_fits_on_cuda() -> None:
    """On a GPU batched and single products may round differently: equal within tolerance."""
    d = with_descriptors(synthetic(n=600, n_bits=48))
    model = ModelConfig(hidden=(64, 32), dropout=0.3, input_dropout=0.1)
    configs = [replace(c, epochs=5, patience=0) for c in MEMBERS]
    args = (d.features, d.labels, d.split, d.tasks, model)
    one_by_one = [fit(*args, cfg, device="cuda") for cfg in configs]
    fused = fit_many(*args, configs, device="cuda")
    for a, b in zip(one_by_one, fused, strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5)
        assert abs(a.best_valid.roc_auc - b.best_valid.roc_auc) < 1e-3


def test_members_gathered_block_by_block_equal_separate_fits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An epoch gathers its rows for all members a bounded block at a time (never K copies of
    the training set at once): with one batch per block the members still equal their fits."""
    d = with_descriptors(synthetic(n=300))
    model = ModelConfig(hidden=(32,), dropout=0.2, norm="batch")
    configs = [replace(m, epochs=3) for m in MEMBERS]
    args = (d.features, d.labels, d.split, d.tasks, model)
    one_by_one = [fit(*args, cfg, num_threads=1) for cfg in configs]
    monkeypatch.setattr(train_module, "EPOCH_BLOCK_BYTES", 1)
    assert_same(one_by_one, fit_many(*args, configs, num_threads=1))


def own_splits(d: Synthetic) -> list[Split]:
    """Three train/valid pairs of different sizes over `d`'s non-test rows: at batch size 64
    their epochs have 5, 6 and 4 batches, the last of each a different size."""
    rows = np.concatenate([d.split.train, d.split.valid])
    test = d.split.test
    return [
        Split(rows[:300], rows[300:400], test),
        Split(rows[50:400], rows[:50], test),
        Split(rows[10:267], rows[:10], test),
    ]


@pytest.mark.parametrize(
    ("model", "optimizer"),
    [
        (ModelConfig(hidden=(32,), dropout=0.2, norm="batch"), "sgd"),
        (ModelConfig(hidden=(32, 16), activation="selu", dropout=0.2, input_dropout=0.1), "adamw"),
    ],
    ids=["batchnorm-sgd", "selu-alphadropout-adamw"],
)
def test_members_on_their_own_rows_equal_their_own_fits(model: ModelConfig, optimizer: str) -> None:
    """One split per member (k-fold cross-validation): each member equals `fit` on its split,
    with its own scaler and positive weights, though the epochs differ in batches."""
    d = with_descriptors(synthetic(n=500, n_bits=32))
    splits = own_splits(d)
    configs = [
        TrainConfig(
            epochs=4,
            batch_size=64,
            optimizer=optimizer,
            lr=1e-2,
            scheduler="onecycle",
            pos_weight=k != 1,
            auc_weight=0.3 * (k == 1),
            patience=0,
            seed=k,
        )
        for k in range(3)
    ]
    args = (d.features, d.labels)
    one_by_one = [
        fit(*args, s, d.tasks, model, c, num_threads=1)
        for s, c in zip(splits, configs, strict=True)
    ]
    fused = fit_many(*args, splits, d.tasks, model, configs, num_threads=1)
    assert_same(one_by_one, fused)
    assert len({r.scaler.center.tobytes() for r in fused if r.scaler is not None}) == 3


def test_members_on_their_own_rows_on_the_stacked_gpu_code_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU's arithmetic with one split per member, run on the CPU: equal within tolerance."""
    monkeypatch.setattr(fused_module, "_per_member", lambda x: False)
    d = with_descriptors(synthetic(n=500, n_bits=32))
    model = ModelConfig(hidden=(32, 16), dropout=0.2, input_dropout=0.1, norm="layer")
    configs = [
        replace(c, epochs=4, batch_size=64, patience=0, pos_weight=k == 1, auc_weight=0.3 * k)
        for k, c in enumerate(MEMBERS)
    ]
    splits = own_splits(d)
    one_by_one = [
        fit(d.features, d.labels, s, d.tasks, model, c, num_threads=1)
        for s, c in zip(splits, configs, strict=True)
    ]
    fused = fit_many(d.features, d.labels, splits, d.tasks, model, configs, num_threads=1)
    for a, b in zip(one_by_one, fused, strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, msg=key)
        assert a.best_valid.roc_auc == pytest.approx(b.best_valid.roc_auc, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_members_on_their_own_rows_match_their_fits_on_cuda() -> None:
    d = with_descriptors(synthetic(n=500, n_bits=32))
    model = ModelConfig(hidden=(64, 32), dropout=0.3, input_dropout=0.1)
    configs = [replace(c, epochs=5, batch_size=64, patience=0) for c in MEMBERS]
    splits = own_splits(d)
    one_by_one = [
        fit(d.features, d.labels, s, d.tasks, model, c, device="cuda")
        for s, c in zip(splits, configs, strict=True)
    ]
    fused = fit_many(d.features, d.labels, splits, d.tasks, model, configs, device="cuda")
    for a, b in zip(one_by_one, fused, strict=True):
        sa, sb = a.model.state_dict(), b.model.state_dict()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-4, atol=1e-5)
        assert abs(a.best_valid.roc_auc - b.best_valid.roc_auc) < 1e-3


def test_one_split_per_member_or_one_for_all() -> None:
    d = synthetic(n=100, n_bits=8)
    with pytest.raises(ValueError, match="2 splits for 3 members"):
        fit_many(
            d.features, d.labels, [d.split, d.split], d.tasks, ModelConfig(hidden=(8,)), MEMBERS
        )
