"""Loading tables: validation messages, the download cache, duplicates, summaries, real data."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from toxmodel import data as data_module
from toxmodel.data import (
    TOX21_TASKS,
    TOX21_URL,
    DataError,
    default_cache_dir,
    describe,
    load_table,
    resolve_source,
    summarize,
)
from toxmodel.featurize import FeaturizerConfig, featurize

SMALL = "smiles,mol_id,A,B\nCCO,M1,1,0\nc1ccccc1,M2,0,\nCC(=O)O,M3,,1\n"


# ---------------------------------------------------------------- a tiny local HTTP server


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


# ---------------------------------------------------------------- loading and validation


def test_load_small_csv_defaults(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL)
    table = load_table(path)
    assert table.tasks == ["A", "B"]  # mol_id is not a task
    assert table.smiles == ["CCO", "c1ccccc1", "CC(=O)O"]
    assert table.labels.dtype == np.float32
    np.testing.assert_array_equal(table.labels, [[1, 0], [0, np.nan], [np.nan, 1]])
    assert table.content_hash == hashlib.sha256(path.read_bytes()).hexdigest()
    assert table.source == str(path)
    assert table.conflicts == []
    assert len(table) == 3


def test_gzip_reads_like_plain(make_csv: Callable[..., Path]) -> None:
    plain = load_table(make_csv(SMALL, "a.csv"))
    packed = load_table(make_csv(SMALL, "a.csv.gz"))
    assert packed.smiles == plain.smiles
    np.testing.assert_array_equal(packed.labels, plain.labels)
    assert packed.content_hash != plain.content_hash  # hash of the bytes on disk


def test_default_targets_skip_ids_and_non_binary(make_csv: Callable[..., Path]) -> None:
    path = make_csv(
        {
            "compound_id": [0, 1, 1],
            "smiles": ["C", "CC", "CCC"],
            "weight": [16.0, 30.1, 44.1],
            "note": ["x", "y", "z"],
            "tox": [1, 0, 1],
            "flag": [True, False, True],
        }
    )
    table = load_table(path)
    assert table.tasks == ["tox", "flag"]
    np.testing.assert_array_equal(table.labels[:, 1], [1, 0, 1])


def test_explicit_targets_and_order(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(SMALL), targets=["B", "A"])
    assert table.tasks == ["B", "A"]
    np.testing.assert_array_equal(table.labels[0], [0, 1])


def test_custom_smiles_column_and_stripping(make_csv: Callable[..., Path]) -> None:
    path = make_csv("Drug,y\n  CCO  ,1\n,0\nNA,1\n")
    table = load_table(path, smiles_column="Drug")
    assert table.smiles == ["CCO", "", "NA"]  # empty cell kept as "", text kept verbatim
    assert table.tasks == ["y"]


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "tox.csv"
    with pytest.raises(DataError, match="not found") as info:
        load_table(missing)
    assert str(missing) in str(info.value)


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="directory"):
        load_table(tmp_path)


def test_empty_file(make_csv: Callable[..., Path]) -> None:
    path = make_csv(b"", "empty.csv")
    with pytest.raises(DataError, match="empty") as info:
        load_table(path)
    assert "empty.csv" in str(info.value)


def test_unreadable_file(make_csv: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_csv(SMALL, "locked.csv")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(DataError, match=r"cannot read data file .*locked\.csv: Permission denied"):
        load_table(path)


def test_blank_file(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"empty.*blank\.csv"):
        load_table(make_csv("\n\n", "blank.csv"))


def test_header_only_is_empty_dataset(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="no data rows") as info:
        load_table(make_csv("smiles,A\n", "header.csv"))
    assert "header.csv" in str(info.value)


def test_non_utf8_names_file(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A,note\nCCO,1,caf\u00e9\n".encode("latin-1"), "latin.csv")
    with pytest.raises(DataError, match="not UTF-8") as info:
        load_table(path)
    assert "latin.csv" in str(info.value)


def test_utf8_bom_is_accepted(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("\ufeffsmiles,A\nCCO,1\n"))
    assert table.smiles == ["CCO"]


def test_gz_name_without_gzip_content(make_csv: Callable[..., Path]) -> None:
    path = make_csv(b"smiles,A\nC,1\n", "plain.csv")
    fake = path.with_name("fake.csv.gz")
    path.rename(fake)
    with pytest.raises(DataError, match="not gzip-compressed") as info:
        load_table(fake)
    assert "fake.csv.gz" in str(info.value)


def test_truncated_gzip(make_csv: Callable[..., Path]) -> None:
    path = make_csv(SMALL * 20, "cut.csv.gz")
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataError, match=r"cut\.csv\.gz.*not a valid gzip"):
        load_table(path)


def test_unsupported_extension(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'"):
        load_table(make_csv(b"PK\x03\x04", "book.xlsx"))


def test_ragged_csv(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"ragged\.csv could not be parsed as CSV"):
        load_table(make_csv("smiles,A\nC,1\nCC,0,1,1\n", "ragged.csv"))


def test_missing_smiles_column_lists_columns(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError) as info:
        load_table(make_csv("SMILES,tox\nCCO,1\n"))
    message = str(info.value)
    assert "'smiles'" in message
    assert "available columns: 'SMILES', 'tox'" in message
    assert "did you mean 'SMILES'" in message


def test_missing_target_named(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"\['NR-XYZ'\] not found") as info:
        load_table(make_csv(SMALL), targets=["A", "NR-XYZ"])
    assert "'B'" in str(info.value)  # lists what is available


def test_smiles_column_cannot_be_target(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match="cannot be a target"):
        load_table(make_csv(SMALL), targets=["smiles"])


def test_non_binary_target_shows_values(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,act\nC,1\nCC,2\nCCC,active\nCCCC,0\n")
    with pytest.raises(DataError) as info:
        load_table(path, targets=["act"])
    message = str(info.value)
    assert "'act' is not binary" in message
    assert "'2'" in message and "'active'" in message
    assert "2 rows" in message


def test_all_missing_task_named(make_csv: Callable[..., Path]) -> None:
    path = make_csv("smiles,A,Empty\nC,1,\nCC,0,\n")
    with pytest.raises(DataError, match="task 'Empty' has no labels"):
        load_table(path, targets=["A", "Empty"])
    with pytest.raises(DataError, match="task 'Empty' has no labels"):
        load_table(path)


def test_no_binary_columns(make_csv: Callable[..., Path]) -> None:
    with pytest.raises(DataError, match=r"no binary \(0/1\) label columns.*--targets"):
        load_table(make_csv("smiles,logP\nC,1.5\nCC,2.5\n"))


def test_conflicting_duplicates_reported_not_dropped(
    make_csv: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    text = "smiles,A,B\nCCO,1,0\nCCO,0,0\nCC,1,1\nCC,1,\nC,0,1\n"
    with caplog.at_level(logging.WARNING, logger="toxmodel.data"):
        table = load_table(make_csv(text))
    assert len(table) == 5
    assert table.conflicts == ["CCO"]  # CC repeats with consistent labels
    assert any("1 SMILES occur more than once" in r.getMessage() for r in caplog.records)


def test_subset(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("smiles,A\nCCO,1\nCCO,0\nCC,1\n"))
    assert table.conflicts == ["CCO"]
    part = table.subset(np.array([2, 0]))
    assert part.smiles == ["CC", "CCO"]
    np.testing.assert_array_equal(part.labels[:, 0], [1, 1])
    assert part.conflicts == []
    assert part.tasks == table.tasks and part.source == table.source
    assert part.content_hash != table.content_hash  # never shares a feature-cache entry
    assert table.subset([2, 0]).content_hash == part.content_hash
    with pytest.raises(IndexError):
        table.subset([3])


# ---------------------------------------------------------------- sources, download and cache


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
    monkeypatch.setattr(data_module, "TOX21_URL", served.url("tox21.csv.gz"))
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


# ---------------------------------------------------------------- summaries


def test_summarize_lists_invalid_and_counts(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv("smiles,A,B\nCCO,1,0\nC1CC,0,\n,1,1\nc1ccccc1,0,0\n"))
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)
    text = summarize(table, features)
    assert "rows: 4" in text
    assert "valid SMILES: 2" in text and "invalid SMILES: 2" in text
    assert "row 1: 'C1CC'" in text and "unclosed ring" in text
    assert "row 2: ''" in text and "empty SMILES" in text
    summary = describe(table, features)
    a, b = summary.tasks
    assert (a.labelled, a.positives, a.negatives) == (4, 2, 2)
    assert (b.labelled, b.positives, b.negatives) == (3, 1, 2)
    assert a.positive_rate == pytest.approx(0.5)
    own = summarize(table)  # featurizes on its own (default config) when no features are given
    assert "invalid SMILES: 2" in own and "features per molecule: 2048" in own


# ---------------------------------------------------------------- real data


def test_tox21_real(tox21_path: Path) -> None:
    table = load_table(tox21_path)
    assert len(table) == 7831
    assert table.tasks == TOX21_TASKS
    assert table.labels.shape == (7831, 12)
    assert np.isnan(table.labels).any()
    assert set(np.unique(table.labels[~np.isnan(table.labels)])) == {0.0, 1.0}
    assert table.content_hash == hashlib.sha256(tox21_path.read_bytes()).hexdigest()
    assert TOX21_URL.endswith("tox21.csv.gz")


def test_tox21_moleculenet_layout_with_mol_id(
    tox21_path: Path, make_csv: Callable[..., Path]
) -> None:
    import pandas as pd

    frame = pd.read_csv(tox21_path).iloc[:50]
    frame["mol_id"] = [f"TOX{i}" for i in range(50)]
    frame = frame[[*TOX21_TASKS, "mol_id", "smiles"]]  # the column order of the MoleculeNet file
    table = load_table(make_csv(frame, "tox21.csv.gz"))
    assert table.tasks == TOX21_TASKS


def test_toxcast_real(toxcast_path: Path) -> None:
    table = load_table(toxcast_path)
    assert len(table.tasks) == 617
    assert table.labels.shape == (len(table), 617)
    assert len(table) > 8000
