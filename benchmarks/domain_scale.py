"""How the applicability domain's cost grows with the training set (issue 23): `fit_domain` and
the domain query for the brute-force search toxtune used before (`old`), the exact search
(`exact`: rows sorted by bit count, the Swamidass-Baldi bound, compiled popcount kernels; a
sparse product per tile before 2026-12-05 evening, and RESULTS' figures before that date are
the sparse product's) and the clustered search (`clustered`), side by side in one run, and how
far the clustered answer is from the exact one. `first-pass query`: the same clustered index
without its second pass (the queries below the threshold searching `n_probe_low` clusters in
each of `low_partitions` partitions); `4x2`: the clustered search of before (4 partitions x 2
probes, then the same second pass of 96 in the first 2 of them), fitted and queried beside
today's (2 partitions x 6 probes, then 128 in both).

Fits, before and now: `exact fit` = the exact search on every validation row (before);
`sampled fit` = the exact search on at most `VALID_SAMPLE` of them (now); `clustered fit (old
threshold)` = partitions, then the threshold by the clustered search on every validation row
(before); `clustered fit` = partitions, then the threshold of `sampled fit` (now). Queries:
`clustered` as before, `certified` = clustered, then the answers below the threshold re-checked
by the exact search (flags exact by construction).

    python benchmarks/domain_scale.py [--sizes 20000 200000 1000000] [--bits 1024]
        [--fingerprints ecfp-like|random | --set CSV] [--queries 10000] [--old-fit-max 200000]
        [--old-query-max 200000] [--exact-fit-max 200000] [--predict]
        [--data ../shared/data/tox21.csv]

For each size N the script builds its own fingerprints (seeded; nothing is read or written):
N training rows, N / 10 validation rows (the fit) and `--queries` query rows (the query), all
drawn alike, as a random split would. `ecfp-like` (default) imitates Morgan bits: bit
frequencies with a long tail (a few bits in most molecules), classes of related parents and
series of analogues (a parent with bits dropped and added); at N = 20,000 it gives 25 +- 10 on
bits of 1024 and a validation 10th percentile NN similarity near 0.37 (Tox21's 1024-bit ECFP4:
30 +- 16 bits, 0.34). `random` is independent bits at 4 % (the issue's first figures).
`--set CSV`: real molecules instead (a random draw of the file's valid rows, e.g.
`benchmarks/synthetic.py`'s set; their Morgan bits by the featurizer, cached in the temp folder).

Timed: `fit` = `fit_domain` (pack, deduplicate, index when clustered, validation NN
similarity, threshold); `query` = `Domain.similarity` of the query rows. `old` and the exact
fit are skipped above their `--*-max` sizes (the old fit at 10^6 rows is about 10^11 pairs).
Printed per method: seconds per size, and the exponent k of time ~ N^k fitted by least squares
on log-log over the sizes it ran at.

Agreement on the query rows with the exact answer (the exact search's similarity at the exact
threshold of every validation row; where the exact fit did not run, of the first
`--threshold-sample` validation rows, said so): the `in_domain` flags of each method with its
own threshold, the flags of the certified query against the exact search at the certified
domain's own threshold (1 by construction), the share of queries re-checked, and the
nn_similarity error (exact - answer, never negative).

`--predict`: at the largest size, `Predictor.predict` of `--queries` Tox21 SMILES (trust.py's
queries: every Tox21 SMILES, then with a methyl appended) by a predictor shaped like a Tox21
job's (5 networks 1024-512, random weights, isotonic calibration; featurizer with `--bits`
bits), with the clustered domain of that size, with the exact one (one run: minutes at 10^6)
and without a domain, alternately (best of `--repeats`), and with the clustered domain certified
(one run). The training fingerprints are the
synthetic ones, so these queries are far from all of them; the time, not the flags, is the
figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from toxmodel.domain import DOMAIN_PERCENTILE, Domain, fit_domain, morgan_bits, pack_bits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trust import DEFAULT_DATA, machine  # benchmarks/trust.py

SEED = 23


# ---------------------------------------------------------------------------------------------
# Fingerprints


def _sample_rows(sizes: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rows of about `sizes[i]` on bits drawn by `weight` (repeats fold into one bit)."""
    out = np.zeros((len(sizes), len(weight)), dtype=bool)
    rows = np.repeat(np.arange(len(sizes)), sizes)
    out[rows, rng.choice(len(weight), size=len(rows), p=weight)] = True
    return out


