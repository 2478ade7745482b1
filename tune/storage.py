"""Where a job's results live: a URI, carried as a pyarrow filesystem plus a path.

`ray.storage_path` may be a local path (the default, `toxtune_results`), `file://...`, or any
URI pyarrow (and so Ray Tune) opens: `s3://bucket/prefix`, `gs://...`, `abfs://...`, `hdfs://...`.
Everything a job writes goes through a `Storage`: Ray Tune's experiment state and checkpoints
(Ray is given the URI), the saved config `--resume` reads, the data fingerprint, the rounds
file, the invalid-SMILES report and the ensemble checkpoint. A URI is never turned into a
`pathlib.Path` (which silently made `s3:/bucket` a folder under the working directory).

Credentials come from the environment only (`AWS_*`, an instance profile, `GOOGLE_*`): a URI
with embedded credentials is refused by the config, and `check_writable` is run before Ray
starts, so a missing bucket, missing credentials or an unknown scheme is refused by name.
"""

from __future__ import annotations

import functools
import os
import pickle
import posixpath
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tune.errors import ConfigError

LOCAL_SCHEMES = frozenset({"", "file"})


@dataclass(frozen=True)
class Storage:
    """A results location: `uri` as Ray Tune takes it; `fs` and `root` opened on first use
    (opening an object store may ask the network, e.g. for a bucket's region)."""

    uri: str
    scheme: str  # "" for a local path

    @classmethod
    def open(cls, location: str) -> Storage:
        """The storage at `location` (a local path or a URI); nothing is contacted yet."""
        scheme = urlparse(location).scheme.lower() if "://" in location else ""
        if scheme in LOCAL_SCHEMES:
            local = location[len("file://") :] if scheme else location
            return cls(str(Path(local).expanduser().resolve()), "")
        return cls(location.rstrip("/"), scheme)

    @property
    def is_local(self) -> bool:
        return self.scheme == ""

    @cached_property
    def _opened(self) -> tuple[pafs.FileSystem, str]:
        if self.is_local:
            return pafs.LocalFileSystem(), self.uri
        try:
            fs, root = pafs.FileSystem.from_uri(self.uri)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"ray.storage_path {self.uri}: cannot open it: {_reason(exc)}. Use a local "
                "path or a URI pyarrow opens (file://, s3://, gs://, abfs://, hdfs://)"
            ) from exc
        return fs, root.rstrip("/")

    @property
    def fs(self) -> pafs.FileSystem:
        return self._opened[0]

    @property
    def root(self) -> str:
        return self._opened[1]

    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root."""
        return "/".join([self.root, *parts])

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def local(self, *parts: str) -> Path:
        """A local `Path` of `parts`; only for local storage (ValueError otherwise)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local folder")
        return Path(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        """The file's text, or None when it does not exist."""
        if not self.exists(*parts):
            return None
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read().decode("utf-8")

    def write_text(self, *parts: str, text: str) -> str:
        """Write `text` (creating folders); returns the file's URI."""
        path = self.path(*parts)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as stream:
            stream.write(text.encode("utf-8"))
        return self.uri_of(*parts)

    def upload(self, source: Path, *parts: str) -> str:
        """Copy a local file or folder to `parts`; returns its URI."""
        dest = self.path(*parts)
        if source.is_dir():
            self.fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(source), dest, destination_filesystem=self.fs)
        else:
            self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(source), dest, destination_filesystem=self.fs)
        return self.uri_of(*parts)

    @contextmanager
    def staged(self, *parts: str) -> Iterator[Path]:
        """A local path to write `parts` to: the file itself for local storage, else a
        temporary file uploaded when the block ends without error."""
        if self.is_local:
            target = self.local(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            yield target
            return
        with tempfile.TemporaryDirectory(prefix="toxtune-stage-") as tmp:
            target = Path(tmp) / parts[-1]
            yield target
            if target.exists():
                self.upload(target, *parts)

    def check_writable(self) -> None:
        """Write, read back and delete a marker under the root; ConfigError naming the URI and
        the reason (no bucket, no credentials, no permission, unknown host)."""
        name = f".toxtune-write-check-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            self.write_text(name, text=name)
            if self.read_text(name) != name:
                raise OSError("the marker read back differs from what was written")
            self.fs.delete_file(self.path(name))
        except OSError as exc:
            raise ConfigError(
                f"ray.storage_path {self.uri} cannot be written: {_reason(exc)}"
            ) from exc


def _reason(exc: Exception) -> str:
    text = str(exc)
    hints = {
        "NO_SUCH_BUCKET": "the bucket does not exist",
        "ACCESS_DENIED": "access denied (check the credentials in the environment)",
        "InvalidAccessKeyId": "the access key in the environment is not valid",
        "SignatureDoesNotMatch": "the secret key in the environment does not match",
        "No response body": "no answer from the endpoint",
    }
    lowered = text.lower()
    if "bucket" in lowered and "not found" in lowered:
        return f"the bucket does not exist ({text.splitlines()[0][:300]})"
    for key, hint in hints.items():
        if key.lower() in text.lower():
            return f"{hint} ({text.splitlines()[0][:300]})"
    if "resolve host" in text.lower() or "NETWORK_CONNECTION" in text:
        return f"the endpoint cannot be reached ({text.splitlines()[0][:300]})"
    if "credentials" in text.lower():
        return f"no credentials found in the environment ({text.splitlines()[0][:300]})"
    return text.splitlines()[0][:400] if text else type(exc).__name__


# Sent from a trial to the driver by options (`settings.configure_trial_process`)
SENT_BY_OPTIONS = (pafs.S3FileSystem,)


def filesystem_options(fs: pafs.FileSystem) -> bytes:
    """What a trial sends of a filesystem: pyarrow's own pickling of it (its constructor and
    options; never credentials, which come from the environment and are refused in a URI)."""
    return pickle.dumps(fs.__reduce__())


@functools.lru_cache(maxsize=16)
def filesystem_from_options(options: bytes) -> pafs.FileSystem:
    """The filesystem `filesystem_options` sent, made once per process and options.

    Every checkpoint a trial reports reaches the driver carrying its filesystem. Unpickled
    afresh, a pyarrow `S3FileSystem` whose credentials come from the environment builds AWS's
    default credential chain, which loads the system's CA certificates: 9.3 ms of the driver's
    CPU per checkpoint here, and toxtune's trials checkpoint every epoch (RESULTS "A
    checkpoint's filesystem, made once in the driver"). A pyarrow filesystem is immutable and
    safe to share between threads, so the driver keeps one per set of options."""
    constructor, args = pickle.loads(options)
    return constructor(*args)


def upload_files(local_path: str, fs: pafs.S3FileSystem, fs_path: str) -> None:
    """Copy a local file, or each file under a local folder, to `fs_path` in a bucket: one PUT
    a file (a file larger than a part still goes in parts), and no folder, which a bucket
    does not need (a folder is a key prefix; an empty local folder is left out)."""
    writer = _writer(filesystem_options(fs))
    if os.path.isfile(local_path):
        pairs = [(local_path, fs_path)]
    else:
        pairs = []
        for root, _, files in os.walk(local_path):
            rel = os.path.relpath(root, local_path)
            prefix = fs_path if rel == "." else posixpath.join(fs_path, *rel.split(os.sep))
            pairs += [(os.path.join(root, name), f"{prefix}/{name}") for name in files]
    for source, target in pairs:
        with open(source, "rb") as src, writer.open_output_stream(target) as out:
            shutil.copyfileobj(src, out, 8 << 20)


@functools.lru_cache(maxsize=16)
def _writer(options: bytes) -> pafs.FileSystem:
    """The filesystem of `options` with delayed opens: a stream closed before its first part
    is full is sent as one PUT, not as a three-request multipart upload. `options` is
    pyarrow's reduction (`s3_options`)."""
    constructor, kwargs = s3_options(options)
    return constructor({**kwargs, "allow_delayed_open": True})


def s3_options(options: bytes) -> tuple[Any, dict[str, Any]]:
    """The constructor and keyword options of an S3 filesystem `filesystem_options` sent:
    pyarrow's reduction, (constructor, (options,)), whose shape `bridge.check` checks."""
    constructor, (kwargs,) = pickle.loads(options)
    return constructor, kwargs


# S3's limit on the keys of one DeleteObjects request.
DELETE_BATCH = 1000
# Folders listed at once by `delete_folders` (a listing is one round trip; the client is shared).
LIST_THREADS = 8


def delete_folders(fs: pafs.S3FileSystem, paths: list[str]) -> dict[str, str]:
    """Delete every object under each folder of `paths` (pyarrow's "bucket/prefix" form) in a
    bucket, together: one listing a folder (LIST_THREADS at once), then one DeleteObjects
    request per DELETE_BATCH objects of all the folders. Returns {path: why} for each folder
    not wholly deleted; a folder already gone is no error, and a path naming a bucket itself is
    refused, never emptied. Through boto3 (pyarrow has no batched delete, and its `delete_dir`
    costs five requests a folder: a look, the listing, the delete, the folder's marker and a
    new marker for its parent); without boto3, for options it does not take (`s3_client`), or
    on a store that answers it has no DeleteObjects, one `delete_dir` a folder. A request that
    fails otherwise (no answer, throttling, a denial) fails its folders, named in the result.

    Why: a trial that checkpoints every epoch drops a checkpoint every epoch
    (`num_to_keep`), and one thread at five round trips a folder deletes 1 / (5 x RTT) of
    them a second, fewer than many trials save."""
    failed = {p: "a whole bucket, not a folder in one: not deleted" for p in paths if _is_bucket(p)}
    paths = [p for p in paths if p not in failed]
    client = s3_client(filesystem_options(fs)) if paths else None
    if client is None:
        return {**failed, **_delete_each(fs, paths)}
    with ThreadPoolExecutor(min(LIST_THREADS, len(paths))) as pool:
        listed = list(pool.map(lambda p: _listing(client, p), paths))
    owner: dict[tuple[str, str], str] = {}  # (bucket, key): the folder it is deleted for
    by_bucket: dict[str, list[str]] = {}
    for path, (keys, error) in zip(paths, listed, strict=True):
        if error:
            failed[path] = error
        for bucket, key in keys:
            owner[(bucket, key)] = path
            by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), DELETE_BATCH):
            chunk = keys[start : start + DELETE_BATCH]
            try:
                answer = client.delete_objects(
                    Bucket=bucket,
                    Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True},
                )
            except Exception as exc:
                folders = sorted({owner[(bucket, key)] for key in chunk})
                if _lacks_batch_delete(exc):  # a store without DeleteObjects: one by one
                    failed.update(_delete_each(fs, folders))
                else:  # an outage, throttling, a denial: five requests a folder would not do
                    failed.update(dict.fromkeys(folders, _reason(exc)))  # better, only more
                continue
            for error in answer.get("Errors", []):
                why = f"{error.get('Code', '')} {error.get('Message', '')}".strip()
                failed.setdefault(owner[(bucket, error["Key"])], f"{error['Key']}: {why}")
    return failed


