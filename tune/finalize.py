"""Stage 3, finalize: from the best trial (chosen on validation) to the model that is registered.

Contract: `finalize(job, data, best)` retrains the winning configuration over other seeds when
asked (`search.final_seeds` for the test spread of single models, `search.ensemble` for an
averaged model), fits the per-task calibration and the applicability domain on the validation
split (`fit_trust`), writes that model to the job's storage (`FINAL_DIR`), then scores the test
split once, with the model that will be registered: ROC-AUC and the rest, ECE and Brier score
before and after calibration, and how the test molecules fall in and out of the domain. The
test split plays no part in any choice.

A k-fold job (`search.folds` > 1) registers the best trial's k fold models averaged, as its
checkpoint holds them (no retrain; each member keeps its own descriptor scaler), calibrated and
given a domain on the out-of-fold predictions instead of the validation split (`fit_fold_trust`).
With `search.trees` it first trains gradient-boosted trees on each fold (`fold_trees`) and blends
them in at the share that scores best out of fold; calibration and domain then see the blend.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
from ray import tune as ray_tune

from toxmodel.calibration import Calibration, fit_calibration
from toxmodel.checkpoint import IN_DOMAIN, SIMILARITY, Predictor, load_checkpoint, save_predictor
from toxmodel.cpus import available_cpus
from toxmodel.domain import VALID_SAMPLE, Domain, fit_domain, threshold_rows
from toxmodel.folds import Folds, out_of_fold
from toxmodel.fused import fit_many
from toxmodel.metrics import Metrics, brier_score, evaluate, expected_calibration_error
from toxmodel.model import MLP, Ensemble
from toxmodel.train import FitResult
from toxmodel.trees import TreeConfig, Trees, blend_weight, fit_trees
from tune import heap
from tune.config import JobConfig
from tune.prepare import PreparedData
from tune.serving import PREDICT_CHUNK
from tune.space import to_run_configs
from tune.trainable import CHECKPOINT_FILE
from tune.trials import TrialRecord

log = logging.getLogger(__name__)

FINAL_DIR = "final"  # under the job folder: the registered checkpoint (one network or ensemble)


@dataclass
class FinalModel:
    """The model to register, its provenance and its one test score."""

    trial_id: str
    params: dict[str, Any]  # the winning configuration (searcher-internal keys removed)
    valid: dict[str, float]  # validation scores of the best trial's checkpointed epoch
    checkpoint: Path
    test: Metrics  # of the calibrated probabilities (ROC-AUC is calibration's invariant)
    test_probs: np.ndarray  # (n_test, n_tasks) calibrated, as the registered model answers
    test_seeds: dict[str, float] = field(default_factory=dict)
    test_probs_uncalibrated: np.ndarray | None = None  # the same rows before calibration
    # test_ece, test_ece_uncalibrated, test_brier, test_brier_uncalibrated (pooled over tasks)
    test_calibration: dict[str, float] = field(default_factory=dict)
    # domain_threshold, test_in_domain (share of test molecules), test_roc_auc_in_domain and
    # test_roc_auc_out_of_domain (left out when that part has no task with both classes)
    test_domain: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, str] = field(default_factory=dict)  # task -> method and why
    # search.trees: tree_weight (the trees' share) and oof_roc_auc_networks / _trees / _blend
    blend: dict[str, float] = field(default_factory=dict)


def finalize(job: JobConfig, data: PreparedData, best: TrialRecord, workdir: Path) -> FinalModel:
    """Retrain seeds and ensemble members of `best`'s configuration, fit calibration and
    domain on validation, save the model to register, score the test split.

    `workdir` is a local scratch folder for checkpoints fetched from an object store.
    """
    if best.checkpoint is None:
        raise ValueError(f"trial {best.trial_id} left no checkpoint")
    s = job.search
    # Seed offsets: 0..final_seeds-1 for the spread, 1..ensemble-1 for the ensemble (offset 0 is
    # the best trial itself); each is trained once.
    spread = range(s.final_seeds) if s.final_seeds > 1 else range(0)
    retrained = retrain(job, data, best.config, sorted({*spread, *range(1, s.ensemble)}))
    seeds = seed_spread(data, [retrained[k] for k in spread]) if spread else {}
    others = [retrained[k] for k in range(1, s.ensemble)]
    del retrained
    heap.trim()  # each part starts where the last one began: see tune.heap
    # The model is built and saved in a function of its own, so that it is freed before the
    # saved one is loaded and builds its domain's search structures to flag the test split
    # (the fitted domain already dropped its own: fit_domain returns it without them).
    ckpt = build_final(job, data, best, others, workdir)
    heap.trim()
    final = load_checkpoint(ckpt)  # what is registered, as it will be read
    frame = predict_split(final, data, data.split.test)
    raw = frame[final.tasks].to_numpy(dtype=np.float64)
    probs = final.calibrate(raw)  # what final.predict(...) answers by default
    labels = data.labels[data.split.test]
    model = FinalModel(
        trial_id=best.trial_id,
        params={k: v for k, v in best.config.items() if not k.startswith("_")},
        valid={k: float(v) for k, v in best.row.items() if k.startswith("val_")},
        checkpoint=ckpt,
        test=evaluate(labels, probs, data.table.tasks),
        test_probs=probs,
        test_seeds=seeds,
        test_probs_uncalibrated=raw,
        test_calibration=calibration_scores(labels, raw, probs),
        test_domain=domain_scores(final, labels, probs, frame),
        calibration=final.calibration.notes() if final.calibration is not None else {},
        blend={k: float(v) for k, v in final.extra.items() if k in BLEND_KEYS},
    )
    del final, frame  # the registered model's domain search (0.15 GB at 10^6): not needed again
    heap.trim()
    return model


def build_final(
    job: JobConfig,
    data: PreparedData,
    best: TrialRecord,
    others: list[FitResult],
    workdir: Path,
) -> Path:
    """The model to register, saved (`save_final`): the best trial's network, averaged with
    the retrained `others` when the job asks for an ensemble, or its k fold models, calibrated
    and given a domain. Returns its local path; nothing of it stays in memory."""
    assert best.checkpoint is not None
    predictor = load_checkpoint(local_checkpoint(best.checkpoint, workdir / "best"))
    extra = dict(predictor.extra)
    if data.folds is not None:
        if job.search.trees:
            predictor, scores = fold_trees(predictor, data, data.folds, job.search.seed)
            extra.update(scores)
        predictor = fit_fold_trust(predictor, data, data.folds)
    else:
        if others:
            predictor = ensemble_of(predictor, others)
            extra = {}
        predictor = fit_trust(predictor, data)
    members = len(predictor.model.members) if isinstance(predictor.model, Ensemble) else 1
    extra.update(trial_id=best.trial_id, members=members, seed=job.search.seed)
    return save_final(job, predictor, extra, workdir)


def predict_split(
    predictor: Predictor, data: PreparedData, rows: np.ndarray, calibrated: bool = False
) -> pd.DataFrame:
    """`predictor.predict` of a split's rows from their SMILES, as a user of the model would
    (raw probabilities unless `calibrated`), `PREDICT_CHUNK` molecules at a time as `toxtune
    predict` reads a file (at 10^6 molecules a split's featurized rows at once were 0.1 GB on
    top of the driver's peak); a DataFrame aligned with `rows`."""
    smiles = [data.table.smiles[i] for i in data.features.valid_rows[rows]]
    if len(smiles) <= PREDICT_CHUNK:
        return predictor.predict(smiles, calibrated=calibrated)
    parts = [
        predictor.predict(smiles[start : start + PREDICT_CHUNK], calibrated=calibrated)
        for start in range(0, len(smiles), PREDICT_CHUNK)
    ]
    return pd.concat(parts, ignore_index=True)


def score_test(predictor: Predictor, data: PreparedData) -> tuple[np.ndarray, Metrics]:
    """Predict the untouched test split from SMILES, as a user of the model would (calibrated
    when the model holds a calibration)."""
    test_rows = data.split.test
    frame = predict_split(predictor, data, test_rows, calibrated=True)
    probs = frame[predictor.tasks].to_numpy(dtype=np.float64)
    return probs, evaluate(data.labels[test_rows], probs, data.table.tasks)


def fit_trust(predictor: Predictor, data: PreparedData) -> Predictor:
    """`predictor` with a calibration fitted on its raw validation probabilities and the
    applicability domain of the training rows (threshold chosen on validation)."""
    valid = data.split.valid
    frame = predict_split(predictor, data, valid)
    raw = frame[predictor.tasks].to_numpy(dtype=np.float64)
    calibration = fit_calibration(data.labels[valid], raw, predictor.tasks)
    del frame
    heap.trim()  # the predictions' freed working set, before the domain adds its own
    fingerprint = data.features.fingerprint
    # The training rows are read in place, never copied out; of the validation rows only those
    # the threshold is chosen on (`fit_domain` would draw the same sample from all of them).
    sampled = valid[threshold_rows(len(valid), VALID_SAMPLE)]
    domain = fit_domain(
        fingerprint, fingerprint[sampled], predictor.featurizer.n_bits, train_rows=data.split.train
    )
    heap.trim()  # what the domain's fit freed, before the model is saved
    return _trusted(
        predictor, calibration, domain, "training", "validation molecules' similarity to train"
    )


def fit_fold_trust(predictor: Predictor, data: PreparedData, folds: Folds) -> Predictor:
    """A fold ensemble (`predictor`: the k fold models of a trial, fold i's the i-th member)
    with a calibration fitted on its out-of-fold predictions and the domain of every non-test
    row, its threshold chosen on out-of-fold similarities.

    Calibration: every non-test row predicted once, by the fold model that did not train on it
    (`out_of_fold`): k times the rows today's validation split gives, none seen by the model
    that predicts it. The registered ensemble averages the k models, so its probabilities are
    somewhat smoother than one fold model's; the calibration maps what one unseen-data model
    says, the usual approximation (Chemprop and scikit-learn's CalibratedClassifierCV with
    ensemble=False alike).

    Domain: its reference set is every non-test row (each one trained k - 1 of the k members).
    The threshold is the percentile of out-of-fold similarities: each fold's validation rows
    against that fold's own training rows, pooled. The alternative, the whole training set with
    the OOF rows as validation, is not meaningful: every such row is in the reference set, so
    its nearest neighbour is itself (similarity 1) and the threshold would flag nearly every new
    molecule as out of domain. The pooled OOF similarities measure what the threshold must: how
    near a molecule no model saw lies to the rows the models learnt from (to a (k - 1)/k share
    of them, slightly more conservative than to all of them).
    """
    raw = out_of_fold_probabilities(predictor, data, folds)
    calibration = fit_calibration(data.labels[folds.rows], raw, predictor.tasks)
    domain = fold_domain(data, folds, predictor.featurizer.n_bits)
    return _trusted(
        predictor, calibration, domain, "non-test", f"out-of-fold similarities over {folds.k} folds"
    )


def _trusted(
    predictor: Predictor,
    calibration: Calibration,
    domain: Domain,
    reference: str,
    threshold_from: str,
) -> Predictor:
    """`predictor` with its calibration and domain, both logged: each task's calibration note,
    the domain's `reference` rows and the similarities its threshold was chosen on."""
    for task, note in calibration.notes().items():
        log.info("calibration of %s: %s", task, note)
    log.info(
        "applicability domain: %d distinct %s fingerprints, threshold %.3f (the %gth percentile "
        "of %d %s)",
        domain.n_train,
        reference,
        domain.threshold,
        domain.percentile,
        domain.n_valid,
        threshold_from,
    )
    return replace(predictor, calibration=calibration, domain=domain)


BLEND_KEYS = ("tree_weight", "oof_roc_auc_networks", "oof_roc_auc_trees", "oof_roc_auc_blend")


def fold_trees(
    predictor: Predictor, data: PreparedData, folds: Folds, seed: int
) -> tuple[Predictor, dict[str, float]]:
    """The fold ensemble with gradient-boosted trees trained on each fold (fold i's trees on
    fold i's training rows, stopped early on its validation rows, reading the inputs fold i's
    network reads), blended in at the trees' share whose out-of-fold ROC-AUC is best
    (`toxmodel.trees.blend_weight`; share 0 registers the networks alone). Returns it and the
    scores the choice read (`BLEND_KEYS`)."""
    networks = out_of_fold_probabilities(predictor, data, folds)
    trees, grown = grow_fold_trees(predictor, data, folds, seed)
    weight, scores = blend_weight(data.labels[folds.rows], networks, grown, list(predictor.tasks))
    out = {
        "tree_weight": weight,
        "oof_roc_auc_networks": scores[0.0],
        "oof_roc_auc_trees": scores[1.0],
        "oof_roc_auc_blend": scores[weight],
    }
    log.info(
        "trees: share %.2f of the blend (out-of-fold ROC-AUC: networks %.4f, trees %.4f, "
        "blend %.4f; shares tried %s)",
        weight, scores[0.0], scores[1.0], scores[weight],
        ", ".join(f"{w:g}: {v:.4f}" for w, v in scores.items()),
    )  # fmt: skip
    if weight == 0.0:
        return predictor, out
    return replace(predictor, trees=trees, tree_weight=weight), out


def grow_fold_trees(
    predictor: Predictor,
    data: PreparedData,
    folds: Folds,
    seed: int,
    config: TreeConfig | None = None,
) -> tuple[list[Trees], np.ndarray]:
    """Each fold's trees (fold i's on its training rows, stopped on its validation rows, reading
    the inputs fold i's network reads; seed + i) and their out-of-fold probabilities, aligned
    with `folds.rows`."""
    features, labels, tasks = data.features, data.labels, list(predictor.tasks)
    trees, per_fold = [], []
    for i, (single, split) in enumerate(zip(fold_members(predictor), folds.splits, strict=True)):
        train = single.inputs(features.fingerprint[split.train], features.descriptors[split.train])
        valid = single.inputs(features.fingerprint[split.valid], features.descriptors[split.valid])
        fitted = fit_trees(
            train[0], labels[split.train], valid[0], labels[split.valid], tasks,
            config=config or TreeConfig(), seed=seed + i, num_threads=available_cpus(),
        )  # fmt: skip
        del train
        trees.append(fitted)
        per_fold.append((split.valid, fitted.probabilities(valid[0])))
    return trees, out_of_fold(folds, per_fold)


def fold_members(predictor: Predictor) -> list[Predictor]:
    """Each member of a fold ensemble as a model of its own, with its own descriptor scaler."""
    if not isinstance(predictor.model, Ensemble):
        raise TypeError(f"a fold checkpoint holds {type(predictor.model).__name__}, not Ensemble")
    members = list(predictor.model.members)
    scalers = predictor.member_scalers or [predictor.scaler] * len(members)
    trees = predictor.trees or [None] * len(members)
    if len(trees) != len(members):
        raise ValueError(f"{len(trees)} tree sets for a fold ensemble of {len(members)} models")
    return [
        replace(
            predictor,
            model=m,
            model_config=m.config,
            scaler=scaler,
            member_scalers=None,
            calibration=None,
            domain=None,
            extra={},
            trees=None if tree is None else [tree],
        )
        for m, scaler, tree in zip(members, scalers, trees, strict=True)
    ]


def out_of_fold_probabilities(predictor: Predictor, data: PreparedData, folds: Folds) -> np.ndarray:
    """Raw probabilities of every non-test row (aligned with `folds.rows`) by the fold model
    that did not train on it, from the job's prepared features (the ones the folds trained on;
    the same answer as predicting the rows' SMILES, tests/tune/test_folds.py): the non-test
    rows are most of the data, and featurizing them again would cost a cold featurization."""
    singles = fold_members(predictor)
    if len(singles) != folds.k:
        raise ValueError(f"the checkpoint holds {len(singles)} models for {folds.k} folds")
    features = data.features
    predictions = [
        (
            split.valid,
            single.probabilities(
                features.fingerprint[split.valid], features.descriptors[split.valid]
            ).astype(np.float64),
        )
        for single, split in zip(singles, folds.splits, strict=True)
    ]
    return out_of_fold(folds, predictions)


def fold_domain(data: PreparedData, folds: Folds, n_bits: int) -> Domain:
    """The domain of every non-test row, its threshold the percentile of the out-of-fold
    similarities (each fold's validation rows to its own training rows; at most VALID_SAMPLE
    rows, drawn as `fit_domain` draws them). See `fit_fold_trust`."""
    fingerprint = data.features.fingerprint
    sampled = folds.rows[threshold_rows(folds.rows.size, VALID_SAMPLE)]
    similarities = []
    for split in folds.splits:
        rows = np.intersect1d(split.valid, sampled)
        own = fit_domain(
            fingerprint, fingerprint[:0], n_bits, search="exact", train_rows=split.train
        )
        similarities.append(own.similarity(fingerprint[rows], exact=True, certify=False))
    domain = fit_domain(fingerprint, fingerprint[:0], n_bits, train_rows=folds.rows)
    pooled = np.concatenate(similarities)
    domain.threshold = float(np.percentile(pooled, domain.percentile))
    domain.n_valid = int(pooled.size)
    return domain


def calibration_scores(labels: np.ndarray, raw: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """ECE and Brier score of the test probabilities before and after calibration."""
    return {
        "test_ece": expected_calibration_error(labels, probs),
        "test_ece_uncalibrated": expected_calibration_error(labels, raw),
        "test_brier": brier_score(labels, probs),
        "test_brier_uncalibrated": brier_score(labels, raw),
    }


def domain_scores(
    predictor: Predictor, labels: np.ndarray, probs: np.ndarray, frame: pd.DataFrame
) -> dict[str, float]:
    """The domain threshold, the share of test molecules inside it, and test ROC-AUC inside
    and outside (does the flag mean anything?); empty for a model without a domain."""
    if predictor.domain is None or len(frame) == 0:
        return {}
    inside = frame[IN_DOMAIN].to_numpy(dtype=bool, na_value=False)
    out = {
        "domain_threshold": float(predictor.domain.threshold),
        "test_in_domain": float(inside.mean()),
        "test_nn_similarity_median": float(np.nanmedian(frame[SIMILARITY])),
    }
    for name, part in (("in_domain", inside), ("out_of_domain", ~inside)):
        if part.any():
            score = evaluate(labels[part], probs[part], predictor.tasks).roc_auc
            if math.isfinite(score):
                out[f"test_roc_auc_{name}"] = float(score)
    return out


def retrain(
    job: JobConfig, data: PreparedData, config: dict[str, Any], offsets: list[int]
) -> dict[int, FitResult]:
    """The configuration retrained with seed `search.seed + k` for each offset k, all members
    in one fused pass (`toxmodel.fused.fit_many`: on the CPU each equals its own `fit` bit for
    bit); in the driver, after the search."""
    if not offsets:
        return {}
    runs = [
        to_run_configs(config, job.search.max_epochs, job.search.patience, job.search.seed + k)
        for k in offsets
    ]
    results = fit_many(
        data.features,
        data.labels,
        data.split,
        data.table.tasks,
        runs[0][0],
        [train_config for _, train_config in runs],
    )
    for k, result in zip(offsets, results, strict=True):
        log.info(
            "retrained seed %d: val ROC-AUC %.4f", job.search.seed + k, result.best_valid.roc_auc
        )
    return dict(zip(offsets, results, strict=True))


def seed_spread(data: PreparedData, results: list[FitResult]) -> dict[str, float]:
    """Test mean and std of single models over seeds: how much of the search's winning margin
    is noise on a small test split."""
    scores: dict[str, list[float]] = {"roc_auc": [], "pr_auc": []}
    for result in results:
        _, metrics = score_test(result.predictor(), data)
        scores["roc_auc"].append(metrics.roc_auc)
        scores["pr_auc"].append(metrics.pr_auc)
    out = {"test_seeds": float(len(results))}
    for name, values in scores.items():
        out[f"test_{name}_mean"] = float(np.mean(values))
        out[f"test_{name}_std"] = float(np.std(values, ddof=1))
    return out


def local_checkpoint(checkpoint: ray_tune.Checkpoint, scratch: Path) -> Path:
    """The checkpoint's model file on this machine (fetched when it lives in an object store)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return Path(checkpoint.path) / CHECKPOINT_FILE
    return Path(checkpoint.to_directory(str(scratch))) / CHECKPOINT_FILE


def ensemble_of(best: Predictor, others: list[FitResult]) -> Predictor:
    """The best trial's model plus the retrained ones, averaged (its configuration won the
    search on validation; the members differ only by seed), in memory on the CPU."""
    if not isinstance(best.model, MLP):
        raise TypeError(f"the best trial's checkpoint holds {type(best.model).__name__}, not MLP")
    members = [best.model] + [r.model.cpu() for r in others]
    return replace(best, model=Ensemble(members).eval(), extra={})


def save_final(job: JobConfig, predictor: Predictor, extra: dict[str, Any], workdir: Path) -> Path:
    """Write the model to register into the job's storage (`<job>/FINAL_DIR/`), uploading it
    when the storage is an object store; returns a local path of it."""
    storage = job.storage
    parts = (job.name, FINAL_DIR, CHECKPOINT_FILE)
    target = storage.local(*parts) if storage.is_local else workdir.joinpath(*parts[1:])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(target, predictor, extra=extra)
    if not storage.is_local:
        storage.upload(target, *parts)
    return target
