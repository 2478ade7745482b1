"""The MLflow sender's replay after an outage: how its cost grows with what was queued.

    python benchmarks/replay.py --results 10000 40000 --trial-ops 500 2000

While a team's MLflow server is down the trial callback (`tune.tracking.callback`) queues every
epoch's metrics and every trial's start and end; when it is back, `flush` sends them in order,
one take at a time (`_take`: the results that may go now, one request per trial). This times
that drain with the requests themselves taken out (a sender that succeeds at once), so what is
left is the driver's own bookkeeping: `results` epochs of 64 trials in flight, with `trial-ops`
trial starts and ends among them (ASHA starts and stops trials all the time), and one job
operation at the end. It runs under the callback's lock, which the Tune loop also takes to queue
each new result, so a long take stalls the loop. Prints the drain's seconds, the takes, and the
longest take.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune.tracking.callback import MlflowTrialCallback, _Op


class Trial:
    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def queue_of(results: int, trial_ops: int, in_flight: int = 64) -> list[_Op]:
    """`results` epochs round-robin over `in_flight` trials, a trial start or end every
    results / trial_ops epochs (of the trial whose turn it is), the job's end last."""
    trials = [Trial(f"t{i}") for i in range(in_flight)]
    every = max(results // max(trial_ops, 1), 1)
    ops: list[_Op] = []
    for i in range(results):
        trial = trials[i % in_flight]
        ops.append(_Op(f"result {trial.trial_id}", trial=trial, step=i // in_flight + 1))
        if trial_ops and i % every == every - 1:
            ops.append(_Op(f"end {trial.trial_id}", lambda: None, trial.trial_id))
    ops.append(_Op("job", lambda: None))
    return ops


def drain(results: int, trial_ops: int) -> tuple[float, int, float]:
    """(seconds, takes, longest take's seconds) to send the queue once the server is back."""
    callback = MlflowTrialCallback("sqlite:///unused.db", "exp", "parent", max_epochs=10**6)
    callback._queue.extend(queue_of(results, trial_ops))
    takes, longest = 0, 0.0
    take = callback._take

    def timed() -> list[_Op]:
        nonlocal takes, longest
        t0 = time.perf_counter()
        ops = take()
        longest = max(longest, time.perf_counter() - t0)
        takes += 1
        return ops

    callback._take = timed  # type: ignore[method-assign]
    callback._send = lambda ops: []  # type: ignore[method-assign]
    t0 = time.perf_counter()
    assert callback.flush()
    return time.perf_counter() - t0, takes, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--trial-ops", type=int, nargs="+", default=[500, 2_000])
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, Python {platform.python_version()}")
    print(f"{'results':>8} {'trial ops':>9} {'drain s':>8} {'takes':>6} {'longest take ms':>16}")
    for n in args.results:
        for t in args.trial_ops:
            seconds, takes, longest = drain(n, t)
            print(f"{n:>8} {t:>9} {seconds:>8.2f} {takes:>6} {longest * 1000:>16.1f}", flush=True)


if __name__ == "__main__":
    main()
