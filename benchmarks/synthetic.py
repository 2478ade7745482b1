"""A deterministic synthetic toxicity set of N unique, valid molecules derived from real ones
(issue 23: the scale benchmark's data; never committed, `benchmarks/scale.py` builds it).

    python benchmarks/synthetic.py 100000 /tmp/synthetic-100000.csv [--seed 0]
        [--data ../shared/data/tox21.csv]

Molecules: the parents are the distinct valid molecules of the source file (Tox21: 7,831 rows,
about 7,800 molecules). Each parent yields a stream of derivatives: one small group (F, Cl, Br,
methyl, hydroxy, methoxy, amino, nitrile, CF3, carboxy, amide, nitro, acetyl, methylsulfonyl,
phenyl, ...) on one carbon that carries a hydrogen, every (site, group) pair in a seeded order;
then two or three groups at once, drawn at random (seeded per parent). Every SMILES is RDKit's
canonical SMILES without stereo (toxtune's molecule key) and parses back to itself. The set is
taken round-robin over the parents (the parent itself first, then its first derivative, ...),
keeping the first occurrence of each molecule, so the set of size N is the first N rows of the
set of any larger size (10^4 within 10^5 within 10^6), for one seed and source.

Labels: 12 tasks named as Tox21's. Each task is a rule on substructures (SMARTS, below): a
molecule is positive when its rule holds; then each label is flipped with probability `flip`
(3 %) and left missing with probability `missing` (15 %), drawn in fixed blocks of rows from
the seed, so a row's labels do not depend on N either. A model learns the rules from Morgan
bits (tests/benchmarks/test_scale.py: a logistic regression on fingerprints well above chance).

Work is spread over a process pool (fork) by parent; the output is the same for any pool size.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toxmodel.sources import TOX21_TASKS

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tox21.csv"
TASKS = tuple(TOX21_TASKS)  # the synthetic tasks carry Tox21's names
# Substituents: SMILES whose first atom bonds to the parent's carbon.
GROUPS = (
    "F",
    "Cl",
    "Br",
    "I",
    "C",
    "CC",
    "O",
    "OC",
    "N",
    "C#N",
    "C(F)(F)F",
    "C(=O)O",
    "C(N)=O",
    "[N+](=O)[O-]",
    "C(C)=O",
    "S(C)(=O)=O",
    "c1ccccc1",
    "OC(F)(F)F",
)
# Substructures the rules read (name -> SMARTS).
PATTERNS = {
    "aryl_halide": "c[F,Cl,Br,I]",
    "aryl_cl_br": "c[Cl,Br]",
    "nitro": "[N+](=O)[O-]",
    "acid": "C(=O)[OH]",
    "phenol": "c[OH]",
    "aniline": "c[NH2]",
    "nitrile": "C#N",
    "cf3": "C(F)(F)F",
    "aryl_ether": "cO[CH3]",
    "sulfonyl": "S(=O)(=O)",
    "biaryl": "c-!@c",
    "ketone": "[#6][CX3](=O)[#6]",
    "alkyl_halide": "[CX4][Cl,Br,I]",
    "amide": "C(=O)[NX3]",
    "fused_aromatic": "[cR2]",
    "iodo": "[I]",
}
# Task -> (all of, any of): positive when every pattern of the first holds and, when the second
# is not empty, at least one of it.
RULES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "NR-AR": (("aryl_cl_br",), ("nitrile", "ketone")),
    "NR-AR-LBD": (("cf3",), ()),
    "NR-AhR": (("fused_aromatic",), ("aryl_halide", "nitro", "biaryl")),
    "NR-Aromatase": (("nitrile",), ()),
    "NR-ER": (("phenol",), ()),
    "NR-ER-LBD": (("phenol",), ("aryl_halide", "biaryl", "alkyl_halide")),
    "NR-PPAR-gamma": (("acid",), ("aryl_halide", "aryl_ether")),
    "SR-ARE": (("nitro",), ()),
    "SR-ATAD5": (("aniline",), ()),
    "SR-HSE": (("sulfonyl",), ()),
    "SR-MMP": ((), ("iodo", "biaryl")),
    "SR-p53": (("amide",), ("aryl_halide", "nitro")),
}
FLIP = 0.03  # share of labels flipped (label noise)
MISSING = 0.15  # share of cells left empty (Tox21: 17 %)
NOISE_BLOCK = 65_536  # rows per block of noise draws (a row's noise does not depend on N)
MAX_SUBSTITUENTS = 3


class SyntheticError(ValueError):
    """The source cannot yield the set asked for (too few molecules in it)."""


@dataclass(frozen=True)
class SyntheticSet:
    """What `generate` built: SMILES, labels (NaN where missing) and the rule labels."""

    smiles: list[str]
    labels: np.ndarray  # float32 (n, 12): 0, 1 or NaN
    clean: np.ndarray  # bool (n, 12): the rules' answer before flips and missing cells
    parents: int  # parent molecules used
    seconds: float

    def write_csv(self, path: str | Path) -> Path:
        """Write `smiles` plus one column per task (0, 1 or empty)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        cells = np.where(np.isnan(self.labels), -1, self.labels).astype(np.int8)
        text = {-1: "", 0: "0", 1: "1"}
        with out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["smiles", *TASKS])
            for smi, row in zip(self.smiles, cells.tolist(), strict=True):
                writer.writerow([smi, *(text[v] for v in row)])
        return out


