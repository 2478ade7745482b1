"""k-fold cross-validation: folds keep molecules and scaffolds whole and apart from the test
split, out-of-fold predictions cover every row once, fused fold training equals separate fits."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold

from tests.toxmodel.conftest import Synthetic, same_weights, synthetic
from tests.toxmodel.test_fused import with_descriptors
from toxmodel.folds import Folds, FoldScores, fit_folds, make_folds, out_of_fold
from toxmodel.model import ModelConfig
from toxmodel.split import Split, SplitConfig, molecule_groups, split_dataset
from toxmodel.train import EpochResult, TrainConfig, fit

METHODS = ["random", "stratified", "scaffold"]
# Two SMILES of one molecule with different scaffolds (a salt as written): one group.
SAME_MOLECULE = {"c1ccccc1CC(=O)O.Cl": "CCCCCC(=O)O"}


def _scaffold(smiles: str) -> str:
    """Independent Bemis-Murcko key ("" for acyclic); unparsable SMILES are their own key."""
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    if mol is None:
        return f"invalid:{smiles}"
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol)


def _dataset(tiny_smiles: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """~140 rows: every molecule 1-4 times in shuffled order (invalid SMILES included), a salt
    keyed as another molecule, imbalanced labels with gaps; (smiles, labels, molecule groups)."""
    rng = np.random.default_rng(0)
    smiles = [s for s in tiny_smiles for _ in range(1 + rng.integers(4))]
    smiles = [smiles[i] for i in rng.permutation(len(smiles))]
    labels = (rng.random((len(smiles), 2)) < [0.2, 0.4]).astype(np.float32)
    labels[rng.random(labels.shape) < 0.2] = np.nan
    keys = [SAME_MOLECULE.get(s, s) if s else "" for s in smiles]
    return smiles, labels, molecule_groups(keys)


def _folds(
    method: str, tiny_smiles: list[str], k: int = 3, seed: int = 0
) -> tuple[Folds, Split, list[str], np.ndarray]:
    """Folds of the non-test rows of `_dataset`, with its split, SMILES and groups."""
    smiles, labels, groups = _dataset(tiny_smiles)
    split = split_dataset(smiles, labels, SplitConfig(method=method, seed=1), groups=groups)
    rows = np.concatenate([split.train, split.valid])
    folds = make_folds(
        rows,
        k,
        method=method,
        seed=seed,
        labels=labels,
        groups=groups,
        smiles=smiles,
        test=split.test,
    )
    return folds, split, smiles, groups


@pytest.mark.parametrize("method", METHODS)
def test_no_molecule_or_scaffold_in_two_folds_or_in_a_fold_and_the_test_split(
    method: str, tiny_smiles: list[str]
) -> None:
    folds, split, smiles, groups = _folds(method, tiny_smiles)
    # The folds partition the non-test rows; fold i validates on its rows, trains on the rest.
    assert np.array_equal(folds.rows, np.sort(np.concatenate([split.train, split.valid])))
    for i, s in enumerate(folds.splits):
        assert np.array_equal(s.valid, folds.rows[folds.fold == i])
        assert np.array_equal(s.train, folds.rows[folds.fold != i])
        assert np.array_equal(s.test, split.test)
    keys = {"molecule": groups}
    if method == "scaffold":
        keys["scaffold"] = np.array([_scaffold(s) for s in smiles])
    for what, key in keys.items():
        test_keys = set(key[split.test].tolist())
        for unit in set(key[folds.rows].tolist()):
            in_folds = set(folds.fold[key[folds.rows] == unit].tolist())
            assert len(in_folds) == 1, f"{what} {unit!r} in folds {sorted(in_folds)}"
            assert unit not in test_keys, f"{what} {unit!r} in a fold and the test split"
    # The salt and its parent are one molecule: one fold, though their scaffolds differ.
    salt, parent = (smiles.index(s) for s in (*SAME_MOLECULE, *SAME_MOLECULE.values()))
    if salt in folds.rows and parent in folds.rows:
        fold_of = dict(zip(folds.rows.tolist(), folds.fold.tolist(), strict=True))
        assert fold_of[salt] == fold_of[parent]


@pytest.mark.parametrize("method", ["random", "stratified"])
def test_fold_sizes_balanced_and_seeded(method: str, tiny_smiles: list[str]) -> None:
    folds, *_ = _folds(method, tiny_smiles, k=4, seed=5)
    sizes = np.bincount(folds.fold)
    assert sizes.max() - sizes.min() <= 6  # within a few molecules' rows (up to 4 rows each)
    again, *_ = _folds(method, tiny_smiles, k=4, seed=5)
    np.testing.assert_array_equal(folds.fold, again.fold)
    other, *_ = _folds(method, tiny_smiles, k=4, seed=6)
    assert not np.array_equal(folds.fold, other.fold)


def test_random_folds_of_single_rows_differ_by_one_row_at_most() -> None:
    folds = make_folds(np.arange(3, 103), 7, seed=2)
    assert sorted(np.bincount(folds.fold).tolist()) == [14] * 5 + [15] * 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 1}, r"folds must be an integer >= 2, got 1 .*use split_dataset"),
        ({"k": 0}, "folds must be an integer >= 2"),
        ({"k": True}, "folds must be an integer >= 2"),
        ({"k": 2.0}, "folds must be an integer >= 2"),
        ({"k": 7}, "7 folds but only 6 molecule groups"),
        ({"k": 3, "method": "kmeans"}, "unknown split method 'kmeans'"),
        ({"k": 3, "method": "stratified", "labels": None}, "stratified folds need the labels"),
        ({"k": 3, "method": "scaffold", "smiles": None}, "scaffold folds need the SMILES"),
        ({"k": 3, "method": "scaffold"}, "3 folds but only 2 scaffold groups"),
        ({"k": 2, "test": [0]}, "include test rows"),
        ({"k": 2, "test": [8]}, r"molecule group.* in the test split"),
        ({"k": 2, "groups": [0, 1]}, "differ in length"),
    ],
)
def test_invalid_folds_name_the_problem(kwargs: dict, message: str) -> None:
    smiles = ["CCO", "CCO", "c1ccccc1", "Cc1ccccc1", "CCN", "CCC", "CCCC", "CCCCC", "CCCCCC"]
    labels = np.array([[0], [1], [0], [1], [0], [1], [0], [1], [1]], dtype=np.float32)
    args = {
        "method": "random",
        "labels": labels,
        "groups": molecule_groups([*smiles[:8], "CCCC"]),  # row 8 is row 6's molecule
        "smiles": smiles,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        make_folds(np.arange(7), **args)


def test_out_of_fold_predictions_cover_every_non_test_row_once(tiny_smiles: list[str]) -> None:
    folds, split, *_ = _folds("random", tiny_smiles)
    # A fold "model" predicts (row, fold) for the rows it validates on.
    parts = [
        (s.valid, np.stack([s.valid, np.full(len(s.valid), i)], 1))
        for i, s in enumerate(folds.splits)
    ]
    oof = out_of_fold(folds, parts)
    assert oof.shape == (len(folds.rows), 2)
    np.testing.assert_array_equal(oof[:, 0], folds.rows)  # every row, once, in order
    np.testing.assert_array_equal(oof[:, 1], folds.fold)  # by the fold that did not train on it
    assert not np.isin(split.test, oof[:, 0]).any()

    rows0, values0 = parts[0]
    with pytest.raises(ValueError, match=r"1 row\(s\) have no out-of-fold prediction"):
        out_of_fold(folds, [(rows0[1:], values0[1:]), *parts[1:]])
    with pytest.raises(ValueError, match="predicted more than once"):
        twice = (np.append(rows0, rows0[0]), np.vstack([values0, values0[:1]]))
        out_of_fold(folds, [twice, *parts[1:]])
    with pytest.raises(ValueError, match=r"it trained on .*is in fold 1"):
        out_of_fold(folds, [(folds.splits[1].valid, parts[1][1]), *parts[1:]])
    with pytest.raises(ValueError, match="is in no fold"):
        extra = (np.append(rows0, split.test[0]), np.vstack([values0, [[0, 0]]]))
        out_of_fold(folds, [extra, *parts[1:]])
    with pytest.raises(ValueError, match="2 predictions for 3 folds"):
        out_of_fold(folds, parts[:2])


def _uneven_folds(n: int = 335) -> tuple[Synthetic, Folds]:
    """Synthetic rows (with descriptors) in 3 random folds of 90/89/89 rows: the folds' training
    sets differ in size, so their epochs' last batches do too."""
    d = with_descriptors(synthetic(n=n, n_bits=32))
    rows = np.concatenate([d.split.train, d.split.valid])
    folds = make_folds(rows, 3, seed=4, test=d.split.test)
    assert len({len(s.train) for s in folds.splits}) > 1
    return d, folds


