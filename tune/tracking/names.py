"""The names toxtune writes into MLflow: its tag keys, and metric/param keys MLflow accepts.

Contract: every run toxtune makes is found again by these tags (a job run by `JOB_TAG` and
`KIND_TAG`, a trial run by `TRIAL_TAG` under its `PARENT_TAG`); every metric or param key passes
through `safe_key`, so a task named `odd(task)` is logged, not refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

JOB_TAG, TRIAL_TAG, STATUS_TAG = "toxtune.job", "toxtune.trial_id", "toxtune.status"
KIND_TAG, PARENT_TAG = "toxtune.kind", "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's Description in the MLflow UI (markdown)
STOPPED_TAG = "toxtune.search_stopped"  # a job run: why its search ended before its trials

_KEY_BAD = re.compile(r"[^/\w.\- :]")


def safe_key(key: str) -> str:
    """A metric/param name MLflow accepts: odd characters become `_`, no empty segments."""
    key = _KEY_BAD.sub("_", str(key))
    key = "/".join(p if p not in ("", ".", "..") else "_" for p in key.split("/"))
    return key[:250]


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(value)[:6000]


def flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} with MLflow-safe keys and values."""
    out: dict[str, str] = {}
    _flatten("", config, out)
    return {safe_key(k): v for k, v in out.items()}


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON types (anything else as its str), for `log_dict`."""
    return json.loads(json.dumps(obj, default=str))
