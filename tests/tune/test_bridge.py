"""Ray's and Optuna's private attributes: used in one module, checked against the installed
versions, and an upgrade that removes one fails here by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tune import bridge

TUNE = Path(__file__).resolve().parents[2] / "tune"
PRIVATE = re.compile(
    r"\._(ot_trials|completed_trials|ot_study|storage|trial_id|progress_metrics|node_ip_address"
    r"|resume_config|local_tuner|run_config)\b|\bmax_failures\s*=(?!=)"
)


def test_installed_ray_and_optuna_have_every_private_attribute_used() -> None:
    bridge.check()


def test_an_upgrade_that_drops_an_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Upgraded:  # an OptunaSearch that no longer keeps its trials in `_ot_trials`
        def __init__(self, **_: object) -> None:
            self._completed_trials: set[str] = set()
            self._ot_study = None

    monkeypatch.setattr(bridge, "OptunaSearch", Upgraded)
    with pytest.raises(RuntimeError, match=r"OptunaSearch\._ot_trials"):
        bridge.check()


def test_no_private_ray_or_optuna_access_outside_the_bridge() -> None:
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(TUNE.rglob("*.py"))
        if path.name != "bridge.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line) and "FailureConfig" not in line
    ]
    assert offenders == []
