"""Featurization on a Ray cluster, cached in the job's storage.

    features = featurize_on_cluster(smiles, config, job.storage)   # Ray already joined

The SMILES are cut into chunks; each chunk is one Ray task that runs toxmodel's own
`featurize_chunk` on whichever node has a free CPU and returns packed arrays; the driver
assembles the chunks in input order, so the result equals `toxmodel.featurize.featurize` row for
row, bit for bit. A task whose worker or node dies is run again (`CHUNK_RETRIES`): a lost node
costs its chunk, not the job.

The result is cached in the job's storage (a local folder or an object store every node and a
resumed driver reach) under `feature_cache/{key}.npz`, where the key is a hash of the SMILES list,
the featurizer settings, the cache format and the toxtune version (content-addressed: any job
on the same molecules and settings finds it). Bit fingerprints are stored packed (8 per byte).
Until that file is written, each chunk is kept there as it arrives (`ChunkParts`, under
`feature_cache/{key}.parts/`): a driver killed mid-featurization resumes with the chunks it had
and featurizes only the rest; the parts are removed once the whole matrix is cached.

A job without a cluster (no `ray.address`, no RAY_ADDRESS) keeps featurizing in the driver's
process pool with the local disk cache (`toxmodel.featurize.featurize_cached`), as fast as before.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from toxmodel.featurize import (
    CACHE_FORMAT,
    MACCS_BITS,
    FeatureChunk,
    Features,
    FeaturizerConfig,
    InvalidSmiles,
    assemble,
    featurize_chunk,
    smiles_digest,
)
from tune.config import JobConfig
from tune.errors import ClusterError
from tune.storage import Storage

log = logging.getLogger(__name__)

CACHE_FOLDER = "feature_cache"  # under the storage root, beside the job folders
CHUNK_RETRIES = 3  # runs of a chunk after its worker or node died (Ray's max_retries)
MIN_CHUNK, MAX_CHUNK = 500, 10_000  # molecules per task: overhead vs. what a lost node costs
CHUNKS_PER_CPU = 4  # enough tasks that a slow or lost node does not hold the rest back
STORE_FORMAT = 1  # layout of the storage cache file (bumped with it)


@dataclass(frozen=True)
class ChunkFault:
    """A test and drill hook: SIGKILL the worker featurizing chunk `kill_chunk`, on its first
    `times` runs (marker files in `marker_dir`, which the worker must reach, record each kill)."""

    kill_chunk: int
    marker_dir: str
    times: int = 1

    def fire(self, index: int) -> None:
        if index != self.kill_chunk:
            return
        for run in range(self.times):
            suffix = f"-{run + 1}" if run else ""
            marker = Path(self.marker_dir) / f"toxtune-featurize-killed-{index}{suffix}"
            if not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ClusterRun:
    """How a cluster featurization went, for logs and the benchmark."""

    chunks: int = 0
    seconds: float = 0.0
    cache_hit: bool = False
    per_node: dict[str, int] = field(default_factory=dict)  # node id -> chunks it computed
    from_parts: int = 0  # chunks an earlier, interrupted featurization had already kept


def on_cluster(job: JobConfig) -> bool:
    """Whether the job runs on a Ray cluster (`ray.address` or RAY_ADDRESS), the same test the
    search uses; a local job featurizes in the driver's process pool."""
    return bool(job.ray.address or os.environ.get("RAY_ADDRESS"))


