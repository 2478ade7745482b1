"""The finalize stage without a search: calibration and domain fitted on validation, written
into the job's storage, and the test split scored once with the calibrated model."""

from __future__ import annotations

import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from ray import tune as ray_tune

from tests.tune.conftest import tiny_job
from toxmodel.checkpoint import Predictor, load_checkpoint
from toxmodel.domain import Domain, nearest_similarity
from toxmodel.metrics import brier_score, evaluate, expected_calibration_error
from toxmodel.model import Ensemble
from toxmodel.train import fit
from tune import finalize as finalize_module
from tune.config import JobConfig
from tune.finalize import FINAL_DIR, FinalModel, finalize, score_test
from tune.prepare import PreparedData, prepare_data
from tune.space import DEFAULT_POINT, to_run_configs
from tune.trainable import CHECKPOINT_FILE
from tune.trials import TrialRecord

TASKS = ["amine", "halogen", "ring"]
CONFIG = {**DEFAULT_POINT, "width_0": 32, "width_1": 16, "dropout": 0.1, "input_dropout": 0.0}


def _molecules() -> pd.DataFrame:
    """~1,400 distinct molecules whose labels follow substructure rules, with 15 % of them
    flipped so that no model is certain (and a 3-epoch one is far from calibrated)."""
    heads = ["C" * n for n in range(1, 7)] + ["c1ccccc1", "c1ccncc1", "C1CCCCC1", "CC(C)", "OC"]
    mids = ["", "C(=O)", "C=C", "C#C", "S", "O", "N(C)", "CC(O)", "c1ccc(cc1)", "C(F)(F)"]
    tails = ["O", "N", "Cl", "F", "C(=O)O", "C(=O)N", "Br", "C#N", "NC", "I", "OC", "SC", "C"]
    rng = np.random.default_rng(0)
    rows = []
    for h in heads:
        for m in mids:
            for t in tails:
                smi = h + m + t
                labels = ["N" in smi, any(x in smi for x in ("Cl", "Br", "I", "F")), "c1" in smi]
                flip = rng.random(3) < 0.15
                rows.append((smi, *(float(v != f) for v, f in zip(labels, flip, strict=True))))
    return pd.DataFrame(rows, columns=["smiles", *TASKS]).drop_duplicates("smiles")


def _job_and_best(root: Path) -> tuple[JobConfig, PreparedData, TrialRecord]:
    """A tiny ensemble job on `_molecules`, its data, and a 3-epoch fit as its best trial."""
    csv = root / "molecules.csv"
    _molecules().to_csv(csv, index=False)
    job = tiny_job(root, csv)
    job = replace(job, search=replace(job.search, ensemble=2, final_seeds=0))
    data = prepare_data(job, progress=False)
    model_config, train_config = to_run_configs(CONFIG, 3, 0, job.search.seed)
    best = fit(data.features, data.labels, data.split, TASKS, model_config, train_config)
    trial = root / "trial"
    best.save(trial / CHECKPOINT_FILE)
    record = TrialRecord(
        trial_id="t_00000",
        round=job.name,
        row={"val_roc_auc": best.best_valid.roc_auc},
        config=CONFIG,
        epochs=3,
        status="finished",
        finished_reason="max_epochs",
        checkpoint=ray_tune.Checkpoint.from_directory(str(trial)),
    )
    return job, data, record


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[FinalModel, PreparedData, Path]:
    root = tmp_path_factory.mktemp("finalize")
    job, data, record = _job_and_best(root)
    final = finalize(job, data, record, root / "scratch")
    return final, data, job.storage.local(job.name)


def test_the_registered_checkpoint_holds_calibration_and_domain(
    finished: tuple[FinalModel, PreparedData, Path],
) -> None:
    final, _, job_folder = finished
    assert final.checkpoint == job_folder / FINAL_DIR / CHECKPOINT_FILE
    blob = torch.load(final.checkpoint, weights_only=True)
    assert blob["domain"]["train_bits"].dtype == torch.uint8
    predictor = load_checkpoint(final.checkpoint)
    assert isinstance(predictor.model, Ensemble) and predictor.has_spread
    assert predictor.extra["trial_id"] == "t_00000" and predictor.extra["members"] == 2
    assert predictor.calibration is not None and predictor.domain is not None
    methods = predictor.calibration.methods()
    assert set(methods) == set(TASKS)
    assert set(methods.values()) - {"identity"}, methods  # the test below would be trivial
    assert final.calibration == predictor.calibration.notes()


