"""Ray's and Optuna's private attributes: used in one module, checked against the installed
versions, and an upgrade that removes one fails here by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from tune import bridge

TUNE = Path(__file__).resolve().parents[2] / "tune"
PRIVATE = re.compile(
    r"\._(ot_trials|completed_trials|ot_study|storage|trial_id|progress_metrics|node_ip_address"
    r"|resume_config|local_tuner|run_config|sampler|latest_checkpoint_result|backend"
    r"|create_scoped_session|set_trial_intermediate_value_without_commit)\b"
    r"|\bmax_failures\s*=(?!=)"
)


def test_installed_ray_and_optuna_have_every_private_attribute_used() -> None:
    bridge.check()


def test_an_upgrade_that_drops_an_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    class Upgraded:  # an OptunaSearch that no longer keeps its trials in `_ot_trials`
        def __init__(self, **_: object) -> None:
            self._completed_trials: set[str] = set()
            self._ot_study = None

    monkeypatch.setattr(bridge, "OptunaSearch", Upgraded)
    with pytest.raises(RuntimeError, match=r"OptunaSearch\._ot_trials"):
        bridge.check()


def test_no_private_ray_or_optuna_access_outside_the_bridge() -> None:
    offenders = [
        f"{path.name}:{n}: {line.strip()}"
        for path in sorted(TUNE.rglob("*.py"))
        if path.name != "bridge.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line) and "FailureConfig" not in line
    ]
    assert offenders == []


def _pid() -> int:
    import os

    return os.getpid()


# The driver process (toxtune, or this test run: python or pytest) hosts its core worker's server.
RAY_PROCESSES = re.compile(r"^(ray::|raylet|gcs_server|python|pytest|toxtune)")


@pytest.mark.slow
def test_a_local_ray_listens_beyond_loopback_only_in_rays_own_servers(no_ray: None) -> None:
    """What README's Security section says of a job's local Ray: Ray 2.60 has no supported
    setting that keeps its gRPC servers (GCS, raylet, core workers, agents) on loopback, so
    they listen on every interface, behind Ray's token authentication; no dashboard runs; and
    nothing else in the job's process tree listens beyond 127.0.0.1."""
    import os

    import psutil
    import ray

    bridge.init_local_ray(1, None)
    ray.get(ray.remote(_pid).remote())  # a worker process, with its own server
    tree = {p.pid: p for p in psutil.Process().children(recursive=True)}
    tree[os.getpid()] = psutil.Process()
    listening = [
        (c.laddr.ip, c.laddr.port, tree[c.pid].name())
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in tree
    ]
    assert listening
    beyond = [s for s in listening if not s[0].startswith("127.") and s[0] != "::1"]
    assert all(RAY_PROCESSES.match(name) for _, _, name in beyond), beyond
    assert 8265 not in {port for _, port, _ in listening}  # no dashboard
    assert os.environ.get("RAY_AUTH_MODE", "token") != "disabled"


