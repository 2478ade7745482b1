"""Featurization: agreement with RDKit, invalid rows, salts, the disk cache, descriptor scaling."""

from __future__ import annotations

import csv
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rdkit import Chem, DataStructs
from rdkit.Chem import MACCSkeys, rdFingerprintGenerator

from tests.conftest import traced_peak
from toxmodel import featurize as featurize_module
from toxmodel.data import load_table
from toxmodel.featurize import (
    MACCS_BITS,
    MAX_SMILES_LENGTH,
    DescriptorScaler,
    FeatureChunk,
    Features,
    FeaturizerConfig,
    InvalidSmiles,
    assemble,
    canonical_smiles,
    descriptor_names,
    feature_cache_path,
    featurize,
    featurize_cached,
    featurize_chunk,
    fingerprint_width,
    write_invalid_report,
)

TOX21_INVALID_ROWS = [1322, 2290, 2297, 3558, 4565, 4649, 5538, 6723]
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"


def _rdkit_bits(smiles: str, radius: int, n_bits: int) -> np.ndarray:
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    return gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(smiles))


def _expected_invalid_rows(smiles: list[str]) -> list[int]:
    return [i for i, s in enumerate(smiles) if not s or Chem.MolFromSmiles(s) is None]


@pytest.fixture(scope="module")
def tox21_bits(tox21_path: Path) -> tuple[list[str], Features]:
    smiles = load_table(tox21_path).smiles
    return smiles, featurize(smiles, FeaturizerConfig())


@pytest.mark.parametrize(("radius", "n_bits"), [(2, 2048), (3, 1024), (1, 100)])
def test_bits_match_rdkit_generator(radius: int, n_bits: int) -> None:
    features = featurize([ASPIRIN, "c1ccccc1O"], FeaturizerConfig(radius=radius, n_bits=n_bits))
    assert features.fingerprint.dtype == np.uint8
    assert features.fingerprint.shape == (2, n_bits)
    np.testing.assert_array_equal(features.fingerprint[0], _rdkit_bits(ASPIRIN, radius, n_bits))
    np.testing.assert_array_equal(features.fingerprint[1], _rdkit_bits("c1ccccc1O", radius, n_bits))


def test_counts_differ_from_bits_and_clip() -> None:
    chain = "C" * 300  # ~298 identical CH2 environments: the count must clip at 255
    config = FeaturizerConfig(counts=True, n_bits=1024)
    counts = featurize([ASPIRIN, chain], config).fingerprint
    bits = featurize([ASPIRIN, chain], FeaturizerConfig(n_bits=1024)).fingerprint
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    expected = gen.GetCountFingerprintAsNumPy(Chem.MolFromSmiles(ASPIRIN))
    np.testing.assert_array_equal(counts[0], np.minimum(expected, 255))
    assert counts.dtype == np.uint8
    assert not np.array_equal(counts, bits)
    np.testing.assert_array_equal(counts > 0, bits > 0)
    assert counts[1].max() == 255


def test_maccs_appended() -> None:
    features = featurize([ASPIRIN], FeaturizerConfig(n_bits=256, maccs=True))
    assert features.fingerprint.shape == (1, 256 + MACCS_BITS)
    expected = np.zeros(MACCS_BITS, np.uint8)
    DataStructs.ConvertToNumpyArray(MACCSkeys.GenMACCSKeys(Chem.MolFromSmiles(ASPIRIN)), expected)
    np.testing.assert_array_equal(features.fingerprint[0, 256:], expected)
    np.testing.assert_array_equal(features.fingerprint[0, :256], _rdkit_bits(ASPIRIN, 2, 256))


def test_descriptors_raw_float32() -> None:
    config = FeaturizerConfig(n_bits=64, descriptors=True)
    features = featurize(["CCO", ASPIRIN, "[Na+].[Cl-]"], config, n_jobs=1)
    names = descriptor_names()
    assert features.descriptors.shape == (3, len(names))
    assert features.descriptors.dtype == np.float32
    assert features.n_features == 64 + len(names)
    mol_wt = features.descriptors[:, names.index("MolWt")]
    np.testing.assert_allclose(mol_wt[:2], [46.069, 180.159], atol=0.01)
    assert not np.isinf(features.descriptors).any()  # inf is stored as NaN