def read_parents(source: str | Path, limit: int | None = None) -> list[str]:
    """The distinct valid molecules of `source` (a CSV with a `smiles` column), in file order,
    as canonical SMILES without stereo; at most `limit`."""
    from rdkit import Chem, rdBase

    with Path(source).open(newline="", encoding="utf-8") as fh:
        raw = [row["smiles"] for row in csv.DictReader(fh)]
    seen: set[str] = set()
    out: list[str] = []
    with rdBase.BlockLogs():
        for text in raw:
            key = _key(Chem.MolFromSmiles(text)) if text else None
            if key and key not in seen:
                seen.add(key)
                out.append(key)
                if limit is not None and len(out) >= limit:
                    break
    return out


def generate(
    n: int,
    seed: int = 0,
    source: str | Path = DEFAULT_DATA,
    max_parents: int | None = None,
    processes: int | None = None,
) -> SyntheticSet:
    """N unique molecules derived from `source` with rule labels (see the module docstring)."""
    started = time.perf_counter()
    if n < 1:
        raise SyntheticError(f"n must be at least 1, got {n}")
    parents = read_parents(source, max_parents)
    if not parents:
        raise SyntheticError(f"{source} holds no valid molecule")
    per_parent = _stream_length(parents, math.ceil(1.05 * n))
    streams: dict[int, list[tuple[str, int]]] = {}
    todo = list(range(len(parents)))
    while True:
        for index, made in _derive_all(parents, todo, per_parent, seed, processes):
            streams[index] = made
        smiles, masks = _round_robin([streams[i] for i in range(len(parents))], n)
        if len(smiles) == n:
            break
        todo = [i for i, made in streams.items() if len(made) >= per_parent]
        if not todo:
            raise SyntheticError(
                f"{len(parents)} parent molecules of {source} yield only {len(smiles)} "
                f"distinct molecules, fewer than the {n} asked for"
            )
        # Longer streams for the parents that have more (each stream is a prefix of a longer).
        per_parent += math.ceil(1.5 * (n - len(smiles)) / len(todo)) + 1
    clean = rule_labels(np.asarray(masks, dtype=np.int64))
    labels = add_noise(clean, seed)
    return SyntheticSet(smiles, labels, clean, len(parents), time.perf_counter() - started)


