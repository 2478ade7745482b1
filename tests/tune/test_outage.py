"""A trial's report waits out an unreachable results store and fails on anything else."""

from __future__ import annotations

import pytest

from tune.outage import report_waiting

# pyarrow's words when the S3 endpoint refuses connections (seen in the object-store drill).
REFUSED = (
    "When uploading part for key 'toxtune/job/checkpoint_000001/model.pt' in bucket 'b': AWS "
    "Error NETWORK_CONNECTION during UploadPart operation: curlCode: 7, Could not connect to "
    "server"
)


def test_a_report_is_retried_while_the_store_is_unreachable_and_sent_once_it_answers() -> None:
    calls, waits = [], []

    def report() -> None:
        calls.append(1)
        if len(calls) <= 3:
            raise OSError(REFUSED)

    report_waiting(report, patience_s=60, sleep=waits.append)
    assert len(calls) == 4  # three refused, the fourth sent: nothing lost, nothing doubled
    assert waits == [0.5, 1.0, 2.0]


def test_other_errors_and_a_store_gone_for_good_still_fail_the_trial() -> None:
    def broken() -> None:
        raise OSError("When uploading: AWS Error ACCESS_DENIED: Access Denied")

    waits: list[float] = []
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        report_waiting(broken, patience_s=60, sleep=waits.append)
    assert waits == []  # not an outage: raised at once

    def gone() -> None:
        raise OSError(REFUSED)

    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        report_waiting(gone, patience_s=0.0, sleep=waits.append)
