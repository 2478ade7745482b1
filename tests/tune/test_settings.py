"""The process-wide settings of `tune.settings`, as the `toxtune` entry point makes them."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from toxmodel.data import load_table
from tune import settings

ROWS = 250_000


def _full_collections_while_reading(path: Path, cache: Path) -> int:
    before = gc.get_stats()[2]["collections"]
    load_table(path, "smiles", None, cache)
    return gc.get_stats()[2]["collections"] - before


def test_reading_a_large_table_does_not_rescan_the_imported_heap(tmp_path: Path) -> None:
    """Beside a heap of imported modules (here 100,000 live lists; what the test session imported
    before is frozen out of the count), a 250,000-row read runs no full collection under the
    entry point's settings; under Python's default thresholds it runs some, each rescanning
    the whole heap (at 10^6 rows beside Ray and MLflow, 11 of them cost the driver 1.7-2 s of
    a 4.5 s load)."""
    path = tmp_path / "rows.csv"
    lines = ["smiles,a,b"] + [f"{'C' * (1 + i % 30)}O,{i % 2},{i % 3 // 2}" for i in range(ROWS)]
    path.write_text("\n".join(lines) + "\n")
    default = gc.get_threshold()
    gc.freeze()  # the session's own heap: its size would decide when the default collects
    heap = [[i] for i in range(100_000)]
    try:
        gc.collect()
        gc.set_threshold(700, 10, 10)  # Python's default
        assert _full_collections_while_reading(path, tmp_path) >= 1
        settings.configure_process()
        gc.collect()
        assert gc.get_threshold() == settings.GC_THRESHOLDS
        assert _full_collections_while_reading(path, tmp_path) == 0
    finally:
        gc.set_threshold(*default)
        gc.unfreeze()
    assert len(heap) == 100_000


STUCK = textwrap.dedent(
    """
    import sys, threading, time
    from tune import settings

    settings.configure_process()

    def waiting_on_the_bucket():
        time.sleep(120)

    threading.Thread(target=waiting_on_the_bucket, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()
    print("went on", flush=True)
    """
)


def test_a_process_told_to_print_its_stacks_names_every_threads_wait_and_goes_on() -> None:
    """`kill -USR2` on a toxtune process (its entry point made the settings) prints where each
    thread waits, the main one and the others, and the process carries on."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        proc.send_signal(settings.STACKS_SIGNAL)
        out, err = proc.communicate("\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out == "went on\n", (proc.returncode, err)
    assert "waiting_on_the_bucket" in err and "in <module>" in err, err
