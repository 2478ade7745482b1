"""Repeated molecules: conflicts by SMILES text, counts by molecule key, and one row per molecule
under each duplicates policy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from toxmodel.data import load_table
from toxmodel.duplicates import count_duplicates, deduplicate, find_conflicts
from toxmodel.featurize import FeaturizerConfig, featurize
from toxmodel.split import molecule_groups
from toxmodel.summary import describe

# Four spellings of ethanol (two of them salts, which standardize folds in), methanol twice,
# benzene once, an invalid row. Tasks: A conflicts 2-1 for ethanol, B ties 1-1, C agrees.
REPEATS = (
    "smiles,A,B,C\n"
    "CCO,1,1,0\n"  # line 2
    "OCC,1,,0\n"  # line 3
    "bad(,1,0,1\n"  # line 4
    "CO,0,1,\n"  # line 5
    "CCO.[Na+].[Cl-],0,0,\n"  # line 6 (one molecule with CCO only when standardized)
    "c1ccccc1,1,0,1\n"  # line 7
    "OC,0,1,1\n"  # line 8
)


def _keys(table: object, standardize: bool) -> list[str]:
    from toxmodel.featurize import canonical_smiles

    return canonical_smiles(table.smiles, FeaturizerConfig(standardize=standardize))


def test_duplicates_are_counted_by_molecule_not_text(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(REPEATS))
    assert table.conflicts == []  # no SMILES text repeats
    plain = count_duplicates(_keys(table, False), table.labels)
    assert (plain.shared_rows, plain.molecules, plain.conflicting) == (4, 2, 0)
    standard = count_duplicates(_keys(table, True), table.labels)
    assert (standard.shared_rows, standard.molecules, standard.conflicting) == (5, 2, 1)
    features = featurize(table.smiles, FeaturizerConfig(n_bits=64, standardize=True), n_jobs=1)
    text = describe(table, features).format()
    assert "rows sharing a molecule with another row: 5 (2 molecules" in text
    assert "molecules with conflicting labels: 1" in text


@pytest.mark.parametrize(
    ("policy", "ethanol", "methanol"),
    [
        # ethanol rows: A 1,1,0 -> majority 1 / conflict; B 1,-,0 -> tie / conflict; C 0,0,- -> 0
        ("average", [1, np.nan, 0], [0, 1, 1]),
        ("drop", [np.nan, np.nan, 0], [0, 1, 1]),
    ],
)
def test_duplicates_policies_give_one_row_per_molecule(
    make_csv: Callable[..., Path], policy: str, ethanol: list[float], methanol: list[float]
) -> None:
    table = load_table(make_csv(REPEATS))
    keys = _keys(table, True)
    out = deduplicate(table, keys, policy)
    merged = out.table
    assert merged.smiles == ["CCO", "bad(", "CO", "c1ccccc1"]  # first rows, invalid kept
    assert merged.lines.tolist() == [2, 4, 5, 7]
    assert out.rows.tolist() == [0, 2, 3, 5]
    assert out.members.tolist() == [0, 0, 1, 2, 0, 3, 2]
    assert out.merged == 3
    np.testing.assert_array_equal(merged.labels[0], np.array(ethanol, dtype=np.float32))
    np.testing.assert_array_equal(merged.labels[2], np.array(methanol, dtype=np.float32))
    np.testing.assert_array_equal(merged.labels[1], table.labels[2])  # invalid row untouched
    np.testing.assert_array_equal(merged.labels[3], table.labels[5])
    assert out.cleared == (1 if policy == "average" else 2)
    assert merged.content_hash != table.content_hash
    assert deduplicate(table, keys, "keep").table is table


def test_deduplicate_refuses_an_unknown_policy(make_csv: Callable[..., Path]) -> None:
    table = load_table(make_csv(REPEATS))
    with pytest.raises(ValueError, match="'median'"):
        deduplicate(table, _keys(table, False), "median")


def _conflicted(rows: np.ndarray) -> bool:
    """A 0 and a 1 for some task among these rows' labels."""
    return bool(((rows == 1).any(axis=0) & (rows == 0).any(axis=0)).any())


def test_conflicts_and_counts_match_a_plain_count_on_random_tables() -> None:
    """The grouped counts against a dict-of-rows count, keys with and without repeats, "" rows."""
    rng = np.random.default_rng(7)
    for trial in range(30):
        n, tasks = int(rng.integers(1, 300)), int(rng.integers(1, 4))
        pool = [""] + [f"K{i}" for i in range(int(rng.integers(1, n + 2)))]
        keys = [pool[i] for i in rng.integers(0, len(pool), n)]
        labels = rng.choice([0.0, 1.0, np.nan], size=(n, tasks)).astype(np.float32)
        rows: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            if key:
                rows.setdefault(key, []).append(i)
        repeated = {k: r for k, r in rows.items() if len(r) > 1}
        want = [k for k, r in repeated.items() if _conflicted(labels[r])]  # first appearance
        assert find_conflicts(keys, labels) == want, trial
        counts = count_duplicates(keys, labels)
        assert counts.shared_rows == sum(len(r) for r in repeated.values())
        assert counts.molecules == len(repeated)
        assert counts.conflicting == len(want)
        # a job counts by the ids its split uses (the keys hashed once): the same counts
        assert count_duplicates(molecule_groups(keys), labels) == counts, trial
