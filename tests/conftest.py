"""Shared fixtures: the real Tox21/ToxCast files (skipped when absent), small CSVs, test SMILES;
`traced_peak` for memory assertions."""

from __future__ import annotations

import gzip
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules with the most end-to-end (`slow`) tests first, each module's tests
    together and in their order. `make test`'s workers (xdist worksteal) start on the long
    tests and share the short ones at the end, instead of one long test running alone last;
    a module stays whole, so its module-scoped services start once."""
    slow: dict[str, int] = {}
    for item in items:
        slow[item.module.__name__] = slow.get(item.module.__name__, 0) + bool(
            item.get_closest_marker("slow")
        )
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.module.__name__, i)
    items.sort(key=lambda it: (-slow[it.module.__name__], first[it.module.__name__]))


# Varied drug-like and simple molecules (several ring systems, salts, stereo, acyclics).
VALID_SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "CC(=O)Nc1ccc(O)cc1",
    "CN1CCC[C@H]1c1cccnc1",
    "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21",
    "COc1ccc2cc(ccc2c1)[C@H](C)C(=O)O",
    "CN(C)C(=N)N=C(N)N",
    "CCO",
    "c1ccccc1",
    "Oc1ccccc1",
    "Cc1ccccc1",
    "c1ccncc1",
    "C1CCCCC1",
    "CN1CC[C@]23c4c5ccc(O)c4O[C@H]2[C@@H](O)C=C[C@H]3[C@H]1C5",
    "C[C@]12CC[C@H]3[C@@H](CCC4=CC(=O)CC[C@@]34C)[C@@H]1CC[C@@H]2O",
    "C[C@]12CC[C@H]3[C@@H](CCc4cc(O)ccc34)[C@@H]1CC[C@@H]2O",
    "CC(C)(c1ccc(O)cc1)c1ccc(O)cc1",
    "CCNc1nc(Cl)nc(NC(C)C)n1",
    "CN(C)CCCN1c2ccccc2Sc2ccc(Cl)cc21",
    "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1",
    "CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O",
    "CCN(CC)CC(=O)Nc1c(C)cccc1C",
    "CC(C)NCC(O)COc1cccc2ccccc12",
    "Cc1cc(NS(=O)(=O)c2ccc(N)cc2)no1",
    "OC(=O)c1cn(C2CC2)c2cc(N3CCNCC3)c(F)cc2c1=O",
    "Oc1cc(Cl)ccc1Oc1ccc(Cl)cc1Cl",
    "ClC(Cl)(Cl)C(c1ccc(Cl)cc1)c1ccc(Cl)cc1",
    "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O",
    "CC(=O)O",
    "CC(=O)[O-].[Na+]",
    "c1ccccc1CC(=O)O.Cl",
    "NC(=O)N1c2ccccc2C=Cc2ccccc21",
    "c1ccc2[nH]ccc2c1",
    "c1ccc2ncccc2c1",
    "c1ccc2ccccc2c1",
    "CCCCCC(=O)O",
    "CCC(=C(c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1",
    "CCCC(CCC)C(=O)O",
    "O=[N+]([O-])c1ccccc1",
    "OC(=O)c1ccccc1",
]
# Unclosed ring, kekulization failure, syntax error, empty, hypervalent aluminium.
INVALID_SMILES = ["C1CC", "c1cccc1", "xyz", "", "CC(=O)O[AlH3](O)O"]

T = TypeVar("T")


def traced_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """`fn()` and the peak bytes Python and numpy allocated while it ran (tracemalloc sees
    numpy's buffers, so a memory bound is exact, not timed)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="session")
def tox21_path() -> Path:
    """The shared Tox21 CSV (smiles + 12 tasks, 7,831 rows); skips the test when absent."""
    path = SHARED_DATA / "tox21.csv"
    if not path.is_file():
        pytest.skip(f"real Tox21 data not available at {path}")
    return path


@pytest.fixture(scope="session")
def toxcast_path() -> Path:
    """The shared ToxCast CSV.GZ (smiles + 617 tasks); skips the test when absent."""
    path = SHARED_DATA / "toxcast.csv.gz"
    if not path.is_file():
        pytest.skip(f"real ToxCast data not available at {path}")
    return path


@pytest.fixture
def make_csv(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small CSV into tmp_path; gzip-compressed when the name ends in .gz.

    content: raw text, raw bytes (written as given, e.g. non-UTF-8), or a mapping / DataFrame of
    columns.
    """

    def _make(
        content: str | bytes | Mapping[str, Sequence[Any]] | Any, name: str = "data.csv"
    ) -> Path:
        import pandas as pd

        if isinstance(content, Mapping):
            content = pd.DataFrame(dict(content))
        if isinstance(content, pd.DataFrame):
            data = content.to_csv(index=False).encode("utf-8")
        elif isinstance(content, str):
            data = content.encode("utf-8")
        else:
            data = bytes(content)
        if name.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return _make


@pytest.fixture
def tiny_smiles() -> list[str]:
    """41 valid SMILES with 5 invalid ones interleaved (rows 3, 11, 19, 27, 35)."""
    items = list(VALID_SMILES)
    for i, bad in enumerate(INVALID_SMILES):
        items.insert(3 + 8 * i, bad)
    return items
