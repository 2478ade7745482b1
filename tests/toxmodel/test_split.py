"""Splits: disjoint and covering, seeded, stratified balance, scaffold separation, warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold

from toxmodel.data import MoleculeTable, load_table
from toxmodel.split import (
    SPLIT_NAMES,
    Split,
    SplitConfig,
    missing_class_warnings,
    scaffold_groups,
    split_dataset,
    validate_split_config,
)

METHODS = ["random", "stratified", "scaffold"]


def _scaffold_key(smiles: str, row: int) -> str:
    """Independent Bemis-Murcko key ("" for acyclic); unparsable rows are unique keys."""
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        return f"invalid-{row}"
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol)


def _check_partition(split: Split, n: int) -> None:
    parts = [split.train, split.valid, split.test]
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(joined) == n and set(joined.tolist()) == set(range(n))


def _positive_rates(labels: np.ndarray, split: Split) -> np.ndarray:
    rates = []
    for part in (split.train, split.valid, split.test):
        y = labels[part]
        rates.append(np.nansum(y, axis=0) / np.sum(~np.isnan(y), axis=0))
    return np.array(rates)


def _synthetic_labels(n: int, n_tasks: int, seed: int = 0) -> np.ndarray:
    """Imbalanced multitask labels (2-15% positives) with ~20% missing."""
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.02, 0.15, n_tasks)
    labels = (rng.random((n, n_tasks)) < rates).astype(np.float32)
    labels[rng.random((n, n_tasks)) < 0.2] = np.nan
    return labels


@pytest.fixture(scope="module")
def tox21(tox21_path: Path) -> MoleculeTable:
    return load_table(tox21_path)


@pytest.mark.parametrize("method", METHODS)
def test_partition_and_sizes(method: str, tiny_smiles: list[str]) -> None:
    smiles = tiny_smiles * 5  # 230 rows, repeated scaffolds
    labels = _synthetic_labels(len(smiles), 3)
    split = split_dataset(smiles, labels, SplitConfig(method=method, seed=3))
    _check_partition(split, len(smiles))
    sizes = np.array([len(split.train), len(split.valid), len(split.test)]) / len(smiles)
    tolerance = 0.01 if method != "scaffold" else 0.1
    np.testing.assert_allclose(sizes, [0.8, 0.1, 0.1], atol=tolerance)


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_per_seed(method: str, tiny_smiles: list[str]) -> None:
    smiles = tiny_smiles * 3
    labels = _synthetic_labels(len(smiles), 2)
    first = split_dataset(smiles, labels, SplitConfig(method=method, seed=7))
    again = split_dataset(smiles, labels, SplitConfig(method=method, seed=7))
    np.testing.assert_array_equal(first.train, again.train)
    np.testing.assert_array_equal(first.valid, again.valid)
    np.testing.assert_array_equal(first.test, again.test)


@pytest.mark.parametrize("method", ["random", "stratified", "scaffold"])
def test_seeds_differ(method: str, tiny_smiles: list[str]) -> None:
    smiles = tiny_smiles * 3
    labels = _synthetic_labels(len(smiles), 2)
    tests = {
        tuple(split_dataset(smiles, labels, SplitConfig(method=method, seed=s)).test)
        for s in range(4)
    }
    assert len(tests) > 1


def test_zero_fractions_give_empty_splits(tiny_smiles: list[str]) -> None:
    labels = _synthetic_labels(len(tiny_smiles), 1)
    for method in METHODS:
        split = split_dataset(
            tiny_smiles, labels, SplitConfig(method=method, train=0.9, valid=0.1, test=0.0)
        )
        assert split.test.size == 0 and split.valid.size > 0
        _check_partition(split, len(tiny_smiles))
        only = split_dataset(
            tiny_smiles, labels, SplitConfig(method=method, train=1, valid=0, test=0)
        )
        assert only.train.size == len(tiny_smiles)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SplitConfig(train=0.8, valid=0.3, test=0.1), "must sum to 1"),
        (SplitConfig(train=0.9, valid=-0.1, test=0.2), "valid=-0.1"),
        (SplitConfig(train=0.0, valid=0.5, test=0.5), "train=0.0 must be > 0"),
        (SplitConfig(train=float("nan")), "train=nan"),
        (SplitConfig(method="kmeans"), "unknown split method 'kmeans'"),
    ],
)
def test_invalid_config(config: SplitConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_split_config(config)
    with pytest.raises(ValueError, match=message):
        split_dataset(["C", "CC"], np.zeros((2, 1)), config)


def test_fractions_within_tolerance_accepted() -> None:
    validate_split_config(SplitConfig(train=0.7, valid=0.2, test=0.1 + 5e-7))


def test_shape_checks() -> None:
    with pytest.raises(ValueError, match="3 SMILES but 2 label rows"):
        split_dataset(["C", "CC", "CCC"], np.zeros((2, 1)), SplitConfig())
    with pytest.raises(ValueError, match="empty"):
        split_dataset([], np.zeros((0, 1)), SplitConfig())
    split = split_dataset(["C", "CC", "CCC", "CCCC"], np.array([0, 1, 0, 1.0]), SplitConfig())
    _check_partition(split, 4)  # 1-D labels are one task


def test_stratified_balances_every_task() -> None:
    n = 3000
    labels = _synthetic_labels(n, 12, seed=1)
    smiles = ["C"] * n
    rates = []
    for method in ("random", "stratified"):
        split = split_dataset(smiles, labels, SplitConfig(method=method, seed=0))
        rates.append(_positive_rates(labels, split))
    random_dev = np.abs(rates[0][1:] - rates[0][0]).max()
    stratified_dev = np.abs(rates[1][1:] - rates[1][0]).max()
    assert stratified_dev < 0.02
    assert stratified_dev < random_dev / 2


def test_stratified_tox21(tox21: MoleculeTable) -> None:
    split = split_dataset(tox21.smiles, tox21.labels, SplitConfig(method="stratified", seed=2))
    _check_partition(split, len(tox21))
    rates = _positive_rates(tox21.labels, split)
    assert np.abs(rates[1:] - rates[0]).max() < 0.005
    assert missing_class_warnings(tox21.labels, split, tox21.tasks) == []


def test_scaffold_groups_include_invalid_and_acyclic() -> None:
    smiles = ["CCO", "CCCC", "c1ccccc1O", "Cc1ccccc1", "C1CC", "", "c1ccncc1"]
    groups = sorted(sorted(g.tolist()) for g in scaffold_groups(smiles))
    assert groups == [[0, 1], [2, 3], [4], [5], [6]]


def test_scaffold_never_shares_scaffolds(tiny_smiles: list[str]) -> None:
    smiles = tiny_smiles * 4
    split = split_dataset(smiles, _synthetic_labels(len(smiles), 1), SplitConfig("scaffold"))
    _check_partition(split, len(smiles))
    seen: dict[str, str] = {}
    for name in ("train", "valid", "test"):
        for row in getattr(split, name):
            key = _scaffold_key(smiles[row], row)
            assert seen.setdefault(key, name) == name, f"scaffold {key!r} in two splits"


def test_scaffold_tox21(tox21: MoleculeTable) -> None:
    split = split_dataset(tox21.smiles, tox21.labels, SplitConfig(method="scaffold", seed=0))
    _check_partition(split, len(tox21))
    assert abs(len(split.train) / len(tox21) - 0.8) < 0.02
    keys = [_scaffold_key(s, row) for row, s in enumerate(tox21.smiles)]
    owner: dict[str, int] = {}
    for k, part in enumerate((split.train, split.valid, split.test)):
        for row in part:
            assert owner.setdefault(keys[row], k) == k, f"scaffold {keys[row]!r} in two splits"
    assert owner[""] == 0  # the big acyclic group goes to train


def test_missing_class_warnings_name_task_and_split() -> None:
    labels = np.array(
        [[1, 0, np.nan], [0, 0, np.nan], [1, 1, 1], [0, 1, 0], [np.nan, 0, np.nan]],
        dtype=np.float32,
    )
    split = Split(
        train=np.array([0, 1, 2], np.int64),
        valid=np.array([3, 4], np.int64),
        test=np.array([], np.int64),
    )
    messages = missing_class_warnings(labels, split, ["A", "B", "C"])
    assert len(messages) == 3
    assert any("valid split" in m and "'A'" in m and "no positives" in m for m in messages)
    assert any("train split" in m and "'C'" in m and "no negatives" in m for m in messages)
    assert any("valid split" in m and "'C'" in m for m in messages)
    assert not any("test split" in m for m in messages)  # an empty split is not reported
    assert not any("'B'" in m for m in messages)


def test_missing_class_warnings_count_every_split_and_task_across_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The counts in the messages are the split's labels counted one by one, whatever the
    block size the rows are counted in (rows of one split scattered over many blocks)."""
    import toxmodel.split as split_module

    rng = np.random.default_rng(3)
    n, tasks = 200, ["A", "B", "C", "D"]
    labels = rng.choice(np.array([0, 1, np.nan], np.float32), size=(n, len(tasks)))
    rows = rng.permutation(n)
    split = Split(np.sort(rows[:150]), np.sort(rows[150:180]), np.sort(rows[180:]))
    labels[split.valid, 0] = np.where(np.isnan(labels[split.valid, 0]), np.nan, 0)  # no positives
    labels[split.test, 1] = np.nan  # no labels
    labels[split.train, 2] = np.where(np.isnan(labels[split.train, 2]), np.nan, 1)  # no negatives
    expected = []
    for name in SPLIT_NAMES:
        part = labels[getattr(split, name)]
        for j, task in enumerate(tasks):
            pos, neg = int((part[:, j] == 1).sum()), int((part[:, j] == 0).sum())
            if not (pos and neg):
                expected.append((name, task, pos, neg))
    assert len(expected) == 3
    for block in (7, 64, 16_384):
        monkeypatch.setattr(split_module, "COUNT_BLOCK", block)
        messages = missing_class_warnings(labels, split, tasks)
        assert len(messages) == len(expected)
        for message, (name, task, pos, neg) in zip(messages, expected, strict=True):
            assert message.startswith(f"{name} split: task {task!r}")
            size = len(getattr(split, name))
            assert f"({pos} positives, {neg} negatives in {size} rows)" in message


