"""The driver's bookkeeping at scale: a big cluster's result stream, modelled on this machine.

    python benchmarks/driver.py                         # 8/32/64 in flight x 0.1/2 s epochs
    python benchmarks/driver.py --in-flight 64 --epoch-s 0.1 --stacks bare embedded
    python benchmarks/driver.py --in-flight 64 --epoch-s 0.1 --scheduler asha  # trials churn

Simulated trials (no training): each waits its epoch time, reports the metrics a Tox21 trial
reports (headline metrics, a ROC-AUC and PR-AUC per task for 12 tasks, its node and device) and,
every `--checkpoint-every` epochs, a small checkpoint (a 64 KiB file and the progress file
toxtune's restore reads). They run on a local Ray with `--num-cpus` logical CPUs (1 per trial),
side by side through:

- `bare`: Ray Tune alone, the same trials, no callbacks, Ray's defaults (snapshot period
  "auto", every checkpoint kept), results in a local folder;
- `bare-s3`: the same bare Tune with its results (snapshots and checkpoints) in the team
  stack's S3 bucket: what the object store costs Tune alone on this machine, so that the team
  stack's ratio to it is the cost of toxtune's bookkeeping rather than of the bucket;
- `embedded`: toxtune's real bookkeeping (`tune.search.build_tuner` and `driver_callbacks`: the
  Optuna study as searcher, the MLflow trial callback, retries, error budget, checkpoint
  re-pointing, toxtune's Tune settings) with a local results folder, MLflow and the study in
  SQLite;
- `team`: the same on a team's stack: results in an S3 bucket (moto's server, its own process),
  `mlflow server` on PostgreSQL with its artifacts in the bucket, the study in PostgreSQL.

`--scheduler fifo` (the default) runs `--in-flight` trials that outlast the run: the loop absorbs
results and asks for few new trials. `--scheduler asha` runs as many trials as the run's time
allows, `--in-flight` at a time, under ASHA (grace period `--grace`, reduction factor 3): most
stop at their grace period, so the loop also proposes a new trial every fraction of a second,
as a real search on a big cluster does. Bare Tune then samples with its own random search
(`BasicVariantGenerator`), reuses trial processes as toxtune does (`reuse_actors=True`) and
prints nothing (`verbose=0`: Tune's tables at each trial's start and end would cost its driver);
toxtune proposes with TPE through the study. Each simulated trial's scores carry a level of
its own (drawn from its trial id), so ASHA's rungs have something to rank.

Each run lasts `--run-s` seconds (Tune's time budget; the trials are longer). Measured over the
run's last third: results absorbed per second against the ideal (trials reporting / epoch
time), and how many trials were reporting by then (`reached`; starting 64 trial processes on 2
CPUs takes a minute, longer when the driver is busy); the driver process's CPU seconds per
1,000 results over the whole run; `trials` that reported and `new/s`, trials whose first result
fell in the window, a second (with ASHA `reached` is the mean number of trials live in the
window, and the ideal counts every slot); each trial's slowdown (wall time of its reported
epochs over their ideal time, median and max). For toxtune it then checks that nothing was
lost: every result Tune recorded is a step of the trial's MLflow run and an intermediate value
of its study trial. `mlflow`, `pg`, `s3`: CPU ms a result of the stack's servers (the MLflow
server's processes, PostgreSQL's, moto's), which share this machine's CPUs with the trials and
the driver and run on machines of their own in a team's cluster. GPUs fed: at 16 packed
trials per GPU and a Tox21 epoch of `--gpu-epoch-s` on a GPU, one GPU makes 16 / gpu_epoch_s
results a second, so one driver feeds (results/s it absorbs) / (16 / gpu_epoch_s) GPUs; by
CPU: 1 / (CPU s per result) / that rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toxmodel.sources import TOX21_TASKS

STACKS = ("bare", "bare-s3", "embedded", "team")
ASHA_SAMPLES = 100_000  # with ASHA: more trials than a run starts; Tune's time budget ends it
BUCKET = "toxtune-driver-bench"


def tox21_result(
    epoch: int, rng: np.random.Generator, best: float, epoch_s: float, level: float = 0.0
) -> tuple[dict[str, Any], float]:
    """A simulated Tox21 trial's epoch as toxtune's trainable reports it: headline metrics and
    a ROC-AUC and PR-AUC per task for the 12 tasks, rising with the epoch from the trial's own
    `level`; and the new best."""
    auc = 0.6 + level + 0.3 * (1 - 1 / epoch) + rng.normal(0, 0.01)
    best = max(best, auc)
    metrics = {
        "epoch": epoch,
        "train_loss": 0.3 / epoch,
        "val_loss": 0.35 / epoch,
        "val_roc_auc": auc,
        "val_pr_auc": auc / 3,
        **{f"val_roc_auc/{t}": auc + rng.normal(0, 0.02) for t in TOX21_TASKS},
        **{f"val_pr_auc/{t}": auc / 3 + rng.normal(0, 0.02) for t in TOX21_TASKS},
        "best_val_roc_auc": best,
        "best_epoch": epoch,
        "lr": 1e-3,
        "epoch_seconds": epoch_s,
    }
    return metrics, best


def simulated_trial(config: dict[str, Any]) -> None:
    """Wait an epoch, report a Tox21 trial's metrics; a small checkpoint every few epochs."""
    import logging

    from ray import tune as ray_tune

    # No INFO line per checkpoint on the console, in every stack (toxtune's trials quiet it in
    # `settings.configure_trial_process`, which `run_toxtune`'s trials call).
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    epoch_s, every = float(config["_epoch_s"]), int(config["_checkpoint_every"])
    trial_id = ray_tune.get_context().get_trial_id() or ""
    rng = np.random.default_rng(zlib.crc32(trial_id.encode()))
    level = float(rng.normal(0, 0.03))  # this trial's own quality, for ASHA to rank
    started = time.time()
    start = ray_tune.get_checkpoint()
    first = 1
    if start is not None:
        with start.as_directory() as folder:
            first = int(json.loads((Path(folder) / "progress.json").read_text())["epoch"]) + 1
    best = 0.0
    for epoch in range(first, int(config["_epochs"]) + 1):
        time.sleep(epoch_s)
        metrics, best = tox21_result(epoch, rng, best, epoch_s, level)
        metrics.update(
            {
                "finished_reason": "",
                "trial_started_at": started,
                "reported_at": time.time(),
                "device": "cuda:0",
                "gpu_ids": "0",
                "gpu_fraction": 1 / 16,
                "node_id": "simulated",
                "node_ip": "127.0.0.1",
                "pid": os.getpid(),
            }
        )
        if epoch % every:
            ray_tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.pt").write_bytes(rng.bytes(64 * 1024))
            (Path(tmp) / "progress.json").write_text(json.dumps({"epoch": epoch}))
            ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(tmp))


