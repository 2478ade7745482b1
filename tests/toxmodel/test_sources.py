"""Where a table comes from: local paths, the download cache with its sha256 sidecar, Tox21 by
default, and what a failed download says."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from toxmodel import sources
from toxmodel.data import load_table
from toxmodel.errors import DataError
from toxmodel.sources import default_cache_dir, resolve_source

SMALL = "smiles,mol_id,A,B\nCCO,M1,1,0\nc1ccccc1,M2,0,\nCC(=O)O,M3,,1\n"


@dataclass
class Served:
    """A loopback HTTP server over one folder, counting the requests it answered."""

    root: Path
    port: int
    hits: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "www"
    root.mkdir()
    state = Served(root=root, port=0)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            state.hits.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _publish(served: Served, name: str, text: str) -> bytes:
    data = gzip.compress(text.encode(), mtime=0) if name.endswith(".gz") else text.encode()
    (served.root / name).write_bytes(data)
    return data


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TOXTUNE_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TOXTUNE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "toxtune"


def test_local_path_passes_through(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL)
    assert resolve_source(str(path)) == path


def test_download_once_with_sidecar(served: Served, tmp_path: Path) -> None:
    payload = _publish(served, "tox.csv.gz", SMALL)
    url = served.url("tox.csv.gz")
    cache = tmp_path / "cache"
    first = resolve_source(url, cache)
    assert first.read_bytes() == payload
    assert first.is_relative_to(cache / "downloads")
    sidecar = first.with_name(first.name + ".sha256")
    assert sidecar.read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    assert resolve_source(url, cache) == first
    assert served.hits == ["/tox.csv.gz"]  # the second call was served from the cache
    assert not list((cache / "downloads").glob("*.part"))
    table = load_table(url, cache_dir=cache)
    assert table.source == url and table.tasks == ["A", "B"]
    assert table.content_hash == hashlib.sha256(payload).hexdigest()


def test_corrupt_cache_is_downloaded_again(served: Served, tmp_path: Path) -> None:
    payload = _publish(served, "tox.csv.gz", SMALL)
    url = served.url("tox.csv.gz")
    path = resolve_source(url, tmp_path)
    path.write_bytes(payload[:10])
    assert resolve_source(url, tmp_path).read_bytes() == payload
    assert len(served.hits) == 2


def test_default_source_is_tox21(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(served, "tox21.csv.gz", SMALL)
    monkeypatch.setattr(sources, "TOX21_URL", served.url("tox21.csv.gz"))
    assert resolve_source(None, tmp_path).name.endswith("tox21.csv.gz")
    assert resolve_source("default", tmp_path) == resolve_source(None, tmp_path)
    assert load_table(None, cache_dir=tmp_path).source == served.url("tox21.csv.gz")
    assert len(served.hits) == 1


def test_download_without_smiles_is_rejected(served: Served, tmp_path: Path) -> None:
    _publish(served, "bad.csv.gz", "name,A\nx,1\n")
    with pytest.raises(DataError, match="no 'smiles' column"):
        resolve_source(served.url("bad.csv.gz"), tmp_path)
    assert not list((tmp_path / "downloads").iterdir())  # nothing half-written left behind


def test_download_that_is_not_gzip_is_rejected(served: Served, tmp_path: Path) -> None:
    (served.root / "html.csv.gz").write_bytes(b"<html>oops</html>")
    with pytest.raises(DataError, match="not a usable CSV"):
        resolve_source(served.url("html.csv.gz"), tmp_path)


def test_http_error_says_use_data(served: Served, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"404.*--data PATH"):
        resolve_source(served.url("missing.csv.gz"), tmp_path)


def test_no_network_says_use_data(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/tox21.csv.gz"
    with pytest.raises(DataError) as info:
        load_table(url, cache_dir=tmp_path)
    message = str(info.value)
    assert url in message and "--data PATH" in message
    assert not list((tmp_path / "downloads").iterdir())
