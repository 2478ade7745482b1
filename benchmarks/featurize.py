"""Featurization speed on Tox21: cold Morgan bits, a cache hit, and RDKit descriptors.

python benchmarks/featurize.py --data ../shared/data/tox21.csv
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from toxmodel.data import load_table
from toxmodel.featurize import FeaturizerConfig, featurize, featurize_cached


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default="../shared/data/tox21.csv")
    args = parser.parse_args()
    table = load_table(args.data)
    smiles = table.smiles
    bits = FeaturizerConfig(radius=2, n_bits=2048)
    print(f"machine: {platform.platform()} | {os.cpu_count()} CPUs | {len(smiles)} SMILES")

    cold = timed(lambda: featurize(smiles, bits), repeats=3)
    single = timed(lambda: featurize(smiles, bits, n_jobs=1), repeats=3)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        first = timed(lambda: featurize_cached(smiles, bits, cache, table.content_hash))
        hit = timed(lambda: featurize_cached(smiles, bits, cache, table.content_hash), repeats=5)
    desc = timed(lambda: featurize(smiles, FeaturizerConfig(n_bits=2048, descriptors=True)))
    print(f"Morgan bits, cold (default n_jobs): {cold:.3f} s (target < 2 s)")
    print(f"Morgan bits, cold (one process):    {single:.3f} s")
    print(f"first cached call (featurize+write): {first:.3f} s")
    print(f"cache hit: {hit * 1000:.1f} ms; {cold / hit:.0f}x faster than cold (target >= 20x)")
    print(f"Morgan bits + RDKit 2D descriptors, cold: {desc:.3f} s")


if __name__ == "__main__":
    main()
