"""benchmarks/synthetic.py builds the unique, valid, learnable molecules the scale benchmark needs,
the same for a seed; benchmarks/scale.py fits the growth exponent and sees child processes'
memory."""

from __future__ import annotations

import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from scale import MemorySampler, SizeResult, fit_exponent, timed_parts
from synthetic import DEFAULT_DATA, FLIP, MISSING, TASKS, SyntheticError, generate

N, PARENTS = 1500, 200

pytestmark = pytest.mark.skipif(not DEFAULT_DATA.exists(), reason="no shared Tox21 file")


@pytest.fixture(scope="module")
def made():
    return generate(N, seed=0, max_parents=PARENTS)


def test_molecules_are_unique_valid_canonical_and_derived(made) -> None:
    from rdkit import Chem

    assert len(made.smiles) == N
    assert len(set(made.smiles)) == N
    for smi in made.smiles:
        mol = Chem.MolFromSmiles(smi)
        assert mol is not None, smi
        assert Chem.MolToSmiles(mol, isomericSmiles=False) == smi  # toxtune's molecule key
    assert made.parents == PARENTS  # 1,500 from 200 parents: mostly derivatives


def test_same_seed_same_set_for_any_pool_and_smaller_sets_are_prefixes(made) -> None:
    again = generate(N, seed=0, max_parents=PARENTS, processes=1)
    assert again.smiles == made.smiles
    np.testing.assert_array_equal(again.labels, made.labels)
    small = generate(600, seed=0, max_parents=PARENTS, processes=2)
    assert small.smiles == made.smiles[:600]
    np.testing.assert_array_equal(small.labels, made.labels[:600])
    other = generate(600, seed=1, max_parents=PARENTS)
    assert other.smiles != small.smiles


def test_labels_have_the_stated_missing_flip_and_positive_rates(made) -> None:
    missing = np.isnan(made.labels)
    assert abs(missing.mean() - MISSING) < 0.02
    seen = ~missing
    flipped = made.labels[seen] != made.clean[seen]
    assert abs(flipped.mean() - FLIP) < 0.01
    positives = np.nanmean(made.labels, axis=0)
    assert positives.shape == (len(TASKS),)
    assert np.all((positives > 0.01) & (positives < 0.5)), dict(zip(TASKS, positives, strict=True))


def test_a_linear_model_on_fingerprints_learns_the_labels(made) -> None:
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    x = np.array([gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)) for s in made.smiles])
    order = np.random.default_rng(0).permutation(N)
    train, test = order[:1000], order[1000:]
    scores = []
    for j in range(len(TASKS)):
        y = made.labels[:, j]
        tr, te = train[~np.isnan(y[train])], test[~np.isnan(y[test])]
        if len(np.unique(y[te])) < 2 or len(np.unique(y[tr])) < 2:
            continue
        model = LogisticRegression(C=0.5, solver="liblinear").fit(x[tr], y[tr])
        scores.append(roc_auc_score(y[te], model.predict_proba(x[te])[:, 1]))
    assert len(scores) >= 10
    assert np.mean(scores) > 0.7, scores  # chance is 0.5 (0.82 measured at seed 0)


def test_written_csv_reads_back_as_toxtune_reads_it(made, tmp_path) -> None:
    from toxmodel.data import load_table

    table = load_table(made.write_csv(tmp_path / "set.csv"), cache_dir=tmp_path)
    assert list(table.tasks) == list(TASKS)
    assert table.smiles == made.smiles
    np.testing.assert_array_equal(table.labels, made.labels)


def test_a_source_too_small_for_n_is_refused(tmp_path) -> None:
    source = tmp_path / "tiny.csv"
    source.write_text("smiles\nC\nO\n")  # methane: 1 + 18 single substitutions; water: none
    assert len(generate(20, source=source).smiles) == 20
    with pytest.raises(SyntheticError, match="yield only 20 distinct"):
        generate(30, source=source)


def test_exponent_fit_recovers_the_power_law() -> None:
    sizes = [1e4, 1e5, 1e6]
    assert fit_exponent(sizes, [3e-4 * n**1.5 for n in sizes]) == pytest.approx(1.5)
    noisy = [2e-3 * n * f for n, f in zip(sizes, [1.1, 0.9, 1.05], strict=True)]
    assert fit_exponent(sizes, noisy) == pytest.approx(1.0, abs=0.05)
    assert fit_exponent([1e4, 1e5], [5.0, 5.0]) == pytest.approx(0.0)
    assert np.isnan(fit_exponent([1e4], [1.0]))
    assert np.isnan(fit_exponent(sizes, [1.0, float("nan"), float("nan")]))


def test_memory_sampler_counts_a_child_process() -> None:
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * 76800; time.sleep(1.5)"
    with MemorySampler(interval_s=0.05) as sampler:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert sampler.peak.largest > 250 * 2**20
    assert sampler.peak.others >= sampler.peak.largest
    assert sampler.peak.driver > 0


def test_a_timed_part_records_the_driver_memory_it_added() -> None:
    """A part of a stage (a function the stage calls) is sampled on its own: its row says what
    the driver held when it began and its peak while it ran."""

    def work() -> int:
        block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MiB, touched
        time.sleep(0.6)
        return int(block[:: 2**20].sum())

    holder = types.SimpleNamespace(work=work)
    result = SizeResult(1)
    with timed_parts(result, [(holder, "work", "  work")]):
        assert holder.work() == 200
    assert holder.work is work  # put back
    (row,) = result.rows
    assert row.stage == "  work" and row.seconds >= 0.6 and row.peak is not None
    assert row.peak.driver - row.peak.start > 150 * 2**20