@pytest.mark.parametrize(
    "groups",
    [
        [0, 1, 0, 2, 1, 3],  # already numbered in first-seen order
        [0, 2, 1, 2, 1, 0],  # an id skips ahead of one not yet seen
        [1, 0, 1, 2, 0, 3],  # does not start at 0
        [0, 1, -1, 1, 2, 2],  # a negative id
        [0, 0, 1, 1, 3, 2],  # a gap, then the id it skipped
    ],
)
def test_group_ids_in_any_numbering_give_one_split(groups: list[int]) -> None:
    """The split depends on which rows share a group, not on the ids' values: ids already in
    first-seen order (taken as they are) and any other numbering of the same groups agree."""
    from toxmodel.split import molecule_groups

    smiles = [f"C{'C' * i}O" for i in range(6)] * 5
    # 5 copies of the pattern, each with ids of its own right after the last copy's
    ids = np.array(groups * 5) + np.repeat(np.arange(5) * (max(groups) + 1), 6)
    labels = _synthetic_labels(len(smiles), 2, seed=1)
    first_seen = molecule_groups(ids)
    for method in ("random", "stratified"):
        for seed in range(3):
            config = SplitConfig(method=method, seed=seed)
            given = split_dataset(smiles, labels, config, groups=ids)
            renumbered = split_dataset(smiles, labels, config, groups=first_seen)
            for name in SPLIT_NAMES:
                np.testing.assert_array_equal(getattr(given, name), getattr(renumbered, name))


