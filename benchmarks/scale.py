"""How a whole toxtune job's cost grows with the data (issue 23): every stage timed, with peak
memory, at N = 10^4, 10^5 and 10^6 synthetic molecules, and per stage the exponent k of
time ~ N^k.

    python benchmarks/scale.py [--sizes 10000 100000 1000000] [--quick] [--queries 100000]
        [--ensemble 2] [--data ../shared/data/tox21.csv] [--workdir /tmp] [--keep]

The data: `benchmarks/synthetic.py` builds one set of max(sizes) + queries molecules derived
from the source (Tox21) into a temp folder; size N trains on its first N rows (the sets nest)
and every size predicts the same `--queries` last rows, which no training set holds. Nothing is
written outside the temp folder (`--keep` leaves it).

Each size runs the stages of `tune.job.run_job` in its order, calling the project's own stage
functions so that each is timed apart (quick config; 2 trials x 2 epochs, 2 at once, on local
Ray with 2 CPUs; `search.ensemble` 2 so finalize retrains one member; embedded SQLite MLflow and
Optuna study in the temp folder):

  load+validate    `tune.prepare.load_job_table` + `claim_job` (read, check labels, hash)
  featurize cold   `toxmodel.featurize.featurize_cached` on an empty cache (the driver's pool)
  featurize cached the same call again (one read of the cache file)
  group+split      `tune.prepare.prepare_data` given those features (keys, duplicates, split,
                   invalid report): its own featurize_cached call is answered from memory
  ray start        `tune.search.init_ray` (a private local Ray)
  share            `tune.shared.share_matrices`: the matrices into Ray's object store, the
                   driver's own copy dropped (as run_job does; the stages after read the store's)
  search           `tune.search.search` (MLflow parent run opened first, as run_job does)
  finalize         `tune.finalize.finalize`, with its parts below it: retrain (the ensemble's
                   extra member), build_final (the model to register: fit_trust = validation
                   predictions, calibration and fit_domain, the applicability domain; then
                   save_final), predict_split (twice: the validation rows inside fit_trust,
                   then, as "predict_split (2)", the test rows the saved model flags)
  record           `tune.record.record` + `finish_job_run`, with its parts: log_job_summary,
                   explanations (the pictures), register (the MLflow model version)
  predict +domain  `toxtune predict` (a subprocess: the CLI as a user runs it, Python start-up
                   included) of the queries with the registered model
  predict -domain  the same with the same model saved without its domain, logged as a model
  toxtune data     `toxtune data --data <file>` (a subprocess, its feature cache empty)

Memory: a thread samples every 0.2 s the driver's RSS and that of all its descendants (the
featurize pool, Ray's processes and trial workers; a CLI subprocess counts as a descendant):
`driver` is the driver's peak RSS during the stage, `others` the peak of the descendants' RSS
summed (shared pages such as Ray's object store count once per process that maps them),
`largest` the peak RSS of one descendant (e.g. a trial worker), `start` the driver's RSS when
the stage or part began (its peak minus this is what it added). Parts are sampled on their own.
Also printed: the size of the feature matrix (uint8) at each N.

`--set FILE` uses a set written by `benchmarks/synthetic.py` (at least max(sizes) + queries
rows) instead of generating one, so a long run can be split: `--json OUT` saves each run's
rows, and `--combine A.json B.json` prints the summary over the sizes of several runs.

Exponents: per stage, least squares of log(time) on log(N) over the sizes that ran. Constant
costs (Ray start-up, Python start-up of a CLI, two epochs of tiny networks on small N) pull k
below the stage's true asymptote at small N; the 10^5 -> 10^6 slope is printed beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import DEFAULT_DATA, TASKS, SyntheticSet, generate  # benchmarks/synthetic.py

ROOT = Path(__file__).resolve().parents[1]
QUICK_CONFIG = ROOT / "configs" / "quick.yaml"
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
QUICK_SIZES = (2_000, 6_000)
SAMPLE_S = 0.2
GB = 2**30


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Peak:
    """Peak RSS seen by a `MemorySampler` (bytes)."""

    driver: int = 0
    others: int = 0  # descendants' RSS summed
    largest: int = 0  # one descendant's
    start: int = 0  # the driver's RSS when sampling began


class MemorySampler:
    """Samples the driver's and its descendants' RSS in a thread until stopped."""

    def __init__(self, interval_s: float = SAMPLE_S) -> None:
        self.interval_s = interval_s
        self.peak = Peak()
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self.sample()
        self.peak.start = self.peak.driver
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        driver = self._me.memory_info().rss
        sizes = []
        for child in self._me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                sizes.append(child.memory_info().rss)
        self.peak.driver = max(self.peak.driver, driver)
        self.peak.others = max(self.peak.others, sum(sizes))
        self.peak.largest = max(self.peak.largest, max(sizes, default=0))


@dataclass
class Row:
    """One stage at one size."""

    stage: str
    seconds: float
    peak: Peak | None = None
    note: str = ""


@dataclass
class SizeResult:
    n: int
    rows: list[Row] = field(default_factory=list)
    matrix_bytes: int = 0
    failed: str = ""  # the stage that raised, and why

    def seconds(self, stage: str) -> float | None:
        found = [r.seconds for r in self.rows if r.stage == stage]
        return found[0] if found else None


@contextlib.contextmanager
def stage(result: SizeResult, name: str, note: str = "") -> Iterator[Row]:
    """Time and sample memory of one stage; the row is printed as soon as it ends."""
    row = Row(name, math.nan, note=note)
    with MemorySampler() as sampler:
        started = time.perf_counter()
        try:
            yield row
        finally:
            row.seconds = time.perf_counter() - started
    row.peak = sampler.peak
    result.rows.append(row)
    print(format_row(row), flush=True)


@contextlib.contextmanager
def timed_parts(result: SizeResult, targets: Sequence[tuple[Any, str, str]]) -> Iterator[None]:
    """Time every call of `module.attr` (a function a stage calls by that name) as a part row
    `label`; the originals are put back afterwards."""
    saved = []
    for module, attr, label in targets:
        original = getattr(module, attr)
        saved.append((module, attr, original))
        setattr(module, attr, _timing(original, result, label))
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def _timing(fn: Callable[..., Any], result: SizeResult, label: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        sampler = MemorySampler()
        started = time.perf_counter()
        try:
            with sampler:
                return fn(*args, **kwargs)
        finally:
            # a part called again in one stage (predict_split) gets its own row: "label (2)"
            calls = sum(r.stage == label or r.stage.startswith(f"{label} (") for r in result.rows)
            name = label if calls == 0 else f"{label} ({calls + 1})"
            row = Row(name, time.perf_counter() - started, sampler.peak)
            result.rows.append(row)
            print(format_row(row), flush=True)

    return timed


def fit_exponent(sizes: Sequence[float], seconds: Sequence[float]) -> float:
    """k of seconds ~ c * N^k, least squares on log-log over the finite, positive points (NaN
    with fewer than two distinct sizes)."""
    n = np.asarray(sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    ok = np.isfinite(n) & np.isfinite(t) & (n > 0) & (t > 0)
    if len(np.unique(n[ok])) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(n[ok]), np.log(t[ok]), 1)
    return float(slope)


# ---------------------------------------------------------------------------------------------
# One size


def job_for(csv: Path, root: Path, n: int, ensemble: int) -> Any:
    """The quick config shrunk to 2 trials x 2 epochs, everything under `root`."""
    from tune.config import load_config, named

    job = load_config(
        str(QUICK_CONFIG),
        overrides={
            "data.source": str(csv),
            "data.cache_dir": str(root / "cache"),
            "search.num_samples": 2,
            "search.max_epochs": 2,
            "search.grace_period": 2,
            "search.max_concurrent": 2,
            "search.ensemble": ensemble,
            "ray.num_cpus": 2,
            "ray.storage_path": str(root / "results"),
            "tracking.run_name": f"scale-{n}",
            "tracking.experiment_name": "scale",
            "tracking.registered_model_name": f"scale-{n}",
        },
    )
    return named(job, exists=job.storage.exists)


def profile_size(n: int, csv: Path, queries: Path, root: Path, ensemble: int) -> SizeResult:
    """Every stage of one job on `csv` (n molecules), then predict and `toxtune data`."""
    import ray

    from toxmodel.featurize import featurize_cached
    from tune import finalize as finalize_mod
    from tune import prepare as prepare_mod
    from tune import record as record_mod
    from tune import study, tracking, trials
    from tune.config import dump_config
    from tune.flags import CONFIG_FILE
    from tune.job import refuse_finished
    from tune.search import Rounds, init_ray, search
    from tune.shared import share_matrices

    result = SizeResult(n)
    job = job_for(csv, root, n, ensemble)
    uri = job.tracking_uri
    print(f"\n== N = {n:,} ({csv.stat().st_size / 2**20:.0f} MiB CSV); load {_load()}", flush=True)
    print(
        f"{'stage':22s} {'seconds':>9s} {'driver GB':>9s} {'others GB':>9s} {'largest':>8s} "
        f"{'start GB':>8s}"
    )
    try:
        tracking.check_tracking(uri)
        tracking.check_artifact_home(uri, job.tracking.experiment_name)
        with stage(result, "load+validate"):
            table = prepare_mod.load_job_table(job)
            prepare_mod.claim_job(job, table)
            refuse_finished(job)
            study.check_job_stores(job, started=False)
        cache = Path(job.data.cache_dir)
        with stage(result, "featurize cold"):
            featurize_cached(table.smiles, job.featurizer, cache, table.content_hash)
        with stage(result, "featurize cached"):
            features = featurize_cached(table.smiles, job.featurizer, cache, table.content_hash)
        result.matrix_bytes = int(features.fingerprint.nbytes + features.descriptors.nbytes)
        with (
            _answer(prepare_mod, "featurize_cached", features),
            stage(result, "group+split"),
        ):
            data = prepare_mod.prepare_data(job, progress=False, table=table)
        job.storage.write_text(job.name, CONFIG_FILE, text=dump_config(job))
        with stage(result, "ray start"):
            init_ray(job)
        del features  # from here on, as in a job, the driver holds the store's copy alone
        with stage(result, "share"):
            data = share_matrices(data)
        parent = tracking.start_job_run(
            uri, job.tracking.experiment_name, job.name, job.to_dict(), resume=False
        )
        status = "FAILED"
        try:
            with stage(result, "search"):
                outcome = search(job, data, parent)
            best = trials.best(outcome.trials, job, outcome.seconds)
            parts = [
                (finalize_mod, "retrain", "  retrain"),
                (finalize_mod, "build_final", "  build_final"),
                (finalize_mod, "fit_trust", "    fit_trust"),
                (finalize_mod, "fit_domain", "      fit_domain"),
                (finalize_mod, "save_final", "    save_final"),
                (finalize_mod, "predict_split", "  predict_split"),
            ]
            with (
                tempfile.TemporaryDirectory(dir=root) as scratch,
                timed_parts(result, parts),
                stage(result, "finalize"),
            ):
                final = finalize_mod.finalize(job, data, best, Path(scratch))
            parts = [
                (tracking, "log_job_summary", "  log_job_summary"),
                (record_mod, "explain_confident_positives", "  explanations"),
                (tracking, "register_best_model", "  register"),
            ]
            with timed_parts(result, parts), stage(result, "record"):
                registration = record_mod.record(
                    job, data, trials.table(outcome.trials), final, parent, outcome.cluster
                )
                rounds = Rounds.load(job)
                rounds.registered = f"{registration.name}/{registration.version}"
                rounds.save(job)
                tracking.finish_job_run(uri, parent, "FINISHED")
                status = "FINISHED"
        finally:
            if status != "FINISHED":
                tracking.finish_job_run(uri, parent, status)
            ray.shutdown()
        del data, table
        model = f"models:/{registration.name}/{registration.version}"
        bare = _without_domain(final.checkpoint, uri, parent, root)
        for name, uri_of_model in (("predict +domain", model), ("predict -domain", bare)):
            out = root / f"predictions-{name[-6:]}.csv"
            with stage(result, name) as row:
                _toxtune(
                    ["predict", "--model", uri_of_model, str(queries), "--output", str(out)],
                    uri=uri,
                )
            row.note = _in_domain_note(out)
        with stage(result, "toxtune data"):
            _toxtune(["data", "--data", str(csv)], cache=root / "data-cache")
    except Exception as exc:  # report how far it got, then go on with the next size
        result.failed = f"{type(exc).__name__}: {exc}"[:500]
        print(f"!! N = {n:,} stopped: {result.failed}", flush=True)
    print(f"feature matrix {result.matrix_bytes / GB:.3f} GB; load {_load()}", flush=True)
    return result


@contextlib.contextmanager
def _answer(module: Any, attr: str, value: Any) -> Iterator[None]:
    """`module.attr(...)` returns `value` inside the block (features already computed)."""
    original = getattr(module, attr)
    setattr(module, attr, lambda *a, **k: value)
    try:
        yield
    finally:
        setattr(module, attr, original)


def _without_domain(checkpoint: Path, uri: str, run_id: str, root: Path) -> str:
    """The final model saved without its domain, logged as a model of the job run."""
    from toxmodel.checkpoint import load_checkpoint, save_predictor
    from tune.serving import log_pyfunc_model

    predictor = load_checkpoint(checkpoint)
    path = root / "no-domain" / checkpoint.name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_predictor(path, dataclasses.replace(predictor, domain=None), extra=dict(predictor.extra))
    return log_pyfunc_model(uri, run_id, path, name="no-domain").model_uri


def _toxtune(args: list[str], uri: str | None = None, cache: Path | None = None) -> None:
    """Run the `toxtune` CLI of this venv; CalledProcessError (with its stderr) when it fails."""
    command = [str(Path(sys.executable).with_name("toxtune")), *args]
    if uri:
        command += ["--tracking-uri", uri]
    env = dict(os.environ)
    if cache:
        env["TOXTUNE_CACHE_DIR"] = str(cache)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(args[:1])} exited {done.returncode}: {done.stderr[-800:]}")


def _in_domain_note(path: Path) -> str:
    import pandas as pd

    frame = pd.read_csv(path, usecols=["nn_similarity", "in_domain"])
    if frame["in_domain"].isna().all():
        return "no domain columns"
    return (
        f"in domain {frame['in_domain'].astype('boolean').mean():.1%}, "
        f"median nn_similarity {frame['nn_similarity'].median():.3f}"
    )


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------
# Tables


def format_row(row: Row) -> str:
    peak = row.peak
    mem = (
        f"{peak.driver / GB:9.2f} {peak.others / GB:9.2f} {peak.largest / GB:8.2f}"
        f" {peak.start / GB:8.2f}"
        if peak
        else f"{'':9s} {'':9s} {'':8s} {'':8s}"
    )
    note = f"  {row.note}" if row.note else ""
    return f"{row.stage:22s} {row.seconds:9.2f} {mem}{note}"


def summary(results: Sequence[SizeResult]) -> str:
    """Seconds per stage and size, with k over all sizes and over the last two."""
    sizes = [r.n for r in results]
    stages: list[str] = []
    for r in results:
        stages += [row.stage for row in r.rows if row.stage not in stages]
    head = f"{'stage':22s}" + "".join(f"{f'N={n:,}':>13s}" for n in sizes)
    lines = [head + f"{'k (all)':>9s}" + (f"{'k (last 2)':>11s}" if len(sizes) > 2 else "")]
    for name in stages:
        times = [r.seconds(name) for r in results]
        cells = "".join(f"{t:13.2f}" if t is not None else f"{'-':>13s}" for t in times)
        vals = [math.nan if t is None else t for t in times]
        k = fit_exponent(sizes, vals)
        line = f"{name:22s}{cells}{k:9.2f}"
        if len(sizes) > 2:
            line += f"{fit_exponent(sizes[-2:], vals[-2:]):11.2f}"
        lines.append(line)
    for r in results:
        if r.failed:
            lines.append(f"N={r.n:,} stopped: {r.failed}")
    peaks = [max((row.peak.driver for row in r.rows if row.peak), default=0) for r in results]
    lines.append(f"{'driver peak RSS (GB)':22s}" + "".join(f"{p / GB:13.2f}" for p in peaks))
    lines.append(
        f"{'feature matrix (GB)':22s}" + "".join(f"{r.matrix_bytes / GB:13.3f}" for r in results)
    )
    return "\n".join(lines)


def machine() -> str:
    import ray
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / GB:.0f} GiB, torch {torch.__version__}, "
        f"Ray {ray.__version__}, Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help=f"default {DEFAULT_SIZES}")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, 2,000 queries")
    parser.add_argument("--queries", type=int, help="molecules predicted (default 100,000)")
    parser.add_argument("--ensemble", type=int, default=2, help="search.ensemble (retrains)")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic set's seed")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="source of parent molecules")
    parser.add_argument("--set", dest="made", help="a synthetic CSV to use instead of generating")
    parser.add_argument("--workdir", help="where the temp folder goes (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="leave the temp folder")
    parser.add_argument("--json", help="write this run's rows here")
    parser.add_argument("--combine", nargs="+", help="print the summary of these --json files")
    args = parser.parse_args()
    if args.combine:
        results = sorted(
            (r for path in args.combine for r in load_results(Path(path))), key=lambda r: r.n
        )
        print(summary(results))
        return
    sizes = sorted(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    n_queries = args.queries or (2_000 if args.quick else 100_000)

    from tune import settings

    settings.configure_process()
    print(f"machine: {machine()}; load at start {_load()}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="toxtune-scale-", dir=args.workdir))
    try:
        made = (
            read_set(Path(args.made))
            if args.made
            else generate(max(sizes) + n_queries, args.seed, args.data)
        )
        if len(made.smiles) < max(sizes) + n_queries:
            raise SystemExit(f"{args.made} has {len(made.smiles)} rows: too few")
        print(
            f"synthetic set: {len(made.smiles):,} molecules ({made.seconds:.1f} s to "
            f"{'read' if args.made else 'generate'}; missing {np.isnan(made.labels).mean():.1%}, "
            f"positives {np.nanmean(made.labels):.1%})",
            flush=True,
        )
        queries = _write_queries(made.smiles[-n_queries:], tmp / "queries.csv")
        results = []
        for n in sizes:
            part = dataclasses.replace(
                made, smiles=made.smiles[:n], labels=made.labels[:n], clean=made.clean[:n]
            )
            csv = part.write_csv(tmp / f"synthetic-{n}.csv")
            root = tmp / f"n{n}"
            results.append(profile_size(n, csv, queries, root, args.ensemble))
            if not args.keep:  # kept: the job's store, model and predictions, to look at after
                shutil.rmtree(root, ignore_errors=True)
            if args.json:
                save_results(results, Path(args.json))
        print(f"\n== summary (seconds; {n_queries:,} queries predicted at every size)")
        print(summary(results))
        print(f"load at end {_load()}")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def read_set(path: Path) -> SyntheticSet:
    """A CSV written by `SyntheticSet.write_csv` (labels only: `clean` is not stored)."""
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_csv(
        path, dtype={t: "float32" for t in TASKS}, keep_default_na=False, na_values=[""]
    )
    labels = frame[list(TASKS)].to_numpy(dtype=np.float32)
    return SyntheticSet(
        frame["smiles"].tolist(),
        labels,
        np.zeros(labels.shape, bool),
        0,
        time.perf_counter() - started,
    )


def save_results(results: Sequence[SizeResult], path: Path) -> None:
    path.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))


def load_results(path: Path) -> list[SizeResult]:
    out = []
    for raw in json.loads(path.read_text()):
        rows = [
            Row(r["stage"], r["seconds"], Peak(**r["peak"]) if r["peak"] else None, r["note"])
            for r in raw["rows"]
        ]
        out.append(SizeResult(raw["n"], rows, raw["matrix_bytes"], raw["failed"]))
    return out


def _write_queries(smiles: Sequence[str], path: Path) -> Path:
    path.write_text("smiles\n" + "\n".join(smiles) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    main()
