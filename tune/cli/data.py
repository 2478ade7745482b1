"""`toxtune data`: summarise a dataset (rows, invalid SMILES, repeated molecules, label balance)
before a search.

Reading and featurizing each show a progress bar on stderr (bytes read, molecules featurized);
the printed summary's length does not grow with the rows (`toxmodel.summary`), and the
invalid-SMILES report is written in one pass over the invalid rows. The report's path is checked
before anything is read: never the data file, never an earlier file unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tune.errors import ConfigError


def cmd_data(args: argparse.Namespace) -> int:
    from toxmodel.data import check_parsed, load_table
    from toxmodel.featurize import FeaturizerConfig, featurize_cached, write_invalid_report
    from toxmodel.sources import default_cache_dir
    from toxmodel.summary import summarize

    if args.invalid_report:
        check_report_path(Path(args.invalid_report).expanduser(), args.data, args.overwrite)
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


def check_report_path(report: Path, data: str, overwrite: bool) -> None:
    """Refuse, before anything is read, an --invalid-report that would destroy a file: a
    folder, the data file itself (even with `overwrite`), or an existing file (an earlier
    report) unless `overwrite`."""
    if report.is_dir():
        raise ConfigError(f"--invalid-report {report} is a folder; give a file name, e.g. bad.csv")
    source = Path(data).expanduser()
    if report.exists() and source.exists() and os.path.samefile(report, source):
        raise ConfigError(
            f"--invalid-report {report} is the data file; write the report to another file"
        )
    if report.exists() and not overwrite:
        raise ConfigError(
            f"--invalid-report {report} exists (an earlier report?); pass --overwrite to replace "
            "it, or give another file"
        )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="summarise a dataset before spending compute on it")
    p.add_argument("--data", default="default", help="CSV path or URL (default: Tox21)")
    p.add_argument("--smiles-column", default="smiles")
    p.add_argument("--targets", nargs="+")
    p.add_argument(
        "--invalid-report",
        help="write the invalid SMILES rows to this CSV (an existing file is refused unless "
        "--overwrite)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --invalid-report if it exists")
    p.add_argument(
        "--standardize",
        action="store_true",
        help="compare molecules after standardization (largest fragment, neutralized), as "
        "featurizer.standardize does; default: canonical SMILES (without stereo) as written",
    )
    p.set_defaults(func=cmd_data)
