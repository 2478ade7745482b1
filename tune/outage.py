"""A trial waits out a results store it cannot reach, instead of failing.

Each epoch's report uploads the trial's checkpoint to `ray.storage_path`. On an object store,
an outage (the store restarting, a network blip, a re-routed endpoint) makes that upload raise
pyarrow's OSError, which failed the trial as a code error: a 10-s outage cost every trial in
flight. `report_waiting` retries the report with backoff for up to STORE_PATIENCE_S while the
error says the store is unreachable; any other error is raised at once.

Retrying is safe: Ray persists the checkpoint before it records the result
(`ray.train._internal.session._TrainSession.report`, ray 2.60.0), so a failed upload recorded
nothing; the retry uploads to the next checkpoint folder, newer than any partial one the
outage left, which is what a restore picks (`tune.bridge.NewestCheckpoint`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STORE_PATIENCE_S = 120.0  # how long a trial waits for its results store to answer again
# What pyarrow's S3/GCS clients and the OS say when the store cannot be reached.
_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "Could not connect to server",
    "Couldn't connect to server",
    "Failed to connect",
    "Connection refused",
    "Connection reset",
    "Connection was reset",
    "Recv failure",
    "Send failure",
    "Empty reply from server",
    "timed out",
    "Temporary failure in name resolution",
    "ServiceUnavailable",
    "SlowDown",
)


def unreachable(exc: BaseException) -> bool:
    """Whether `exc` (an OSError from a storage call) says the store could not be reached."""
    text = str(exc)
    return isinstance(exc, OSError) and any(word in text for word in _UNREACHABLE)


def report_waiting(
    report: Callable[[], None],
    patience_s: float = STORE_PATIENCE_S,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Call `report()`; while it fails because the store is unreachable, wait (backoff from
    0.5 s to 8 s) and call it again, for up to `patience_s`; then the last error is raised."""
    deadline = time.monotonic() + patience_s
    delay = 0.5
    while True:
        try:
            report()
            return
        except OSError as exc:
            if not unreachable(exc) or time.monotonic() + delay > deadline:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log.warning("results store unreachable, retrying in %.1f s: %s", delay, first[:300])
            sleep(delay)
            delay = min(delay * 2, 8.0)