# ------------------------------------------------------------ repeated molecules stay together


def _repeats_table() -> tuple[list[str], np.ndarray, list[str]]:
    """~150 rows of 44 molecules, each written several ways (atom order, salt, charge, stereo),
    with conflicting labels; plus the raw SMILES' standardized keys computed independently."""
    from rdkit.Chem.MolStandardize import rdMolStandardize

    bases = [
        "c1ccccc1" + t
        for t in ["O", "N", "Cl", "C", "CC", "C(=O)O", "OC", "F", "Br", "C#N", "S", "NC"]
    ]
    bases += ["C" * k + "O" for k in range(1, 10)] + ["C" * k + "N" for k in range(1, 10)]
    bases += ["C1CC" + "C" * k + "C1" for k in range(10)]
    # Stereoisomers: one input to the model (its features ignore stereo), so one molecule.
    bases += ["C[C@H](N)C(=O)O", "C[C@@H](N)C(=O)O", "F/C=C/Cl", "F/C=C\\Cl"]
    bases += ["C[C@H](O)CC", "C[C@@H](O)CC", "CC(O)CC"]
    rng = np.random.default_rng(5)
    smiles: list[str] = []
    for i, base in enumerate(bases):
        mol = Chem.MolFromSmiles(base)
        forms = {Chem.MolToSmiles(mol, doRandom=True, canonical=False) for _ in range(6)}
        forms = sorted(forms)[: 1 + i % 4] + [base + ".[Na+].[Cl-]"] * (i % 3 == 0)
        smiles += forms
    smiles = [smiles[i] for i in rng.permutation(len(smiles))]
    labels = (rng.random((len(smiles), 3)) < 0.4).astype(np.float32)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    chooser = rdMolStandardize.LargestFragmentChooser(preferOrganic=True)
    keys = [
        Chem.MolToSmiles(chooser.choose(Chem.MolFromSmiles(s)), isomericSmiles=False)
        for s in smiles
    ]
    return smiles, labels, keys


