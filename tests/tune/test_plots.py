"""Summary plots stay readable in the MLflow UI whatever the number of tasks."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tune.plots import MAX_CURVE_POINTS, MAX_ROC_PANELS, roc_curves, thin_curve


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _predictions(n_tasks: int, one_class: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(60, n_tasks)).astype(float)
    y[:, :one_class] = 0.0
    y[rng.random(y.shape) < 0.2] = np.nan
    p = np.clip(np.nan_to_num(y, nan=0.5) * 0.4 + rng.random(y.shape) * 0.6, 0, 1)
    return y, p, [f"assay_{j}" for j in range(n_tasks)]


def test_few_tasks_get_one_roc_panel_each(tmp_path: Path) -> None:
    path = tmp_path / "roc.png"
    assert roc_curves(_predictions(12), path) == ""
    width, height = _png_size(path)
    assert (width, height) == (1200, 900)  # 4 x 3 panels of 3 in at 100 dpi


def test_many_tasks_get_one_readable_histogram(tmp_path: Path) -> None:
    """617 ToxCast assays as a grid of curves would be a 46,500-pixel-tall image."""
    path = tmp_path / "roc.png"
    n_tasks = 200
    assert n_tasks > MAX_ROC_PANELS
    assert roc_curves(_predictions(n_tasks, one_class=5), path) == ""
    width, height = _png_size(path)
    assert width <= 1000 and height <= 600


def test_no_scorable_task_is_skipped_with_a_reason(tmp_path: Path) -> None:
    y, p, tasks = _predictions(MAX_ROC_PANELS + 1, one_class=MAX_ROC_PANELS + 1)
    reason = roc_curves((y, p, tasks), tmp_path / "roc.png")
    assert "both classes" in reason
    assert not (tmp_path / "roc.png").exists()


def test_reliability_diagram_draws_both_curves_or_says_why_not(tmp_path: Path) -> None:
    from tune.plots import reliability

    y, p, _ = _predictions(12)
    raw = np.clip(p**3, 0, 1)  # a distorted twin
    path = tmp_path / "reliability.png"
    assert reliability((y, p, raw), path) == ""
    assert _png_size(path) == (600, 650)
    assert reliability((y, p, None), tmp_path / "calibrated_only.png") == ""
    assert reliability(None, tmp_path / "none.png") == "no test predictions given"
    unlabelled = np.full_like(y, np.nan)
    assert "no labelled" in reliability((unlabelled, p, raw), tmp_path / "empty.png")
    assert not (tmp_path / "none.png").exists() and not (tmp_path / "empty.png").exists()


def test_what_a_roc_panel_draws_does_not_grow_with_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 23 item 6: a 10^6-molecule job's test split drew curves of 10^4-10^5 corners each.
    Every curve is drawn with at most MAX_CURVE_POINTS points, from (0, 0) to (1, 1), and the
    image is the same size at 60 rows and at 40,000."""
    from matplotlib.axes import Axes

    drawn: list[np.ndarray] = []
    plot = Axes.plot

    def spy(self: Axes, *args: object, **kwargs: object) -> object:
        drawn.append(np.asarray(args[0], dtype=float))
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    rng = np.random.default_rng(1)
    n = 40_000
    y = (rng.random((n, 2)) < 0.3).astype(float)
    p = rng.random((n, 2))  # random scores: a staircase of ~n/2 corners
    assert roc_curves((y, p, ["a", "b"]), tmp_path / "big.png") == ""
    curves = [x for x in drawn if len(x) > 2]  # the diagonals are 2 points
    assert len(curves) == 2
    assert all(len(x) <= MAX_CURVE_POINTS and x[0] == 0 and x[-1] == 1 for x in curves)
    assert roc_curves(_predictions(2), tmp_path / "small.png") == ""
    assert _png_size(tmp_path / "big.png") == _png_size(tmp_path / "small.png")


def test_thin_curve_keeps_short_curves_and_the_ends_of_long_ones() -> None:
    x = np.linspace(0, 1, 5)
    assert thin_curve(x, x)[0] is x
    x = np.sort(np.random.default_rng(0).random(10_000))
    thin_x, thin_y = thin_curve(x, x**2, limit=100)
    assert len(thin_x) == 100 and thin_x[0] == x[0] and thin_x[-1] == x[-1]
    np.testing.assert_array_equal(thin_y, thin_x**2)  # points of the curve, not new ones
    assert np.all(np.diff(thin_x) >= 0)


def _study(n: int) -> object:
    """A study of `n` trials whose objective is `dropout` alone, `norm` not asked in one trial
    (as toxtune's space leaves it out for selu): a regime of one trial, which PED-ANOVA warns
    of."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    rng = np.random.default_rng(0)
    space = {
        "lr": FloatDistribution(1e-4, 3e-3, log=True),
        "norm": CategoricalDistribution(["none", "batch", "layer"]),
        "dropout": FloatDistribution(0.0, 0.6),
    }
    study = optuna.create_study(direction="maximize")
    for i in range(n):
        params = {
            "lr": float(np.exp(rng.uniform(np.log(1e-4), np.log(3e-3)))),
            "norm": ("none", "batch", "layer")[i % 3],
            "dropout": float(rng.uniform(0.0, 0.6)),
        }
        if i == 0:
            del params["norm"]
        asked = {k: d for k, d in space.items() if k in params}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=asked, value=params["dropout"])
        )
    return study


@pytest.mark.parametrize("n", [8, 12])
def test_importance_names_its_method_and_ranks_the_driving_parameter_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    """A job's study of a few trials gets fANOVA (Optuna 5.1's default, PED-ANOVA, warned on
    every small job that its estimate may be inaccurate), a large one PED-ANOVA (fANOVA took
    12.7 s at 1,000 trials); the axis says which, and either ranks `dropout` first."""
    import warnings

    import optuna

    from tune import plots

    monkeypatch.setattr(plots, "FANOVA_MAX_TRIALS", 10)  # 12 trials: the large-study branch
    method, evaluator = plots.importance_method(n)
    assert method == ("fANOVA" if n <= 10 else "PED-ANOVA")
    study = _study(n)
    path = tmp_path / "importance.png"
    with warnings.catch_warnings():
        # No library warning in a small job's output; the 12-trial stand-in for a large study
        # keeps its one-trial regime, of which PED-ANOVA warns.
        warnings.simplefilter("error" if n <= 10 else "ignore")
        assert plots.importance(study, path) == ""
        ranked = optuna.importance.get_param_importances(study, evaluator=evaluator)
    assert path.stat().st_size > 0
    assert next(iter(ranked)) == "dropout", ranked