def ecfp_like(n: int, n_bits: int, seed: int) -> np.ndarray:
    """`n` Morgan-like rows: Zipf bit frequencies; classes (a core of about 54 bits, log-normal
    spread) hold families (the core with 30 % of its bits dropped, 6 bits added), families of
    heavy-tailed size hold the molecules (10 % to 50 % of the family's bits dropped, 8 added)."""
    rng = np.random.default_rng(seed)
    weight = 1.0 / np.arange(1, n_bits + 1)
    weight = rng.permutation(weight / weight.sum())
    n_families = max(1, n // 10)
    n_classes = max(1, n_families // 8)
    core_bits = np.clip(rng.lognormal(np.log(54), 0.6, n_classes).round(), 2, n_bits // 4)
    cores = _sample_rows(core_bits.astype(int), weight, rng)
    keep = rng.random((n_families, n_bits), dtype=np.float32) > 0.3
    families = cores[rng.integers(0, n_classes, n_families)] & keep
    families |= _sample_rows(rng.poisson(6, n_families), weight, rng)
    popularity = rng.pareto(1.5, n_families) + 1
    family = rng.choice(n_families, n, p=popularity / popularity.sum())
    drop = rng.uniform(0.1, 0.5, n_families)[family]
    out = np.empty((n, n_bits), dtype=bool)
    for start in range(0, n, 50_000):
        part = slice(start, min(n, start + 50_000))
        size = part.stop - start
        out[part] = families[family[part]] & (
            rng.random((size, n_bits), dtype=np.float32) >= drop[part, None]
        )
        out[part] |= _sample_rows(rng.poisson(8, size), weight, rng)
    return out


def random_bits(n: int, n_bits: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, n_bits), dtype=bool)
    for start in range(0, n, 50_000):
        stop = min(n, start + 50_000)
        out[start:stop] = rng.random((stop - start, n_bits), dtype=np.float32) < 0.04
    return out


def molecule_bits(path: Path, n: int, n_bits: int) -> np.ndarray:
    """Morgan bits (the featurizer's, `n_bits`) of `n` molecules of the CSV at `path` drawn at
    random (seeded) from its valid rows, in random order: a random split of real molecules."""
    import pandas as pd

    from toxmodel.featurize import FeaturizerConfig, featurize_cached, smiles_digest

    smiles = pd.read_csv(path, usecols=["smiles"])["smiles"].astype(str).tolist()
    config = FeaturizerConfig(n_bits=n_bits, maccs=False, descriptors=False)
    cache = Path(tempfile.gettempdir()) / "toxtune-domain-scale-cache"
    features = featurize_cached(smiles, config, cache, smiles_digest(smiles))
    if len(features) < n:
        raise SystemExit(f"{path} has {len(features):,} valid molecules, {n:,} needed")
    rows = np.random.default_rng(SEED).choice(len(features), size=n, replace=False)
    return morgan_bits(features.fingerprint[rows], n_bits)


# ---------------------------------------------------------------------------------------------
# The search toxtune used before (toxmodel/domain.py at commit 35a3974), for the `old` rows


def old_nearest(query: np.ndarray, ref: sp.csr_matrix, chunk_pairs: int = 4_000_000):
    """Brute force: a sparse x dense product per chunk of queries, float32 screening and the
    exact float64 ratio of the float32 maxima (as before)."""
    q = np.asarray(query, dtype=bool)
    out = np.full(len(q), np.nan)
    n_ref = ref.shape[0]
    ref_counts = np.asarray(ref.sum(axis=1), dtype=np.float32)
    step = max(1, chunk_pairs // n_ref)
    for start in range(0, len(q), step):
        block = q[start : start + step]
        dense = np.asfortranarray(block, dtype=np.float32)
        inter = np.asarray(ref @ dense.T, dtype=np.float32)
        union = ref_counts - inter
        union += block.sum(axis=1, dtype=np.float32)[None, :]
        ratio = np.zeros_like(inter)
        np.divide(inter, union, out=ratio, where=union > 0)
        rows, cols = np.nonzero(ratio == ratio.max(axis=0)[None, :])
        num, den = inter[rows, cols].astype(np.float64), union[rows, cols].astype(np.float64)
        exact = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        best = np.full(inter.shape[1], -np.inf)
        np.maximum.at(best, cols, exact)
        out[start : start + len(block)] = best
    return out


def old_reference(train: np.ndarray, n_bits: int) -> sp.csr_matrix:
    packed = np.unique(pack_bits(morgan_bits(train, n_bits)), axis=0)
    parts = [
        sp.csr_matrix(
            np.unpackbits(packed[i : i + 65_536], axis=1, count=n_bits, bitorder="little"),
            dtype=np.float32,
        )
        for i in range(0, len(packed), 65_536)
    ]
    return sp.vstack(parts, format="csr")


def old_fit(train: np.ndarray, valid: np.ndarray, n_bits: int) -> tuple[sp.csr_matrix, float]:
    ref = old_reference(train, n_bits)
    sims = old_nearest(morgan_bits(valid, n_bits), ref)
    return ref, float(np.percentile(sims, DOMAIN_PERCENTILE))


# ---------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def exponent(sizes: list[int], seconds: list[float]) -> float:
    """k of seconds ~ N^k, least squares on log-log (NaN under two points)."""
    if len(sizes) < 2:
        return math.nan
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def cell(seconds: float | None) -> str:
    return "not run" if seconds is None else f"{seconds:.2f} s"


def index_mb(domain: Domain) -> float:
    arrays = (domain.cluster_rows, domain.cluster_starts, domain.centres)
    return sum(a.nbytes for a in arrays if a is not None) / 1e6


def run_size(n: int, args: argparse.Namespace, times: dict, figures: list) -> dict[str, Any]:
    n_valid = n // 10
    if args.set:
        bits = molecule_bits(Path(args.set), n + n_valid + args.queries, args.bits)
    else:
        make = ecfp_like if args.fingerprints == "ecfp-like" else random_bits
        bits = make(n + n_valid + args.queries, args.bits, SEED + n)
    train, valid, query = bits[:n], bits[n : n + n_valid], bits[n + n_valid :]
    print(f"\nN = {n:,} training rows, {n_valid:,} validation, {len(query):,} queries", flush=True)
    row: dict[str, Any] = {"n": n}

    if n <= args.old_fit_max:
        seconds, (ref, _) = timed(lambda: old_fit(train, valid, args.bits))
        times["old fit"].append((n, seconds))
        row["old fit"] = seconds
    else:
        ref = old_reference(train, args.bits) if n <= args.old_query_max else None
    if ref is not None and n <= args.old_query_max:
        q = morgan_bits(query, args.bits)
        seconds, old_sims = timed(lambda: old_nearest(q, ref))
        times["old query"].append((n, seconds))
        row["old query"] = seconds
    ref = None  # free it before the next fits

    exact_threshold_note = "exact fit, all validation rows"
    if n <= args.exact_fit_max:  # before: the exact search on every validation row
        seconds, exact = timed(
            lambda: fit_domain(train, valid, args.bits, search="exact", valid_sample=None)
        )
        times["exact fit"].append((n, seconds))
        row["exact fit"] = seconds
        exact_threshold = exact.threshold
    else:
        exact = fit_domain(train, valid[:0], args.bits, search="exact")
        sample = valid[: args.threshold_sample]
        exact_threshold = float(np.percentile(exact.similarity(sample), DOMAIN_PERCENTILE))
        exact_threshold_note = f"exact on {len(sample):,} validation rows"
    # now: the exact search on at most VALID_SAMPLE validation rows
    seconds, sampled = timed(lambda: fit_domain(train, valid, args.bits, search="exact"))
    times["sampled fit"].append((n, seconds))
    row["sampled fit"] = seconds
    seconds, exact_sims = timed(lambda: exact.similarity(query))
    times["exact query"].append((n, seconds))
    row["exact query"] = seconds
    if "old query" in row:
        assert np.array_equal(old_sims, exact_sims), "exact search differs from brute force"

    seconds, clustered_old = timed(  # before: threshold by the clustered search, all rows
        lambda: fit_domain(
            train,
            valid,
            args.bits,
            search="clustered",
            valid_sample=None,
            threshold_search="domain",
        )
    )
    times["clustered fit (old threshold)"].append((n, seconds))
    row["clustered fit (old threshold)"] = seconds
    seconds, clustered = timed(lambda: fit_domain(train, valid, args.bits, search="clustered"))
    times["clustered fit"].append((n, seconds))
    row["clustered fit"] = seconds
    seconds, sims = timed(lambda: clustered.similarity(query))
    times["clustered query"].append((n, seconds))
    row["clustered query"] = seconds
    seconds, certified = timed(lambda: clustered.similarity(query, certify=True))
    times["certified query"].append((n, seconds))
    row["certified query"] = seconds
    clustered.n_probe_low, n_probe_low = 0, clustered.n_probe_low  # the same index, one pass
    seconds, first_sims = timed(lambda: clustered.similarity(query))
    clustered.n_probe_low = n_probe_low
    times["first-pass query"].append((n, seconds))
    row["first-pass query"] = seconds
    # before: 4 partitions x 2 probes, then 96 in the first 2 partitions
    seconds, before = timed(
        lambda: fit_domain(
            train,
            valid,
            args.bits,
            search="clustered",
            n_partitions=4,
            n_probe=2,
            n_probe_low=96,
            low_partitions=2,
        )
    )
    times["4x2 fit (before)"].append((n, seconds))
    row["4x2 fit (before)"] = seconds
    seconds, before_sims = timed(lambda: before.similarity(query))
    times["4x2 query (before)"].append((n, seconds))
    row["4x2 query (before)"] = seconds

    assert clustered.centres is not None
    truth = exact_sims >= exact_threshold  # the exact answer: exact search, exact threshold

    def agree(flags: np.ndarray) -> str:
        return f"{np.mean(flags == truth):.4f}"

    certified_flags = clustered.in_domain(certified)
    own = exact_sims >= clustered.threshold  # the exact search at the certified threshold
    error = exact_sims - sims
    cert_error = exact_sims - certified
    figures.append(
        {
            "n": n,
            "distinct": exact.n_train,
            "partitions x clusters": "x".join(map(str, clustered.centres.shape)),
            "threshold exact": f"{exact_threshold:.3f} ({exact_threshold_note})",
            "threshold sampled": f"{sampled.threshold:.3f} ({sampled.n_valid:,} rows)",
            "threshold clustered (old)": f"{clustered_old.threshold:.3f}",
            "in domain (exact)": f"{truth.mean():.3f}",
            "flags: clustered (old)": agree(clustered_old.in_domain(sims)),
            "flags: clustered, sampled threshold": agree(clustered.in_domain(sims)),
            "flags: first pass alone": agree(clustered.in_domain(first_sims)),
            "flags: 4x2 (before)": agree(before.in_domain(before_sims)),
            "second pass": f"{np.mean(first_sims < clustered.threshold):.3f}",
            "flags: certified": agree(clustered.in_domain(certified)),
            "flags: exact search, sampled threshold": agree(sampled.in_domain(exact_sims)),
            "certified = exact at its threshold": f"{np.mean(certified_flags == own):.4f}",
            "re-checked": f"{np.mean(sims < clustered.threshold):.3f}",
            "nn error mean / max (clustered)": f"{error.mean():.4f} / {error.max():.3f}",
            "nn error mean (4x2 before)": f"{(exact_sims - before_sims).mean():.4f}",
            "nn error mean / max (certified)": f"{cert_error.mean():.4f} / {cert_error.max():.3f}",
            "packed MB": f"{exact.train_packed.nbytes / 1e6:.1f}",
            "index MB": f"{index_mb(clustered):.1f}",
        }
    )
    for key, value in row.items():
        if key != "n":
            print(f"  {key:16s} {value:8.2f} s", flush=True)
    print("  " + "; ".join(f"{k} {v}" for k, v in figures[-1].items() if k != "n"), flush=True)
    row["domains"] = (exact, clustered)
    return row


def predict_figure(domains: tuple[Domain, Domain], args: argparse.Namespace) -> None:
    import pandas as pd
    from trust import build_predictor, queries

    from toxmodel.featurize import FeaturizerConfig, featurize

    exact, clustered = domains
    frame = pd.read_csv(args.data)
    tasks = [c for c in frame.columns if c != "smiles"]
    featurizer = FeaturizerConfig(n_bits=args.bits)
    feats = featurize(frame["smiles"].tolist(), featurizer)
    base = build_predictor(feats.fingerprint[:6000], feats.fingerprint[6000:], featurizer, tasks, 5)
    without = dataclasses.replace(base, domain=None)
    with_clustered = dataclasses.replace(base, domain=clustered)
    with_exact = dataclasses.replace(base, domain=exact)
    certified = dataclasses.replace(clustered, certify=True)
    with_certified = dataclasses.replace(base, domain=certified)
    smiles = queries(frame["smiles"].tolist(), args.queries)
    without.predict(smiles[:200])  # warm up: pool, RDKit, torch
    with_clustered.predict(smiles[:200])
    with_exact.predict(smiles[:200])
    best = {"without": math.inf, "clustered": math.inf}
    for _ in range(args.repeats):  # alternate, so load on the host hits both alike
        for name, predictor in (("without", without), ("clustered", with_clustered)):
            best[name] = min(best[name], timed(lambda p=predictor: p.predict(smiles))[0])
    exact_s = timed(lambda: with_exact.predict(smiles))[0]
    with_certified.predict(smiles[:200])
    certified_s = timed(lambda: with_certified.predict(smiles))[0]
    n = len(smiles)
    print(f"\npredict {n:,} Tox21 SMILES, domain of {clustered.n_train:,} training fingerprints:")
    print(
        f"  without the domain check:      {best['without']:7.2f} s  {n / best['without']:7.0f}/s"
    )
    for name, seconds in (
        ("clustered", best["clustered"]),
        ("exact (one run)", exact_s),
        ("certified (one run)", certified_s),
    ):
        ratio = best["without"] / seconds
        print(f"  with it, {name:16s}      {seconds:7.2f} s  {n / seconds:7.0f}/s  = {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument("--bits", type=int, default=1024)
    parser.add_argument("--fingerprints", choices=["ecfp-like", "random"], default="ecfp-like")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument(
        "--set",
        help="a CSV of molecules (a `smiles` column, e.g. benchmarks/synthetic.py's): their "
        "Morgan bits instead of --fingerprints (featurized once, cached in the temp folder)",
    )
    parser.add_argument("--old-fit-max", type=int, default=200_000)
    parser.add_argument("--old-query-max", type=int, default=200_000)
    parser.add_argument("--exact-fit-max", type=int, default=200_000)
    parser.add_argument("--threshold-sample", type=int, default=4000)
    parser.add_argument("--predict", action="store_true", help="predict figure, largest size")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="Tox21 CSV for --predict")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"load average at start: {os.getloadavg()[0]:.2f}; {args.set or args.fingerprints} bits of "
        f"{args.bits} bits, seed {SEED}"
    )
    methods = [
        "old fit",
        "exact fit",
        "sampled fit",
        "clustered fit (old threshold)",
        "clustered fit",
        "old query",
        "exact query",
        "clustered query",
        "certified query",
        "first-pass query",
        "4x2 fit (before)",
        "4x2 query (before)",
    ]
    times: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    figures: list[dict[str, Any]] = []
    rows = [run_size(n, args, times, figures) for n in args.sizes]

    print(f"\n| N train | {' | '.join(methods)} |")
    print("|---|" + "---|" * len(methods))
    for row in rows:
        print(f"| {row['n']:,} | " + " | ".join(cell(row.get(m)) for m in methods) + " |")
    fitted = [exponent(*zip(*times[m], strict=True)) if times[m] else math.nan for m in methods]
    print("| **k** (time ~ N^k) | " + " | ".join(f"{k:.2f}" for k in fitted) + " |")
    upper = [exponent(*zip(*times[m][-2:], strict=True)) if times[m] else math.nan for m in methods]
    print("| k, two largest sizes | " + " | ".join(f"{k:.2f}" for k in upper) + " |")
    print()
    keys = [k for k in figures[0] if k != "n"]
    print(f"| N train | {' | '.join(keys)} |")
    print("|---|" + "---|" * len(keys))
    for fig in figures:
        print(f"| {fig['n']:,} | " + " | ".join(str(fig[k]) for k in keys) + " |")
    if args.predict:
        predict_figure(rows[-1]["domains"], args)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
