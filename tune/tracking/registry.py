"""The registered model: the job's final checkpoint as a pyfunc model version, and its alias.

Contract: `register_best_model` logs the checkpoint under the job's run, registers it as a new
version of the named model, and moves the alias (`champion` by default) only when the versions'
validation scores are comparable (same `COMPARABLE_TAGS`: data, tasks, split, duplicates policy,
molecule key, validation rows) and the new one is strictly better; the returned
`Registration.note` says what happened to the alias and why, in words a user reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tune.errors import TrackingError
from tune.tracking.backend import client_for, sqlite_path

ALIAS_METRIC_TAG = "val_roc_auc"
ALIAS_ATTEMPTS = 5  # decisions about the alias before a registration gives up (`_move_alias`)
RACE_WINDOW_S = 120.0  # versions created this close may have decided about the alias together
SETTLE_S = 2.0  # how long a job that moved the alias waits before it looks again


@dataclass(frozen=True)
class Registration:
    """A registered model version and what happened to the alias, in words a user reads."""

    name: str
    version: str
    alias: str
    alias_moved: bool
    note: str  # e.g. "@champion moved to version 3" or why it stayed


# Two validation ROC-AUCs are comparable only when these version tags agree: they fix the
# validation rows (data content, split method:seed, split fractions, the duplicates policy and
# molecule key, which decide which rows are one molecule and so where each lands, and whether the
# score is on the validation split or a mean over a k-fold job's folds) and the tasks the score
# averages over. The featurizer is left out: it changes the model, not the validation
# set. A key missing on one side (a holder registered by an older toxtune) counts as different.
COMPARABLE_TAGS = (
    "data_hash",
    "tasks",
    "split",
    "split_fractions",
    "duplicates",
    "molecule_key",
    "validation",
)


def tasks_tag(tasks: Sequence[str]) -> str:
    """The `tasks` tag: `<count>:<sha256 prefix of the ordered names>`, e.g. `12:ab12cd34ef56`;
    short because an MLflow tag value is limited (~5000 characters) and ToxCast has 617 tasks."""
    digest = hashlib.sha256("\n".join(tasks).encode()).hexdigest()[:12]
    return f"{len(tasks)}:{digest}"


def register_best_model(
    tracking_uri: str,
    parent_run_id: str,
    checkpoint_path: Path,
    model_name: str,
    alias: str = "champion",
    tags: dict[str, str] | None = None,
) -> Registration:
    """Log the checkpoint as a pyfunc model under the job run, register it, maybe move `alias`.

    `tags` become the version's tags (searcher, seed, trial_id, val_roc_auc and the
    `COMPARABLE_TAGS`, ...). The alias moves to the new version when there is no holder, or when
    every `COMPARABLE_TAGS` key agrees with the holder's and the new `val_roc_auc` is strictly
    higher (a tie keeps the holder: nothing shows the new model is better). A holder scored on
    other data, tasks or split is never displaced, whatever the scores: they are not comparable,
    and a model with other tasks would change what `predict` on the alias returns. The new
    version is then registered without the alias, and the note names the keys that differ.
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
    moved, note = _move_alias(client, model_name, alias, version, tags)
    if moved:
        note = f"@{alias} moved to version {version.version}" + (f" ({note})" if note else "")
    client.set_model_version_tag(model_name, version.version, "toxtune.alias_note", note)
    return Registration(model_name, str(version.version), alias, moved, note)


