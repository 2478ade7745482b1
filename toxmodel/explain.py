"""Per-atom explanations of one task's prediction: Morgan bits occluded, mapped back to atoms.

    explanations = explain(predictor, ["OC(=O)c1ccccc1", "CCO"], "NR-AR")
    write_explanations(explanations, Path("explain/"), fmt="png")  # 000_NR-AR.png, ...

How: each Morgan bit a molecule sets is occluded in turn (its column set to 0, as if no atom had
set it) and the drop in the task's logit is that bit's contribution. RDKit's Morgan generator
reports, per bit, the (centre atom, radius) environments that set it; a bit's contribution is
split evenly over those environments and each environment's share evenly over its atoms. An
atom's weight is the sum of what it receives, so the atom weights add up to the Morgan bits'
contributions. Each bit is occluded alone (the others present), so with a non-linear model the
contributions need not add up to the whole prediction. Units: the task's logit (for an ensemble,
the logit of the members' mean probability, which is what it predicts); logits rather than
probabilities because a confident prediction's probability barely moves when one bit goes.

The bits are those the model saw: the molecule is parsed and standardised as `featurize` does,
the input vector is the one `featurize` returns (descriptors scaled by the checkpoint's scaler),
and the bits the generator reports for the mapping are checked against that vector; a mismatch
is a per-molecule error, never a silently wrong map. Atom indices refer to that (standardised)
molecule, which is the one drawn.

Not mapped to atoms: the MACCS keys (substructure keys, several of which span the molecule or
count atoms) and the RDKit descriptors (whole-molecule properties). Each block is occluded as a
whole (MACCS keys set to 0; scaled descriptors set to 0, the training median) and reported as one
number (`Explanation.maccs`, `Explanation.descriptors`), so its share sits next to the atom map.

Invalid SMILES give an `Explanation` with `error` set; nothing here raises for bad molecules.
Runs on whatever device the predictor's model is on (CPU included).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toxmodel.checkpoint import PREDICT_BATCH, CheckpointError, Predictor
from toxmodel.featurize import FeaturizerConfig, _parse_all, featurize, fingerprint_width
from toxmodel.model import Ensemble
from toxmodel.trees import blend

FORMATS = ("png", "svg")
DRAW_SIZE = (400, 300)  # pixels (width, height) of each picture
INDEX_FILE = "explanations.csv"  # one row per explanation, written next to the pictures

__all__ = [
    "DRAW_SIZE",
    "FORMATS",
    "INDEX_FILE",
    "Explanation",
    "bit_environments",
    "draw",
    "explain",
    "file_stem",
    "safe_name",
    "write_explanations",
]


@dataclass(frozen=True, eq=False)
class Explanation:
    """One molecule's per-atom contributions to one task's logit, or why there are none."""

    row: int  # 0-based position in the SMILES given
    smiles: str
    task: str
    error: str = ""  # "" when explained; else the reason (invalid SMILES, ...)
    mol: Any = None  # the RDKit Mol the atom indices refer to (standardised if the featurizer is)
    probability: float = math.nan  # the probability `predict` gives for `task` (calibrated)
    atom_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n_atoms,) logit units
    bit_weights: dict[int, float] = field(default_factory=dict)  # Morgan bit -> contribution
    maccs: float | None = None  # contribution of the MACCS block (None: not in the features)
    descriptors: float | None = None  # contribution of the descriptor block (None: not used)

    @property
    def ok(self) -> bool:
        return not self.error


def _generator(config: FeaturizerConfig) -> Any:
    """The Morgan generator `featurize` uses for `config` (same radius and length)."""
    from rdkit.Chem import rdFingerprintGenerator

    return rdFingerprintGenerator.GetMorganGenerator(radius=config.radius, fpSize=config.n_bits)


def bit_environments(mol: Any, config: FeaturizerConfig) -> dict[int, list[tuple[int, ...]]]:
    """Morgan bit -> the atom sets (one per environment) that set it, as the featurizer's
    generator reports them (`AdditionalOutput` bit info: centre atom and radius)."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    info = rdFingerprintGenerator.AdditionalOutput()
    info.AllocateBitInfoMap()
    gen = _generator(config)
    if config.counts:
        gen.GetCountFingerprint(mol, additionalOutput=info)
    else:
        gen.GetFingerprint(mol, additionalOutput=info)
    out: dict[int, list[tuple[int, ...]]] = {}
    for bit, envs in info.GetBitInfoMap().items():
        atom_sets = []
        for centre, radius in envs:
            atoms = {int(centre)}
            if radius > 0:
                for b in Chem.FindAtomEnvironmentOfRadiusN(mol, radius, centre, enforceSize=False):
                    bond = mol.GetBondWithIdx(b)
                    atoms.update((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
            atom_sets.append(tuple(sorted(atoms)))
        out[int(bit)] = atom_sets
    return out


def _spread(
    contributions: dict[int, float], envs: dict[int, list[tuple[int, ...]]], n_atoms: int
) -> np.ndarray:
    """Atom weights: each bit's contribution split over its environments, then their atoms."""
    weights = np.zeros(n_atoms, np.float64)
    for bit, value in contributions.items():
        sets = envs[bit]
        for atoms in sets:
            weights[list(atoms)] += value / (len(sets) * len(atoms))
    return weights


def explain(
    predictor: Predictor, smiles: Sequence[str], task: str, batch_size: int = PREDICT_BATCH
) -> list[Explanation]:
    """One `Explanation` per SMILES, in order: per-atom contributions to `task`'s logit.

    ValueError when `task` is not one of the predictor's tasks (the message lists them);
    CheckpointError when the installed featurizer gives another input width than the model's.
    """
    if task not in predictor.tasks:
        raise ValueError(f"unknown task {task!r}; the model's tasks: {', '.join(predictor.tasks)}")
    column = predictor.tasks.index(task)
    items = [str(s) if s is not None else "" for s in smiles]
    config = predictor.featurizer
    feats = featurize(items, config, n_jobs=1)
    if len(feats) and feats.n_features != predictor.n_inputs:
        raise CheckpointError(
            f"featurizer gives {feats.n_features} inputs but the model expects "
            f"{predictor.n_inputs}: the installed RDKit/toxmodel featurizes differently"
        )
    mols, mol_rows, _ = _parse_all(items, 0, config.standardize)
    mol_of = dict(zip(mol_rows, mols, strict=True))
    out: list[Explanation | None] = [None] * len(items)
    for bad in feats.invalid:
        out[bad.row] = Explanation(bad.row, items[bad.row], task, bad.reason or "invalid SMILES")
    inputs = _inputs(predictor, feats.fingerprint, feats.descriptors)
    plans: list[tuple[int, Any, np.ndarray, dict[int, list[tuple[int, ...]]]]] = []
    for i, row in enumerate(feats.valid_rows.tolist()):
        mol = mol_of.get(row)
        envs = bit_environments(mol, config) if mol is not None else {}
        active = np.flatnonzero(feats.fingerprint[i, : config.n_bits])
        if mol is None or set(envs) != set(active.tolist()):
            why = "the explainer's Morgan bits differ from the featurizer's for this molecule"
            out[row] = Explanation(row, items[row], task, why)
            continue
        plans.append((row, mol, active, envs))
    logits = _occluded_logits(predictor, inputs, feats.valid_rows, plans, column, batch_size)
    for (row, mol, active, envs), values in zip(plans, logits, strict=True):
        full, rest = values[0], values[1:]
        bits = {int(b): float(full - rest[k]) for k, b in enumerate(active)}
        extra = rest[len(active) :]
        maccs = float(full - extra[0]) if config.maccs else None
        descriptors = float(full - extra[-1]) if config.descriptors else None
        out[row] = Explanation(
            row=row,
            smiles=items[row],
            task=task,
            mol=mol,
            probability=_calibrated(predictor, column, full),
            atom_weights=_spread(bits, envs, mol.GetNumAtoms()),
            bit_weights=bits,
            maccs=maccs,
            descriptors=descriptors,
        )
    return [e for e in out if e is not None]


def _inputs(predictor: Predictor, fingerprint: np.ndarray, descriptors: np.ndarray) -> np.ndarray:
    """The float32 model inputs of the featurized rows, as `Predictor.predict` builds them:
    (1, n, width), or (n_members, n, width) for members that scale descriptors each their own
    way (a fold ensemble). An occlusion edits every copy alike: a bit set to 0, or the scaled
    descriptors set to 0, each member's own training median."""
    return np.stack(predictor.inputs(fingerprint, descriptors))


def _occluded_logits(
    predictor: Predictor,
    inputs: np.ndarray,
    valid_rows: np.ndarray,
    plans: list[tuple[int, Any, np.ndarray, dict[int, list[tuple[int, ...]]]]],
    column: int,
    batch_size: int,
) -> list[np.ndarray]:
    """Per plan: the task logit of the full input, then with each active bit occluded, then with
    the MACCS block, then with the descriptor block occluded (those present)."""
    config = predictor.featurizer
    position = {int(r): i for i, r in enumerate(valid_rows.tolist())}
    n_fp = fingerprint_width(config)  # Morgan + MACCS columns; descriptors follow
    blocks: list[np.ndarray] = []
    for row, _, active, _ in plans:
        x = inputs[:, position[row]]  # (copies, width)
        variants = np.repeat(x[:, None, :], 1 + len(active), axis=1)
        variants[:, np.arange(1, 1 + len(active)), active] = 0.0
        blocks.append(variants)
        if config.maccs:
            blocks.append(x.copy()[:, None, :])
            blocks[-1][:, 0, config.n_bits : n_fp] = 0.0
        if config.descriptors:
            blocks.append(x.copy()[:, None, :])
            blocks[-1][:, 0, n_fp:] = 0.0
    if not blocks:
        return []
    logits = _logits(predictor, np.concatenate(blocks, axis=1), column, batch_size)
    sizes = [1 + len(a) + int(config.maccs) + int(config.descriptors) for _, _, a, _ in plans]
    return np.split(logits, np.cumsum(sizes)[:-1])


def _logits(predictor: Predictor, x: np.ndarray, column: int, batch_size: int) -> np.ndarray:
    """The model's logits for one task column, in batches, on the model's device; `x` is
    `_inputs`' shape (one copy, or one per member: the logit of the members' mean probability;
    with trees, the logit of the blended probability the model answers)."""
    model, device = predictor.model, predictor.device
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, x.shape[1], batch_size):
            rows = np.ascontiguousarray(x[:, start : start + batch_size])
            chunk = torch.from_numpy(rows).to(device)
            if len(chunk) == 1:
                logits = model(chunk[0])
            else:
                assert isinstance(model, Ensemble)
                probs = torch.stack(
                    [torch.sigmoid(m(c)) for m, c in zip(model.members, chunk, strict=True)]
                )
                logits = torch.logit(probs.mean(0), eps=Ensemble.EPS)
            column_logits = logits[:, column].double().cpu().numpy()
            if predictor.trees:
                networks = 1.0 / (1.0 + np.exp(-column_logits))
                trees = predictor.tree_probabilities(list(rows), [column])[:, 0]
                p = blend(networks, trees, predictor.tree_weight)
                p = np.clip(p, Ensemble.EPS, 1.0 - Ensemble.EPS)
                column_logits = np.log(p) - np.log1p(-p)
            out.append(column_logits)
    return np.concatenate(out)


def safe_name(task: str) -> str:
    """`task` usable as a file or folder name: characters other than A-Z a-z 0-9 . _ - as _."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", task).strip(".") or "task"


def file_stem(row: int, task: str, width: int = 3) -> str:
    """`000_<task>`: the input position, zero-padded, then the task's `safe_name`."""
    return f"{row:0{width}d}_{safe_name(task)}"


def draw(explanation: Explanation, fmt: str = "png", size: tuple[int, int] = DRAW_SIZE) -> bytes:
    """The molecule coloured by its atom weights (RDKit similarity map), as PNG or SVG bytes.

    Green is for atoms that raise the task's logit, pink for those that lower it (RDKit's
    default map). A one-atom molecule is drawn without the map (RDKit needs two atoms).
    """
    from rdkit.Chem.Draw import SimilarityMaps, rdMolDraw2D

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not explanation.ok:
        raise ValueError(f"row {explanation.row} has no explanation: {explanation.error}")
    canvas = rdMolDraw2D.MolDraw2DCairo if fmt == "png" else rdMolDraw2D.MolDraw2DSVG
    drawer = canvas(*size)
    weights = [float(w) for w in explanation.atom_weights]
    if explanation.mol.GetNumAtoms() >= 2:
        SimilarityMaps.GetSimilarityMapFromWeights(explanation.mol, weights, drawer)
    else:
        drawer.DrawMolecule(rdMolDraw2D.PrepareMolForDrawing(explanation.mol))
    drawer.FinishDrawing()
    text = drawer.GetDrawingText()
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def write_explanations(
    explanations: Sequence[Explanation],
    out_dir: Path,
    fmt: str = "png",
    size: tuple[int, int] = DRAW_SIZE,
) -> list[Path]:
    """Write a picture and an atom-weight CSV per explained molecule, plus `explanations.csv`.

    Files are named from the input position and the task (`000_NR-AR.png`, `000_NR-AR.csv` with
    atom,element,weight rows), so names never come from the SMILES. The index has one row per
    explanation (row, smiles, task, probability, maccs, descriptors, picture, error). Returns
    the pictures written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(max((e.row for e in explanations), default=0))))
    pictures: list[Path] = []
    index_rows = []
    for item in explanations:
        picture = ""
        if item.ok:
            stem = file_stem(item.row, item.task, width)
            path = out_dir / f"{stem}.{fmt}"
            path.write_bytes(draw(item, fmt, size))
            _write_atom_weights(item, out_dir / f"{stem}.csv")
            pictures.append(path)
            picture = path.name
        index_rows.append(
            [
                item.row,
                item.smiles,
                item.task,
                _number(item.probability),
                _number(item.maccs),
                _number(item.descriptors),
                picture,
                item.error,
            ]
        )
    with (out_dir / INDEX_FILE).open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["row", "smiles", "task", "probability", "maccs", "descriptors", "picture", "error"]
        )
        writer.writerows(index_rows)
    return pictures


def _write_atom_weights(item: Explanation, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["atom", "element", "weight"])
        for atom in item.mol.GetAtoms():
            idx = atom.GetIdx()
            writer.writerow([idx, atom.GetSymbol(), _number(item.atom_weights[idx])])


def _number(value: float | None) -> str:
    """A CSV cell: '' for missing, else 6 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.6g}"


def _calibrated(predictor: Predictor, column: int, logit: float) -> float:
    """The task's probability from the model's logit, calibrated as `Predictor.predict` does
    (the contributions stay in logits: calibration keeps the order, not the scale)."""
    raw = np.full((1, len(predictor.tasks)), 0.5)
    raw[0, column] = 0.5 * (1.0 + math.tanh(logit / 2.0))  # sigmoid, never overflows
    return float(predictor.calibrate(raw)[0, column])