def _parts_of(split: Split, keys: list[str]) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for k, part in enumerate((split.train, split.valid, split.test)):
        for row in part:
            out.setdefault(keys[row], set()).add(k)
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_a_molecule_never_straddles_parts(method: str, seed: int) -> None:
    from toxmodel.featurize import FeaturizerConfig, canonical_smiles
    from toxmodel.split import molecule_groups

    smiles, labels, keys = _repeats_table()
    mine = canonical_smiles(smiles, FeaturizerConfig(standardize=True))
    assert mine == keys  # salts and other spellings collapse to the parent's canonical SMILES
    assert len(set(keys)) < len(keys) / 2  # the table really repeats molecules
    config = SplitConfig(method=method, seed=seed)
    if method != "scaffold":  # scaffolds already keep these together (see the join test)
        ungrouped = split_dataset(smiles, labels, config)
        assert any(len(p) > 1 for p in _parts_of(ungrouped, keys).values())  # it can fail
    split = split_dataset(smiles, labels, config, groups=molecule_groups(mine))
    _check_partition(split, len(smiles))
    straddling = {key: p for key, p in _parts_of(split, keys).items() if len(p) > 1}
    assert straddling == {}
    assert len(split.valid) > 0 and len(split.test) > 0
    again = split_dataset(smiles, labels, config, groups=molecule_groups(mine))
    assert all(np.array_equal(getattr(split, n), getattr(again, n)) for n in SPLIT_NAMES)


@pytest.mark.parametrize("method", ["random", "stratified"])
def test_groups_of_one_row_give_todays_split(method: str, tiny_smiles: list[str]) -> None:
    smiles = tiny_smiles * 3
    labels = _synthetic_labels(len(smiles), 3, seed=4)
    for seed in (0, 3):
        config = SplitConfig(method=method, seed=seed)
        plain = split_dataset(smiles, labels, config)
        shuffled_ids = np.random.default_rng(seed).permutation(len(smiles)) * 7 + 100
        grouped = split_dataset(smiles, labels, config, groups=shuffled_ids)
        for name in SPLIT_NAMES:
            np.testing.assert_array_equal(getattr(plain, name), getattr(grouped, name))


def test_grouped_random_split_keeps_sizes_near_the_fractions() -> None:
    smiles, labels, keys = _repeats_table()
    from toxmodel.split import molecule_groups

    split = split_dataset(smiles, labels, SplitConfig(seed=2), groups=molecule_groups(keys))
    n = len(smiles)
    largest = max(keys.count(k) for k in set(keys))
    assert abs(len(split.train) - 0.8 * n) <= largest
    assert abs(len(split.test) - 0.1 * n) <= largest


def test_stratified_groups_carry_their_rows_labels() -> None:
    """Two molecules hold every positive (4 rows each): each stays whole, and the first fills
    train's share of positives, so the second goes to valid or test."""
    smiles = [f"C{'C' * i}O" for i in range(40)]
    labels = np.zeros((40, 1), dtype=np.float32)
    labels[:8] = 1
    groups = np.array([0] * 4 + [1] * 4 + list(range(2, 34)))
    keys = [str(g) for g in groups]
    for seed in range(5):
        config = SplitConfig(method="stratified", train=0.5, valid=0.25, test=0.25, seed=seed)
        split = split_dataset(smiles, labels, config, groups=groups)
        parts = _parts_of(split, keys)
        assert len(parts["0"]) == 1 and len(parts["1"]) == 1
        assert int(labels[split.train].sum()) == 4


class _Hashing(str):
    """A key whose hash is chosen: to make two different keys collide, or a key hash like ""."""

    value = 7

    def __hash__(self) -> int:
        return self.value


def _by_text(keys: list[str]) -> list[int]:
    """Group ids by a plain dict of the texts: first-seen order, "" never shared."""
    first: dict[str, int] = {}
    ids = []
    for i, key in enumerate(keys):
        ids.append(first.setdefault(key, len(first)) if key else len(first))
        if not key:
            first[f"\x00{i}"] = len(first)
    return ids


