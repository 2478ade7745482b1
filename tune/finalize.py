"""Stage 3, finalize: from the best trial (chosen on validation) to the model that is registered.

Contract: `finalize(job, data, best)` retrains the winning configuration over other seeds when
asked (`search.final_seeds` for the test spread of single models, `search.ensemble` for an
averaged model), then scores the test split once, with the model that will be registered. The
test split plays no part in any choice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
from ray import tune as ray_tune

from toxmodel.checkpoint import Predictor, load_checkpoint, save_ensemble
from toxmodel.fused import fit_many
from toxmodel.metrics import Metrics, evaluate
from toxmodel.train import FitResult
from tune.config import JobConfig
from tune.prepare import PreparedData
from tune.space import to_run_configs
from tune.trainable import CHECKPOINT_FILE
from tune.trials import TrialRecord

log = logging.getLogger(__name__)

ENSEMBLE_DIR = "ensemble"  # under the job folder: the registered ensemble checkpoint


@dataclass
class FinalModel:
    """The model to register, its provenance and its one test score."""

    trial_id: str
    params: dict[str, Any]  # the winning configuration (searcher-internal keys removed)
    valid: dict[str, float]  # validation scores of the best trial's checkpointed epoch
    checkpoint: Path
    test: Metrics
    test_probs: np.ndarray  # (n_test, n_tasks), for the ROC plot
    test_seeds: dict[str, float] = field(default_factory=dict)


def finalize(job: JobConfig, data: PreparedData, best: TrialRecord, workdir: Path) -> FinalModel:
    """Retrain seeds and ensemble members of `best`'s configuration; score the test split.

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
    ckpt = local_checkpoint(best.checkpoint, workdir / "best")
    if s.ensemble > 1:
        members = [retrained[k] for k in range(1, s.ensemble)]
        ckpt = save_ensemble_of(job, load_checkpoint(ckpt), members, best.trial_id, workdir)
    probs, test = score_test(load_checkpoint(ckpt), data)
    return FinalModel(
        trial_id=best.trial_id,
        params={k: v for k, v in best.config.items() if not k.startswith("_")},
        valid={k: float(v) for k, v in best.row.items() if k.startswith("val_")},
        checkpoint=ckpt,
        test=test,
        test_probs=probs,
        test_seeds=seeds,
    )


def score_test(predictor: Predictor, data: PreparedData) -> tuple[np.ndarray, Metrics]:
    """Predict the untouched test split from SMILES, as a user of the model would."""
    test_rows = data.split.test
    smiles = [data.table.smiles[i] for i in data.features.valid_rows[test_rows]]
    probs = predictor.predict(smiles)[predictor.tasks].to_numpy(dtype=np.float32)
    return probs, evaluate(data.labels[test_rows], probs, data.table.tasks)


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


def save_ensemble_of(
    job: JobConfig, best: Predictor, others: list[FitResult], trial_id: str, workdir: Path
) -> Path:
    """The best trial's model plus the retrained ones, as one checkpoint (its configuration won
    the search on validation; the members differ only by seed), kept in the job's storage.
    Returns a local path of it."""
    members = [(best.model, best.model_config)] + [(r.model, r.model_config) for r in others]
    storage = job.storage
    parts = (job.name, ENSEMBLE_DIR, CHECKPOINT_FILE)
    target = storage.local(*parts) if storage.is_local else workdir.joinpath(*parts[1:])
    target.parent.mkdir(parents=True, exist_ok=True)
    save_ensemble(
        target,
        members,
        best.featurizer,
        best.tasks,
        best.n_inputs,
        best.scaler,
        extra={"trial_id": trial_id, "members": len(members), "seed": job.search.seed},
    )
    if not storage.is_local:
        storage.upload(target, *parts)
    return target