def test_three_fold_fused_training_reports_the_mean_of_three_separate_fits() -> None:
    d, folds = _uneven_folds()
    model = ModelConfig(hidden=(32,), dropout=0.2, norm="batch")
    config = TrainConfig(epochs=10, batch_size=32, lr=3e-2, patience=1, pos_weight=True, seed=3)
    seen: list[tuple[FoldScores, list[int]]] = []

    def callback(scores: FoldScores, results: dict[int, EpochResult]) -> None:
        assert all(r.epoch == scores.epoch for r in results.values())
        seen.append((scores, sorted(results)))

    fused = fit_folds(
        d.features, d.labels, folds, d.tasks, model, config, callback=callback, num_threads=1
    )
    separate = [
        fit(d.features, d.labels, s, d.tasks, model, replace(config, seed=3 + i), num_threads=1)
        for i, s in enumerate(folds.splits)
    ]
    lengths = [len(r.history) for r in separate]
    assert len(set(lengths)) > 1, "the folds should stop early at different epochs"
    assert len(fused.history) == max(lengths)
    for e, scores in enumerate(fused.history, start=1):
        # A fold still training scores this epoch; one that stopped keeps its best epoch's.
        expected = [
            r.history[e - 1]["val_roc_auc"] if e <= len(r.history) else r.best_valid.roc_auc
            for r in separate
        ]
        assert scores.epoch == e
        assert scores.training == tuple(e <= n for n in lengths)
        assert scores.mean == pytest.approx(np.mean(expected), abs=1e-12)
        assert scores.std == pytest.approx(np.std(expected), abs=1e-12)
    assert fused.history[-1].best_mean == pytest.approx(
        np.mean([r.best_valid.roc_auc for r in separate]), abs=1e-12
    )
    assert [s for s, _ in seen] == fused.history
    assert [ids for _, ids in seen] == [
        [i for i, n in enumerate(lengths) if e <= n] for e in range(1, max(lengths) + 1)
    ]
    for a, b in zip(separate, fused.results, strict=True):
        assert same_weights(a.model, b.model)
        assert a.best_epoch == b.best_epoch
        np.testing.assert_array_equal(a.scaler.center, b.scaler.center)


def test_folds_are_frozen() -> None:
    folds = make_folds(np.arange(10), 2)
    assert isinstance(folds, Folds) and folds.k == 2
    with pytest.raises(AttributeError):
        folds.rows = np.arange(3)  # type: ignore[misc]
