"""`toxtune explain`: per-atom pictures of why a model scores some SMILES high or low for a task.

    toxtune explain --model models:/toxtune-tox21@champion "OC(=O)c1ccccc1" CCO --task NR-AR \\
        --output explain/ [--format svg]

writes explain/000_NR-AR.png (atoms coloured by their contribution, `toxmodel.explain`), the
atom weights beside it (000_NR-AR.csv) and explain/explanations.csv (one row per molecule and
task, with the probability and the reason for SMILES that could not be explained). The model is
a checkpoint file or a registered model, looked up as `toxtune predict` does.

A folder that already holds an explanation (its explanations.csv, or files named as explain names
them: <row>_<task>.png/.svg/.csv) is refused, so old pictures never sit beside new ones as if they
belonged to them; `--overwrite` removes those files first (and lists them). Any other file in the
folder is kept.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from tune.cli.predict import add_store_args, tracking_uri
from tune.errors import ConfigError, ServingError

INDEX_NAME = "explanations.csv"  # toxmodel.explain.INDEX_FILE (imported lazily there)
# What `toxmodel.explain.write_explanations` names a picture and its atom weights:
# `file_stem` (a zero-padded row, `_`, the task's `safe_name`) and the format.
EXPLAIN_FILE = re.compile(r"\d{3,}_[A-Za-z0-9._-]+\.(?:png|svg|csv)")
SHOWN = 5  # files named in the message that refuses a folder


def earlier_explanation(folder: Path) -> list[Path]:
    """The files of an earlier `toxtune explain` in `folder` (its index and every file named as
    explain names pictures and atom weights), sorted; [] when there are none."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.name == INDEX_NAME or EXPLAIN_FILE.fullmatch(p.name))
    )


def _check_output(out: Path, overwrite: bool) -> list[Path]:
    """Refuse an --output that is a file, or that holds an earlier explanation unless
    `overwrite`; returns the earlier explanation's files (to remove before writing)."""
    if out.exists() and not out.is_dir():
        raise ServingError(f"--output {out} is a file; give a folder for the pictures")
    earlier = earlier_explanation(out)
    if earlier and not overwrite:
        raise ServingError(
            f"--output {out} holds an earlier explanation ({_listed(earlier)}); pass --overwrite "
            "to replace those files (other files are kept), or give another folder"
        )
    return earlier


def _listed(files: list[Path]) -> str:
    names = ", ".join(p.name for p in files[:SHOWN])
    more = f" and {len(files) - SHOWN} more" if len(files) > SHOWN else ""
    return f"{len(files)} files: {names}{more}"


def cmd_explain(args: argparse.Namespace) -> int:
    from toxmodel.explain import INDEX_FILE, explain, write_explanations
    from tune.tracking.explanations import MODEL_URI_SCHEMES, load_predictor

    out = Path(args.output)
    earlier = _check_output(out, args.overwrite)
    uri = tracking_uri(args) if args.model.startswith(MODEL_URI_SCHEMES) else None
    with tempfile.TemporaryDirectory(prefix="toxtune-explain-") as tmp:
        predictor = load_predictor(args.model, uri, Path(tmp))
    tasks = list(dict.fromkeys(args.task))
    unknown = [t for t in tasks if t not in predictor.tasks]
    if unknown:
        raise ConfigError(
            f"--task {', '.join(unknown)}: not a task of this model; its tasks: "
            f"{', '.join(predictor.tasks)}"
        )
    explanations = [e for task in tasks for e in explain(predictor, args.smiles, task)]
    try:
        for path in earlier:
            path.unlink(missing_ok=True)
        if earlier:
            print(f"removed the earlier explanation from {out} ({_listed(earlier)})")
        pictures = write_explanations(explanations, out, args.format)
    except OSError as exc:
        raise ServingError(f"--output {out} cannot be written ({exc})") from exc
    for bad in (e for e in explanations if not e.ok and e.task == tasks[0]):
        print(f"row {bad.row} ({bad.smiles!r}): not explained: {bad.error}", file=sys.stderr)
    print(f"{len(pictures)} pictures and {INDEX_FILE} written to {out}")
    return 0 if pictures else 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="draw per-atom contributions to a task's prediction")
    p.add_argument("smiles", nargs="+", metavar="SMILES", help="molecules to explain")
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint file, or a registered model e.g. models:/toxtune-tox21@champion",
    )
    p.add_argument(
        "--task", required=True, action="append", help="task to explain (repeat for several)"
    )
    p.add_argument(
        "--output",
        required=True,
        help="folder for the pictures (created); one that holds an earlier explanation is "
        "refused unless --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier explanation in --output: remove its explanations.csv and its "
        "<row>_<task>.png/.svg/.csv files first (they are listed); other files are kept",
    )
    p.add_argument("--format", choices=("png", "svg"), default="png")
    add_store_args(p)
    p.set_defaults(func=cmd_explain)
