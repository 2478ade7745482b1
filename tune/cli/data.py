"""`toxtune data`: summarise a dataset (rows, invalid SMILES, repeated molecules, label balance)
before a search.

Reading and featurizing each show a progress bar on stderr (bytes read, molecules featurized);
the printed summary's length does not grow with the rows (`toxmodel.summary`), and the
invalid-SMILES report is written in one pass over the invalid rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_data(args: argparse.Namespace) -> int:
    from toxmodel.data import check_parsed, load_table
    from toxmodel.featurize import FeaturizerConfig, featurize_cached, write_invalid_report
    from toxmodel.sources import default_cache_dir
    from toxmodel.summary import summarize

    cache = default_cache_dir()
    table = load_table(args.data, args.smiles_column, args.targets, cache, progress=True)
    config = FeaturizerConfig(standardize=getattr(args, "standardize", False))
    # Mapped: the summary needs the rows, keys and widths, not the matrices (2 GB at 10^6 rows).
    features = featurize_cached(
        table.smiles, config, cache, table.content_hash, progress=True, mapped=True
    )
    print(summarize(table, features))
    report = None
    if args.invalid_report:
        report = write_invalid_report(features.invalid, Path(args.invalid_report), table.lines)
        print(f"invalid rows written to {report}")
    check_parsed(table, features, str(report) if report else None)  # none parsed: exit 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="summarise a dataset before spending compute on it")
    p.add_argument("--data", default="default", help="CSV path or URL (default: Tox21)")
    p.add_argument("--smiles-column", default="smiles")
    p.add_argument("--targets", nargs="+")
    p.add_argument("--invalid-report", help="write the invalid SMILES rows to this CSV")
    p.add_argument(
        "--standardize",
        action="store_true",
        help="compare molecules after standardization (largest fragment, neutralized), as "
        "featurizer.standardize does; default: canonical SMILES (without stereo) as written",
    )
    p.set_defaults(func=cmd_data)