@pytest.mark.parametrize("seed", range(3))
def test_molecule_groups_by_hash_equal_grouping_the_texts(seed: int) -> None:
    """The hashed grouping gives the ids a dict of the texts gives, with keys repeated and
    missing, for every row's keys and for a job's valid rows only (rows, n_rows)."""
    from toxmodel.split import molecule_groups

    rng = np.random.default_rng(seed)
    pool = [f"C{'C' * i}O" for i in range(40)]
    keys = [pool[i] if rng.random() > 0.2 else "" for i in rng.integers(0, 40, 500)]
    expected = _by_text(keys)
    assert molecule_groups(keys).tolist() == expected
    valid = np.flatnonzero([bool(k) for k in keys])
    ids = molecule_groups([keys[i] for i in valid], valid, len(keys))
    assert ids.tolist() == expected
    # every row has a molecule: the hashes' codes are the ids
    full = [k or "CN" for k in keys]
    assert molecule_groups(full, np.arange(len(full)), len(full)).tolist() == _by_text(full)


def test_molecule_groups_are_exact_when_hashes_collide() -> None:
    """Two different keys with one hash, or a key hashing as "" does, are still told apart
    (the texts decide), and "" rows stay rows of their own."""
    from toxmodel.split import molecule_groups

    keys = ["CCO", "", "C", "CCO", "", "C", "CN"]
    colliding = [_Hashing(k) if k else k for k in keys]  # every key hashes to 7
    assert molecule_groups(colliding).tolist() == _by_text(keys) == [0, 1, 2, 0, 3, 2, 4]
    like_empty = list(keys)
    like_empty[2] = type("_Zero", (_Hashing,), {"value": 0})("C")  # hashes as "" does
    assert molecule_groups(like_empty).tolist() == _by_text(keys)
    rows = np.array([0, 2, 3, 5, 6])
    assert molecule_groups([colliding[i] for i in rows], rows, 7).tolist() == _by_text(keys)


def test_group_ids_of_some_rows_are_renumbered_first_seen() -> None:
    """Ids of a subset of the rows come back numbered 0..G-1 in first-seen order, whether rows
    of their own were left out (a job's invalid rows) or the order of new ids changed."""
    from toxmodel.split import molecule_groups

    ids = np.array([0, 1, 2, 0, 3, 2, 4, 1])
    assert molecule_groups(ids[[0, 2, 3, 5, 6, 7]]).tolist() == [0, 1, 0, 1, 2, 3]
    assert molecule_groups(ids[[2, 0, 5, 3, 7]]).tolist() == [0, 1, 0, 1, 2]
    assert molecule_groups(np.array([5, 9, 5, 100])).tolist() == [0, 1, 0, 2]


def test_molecule_groups_and_bad_groups() -> None:
    from toxmodel.split import molecule_groups

    keys = np.array(["CCO", "", "C", "CCO", "", "C"], dtype=object)
    ids = molecule_groups(keys)
    assert ids.tolist() == [0, 1, 2, 0, 3, 2]  # an empty key is never shared
    assert keys.tolist() == ["CCO", "", "C", "CCO", "", "C"]  # the caller's keys untouched
    # ids of some of the rows are renumbered in first-seen order, as their keys would be
    rows = np.array([2, 3, 5, 0])
    renumbered = molecule_groups(ids[rows]).tolist()
    assert renumbered == molecule_groups(keys[rows]).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="3 rows but 2 group ids"):
        split_dataset(["C", "CC", "CCC"], np.zeros((3, 1)), SplitConfig(), groups=[0, 1])
    with pytest.raises(ValueError, match="integers"):
        split_dataset(["C", "CC"], np.zeros((2, 1)), SplitConfig(), groups=[0.5, 1.5])


def test_scaffold_split_joins_a_molecules_rows_across_scaffolds() -> None:
    """Raw SMILES of one molecule with different raw scaffolds (a benzene-salt form) stay
    together; so do their scaffold-mates."""
    from toxmodel.split import molecule_groups

    smiles = ["CCO", "CCO.c1ccccc1", "c1ccccc1C", "CCCCl", "CCCN", "CCCO", "CCCC"]
    smiles += [f"C1CC{'C' * k}C1" for k in range(10)]
    keys = ["CCO", "CCO", *smiles[2:]]
    labels = np.zeros((len(smiles), 1))
    for seed in range(6):
        split = split_dataset(
            smiles, labels, SplitConfig("scaffold", seed=seed), groups=molecule_groups(keys)
        )
        parts = _parts_of(split, keys)
        assert len(parts["CCO"]) == 1
        # benzene scaffold: row 1 (as written) and row 2 share it, so all three rows are one
        where = {k for k, p in enumerate((split.train, split.valid, split.test)) if 2 in p}
        assert parts["CCO"] == where
