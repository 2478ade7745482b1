"""Featurization on a Ray cluster: the same matrix as in the driver, a lost worker costs its
chunk only, and the cache in the job's storage is found again (and missed when it must be)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.tune.conftest import SHARED_TOX21, tiny_job
from toxmodel.data import load_table
from toxmodel.featurize import Features, FeaturizerConfig, featurize
from tune import features as cluster_features
from tune.errors import ClusterError
from tune.features import (
    CACHE_FOLDER,
    CHUNK_RETRIES,
    ChunkFault,
    ClusterRun,
    featurize_on_cluster,
    featurize_with_ray,
)
from tune.prepare import featurize_job, load_job_table
from tune.storage import Storage

# Rows RDKit refuses for different reasons, spread so that several chunks hold one.
ODD = ["", "xx", "C1CC", "CC(C)(C)(C)(C)C", "CCé", "C C", "[Al](Cl)(Cl)(Cl)Cl.[Na+]"]


@pytest.fixture(scope="module")
def smiles() -> list[str]:
    """~300 Tox21 molecules (with one of its invalid rows) or synthetic ones, odd rows mixed in."""
    if SHARED_TOX21.exists():
        base = load_table(SHARED_TOX21).smiles[1300:1600]
    else:
        base = [f"{'C' * (i % 9 + 1)}{'O' * (i // 9)}N" for i in range(300)]
    items = list(base)
    for i, odd in enumerate(ODD):
        items.insert(7 + 41 * i, odd)
    return items


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A 2-CPU local Ray for this module: tasks behave as on a cluster, minus the network."""
    import ray

    from tune.bridge import init_local_ray

    if ray.is_initialized():
        ray.shutdown()
    init_local_ray(2, 0, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


def assert_same(got: Features, want: Features) -> None:
    """Bit for bit: every block, its dtype, the valid rows, invalid rows (with reasons), keys."""
    assert got.fingerprint.dtype == want.fingerprint.dtype
    np.testing.assert_array_equal(got.fingerprint, want.fingerprint)
    assert got.descriptors.dtype == want.descriptors.dtype
    np.testing.assert_array_equal(got.descriptors, want.descriptors)
    np.testing.assert_array_equal(got.valid_rows, want.valid_rows)
    assert got.invalid == want.invalid
    assert got.canonical == want.canonical
    assert got.config == want.config


CONFIGS = [
    FeaturizerConfig(n_bits=256, maccs=True),
    FeaturizerConfig(n_bits=128, counts=True, standardize=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["bits+maccs", "counts+standardize"])
def test_cluster_features_equal_local_features_row_for_row(
    smiles: list[str], config: FeaturizerConfig, local_ray: None
) -> None:
    run = ClusterRun()
    got = featurize_with_ray(smiles, config, chunk_size=37, run=run)
    want = featurize(smiles, config, n_jobs=1)
    assert run.chunks == -(-len(smiles) // 37) and sum(run.per_node.values()) == run.chunks
    assert len(want.invalid) >= len(ODD)  # the odd rows really are invalid ones
    assert_same(got, want)


def test_a_worker_killed_mid_chunk_costs_that_chunk_only(
    smiles: list[str], tmp_path: Path, local_ray: None
) -> None:
    config = FeaturizerConfig(n_bits=256)
    fault = ChunkFault(kill_chunk=2, marker_dir=str(tmp_path))
    run = ClusterRun()
    got = featurize_with_ray(smiles, config, chunk_size=50, fault=fault, run=run)
    assert (tmp_path / "toxtune-featurize-killed-2").exists()  # the worker really was killed
    assert_same(got, featurize(smiles, config, n_jobs=1))


def test_a_chunk_whose_worker_dies_on_every_retry_fails_the_featurization_by_rows(
    smiles: list[str], tmp_path: Path, local_ray: None
) -> None:
    """A chunk that kills its worker more often than Ray retries it is a ClusterError naming
    the rows it held and the runs it had, not a hang or a matrix missing rows."""
    fault = ChunkFault(kill_chunk=2, marker_dir=str(tmp_path), times=CHUNK_RETRIES + 1)
    with pytest.raises(ClusterError, match=rf"rows 100-149 failed {CHUNK_RETRIES + 1} times"):
        featurize_with_ray(smiles, FeaturizerConfig(n_bits=256), chunk_size=50, fault=fault)
    assert len(list(tmp_path.glob("toxtune-featurize-killed-2*"))) == CHUNK_RETRIES + 1


def _storages(tmp_path: Path) -> Iterator[Storage]:
    """The job's storage as a local folder, then as an object store (a real S3 server)."""
    yield Storage.open(str(tmp_path / "results"))
    from tests.team_stack import s3_server

    with s3_server() as s3:
        yield Storage.open(f"{s3.uri}/toxtune")


def test_a_resumed_driver_finds_the_features_in_storage_and_a_new_setting_misses(
    smiles: list[str], tmp_path: Path, local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = FeaturizerConfig(n_bits=256, maccs=True)
    want = featurize(smiles, config, n_jobs=1)
    computed: list[FeaturizerConfig] = []
    real = cluster_features.featurize_with_ray

    def counting(items: list[str], cfg: FeaturizerConfig, *args: object, **kw: object) -> Features:
        computed.append(cfg)
        return real(items, cfg, *args, **kw)

    monkeypatch.setattr(cluster_features, "featurize_with_ray", counting)
    for storage in _storages(tmp_path):
        computed.clear()
        first = ClusterRun()
        assert_same(featurize_on_cluster(smiles, config, storage, chunk_size=64, run=first), want)
        assert not first.cache_hit and computed == [config]
        names = [i.base_name for i in storage.fs.get_file_info(_selector(storage))]
        assert len(names) == 1 and names[0].endswith(".npz")

        resumed = Storage.open(storage.uri)  # another driver: nothing shared but the storage
        again = ClusterRun()
        assert_same(featurize_on_cluster(smiles, config, resumed, run=again), want)
        assert again.cache_hit and computed == [config]  # not featurized again

        radius3 = FeaturizerConfig(n_bits=256, maccs=True, radius=3)
        featurize_on_cluster(smiles, radius3, resumed, chunk_size=64)
        featurize_on_cluster(smiles[:-1], config, resumed, chunk_size=64)  # other molecules
        assert computed == [config, radius3, config]
        assert len(storage.fs.get_file_info(_selector(storage))) == 3


def _selector(storage: Storage) -> object:
    import pyarrow.fs as pafs

    return pafs.FileSelector(storage.path(CACHE_FOLDER))


def test_an_unreadable_cache_file_is_featurized_again(
    smiles: list[str], tmp_path: Path, local_ray: None, caplog: pytest.LogCaptureFixture
) -> None:
    config = FeaturizerConfig(n_bits=128)
    storage = Storage.open(str(tmp_path / "results"))
    featurize_on_cluster(smiles, config, storage, chunk_size=100)
    (path,) = (tmp_path / "results" / CACHE_FOLDER).glob("*.npz")
    path.write_bytes(b"not an npz")
    run = ClusterRun()
    with caplog.at_level(logging.WARNING, logger="tune.features"):
        got = featurize_on_cluster(smiles, config, storage, chunk_size=100, run=run)
    assert "unreadable" in caplog.text and not run.cache_hit
    assert_same(got, featurize(smiles, config, n_jobs=1))
    assert path.stat().st_size > 100  # rewritten


def test_a_cluster_job_featurizes_with_ray_into_its_storage(
    tmp_path: Path, small_csv: Path, local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prepare's choice: a job with a cluster address (Ray joined) uses Ray tasks and the job's
    storage; the same job without one uses the driver's pool and the local cache folder."""
    job = tiny_job(tmp_path, small_csv)
    table = load_job_table(job)
    local = featurize_job(job, table, progress=False)
    assert list((tmp_path / "cache" / "features").glob("*.npz"))
    assert not (tmp_path / "results" / CACHE_FOLDER).exists()

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # what a job on a cluster sees
    calls: list[int] = []
    real = cluster_features.featurize_with_ray
    monkeypatch.setattr(
        cluster_features,
        "featurize_with_ray",
        lambda items, *a, **kw: calls.append(len(items)) or real(items, *a, **kw),
    )
    on_cluster = featurize_job(job, table, progress=False)
    assert calls == [len(table)]
    assert len(list((tmp_path / "results" / CACHE_FOLDER).glob("*.npz"))) == 1
    assert_same(on_cluster, local)


class DriverKilled(BaseException):
    """Stands for the driver's death right after it kept a chunk."""


def test_a_driver_killed_mid_featurization_resumes_with_the_chunks_it_kept(
    smiles: list[str], tmp_path: Path, local_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk is kept in the job's storage as it arrives: a driver killed after keeping 3
    of 7 chunks resumes (another process: nothing shared but the storage) by featurizing only
    the other 4, at the chunk size the first run used even when asked for another, and gets
    the same matrix; a part cut short by the kill is featurized again; once the whole matrix is
    cached the parts are gone."""
    config = FeaturizerConfig(n_bits=256, maccs=True)
    want = featurize(smiles, config, n_jobs=1)
    keep = cluster_features.ChunkParts.keep
    kept: list[int] = []

    def dying(self: cluster_features.ChunkParts, index: int, chunk: object) -> None:
        keep(self, index, chunk)  # type: ignore[arg-type]
        kept.append(index)
        if len(kept) == 3:
            raise DriverKilled

    for storage in _storages(tmp_path):
        kept.clear()
        monkeypatch.setattr(cluster_features.ChunkParts, "keep", dying)
        with pytest.raises(DriverKilled):
            featurize_on_cluster(smiles, config, storage, chunk_size=50)
        monkeypatch.undo()
        assert _cached_files(storage) == ["folder"]  # its parts; the whole matrix never written

        resumed = Storage.open(storage.uri)
        run = ClusterRun()
        got = featurize_on_cluster(smiles, config, resumed, chunk_size=64, run=run)
        assert_same(got, want)
        assert run.from_parts == 3 and sum(run.per_node.values()) == 7 - 3
        assert run.chunks == 7  # the first run's chunks of 50, not 64
        assert _cached_files(storage) == ["npz"]  # the whole file, the parts removed

    # A part the kill cut short is read as missing and featurized again.
    storage = Storage.open(str(tmp_path / "cut"))
    parts = cluster_features.ChunkParts(storage, cluster_features.cache_key(smiles, config))
    parts.plan(len(smiles), 50)
    folder = tmp_path / "cut" / CACHE_FOLDER / parts.folder
    (folder / "0.npz").write_bytes(b"PK\x03\x04 cut short")
    run = ClusterRun()
    assert_same(featurize_on_cluster(smiles, config, storage, run=run), want)
    assert run.from_parts == 0 and sum(run.per_node.values()) == 7


def _cached_files(storage: Storage) -> list[str]:
    """The kinds of entries in the storage's feature cache folder: 'npz' or 'folder'."""
    import pyarrow.fs as pafs

    infos = storage.fs.get_file_info(pafs.FileSelector(storage.path(CACHE_FOLDER)))
    return sorted("folder" if i.type == pafs.FileType.Directory else "npz" for i in infos)
