"""k-fold jobs (`search.folds`): trials scored on the mean over folds, a fold ensemble registered
with calibration and domain fitted out of fold, restored trials that report no epoch twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.tune.conftest import TASKS, tiny_job
from toxmodel.calibration import fit_calibration
from toxmodel.checkpoint import load_checkpoint
from toxmodel.folds import fit_folds, out_of_fold
from toxmodel.metrics import evaluate
from toxmodel.model import Ensemble
from toxmodel.trees import blend, blend_weight
from tune import trainable
from tune.finalize import FINAL_DIR, fold_members, out_of_fold_probabilities, score_test
from tune.job import JobResult, run_job
from tune.prepare import PreparedData, prepare_data
from tune.report import format_result
from tune.serving import predict_file
from tune.space import DEFAULT_POINT, to_run_configs
from tune.trainable import CHECKPOINT_FILE, FOLD_KEY, FOLDS_FILE, TrialData

K = 3
CONFIG = {**DEFAULT_POINT, "width_0": 32, "width_1": 16, "dropout": 0.1, "input_dropout": 0.0}


def _fold_job(root: Path, data: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "search__folds": K,
        "search__num_samples": 2,
        "search__max_epochs": 2,
        "featurizer__descriptors": True,  # each fold model has a descriptor scaler of its own
        "search__trees": True,  # and trees of its own, blended in at a share chosen out of fold
        "tracking__registered_model_name": "folds",
    }
    return tiny_job(root, data, **{**settings, **overrides})


@pytest.fixture(scope="module")
def fold_run(
    tmp_path_factory: pytest.TempPathFactory, small_csv: Path
) -> Iterator[tuple[Any, JobResult, PreparedData]]:
    """One 3-fold job, end to end on a local Ray."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    job = _fold_job(tmp_path_factory.mktemp("folds"), small_csv)
    try:
        result = run_job(job, progress=False)
    finally:
        ray.shutdown()
    yield job, result, prepare_data(job, progress=False)


@pytest.mark.slow
def test_a_fold_job_registers_its_best_trials_fold_models_averaged(
    fold_run: tuple[Any, JobResult, PreparedData], tmp_path: Path
) -> None:
    job, result, data = fold_run
    assert data.folds is not None and data.folds.k == K
    final = load_checkpoint(Path(result.experiment_path) / FINAL_DIR / CHECKPOINT_FILE)
    assert isinstance(final.model, Ensemble) and len(final.model.members) == K
    assert final.extra["trial_id"] == result.best_trial_id and final.extra["folds"] == K
    assert final.scaler is None and final.member_scalers is not None  # one per fold
    assert not np.array_equal(final.member_scalers[0].center, final.member_scalers[1].center)
    assert final.trees is not None and len(final.trees) == K  # trees of their own too
    assert final.tree_weight == final.extra["tree_weight"] > 0
    assert result.blend == {k: final.extra[k] for k in result.blend} and len(result.blend) == 4
    assert f"trees: {100 * final.tree_weight:g} % of the blend" in format_result(job, result)
    # Calibration and domain fitted out of fold: the domain's reference set is every non-test
    # row, its threshold chosen on every non-test row's similarity to its fold's training rows.
    assert final.calibration is not None and final.domain is not None
    assert final.domain.n_valid == data.folds.rows.size
    assert 0.0 < final.domain.threshold < 1.0  # not the trivial 1 of rows in their own domain
    assert score_test(final, data)[1].roc_auc == pytest.approx(result.test.roc_auc)

    client = MlflowClient(job.tracking_uri)
    version = client.get_model_version_by_alias(job.model_name, "champion")
    assert version.tags["folds"] == str(K) and version.tags["ensemble"] == str(K)
    assert float(version.tags["tree_weight"]) == final.tree_weight
    logged = client.get_run(result.parent_run_id).data.metrics
    for key in ("tree_weight", "oof_roc_auc_networks", "oof_roc_auc_trees", "oof_roc_auc_blend"):
        assert logged[key] == pytest.approx(final.extra[key])
    source = tmp_path / "in.csv"
    source.write_text("smiles\nCCO\nnot-a-smiles\nc1ccccc1O\n")
    out = predict_file(
        f"models:/{job.model_name}@champion", source, tmp_path / "p.csv", job.tracking_uri
    )
    table = pd.read_csv(out, keep_default_na=False, dtype=str)
    want = final.predict(["CCO", "c1ccccc1O"])
    for task in TASKS:
        spread = table[f"p_{task}_std"]
        assert spread[1] == ""  # the invalid row
        assert [float(spread[0]), float(spread[2])] == pytest.approx(
            want[f"{task}_std"].tolist(), abs=1e-6
        )
        assert float(spread[0]) > 0  # three fold models that disagree
        assert float(table[f"p_{task}"][0]) == pytest.approx(float(want[task][0]), abs=1e-6)