@dataclass
class Cell:
    stack: str
    in_flight: int
    epoch_s: float
    results: int = 0
    window_results: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0
    slowdown_median: float = float("nan")
    slowdown_max: float = float("nan")
    lost: str = ""  # "" (not checked), "none" or what is missing
    services_s: dict[str, float] = field(default_factory=dict)  # CPU s of the stack's servers
    wall_s: float = 0.0
    reached: int = 0  # trials reporting when the measuring window opened
    requests: int = 0  # log_batch requests the trial callback sent for trials (toxtune only)
    ramp_s: float = 0.0  # from the first trial's start to the last trial's first result
    scheduler: str = "fifo"  # fifo: trials outlast the run; asha: most stop at the grace period
    trials: int = 0  # trials that reported at least one result
    window_trials: int = 0  # trials that started reporting inside the measuring window

    @property
    def rate(self) -> float:
        return self.window_results / self.window_s if self.window_s > 0 else float("nan")

    @property
    def new_trials_rate(self) -> float:
        """New trials a second in the measuring window (their first results)."""
        return self.window_trials / self.window_s if self.window_s > 0 else float("nan")

    @property
    def ideal(self) -> float:
        """Results/s if every trial reached (with ASHA: every slot) ran at its epoch time, the
        driver costing nothing."""
        if self.scheduler == "asha":
            return self.in_flight / self.epoch_s
        return (self.reached or self.in_flight) / self.epoch_s

    @property
    def cpu_ms_per_result(self) -> float:
        return 1000 * self.cpu_s / self.results if self.results else float("nan")

    def service_ms_per_result(self, kind: str) -> float:
        """CPU ms a result of one kind of server (`mlflow`, `postgres`, `s3`)."""
        used = self.services_s.get(kind, float("nan"))
        return 1000 * used / self.results if self.results else float("nan")


