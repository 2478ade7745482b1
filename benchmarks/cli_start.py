"""How long the `toxtune` command takes to answer what needs no model (help, `jobs`,
`configs`), and, with `--jobs`, a whole small `tune` job and a `predict` from start to exit.

    python benchmarks/cli_start.py
    python benchmarks/cli_start.py --trees /path/to/old/checkout . --repeats 7
    python benchmarks/cli_start.py --trees /path/to/old/checkout . --jobs --repeats 3

Each command runs `--repeats` times in a fresh interpreter (the installed `toxtune` entry
point, with PYTHONPATH set to each tree, so two checkouts compare side by side in one run,
alternated command by command); the figure is the median wall time. `jobs list` asks an
address where nothing listens, so it measures the start-up and the refusal, no cluster.
`--jobs`: `tune --config quick` on the first `--rows` rows of `--data` (2 trials of 2 epochs,
each run in a folder of its own, so every run creates its MLflow store as a first job does),
and `predict` of three molecules with the model the first run registered; these load Ray,
MLflow and torch, so their time holds the process's exit as well as its start-up; the seconds
from each one's last line of output to its exit are reported too. Run it on a quiet machine:
start-up is mostly imports, CPU-bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "jobs list": ["jobs", "list", "--address", "http://127.0.0.1:9"],
    "configs": ["configs"],
    "submit --help": ["submit", "--help"],
}


def time_once(tree: Path, argv: list[str], cwd: Path | None = None, check: bool = False) -> float:
    """Wall seconds of one `toxtune ARGV` with `tree` first on the path (`check`: a command
    that must succeed, or the figure would time its failure)."""
    return run_once(tree, argv, cwd, check)[0]


def run_once(
    tree: Path, argv: list[str], cwd: Path | None = None, check: bool = False
) -> tuple[float, float]:
    """(wall seconds, seconds from its last line of output to its exit) of one `toxtune ARGV`
    with `tree` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    toxtune = Path(sys.executable).parent / "toxtune"
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(toxtune), *argv], env=env, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd
        )
        assert proc.stdout is not None
        last = start
        for _ in proc.stdout:
            last = time.perf_counter()
        code = proc.wait()
        end = time.perf_counter()
        if check and code != 0:
            err.seek(0)
            raise SystemExit(f"toxtune {' '.join(argv)} failed ({code}): {err.read()[-2000:]}")
    return end - start, end - last


def job_commands(tree: Path, data: Path, rows: int, work: Path) -> dict[str, list[str]]:
    """The argv of `tune` (a small quick job) and of `predict` (the model of a job `tree`
    runs here first)."""
    import pandas as pd

    small = work / "small.csv"
    pd.read_csv(data).head(rows).to_csv(small, index=False)
    tune = ["tune", "--config", "quick", "--data", str(small), "--num-samples", "2"]
    tune += ["--max-epochs", "2"]
    first = work / "first"
    first.mkdir()
    time_once(tree, tune, cwd=first, check=True)
    molecules = work / "in.csv"
    molecules.write_text("smiles\nCCO\nc1ccccc1O\nnot-a-smiles\n")
    predict = ["predict", "--model", "models:/toxtune-small@champion", str(molecules)]
    predict += ["--tracking-uri", f"sqlite:///{first / 'toxtune_results' / 'mlflow.db'}"]
    predict += ["--output", "out.csv"]  # in each run's own folder: never an earlier run's file
    return {"tune (a small job)": tune, "predict (3 molecules)": predict}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", type=Path, default=[Path(".")])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jobs", action="store_true", help="also a small tune job and predict")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/tox21.csv"))
    parser.add_argument("--rows", type=int, default=300, help="--jobs: rows of --data")
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; median of {args.repeats} runs, wall seconds"
    )
    print("| command | " + " | ".join(str(t) for t in trees) + " |")
    print("|---|" + "---:|" * len(trees))
    for name, argv in COMMANDS.items():
        seconds: dict[Path, list[float]] = {t: [] for t in trees}
        for _ in range(args.repeats):
            for tree in trees:
                seconds[tree].append(time_once(tree, argv))
        cells = [f"{statistics.median(seconds[t]):.2f}" for t in trees]
        print(f"| `toxtune {name}` | " + " | ".join(cells) + " |", flush=True)
    if not args.jobs:
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        commands = job_commands(trees[-1], args.data.resolve(), args.rows, work)
        tails: dict[str, list[str]] = {}
        for name, argv in commands.items():
            seconds: dict[Path, list[tuple[float, float]]] = {t: [] for t in trees}
            for i in range(args.repeats):
                for k, tree in enumerate(trees):
                    cwd = work / f"run-{name.split()[0]}-{i}-{k}"  # a store of its own
                    cwd.mkdir()
                    seconds[tree].append(run_once(tree, argv, cwd=cwd, check=True))
            cells = [f"{statistics.median(w for w, _ in seconds[t]):.2f}" for t in trees]
            print(f"| `toxtune {name}` | " + " | ".join(cells) + " |", flush=True)
            tails[name] = [f"{statistics.median(x for _, x in seconds[t]):.2f}" for t in trees]
        print("\nSeconds from the last line of output to the exit (median):")
        for name, cells in tails.items():
            print(f"| `toxtune {name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
