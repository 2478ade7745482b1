"""What threads buy the applicability domain (issue 23 item 2): `fit_domain` and
`Domain.similarity` with 1 thread and with every CPU, side by side in one run, on the same
ECFP-like fingerprints, and a check that both give the same answer.

    python benchmarks/domain_threads.py [--sizes 200000 1000000] [--queries 10000]
        [--searches clustered exact] [--bits 1024]

For each size N: N training rows, N / 10 validation rows and `--queries` query rows drawn alike
from one seeded `domain_scale.ecfp_like` set (as a random split would). `exact` is skipped
above 200,000 training rows (its fit alone is minutes there). Printed per search and thread
count: the fit's seconds (partitions, when clustered, and the exact threshold on at most
4,000 validation rows) and the query's, and the speed-up of the threads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from toxmodel.domain import EXACT_MAX_TRAIN, fit_domain

sys.path.insert(0, str(Path(__file__).resolve().parent))
from domain_scale import ecfp_like  # benchmarks/domain_scale.py
from trust import machine  # benchmarks/trust.py


def run(n: int, queries: int, bits: int, search: str, threads: list[int]) -> None:
    rows = ecfp_like(n + n // 10 + queries, bits, seed=1)
    train, valid, query = rows[:n], rows[n : n + n // 10], rows[n + n // 10 :]
    seen: dict[int, tuple[float, float]] = {}
    answers = []
    for workers in threads:
        start = time.perf_counter()
        domain = fit_domain(train, valid, bits, search=search, workers=workers)
        fit = time.perf_counter() - start
        start = time.perf_counter()
        answers.append((domain.threshold, domain.similarity(query, workers=workers)))
        seen[workers] = (fit, time.perf_counter() - start)
        print(
            f"N={n:>9,} {search:>9} threads={workers}: fit {fit:7.1f} s  "
            f"query {seen[workers][1]:6.1f} s  threshold {domain.threshold:.4f}",
            flush=True,
        )
    same = all(t == answers[0][0] and np.array_equal(a, answers[0][1]) for t, a in answers)
    one, most = seen[threads[0]], seen[threads[-1]]
    print(
        f"N={n:>9,} {search:>9} {threads[-1]} threads against 1: fit {one[0] / most[0]:.2f}x  "
        f"query {one[1] / most[1]:.2f}x  same answers: {same}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--searches", nargs="+", default=["clustered", "exact"])
    parser.add_argument("--bits", type=int, default=1024)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(machine(), f"threads: 1 and {cpus}", flush=True)
    for n in args.sizes:
        for search in args.searches:
            if search == "exact" and n > EXACT_MAX_TRAIN:
                continue
            run(n, args.queries, args.bits, search, sorted({1, cpus}))


if __name__ == "__main__":
    main()