def ray_started() -> bool:
    """Whether this process has joined Ray (without importing Ray when nothing loaded it)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def cache_key(smiles: Sequence[Any], config: FeaturizerConfig) -> str:
    """The content address of the features of `smiles` under `config` for this toxtune."""
    settings = {
        "config": asdict(config),
        "format": [CACHE_FORMAT, STORE_FORMAT],
        "toxtune": _version(),
        "smiles": smiles_digest(smiles),
    }
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def cache_path(storage: Storage, key: str) -> str:
    """Where the features under `key` live in `storage` (a filesystem path of `storage.fs`)."""
    return storage.path(CACHE_FOLDER, f"{key}.npz")


def featurize_on_cluster(
    smiles: Sequence[Any],
    config: FeaturizerConfig,
    storage: Storage,
    progress: bool = False,
    chunk_size: int | None = None,
    fault: ChunkFault | None = None,
    run: ClusterRun | None = None,
) -> Features:
    """The features of `smiles`, read from `storage`'s cache or computed in Ray tasks across the
    cluster and then cached there. Ray must be initialised (the job joins the cluster first)."""
    run = run if run is not None else ClusterRun()
    items = list(smiles)
    key = cache_key(items, config)
    cached = read_cached(storage, key, config, items)
    if cached is not None:
        run.cache_hit = True
        log.info("features found in %s", storage.uri_of(CACHE_FOLDER, f"{key}.npz"))
        return cached
    parts = ChunkParts(storage, key)
    features = featurize_with_ray(items, config, progress, chunk_size, fault, run, parts)
    try:
        write_cached(storage, key, features, items)
    except OSError as exc:
        log.warning("could not write the feature cache to %s: %s", storage.uri, exc)
    else:
        parts.remove()
    return features


def featurize_with_ray(
    smiles: Sequence[Any],
    config: FeaturizerConfig,
    progress: bool = False,
    chunk_size: int | None = None,
    fault: ChunkFault | None = None,
    run: ClusterRun | None = None,
    parts: ChunkParts | None = None,
) -> Features:
    """Featurize in Ray tasks, one per chunk, and assemble the chunks in input order. With
    `parts`, the chunks an interrupted run kept are taken from there (at the chunk size it
    used) and each new chunk is kept there as it arrives."""
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        raise ClusterError("featurizing on the cluster needs Ray: call ray.init first")
    run = run if run is not None else ClusterRun()
    started = time.monotonic()
    items = list(smiles)
    size = chunk_size or default_chunk_size(len(items), int(ray.cluster_resources().get("CPU", 1)))
    starts, kept = range(0, len(items), size), {}
    if parts is not None:
        size, starts = parts.plan(len(items), size)
        kept = parts.kept(len(starts))
    chunks: list[FeatureChunk | None] = [kept.get(i) for i in range(len(starts))]
    run.from_parts = len(kept)
    if kept:
        log.info("%d of %d chunks kept by an earlier run", len(kept), len(chunks))
    task = _remote_task()
    refs = {
        task.remote(index, start, items[start : start + size], config, fault): index
        for index, start in enumerate(starts)
        if chunks[index] is None
    }
    pending = list(refs)
    kept_rows = sum(len(c.valid_rows) + len(c.invalid) for c in chunks if c is not None)
    with tqdm(
        total=len(items), initial=kept_rows, unit="mol", desc="featurize", disable=not progress
    ) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            index = refs[done[0]]
            try:
                chunk, node = ray.get(done[0])
            except (
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError,
                ray.exceptions.OutOfMemoryError,
            ) as exc:
                start = index * size
                raise ClusterError(
                    f"featurizing rows {start}-{min(start + size, len(items)) - 1} failed "
                    f"{CHUNK_RETRIES + 1} times (worker or node lost each time): {exc}"
                ) from exc
            chunks[index] = chunk
            if parts is not None:
                parts.keep(index, chunk)
            run.per_node[node] = run.per_node.get(node, 0) + 1
            bar.update(len(chunk.valid_rows) + len(chunk.invalid))
    features = assemble([c for c in chunks if c is not None], config)
    run.chunks = len(chunks)
    run.seconds = time.monotonic() - started
    log.info(
        "featurized %d molecules in %d chunks on %d nodes in %.1f s",
        len(items),
        run.chunks,
        len(run.per_node),
        run.seconds,
    )
    return features


def default_chunk_size(n: int, cpus: int) -> int:
    """Molecules per task: about CHUNKS_PER_CPU tasks a CPU, within [MIN_CHUNK, MAX_CHUNK]."""
    return int(min(MAX_CHUNK, max(MIN_CHUNK, math.ceil(n / max(1, cpus * CHUNKS_PER_CPU)))))


def _featurize_task(
    index: int,
    start: int,
    smiles: list[Any],
    config: FeaturizerConfig,
    fault: ChunkFault | None,
) -> tuple[FeatureChunk, str]:
    """One chunk, on a Ray worker; returns it with the id of the node that computed it."""
    import ray

    if fault is not None:
        fault.fire(index)
    return featurize_chunk(smiles, start, config), ray.get_runtime_context().get_node_id()


@cache
def _remote_task() -> Any:
    """The chunk task. SPREAD: every chunk's SMILES sit in the driver node's object store, and
    Ray's default (locality-aware) placement then queued 7 of 8 chunks on the driver's node of a
    two-node cluster (measured); spread, they go to whichever node has a CPU."""
    import ray

    return ray.remote(num_cpus=1, max_retries=CHUNK_RETRIES, scheduling_strategy="SPREAD")(
        _featurize_task
    )


# ---------------------------------------------------------------- the storage cache


@dataclass(frozen=True)
class ChunkParts:
    """The chunks of one featurization (cache key `key`) kept in `storage` as they arrive, so
    that a driver killed mid-featurization loses only the chunks in flight. The folder holds
    `plan.json` (the chunk size and row count, which a resumed driver keeps even when its
    cluster would cut other chunks) and one `{index}.npz` per chunk; a part that cannot be
    read (cut short by the kill) is featurized again."""

    storage: Storage
    key: str

    @property
    def folder(self) -> str:
        return f"{self.key}.parts"

    def plan(self, n: int, size: int) -> tuple[int, range]:
        """(chunk size, chunk starts): the earlier run's when its plan covers `n` rows."""
        text = self.storage.read_text(CACHE_FOLDER, self.folder, "plan.json")
        saved = json.loads(text) if text else {}
        if saved.get("n") == n and int(saved.get("size", 0)) > 0:
            size = int(saved["size"])
        else:
            self.storage.write_text(
                CACHE_FOLDER, self.folder, "plan.json", text=json.dumps({"n": n, "size": size})
            )
        return size, range(0, n, size)

    def kept(self, n_chunks: int) -> dict[int, FeatureChunk]:
        """The readable parts among chunks 0..n_chunks-1, by index."""
        found: dict[int, FeatureChunk] = {}
        folder = self.storage.path(CACHE_FOLDER, self.folder)
        listed = self.storage.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        names = {info.base_name for info in listed}
        for index in range(n_chunks):
            if f"{index}.npz" not in names:
                continue
            path = f"{folder}/{index}.npz"
            try:
                with self.storage.fs.open_input_stream(path) as stream:
                    found[index] = _chunk_from(io.BytesIO(stream.read()))
            except Exception as exc:  # cut short by the kill, or unreadable: featurize again
                log.warning("feature chunk %s is unreadable (%s); featurizing it again", path, exc)
        return found

    def keep(self, index: int, chunk: FeatureChunk) -> None:
        """Write chunk `index` (a failed write costs only its reuse after a kill)."""
        buffer = io.BytesIO()
        _chunk_to(chunk, buffer)
        path = self.storage.path(CACHE_FOLDER, self.folder, f"{index}.npz")
        try:
            self.storage.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with self.storage.fs.open_output_stream(path) as stream:
                stream.write(buffer.getvalue())
        except OSError as exc:
            log.warning("could not keep feature chunk %s: %s", path, exc)

    def remove(self) -> None:
        """Delete the parts (the whole matrix is cached)."""
        try:
            self.storage.fs.delete_dir(self.storage.path(CACHE_FOLDER, self.folder))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove the feature chunks %s: %s", self.folder, exc)


