"""Prediction with and without the domain check, side by side, for one or more checkouts of
toxtune (issue 23: the check's cost as a ratio, which one run of scale.py measures only once).

    python benchmarks/predict_pair.py --tracking-uri sqlite:///<job>/results/mlflow.db \
        --with models:/m-<id> --without models:/m-<id> --queries queries.csv \
        [--code before=/path/to/old/checkout --code now=.] [--repeats 3]

`--with` and `--without` are the same model with and without its domain (`benchmarks/scale.py
--keep` logs both: its `model` and `no-domain` logged models). Every repeat runs `toxtune
predict` of the queries for each checkout (PYTHONPATH set to it) with, then without, the
domain, alternating so that the machine's drift falls on all alike; printed: each run's
seconds, and per checkout the ratio (without / with) of the mean and of the median times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_predict(code: Path, model: str, queries: Path, uri: str, out: Path) -> float:
    """Seconds `toxtune predict` of `queries` with `model` takes, run with the `code` checkout."""
    toxtune = Path(sys.executable).with_name("toxtune")
    command = [str(toxtune), "predict", "--model", model, str(queries), "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=str(code))
    out.unlink(missing_ok=True)  # the last run's: predict refuses to replace it unasked
    started = time.perf_counter()
    subprocess.run([*command, "--tracking-uri", uri], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--with", dest="with_domain", required=True, help="model with a domain")
    parser.add_argument("--without", required=True, help="the same model without it")
    parser.add_argument("--queries", required=True, type=Path, help="CSV with a smiles column")
    parser.add_argument("--code", action="append", help="name=checkout (default: now=.)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    codes = dict(c.split("=", 1) for c in (args.code or ["now=."]))
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for name, path in codes.items():
                for side, model in (("+domain", args.with_domain), ("-domain", args.without)):
                    out = Path(scratch) / f"{name}{side}.csv"
                    seconds = run_predict(
                        Path(path).resolve(), model, args.queries, args.tracking_uri, out
                    )
                    times.setdefault((name, side), []).append(seconds)
                    print(f"{repeat} {name} {side} {seconds:.2f} s", flush=True)
    for name in codes:
        with_d, without = times[(name, "+domain")], times[(name, "-domain")]
        mean = statistics.mean(without) / statistics.mean(with_d)
        median = statistics.median(without) / statistics.median(with_d)
        runs = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(with_d, without, strict=True))
        print(f"{name}: +domain/-domain {runs} s; ratio {mean:.3f}x (mean), {median:.3f}x (median)")


if __name__ == "__main__":
    main()