def test_a_save_during_an_experiment_upload_cannot_break_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 25 item 11: Tune saves its experiment into the staging folder (the state JSON in
    place, the searcher's pickle through a hidden temporary file then renamed) while the last
    upload of that folder lists it and then copies what it listed. The save is forced to fall
    between the listing and the copying: the upload must neither fail (the "Last sync command
    failed ... FileNotFoundError" traceback) nor carry a torn or later state."""
    import json
    import logging
    import os

    import pyarrow.fs
    from ray.train._internal import storage

    staging, remote = tmp_path / "driver_artifacts", tmp_path / "remote"
    staging.mkdir()
    half_saved = staging / ".0f1e-tmp-search_gen_state-x.pkl"

    def save(step: int) -> None:  # as TuneController.save_to_dir
        (staging / "experiment_state-x.json").write_text(json.dumps({"step": step}))
        tmp = staging / f".{step:04d}-tmp-searcher-state-x.pkl"
        tmp.write_bytes(b"searcher %d" % step)
        os.replace(tmp, staging / "searcher-state-x.pkl")

    def copy_while_saving(source: str, destination: str, **_: object) -> None:
        """pyarrow's copy_files as it behaves: list, then copy; the next save runs between."""
        listed = [p for p in Path(source).rglob("*") if p.is_file()]
        half_saved.unlink()  # renamed into place by the save that was in progress
        save(2)
        for path in listed:
            target = Path(destination) / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())

    save(1)
    half_saved.write_bytes(b"half")
    monkeypatch.setattr(storage, "_pyarrow_fs_copy_files", copy_while_saving)
    bridge.consistent_experiment_uploads()
    bridge.consistent_experiment_uploads()  # installing twice changes nothing
    syncer = storage._FilesystemSyncer(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), sync_period=0, sync_timeout=60
    )
    with caplog.at_level(logging.WARNING):
        assert syncer.sync_up(str(staging), str(remote))
        syncer.wait()  # raises what the upload raised
        assert json.loads((remote / "experiment_state-x.json").read_text()) == {"step": 1}
        half_saved.write_bytes(b"half")
        assert syncer.sync_up(str(staging), str(remote))  # the next upload, as Tune's next step
        syncer.wait()
    assert "Last sync command failed" not in caplog.text
    # The upload holds one whole state: the one saved when it started, no temporary file.
    assert json.loads((remote / "experiment_state-x.json").read_text()) == {"step": 2}
    assert (remote / "searcher-state-x.pkl").read_bytes() == b"searcher 2"
    assert not [p.name for p in remote.iterdir() if p.name.startswith(".")]
    uploads = [p for p in tmp_path.iterdir() if p.name.startswith(".driver_artifacts-upload")]
    assert len(uploads) <= 1  # each upload's folder goes when the next one starts