# A store's answers that it has no DeleteObjects (S3's code for an operation a store lacks,
# and the HTTP statuses of one it does not route).
_NO_BATCH_DELETE_CODES = frozenset({"NotImplemented", "MethodNotAllowed", "501", "405"})


def _lacks_batch_delete(exc: Exception) -> bool:
    """Whether boto3's error is the store saying it has no DeleteObjects; not a lost
    connection, a throttling answer (SlowDown) or a denial, which each folder's own
    `delete_dir` would meet again at five times the requests."""
    answer = getattr(exc, "response", None) or {}
    code = str(answer.get("Error", {}).get("Code", ""))
    status = str(answer.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return bool({code, status} & _NO_BATCH_DELETE_CODES)


def _is_bucket(path: str) -> bool:
    return not path.strip("/").partition("/")[2].strip("/")


def _listing(client: Any, path: str) -> tuple[list[tuple[str, str]], str]:
    """(bucket, key) of every object under the folder `path`, or the listing's error. The
    prefix ends in "/": checkpoint_1 is not a prefix of checkpoint_10's keys."""
    bucket, _, prefix = path.strip("/").partition("/")
    keys: list[tuple[str, str]] = []
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix.rstrip('/')}/"
        )
        for page in pages:
            keys += [(bucket, o["Key"]) for o in page.get("Contents", [])]
    except Exception as exc:
        return keys, _reason(exc)
    return keys, ""


