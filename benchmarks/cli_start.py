"""How long the `toxtune` command takes to answer what needs no model: help, `jobs`, `configs`.

    python benchmarks/cli_start.py
    python benchmarks/cli_start.py --trees /path/to/old/checkout . --repeats 7

Each command runs `--repeats` times in a fresh interpreter (the installed `toxtune` entry
point, with PYTHONPATH set to each tree, so two checkouts compare side by side in one run,
alternated command by command); the figure is the median wall time. `jobs list` asks an
address where nothing listens, so it measures the start-up and the refusal, no cluster. Run
it on a quiet machine: start-up is mostly imports, CPU-bound.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "--help": ["--help"],
    "jobs list": ["jobs", "list", "--address", "http://127.0.0.1:9"],
    "configs": ["configs"],
    "submit --help": ["submit", "--help"],
}


def time_once(tree: Path, argv: list[str]) -> float:
    """Wall seconds of one `toxtune ARGV` with `tree` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    toxtune = Path(sys.executable).parent / "toxtune"
    start = time.perf_counter()
    subprocess.run([str(toxtune), *argv], env=env, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", type=Path, default=[Path(".")])
    parser.add_argument("--repeats", type=int, default=5)
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
        print(f"| `toxtune {name}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