def test_a_snapshot_uploads_what_changed_since_the_last_upload_that_succeeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every snapshot uploaded the whole staging folder, each ended trial's logs again, so its
    cost grew with the job's results so far. Now an unchanged file the last successful upload
    sent stays out; a failed upload counts for nothing, so what it carried goes next time."""
    import pyarrow.fs
    from ray.train._internal import storage

    staging, remote = tmp_path / "driver_artifacts", tmp_path / "remote"
    (staging / "trial_a").mkdir(parents=True)
    (staging / "trial_b").mkdir()
    (staging / "experiment_state-x.json").write_text('{"step": 1}')
    (staging / "trial_a" / "result.json").write_text('{"epoch": 1}\n')  # an ended trial
    running = staging / "trial_b" / "result.json"
    running.write_text('{"epoch": 1}\n')
    bridge.consistent_experiment_uploads()
    syncer = storage._FilesystemSyncer(
        storage_filesystem=pyarrow.fs.LocalFileSystem(), sync_period=0, sync_timeout=60
    )

    def sync() -> None:
        assert syncer.sync_up(str(staging), str(remote))
        syncer.wait()  # raises what the upload raised

    sync()
    assert (remote / "trial_a" / "result.json").read_text() == '{"epoch": 1}\n'
    (remote / "trial_a" / "result.json").write_text("not sent again")  # marks a second send
    (staging / "experiment_state-x.json").write_text('{"step": 2}')  # rewritten in place
    with running.open("a") as log:
        log.write('{"epoch": 2}\n')
    sync()
    assert (remote / "experiment_state-x.json").read_text() == '{"step": 2}'
    assert (remote / "trial_b" / "result.json").read_text().count("epoch") == 2
    assert (remote / "trial_a" / "result.json").read_text() == "not sent again"

    real = storage._pyarrow_fs_copy_files
    monkeypatch.setattr(storage, "_pyarrow_fs_copy_files", mock.Mock(side_effect=OSError("down")))
    with running.open("a") as log:
        log.write('{"epoch": 3}\n')
    with pytest.raises(OSError, match="down"):
        sync()
    monkeypatch.setattr(storage, "_pyarrow_fs_copy_files", real)
    sync()  # nothing changed since the failed upload: what it carried goes now
    assert (remote / "trial_b" / "result.json").read_text().count("epoch") == 3
    assert (remote / "trial_a" / "result.json").read_text() == "not sent again"


def test_the_syncers_note_of_files_sent_stays_out_of_its_pickled_copies(tmp_path: Path) -> None:
    """Every trial's storage shares the driver's syncer, and each trial's state in every
    experiment snapshot pickles it: the note of every file sent so far (and the last upload's
    command, which holds it) made the snapshot grow with the square of the trials (37.7 MB at
    200 trials). Pickled, the syncer is as small after 300 files as after 3; the driver's own
    keeps its note; a copy starts without one and sends every file."""
    import pyarrow.fs
    from ray import cloudpickle
    from ray.train._internal import storage

    bridge.consistent_experiment_uploads()

    def synced(files: int) -> tuple[Any, Path, Path]:
        staging, remote = tmp_path / f"staging{files}", tmp_path / f"remote{files}"
        for i in range(files):
            (staging / f"trial_{i:04d}").mkdir(parents=True)
            (staging / f"trial_{i:04d}" / "result.json").write_text('{"epoch": 1}\n')
        syncer = storage._FilesystemSyncer(
            storage_filesystem=pyarrow.fs.LocalFileSystem(), sync_period=0, sync_timeout=60
        )
        assert syncer.sync_up(str(staging), str(remote))
        syncer.wait()
        return syncer, staging, remote

    few, _, _ = synced(3)
    many, staging, remote = synced(300)
    assert len(cloudpickle.dumps(many)) < len(cloudpickle.dumps(few)) + 200

    copy = cloudpickle.loads(cloudpickle.dumps(many))
    (remote / "trial_0000" / "result.json").write_text("not sent again")
    assert many.sync_up(str(staging), str(remote))  # the driver's: only what changed
    many.wait()
    assert (remote / "trial_0000" / "result.json").read_text() == "not sent again"
    assert copy.sync_up(str(staging), str(remote))  # a copy: every file
    copy.wait()
    assert (remote / "trial_0000" / "result.json").read_text() == '{"epoch": 1}\n'


def test_ray_keeps_running_statistics_of_the_search_metric_only() -> None:
    """Ray kept, for every number of every result, a max, min, mean and last-10 window in each
    trial's state, about 34 of its 52 KB in every snapshot. Now only the search metric's: the
    result itself stays whole, and the trial's state is smaller by the rest."""
    from ray.tune.experiment import Trial

    from tune.study import METRIC

    def reported(trial: Trial) -> Trial:
        for epoch in range(1, 11):
            tasks = {f"val_roc_auc_{task}": 0.5 + epoch / 100 for task in range(12)}
            trial.update_last_result({"training_iteration": epoch, METRIC: 0.7, **tasks})
        return trial

    bridge.metric_statistics_only(set())
    nothing_kept = len(reported(Trial("__fake", stub=True)).run_metadata.get_json_state())
    bridge.metric_statistics_only({METRIC})
    trial = reported(Trial("__fake", stub=True))
    assert set(trial.metric_analysis) == {METRIC} and trial.metric_analysis[METRIC]["max"] == 0.7
    assert trial.last_result["val_roc_auc_3"] == 0.6  # the result whole
    assert len(trial.run_metadata.get_json_state()) < nothing_kept + 1_000


def test_dropped_checkpoints_are_deleted_off_the_tune_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 24: Tune deleted a trial's oldest checkpoint (`num_to_keep`) in its loop, a storage
    round trip per saved checkpoint. With `CheckpointDeletions` the loop only queues it; every
    deletion is done by the experiment's end, the newest `num_to_keep` kept."""
    import threading

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal import checkpoint_manager, session, storage

    deleted: list[tuple[str, str]] = []
    original = storage._delete_fs_path

    def spy(fs: object, fs_path: str) -> None:
        deleted.append((Path(fs_path).name, threading.current_thread().name))
        original(fs=fs, fs_path=fs_path)

    monkeypatch.setattr(storage, "_delete_fs_path", spy)
    monkeypatch.setattr(checkpoint_manager, "_delete_fs_path", spy)  # what Tune calls without it
    deletions = bridge.CheckpointDeletions()
    deletions.setup()
    manager = checkpoint_manager._CheckpointManager(CheckpointConfig(num_to_keep=2))
    for epoch in range(5):
        folder = tmp_path / f"checkpoint_{epoch:06d}"
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"weights")
        result = session._TrainingResult(Checkpoint.from_directory(str(folder)), {"epoch": epoch})
        manager.register_checkpoint(result)
    deletions.on_experiment_end(trials=[])
    loop = threading.current_thread().name
    assert sorted(name for name, _ in deleted) == [f"checkpoint_{e:06d}" for e in range(3)]
    assert all(thread != loop for _, thread in deleted), deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_000003", "checkpoint_000004"]
    assert checkpoint_manager._delete_fs_path is spy  # Tune's own deletion is back