def test_no_descriptors_gives_empty_block(tiny_smiles: list[str]) -> None:
    features = featurize(tiny_smiles, FeaturizerConfig(n_bits=128))
    assert features.descriptors.shape == (len(features), 0)
    assert features.descriptors.dtype == np.float32
    assert features.n_features == 128


def test_invalid_rows_reported_never_dropped(tiny_smiles: list[str]) -> None:
    features = featurize(tiny_smiles, FeaturizerConfig(n_bits=256), n_jobs=1)
    bad_rows = [item.row for item in features.invalid]
    assert bad_rows == _expected_invalid_rows(tiny_smiles) == [3, 11, 19, 27, 35]
    assert sorted([*features.valid_rows.tolist(), *bad_rows]) == list(range(len(tiny_smiles)))
    assert features.valid_rows.dtype == np.int64
    reasons = {item.smiles: item.reason for item in features.invalid}
    assert "unclosed ring" in reasons["C1CC"]
    assert "kekulize" in reasons["c1cccc1"]
    assert "syntax error" in reasons["xyz"]
    assert reasons[""] == "empty SMILES"
    assert "valence" in reasons["CC(=O)O[AlH3](O)O"]
    assert "[" not in reasons["C1CC"][:1]  # RDKit's timestamps are stripped


def test_odd_inputs() -> None:
    long = "C" * (MAX_SMILES_LENGTH + 1)
    features = featurize(["  CCO  ", long, None, float("nan"), 7, "   "], FeaturizerConfig())  # type: ignore[list-item]
    assert features.valid_rows.tolist() == [0]
    reasons = [item.reason for item in features.invalid]
    assert f"longer than {MAX_SMILES_LENGTH}" in reasons[0]
    assert reasons[1:3] == ["empty SMILES", "empty SMILES"]
    assert "must be text" in reasons[3]
    assert reasons[4] == "empty SMILES"
    np.testing.assert_array_equal(features.fingerprint[0], _rdkit_bits("CCO", 2, 2048))


def test_empty_input() -> None:
    features = featurize([], FeaturizerConfig(n_bits=32, maccs=True))
    assert features.fingerprint.shape == (0, 32 + MACCS_BITS)
    assert features.valid_rows.shape == (0,) and features.invalid == []


def test_text_rdkit_would_truncate_is_refused() -> None:
    texts = ["CC\u00e9", "C\nC", "CC ethanol", "C[C@H](O)CC |&1:1|"]
    features = featurize(texts, FeaturizerConfig(), n_jobs=1)
    assert features.valid_rows.tolist() == [3]  # a CXSMILES extension block is fine
    reasons = [item.reason for item in features.invalid]
    assert "non-ASCII character '\u00e9' at position 2" in reasons[0]
    assert "whitespace" in reasons[1] and "position 1" in reasons[1]
    assert "whitespace" in reasons[2]


def test_salts_without_standardize_keep_counterions() -> None:
    features = featurize(["CC(=O)[O-].[Na+]", "CC(=O)O"], FeaturizerConfig())
    assert not np.array_equal(features.fingerprint[0], features.fingerprint[1])


@pytest.mark.parametrize(
    ("salt", "parent"),
    [("CC(=O)[O-].[Na+]", "CC(=O)O"), ("c1ccccc1CC(=O)O.Cl", "OC(=O)Cc1ccccc1")],
)
def test_standardize_strips_salts(salt: str, parent: str) -> None:
    config = FeaturizerConfig(standardize=True, maccs=True, descriptors=True)
    features = featurize([salt, parent], config, n_jobs=1)
    assert features.invalid == []
    np.testing.assert_array_equal(features.fingerprint[0], features.fingerprint[1])
    np.testing.assert_array_equal(features.descriptors[0], features.descriptors[1])


def test_pool_matches_in_process(tiny_smiles: list[str]) -> None:
    config = FeaturizerConfig(n_bits=512, counts=True, maccs=True)
    pooled = featurize(tiny_smiles * 3, config, n_jobs=2)
    single = featurize(tiny_smiles * 3, config, n_jobs=1)
    np.testing.assert_array_equal(pooled.fingerprint, single.fingerprint)
    np.testing.assert_array_equal(pooled.valid_rows, single.valid_rows)
    assert pooled.invalid == single.invalid


