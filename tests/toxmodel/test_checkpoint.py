"""Checkpoints: safe single-file format, exact round trip, and SMILES -> probabilities."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.toxmodel.conftest import make_split, synthetic
from toxmodel.calibration import Calibration, TaskCalibration
from toxmodel.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MEMBER_SCALERS_FORMAT_VERSION,
    CheckpointError,
    Predictor,
    load_checkpoint,
    save_checkpoint,
    save_ensemble,
    save_predictor,
    uncertainty_columns,
)
from toxmodel.domain import Domain, fit_domain
from toxmodel.featurize import DescriptorScaler, Features, FeaturizerConfig, featurize
from toxmodel.model import MLP, ModelConfig
from toxmodel.train import FitResult, TrainConfig, fit, save_train_state

HEADS = ["C", "CC", "CCC", "CC(C)", "c1ccccc1", "c1ccncc1", "C1CCCCC1", "OCC"]
TAILS = ["O", "N", "Cl", "F", "C(=O)O", "C(=O)N"]
SMILES = [h + t for h in HEADS for t in TAILS]
TASKS = ["has_n", "aromatic"]


@dataclass
class Trained:
    result: FitResult
    features: Features


def train_on(featurizer: FeaturizerConfig) -> Trained:
    feats = featurize(SMILES, featurizer, n_jobs=1)
    labels = np.array([[float("N" in s), float("c1" in s)] for s in SMILES], dtype=np.float32)
    model = ModelConfig(hidden=(32,), dropout=0.2)  # dropout: predictions must use eval mode
    train = TrainConfig(epochs=3, batch_size=8, lr=1e-2, patience=0)
    split = make_split(len(SMILES), 0.7, 0.3)
    return Trained(fit(feats, labels, split, TASKS, model, train, num_threads=1), feats)


@pytest.fixture(scope="module")
def with_descriptors() -> Trained:
    return train_on(FeaturizerConfig(n_bits=256, descriptors=True))


@pytest.fixture(scope="module")
def bits_only() -> Trained:
    return train_on(FeaturizerConfig(n_bits=128, maccs=True))


def direct_probabilities(trained: Trained) -> np.ndarray:
    """What the in-memory model predicts for the training features (the oracle)."""
    x = torch.from_numpy(trained.features.fingerprint).float()
    if trained.result.scaler is not None:
        desc = trained.result.scaler.transform(trained.features.descriptors)
        x = torch.cat([x, torch.from_numpy(desc)], 1)
    trained.result.model.eval()
    with torch.inference_mode():
        return torch.sigmoid(trained.result.model(x)).numpy()


@pytest.mark.parametrize("fixture", ["with_descriptors", "bits_only"])
def test_round_trip_gives_identical_predictions(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    trained: Trained = request.getfixturevalue(fixture)
    path = trained.result.save(tmp_path / "model.pt", extra={"note": "test"})
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # atomic: no temp file left
    predictor = load_checkpoint(path)
    assert predictor.tasks == TASKS
    assert predictor.featurizer == trained.result.featurizer
    assert predictor.model_config == trained.result.model_config
    assert predictor.extra["note"] == "test"
    assert predictor.extra["epoch"] == trained.result.best_epoch
    table = predictor.predict(SMILES)
    np.testing.assert_array_equal(table[TASKS].to_numpy(), direct_probabilities(trained))
    if trained.result.scaler is not None:
        assert predictor.scaler is not None
        np.testing.assert_array_equal(predictor.scaler.center, trained.result.scaler.center)
        np.testing.assert_array_equal(predictor.scaler.scale, trained.result.scaler.scale)
    else:
        assert predictor.scaler is None


def _walk(value: Any) -> list[type]:
    if isinstance(value, dict):
        return [dict] + [t for k, v in value.items() for t in [type(k), *_walk(v)]]
    if isinstance(value, (list, tuple)):
        return [type(value)] + [t for v in value for t in _walk(v)]
    return [type(value)]


def test_file_holds_only_plain_types_and_tensors(with_descriptors: Trained, tmp_path: Path) -> None:
    extra = {"arr": np.arange(3), "n": np.int64(4), "path": tmp_path, "nested": {"t": (1, 2.5)}}
    path = with_descriptors.result.save(tmp_path / "m.pt", extra=extra)
    blob = torch.load(path, weights_only=True)
    assert blob["format"] == FORMAT and blob["format_version"] == FORMAT_VERSION
    assert {"state_dict", "model_config", "featurizer", "tasks", "n_inputs", "scaler"} <= set(blob)
    plain = {dict, list, tuple, str, int, float, bool, type(None), torch.Tensor}
    assert set(_walk(blob)) <= plain
    loaded = load_checkpoint(path).extra
    np.testing.assert_array_equal(loaded["arr"], np.arange(3))
    assert loaded["n"] == 4 and type(loaded["n"]) is int
    assert loaded["path"] == str(tmp_path)
    assert loaded["nested"] == {"t": (1, 2.5)}


def test_unsupported_extra_is_rejected_at_save(with_descriptors: Trained, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"extra\.obj"):
        with_descriptors.result.save(tmp_path / "m.pt", extra={"obj": object()})
    assert list(tmp_path.iterdir()) == []


class _Payload:
    """Unpickling this would create `marker`: the attack weights_only=True must block."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_pickled_objects_are_refused(bits_only: Trained, tmp_path: Path) -> None:
    good = torch.load(bits_only.result.save(tmp_path / "good.pt"), weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**good, "extra": {"x": _Payload(marker)}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_foreign_or_future_files_are_rejected(bits_only: Trained, tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a toxtune checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    good = torch.load(bits_only.result.save(tmp_path / "good.pt"), weights_only=True)
    torch.save({**good, "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({**good, "n_inputs": 7}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_checkpoint(tmp_path / "broken.pt")


def test_ensemble_checkpoint_averages_its_members_probabilities(
    with_descriptors: Trained, tmp_path: Path
) -> None:
    """Two differently shaped members: the loaded ensemble predicts their mean probability."""
    first = with_descriptors.result
    wide = ModelConfig(hidden=(16, 8), activation="tanh")
    torch.manual_seed(1)
    second = MLP(first.n_inputs, len(TASKS), wide)  # untrained: far from the first member
    path = save_ensemble(
        tmp_path / "ensemble.pt",
        [(first.model, first.model_config), (second, wide)],
        first.featurizer,
        TASKS,
        first.n_inputs,
        first.scaler,
        extra={"members": 2},
    )
    ensemble = load_checkpoint(path)
    smiles = SMILES[:10]
    mean = (
        load_checkpoint(first.save(tmp_path / "a.pt")).predict(smiles)[TASKS].to_numpy()
        + _single(second, wide, first, tmp_path).predict(smiles)[TASKS].to_numpy()
    ) / 2
    np.testing.assert_allclose(ensemble.predict(smiles)[TASKS].to_numpy(), mean, atol=1e-5)
    assert ensemble.extra["members"] == 2 and ensemble.tasks == TASKS
    with pytest.raises(ValueError, match="at least one member"):
        save_ensemble(tmp_path / "e.pt", [], first.featurizer, TASKS, first.n_inputs, None)


def _single(model: MLP, config: ModelConfig, like: FitResult, tmp_path: Path) -> Predictor:
    path = save_checkpoint(
        tmp_path / "b.pt", model, config, like.featurizer, TASKS, like.n_inputs, like.scaler
    )
    return load_checkpoint(path)


def test_predict_marks_bad_rows_and_keeps_order(bits_only: Trained, tmp_path: Path) -> None:
    predictor = load_checkpoint(bits_only.result.save(tmp_path / "m.pt"))
    inputs = ["CCO", "not a smiles", "", "C" * 1500, "c1ccccc1N", "C1CC", "CCO"]
    table = predictor.predict(inputs)
    assert list(table.columns) == ["smiles", *TASKS, "error", *uncertainty_columns(TASKS)]
    assert uncertainty_columns(TASKS) == [
        *(f"{t}_std" for t in TASKS),
        "nn_similarity",
        "in_domain",
    ]
    assert table["smiles"].tolist() == inputs
    bad = [False, True, True, True, False, True, False]
    assert table["error"].ne("").tolist() == bad
    assert "empty" in table["error"][2]
    assert "longer than" in table["error"][3]
    probs = table[TASKS].to_numpy()
    assert np.isnan(probs[bad]).all()
    good = probs[~np.array(bad)]
    assert np.isfinite(good).all() and ((good >= 0) & (good <= 1)).all()
    np.testing.assert_allclose(probs[0], probs[6], rtol=1e-6)  # same SMILES, same answer


def test_predict_without_valid_rows_never_raises(bits_only: Trained, tmp_path: Path) -> None:
    predictor = load_checkpoint(bits_only.result.save(tmp_path / "m.pt"))
    table = predictor.predict(["", "((("])
    assert table[TASKS].isna().all().all() and table["error"].ne("").all()
    empty = predictor.predict([])
    assert list(empty.columns) == ["smiles", *TASKS, "error", *uncertainty_columns(TASKS)]
    assert len(empty) == 0


def test_predict_in_batches_matches_one_batch(with_descriptors: Trained, tmp_path: Path) -> None:
    predictor = load_checkpoint(with_descriptors.result.save(tmp_path / "m.pt"))
    whole = predictor.predict(SMILES)[TASKS].to_numpy()
    batched = predictor.predict(SMILES, batch_size=5)[TASKS].to_numpy()
    np.testing.assert_allclose(batched, whole, rtol=1e-6, atol=1e-7)


def test_featurizer_mismatch_is_a_clear_error() -> None:
    model = MLP(64, 1, ModelConfig(hidden=(4,)))
    predictor = Predictor(model, FeaturizerConfig(n_bits=32), ["t"], 64, ModelConfig(hidden=(4,)))
    with pytest.raises(CheckpointError, match="expects 64"):
        predictor.predict(["CCO"])


def test_save_checkpoint_from_parts(tmp_path: Path) -> None:
    config = ModelConfig(hidden=(8,), activation="selu", dropout=0.1)
    model = MLP(32, 2, config)
    path = save_checkpoint(
        tmp_path / "sub" / "m.pt", model, config, FeaturizerConfig(n_bits=32), ["a", "b"], 32, None
    )
    predictor = load_checkpoint(path, device="cpu")
    assert predictor.model_config == config
    assert not predictor.model.training
    probs = predictor.predict(["CCO", "c1ccccc1"])[["a", "b"]].to_numpy()
    assert not any(math.isnan(v) for v in probs.ravel())


@pytest.fixture(scope="module")
def fuzz_predictor(bits_only: Trained, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return load_checkpoint(bits_only.result.save(tmp_path_factory.mktemp("fuzz") / "m.pt"))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=80),
            st.text(alphabet="CNOSPFclcnos()[]=#123%+-@H.:/\\*0 ", max_size=60),
        ),
        max_size=6,
    )
)
def test_fuzz_predict_answers_every_row(fuzz_predictor: Predictor, texts: list[str]) -> None:
    table = fuzz_predictor.predict(texts, n_jobs=1)
    assert table["smiles"].tolist() == texts  # one row per input, in order, none dropped
    probs = table[TASKS].to_numpy()
    failed = table["error"].ne("").to_numpy()
    assert np.isnan(probs[failed]).all()  # a failed row says why and has no probabilities
    ok = probs[~failed]
    assert np.isfinite(ok).all() and ((ok >= 0) & (ok <= 1)).all()


# --------------------------------------------------------------------------------------------
# Uncertainty, applicability domain and calibration in the checkpoint


def _members(first: FitResult) -> list[tuple[MLP, ModelConfig]]:
    """The trained model plus two untrained ones: members that clearly disagree."""
    out = [(first.model, first.model_config)]
    for seed in (1, 2):
        torch.manual_seed(seed)
        config = ModelConfig(hidden=(8,), activation="tanh")
        out.append((MLP(first.n_inputs, len(TASKS), config), config))
    return out


def test_ensemble_spread_is_the_std_of_its_members_predictions(
    with_descriptors: Trained, tmp_path: Path
) -> None:
    first = with_descriptors.result
    members = _members(first)
    args = (first.featurizer, TASKS, first.n_inputs, first.scaler)
    ensemble = load_checkpoint(save_ensemble(tmp_path / "e.pt", members, *args))
    assert ensemble.has_spread
    smiles = ["CCO", "not a smiles", *SMILES[:8]]
    own = np.stack(
        [
            load_checkpoint(save_checkpoint(tmp_path / f"{i}.pt", m, c, *args))
            .predict(smiles)[TASKS]
            .to_numpy()
            for i, (m, c) in enumerate(members)
        ]
    )
    table = ensemble.predict(smiles)
    std_columns = [f"{t}_std" for t in TASKS]
    np.testing.assert_allclose(table[std_columns].to_numpy(), np.std(own, axis=0), atol=1e-6)
    np.testing.assert_allclose(table[TASKS].to_numpy(), own.mean(0), atol=1e-6)
    assert (table[std_columns].drop(index=1).to_numpy() > 1e-4).all()  # members disagree
    assert table["error"][1] != "" and table.loc[1, std_columns].isna().all()


def test_single_network_has_no_spread(bits_only: Trained, tmp_path: Path) -> None:
    single = load_checkpoint(bits_only.result.save(tmp_path / "m.pt"))
    assert not single.has_spread
    table = single.predict(["CCO", "c1ccccc1"])
    assert table[[f"{t}_std" for t in TASKS]].isna().all().all()
    # A one-member ensemble has no spread either: a std of 0 would claim certainty.
    one = save_ensemble(
        tmp_path / "one.pt",
        [(bits_only.result.model, bits_only.result.model_config)],
        bits_only.result.featurizer,
        TASKS,
        bits_only.result.n_inputs,
        None,
    )
    assert not load_checkpoint(one).has_spread
    assert load_checkpoint(one).predict(["CCO"])[[f"{t}_std" for t in TASKS]].isna().all().all()


def _calibration() -> Calibration:
    """Task 0 shifted by Platt, task 1 by an isotonic step: both move every probability."""
    return Calibration(
        tuple(TASKS),
        (
            TaskCalibration("platt", slope=0.5, intercept=1.0),
            TaskCalibration(
                "isotonic", knots_x=np.array([0.0, 0.5, 1.0]), knots_y=np.array([0.1, 0.1, 0.9])
            ),
        ),
    )


def test_calibration_and_domain_travel_in_a_weights_only_checkpoint(
    with_descriptors: Trained, tmp_path: Path
) -> None:
    first = with_descriptors.result
    fp = with_descriptors.features.fingerprint
    domain = fit_domain(fp[:30], fp[30:], first.featurizer.n_bits)
    predictor = replace(first.predictor(), calibration=_calibration(), domain=domain)
    path = save_predictor(tmp_path / "m.pt", predictor, extra={"k": 1})
    blob = torch.load(path, weights_only=True)
    assert blob["domain"]["train_bits"].dtype == torch.uint8  # packed bits
    assert blob["domain"]["train_bits"].shape[1] == first.featurizer.n_bits // 8
    loaded = load_checkpoint(path)
    assert loaded.extra == {"k": 1} and loaded.calibration is not None
    assert loaded.calibration.methods() == {TASKS[0]: "platt", TASKS[1]: "isotonic"}
    assert loaded.domain is not None and loaded.domain.threshold == domain.threshold
    inputs = [SMILES[0], "((", "[U+6]"]
    raw = loaded.predict(inputs, calibrated=False)
    calibrated = loaded.predict(inputs)
    want = _calibration().apply(raw[TASKS].to_numpy())
    np.testing.assert_array_equal(calibrated[TASKS].to_numpy(), want)
    assert not np.allclose(calibrated[TASKS].to_numpy()[[0, 2]], raw[TASKS].to_numpy()[[0, 2]])
    # A training molecule is its own nearest neighbour; an invalid row has no domain answer.
    assert calibrated["nn_similarity"][0] == 1.0 and calibrated["in_domain"][0] is np.True_
    assert calibrated["error"][1] != "" and np.isnan(calibrated["nn_similarity"][1])
    assert calibrated["in_domain"][1] is pd.NA
    assert calibrated["nn_similarity"][2] < domain.threshold  # a bare uranium ion
    assert calibrated["in_domain"][2] is np.False_


def test_predict_n_jobs_sets_the_domain_search_threads(
    with_descriptors: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`predict(n_jobs=...)` is how a caller bounds the CPUs prediction takes: the domain's
    search gets the same count (None: every CPU), and the answer does not change with it."""
    first = with_descriptors.result
    fp = with_descriptors.features.fingerprint
    domain = fit_domain(fp[:30], fp[30:], first.featurizer.n_bits)
    predictor = replace(first.predictor(), domain=domain)
    seen: list[int | None] = []
    real = Domain.similarity

    def spy(self: Domain, fingerprint: np.ndarray, *args: Any, **kw: Any) -> np.ndarray:
        seen.append(kw.get("workers"))
        return real(self, fingerprint, *args, **kw)

    monkeypatch.setattr(Domain, "similarity", spy)
    want = predictor.predict(SMILES[:4])
    for n_jobs in (1, 2):
        pd.testing.assert_frame_equal(predictor.predict(SMILES[:4], n_jobs=n_jobs), want)
    assert seen == [None, 1, 2]


def test_checkpoint_without_trust_fields_still_loads_and_predicts(
    bits_only: Trained, tmp_path: Path
) -> None:
    """A checkpoint written before calibration and domains existed has neither key."""
    blob = torch.load(bits_only.result.save(tmp_path / "new.pt"), weights_only=True)
    old = {k: v for k, v in blob.items() if k not in ("calibration", "domain")}
    torch.save(old, tmp_path / "old.pt")
    predictor = load_checkpoint(tmp_path / "old.pt")
    assert predictor.calibration is None and predictor.domain is None
    table = predictor.predict(["CCO"])
    raw = predictor.predict(["CCO"], calibrated=False)
    assert table[TASKS].equals(raw[TASKS])
    assert np.isnan(table["nn_similarity"][0]) and table["in_domain"][0] is pd.NA


def test_mismatched_trust_fields_are_refused(bits_only: Trained, tmp_path: Path) -> None:
    blob = torch.load(bits_only.result.save(tmp_path / "m.pt"), weights_only=True)
    wrong = Calibration(("x", "y"), (TaskCalibration(), TaskCalibration()))
    plain = {**wrong.to_blob(), "knots_x": [torch.zeros(0)] * 2, "knots_y": [torch.zeros(0)] * 2}
    torch.save({**blob, "calibration": plain}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="calibration tasks"):
        load_checkpoint(tmp_path / "bad.pt")
    predictor = replace(load_checkpoint(tmp_path / "m.pt"), calibration=wrong)
    with pytest.raises(ValueError, match="calibration tasks"):
        save_predictor(tmp_path / "refused.pt", predictor)
    assert not (tmp_path / "refused.pt").exists()


# --- size: what grows with the training set, and how often it is stored ------------------------


def test_a_domain_is_stored_once_per_model_not_per_member(
    bits_only: Trained, tmp_path: Path
) -> None:
    """A model file grows with its training set by the domain alone (the packed distinct
    training bits), held once per file: more ensemble members add their weights, nothing else."""
    first = bits_only.result
    n_bits = first.featurizer.n_bits
    fp = (np.random.default_rng(0).random((4000, n_bits)) < 0.2).astype(np.uint8)
    small = fit_domain(fp[:1000], fp[:50], n_bits)
    large = fit_domain(fp, fp[:50], n_bits)
    weights = sum(t.numel() * t.element_size() for t in first.model.state_dict().values())
    members = [(first.model, first.model_config)]
    for seed in (1, 2, 3):  # distinct weights (torch.save stores a shared tensor once)
        torch.manual_seed(seed)
        members.append((MLP(first.n_inputs, len(TASKS), first.model_config), first.model_config))

    def size(k: int, domain: Domain | None) -> int:
        name = f"{k}-{0 if domain is None else domain.n_train}.pt"
        path = save_ensemble(
            tmp_path / name,
            members[:k],
            first.featurizer,
            TASKS,
            first.n_inputs,
            first.scaler,
            domain=domain,
        )
        return path.stat().st_size

    bits = small.train_packed.nbytes
    for k in (1, 4):
        assert bits <= size(k, small) - size(k, None) < bits + 4096
    assert 3 * weights <= size(4, small) - size(1, small) < 3 * (weights + 4096)
    more = large.train_packed.nbytes - bits
    assert more <= size(4, large) - size(4, small) < more + 4096


def test_a_trial_checkpoint_does_not_grow_with_the_training_set(tmp_path: Path) -> None:
    """What a trial saves every epoch (the best model so far and the training state) holds
    weights, optimiser and history, never rows: 10x the molecules, the same bytes."""
    sizes = []
    for n in (200, 2000):
        d = synthetic(n=n)
        states: list[dict[str, Any]] = []
        result = fit(
            d.features,
            d.labels,
            d.split,
            d.tasks,
            ModelConfig(hidden=(16,)),
            TrainConfig(epochs=2, batch_size=64),
            num_threads=1,
            callback=lambda epoch, keep=states: keep.append(epoch.state()),
        )
        model = result.save(tmp_path / f"model-{n}.pt")
        state = save_train_state(tmp_path / f"state-{n}.pt", states[-1])
        sizes.append((model.stat().st_size, state.stat().st_size))
    (model_small, state_small), (model_large, state_large) = sizes
    assert abs(model_large - model_small) < 64 and abs(state_large - state_small) < 64


def test_members_with_their_own_scalers_each_scale_their_inputs(
    with_descriptors: Trained, tmp_path: Path
) -> None:
    """A fold ensemble: each member scaled its descriptors on its own training rows. The loaded
    ensemble's mean and spread are those of the members each served with its own scaler, and
    older readers refuse the file (a version-2 reader would scale every member alike)."""
    first = with_descriptors.result
    assert first.scaler is not None
    members = _members(first)
    desc = with_descriptors.features.descriptors
    scalers = [
        DescriptorScaler.fit(desc[rows]) for rows in (slice(0, 16), slice(16, 48), slice(None))
    ]
    args = (first.featurizer, TASKS, first.n_inputs)
    path = save_ensemble(tmp_path / "e.pt", members, *args, None, member_scalers=scalers)
    ensemble = load_checkpoint(path)
    assert ensemble.scaler is None and ensemble.member_scalers is not None
    assert torch.load(path, weights_only=True)["format_version"] == MEMBER_SCALERS_FORMAT_VERSION
    smiles = ["CCO", "not a smiles", *SMILES[:8]]
    own = np.stack(
        [
            load_checkpoint(save_checkpoint(tmp_path / f"{i}.pt", m, c, *args, s))
            .predict(smiles)[TASKS]
            .to_numpy()
            for i, ((m, c), s) in enumerate(zip(members, scalers, strict=True))
        ]
    )
    table = ensemble.predict(smiles)
    np.testing.assert_allclose(table[TASKS].to_numpy(), own.mean(0), atol=1e-6)
    std_columns = [f"{t}_std" for t in TASKS]
    np.testing.assert_allclose(table[std_columns].to_numpy(), np.std(own, axis=0), atol=1e-6)
    again = load_checkpoint(save_predictor(tmp_path / "again.pt", ensemble))  # round trip
    np.testing.assert_array_equal(again.predict(smiles)[TASKS].to_numpy(), table[TASKS])
    with pytest.raises(ValueError, match="not both"):
        save_ensemble(tmp_path / "x.pt", members, *args, first.scaler, member_scalers=scalers)