def test_a_dropped_checkpoint_already_gone_does_not_stop_the_deletions(tmp_path: Path) -> None:
    """A resumed job's trial whose newest checkpoint was lost with the killed driver: Tune drops a
    checkpoint that no longer exists, and its deletion raises (`_delete_fs_path` stats the path
    outside its own try). The deletions after it still happen and the experiment's end returns;
    it used to wait for ever on a dead thread (a resume hung in the killed-driver drill)."""
    import threading

    import pyarrow.fs

    fs = pyarrow.fs.LocalFileSystem()
    kept = tmp_path / "checkpoint_000002"
    kept.mkdir()
    deletions = bridge.CheckpointDeletions()
    deletions.setup()
    deletions.enqueue(fs, str(tmp_path / "checkpoint_000001"))  # gone before Tune dropped it
    deletions.enqueue(fs, str(kept))
    ended = threading.Thread(target=deletions.on_experiment_end, kwargs={"trials": []})
    ended.start()
    ended.join(timeout=30)
    assert not ended.is_alive(), "the experiment's end waits for a deletion that never comes"
    assert not kept.exists()


def test_checkpoints_dropped_while_a_deletion_runs_are_deleted_together(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At a checkpoint an epoch many trials drop checkpoints faster than one deletion at a time
    keeps up with (pyarrow's, five round trips each). What Tune drops while a deletion runs
    waits in the queue, and the next batch takes all of it: twenty checkpoints, one delete
    request for all their objects."""
    import logging
    import threading

    import pyarrow.fs as pafs

    from tests.team_stack import bucket_keys, s3_server
    from tune import storage

    first_started, go_on = threading.Event(), threading.Event()
    batches: list[int] = []
    delete_folders = storage.delete_folders

    def held(fs: pafs.S3FileSystem, paths: list[str]) -> dict[str, str]:
        batches.append(len(paths))
        first_started.set()
        assert go_on.wait(timeout=30)
        return delete_folders(fs, paths)

    monkeypatch.setattr(storage, "delete_folders", held)
    with s3_server() as s3:
        fs, _ = pafs.FileSystem.from_uri(s3.uri)
        folders = [f"{s3.bucket}/job/t{i % 4}/checkpoint_{i:06d}" for i in range(21)]
        for folder in folders:
            for name in ("model.pt", "best_row.json"):
                with fs.open_output_stream(f"{folder}/{name}") as out:
                    out.write(b"x")
        caplog.set_level(logging.INFO, logger="werkzeug")
        deletions = bridge.CheckpointDeletions()
        deletions.setup()
        deletions.enqueue(fs, folders[0])
        assert first_started.wait(timeout=30)
        caplog.clear()  # the first batch's requests are still to come: counted from here
        for folder in folders[1:]:
            deletions.enqueue(fs, folder)
        go_on.set()
        deletions.on_experiment_end(trials=[])
        requests = [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]
        assert batches == [1, 20]
        assert len([r for r in requests if "?delete" in r]) == 2, requests
        assert bucket_keys(s3, "job/") == []


def _study_with_trials(url: str, n: int) -> tuple[object, list[object]]:
    import optuna

    from tune import study as study_module

    found = optuna.create_study(storage=study_module.rdb(url), study_name="s")
    return found, [found.ask() for _ in range(n)]


def test_a_batch_of_intermediate_values_is_a_few_statements_and_writes_what_reports_would(
    tmp_path: Path,
) -> None:
    """The study's writer stores a batch of epochs as optuna's own per-value write does (a
    repeated step takes the later value, NaN and infinities kept), in a number of SQL
    statements that does not grow with the batch (optuna's write, two queries and an insert a
    value, cost 1.0-1.3 ms of driver CPU a value on PostgreSQL); a batch with a finished trial
    writes nothing."""
    import math

    import optuna
    from sqlalchemy import event

    values = [(0, 0.5, 1), (0, 0.7, 1), (0, math.nan, 2), (1, math.inf, 1), (1, 0.3, 2)]
    values += [(1, 0.4, 2), (2, -math.inf, 5)] + [(2, i / 100, 10 + i) for i in range(40)]

    def stored(found: object) -> list[dict[int, float]]:
        return [
            {step: ("nan" if math.isnan(v) else v) for step, v in t.intermediate_values.items()}
            for t in found.get_trials(deepcopy=False)
        ]

    one_by_one, trials = _study_with_trials(f"sqlite:///{tmp_path / 'a.db'}", 3)
    backend = trials[0].storage._backend
    backend.set_trial_intermediate_value(trials[0]._trial_id, 1, 0.1)  # stored before
    for i, value, step in values:
        backend.set_trial_intermediate_value(trials[i]._trial_id, step, value)

    batched, trials = _study_with_trials(f"sqlite:///{tmp_path / 'b.db'}", 3)
    backend = trials[0].storage._backend
    backend.set_trial_intermediate_value(trials[0]._trial_id, 1, 0.1)
    statements: list[str] = []
    event.listen(backend.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    bridge._write_batch([(trials[i], value, step) for i, value, step in values[:7]])
    small = len(statements)
    statements.clear()
    bridge._write_batch([(trials[i], value, step) for i, value, step in values[7:]])
    large = len(statements)
    assert stored(batched) == stored(one_by_one)
    assert large <= small <= 6  # states, stored steps, inserts (+ updates), commit

    batched.tell(trials[1], 0.9)
    before = stored(batched)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        bridge._write_batch([(trials[0], 0.2, 50), (trials[1], 0.2, 50)])
    assert stored(batched) == before


def test_a_new_trial_is_proposed_as_optuna_would_from_one_read_and_stored_in_one_commit(
    tmp_path: Path,
) -> None:
    """A new trial asked as the searcher asks it (`StudySearch.suggest`: the study's `ask`,
    then the job's space sampled through Ray's suggest captor) by the job's TPE (constant liar:
    running trials count against a proposal) over a study with finished and running trials,
    proposes and stores the same parameters and distributions, conditional ones included, as
    Optuna's own ask and sampling do; with the study's trials read once and the parameters
    written in one commit, not a read per parameter sampled alone (and one for the ask) and a
    commit per parameter. A sampling that fails keeps what it sampled."""
    import optuna
    from sqlalchemy import event

    from tune import study as study_module

    earlier = _earlier_trials(16, finished=12, seed=0)

    def proposed(url: str, ask: Any) -> tuple[list[object], list[int], list[int]]:
        found = _job_study(url, tmp_path, earlier)
        engine = found._storage._backend.engine
        commits: list[int] = []  # transactions that wrote
        reads: list[int] = []
        writing: set[int] = set()

        def executed(conn: Any, cursor: Any, statement: str, *a: Any) -> None:
            if "FROM trial_intermediate_values" in statement:  # a read of whole trials
                reads.append(1)
            if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                writing.add(id(conn))

        def committed(conn: Any) -> None:
            if id(conn) in writing:
                writing.discard(id(conn))
                commits.append(1)

        event.listen(engine, "before_cursor_execute", executed)
        event.listen(engine, "commit", committed)
        per_trial_commits, per_trial_reads = [], []
        for _ in range(4):  # each new trial stays running: the next one's liar counts it
            before_commits, before_reads = len(commits), len(reads)
            ask(found)
            per_trial_commits.append(len(commits) - before_commits)
            per_trial_reads.append(len(reads) - before_reads)
        reread = optuna.load_study(study_name="s", storage=study_module.rdb(url))
        stored = [
            (t.params, t.distributions, t.system_attrs) for t in reread.trials[len(earlier) :]
        ]
        return stored, per_trial_commits, per_trial_reads

    optunas, optunas_commits, optunas_reads = proposed(
        f"sqlite:///{tmp_path / 'a.db'}", _optunas_ask
    )
    ours, our_commits, our_reads = proposed(f"sqlite:///{tmp_path / 'b.db'}", _one_pass_ask)
    assert ours == optunas
    # reads of trials with their intermediate values: the study once (and the new trial
    # once), not once for the ask and once for each parameter sampled alone
    assert max(our_reads) + 3 <= min(optunas_reads), (our_reads, optunas_reads)
    # a write a parameter and one for TPE's note of its proposal (a system attribute),
    # against one for all of them, beside the new trial's own
    assert max(our_commits) <= 2 < 12 <= min(optunas_commits), (our_commits, optunas_commits)

    found = optuna.create_study(storage=study_module.rdb(f"sqlite:///{tmp_path / 'c.db'}"))
    with pytest.raises(ValueError), bridge.one_pass_sampling(found):
        found.ask().suggest_int("n_layers", 1, 3)
        raise ValueError("the space is wrong")
    reread = optuna.load_study(study_name=found.study_name, storage=found._storage)
    assert set(reread.trials[0].params) == {"n_layers"}


def test_a_running_trial_is_read_in_full_once_and_proposals_stay_optunas_as_trials_end(
    tmp_path: Path,
) -> None:
    """Trials asked one after another while earlier ones run, report epochs and end
    (COMPLETE, PRUNED on their last epoch, FAIL), one of them queued first (as the default
    point is): each new trial is proposed and stored as Optuna's own ask would, and a running
    trial is read with its epochs once, not again for every later proposal; only the trials
    that ended or were new since the last ask are."""
    import optuna

    from tune import study as study_module
    from tune.space import build_space, sample

    earlier = _earlier_trials(14, finished=8, seed=1)
    memory = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=2))
    queued = memory.ask()
    sample(queued, build_space())
    queued = queued.params
    endings = [
        (optuna.trial.TrialState.COMPLETE, 0.93),
        (optuna.trial.TrialState.PRUNED, None),  # ranked by its last epoch
        (optuna.trial.TrialState.FAIL, None),
    ]

    def proposed(url: str, ask: Any) -> tuple[list[object], list[int]]:
        found = _job_study(url, tmp_path, earlier)
        storage = found._storage
        running = [t._trial_id for t in found.trials if t.state.name == "RUNNING"]
        read: list[int] = []
        backend_read = storage._backend._get_trials

        def counted(*args: Any, **kwargs: Any) -> list[Any]:
            trials = backend_read(*args, **kwargs)
            read.extend(t.number for t in trials if t.state.name == "RUNNING")
            return trials

        storage._backend._get_trials = counted
        per_ask = []
        for r in range(9):
            if r == 2:  # queued, as the default point is: read WAITING, then asked
                found.enqueue_trial(queued)
                found.get_trials()  # the storage reads it waiting, before its ask
            before = len(read)
            running.append(ask(found)._trial_id)
            per_ask.append(len(read) - before)
            for step, trial_id in enumerate(running):  # epochs written as the report thread does
                storage.set_trial_intermediate_value(trial_id, 2 + r, 0.6 + (step % 5) / 40)
            state, value = endings[r % 3]
            storage.set_trial_state_values(
                running.pop(0), state, None if value is None else [value]
            )
        reread = optuna.load_study(study_name="s", storage=study_module.rdb(url))
        stored = [(t.params, t.distributions) for t in reread.trials[len(earlier) :]]
        return stored, per_ask

    optunas, optunas_reads = proposed(f"sqlite:///{tmp_path / 'a.db'}", _optunas_ask)
    ours, our_reads = proposed(f"sqlite:///{tmp_path / 'b.db'}", _one_pass_ask)
    assert ours == optunas
    # six trials run beside each new one: Optuna reads all of them for each proposal (several
    # times); the one-pass read takes the last ask's new trial, still running, once
    assert min(optunas_reads[1:]) >= 6, optunas_reads
    assert max(our_reads[1:]) <= 1, our_reads


def _earlier_trials(n: int, finished: int, seed: int) -> list[Any]:
    """`n` trials of the job's space at random points, the first `finished` COMPLETE, the
    rest RUNNING; each with one epoch's value."""
    import optuna

    from tune.space import build_space, sample

    space = build_space()
    memory = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for i in range(n):
        trial = memory.ask()
        sample(trial, space)
        done = i < finished
        out.append(
            optuna.trial.create_trial(
                params=trial.params,
                distributions=trial.distributions,
                value=0.5 + i / 100 if done else None,
                state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.RUNNING,
                intermediate_values={1: 0.4 + i / 50},
            )
        )
    return out


def _optunas_ask(found: Any) -> Any:
    """A new trial as Optuna alone asks and samples it (the job's space, Ray's captor)."""
    from ray.tune.search.optuna.optuna_search import _OptunaTrialSuggestCaptor

    from tune.space import build_space, sample

    trial = found.ask()
    sample(_OptunaTrialSuggestCaptor(trial), build_space())
    return trial


def _one_pass_ask(found: Any) -> Any:
    """The same ask inside `one_pass_sampling`, as `StudySearch.suggest` makes it."""
    with bridge.one_pass_sampling(found):
        trial = _optunas_ask(found)
    trial.storage = found._storage
    return trial


def _job_study(url: str, tmp_path: Path, earlier: list[Any]) -> Any:
    """A study at `url` holding `earlier`, sampled by the job's TPE (seeded as a new job's)."""
    import optuna

    from tests.tune.conftest import tiny_job
    from tune import study as study_module

    found = optuna.create_study(
        storage=study_module.rdb(url),
        study_name="s",
        direction="maximize",
        sampler=study_module.make_sampler(tiny_job(tmp_path, tmp_path / "unused.csv").search, 0),
    )
    found.add_trials(earlier)
    return found


@pytest.mark.slow
def test_a_checkpoint_and_a_snapshot_reach_a_bucket_in_one_request_a_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ray made each folder of the path (bucket checks and a marker object a level) and sent
    each file as a three-request multipart upload: this three-file checkpoint cost 21
    requests, and its deletion seven. Now the trial's storage check and one PUT a file (the
    files land where Ray puts them), its deletion a listing and one request for its objects,
    and a snapshot's folder one PUT a file."""
    import logging

    import pyarrow.fs as pafs
    from ray import tune as ray_tune
    from ray.train._internal import storage as ray_storage

    from tests.team_stack import s3_server

    bridge.object_store_uploads()
    saved = tmp_path / "checkpoint"
    (saved / "sub").mkdir(parents=True)
    files = {"model.pt": b"m" * 70_000, "best_row.json": b"{}", "sub/progress.json": b"[]"}
    for name, data in files.items():
        (saved / name).write_bytes(data)
    with s3_server() as s3:
        context = ray_storage.StorageContext(
            storage_path=f"{s3.uri}/results", experiment_dir_name="job", trial_dir_name="t1"
        )
        context.current_checkpoint_index = 3
        caplog.set_level(logging.INFO, logger="werkzeug")
        caplog.clear()
        persisted = context.persist_current_checkpoint(
            ray_tune.Checkpoint.from_directory(str(saved))
        )
        requests = [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]
        assert len(requests) == 1 + len(files), requests  # the storage check, a PUT a file
        assert persisted.path == f"{s3.bucket}/results/job/t1/checkpoint_000003"
        with persisted.as_directory() as folder:
            assert {n: (Path(folder) / n).read_bytes() for n in files} == files

        caplog.clear()  # Tune drops it (num_to_keep): deleted off the loop, in two requests
        deletions = bridge.CheckpointDeletions()
        deletions.setup()
        deletions.enqueue(persisted.filesystem, persisted.path)
        deletions.enqueue(persisted.filesystem, persisted.path + "-gone")  # already gone
        deletions.on_experiment_end(trials=[])
        requests = [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]
        assert len(requests) == 2 + 1, requests  # the gone one: a listing
        assert not persisted.filesystem.get_file_info(
            pafs.FileSelector(persisted.path, allow_not_found=True)
        )

        caplog.clear()  # a snapshot: the driver's staging folder, uploaded by Ray's syncer
        fs, _ = pafs.FileSystem.from_uri(s3.uri)
        ray_storage._upload_to_fs_path(str(saved), fs, f"{s3.bucket}/results/job")
        requests = [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]
        assert len(requests) == len(files), requests
        for name, data in files.items():
            with fs.open_input_stream(f"{s3.bucket}/results/job/{name}") as stream:
                assert stream.read() == data