def _delete_each(fs: pafs.FileSystem, paths: list[str]) -> dict[str, str]:
    failed = {}
    for path in paths:
        try:
            fs.delete_dir(path)
        except FileNotFoundError:
            pass  # gone already
        except OSError as exc:
            failed[path] = _reason(exc)
    return failed


_CLIENT_LOCK = threading.Lock()


@functools.lru_cache(maxsize=16)
def _cached_client(options: bytes) -> Any | None:
    _, kwargs = s3_options(options)
    if kwargs.get("role_arn") or (kwargs.get("proxy_options") or {}).get("host"):
        return None  # options boto3 would be told differently: pyarrow's own path
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError:
        return None
    endpoint = kwargs.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{kwargs.get('scheme') or 'https'}://{endpoint}"
    style = "virtual" if kwargs.get("force_virtual_addressing") else "path" if endpoint else "auto"
    config = Config(
        s3={"addressing_style": style},
        max_pool_connections=LIST_THREADS,
        **({"signature_version": UNSIGNED} if kwargs.get("anonymous") else {}),
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=kwargs.get("region") or None,
        aws_access_key_id=kwargs.get("access_key") or None,
        aws_secret_access_key=kwargs.get("secret_key") or None,
        aws_session_token=kwargs.get("session_token") or None,
        verify=kwargs.get("tls_ca_file_path") or None,
        config=config,
    )


def s3_client(options: bytes) -> Any | None:
    """A boto3 S3 client for the bucket a pyarrow `S3FileSystem` of these options
    (`filesystem_options`) reaches: its endpoint, region and addressing, credentials as
    pyarrow takes them (the environment's, unless the options carry them). None without boto3
    (`toxtune[team]` installs it), or for an assumed role or a proxy. One per options and
    process; boto3's clients are safe to share between threads."""
    with _CLIENT_LOCK:
        return _cached_client(options)
