"""`toxtune explain`: per-atom pictures of why a model scores some SMILES high or low for a task.

    toxtune explain --model models:/toxtune-tox21@champion "OC(=O)c1ccccc1" CCO --task NR-AR \\
        --output explain/ [--format svg]

writes explain/000_NR-AR.png (atoms coloured by their contribution, `toxmodel.explain`), the
atom weights beside it (000_NR-AR.csv) and explain/explanations.csv (one row per molecule and
task, with the probability and the reason for SMILES that could not be explained). The model is
a checkpoint file or a registered model, looked up as `toxtune predict` does.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tune.cli.predict import add_store_args, tracking_uri
from tune.errors import ConfigError, ServingError


def cmd_explain(args: argparse.Namespace) -> int:
    from toxmodel.explain import INDEX_FILE, explain, write_explanations
    from tune.tracking.explanations import MODEL_URI_SCHEMES, load_predictor

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ServingError(f"--output {out} is a file; give a folder for the pictures")
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
    p.add_argument("--output", required=True, help="folder for the pictures (created)")
    p.add_argument("--format", choices=("png", "svg"), default="png")
    add_store_args(p)
    p.set_defaults(func=cmd_explain)