def test_calibration_keeps_test_roc_auc_and_lowers_ece(
    finished: tuple[FinalModel, PreparedData, Path],
) -> None:
    final, data, _ = finished
    labels = data.labels[data.split.test]
    raw = final.test_probs_uncalibrated
    assert raw is not None and not np.array_equal(raw, final.test_probs)
    before = evaluate(labels, raw, TASKS)
    for task in TASKS:
        after = final.test.per_task[task]["roc_auc"]
        assert after == pytest.approx(before.per_task[task]["roc_auc"], abs=1e-12)
    scores = final.test_calibration
    assert scores["test_ece"] == expected_calibration_error(labels, final.test_probs)
    assert scores["test_ece_uncalibrated"] == expected_calibration_error(labels, raw)
    assert scores["test_brier_uncalibrated"] == brier_score(labels, raw)
    assert scores["test_ece"] < scores["test_ece_uncalibrated"]
    # What the registered model answers is what was scored.
    probs, metrics = score_test(load_checkpoint(final.checkpoint), data)
    np.testing.assert_array_equal(probs, final.test_probs)
    assert metrics.roc_auc == final.test.roc_auc


def test_domain_threshold_comes_from_validation_and_flags_test_molecules(
    finished: tuple[FinalModel, PreparedData, Path],
) -> None:
    final, data, _ = finished
    fp = data.features.fingerprint[:, :256] > 0
    valid_sims = nearest_similarity(fp[data.split.valid], fp[data.split.train])
    domain = final.test_domain
    assert domain["domain_threshold"] == pytest.approx(np.percentile(valid_sims, 10), abs=1e-12)
    test_sims = nearest_similarity(fp[data.split.test], fp[data.split.train])
    share = np.mean(test_sims >= domain["domain_threshold"])
    assert domain["test_in_domain"] == pytest.approx(share)
    predictor = load_checkpoint(final.checkpoint)
    train_smiles = data.table.smiles[int(data.features.valid_rows[data.split.train[0]])]
    out = predictor.predict([train_smiles, "[Xe]", "not a smiles"])
    assert out["nn_similarity"][0] == 1.0 and out["in_domain"][0] is np.True_
    assert out["in_domain"][1] is np.False_
    assert out["error"][2] != "" and out["in_domain"][2] is pd.NA
    assert np.isnan(out.loc[2, [f"{t}_std" for t in TASKS]].to_numpy(dtype=float)).all()


def test_the_fitted_model_is_let_go_before_the_registered_one_flags_the_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The domain's search structures are CSR copies of the training bits; the saved model,
    loaded to score the test split, builds its own. Both at once made the driver's memory peak
    of a whole job (issue 23), so the fitted domain returns without its own (fit_domain drops
    them: the model is saved next, not queried) and the fitted model is gone (freed by
    reference counting, no garbage collection needed) before the test split is predicted."""
    job, data, record = _job_and_best(tmp_path)
    fit_trust, predict_split = finalize_module.fit_trust, finalize_module.predict_split
    fitted: list[weakref.ref[Domain]] = []
    alive_at_test: list[bool] = []

    def trusted(predictor: Predictor, data: PreparedData) -> Predictor:
        out = fit_trust(predictor, data)
        assert out.domain is not None
        assert not {"_rows", "_exact", "_clusters"} & set(vars(out.domain))  # dropped
        fitted.append(weakref.ref(out.domain))
        return out

    def predicted(
        predictor: Predictor, data: PreparedData, rows: np.ndarray, calibrated: bool = False
    ) -> pd.DataFrame:
        if rows is data.split.test:
            alive_at_test.append(any(ref() is not None for ref in fitted))
        return predict_split(predictor, data, rows, calibrated)

    monkeypatch.setattr(finalize_module, "fit_trust", trusted)
    monkeypatch.setattr(finalize_module, "predict_split", predicted)
    finalize(job, data, record, tmp_path / "scratch")
    assert len(fitted) == 1 and alive_at_test == [False]


def test_a_split_predicted_in_chunks_equals_it_predicted_at_once(
    finished: tuple[FinalModel, PreparedData, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """finalize predicts a split PREDICT_CHUNK molecules at a time (memory at 10^6 molecules):
    the rows, their order, every column and its type are those of one call."""
    final, data, _ = finished
    predictor = load_checkpoint(final.checkpoint)
    rows = data.split.test
    whole = finalize_module.predict_split(predictor, data, rows)
    monkeypatch.setattr(finalize_module, "PREDICT_CHUNK", 37)
    assert len(rows) > 3 * 37
    chunked = finalize_module.predict_split(predictor, data, rows)
    pd.testing.assert_frame_equal(chunked, whole)
    assert chunked["smiles"].tolist() == [
        data.table.smiles[i] for i in data.features.valid_rows[rows]
    ]
