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
A stop that never ends (a signal sent to every process of the job stops the local Ray too, and
Ray Tune's cleanup waits on it) gives up after STOP_TIMEOUT_S the same way, in the `toxtune`
command, which owns its process (`give_up_after`; `run_job(stop_timeout_s=...)`); the same
watch says at once that the job is stopping and how to continue (its `announce`), since Ray may
end the driver before the stop itself gets to say it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType

# The `toxtune` command's bound on a stop (`StopSignals.give_up_after`): a stop that has not ended
# the job this long after its signal never will. A SIGTERM sent to every process of the job (a
# batch scheduler's cancel: Slurm, systemd) stops the local Ray's own processes too, and Ray
# Tune's cleanup then waits on them until the scheduler's SIGKILL (Slurm's default grace is
# 30 s). A Ctrl-C'd local job here stopped in 4-5 s (a scratch measurement, 2026-12-06).
STOP_TIMEOUT_S = 20.0


@dataclass
class StopSignals:
    """The stop signal a job received, if any; SIGTERM is re-raised as SIGINT."""

    received: signal.Signals | None = None
    _give_up: Callable[[signal.Signals], None] | None = field(default=None, repr=False)
    _announce: Callable[[signal.Signals], None] | None = field(default=None, repr=False)
    _after_s: float = field(default=STOP_TIMEOUT_S, repr=False)
    _watching: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __getstate__(self) -> dict[str, object]:
        """Ray Tune pickles its callbacks with the experiment (`note` is one's): the signal
        received is kept, the watch is this process's."""
        return {"received": self.received}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def give_up_after(
        self,
        give_up: Callable[[signal.Signals], None],
        after_s: float,
        announce: Callable[[signal.Signals], None] | None = None,
    ) -> None:
        """Once a stop signal arrives, call `announce(signal)` at once (say that the job is
        stopping, before Ray may end the process: see `tune.job._announce`), then
        `give_up(signal)` (which ends the process) unless `stopped_in_time()` is called within
        `after_s` seconds. Both run on a thread of their own, not in the signal handler."""
        with self._watching:
            self._give_up, self._after_s, self._announce = give_up, after_s, announce
        if self.received is not None:
            self._start_watch()

    def stopped_in_time(self) -> None:
        """The job's own stop (or its end) has got past Ray: no giving up."""
        with self._watching:
            self._give_up = None

    def _start_watch(self) -> None:
        if self._give_up is not None:
            threading.Thread(target=self._watch, name="toxtune-stop-watch", daemon=True).start()

    def _watch(self) -> None:
        if self._announce is not None:
            self._announce(self.signal)
        time.sleep(self._after_s)
        with self._watching:
            give_up, self._give_up = self._give_up, None
        if give_up is not None:
            give_up(self.signal)

    def route_sigterm(self) -> None:
        """(Re)install the SIGTERM handler: `ray.init` replaces it, so call it after that too.
        Signal handlers can only be set from the main thread; elsewhere this does nothing."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._first(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)

    def note(self, signum: int) -> None:
        """Remember a stop signal that someone else's handler (Ray Tune's) acts on."""
        self._first(signal.Signals(signum))

    def _first(self, signum: signal.Signals) -> None:
        if self.received is None:
            self.received = signum
            self._start_watch()

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