@pytest.mark.slow
def test_a_trials_reported_score_is_the_mean_of_its_folds(
    fold_run: tuple[Any, JobResult, PreparedData],
) -> None:
    """Each epoch's val_roc_auc is the mean of the per-fold scores reported beside it, and both
    are what training the trial's configuration on the job's folds outside Ray gives."""
    job, _, data = fold_run
    assert data.folds is not None
    checked = 0
    for folder in sorted(job.storage.local(job.name).glob("train_trial_*")):
        frame = pd.read_csv(folder / "progress.csv")  # every epoch the trial reported
        config = json.loads((folder / "params.json").read_text())
        folds = frame[[f"{FOLD_KEY}/{i}" for i in range(K)]].to_numpy()
        np.testing.assert_allclose(frame["val_roc_auc"], folds.mean(1), rtol=1e-12)
        np.testing.assert_allclose(frame["val_roc_auc_std"], folds.std(1), rtol=1e-12)
        s = job.search
        model_config, train_config = to_run_configs(config, s.max_epochs, s.patience, s.seed)
        fit = fit_folds(
            data.features,
            data.labels,
            data.folds,
            TASKS,
            model_config,
            train_config,
            num_threads=1,
        )
        epochs = frame["epoch"].astype(int).tolist()
        assert epochs == list(range(1, len(epochs) + 1))  # each epoch reported once
        expected = [fit.history[e - 1] for e in epochs]
        np.testing.assert_allclose(folds, [h.scores for h in expected], atol=1e-6)
        np.testing.assert_allclose(
            frame["best_val_roc_auc"], [h.best_mean for h in expected], atol=1e-6
        )
        checked += 1
    assert checked == job.search.num_samples


@pytest.mark.slow
def test_out_of_fold_predictions_cover_every_non_test_row_once(
    fold_run: tuple[Any, JobResult, PreparedData],
) -> None:
    _, result, data = fold_run
    folds = data.folds
    assert folds is not None
    final = load_checkpoint(Path(result.experiment_path) / FINAL_DIR / CHECKPOINT_FILE)
    oof = out_of_fold_probabilities(final, data, folds)
    non_test = np.sort(np.concatenate([data.split.train, data.split.valid]))
    np.testing.assert_array_equal(folds.rows, non_test)
    assert not np.intersect1d(folds.rows, data.split.test).size
    assert oof.shape == (non_test.size, len(TASKS)) and not np.isnan(oof).any()
    # Each row's prediction is by the one fold model that did not train on it.
    singles = fold_members(final)
    smiles = [data.table.smiles[i] for i in data.features.valid_rows[folds.rows]]
    own = np.stack([m.predict(smiles, calibrated=False)[TASKS].to_numpy() for m in singles])
    np.testing.assert_allclose(oof, own[folds.fold, np.arange(folds.rows.size)], atol=1e-6)
    # The registered model's calibration is the one these out-of-fold predictions give.
    assert final.calibration is not None
    refit = fit_calibration(data.labels[folds.rows], oof, TASKS)
    assert final.calibration.notes() == refit.notes()
    for i, split in enumerate(folds.splits):
        assert not np.isin(split.valid, split.train).any()
        assert (folds.fold[np.searchsorted(folds.rows, split.valid)] == i).all()


