"""Results storage as a URI: a local folder or an object store, never a local folder named
after a URI. The object store here is a real S3-compatible server (moto) on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from tests.team_stack import bucket_keys, postgres_available, postgres_server, s3_server
from tests.tune.conftest import tiny_job
from tune import storage as storage_module
from tune.config import load_config
from tune.errors import ConfigError
from tune.job import run_job
from tune.storage import DELETE_BATCH, Storage, delete_folders


def test_local_storage_reads_writes_and_stages_files(tmp_path: Path) -> None:
    storage = Storage.open(str(tmp_path / "results"))
    assert storage.is_local and Storage.open(f"file://{tmp_path}/results") == storage
    assert storage.read_text("job", "a.txt") is None
    storage.write_text("job", "a.txt", text="hello")
    assert (tmp_path / "results" / "job" / "a.txt").read_text() == "hello"
    with storage.staged("job", "b.csv") as local:
        local.write_text("x\n")
    assert storage.read_text("job", "b.csv") == "x\n"
    storage.check_writable()
    assert not list((tmp_path / "results").glob(".toxtune-write-check-*"))


def test_an_unwritable_local_folder_is_refused_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"file/results cannot be written"):
        Storage.open(str(blocker / "results")).check_writable()


def test_a_uri_is_never_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--storage-path s3://bucket/toxtune` used to write to ./s3:/bucket/toxtune."""
    monkeypatch.chdir(tmp_path)
    job = load_config(
        overrides={
            "ray.storage_path": "s3://bucket/toxtune",
            "tracking.tracking_uri": "http://127.0.0.1:5000",
            "tracking.study_storage": "postgresql://127.0.0.1/optuna",
        }
    )
    assert not job.storage.is_local and job.storage.uri == "s3://bucket/toxtune"
    with pytest.raises(ConfigError, match="not a local folder"):
        _ = job.storage_root
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({}, "tracking.tracking_uri must be an MLflow server"),
        ({"tracking.tracking_uri": "http://h:5000"}, "tracking.study_storage must be a database"),
        (
            {
                "tracking.tracking_uri": "sqlite:///m.db",
                "tracking.study_storage": "postgresql://h/o",
            },
            "tracking.tracking_uri",
        ),
    ],
)
def test_object_store_jobs_refuse_sqlite_files_that_die_with_the_driver(
    overrides: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(overrides={"ray.storage_path": "s3://bucket/toxtune", **overrides})


def test_credentials_in_a_storage_uri_are_refused() -> None:
    with pytest.raises(ConfigError, match="embeds a password"):
        load_config(overrides={"ray.storage_path": "s3://AKIA:secret@bucket/x"})


def test_an_unknown_scheme_is_refused_naming_the_uri() -> None:
    with pytest.raises(ConfigError, match=r"bogus://b/x: cannot open it"):
        Storage.open("bogus://b/x").check_writable()


@pytest.mark.slow
def test_object_store_reads_writes_and_refuses_a_missing_bucket() -> None:
    with s3_server() as s3:
        storage = Storage.open(f"{s3.uri}/toxtune")
        storage.check_writable()
        storage.write_text("job", "a.txt", text="hello")
        assert storage.read_text("job", "a.txt") == "hello"
        with storage.staged("job", "b.csv") as local:
            local.write_text("x\n")
        assert set(bucket_keys(s3)) == {"toxtune/job/a.txt", "toxtune/job/b.csv"}
        with pytest.raises(ConfigError, match=r"s3://no-such-bucket/x .*bucket does not exist"):
            Storage.open("s3://no-such-bucket/x").check_writable()


@pytest.mark.slow
@pytest.mark.skipif(not postgres_available(), reason="PostgreSQL server binaries not installed")
def test_a_misspelled_bucket_is_refused_before_ray_starts(
    tmp_path: Path, small_csv: Path, no_ray: None
) -> None:
    with s3_server() as s3, postgres_server() as pg:
        job = tiny_job(
            tmp_path,
            small_csv,
            **{
                "ray.storage_path": f"s3://{s3.bucket}-typo/toxtune",
                "tracking.tracking_uri": "http://127.0.0.1:9",
                "tracking.study_storage": pg.create_database("optuna"),
            },
        )
        with pytest.raises(ConfigError, match=rf"s3://{s3.bucket}-typo/toxtune cannot be written"):
            run_job(job, progress=False)
        assert not ray.is_initialized()


@ray.remote(num_cpus=0)
class _TrialProcess:
    """A trial's worker: set up as toxtune's trials are, reporting checkpoints in a bucket."""

    def __init__(self) -> None:
        import pyarrow.fs as pafs

        from tune import settings

        settings.configure_trial_process()
        self.fs = pafs.S3FileSystem(
            endpoint_override="http://127.0.0.1:9", region="us-east-1", scheme="http"
        )

    def options(self) -> tuple:
        return self.fs.__reduce__()[1]

    def checkpoint(self, epoch: int) -> object:
        from ray import tune as ray_tune

        return ray_tune.Checkpoint(f"bucket/trial/checkpoint_{epoch:06d}", filesystem=self.fs)


@pytest.mark.slow
def test_a_trials_checkpoints_reach_the_driver_on_one_filesystem(no_ray: None) -> None:
    """Each checkpoint a trial reports carries its bucket's filesystem; unpickled afresh it
    cost the driver 9.3 ms of CPU (AWS's credential chain loading the CA certificates). The
    driver now makes it once, with the trial's options."""
    from tune import bridge

    bridge.init_local_ray(1, None)
    trial = _TrialProcess.remote()  # type: ignore[attr-defined]
    received = [ray.get(trial.checkpoint.remote(epoch)) for epoch in range(1, 4)]
    assert [c.path for c in received] == [f"bucket/trial/checkpoint_{e:06d}" for e in (1, 2, 3)]
    assert all(c.filesystem is received[0].filesystem for c in received)
    assert received[0].filesystem.__reduce__()[1] == ray.get(trial.options.remote())


def _requests(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The requests moto's server answered since the log was last cleared."""
    return [r.getMessage() for r in caplog.records if "HTTP/1.1" in r.getMessage()]


@pytest.mark.parametrize("batch", [DELETE_BATCH, 40])
def test_folders_deleted_together_cost_a_listing_each_and_one_request_per_batch_of_objects(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Thirty dropped checkpoints of three objects: pyarrow's `delete_dir` sent five requests
    for each (150). Now a listing each and one DeleteObjects request per `batch` objects; a
    folder already gone is no error, a folder whose name extends a deleted one's
    (checkpoint_1, checkpoint_10) keeps every object, and a bucket is never emptied."""
    import logging

    import pyarrow.fs as pafs

    monkeypatch.setattr(storage_module, "DELETE_BATCH", batch)
    with s3_server() as s3:
        fs, _ = pafs.FileSystem.from_uri(s3.uri)
        folders = [f"{s3.bucket}/job/t{i % 3}/checkpoint_{i}" for i in range(1, 31)]
        kept = f"{s3.bucket}/job/t1/checkpoint_100"  # checkpoint_1's name, extended
        for folder in [*folders, kept]:
            for name in ("model.pt", "best_row.json", "sub/progress.json"):
                with fs.open_output_stream(f"{folder}/{name}") as out:
                    out.write(name.encode())
        caplog.set_level(logging.INFO, logger="werkzeug")
        caplog.clear()
        gone, whole = f"{s3.bucket}/job/t9/checkpoint_9", f"{s3.bucket}/"
        failed = delete_folders(fs, [*folders, gone, whole])
        requests = _requests(caplog)
        assert list(failed) == [whole] and "whole bucket" in failed[whole]  # never listed
        deletes = [r for r in requests if "POST" in r and "?delete" in r]
        assert len(deletes) == -(-90 // batch), requests  # 90 objects
        assert len(requests) == len(deletes) + 31, requests  # and a listing a folder
        left = bucket_keys(s3, "job/")
        assert sorted(left) == sorted(
            f"job/t1/checkpoint_100/{n}" for n in ("model.pt", "best_row.json", "sub/progress.json")
        )


class _FailingBatchDelete:
    """A boto3 client whose DeleteObjects fails with `error`."""

    def __init__(self, client: object, error: Exception) -> None:
        self._client, self._error = client, error

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    def delete_objects(self, **kwargs: object) -> None:
        raise self._error


def _refused() -> Exception:
    from botocore.exceptions import ClientError

    answer = {"Error": {"Code": "NotImplemented", "Message": "DeleteObjects is not supported"}}
    return ClientError(answer, "DeleteObjects")


@pytest.mark.parametrize("client", ["none", "no batch delete"])
def test_folders_are_deleted_one_by_one_where_a_batch_cannot_be_used(
    monkeypatch: pytest.MonkeyPatch, client: str
) -> None:
    """Without boto3 (or for options it is not given, e.g. an assumed role), or on a store
    that refuses DeleteObjects, each folder goes through pyarrow's `delete_dir`; the result is
    the same."""
    import pyarrow.fs as pafs

    real = storage_module.s3_client
    if client == "none":
        monkeypatch.setattr(storage_module, "s3_client", lambda options: None)
    else:
        monkeypatch.setattr(
            storage_module, "s3_client", lambda o: _FailingBatchDelete(real(o), _refused())
        )
    with s3_server() as s3:
        fs, _ = pafs.FileSystem.from_uri(s3.uri)
        for i in range(3):
            with fs.open_output_stream(f"{s3.bucket}/job/checkpoint_{i}/model.pt") as out:
                out.write(b"m")
        failed = delete_folders(fs, [f"{s3.bucket}/job/checkpoint_{i}" for i in (0, 1, 5)])
        assert failed == {}
        assert bucket_keys(s3, "job/") == ["job/checkpoint_2/model.pt"]


def _throttled() -> Exception:
    from botocore.exceptions import ClientError

    answer = {
        "Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
        "ResponseMetadata": {"HTTPStatusCode": 503},
    }
    return ClientError(answer, "DeleteObjects")


@pytest.mark.parametrize("failure", ["no answer", "throttled"])
def test_a_batch_delete_that_gets_no_answer_names_its_folders_and_tries_no_more(
    monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    """An outage between the listings and the delete, or a store throttling the job: the
    folders are reported with the reason, left in place, and not tried again one by one (five
    more requests a folder, which would not be answered either, or would throttle it more)."""
    import pyarrow.fs as pafs
    from botocore.exceptions import EndpointConnectionError

    real = storage_module.s3_client
    error, said = {
        "no answer": (
            EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
            "Could not connect",
        ),
        "throttled": (_throttled(), "SlowDown"),
    }[failure]
    monkeypatch.setattr(storage_module, "s3_client", lambda o: _FailingBatchDelete(real(o), error))
    monkeypatch.setattr(storage_module, "_delete_each", lambda fs, paths: pytest.fail(paths))
    with s3_server() as s3:
        fs, _ = pafs.FileSystem.from_uri(s3.uri)
        folders = [f"{s3.bucket}/job/checkpoint_{i}" for i in range(2)]
        for folder in folders:
            with fs.open_output_stream(f"{folder}/model.pt") as out:
                out.write(b"m")
        failed = delete_folders(fs, folders)
        assert sorted(failed) == folders
        assert all(said in why for why in failed.values()), failed
        assert len(bucket_keys(s3, "job/")) == 2
