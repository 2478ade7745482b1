"""Built-in job configs: `toxtune configs` lists them, and `--config NAME` takes one by name.

The configs ship inside the package (`tune/configs/*.yaml`, package data), so an installed
toxtune has them; `configs/` at the repository root is the same folder.
"""

from __future__ import annotations

import argparse
import importlib.resources
from pathlib import Path


def builtin_dir() -> Path:
    """The folder of the built-in configs inside the installed package."""
    return Path(str(importlib.resources.files("tune") / "configs"))


def builtin_configs() -> dict[str, Path]:
    """Built-in config name (file stem) -> its file."""
    return {p.stem: p for p in sorted(builtin_dir().glob("*.yaml"))}


def config_arg(value: str) -> Path:
    """argparse type of --config: an existing file, else a built-in config name (`quick`).

    A value that is neither is refused at once (exit 2), listing the built-in names; one that
    looks like a path is left for the config loader to report as not found.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    builtin = builtin_configs()
    name = value.removesuffix(".yaml")
    if name in builtin:
        return builtin[name]
    if "/" in value or "\\" in value or value.endswith((".yaml", ".yml")):
        return path
    raise argparse.ArgumentTypeError(
        f"{value!r} is neither a config file nor a built-in config "
        f"({', '.join(builtin) or 'none installed'}; see `toxtune configs`)"
    )


def _summary(path: Path, width: int = 90) -> str:
    """The first sentence of a config file's leading comment, as its one-line description."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines).split(". ")[0].rstrip(".")
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."


def cmd_configs(args: argparse.Namespace) -> int:
    configs = builtin_configs()
    if not configs:
        print(f"no built-in configs installed (looked in {builtin_dir()})")
        return 0
    width = max(len(name) for name in configs)
    for name, path in configs.items():
        print(f"{name:<{width}}  {_summary(path)}")
    print(f"\n`toxtune tune --config NAME` runs one; the files are in {builtin_dir()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("configs", help="list the built-in job configs (--config NAME)")
    p.set_defaults(func=cmd_configs)
