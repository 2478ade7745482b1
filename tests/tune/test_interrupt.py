"""SIGTERM takes the SIGINT path, so both stop a job unfinished and resumable (tune.interrupt).

The end-to-end Ctrl-C drill is in test_resume.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tune.interrupt import StopSignals


@pytest.fixture(autouse=True)
def python_sigint() -> Iterator[None]:
    """Python's own SIGINT handler, as the `toxtune` command has it (a test runner's worker
    may have another)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_sigterm_arrives_as_an_interrupt_named_sigterm_and_the_handler_is_put_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stops = StopSignals()
    with pytest.raises(KeyboardInterrupt), stops.routing():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs before this ends
    assert stops.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_without_sigterm_the_stop_is_named_sigint() -> None:
    stops = StopSignals()
    with pytest.raises(KeyboardInterrupt), stops.routing():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert stops.signal == signal.SIGINT