def _move_alias(
    client: MlflowClient,
    model_name: str,
    alias: str,
    version: ModelVersion,
    tags: Mapping[str, str],
) -> tuple[bool, str]:
    """Move `alias` to `version` when it beats the holder (`_alias_decision`); (moved?, why).

    MLflow has no compare-and-set for an alias, and jobs of one model can finish together (two
    submitted at once, on a shared server). Two that both find no holder both insert the alias:
    one gets a unique-key error, and then decides again against the version that took it. One
    that moved the alias while another version was registered within RACE_WINDOW_S waits
    SETTLE_S and looks again: a job that decided against an older holder and moved the alias
    after this one did is caught, and the two versions are compared as usual. What is left
    is a job whose decision and move lie more than SETTLE_S apart.
    """
    error: MlflowException | None = None
    for _ in range(ALIAS_ATTEMPTS):
        moved, note = _alias_decision(client, model_name, alias, tags, version.version)
        if not moved:
            return False, note
        try:
            client.set_registered_model_alias(model_name, alias, version.version)
        except MlflowException as exc:  # another job's version took it first: decide again
            error = exc
            continue
        if not _registered_alongside(client, model_name, version):
            return True, note
        time.sleep(SETTLE_S)
        if _holder(client, model_name, alias) == str(version.version):
            return True, note
    raise TrackingError(
        f"@{alias} of model {model_name} kept changing while version {version.version} was "
        f"registered ({ALIAS_ATTEMPTS} attempts); set it by hand. Last error: {error}"
    )


def _holder(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version `alias` points to, None when it points nowhere."""
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def _registered_alongside(client: MlflowClient, model_name: str, version: ModelVersion) -> bool:
    """Whether another version of the model was created within RACE_WINDOW_S of `version`
    (its job may have decided about the alias at the same time)."""
    recent = client.search_model_versions(
        f"name = '{model_name}'", max_results=20, order_by=["creation_timestamp DESC"]
    )
    created = int(version.creation_timestamp or 0)
    return any(
        str(v.version) != str(version.version)
        and abs(int(v.creation_timestamp or 0) - created) <= RACE_WINDOW_S * 1000
        for v in recent
    )


def _alias_decision(
    client: MlflowClient, model_name: str, alias: str, tags: Mapping[str, str], own: str = ""
) -> tuple[bool, str]:
    """(move the alias?, why) for a new version with `tags` against the alias's holder;
    `own`: the new version's number (a holder that is already it stays)."""
    try:
        holder = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return True, ""
    if own and str(holder.version) == str(own):
        return True, ""
    where = f"@{alias} stays on version {holder.version}"
    differs = [k for k in COMPARABLE_TAGS if holder.tags.get(k) != tags.get(k)]
    if differs:
        present = [k for k in differs if k in holder.tags]
        lacking = [k for k in differs if k not in holder.tags]
        shown = [
            f"{k}: {_shown(k, holder.tags[k])} there, {_shown(k, tags.get(k))} here"
            for k in present
        ]
        if lacking:  # registered before toxtune recorded the key: not known to be comparable
            shown.append(
                f"version {holder.version}, from an older toxtune, has no {', '.join(lacking)} tag"
            )
        return False, (
            f"{where}: its validation score is not comparable with this version's "
            f"({'; '.join(shown)}); move it by hand if this model should serve"
        )
    holder_score, new_score = (
        _score(holder.tags.get(ALIAS_METRIC_TAG)),
        _score(tags.get(ALIAS_METRIC_TAG)),
    )
    if holder_score is None:
        return True, f"version {holder.version} had no validation score"
    # 4 decimals, or 6 (as the tags hold them) where 4 would show two different scores as one
    digits = 6 if new_score is not None and round(new_score, 4) == round(holder_score, 4) else 4
    held = f"{holder_score:.{digits}f}"
    if new_score is not None and new_score > holder_score:
        return True, f"val ROC-AUC {new_score:.{digits}f} > {held} of version {holder.version}"
    if new_score == holder_score:
        return (
            False,
            f"{where}: this version's val ROC-AUC ties its {held} (a tie does not move it)",
        )
    shown_new = "none" if new_score is None else f"{new_score:.{digits}f}"
    return False, f"{where}: its val ROC-AUC {held} beats this version's {shown_new}"


def _shown(key: str, value: str | None) -> str:
    """A tag value in a note: `12 tasks (ab12cd34ef56)` for `tasks`, quoted otherwise."""
    if value is None:
        return "none"
    count, _, digest = value.partition(":")
    if key == "tasks" and count.isdigit():
        return f"{count} tasks ({digest})"
    return repr(value)


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
