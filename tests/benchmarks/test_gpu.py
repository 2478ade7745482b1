"""benchmarks/gpu.py: --check runs the device benchmark small on the CPU; its imports stay lean."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {
    "meta": ["rows", "inputs", "seconds", "trial_epochs"],
    "equivalence": [],
    "loop": ["tutorial_epochs_per_s", "toxmodel_epochs_per_s", "speedup"],
    "packing": ["estimate_bytes", "estimate_bytes_without_context", "auto_gpu_fraction"],
    "fusion": [],
    "flops": ["bare_matmul_flops_per_s", "best_packing_share", "best_fusion_share"],
}
PACKING_ROW = ["k", "trials_per_hour", "epochs_per_s", "peak_bytes_max", "model_flops_per_s"]
FUSION_ROW = ["k", "trials_per_hour", "epochs_per_s", "peak_bytes", "packing_trials_per_hour"]


def finite(section: dict[str, Any], keys: list[str], where: str) -> None:
    for key in keys:
        value = section.get(key)
        assert isinstance(value, int | float) and math.isfinite(value), f"{where}.{key} = {value!r}"


@pytest.mark.slow
def test_check_mode_writes_every_section_with_finite_figures(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--check", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "fused/packing" in proc.stdout  # the summary table was printed
    results = json.loads((out / "gpu_results.json").read_text())
    for name, keys in SECTIONS.items():
        assert name in results, name
        finite(results[name], keys, name)
    assert results["meta"]["forbidden_imports"] == []
    for name in ("finalize_like", "search_like"):
        eq = results["equivalence"][name]
        finite(eq, ["max_abs_weight_diff", "max_val_roc_auc_diff"], name)
        assert eq["identical"] == 1.0  # on the CPU fit_many is fit, bit for bit
    packing, fusion = results["packing"]["rows"], results["fusion"]["rows"]
    assert [row["k"] for row in packing] == [1, 2]
    assert not any(row["errors"] for row in packing)
    for row in packing:
        finite(row, PACKING_ROW, f"packing[{row['k']}]")
    assert {(row["k"], row["exact_dropout"]) for row in fusion} == {
        (k, exact) for k in (1, 2, 3) for exact in (True, False)
    }
    for row in fusion:
        keys = FUSION_ROW if row["k"] <= 2 else FUSION_ROW[:-1]  # packing ran K = 1, 2 only
        finite(row, keys, f"fusion[{row['k']}]")
    # Every number anywhere in the file is finite (None marks what a CPU cannot measure).
    for value in _numbers(results):
        assert math.isfinite(value)


def test_run_imports_nothing_the_gpu_machine_lacks() -> None:
    """`run` must work without RDKit, Ray, Optuna, MLflow and numba: importing it pulls none
    in."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import gpu, train_loop; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in gpu.FORBIDDEN))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in _numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return []