def _chunk_to(chunk: FeatureChunk, out: io.BytesIO) -> None:
    meta = {
        "invalid": [[item.row, item.smiles, item.reason] for item in chunk.invalid],
        "canonical": chunk.canonical,
    }
    np.savez(
        out,
        valid_rows=chunk.valid_rows,
        morgan=chunk.morgan,
        maccs=chunk.maccs,
        descriptors=chunk.descriptors,
        meta=np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
    )


def _chunk_from(source: io.BytesIO) -> FeatureChunk:
    with np.load(source, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode("utf-8"))
        return FeatureChunk(
            valid_rows=data["valid_rows"],
            morgan=data["morgan"],
            maccs=data["maccs"],
            descriptors=data["descriptors"],
            invalid=[InvalidSmiles(int(r), s, why) for r, s, why in meta["invalid"]],
            canonical=list(meta["canonical"]),
        )


def read_cached(
    storage: Storage, key: str, config: FeaturizerConfig, smiles: Sequence[Any]
) -> Features | None:
    """The features cached under `key`, or None when absent, stale or unreadable."""
    path = cache_path(storage, key)
    try:
        if storage.fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        if storage.is_local:
            return _load(path, config, smiles)
        with storage.fs.open_input_file(path) as stream:
            return _load(io.BytesIO(stream.read()), config, smiles)
    except Exception as exc:
        log.warning("feature cache %s is unreadable (%s); featurizing again", path, exc)
        return None


