"""Built-in configs ship in the package: `toxtune configs`, `--config NAME`, and an installed wheel.

The slow test builds the wheel from a copy of the sources, installs it into a fresh venv (no
network: the dependencies come from this venv's site-packages through a .pth line) and runs the
installed `toxtune` from a folder outside the repository.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tune.cli import build_parser, main
from tune.cli.configs import builtin_configs

REPO = Path(__file__).resolve().parents[2]
SHIPPED = {"quick", "small", "tox21", "toxcast"}


def test_configs_lists_the_builtin_names(capsys: pytest.CaptureFixture) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines()[: len(SHIPPED)]}
    assert listed == SHIPPED
    assert "Quick search" in out


def test_config_takes_a_builtin_name_or_a_path(tmp_path: Path) -> None:
    packaged = builtin_configs()
    assert set(packaged) == SHIPPED
    assert all(p.parent == REPO / "tune" / "configs" for p in packaged.values())
    for argv in (["tune", "--config", "quick"], ["tune", "--config", "quick.yaml"]):
        assert build_parser().parse_args(argv).config == packaged["quick"]
    # a file of that name in the working directory wins; a path is a path
    mine = tmp_path / "quick"
    mine.write_text("search: {num_samples: 1}\n")
    assert build_parser().parse_args(["tune", "--config", str(mine)]).config == mine
    assert build_parser().parse_args(["ui", "--config", "tox21"]).config == packaged["tox21"]
    args = build_parser().parse_args(["submit", "--config", "toxcast"])
    assert args.config == packaged["toxcast"]


@pytest.mark.parametrize(
    ("name", "default_model"),
    [
        ("quick", "toxtune-tox21"),
        ("small", "toxtune-tox21"),
        ("tox21", "toxtune-tox21"),
        ("toxcast", "toxtune-toxcast_data"),
    ],
)
def test_builtin_configs_name_the_model_after_the_data(name: str, default_model: str) -> None:
    """`quick.yaml` fixed `registered_model_name: toxtune-tox21`, so `--config quick --data
    other.csv` registered another data set's model as toxtune-tox21 (and moved its champion)."""
    from tune.config import load_config

    path = builtin_configs()[name]
    assert load_config(path).tracking.registered_model_name is None
    assert load_config(path).model_name == default_model
    assert load_config(path, {"data.source": "data/other.csv"}).model_name == "toxtune-other"
    mine = {"data.source": "data/other.csv", "tracking.registered_model_name": "mine"}
    assert load_config(path, mine).model_name == "mine"


def _copy_sources(dest: Path) -> Path:
    """What a clean checkout builds from: the project files, without caches or results."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)
    for package in ("toxmodel", "tune"):
        shutil.copytree(
            REPO / package,
            dest / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
        )
    return dest


def _fresh_venv(root: Path) -> Path:
    """A venv with no packages of its own; this venv's site-packages come after its own, so
    the dependencies resolve offline and the wheel's `tune` comes first."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
    )
    (site,) = root.glob("lib/python*/site-packages")
    (site / "zz_toxtune_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root / "bin" / "python"


@pytest.mark.slow
def test_the_wheel_ships_its_configs_and_runs_from_an_installed_venv(
    tmp_path: Path, small_csv: Path
) -> None:
    """`pyproject.toml` listed tune/configs/*.yaml as package data while the configs lived in
    configs/ at the root: a wheel had none, and `--config configs/tox21.yaml` only worked in a
    checkout."""
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(wheels), str(_copy_sources(tmp_path / "src"))],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("toxtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tune/configs/{n}.yaml" for n in SHIPPED} <= names
    assert {"tune/cli/__init__.py", "tune/cluster/__init__.py"} <= names

    python = _fresh_venv(tmp_path / "venv")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
         "-q", str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    toxtune = python.parent / "toxtune"
    work = tmp_path / "work"  # outside the repository: no configs/ here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["TOXTUNE_CACHE_DIR"] = str(tmp_path / "cache")

    def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(toxtune), *args], cwd=work, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        return out

    where = subprocess.run(
        [str(python), "-c", "import tune; print(tune.__file__)"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(tmp_path / "venv")), where  # the wheel, not the checkout
    listed = run("configs").stdout
    assert {line.split()[0] for line in listed.splitlines()[: len(SHIPPED)]} == SHIPPED
    assert str(tmp_path / "venv") in listed

    # The README's tune line: the model is named after the data file (toxtune-tox21 here)
    shutil.copy(small_csv, work / "tox21.csv")
    run(
        "tune", "--config", "quick", "--data", "tox21.csv", "--num-samples", "1",
        "--max-epochs", "2", "--max-concurrent", "1", "--run-name", "installed",
        timeout=900,
    )  # fmt: skip
    assert (work / "toxtune_results" / "installed").is_dir()
    # the README's predict line, as written, in the folder `toxtune tune` ran in
    readme = (
        "toxtune predict --model models:/toxtune-tox21@champion molecules.csv --output preds.csv"
    )
    shutil.copy(small_csv, work / "molecules.csv")
    run(*shlex.split(readme)[1:])
    header = (work / "preds.csv").read_text().splitlines()[0]
    columns = header.split(",")
    assert columns[0] == "smiles" and "error" in columns
    assert columns[-2:] == ["nn_similarity", "in_domain"]
