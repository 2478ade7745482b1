"""Where a table's file comes from: a local path, or a URL (Tox21 by default) downloaded once
into the cache and checked there.

Contract: `resolve_source(source)` returns a local file for a path, a URL or None/"default"
(Tox21). A download goes to a temporary file, is checked (decompresses, parses, has the SMILES
column and rows), gets a sha256 sidecar and is renamed into place atomically; a cached copy whose
sha256 no longer matches its sidecar is downloaded again. Without network access the DataError
says to pass `--data PATH`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from toxmodel.csvfile import local_file, open_csv
from toxmodel.errors import DataError

log = logging.getLogger(__name__)

TOX21_URL = "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/tox21.csv.gz"
TOX21_TASKS: list[str] = [
    "NR-AR",
    "NR-AR-LBD",
    "NR-AhR",
    "NR-Aromatase",
    "NR-ER",
    "NR-ER-LBD",
    "NR-PPAR-gamma",
    "SR-ARE",
    "SR-ATAD5",
    "SR-HSE",
    "SR-MMP",
    "SR-p53",
]
DOWNLOAD_TIMEOUT_S = 20.0


def default_cache_dir() -> Path:
    """$TOXTUNE_CACHE_DIR, else ~/.cache/toxtune (downloads and feature files live here)."""
    env = os.environ.get("TOXTUNE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "toxtune"


def is_url(source: str | Path | None) -> bool:
    """True for http(s) URLs, which resolve_source downloads into the cache."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def is_default(source: str | Path | None) -> bool:
    """True for None or "default": the Tox21 download."""
    return source is None or (isinstance(source, str) and source.strip().lower() == "default")


def resolve_source(
    source: str | Path | None,
    cache_dir: Path | None = None,
    smiles_column: str = "smiles",
) -> Path:
    """A local file for `source` (see the module docstring)."""
    if is_default(source):
        source = TOX21_URL
    if is_url(source):
        return _cached_download(str(source), Path(cache_dir or default_cache_dir()), smiles_column)
    return local_file(source)  # type: ignore[arg-type]


def describe_source(source: str | Path | None) -> str:
    """What a table records as its source: the path or URL given (Tox21's URL by default)."""
    return TOX21_URL if is_default(source) else str(source)


def _cached_download(url: str, cache_dir: Path, smiles_column: str) -> Path:
    """The cached copy of `url`, downloaded (again) when absent or failing its sha256 check."""
    folder = cache_dir.expanduser() / "downloads"
    name = Path(urlparse(url).path).name or "data.csv"
    url_key = hashlib.sha256(url.encode()).hexdigest()[:12]
    target = folder / f"{url_key}-{name}"
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file() and sidecar.is_file():
        parts = sidecar.read_text(encoding="utf-8", errors="replace").split()
        expected = parts[0] if parts else ""
        if _sha256_file(target) == expected:
            return target
        log.warning("cached download %s is corrupt (sha256 mismatch); downloading again", target)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            _download(url, fh)
        digest = _check_download(url, tmp, name, smiles_column)
        _atomic_write_text(sidecar, f"{digest}  {target.name}\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("downloaded %s to %s", url, target)
    return target


def _check_download(url: str, path: Path, name: str, smiles_column: str) -> str:
    """The sha256 of a downloaded file, read through once: it must be a table with
    `smiles_column` and at least one row (DataError naming the URL otherwise)."""
    try:
        with open_csv(path, None, name=name) as table:
            rows = sum(len(chunk) for chunk in table.chunks())
            digest = table.content_hash()
    except DataError as exc:
        raise DataError(f"download from {url} is not a usable CSV: {exc}") from exc
    if smiles_column not in table.columns or rows == 0:
        raise DataError(
            f"download from {url} has no '{smiles_column}' column or no rows "
            f"(columns: {table.columns[:10]})"
        )
    return digest


def _download(url: str, fh: Any) -> None:
    """Stream `url` into `fh`; any network failure becomes a DataError pointing at --data."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            while block := response.read(1 << 20):
                fh.write(block)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = exc.reason if type(exc) is urllib.error.URLError else exc
        raise DataError(
            f"could not download {url} ({reason}). Without network access, pass a local "
            f"CSV/CSV.GZ file with `--data PATH` (for Tox21: a copy of {TOX21_URL})."
        ) from exc


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            hasher.update(block)
    return hasher.hexdigest()
