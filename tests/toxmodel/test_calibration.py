"""Calibration: lowers ECE on a mis-calibrated model, never changes ROC-AUC, chosen by CV."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from toxmodel.calibration import (
    MIN_CLASS_COUNT,
    TIE_BREAK,
    Calibration,
    TaskCalibration,
    fit_calibration,
    fit_task,
)
from toxmodel.metrics import brier_score, evaluate, expected_calibration_error

TASKS = ["overconfident", "underconfident", "shifted"]


def miscalibrated(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from a true probability, and a model that distorts it per task: too sure
    (logit x 3), too timid (logit / 3), biased (+2 on the logit). Float32, as a model gives."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 3))
    y = (rng.random((n, 3)) < 1.0 / (1.0 + np.exp(-z))).astype(np.float64)
    y[rng.random(y.shape) < 0.2] = np.nan  # missing labels
    distorted = np.stack([3.0 * z[:, 0], z[:, 1] / 3.0, z[:, 2] + 2.0], 1)
    return y, (1.0 / (1.0 + np.exp(-distorted))).astype(np.float32)


@pytest.fixture(scope="module")
def fitted() -> tuple[Calibration, np.ndarray, np.ndarray]:
    y_valid, p_valid = miscalibrated(1500, seed=0)
    y_test, p_test = miscalibrated(3000, seed=1)
    return fit_calibration(y_valid, p_valid, TASKS), y_test, p_test


def test_calibration_lowers_ece_and_brier_on_held_out_rows(
    fitted: tuple[Calibration, np.ndarray, np.ndarray],
) -> None:
    calibration, y, p = fitted
    q = calibration.apply(p)
    for j in range(len(TASKS)):
        before = expected_calibration_error(y[:, j], p[:, j])
        after = expected_calibration_error(y[:, j], q[:, j])
        assert before > 0.05 and after < before / 2, (TASKS[j], before, after)
    assert brier_score(y, q) < brier_score(y, p)
    assert set(calibration.methods().values()) <= {"platt", "isotonic"}


def test_roc_auc_is_unchanged_exactly_on_the_test_rows(
    fitted: tuple[Calibration, np.ndarray, np.ndarray],
) -> None:
    calibration, y, p = fitted
    before = evaluate(y, p, TASKS)
    after = evaluate(y, calibration.apply(p), TASKS)
    for task in TASKS:
        assert after.per_task[task]["roc_auc"] == before.per_task[task]["roc_auc"]


def test_isotonic_and_steep_platt_keep_every_distinct_input_distinct() -> None:
    """Isotonic's flat steps and a saturating Platt map would tie neighbours (changing ROC-AUC);
    the tie-breaker keeps the order strict, even between neighbouring float32 values."""
    p = np.sort(np.random.default_rng(0).random(2000).astype(np.float32))
    p = np.unique(np.concatenate([p, np.nextafter(p, np.float32(1)), [0, 1e-30, 1]]))
    p = p.astype(np.float32)
    y = (np.arange(len(p)) % 3 == 0).astype(float)
    flat = TaskCalibration(
        "isotonic", knots_x=np.array([0.0, 0.5, 1.0]), knots_y=np.array([0.2, 0.2, 0.7])
    )
    steep = TaskCalibration("platt", slope=8.0, intercept=30.0)  # saturates at 1.0 in float64
    for calibrator in (flat, steep):
        q = calibrator.apply(p)
        assert np.all(np.diff(q) > 0), calibrator.method
        assert roc_auc_score(y, q) == roc_auc_score(y, p)
        # ... and it moves a probability by no more than the tie-breaker's weight
        if calibrator.method == "isotonic":
            plain = np.interp(p.astype(float), calibrator.knots_x, calibrator.knots_y)
            assert np.max(np.abs(q - plain)) <= TIE_BREAK


def test_isotonic_regression_is_flat_without_the_tie_breaker() -> None:
    """The control for the test above: the raw isotonic map does tie values."""
    y, p = miscalibrated(2000, seed=3)
    keep = ~np.isnan(y[:, 0])
    from sklearn.isotonic import IsotonicRegression

    raw = IsotonicRegression(out_of_bounds="clip").fit(p[keep, 0], y[keep, 0])
    assert len(np.unique(raw.predict(p[keep, 0]))) < len(np.unique(p[keep, 0])) / 10


def test_cross_validation_picks_a_method_and_explains_it() -> None:
    y, p = miscalibrated(1500, seed=4)
    keep = ~np.isnan(y[:, 0])
    task = fit_task(y[keep, 0], p[keep, 0])
    assert task.method in ("platt", "isotonic")
    assert "cross-validated log loss" in task.note and "identity" in task.note
    # A perfectly calibrated model is best left alone: identity wins the CV.
    rng = np.random.default_rng(5)
    truth = rng.random(1500)
    labels = (rng.random(1500) < truth).astype(float)
    assert fit_task(labels, truth.astype(np.float32)).method in ("identity", "platt")


def test_a_task_with_too_few_labels_stays_uncalibrated_and_says_why() -> None:
    rng = np.random.default_rng(6)
    p = rng.random((200, 2)).astype(np.float32)
    y = np.zeros((200, 2))
    y[: MIN_CLASS_COUNT - 1, 0] = 1  # one positive short
    y[:50, 1] = 1
    y[100:, 1] = np.nan
    calibration = fit_calibration(y, p, ["rare", "ok"])
    rare = calibration.per_task[0]
    assert rare.method == "identity"
    assert f"{MIN_CLASS_COUNT - 1} positives" in rare.note and "uncalibrated" in rare.note
    np.testing.assert_array_equal(calibration.apply(p)[:, 0], p[:, 0].astype(np.float64))


def test_nan_rows_stay_nan_and_the_blob_round_trips(
    fitted: tuple[Calibration, np.ndarray, np.ndarray],
) -> None:
    calibration, _, p = fitted
    p = p[:20].copy()
    p[3] = np.nan
    again = Calibration.from_blob(calibration.to_blob())
    q = calibration.apply(p)
    assert np.isnan(q[3]).all() and np.isfinite(np.delete(q, 3, axis=0)).all()
    np.testing.assert_array_equal(again.apply(p), q)
    assert again.methods() == calibration.methods() and again.notes() == calibration.notes()


def test_a_negative_platt_slope_is_refused() -> None:
    with pytest.raises(ValueError, match="> 0"):
        TaskCalibration("platt", slope=-1.0)
