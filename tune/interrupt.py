"""How a job stops on Ctrl-C or SIGTERM: as a killed driver would, never as a finished search.

Ray Tune catches the first SIGINT of a search itself: it stops the trials, saves the experiment
state and returns from `fit()` as though the search had ended, so the job used to finalize and
register an interrupted trial. `ray.init` installs a SIGTERM handler that raises SystemExit(15)
wherever the driver happens to be; Ray's core worker then aborts while the interpreter exits
(exit code 134, SIGABRT). toxtune routes SIGTERM into the SIGINT path, so both stop a job the same
way: the search notices the signal (`bridge.StopWitness` sees the one Tune catches) or trials that
did not end (`search.search`) and raises JobInterruptedError; a
signal outside the search arrives as KeyboardInterrupt, which `run_job` turns into
JobInterruptedError. Either way the MLflow job run ends KILLED, nothing is registered, the job stays
resumable and the CLI exits 128 + the signal's number with one line saying how to continue.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType


@dataclass
class StopSignals:
    """The stop signal a job received, if any; SIGTERM is re-raised as SIGINT."""

    received: signal.Signals | None = None

    def route_sigterm(self) -> None:
        """(Re)install the SIGTERM handler: `ray.init` replaces it, so call it after that too.
        Signal handlers can only be set from the main thread; elsewhere this does nothing."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.SIGTERM
        signal.raise_signal(signal.SIGINT)

    def note(self, signum: int) -> None:
        """Remember a stop signal that someone else's handler (Ray Tune's) acts on."""
        self.received = self.received or signal.Signals(signum)

    @property
    def stopped(self) -> bool:
        """Whether a stop signal arrived: a search that returns after one is not finished, even
        when every trial it had started ended (the stop came between two trials)."""
        return self.received is not None

    @property
    def signal(self) -> signal.Signals:
        """The signal that stopped the job (SIGINT unless SIGTERM came first)."""
        return self.received or signal.SIGINT

    @contextlib.contextmanager
    def routing(self) -> Iterator[StopSignals]:
        """SIGTERM routed while the block runs; the previous handler is put back after."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        self.route_sigterm()
        try:
            yield self
        finally:
            if main and previous is not None:
                signal.signal(signal.SIGTERM, previous)


def shut_down_ray() -> None:
    """Stop this process's Ray now, at the end of a finished job, with Ctrl-C ignored meanwhile.

    Otherwise Ray stops in its exit handler, and a Ctrl-C pressed while it stops its processes
    printed "Exception ignored in atexit callback ... KeyboardInterrupt" under a job that had
    registered its model and exited 0: the job was whole, the traceback said otherwise. Signal
    handlers can only be set from the main thread; elsewhere Ray is stopped as it is."""
    import ray

    if not ray.is_initialized():
        return
    if threading.current_thread() is not threading.main_thread():
        ray.shutdown()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.shutdown()
    finally:
        signal.signal(signal.SIGINT, previous)
