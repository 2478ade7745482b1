"""`toxmodel` is the library a chemist can use without a cluster: importing any of its modules
pulls in no Ray, Optuna or MLflow (README, docs/DESIGN.md)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import toxmodel

ORCHESTRATION = ("ray", "optuna", "mlflow")


def test_no_toxmodel_module_imports_the_orchestration_packages() -> None:
    modules = sorted(f"toxmodel.{m.name}" for m in pkgutil.iter_modules(toxmodel.__path__))
    assert "toxmodel.trees" in modules and len(modules) > 15  # every module, not a few
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({ORCHESTRATION!r})))\n"
    )
    root = Path(toxmodel.__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=root, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