def test_chunks_of_any_size_assemble_to_the_whole(tiny_smiles: list[str]) -> None:
    """What the cluster relies on: chunks computed anywhere, in any order, then assembled in
    input order equal one `featurize` of the whole list (row ids global, invalid rows kept)."""
    config = FeaturizerConfig(n_bits=128, maccs=True, descriptors=True)
    items = tiny_smiles * 2
    bounds = [0, 1, 9, 10, 40, 41, 70, len(items)]
    spans = list(itertools.pairwise(bounds))
    made = {start: featurize_chunk(items[start:end], start, config) for start, end in spans[::-1]}
    whole = featurize(items, config, n_jobs=1)
    got = assemble([made[start] for start, _ in spans], config)
    np.testing.assert_array_equal(got.fingerprint, whole.fingerprint)
    np.testing.assert_array_equal(got.descriptors, whole.descriptors)
    np.testing.assert_array_equal(got.valid_rows, whole.valid_rows)
    assert got.invalid == whole.invalid and whole.invalid  # invalid rows in several chunks
    assert got.canonical == whole.canonical


@pytest.mark.parametrize(
    ("counts", "maccs"),
    [(False, False), (False, True), (True, False)],
    ids=["bits", "maccs", "counts"],
)
def test_assembling_chunks_holds_one_matrix_not_two(counts: bool, maccs: bool) -> None:
    """At 10^6 molecules the matrix is a gigabyte: joining the workers' packed chunks must not
    build a second matrix-sized array on the way (numpy's allocations are seen by tracemalloc)."""
    config = FeaturizerConfig(n_bits=1024, counts=counts, maccs=maccs)
    rng = np.random.default_rng(0)
    chunks, start = [], 0
    for size in [400] * 100 + [123]:
        bits = rng.random((size, 1024)) < 0.05
        morgan = bits.astype(np.uint8) * 3 if counts else np.packbits(bits, 1, bitorder="little")
        maccs_bits = np.packbits(rng.random((size, MACCS_BITS)) < 0.2, 1, bitorder="little")
        chunks.append(
            FeatureChunk(
                np.arange(start, start + size),
                morgan,
                maccs_bits if maccs else np.zeros((size, 0), np.uint8),
                np.zeros((size, 0), np.float32),
                [],
                [f"C{i}" for i in range(start, start + size)],
            )
        )
        start += size
    got, peak = traced_peak(lambda: assemble(chunks, config))
    matrix = got.fingerprint.nbytes
    assert peak < 1.3 * matrix, f"peak {peak / 1e6:.1f} MB for a {matrix / 1e6:.1f} MB matrix"
    whole = np.concatenate([c.morgan for c in chunks])
    want = whole if counts else np.unpackbits(whole, 1, count=1024, bitorder="little")
    np.testing.assert_array_equal(got.fingerprint[:, :1024], want)
    if maccs:
        packed = np.concatenate([c.maccs for c in chunks])
        np.testing.assert_array_equal(
            got.fingerprint[:, 1024:], np.unpackbits(packed, 1, count=MACCS_BITS, bitorder="little")
        )
    assert got.fingerprint.shape == (start, fingerprint_width(config))


def test_small_input_stays_in_process(
    tiny_smiles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process pool was started for a small input")

    monkeypatch.setattr(featurize_module, "ProcessPoolExecutor", no_pool)
    assert len(featurize(tiny_smiles, FeaturizerConfig())) == 41


def test_broken_pool_falls_back(
    tiny_smiles: list[str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_pool(*args: object, **kwargs: object) -> None:
        raise OSError("cannot fork")

    monkeypatch.setattr(featurize_module, "ProcessPoolExecutor", failing_pool)
    with caplog.at_level(logging.WARNING, logger="toxmodel.featurize"):
        features = featurize(tiny_smiles, FeaturizerConfig(), n_jobs=2)
    assert len(features) == 41
    assert "continuing in-process" in caplog.text


def test_bad_n_jobs() -> None:
    with pytest.raises(ValueError, match="n_jobs"):
        featurize(["C"], FeaturizerConfig(), n_jobs=0)


def test_progress_bar(tiny_smiles: list[str]) -> None:
    assert len(featurize(tiny_smiles, FeaturizerConfig(n_bits=64), progress=True)) == 41


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(max_size=60), min_size=1, max_size=4))
def test_fuzz_never_raises(texts: list[str]) -> None:
    features = featurize(texts, FeaturizerConfig(n_bits=64, maccs=True), n_jobs=1)
    invalid_rows = [item.row for item in features.invalid]
    assert sorted([*features.valid_rows.tolist(), *invalid_rows]) == list(range(len(texts)))
    assert all(item.reason for item in features.invalid)
    assert features.fingerprint.shape == (len(features.valid_rows), 64 + MACCS_BITS)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="CNOSPFclcnos()[]=#123%+-@H.:/\\*0 ", max_size=40))
