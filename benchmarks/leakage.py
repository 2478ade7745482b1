"""Split leakage through stereoisomers: how many validation and test rows have a row in training
that the model cannot tell from them, under stereo-aware molecule keys (toxtune before
2026-11-27) and under today's stereo-blind keys.

    python benchmarks/leakage.py [--data ../shared/data/tox21.csv] [--seeds 0 1 2]

Morgan bits and MACCS keys ignore stereo and the 2D descriptors see at most whether it is
specified, so two stereoisomers are one input to the model. For each split seed the job's own
data stage (`configs/tox21.yaml`, random split) prepares the table; the same split is then made
again with molecule groups keyed by canonical SMILES *with* stereo, and both are counted: rows
of validation and test whose stereo-blind molecule also has a row in training.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from toxmodel.split import Split, molecule_groups, split_dataset
from tune.config import load_config
from tune.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]


def seen_in_training(split: Split, keys: list[str]) -> tuple[int, int]:
    """(validation rows, test rows) whose key is also the key of a training row."""
    train = {keys[i] for i in split.train}
    return sum(keys[i] in train for i in split.valid), sum(keys[i] in train for i in split.test)


def main() -> None:
    from rdkit import Chem, RDLogger

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tox21.csv"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    RDLogger.DisableLog("rdApp.*")
    print("| split seed | keys | valid rows seen in training | test rows seen in training |")
    print("|---|---|---|---|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            job = load_config(
                str(ROOT / "configs" / "tox21.yaml"),
                overrides={
                    "data.source": args.data,
                    "split.seed": seed,
                    "ray.storage_path": tmp,
                    "tracking.run_name": f"leakage-{seed}",
                },
            )
            data = prepare_data(job, progress=False)
        rows = data.features.valid_rows
        smiles = [data.table.smiles[i] for i in rows]
        all_keys = data.features.row_keys(len(data.table.smiles))
        blind = [all_keys[i] for i in rows]
        aware = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in smiles]
        before = split_dataset(smiles, data.labels, job.split, groups=molecule_groups(aware))
        for name, split in (("with stereo (before)", before), ("without stereo", data.split)):
            valid, test = seen_in_training(split, blind)
            print(
                f"| {seed} | {name} | {valid} of {len(split.valid)} | {test} of {len(split.test)} |"
            )


if __name__ == "__main__":
    main()
