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
    r"|resume_config|local_tuner|run_config|sampler|latest_checkpoint_result)\b"
    r"|\bmax_failures\s*=(?!=)"
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


def _pid() -> int:
    import os

    return os.getpid()


RAY_PROCESSES = re.compile(r"^(ray::|raylet|gcs_server|python|toxtune)")


@pytest.mark.slow
def test_a_local_ray_listens_beyond_loopback_only_in_rays_own_servers(no_ray: None) -> None:
    """What README's Security section says of a job's local Ray: Ray 2.60 has no supported
    setting that keeps its gRPC servers (GCS, raylet, core workers, agents) on loopback, so
    they listen on every interface, behind Ray's token authentication; no dashboard runs; and
    nothing else in the job's process tree listens beyond 127.0.0.1."""
    import os

    import psutil
    import ray

    bridge.init_local_ray(1, None)
    ray.get(ray.remote(_pid).remote())  # a worker process, with its own server
    tree = {p.pid: p for p in psutil.Process().children(recursive=True)}
    tree[os.getpid()] = psutil.Process()
    listening = [
        (c.laddr.ip, c.laddr.port, tree[c.pid].name())
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    ]
    assert listening
    beyond = [s for s in listening if not s[0].startswith("127.") and s[0] != "::1"]
    assert all(RAY_PROCESSES.match(name) for _, _, name in beyond), beyond
    assert 8265 not in {port for _, port, _ in listening}  # no dashboard
    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"