def test_fuzz_smiles_alphabet(text: str) -> None:
    config = FeaturizerConfig(n_bits=64, counts=True, standardize=True)
    features = featurize([text], config, n_jobs=1)
    assert len(features.valid_rows) + len(features.invalid) == 1
    if features.invalid:
        assert features.invalid[0].row == 0 and features.invalid[0].reason


# ---------------------------------------------------------------- the disk cache


def _no_rdkit(task: object) -> None:
    raise AssertionError("featurized again on a cache hit")


def test_cache_hit_is_served_from_file(
    tiny_smiles: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = FeaturizerConfig(n_bits=256, descriptors=True)
    cold = featurize_cached(tiny_smiles, config, tmp_path, "ab" * 32, n_jobs=1)
    path = feature_cache_path(tmp_path, "ab" * 32, config)
    assert path == tmp_path / "features" / f"{'ab' * 8}-{config.key()}.npz"
    assert path.is_file()
    assert not list(path.parent.glob("*.tmp"))

    monkeypatch.setattr(featurize_module, "_featurize_chunk", _no_rdkit)
    hit = featurize_cached(tiny_smiles, config, tmp_path, "ab" * 32)
    np.testing.assert_array_equal(hit.fingerprint, cold.fingerprint)
    np.testing.assert_array_equal(hit.descriptors, cold.descriptors)  # NaNs compare equal here
    np.testing.assert_array_equal(hit.valid_rows, cold.valid_rows)
    assert hit.invalid == cold.invalid and hit.config == config
    assert hit.canonical == cold.canonical and len(hit.canonical) == len(hit)
    assert hit.fingerprint.dtype == np.uint8 and hit.descriptors.dtype == np.float32


def test_a_mapped_cache_hit_gives_the_same_features_read_only(
    tiny_smiles: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = FeaturizerConfig(n_bits=256, maccs=True, descriptors=True)
    cold = featurize_cached(tiny_smiles, config, tmp_path, "ad" * 32, n_jobs=1)
    monkeypatch.setattr(featurize_module, "_featurize_chunk", _no_rdkit)
    hit = featurize_cached(tiny_smiles, config, tmp_path, "ad" * 32, mapped=True)
    assert isinstance(hit.fingerprint, np.memmap) and isinstance(hit.descriptors, np.memmap)
    np.testing.assert_array_equal(hit.fingerprint, cold.fingerprint)
    np.testing.assert_array_equal(hit.descriptors, cold.descriptors)
    np.testing.assert_array_equal(hit.valid_rows, cold.valid_rows)
    assert hit.invalid == cold.invalid and hit.canonical == cold.canonical
    with pytest.raises(ValueError, match="read-only"):
        hit.fingerprint[0, 0] = 1  # the cache file cannot be changed through it


def test_a_mapped_cache_hit_does_not_load_the_matrix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`toxtune data` on a cached 10^6-row file needs the keys, not the 2 GB matrix."""
    n, config = 20_000, FeaturizerConfig(n_bits=2048)
    rng = np.random.default_rng(0)
    made = Features(
        (rng.random((n, 2048)) < 0.05).astype(np.uint8),
        np.zeros((n, 0), np.float32),
        np.arange(n),
        [],
        config,
        [f"C{i}" for i in range(n)],
    )
    smiles = [f"C{i}" for i in range(n)]
    monkeypatch.setattr(featurize_module, "featurize", lambda *args, **kwargs: made)
    featurize_cached(smiles, config, tmp_path, "ae" * 32)
    peaks = {}
    for mapped in (False, True):
        hit, peaks[mapped] = traced_peak(
            lambda mapped=mapped: featurize_cached(
                smiles, config, tmp_path, "ae" * 32, mapped=mapped
            )
        )
        assert hit.fingerprint.shape == made.fingerprint.shape and hit.canonical == made.canonical
    matrix = made.fingerprint.nbytes
    assert peaks[False] > matrix  # what a plain read costs
    assert peaks[True] < 0.2 * matrix, f"mapped read peak {peaks[True] / 1e6:.1f} MB"
    np.testing.assert_array_equal(hit.fingerprint[::997], made.fingerprint[::997])


def test_cache_keyed_by_config_and_inputs(tiny_smiles: list[str], tmp_path: Path) -> None:
    bits = FeaturizerConfig(n_bits=128)
    counts = FeaturizerConfig(n_bits=128, counts=True)
    featurize_cached(tiny_smiles, bits, tmp_path, "h" * 64)
    featurize_cached(tiny_smiles, counts, tmp_path, "h" * 64)
    assert len(list((tmp_path / "features").glob("*.npz"))) == 2
    other = featurize_cached(["CCO"], bits, tmp_path, "h" * 64)  # same hash, different SMILES
    assert len(other) == 1


def test_corrupt_cache_is_recomputed(
    tiny_smiles: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = FeaturizerConfig(n_bits=128)
    first = featurize_cached(tiny_smiles, config, tmp_path, "c" * 64)
    path = feature_cache_path(tmp_path, "c" * 64, config)
    path.write_bytes(b"not an npz")
    with caplog.at_level(logging.WARNING, logger="toxmodel.featurize"):
        again = featurize_cached(tiny_smiles, config, tmp_path, "c" * 64)
    assert "unreadable" in caplog.text
    np.testing.assert_array_equal(again.fingerprint, first.fingerprint)
    assert path.stat().st_size > 100  # rewritten


def test_tox21_invalid_rows_and_cache_speed(
    tox21_path: Path, tox21_bits: tuple[list[str], Features], tmp_path: Path
) -> None:
    smiles, features = tox21_bits
    assert [item.row for item in features.invalid] == TOX21_INVALID_ROWS
    assert all("Al" in item.reason and "valence" in item.reason for item in features.invalid)
    assert features.fingerprint.shape == (7831 - 8, 2048)
    idx = int(np.flatnonzero(features.valid_rows == 100)[0])
    np.testing.assert_array_equal(features.fingerprint[idx], _rdkit_bits(smiles[100], 2, 2048))

    config = FeaturizerConfig()
    start = time.perf_counter()
    cold = featurize_cached(smiles, config, tmp_path, "t" * 64)
    cold_s = time.perf_counter() - start
    hit_s = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        hit = featurize_cached(smiles, config, tmp_path, "t" * 64)
        hit_s = min(hit_s, time.perf_counter() - start)
    np.testing.assert_array_equal(hit.fingerprint, cold.fingerprint)
    assert cold_s / hit_s >= 20, f"cache hit {hit_s:.4f}s vs cold {cold_s:.3f}s"


def test_write_invalid_report(tmp_path: Path) -> None:
    items = [InvalidSmiles(3, "C1CC", "unclosed ring"), InvalidSmiles(9, 'a,"b', "x, y")]
    path = write_invalid_report(items, tmp_path / "sub" / "invalid.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["line", "row", "smiles", "reason"],  # line: the file line, header = line 1
        ["5", "3", "C1CC", "unclosed ring"],
        ["11", "9", 'a,"b', "x, y"],
    ]
    empty = write_invalid_report([], tmp_path / "none.csv")
    assert empty.read_text().strip() == "line,row,smiles,reason"


def test_invalid_report_uses_the_table_lines(make_csv: Callable[..., Path], tmp_path: Path) -> None:
    table = load_table(make_csv('smiles,A\nCCO,1\n\n"C1\nCC",0\nxyz,1\nCC,0\n'))
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64), n_jobs=1)
    path = write_invalid_report(features.invalid, tmp_path / "invalid.csv", lines=table.lines)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert [(r[0], r[1], r[2]) for r in rows[1:]] == [("4", "1", "C1\nCC"), ("6", "2", "xyz")]


# ---------------------------------------------------------------- descriptor scaling


def test_scaler_robust_and_safe() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack(
        [
            rng.normal(100.0, 5.0, 200),  # ordinary column
            np.full(200, 3.0),  # constant
            np.where(np.arange(200) < 190, 0.0, 1.0),  # mostly zero: IQR 0, std fallback
            np.full(200, np.nan),  # all missing
            rng.normal(0.0, 1.0, 200),
        ]
    ).astype(np.float32)
    x[5, 4] = np.nan
    x[6, 4] = np.inf
    x[7, 0] = 1e30
    scaler = DescriptorScaler.fit(x)
    assert np.all(np.isfinite(scaler.scale)) and np.all(scaler.scale > 0)
    z = scaler.transform(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    assert np.all(np.isfinite(z)) and np.abs(z).max() <= 10.0
    assert np.all(z[:, 1] == 0) and np.all(z[:, 3] == 0)
    assert z[5, 4] == 0 and z[6, 4] == 0  # missing -> 0 after scaling
    assert z[7, 0] == 10.0  # clipped
    assert 0 < z[195, 2] < 10  # the rare 1s stay distinguishable, not blown up
    assert abs(float(np.median(z[:, 0]))) < 0.05


def test_scaler_on_real_descriptors_and_empty_block() -> None:
    smiles = ["CCO", "c1ccccc1", ASPIRIN, "CCCCCCCCCC", "OC(=O)c1ccccc1", "C1CCCCC1"]
    features = featurize(smiles, FeaturizerConfig(n_bits=32, descriptors=True), n_jobs=1)
    scaler = DescriptorScaler.fit(features.descriptors[:4])
    z = scaler.transform(features.descriptors)
    assert z.shape == features.descriptors.shape and np.abs(z).max() <= 10
    none = DescriptorScaler.fit(np.zeros((5, 0), np.float32))
    assert none.transform(np.zeros((3, 0), np.float32)).shape == (3, 0)
    with pytest.raises(ValueError, match="descriptor columns"):
        scaler.transform(np.zeros((2, 3)))


# ------------------------------------------------------------------------ molecule keys


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_features_carry_each_rows_molecule_key(n_jobs: int) -> None:
    smiles = ["OCC", "CCO", "CCO.[Na+].[Cl-]", "C(C)O", "bad(", "", "CC[O-].[Na+]", "c1ccccc1"]
    smiles = smiles * 30  # enough rows for the pool when n_jobs=2
    plain = featurize(smiles, FeaturizerConfig(n_bits=64), n_jobs=n_jobs)
    keys = plain.row_keys(len(smiles))
    assert keys[:8] == ["CCO", "CCO", "CCO.[Cl-].[Na+]", "CCO", "", "", "CC[O-].[Na+]", "c1ccccc1"]
    assert keys == canonical_smiles(smiles, FeaturizerConfig(n_bits=64))
    standard = FeaturizerConfig(n_bits=64, standardize=True)
    std_keys = featurize(smiles, standard, n_jobs=n_jobs).row_keys(len(smiles))
    assert std_keys[:8] == ["CCO", "CCO", "CCO", "CCO", "", "", "CCO", "c1ccccc1"]
    assert std_keys == canonical_smiles(smiles, standard)


def test_stereoisomers_share_a_key_as_they_share_their_features() -> None:
    """The model cannot tell stereoisomers apart (Morgan bits and MACCS keys ignore stereo, 2D
    descriptors see at most whether it is specified), so they are one molecule to the splits:
    one key, never in two parts."""
    smiles = ["C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O", "CC(N)C(=O)O", "F/C=C/F", "F/C=C\\F"]
    config = FeaturizerConfig(n_bits=2048, maccs=True, descriptors=True)
    features = featurize(smiles, config, n_jobs=1)
    keys = features.row_keys(len(smiles))
    for first, other in ((0, 1), (0, 2), (3, 4)):
        np.testing.assert_array_equal(features.fingerprint[other], features.fingerprint[first])
        assert keys[other] == keys[first]
    for first, mirror in ((0, 1), (3, 4)):  # R/S and E/Z: every feature the same
        np.testing.assert_array_equal(features.descriptors[mirror], features.descriptors[first])
    assert keys[0] != keys[3]
    assert keys == canonical_smiles(smiles, config)


def test_take_renumbers_rows_and_keeps_invalid_ones() -> None:
    smiles = ["CCO", "bad(", "c1ccccc1", "OCC", ""]
    features = featurize(smiles, FeaturizerConfig(n_bits=64), n_jobs=1)
    part = features.take([3, 1, 2, 4])
    assert part.valid_rows.tolist() == [0, 2]
    assert [(i.row, i.smiles) for i in part.invalid] == [(1, "bad("), (3, "")]
    np.testing.assert_array_equal(part.fingerprint, features.fingerprint[[2, 1]])
    assert part.canonical == ["CCO", "c1ccccc1"]
    assert part.row_keys(4) == ["CCO", "", "c1ccccc1", ""]
    with pytest.raises(IndexError):
        features.take([7])
