"""The registered model: the job's final checkpoint as a pyfunc model version, and its alias.

Contract: `register_best_model` logs the checkpoint under the job's run, registers it as a new
version of the named model, and moves the alias (`champion` by default) only when the versions'
validation scores are comparable (same data hash and split) and the new one is at least as good;
the returned `Registration.note` says what happened to the alias and why, in words a user reads.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tune.errors import TrackingError
from tune.tracking.backend import client_for, sqlite_path

ALIAS_METRIC_TAG = "val_roc_auc"


@dataclass(frozen=True)
class Registration:
    """A registered model version and what happened to the alias, in words a user reads."""

    name: str
    version: str
    alias: str
    alias_moved: bool
    note: str  # e.g. "@champion moved to version 3" or why it stayed


COMPARABLE_TAGS = ("data_hash", "split")  # scores are comparable only when these agree


def register_best_model(
    tracking_uri: str,
    parent_run_id: str,
    checkpoint_path: Path,
    model_name: str,
    alias: str = "champion",
    tags: dict[str, str] | None = None,
) -> Registration:
    """Log the checkpoint as a pyfunc model under the job run, register it, maybe move `alias`.

    `tags` become the version's tags (searcher, seed, split, data_hash, trial_id, ...). The
    alias moves to the new version when there is no holder, or when the holder was scored on the
    same data and split (`data_hash`, `split` tags) and the new version's `val_roc_auc` is at
    least the holder's (ties go to the newer model). A holder scored on other data or another
    split is never displaced: validation scores are not comparable across them, so the new
    version is registered without the alias, and the returned note says why.
    """
    from tune.serving import log_pyfunc_model

    client = client_for(tracking_uri)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    info = log_pyfunc_model(tracking_uri, parent_run_id, Path(checkpoint_path))
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # created concurrently
            client.create_registered_model(
                model_name, description="toxtune: multitask toxicity MLP from SMILES"
            )
    # MLflow's SQLite registry resolves a `models:/<id>` source through the *global* tracking
    # URI (a TODO in its sqlalchemy_store); give it the logged model's storage location instead.
    source = info.model_uri
    if sqlite_path(tracking_uri) is not None:
        source = client.get_logged_model(info.model_id).artifact_location
    version = client.create_model_version(
        model_name, source=source, run_id=parent_run_id, tags=tags, model_id=info.model_id
    )
    _wait_ready(client, model_name, version.version)
    moved, note = _alias_decision(client, model_name, alias, tags)
    if moved:
        client.set_registered_model_alias(model_name, alias, version.version)
        note = f"@{alias} moved to version {version.version}" + (f" ({note})" if note else "")
    client.set_model_version_tag(model_name, version.version, "toxtune.alias_note", note)
    return Registration(model_name, str(version.version), alias, moved, note)


def _alias_decision(
    client: MlflowClient, model_name: str, alias: str, tags: Mapping[str, str]
) -> tuple[bool, str]:
    """(move the alias?, why) for a new version with `tags` against the alias's holder."""
    try:
        holder = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return True, ""
    where = f"@{alias} stays on version {holder.version}"
    differs = [k for k in COMPARABLE_TAGS if holder.tags.get(k) != tags.get(k)]
    if differs:
        shown = ", ".join(
            f"{k} {holder.tags.get(k)!r} there, {tags.get(k)!r} here" for k in differs
        )
        return False, (
            f"{where}: it was scored on other data or another split ({shown}), so the two "
            "validation scores are not comparable; move it by hand if this model should serve"
        )
    holder_score, new_score = (
        _score(holder.tags.get(ALIAS_METRIC_TAG)),
        _score(tags.get(ALIAS_METRIC_TAG)),
    )
    if holder_score is None:
        return True, f"version {holder.version} had no validation score"
    if new_score is not None and new_score >= holder_score:
        return (
            True,
            f"val ROC-AUC {new_score:.4f} >= {holder_score:.4f} of version {holder.version}",
        )
    shown_new = "none" if new_score is None else f"{new_score:.4f}"
    return False, f"{where}: its val ROC-AUC {holder_score:.4f} beats this version's {shown_new}"


def _score(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.5)
    raise TrackingError(f"model {name} version {version} did not become READY in {timeout:.0f}s")
