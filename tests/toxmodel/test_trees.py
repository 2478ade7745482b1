"""Gradient-boosted trees per task: they learn, travel in a weights-only checkpoint, and the
model that holds them answers (and explains) the blend it was given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.toxmodel.conftest import synthetic
from toxmodel.checkpoint import (
    TREES_FORMAT_VERSION,
    load_checkpoint,
    save_checkpoint,
    save_ensemble,
    save_predictor,
)
from toxmodel.explain import explain
from toxmodel.featurize import DescriptorScaler, FeaturizerConfig, featurize
from toxmodel.metrics import evaluate
from toxmodel.model import MLP, ModelConfig
from toxmodel.trees import TreeConfig, Trees, blend, blend_weight, fit_trees

SMALL = TreeConfig(max_rounds=200, learning_rate=0.1, early_stopping=20, colsample_bytree=1.0)
SMILES = [h + t for h in ("C", "CC", "c1ccccc1", "c1ccncc1", "C1CCCCC1") for t in ("O", "N", "Cl")]
TASKS = ["t0", "t1"]


def _fit(data, **kwargs) -> Trees:  # type: ignore[no-untyped-def]
    x = data.features.fingerprint.astype(np.float32)
    s = data.split
    return fit_trees(
        x[s.train], data.labels[s.train], x[s.valid], data.labels[s.valid], data.tasks,
        SMALL, **kwargs,
    )  # fmt: skip


def test_trees_learn_rules_and_not_shuffled_labels() -> None:
    """AND, OR and XOR of input bits, a third of the labels missing: trees rank the test rows
    almost perfectly; with the labels shuffled (the control) they are at chance."""
    for shuffle, low, high in ((False, 0.95, 1.0), (True, 0.35, 0.65)):
        data = synthetic(n=1200, shuffle=shuffle)
        trees = _fit(data)
        test = data.split.test
        probs = trees.probabilities(data.features.fingerprint[test].astype(np.float32))
        score = evaluate(data.labels[test], probs, data.tasks).roc_auc
        assert low <= score <= high, (shuffle, score)
    assert all(0 < r < SMALL.max_rounds for r in _fit(synthetic(n=1200)).rounds)  # stopped early


def test_a_task_without_both_classes_in_training_answers_its_prevalence() -> None:
    data = synthetic(n=600, missing=0.0)
    data.labels[data.split.train, 1] = 1.0  # task 1: every training label positive
    trees = _fit(data)
    assert trees.models[1] is None and trees.rounds[1] == 0 and trees.prevalence[1] == 1.0
    probs = trees.probabilities(data.features.fingerprint.astype(np.float32))
    assert (probs[:, 1] == 1.0).all() and np.unique(probs[:, 0]).size > 2


def test_the_blob_is_plain_and_round_trips_to_the_same_probabilities(tmp_path: Path) -> None:
    data = synthetic(n=600)
    trees = _fit(data, seed=3)
    path = tmp_path / "t.pt"
    torch.save(trees.to_blob(), path)
    again = Trees.from_blob(torch.load(path, weights_only=True))  # plain types only
    x = data.features.fingerprint.astype(np.float32)
    np.testing.assert_array_equal(again.probabilities(x), trees.probabilities(x))
    np.testing.assert_array_equal(again.probabilities(x, [2])[:, 0], trees.probabilities(x)[:, 2])
    assert _fit(data, seed=3).models == trees.models  # deterministic for a seed


def test_the_blend_weight_is_the_share_that_scores_best_smallest_on_a_tie() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((400, 2)) < 0.3).astype(np.float64)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    truth = np.nan_to_num(labels, nan=0.5)
    noise = rng.random(labels.shape)
    # Trees that rank almost perfectly, networks at chance: the larger shares tie at the best
    # score, and the smallest of them wins.
    weight, scores = blend_weight(labels, noise, truth + 0.01 * noise, TASKS)
    best = max(scores.values())
    assert scores[weight] == best and weight == min(w for w, s in scores.items() if s == best)
    assert weight > 0 and scores[0.0] < best
    # Networks that rank perfectly: the networks alone.
    weight, scores = blend_weight(labels, truth, noise, TASKS)
    assert weight == 0.0 and scores[0.0] == max(scores.values())
    # Two learners each knowing one task: a blend beats either alone.
    half = np.stack([truth[:, 0], noise[:, 1]], 1), np.stack([noise[:, 0], truth[:, 1]], 1)
    weight, scores = blend_weight(labels, *half, TASKS)
    assert 0.0 < weight < 1.0 and scores[weight] > max(scores[0.0], scores[1.0])
    np.testing.assert_allclose(blend(half[0], half[1], 0.25), 0.75 * half[0] + 0.25 * half[1])


def _networks(n_inputs: int) -> list[tuple[MLP, ModelConfig]]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = ModelConfig(hidden=(8,), activation="tanh")
        out.append((MLP(n_inputs, len(TASKS), config).eval(), config))
    return out


def test_a_checkpoint_with_trees_answers_the_blend_and_explains_it(tmp_path: Path) -> None:
    """Two members, each with its own scaler and its own trees (a fold ensemble's layout): the
    loaded model answers (1 - w) x the networks' mean + w x the tree sets' mean, each tree set
    reading its member's inputs; the spread stays the networks'; explanations report the
    probability `predict` gives; an older layout of tree sets is refused."""
    featurizer = FeaturizerConfig(n_bits=64, descriptors=True)
    feats = featurize(SMILES, featurizer, n_jobs=1)
    labels = np.array([[float("N" in s), float("c1" in s)] for s in SMILES], dtype=np.float32)
    members = _networks(feats.n_features)
    scalers = [DescriptorScaler.fit(feats.descriptors[rows]) for rows in (slice(0, 8), slice(7))]
    args = (featurizer, TASKS, feats.n_features, None)
    networks_only = save_ensemble(tmp_path / "n.pt", members, *args, member_scalers=scalers)
    plain = load_checkpoint(networks_only)
    inputs = plain.inputs(feats.fingerprint, feats.descriptors)
    config = TreeConfig(max_rounds=20, min_child_samples=2, colsample_bytree=1.0)
    trees = [
        fit_trees(x, labels, x[:0], labels[:0], TASKS, config, seed=i) for i, x in enumerate(inputs)
    ]
    path = save_ensemble(
        tmp_path / "b.pt", members, *args, member_scalers=scalers, trees=trees, tree_weight=0.25
    )
    assert torch.load(path, weights_only=True)["format_version"] == TREES_FORMAT_VERSION
    model = load_checkpoint(path)
    assert model.tree_weight == 0.25 and model.trees is not None and len(model.trees) == 2
    table = model.predict(SMILES)
    own = np.mean([t.probabilities(x) for t, x in zip(trees, inputs, strict=True)], axis=0)
    networks = plain.predict(SMILES)
    want = 0.75 * networks[TASKS].to_numpy() + 0.25 * own
    np.testing.assert_allclose(table[TASKS].to_numpy(), want, atol=1e-6)
    assert not np.allclose(table[TASKS].to_numpy(), networks[TASKS].to_numpy(), atol=1e-3)
    spread = [f"{t}_std" for t in TASKS]
    np.testing.assert_allclose(table[spread].to_numpy(), networks[spread].to_numpy(), atol=1e-6)
    again = load_checkpoint(save_predictor(tmp_path / "again.pt", model))
    np.testing.assert_array_equal(again.predict(SMILES)[TASKS].to_numpy(), table[TASKS])
    found = explain(model, SMILES[:4], "t1")
    shown = table["t1"].to_numpy()[:4]
    assert [e.probability for e in found] == pytest.approx(shown.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="3 tree sets for 2 members"):
        save_ensemble(
            tmp_path / "x.pt", members, *args, member_scalers=scalers, trees=[*trees, trees[0]]
        )
    single = members[0]
    with pytest.raises(ValueError, match="one MLP"):
        one = load_checkpoint(save_checkpoint(tmp_path / "one.pt", *single, *args))
        one.trees, one.tree_weight = trees[:1], 0.5
        save_predictor(tmp_path / "y.pt", one)
