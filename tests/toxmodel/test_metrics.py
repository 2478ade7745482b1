"""evaluate(): agreement with scikit-learn, missing labels, skipped tasks, the flat dict."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    roc_auc_score,
)

from toxmodel.metrics import evaluate

NAN = np.nan


def test_known_values() -> None:
    y = np.array([[0], [0], [1], [1]], dtype=np.float32)
    p = np.array([[0.1], [0.4], [0.35], [0.8]])
    m = evaluate(y, p, ["t"], loss=0.25)
    assert m.roc_auc == pytest.approx(0.75)
    assert m.pr_auc == pytest.approx((1 + 2 / 3) / 2)
    assert m.accuracy == pytest.approx(0.75)
    assert m.balanced_accuracy == pytest.approx(0.75)
    assert m.loss == 0.25
    assert m.skipped == []


def test_matches_sklearn_per_task_and_as_macro_mean() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < [0.2, 0.5, 0.8]).astype(np.float32)
    p = np.clip(0.6 * y + rng.random((200, 3)) * 0.7 - 0.15, 0, 1)
    y[rng.random(y.shape) < 0.3] = NAN  # missing labels are not scored
    p[np.isnan(y)] = NAN  # nor are predictions where the label is missing
    tasks = ["a", "b", "c"]
    m = evaluate(y, p, tasks)
    expected = {}
    for j, task in enumerate(tasks):
        keep = ~np.isnan(y[:, j])
        yt, pt = y[keep, j], p[keep, j]
        expected[task] = {
            "roc_auc": roc_auc_score(yt, pt),
            "pr_auc": average_precision_score(yt, pt),
            "accuracy": accuracy_score(yt, pt >= 0.5),
            "balanced_accuracy": balanced_accuracy_score(yt, pt >= 0.5),
        }
        for key, value in expected[task].items():
            assert m.per_task[task][key] == pytest.approx(value)
        assert m.per_task[task]["n_labelled"] == keep.sum()
    for key in ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy"):
        assert getattr(m, key) == pytest.approx(np.mean([e[key] for e in expected.values()]))


def test_single_class_tasks_are_skipped_by_name() -> None:
    y = np.array([[0, 1, NAN], [1, 1, 0], [0, NAN, NAN], [1, 1, NAN]], dtype=np.float32)
    p = np.array([[0.2, 0.9, 0.1], [0.7, 0.8, 0.3], [0.4, 0.5, 0.6], [0.9, 0.6, 0.2]])
    m = evaluate(y, p, ["ok", "all_pos", "one_label"])
    assert m.skipped == ["all_pos", "one_label"]
    assert list(m.per_task) == ["ok"]
    assert m.roc_auc == pytest.approx(roc_auc_score(y[:, 0], p[:, 0]))


def test_all_tasks_skipped_gives_nan_means() -> None:
    m = evaluate(np.array([[1.0, NAN], [1.0, NAN]]), np.array([[0.3, 0.2], [0.8, 0.1]]), ["a", "b"])
    assert m.skipped == ["a", "b"]
    assert all(math.isnan(v) for v in (m.roc_auc, m.pr_auc, m.accuracy, m.balanced_accuracy))
    empty = evaluate(np.zeros((0, 2)), np.zeros((0, 2)), ["a", "b"])
    assert empty.skipped == ["a", "b"] and math.isnan(empty.roc_auc)


def test_flat_names_the_keys_loggers_use() -> None:
    y = np.array([[0, 1, 1], [1, 0, 1], [0, 1, 1], [1, 0, 1]], dtype=np.float32)
    p = np.array([[0.2, 0.9, 0.5], [0.7, 0.1, 0.5], [0.4, 0.5, 0.5], [0.9, 0.3, 0.5]])
    flat = evaluate(y, p, ["NR-AR", "SR-p53", "const"], loss=0.5).flat("val")
    assert set(flat) == {
        "val_loss",
        "val_roc_auc",
        "val_pr_auc",
        "val_accuracy",
        "val_balanced_accuracy",
        "val_roc_auc/NR-AR",
        "val_pr_auc/NR-AR",
        "val_roc_auc/SR-p53",
        "val_pr_auc/SR-p53",
    }
    assert flat["val_loss"] == 0.5
    assert all(isinstance(v, float) for v in flat.values())


def test_rejects_bad_input() -> None:
    y = np.array([[0.0], [1.0]])
    with pytest.raises(ValueError, match="shape"):
        evaluate(y, np.zeros((2, 2)), ["t"])
    with pytest.raises(ValueError, match="shape"):
        evaluate(y, np.zeros((2, 1)), ["t", "u"])
    with pytest.raises(ValueError, match="0, 1"):
        evaluate(np.array([[0.0], [2.0]]), np.zeros((2, 1)), ["t"])
    with pytest.raises(ValueError, match="not finite"):
        evaluate(y, np.array([[0.5], [NAN]]), ["t"])


def test_ece_by_hand_with_missing_labels() -> None:
    """Two bins used: [0.1, 0.2) holds p 0.1, 0.1 (one positive: gap 0.4), [0.9, 1] holds p 0.9,
    1.0 (both positive: gap 0.05). ECE = (2 * 0.4 + 2 * 0.05) / 4; NaN labels are ignored."""
    from toxmodel.metrics import brier_score, expected_calibration_error, reliability_curve

    y = np.array([[0, NAN], [1, 1], [1, NAN], [1, 1]], dtype=float)
    p = np.array([[0.1, 0.5], [0.1, 0.9], [0.9, 0.5], [1.0, 1.0]])
    yy, pp = y[:, 0], p[:, 0]
    assert expected_calibration_error(yy, pp) == pytest.approx((2 * 0.4 + 2 * 0.05) / 4)
    curve = reliability_curve(yy, pp)
    assert curve.counts.tolist() == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert curve.fraction_positive[1] == 0.5 and curve.mean_predicted[9] == pytest.approx(0.95)
    assert np.isnan(curve.mean_predicted[0])
    # Pooled over both columns: the second column adds (p 0.9, y 1) and (p 1.0, y 1).
    pooled = reliability_curve(y, p)
    assert pooled.counts.sum() == 6 and pooled.counts[9] == 4
    assert brier_score(y, p) == pytest.approx((0.01 + 0.81 + 0.01 + 0 + 0.01 + 0) / 6)
    assert math.isnan(brier_score(np.full(3, NAN), np.zeros(3)))
    with pytest.raises(ValueError, match="only 0, 1"):
        expected_calibration_error(np.array([2.0]), np.array([0.5]))


def test_ece_is_zero_only_when_each_bin_matches_its_rate() -> None:
    from toxmodel.metrics import expected_calibration_error

    rng = np.random.default_rng(0)
    p = np.repeat([0.05, 0.35, 0.75], 1000)
    y = np.concatenate([np.r_[np.ones(k), np.zeros(1000 - k)] for k in (50, 350, 750)])
    rng.shuffle(y[:1000])
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(y, np.clip(p + 0.1, 0, 1)) == pytest.approx(0.1)
