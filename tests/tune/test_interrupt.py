"""SIGTERM takes the SIGINT path, so both stop a job unfinished and resumable (tune.interrupt).

The end-to-end Ctrl-C drill is in test_resume.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tune.interrupt import StopSignals, shut_down_ray


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


class _InterruptedError(Exception):
    """Raised by the test's SIGINT handler: a Ctrl-C that reached Python."""


def test_a_ctrl_c_while_ray_stops_after_a_finished_job_is_ignored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The user's Ctrl-C lands while Ray shuts down at the end of a job: nothing is raised (Ray's
    exit handler used to print a KeyboardInterrupt traceback there), Ray is stopped, and the
    SIGINT handler is put back for whatever comes after."""
    import ray

    stopped: list[bool] = []

    def shutdown() -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the Ctrl-C, delivered during the shutdown
        time.sleep(0.2)  # a handler would run before this ends
        stopped.append(True)

    def interrupted(signum: int, frame: object) -> None:
        raise _InterruptedError

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    signal.signal(signal.SIGINT, interrupted)
    shut_down_ray()
    assert stopped == [True]
    assert signal.getsignal(signal.SIGINT) is interrupted
    with pytest.raises(_InterruptedError):  # and Ctrl-C works again afterwards
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_a_stop_that_does_not_end_in_time_gives_up_and_one_that_does_not() -> None:
    """A stop that hangs (its local Ray stopped with it by a scheduler's cancel) hands over to
    `give_up` after its bound; one that got past Ray in time never does."""
    gave_up: list[signal.Signals] = []
    hung = StopSignals()
    hung.give_up_after(gave_up.append, 0.3)
    hung.note(signal.SIGTERM)  # the signal, as Ray Tune's handler sees it
    prompt = StopSignals()
    prompt.give_up_after(gave_up.append, 0.3)
    prompt.note(signal.SIGINT)
    prompt.stopped_in_time()
    time.sleep(1.0)
    assert gave_up == [signal.SIGTERM]


def test_a_stop_is_announced_at_once_and_only_once() -> None:
    """The command says it is stopping the moment the first signal arrives, long before its
    bound: Ray may end the driver at once (a scheduler's cancel stops its raylet too), and that
    line is then the log's word on the stop. A second signal says nothing more."""
    said: list[tuple[signal.Signals, float]] = []
    gave_up: list[signal.Signals] = []
    stops = StopSignals()
    stops.give_up_after(gave_up.append, 0.5, lambda sig: said.append((sig, time.monotonic())))
    sent = time.monotonic()
    stops.note(signal.SIGTERM)
    stops.note(signal.SIGINT)
    deadline = time.monotonic() + 5
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [sig for sig, _ in said] == [signal.SIGTERM] and said[0][1] - sent < 0.4, said
    assert gave_up == []  # not yet: the stop has its bound
    time.sleep(1.0)
    assert gave_up == [signal.SIGTERM] and len(said) == 1


def test_stop_signals_pickle_with_the_signal_and_without_the_watch() -> None:
    """Ray Tune pickles its callbacks with the experiment, and one holds `note`."""
    import pickle

    stops = StopSignals()
    stops.give_up_after(lambda sig: None, 60)
    stops.note(signal.SIGINT)
    copy = pickle.loads(pickle.dumps(stops))
    assert copy.signal == signal.SIGINT and copy._give_up is None