@pytest.mark.slow
def test_the_trees_share_is_the_one_that_scores_best_out_of_fold(
    fold_run: tuple[Any, JobResult, PreparedData],
) -> None:
    """The registered blend's share of trees is, of the shares tried, the one whose blend of
    the fold networks' and the fold trees' out-of-fold predictions scores best; each fold's
    trees never trained on the rows they predict out of fold (their scores there are below
    their scores on their own training rows)."""
    _, result, data = fold_run
    folds = data.folds
    assert folds is not None
    final = load_checkpoint(Path(result.experiment_path) / FINAL_DIR / CHECKPOINT_FILE)
    assert final.trees is not None
    networks = out_of_fold_probabilities(replace(final, trees=None), data, folds)
    f, labels = data.features, data.labels
    per_fold, seen = [], []
    for single, split in zip(fold_members(final), folds.splits, strict=True):
        assert single.trees is not None
        for rows, out in ((split.valid, per_fold), (split.train, seen)):
            x = single.inputs(f.fingerprint[rows], f.descriptors[rows])
            out.append((rows, single.tree_probabilities(x)))
    grown = out_of_fold(folds, per_fold)
    weight, scores = blend_weight(labels[folds.rows], networks, grown, TASKS)
    assert weight == final.tree_weight
    assert scores[weight] == pytest.approx(final.extra["oof_roc_auc_blend"], abs=1e-9)
    assert scores[1.0] == pytest.approx(final.extra["oof_roc_auc_trees"], abs=1e-9)
    for (valid_rows, valid), (train_rows, train) in zip(per_fold, seen, strict=True):
        held_out = evaluate(labels[valid_rows], valid, TASKS).roc_auc
        assert held_out < evaluate(labels[train_rows], train, TASKS).roc_auc
    # What the registered model answers out of fold is this blend, as calibration saw it.
    blended = out_of_fold_probabilities(final, data, folds)
    np.testing.assert_allclose(blended, blend(networks, grown, weight), atol=1e-6)


def test_a_restored_fold_trial_reports_no_epoch_twice(
    tmp_path: Path, small_csv: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A k-fold trial restored from its epoch-2 checkpoint reports epoch 2 again (Tune restores
    it one iteration back), replays epochs 1-2 silently, and its epochs 3-4 are those of the
    uninterrupted run."""
    job = _fold_job(tmp_path, small_csv, search__max_epochs=4)
    data = prepare_data(job, progress=False)
    trial_data = TrialData(
        features=data.features,
        labels=data.labels,
        split=data.split,
        tasks=data.table.tasks,
        featurizer=job.featurizer,
        max_epochs=4,
        patience=0,
        seed=0,
        folds=data.folds,
    )
    model_config, train_config = to_run_configs(CONFIG, 4, 0, 0)
    monkeypatch.setattr(trainable, "cpu_threads", lambda: 1)

    def run(state: dict[str, Any] | None) -> list[tuple[dict[str, Any], str, dict[str, Any]]]:
        reports: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
        saved: list[dict[str, Any]] = []

        def report(
            epoch: dict[str, Any], reason: str, checkpoint_dir: str | None = None, **extra: Any
        ) -> None:
            reports.append((dict(epoch), reason, extra))
            if checkpoint_dir is not None:
                folder = Path(checkpoint_dir)
                saved.append(json.loads((folder / FOLDS_FILE).read_text()))
                assert len(load_checkpoint(folder / CHECKPOINT_FILE).model.members) == K

        monkeypatch.setattr(trainable, "restored_fold_state", lambda: state)
        best = {"roc_auc": float("-inf"), "epoch": 0}
        trainable._train_folds(trial_data, model_config, train_config, "cpu", report, best, "t1", 0)
        run.saved = saved  # type: ignore[attr-defined]
        return reports

    whole = run(None)
    assert [r[0]["epoch"] for r in whole] == [1, 2, 3, 4]
    at_two = run.saved[1]  # type: ignore[attr-defined]
    restored = run(at_two)
    assert [r[0]["epoch"] for r in restored] == [2, 3, 4]
    earlier = json.loads(restored[0][2][trainable.EARLIER_EPOCHS])
    assert [row["epoch"] for row in earlier] == [1]
    assert restored[0][0] == pytest.approx(whole[1][0], nan_ok=True)
    for again, first in zip(restored[1:], whole[2:], strict=True):
        again_row = {k: v for k, v in again[0].items() if k != "seconds"}
        first_row = {k: v for k, v in first[0].items() if k != "seconds"}
        assert again_row == pytest.approx(first_row, nan_ok=True)
    # A trial restored from its last epoch's checkpoint reports it and trains no more.
    last = run.saved[-1]  # type: ignore[attr-defined]
    assert last["reason"] == "max_epochs"
    assert [r[0]["epoch"] for r in run(last)] == [4]


def test_one_fold_is_the_plain_split(tmp_path: Path, small_csv: Path) -> None:
    """search.folds 1 (the default): no folds are made and trials get none."""
    job = tiny_job(tmp_path, small_csv)
    assert job.search.folds == 1
    data = prepare_data(job, progress=False)
    assert data.folds is None
    three = prepare_data(replace(job, search=replace(job.search, folds=K)), progress=False)
    assert three.folds is not None and three.folds.k == K
    np.testing.assert_array_equal(three.split.test, data.split.test)
