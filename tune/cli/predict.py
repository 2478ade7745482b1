"""`toxtune predict`: score a CSV of SMILES with a registered model.

The output adds, per input row: `p_<task>` (calibrated probability), `error`, `p_<task>_std`
(the ensemble's spread), `nn_similarity` and `in_domain` (applicability domain). A line per
column the model leaves empty is printed after the output's path (e.g. a single network has no
spread). An output named `*.gz` is written gzip-compressed; another compression suffix (.bz2,
.xz, .zip, .zst) is refused before the model is loaded, and so is an output file that exists
(earlier predictions), unless `--overwrite`.

Without --tracking-uri the model is looked up where `toxtune tune` registered it and where
`toxtune ui` looks: the job config's tracking URI, by default the SQLite store under
./toxtune_results (`--storage-path` to change the folder).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tune.cli.configs import config_arg


def tracking_uri(args: argparse.Namespace) -> str:
    """The tracking URI a `tune` with the same --config/--tracking-uri/--storage-path used."""
    from tune.config import load_config

    overrides = {
        key: value
        for key, value in (
            ("tracking.tracking_uri", args.tracking_uri),
            ("ray.storage_path", args.storage_path),
        )
        if value is not None
    }
    return load_config(args.config, overrides).tracking_uri


def cmd_predict(args: argparse.Namespace) -> int:
    from tune.serving import predict_file

    out = predict_file(
        args.model,
        Path(args.input),
        Path(args.output),
        tracking_uri(args),
        args.smiles_column,
        overwrite=args.overwrite,
    )
    print(f"predictions written to {out.path}")
    for note in out.notes:
        print(f"note: {note}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict toxicity for a CSV of SMILES")
    p.add_argument("input", help="CSV with a SMILES column (.csv or gzip, , ; or tab separated)")
    p.add_argument("--model", required=True, help="e.g. models:/toxtune-tox21@champion")
    p.add_argument(
        "--output",
        default="predictions.csv",
        help="CSV to write (not the input); gzip-compressed when the name ends in .gz "
        "(another compression suffix is refused); an existing file is refused unless "
        "--overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it exists (earlier predictions)",
    )
    p.add_argument("--smiles-column", default="smiles")
    add_store_args(p)
    p.set_defaults(func=cmd_predict)


def add_store_args(p: argparse.ArgumentParser) -> None:
    """Where a registered model is looked up (read by `tracking_uri`): predict and explain."""
    p.add_argument(
        "--tracking-uri",
        help="MLflow store holding the model (default: the one `toxtune tune` uses, "
        "sqlite under --storage-path)",
    )
    p.add_argument(
        "--storage-path", help="results folder of `toxtune tune` (default: toxtune_results)"
    )
    p.add_argument("--config", type=config_arg, help="job config whose tracking URI to use")