def rule_labels(masks: np.ndarray) -> np.ndarray:
    """(n, 12) bool: each task's rule applied to the molecules' pattern bit masks."""
    names = list(PATTERNS)
    out = np.zeros((len(masks), len(TASKS)), dtype=bool)
    for j, task in enumerate(TASKS):
        every, some = RULES[task]
        hit = np.ones(len(masks), dtype=bool)
        for name in every:
            hit &= (masks >> names.index(name)) & 1 == 1
        if some:
            hit &= np.any([(masks >> names.index(name)) & 1 == 1 for name in some], axis=0)
        out[:, j] = hit
    return out


def add_noise(clean: np.ndarray, seed: int, flip: float = FLIP, missing: float = MISSING):
    """float32 labels: `clean` with a `flip` share flipped and a `missing` share NaN, drawn per
    block of NOISE_BLOCK rows from (seed, block), so row i's noise is the same for any N."""
    out = clean.astype(np.float32)
    for start in range(0, len(clean), NOISE_BLOCK):
        rows = slice(start, min(start + NOISE_BLOCK, len(clean)))
        rng = np.random.default_rng([seed, 23, start // NOISE_BLOCK])
        draw = rng.random((NOISE_BLOCK, 2 * clean.shape[1]), dtype=np.float32)
        draw = draw[: rows.stop - rows.start]
        part = out[rows]
        flipped = draw[:, : clean.shape[1]] < flip
        part[flipped] = 1.0 - part[flipped]
        part[draw[:, clean.shape[1] :] < missing] = np.nan
    return out


# ---------------------------------------------------------------------------------------------
# Derivation (in pool workers)


def _stream_length(parents: Sequence[str], wanted: int) -> int:
    """The stream length per parent that yields about `wanted` molecules in all, given that a
    parent with fewer than two sites has at most 1 + (its sites x groups) molecules."""
    from rdkit import Chem, rdBase

    caps = []
    with rdBase.BlockLogs():
        for parent in parents:
            sites = len(_sites(Chem.MolFromSmiles(parent)))
            caps.append(1 + sites * len(GROUPS) if sites < 2 else wanted)
    capped = np.sort(np.asarray(caps, dtype=np.int64))
    for length in range(1, wanted + 1):  # the smallest length whose supply reaches `wanted`
        if int(np.minimum(capped, length).sum()) >= wanted:
            return length
    return wanted


def _sites(mol: object) -> list[int]:
    """Carbons that carry a hydrogen and no charge: where a group replaces a hydrogen."""
    return [
        a.GetIdx()
        for a in mol.GetAtoms()  # type: ignore[attr-defined]
        if a.GetAtomicNum() == 6 and a.GetTotalNumHs() > 0 and a.GetFormalCharge() == 0
    ]


def _key(mol: object) -> str | None:
    from rdkit import Chem

    if mol is None:
        return None
    try:
        return Chem.MolToSmiles(mol, isomericSmiles=False) or None
    except Exception:
        return None


def _derive_all(
    parents: Sequence[str], todo: Sequence[int], per_parent: int, seed: int, processes: int | None
) -> Iterator[tuple[int, list[tuple[str, int]]]]:
    """(parent index, its first `per_parent` derivatives with pattern masks) for `todo`."""
    tasks = [(i, parents[i], per_parent, seed) for i in todo]
    workers = processes or max(1, len(os.sched_getaffinity(0)))
    if workers <= 1 or len(tasks) < 64:
        yield from map(_derive, tasks)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(workers) as pool:
        yield from pool.imap_unordered(_derive, tasks, chunksize=32)


_COMPILED: list[object] = []
_GROUP_MOLS: list[object] = []


def _setup() -> None:
    """Compile the patterns and groups once per process."""
    from rdkit import Chem

    if not _COMPILED:
        _COMPILED.extend(Chem.MolFromSmarts(s) for s in PATTERNS.values())
        _GROUP_MOLS.extend(Chem.MolFromSmiles(s) for s in GROUPS)


def _mask(mol: object) -> int:
    return sum(1 << b for b, p in enumerate(_COMPILED) if mol.HasSubstructMatch(p))  # type: ignore[attr-defined]


def _derive(task: tuple[int, str, int, int]) -> tuple[int, list[tuple[str, int]]]:
    """Parent `index`'s stream: itself, every single substitution (seeded order), then random
    double and triple ones, each canonical and new to the stream, until `count`."""
    from rdkit import Chem, rdBase

    index, parent, count, seed = task
    _setup()
    rng = np.random.default_rng([seed, index])
    made: list[tuple[str, int]] = []
    seen: set[str] = set()
    with rdBase.BlockLogs():
        base = Chem.MolFromSmiles(parent)
        sites = _sites(base)

        def keep(mol: object) -> None:
            key = _key(mol)
            if key is None or key in seen:
                return
            again = Chem.MolFromSmiles(key)
            if again is None or _key(again) != key:
                return  # not a stable canonical form: skip it
            seen.add(key)
            made.append((key, _mask(again)))

        keep(base)
        singles = [(s, g) for s in sites for g in range(len(GROUPS))]
        for pick in rng.permutation(len(singles)).tolist():
            if len(made) >= count:
                return index, made
            keep(_substitute(base, [singles[pick]]))
        if len(sites) < 2:
            return index, made
        for _ in range(8 * count):
            if len(made) >= count:
                break
            k = int(rng.integers(2, min(MAX_SUBSTITUENTS, len(sites)) + 1))
            chosen = rng.choice(len(sites), size=k, replace=False).tolist()
            groups = rng.integers(0, len(GROUPS), size=k).tolist()
            keep(_substitute(base, [(sites[c], g) for c, g in zip(chosen, groups, strict=True)]))
    return index, made


def _substitute(base: object, edits: Sequence[tuple[int, int]]) -> object | None:
    """`base` with group `g` bonded to atom `site` for each edit (a hydrogen replaced); None
    when RDKit refuses the result."""
    from rdkit import Chem

    mol = Chem.RWMol(base)
    for site, g in edits:
        group = _GROUP_MOLS[g]
        offset = mol.GetNumAtoms()
        mol.InsertMol(group)  # type: ignore[attr-defined]
        atom = mol.GetAtomWithIdx(site)
        if atom.GetNoImplicit() or atom.GetNumExplicitHs():
            atom.SetNumExplicitHs(max(0, atom.GetNumExplicitHs() - 1))
        mol.AddBond(site, offset, Chem.BondType.SINGLE)
    try:
        Chem.SanitizeMol(mol)
    except Exception:
        return None
    return mol


def _round_robin(streams: Sequence[list[tuple[str, int]]], n: int) -> tuple[list[str], list[int]]:
    """The first n distinct molecules taking rank 0 of every stream, then rank 1, ..."""
    seen: set[str] = set()
    smiles: list[str] = []
    masks: list[int] = []
    for rank in range(max(len(s) for s in streams)):
        for stream in streams:
            if rank < len(stream):
                key, mask = stream[rank]
                if key not in seen:
                    seen.add(key)
                    smiles.append(key)
                    masks.append(mask)
                    if len(smiles) == n:
                        return smiles, masks
    return smiles, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, help="molecules to generate")
    parser.add_argument("output", help="CSV to write (smiles + 12 task columns)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="source CSV (smiles column)")
    parser.add_argument("--processes", type=int, help="pool size (default: available CPUs)")
    args = parser.parse_args()
    made = generate(args.n, args.seed, args.data, processes=args.processes)
    made.write_csv(args.output)
    rates = np.nanmean(made.labels, axis=0)
    print(
        f"{len(made.smiles)} molecules from {made.parents} parents in {made.seconds:.1f} s -> "
        f"{args.output}; missing {np.isnan(made.labels).mean():.1%}; positives per task "
        + ", ".join(f"{t} {r:.1%}" for t, r in zip(TASKS, rates, strict=True))
    )


if __name__ == "__main__":
    main()