class PeakMemory:
    """The machine's peak used memory while the benchmark runs (sampled each second)."""

    def __init__(self) -> None:
        self.peak = 0.0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            self.peak = max(self.peak, psutil.virtual_memory().used / 2**30)
            time.sleep(1.0)


class CpuSampler:
    """The driver process's CPU seconds (all its threads), sampled in a thread."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.start = self._cpu()

    def _cpu(self) -> float:
        t = self._proc.cpu_times()
        return t.user + t.system

    def used(self) -> float:
        return self._cpu() - self.start


SERVICES = ("mlflow", "postgres", "s3")


def service_of(proc: psutil.Process) -> str | None:
    """Which of the team stack's servers a process belongs to, if any."""
    try:
        if proc.name().startswith("postgres"):
            return "postgres"
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    if "moto_server" in line:
        return "s3"
    if "mlflow" in line and ("server" in line or "uvicorn" in line or "gunicorn" in line):
        return "mlflow"
    return None


class ServicesCpu:
    """CPU seconds the servers of the stack (MLflow server, PostgreSQL, moto's S3) use while a
    cell runs, by kind: on this machine they share the 2 CPUs with the trials and the driver,
    on a team's cluster they run elsewhere. Sampled each 0.5 s, per process (a process that
    starts and ends between two samples is missed: the servers' processes live long)."""

    def __init__(self) -> None:
        self._base: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _sample(self, first: bool = False) -> None:
        for proc in psutil.process_iter():
            kind = service_of(proc)
            if kind is None:
                continue
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            used = t.user + t.system
            if first:
                self._base[proc.pid] = used
            self._last[proc.pid] = (kind, used)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def used(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self._sample()
        out = dict.fromkeys(SERVICES, 0.0)
        for pid, (kind, used) in self._last.items():
            out[kind] += max(used - self._base.get(pid, 0.0), 0.0)
        return out


def measure(cell: Cell, histories: dict[str, list[dict[str, Any]]], run_s: float) -> None:
    """Fill the cell's throughput and slowdown from each trial's results (worker timestamps).

    The window is the run's last third, ending when the median trial reported last (Tune's
    time budget stops them all then); `reached` counts the trials that had reported before it
    opened: on 2 CPUs starting 64 trial processes takes a minute, longer for a busy driver."""
    rows = [r for h in histories.values() for r in h]
    cell.results = len(rows)
    if not rows:
        return
    firsts = [h[0]["reported_at"] for h in histories.values() if h]
    cell.trials = len(firsts)
    if cell.scheduler == "asha":  # most trials ended early: the window ends with the budget
        t1 = max(r["reported_at"] for r in rows)
        t0 = t1 - run_s / 3
        live = sum(  # trial-seconds inside the window, from a trial's start to its last result
            max(0.0, min(h[-1]["reported_at"], t1) - max(h[0]["trial_started_at"], t0))
            for h in histories.values()
            if h
        )
        cell.reached = round(live / (t1 - t0))  # trials live on average in the window
    else:
        t1 = float(np.median([h[-1]["reported_at"] for h in histories.values() if h]))
        t0 = t1 - run_s / 3
        cell.reached = sum(1 for f in firsts if f <= t0)
    cell.window_trials = sum(1 for f in firsts if t0 < f <= t1)
    cell.ramp_s = max(firsts) - min(h[0]["trial_started_at"] for h in histories.values() if h)
    cell.window_results = sum(1 for r in rows if t0 < r["reported_at"] <= t1)
    cell.window_s = t1 - t0
    slow = []
    for h in histories.values():
        epochs = len(h)
        if epochs >= 2:
            wall = h[-1]["reported_at"] - h[0]["trial_started_at"]
            slow.append(wall / (epochs * cell.epoch_s))
    if slow:
        cell.slowdown_median = float(np.median(slow))
        cell.slowdown_max = float(np.max(slow))


def histories_of(grid: Any) -> dict[str, list[dict[str, Any]]]:
    """Trial id -> its results in order, as Tune stored them."""
    out = {}
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or frame.empty:
            continue
        frame = frame.sort_values("training_iteration")
        cols = ["training_iteration", "reported_at", "trial_started_at", "trial_id"]
        out[str(frame["trial_id"].iloc[0])] = frame[cols].to_dict("records")
    return out


@contextlib.contextmanager
def ray_as_shipped() -> Iterator[None]:
    """Ray's own snapshot, upload and statistics functions for a bare run: toxtune's driver
    replaces four (`tune.bridge.consistent_experiment_uploads`, `snapshots_by_time_only`,
    `object_store_uploads`, `metric_statistics_only`) process-wide."""
    from ray.train._internal import storage
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    patched = (
        storage._FilesystemSyncer._sync_up_command,
        _ExperimentCheckpointManager.on_trial_checkpoint,
        storage._upload_to_fs_path,
        _TrainingRunMetadata.update_metric,
    )
    storage._FilesystemSyncer._sync_up_command = SHIPPED[0]
    _ExperimentCheckpointManager.on_trial_checkpoint = SHIPPED[1]
    storage._upload_to_fs_path = SHIPPED[2]
    _TrainingRunMetadata.update_metric = getattr(patched[3], "_toxtune_original", patched[3])
    try:
        yield
    finally:
        storage._FilesystemSyncer._sync_up_command = patched[0]
        _ExperimentCheckpointManager.on_trial_checkpoint = patched[1]
        storage._upload_to_fs_path = patched[2]
        _TrainingRunMetadata.update_metric = patched[3]


SHIPPED: tuple[Any, Any, Any] = (None, None, None)  # set in main(), before any patch


def run_bare(
    cell: Cell, storage: str, epochs: int, run_s: float, every: int, grace: int = 3
) -> Cell:
    """Bare Ray Tune: the same trials, no callbacks, results under `storage` (folder or URI);
    with ASHA, Tune's random search proposes the trials and their processes are reused."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    from tune import settings

    for key in settings.TUNE_ENV:  # Ray's defaults: snapshot period "auto", its own loggers
        os.environ.pop(key, None)
    trainable = ray_tune.with_resources(simulated_trial, {"cpu": 1})
    config = {"_epoch_s": cell.epoch_s, "_epochs": epochs, "_checkpoint_every": every}
    config["_index"] = ray_tune.randint(0, 10**6)  # a parameter for its search to sample
    asha = cell.scheduler == "asha"
    tuner = ray_tune.Tuner(
        trainable,
        param_space=config,
        tune_config=ray_tune.TuneConfig(
            metric="best_val_roc_auc",
            mode="max",
            num_samples=ASHA_SAMPLES if asha else cell.in_flight,
            max_concurrent_trials=cell.in_flight,
            time_budget_s=run_s,
            scheduler=(
                ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=epochs,
                    grace_period=grace,
                    reduction_factor=3,
                )
                if asha
                else None
            ),
            reuse_actors=asha,
        ),
        run_config=ray_tune.RunConfig(
            name=f"{cell.stack}-{cell.scheduler}-{cell.in_flight}-{cell.epoch_s}",
            storage_path=storage,
            verbose=0 if asha else 1,  # with ASHA's churn, Tune's per-trial tables cost CPU
        ),
    )
    cpu, services, t = CpuSampler(), ServicesCpu(), time.monotonic()
    with ray_as_shipped():
        grid = tuner.fit()
    cell.cpu_s, cell.wall_s = cpu.used(), time.monotonic() - t
    cell.services_s = services.used()
    measure(cell, histories_of(grid), run_s)
    return cell


def job_for(
    cell: Cell,
    storage: str,
    tracking: str | None,
    study: str | None,
    epochs: int,
    run_s: float,
    grace: int = 3,
) -> Any:
    from tune.config import load_config

    asha = cell.scheduler == "asha"
    return load_config(
        overrides={
            "data.source": "simulated.csv",
            "search.scheduler": cell.scheduler,
            **({"search.grace_period": grace} if asha else {}),
            "search.num_samples": ASHA_SAMPLES if asha else cell.in_flight,
            "search.max_concurrent": cell.in_flight,
            "search.max_epochs": epochs,
            "search.patience": 0,
            "search.time_limit_s": run_s,
            "ray.storage_path": storage,
            "tracking.tracking_uri": tracking,
            "tracking.study_storage": study,
            "tracking.experiment_name": "driver-bench",
            "tracking.run_name": (
                f"{cell.stack}-{cell.scheduler}-{cell.in_flight}-{cell.epoch_s:g}".replace(".", "p")
            ),
        }
    )


def run_toxtune(
    cell: Cell,
    storage: str,
    tracking: str | None,
    study_url: str | None,
    epochs: int,
    run_s: float,
    every: int,
    grace: int = 3,
) -> Cell:
    from ray import tune as ray_tune

    from tune import bridge, settings, study
    from tune import tracking as tr
    from tune.search import build_tuner, driver_callbacks

    for key, value in settings.TUNE_ENV.items():
        os.environ[key] = value
    for name in (
        "consistent_experiment_uploads",
        "snapshots_by_time_only",
        "object_store_uploads",
    ):
        getattr(bridge, name, lambda: None)()  # as tune.search.search does (when it does)
    if hasattr(bridge, "metric_statistics_only"):
        bridge.metric_statistics_only({study.METRIC})
    job = job_for(cell, storage, tracking, study_url, epochs, run_s, grace)
    job.storage.check_writable()
    parent = tr.start_job_run(
        job.tracking_uri, job.tracking.experiment_name, job.name, job.to_dict(), resume=False
    )
    callbacks = driver_callbacks(job, parent, None)
    fixed = {"_epoch_s": cell.epoch_s, "_epochs": epochs, "_checkpoint_every": every}

    def trial(config: dict[str, Any]) -> None:
        settings.configure_trial_process()  # as toxtune's trials start
        simulated_trial({**config, **fixed})

    trainable = ray_tune.with_resources(trial, {"cpu": 1})
    trainable = bridge_console(trainable)
    tuner, _ = build_tuner(job, trainable, job.name, job.search.num_samples, True, callbacks)
    cpu, services, t = CpuSampler(), ServicesCpu(), time.monotonic()
    grid = tuner.fit()
    cell.cpu_s, cell.wall_s = cpu.used(), time.monotonic() - t
    cell.services_s = services.used()
    cell.requests = next(c.requests for c in callbacks if isinstance(c, tr.MlflowTrialCallback))
    tr.finish_job_run(job.tracking_uri, parent, "FINISHED")
    histories = histories_of(grid)
    measure(cell, histories, run_s)
    cell.lost = (lost(job, parent, histories) + " " + cell.lost).strip()
    return cell


def bridge_console(trainable: Any) -> Any:
    from tune import bridge
    from tune.search import CONSOLE_METRICS

    return bridge.with_console_metrics(trainable, list(CONSOLE_METRICS))


def lost(job: Any, parent: str, histories: dict[str, list[dict[str, Any]]]) -> str:
    """'none', or what Tune recorded that MLflow or the study lacks."""
    import optuna

    from tune import study
    from tune.bridge import RAY_TRIAL_ATTR
    from tune.tracking import PARENT_TAG, TRIAL_TAG, client_for

    client = client_for(job.tracking_uri)
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`{PARENT_TAG}` = '{parent}'", max_results=50_000)
    by_trial = {r.data.tags.get(TRIAL_TAG): r.info.run_id for r in runs}
    found = optuna.load_study(study_name=job.name, storage=study.rdb(job.study_storage))
    told = {
        t.user_attrs.get(RAY_TRIAL_ATTR): set(t.intermediate_values)
        for t in found.get_trials(deepcopy=False)
    }
    missing_ml = missing_st = 0
    for trial_id, rows in histories.items():
        steps = {int(r["training_iteration"]) for r in rows}
        run_id = by_trial.get(trial_id)
        logged = (
            {m.step for m in client.get_metric_history(run_id, "train_loss")} if run_id else set()
        )
        missing_ml += len(steps - logged)
        missing_st += len(steps - told.get(trial_id, set()))
    if not missing_ml and not missing_st:
        return "none"
    return f"MLflow lacks {missing_ml}, study lacks {missing_st} results"


@contextlib.contextmanager
def team_stack(root: Path) -> Iterator[tuple[str, str, str]]:
    """(results URI, tracking URI, study URL) of a team's stack started on this machine."""
    from benchmarks.storage import BUCKET as STORAGE_BUCKET
    from benchmarks.storage import moto_process
    from tests.team_stack import postgres_server, team_mlflow

    with (
        moto_process(root / "moto.log"),
        postgres_server() as pg,
        team_mlflow(
            pg.create_database("mlflow"), f"s3://{STORAGE_BUCKET}/mlartifacts", root / "mlflow"
        ) as server,
    ):
        yield f"s3://{STORAGE_BUCKET}/results", server.url, pg.create_database("optuna")


def table(cells: list[Cell], gpu_epoch_s: float) -> str:
    per_gpu = 16 / gpu_epoch_s
    head = (
        f"{'stack':<9}{'flight':>7}{'reached':>8}{'ramp s':>7}{'epoch s':>8}{'ideal/s':>8}"
        f"{'res/s':>7}{'x bare':>7}{'x b-s3':>7}{'CPU s/1k':>9}{'slow med':>9}{'slow max':>9}"
        f"{'GPUs':>6}{'GPUs cpu':>9}{'results':>8}{'trials':>7}{'new/s':>6}{'wall s':>7}"
        f"{'mlflow':>7}{'pg':>6}{'s3':>6}  lost"
    )
    lines = [f"scheduler: {cells[0].scheduler if cells else '-'}", head]
    bare = {(c.in_flight, c.epoch_s): c.rate for c in cells if c.stack == "bare"}
    bare_s3 = {(c.in_flight, c.epoch_s): c.rate for c in cells if c.stack == "bare-s3"}
    for c in cells:
        ratio = c.rate / bare.get((c.in_flight, c.epoch_s), float("nan"))
        ratio_s3 = c.rate / bare_s3.get((c.in_flight, c.epoch_s), float("nan"))
        by_cpu = 1000 / c.cpu_ms_per_result / per_gpu if c.cpu_ms_per_result else float("nan")
        lines.append(
            f"{c.stack:<9}{c.in_flight:>7}{c.reached:>8}{c.ramp_s:>7.0f}{c.epoch_s:>8.2f}"
            f"{c.ideal:>8.0f}{c.rate:>7.1f}{ratio:>7.2f}{ratio_s3:>7.2f}{c.cpu_ms_per_result:>9.1f}"
            f"{c.slowdown_median:>9.2f}{c.slowdown_max:>9.2f}{c.rate / per_gpu:>6.1f}"
            f"{by_cpu:>9.1f}{c.results:>8}{c.trials:>7}{c.new_trials_rate:>6.1f}{c.wall_s:>7.0f}"
            + "".join(
                f"{c.service_ms_per_result(k):>{w}.1f}"
                for k, w in zip(SERVICES, (7, 6, 6), strict=True)
            )
            + f"  {c.lost or '-'}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--epoch-s", type=float, nargs="+", default=[0.1, 2.0])
    parser.add_argument("--stacks", nargs="+", default=list(STACKS), choices=STACKS)
    parser.add_argument("--run-s", type=float, default=0.0, help="0: 30 s + 1.5 s per trial")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--scheduler", choices=("fifo", "asha"), default="fifo")
    parser.add_argument("--grace", type=int, default=3, help="ASHA's grace period (epochs)")
    parser.add_argument("--asha-max-epochs", type=int, default=27, help="ASHA's longest trial")
    parser.add_argument("--num-cpus", type=int, default=64)
    parser.add_argument("--gpu-epoch-s", type=float, default=0.5, help="a Tox21 epoch on a GPU")
    parser.add_argument("--out", default="", help="also write the table to this file")
    args = parser.parse_args()

    import ray
    from ray.train._internal import storage
    from ray.train._internal.storage import _FilesystemSyncer
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from tune import settings

    global SHIPPED
    SHIPPED = (
        _FilesystemSyncer._sync_up_command,
        _ExperimentCheckpointManager.on_trial_checkpoint,
        storage._upload_to_fs_path,
    )
    settings.configure_process()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs; Ray {ray.__version__}")
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
        object_store_memory=512 * 2**20,
    )
    cells: list[Cell] = []
    memory = PeakMemory()
    with tempfile.TemporaryDirectory(prefix="toxtune-driver-bench-") as tmp:
        root = Path(tmp)
        with contextlib.ExitStack() as stack:
            on_team = {"team", "bare-s3"} & set(args.stacks)
            team = stack.enter_context(team_stack(root)) if on_team else None
            for n in args.in_flight:
                for epoch_s in args.epoch_s:
                    run_s = args.run_s or 30 + 1.5 * n
                    epochs = int(10 * run_s / epoch_s)  # longer than the run: Tune's budget ends it
                    if args.scheduler == "asha":
                        epochs = args.asha_max_epochs
                    every, grace = args.checkpoint_every, args.grace
                    for name in args.stacks:
                        cell = Cell(name, n, epoch_s, scheduler=args.scheduler)
                        if name == "bare":
                            run_bare(cell, str(root / "bare"), epochs, run_s, every, grace)
                        elif name == "bare-s3":
                            assert team is not None
                            bare_uri = team[0].rsplit("/", 1)[0] + "/bare"
                            run_bare(cell, bare_uri, epochs, run_s, every, grace)
                        elif name == "embedded":
                            folder = str(root / f"emb-{n}-{epoch_s}")
                            run_toxtune(cell, folder, None, None, epochs, run_s, every, grace)
                        else:
                            assert team is not None
                            results, uri, study_url = team
                            run_toxtune(cell, results, uri, study_url, epochs, run_s, every, grace)
                        cells.append(cell)
                        print(
                            f"[{name} {n} in flight, {epoch_s} s epochs: {cell.rate:.1f} res/s, "
                            f"{cell.cpu_ms_per_result:.2f} CPU ms/result, lost {cell.lost}, "
                            f"{cell.requests} MLflow log_batch requests, "
                            f"{cell.trials} trials; "
                            f"peak memory so far {memory.peak:.1f} GiB]",
                            flush=True,
                        )
    out = table(cells, args.gpu_epoch_s)
    out += f"\npeak memory used on the machine: {memory.peak:.1f} GiB"
    print("\n" + out)
    if args.out:
        Path(args.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