def write_cached(storage: Storage, key: str, features: Features, smiles: Sequence[Any]) -> str:
    """Write the features under `key` (atomically: a reader sees the old file or the whole new
    one); returns the file's URI."""
    meta = {
        "format": STORE_FORMAT,
        "toxtune": _version(),
        "smiles_digest": smiles_digest(smiles),
        "config": asdict(features.config),
        "invalid": [[item.row, item.smiles, item.reason] for item in features.invalid],
        "has_canonical": features.canonical is not None,
    }
    arrays = {
        "fingerprint": _pack(features.fingerprint, features.config),
        "descriptors": features.descriptors,
        "valid_rows": features.valid_rows,
        "canonical": np.frombuffer("\n".join(features.canonical or []).encode("utf-8"), np.uint8),
        "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8),
    }
    if storage.is_local:
        folder = storage.local(CACHE_FOLDER)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{key}.npz"
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return storage.uri_of(CACHE_FOLDER, target.name)
    with tempfile.TemporaryDirectory(prefix="toxtune-features-") as tmp_dir:
        local = Path(tmp_dir) / f"{key}.npz"
        with local.open("wb") as fh:
            np.savez(fh, **arrays)
        return storage.upload(local, CACHE_FOLDER, local.name)  # an object PUT is atomic


def _load(source: Any, config: FeaturizerConfig, smiles: Sequence[Any]) -> Features | None:
    with np.load(source, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode("utf-8"))
        if (
            meta.get("format") != STORE_FORMAT
            or meta.get("config") != asdict(config)
            or meta.get("smiles_digest") != smiles_digest(smiles)
        ):
            log.info("feature cache does not match these inputs; featurizing again")
            return None
        valid_rows = data["valid_rows"].astype(np.int64, copy=False)
        text = bytes(data["canonical"]).decode("utf-8")
        canonical = (text.split("\n") if len(valid_rows) else []) if meta["has_canonical"] else None
        return Features(
            fingerprint=_unpack(data["fingerprint"], config, len(valid_rows)),
            descriptors=data["descriptors"],
            valid_rows=valid_rows,
            invalid=[InvalidSmiles(int(r), s, why) for r, s, why in meta["invalid"]],
            config=config,
            canonical=canonical,
        )


def _pack(fingerprint: np.ndarray, config: FeaturizerConfig) -> np.ndarray:
    """Bits 8 to a byte (counts are stored as they are)."""
    if config.counts:
        return fingerprint
    return np.packbits(fingerprint, axis=1, bitorder="little")


def _unpack(stored: np.ndarray, config: FeaturizerConfig, n_rows: int) -> np.ndarray:
    width = config.n_bits + (MACCS_BITS if config.maccs else 0)
    if config.counts:
        return stored
    out = np.unpackbits(stored, axis=1, count=width, bitorder="little")
    return out.reshape(n_rows, width)


@cache
def _version() -> str:
    try:
        return metadata.version("toxtune")
    except metadata.PackageNotFoundError:
        return "unknown"
