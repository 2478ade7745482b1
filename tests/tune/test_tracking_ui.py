"""The MLflow UI as a reviewer sees it: a real headless Chromium on a real `mlflow server`.

After a tiny job, the experiment link toxtune prints must open the training-runs table with the
Datasets column filled; the parent run's page must show its Description, dataset, source and
child runs; a trial's page its dataset; the Description's plot links must serve the PNGs.
Skipped where Debian's Chromium is not installed (`apt-get install chromium`).
"""

from __future__ import annotations

import hashlib
import html
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.services import MlflowServer
from tests.tune.conftest import children, tiny_job
from tune.job import run_job
from tune.tracking import experiment_url

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)"),
]


def page_text(url: str, profile: Path) -> str:
    """The visible text of `url` once its scripts have run (a fresh browser profile each time)."""
    proc = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=20000",  # let the single-page app fetch and render
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", proc.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def test_review_pages_in_a_real_browser(
    tmp_path: Path, small_csv: Path, mlflow_http: MlflowServer, no_ray: None
) -> None:
    job = tiny_job(tmp_path, small_csv, **{"tracking.tracking_uri": mlflow_http.url})
    result = run_job(job, progress=False)
    client = MlflowClient(mlflow_http.url)
    parent = client.get_run(result.parent_run_id)
    exp_id = parent.info.experiment_id
    digest = hashlib.sha256(small_csv.read_bytes()).hexdigest()[:16]
    dataset = f"{small_csv.stem} ({digest})"

    runs = page_text(experiment_url(mlflow_http.url, exp_id), tmp_path / "p1")
    assert f"Runs - Experiment {exp_id}" in runs, runs[:500]  # not the GenAI overview
    assert "Dataset" in runs and dataset in runs, runs[:2000]
    assert job.name in runs  # the parent run's row

    page = page_text(experiment_url(mlflow_http.url, exp_id, parent.info.run_id), tmp_path / "p2")
    assert f"Best trial {result.best_trial_id}" in page, page[:3000]
    assert "validation (best trial)" in page and "Top " in page
    assert f"Datasets {dataset}" in page
    assert "Source toxtune" in page
    kids = children(client, parent.info.run_id)
    assert f"Child runs {kids[0].info.run_name}" in page or kids[0].info.run_name in page

    kid = kids[0]
    page = page_text(experiment_url(mlflow_http.url, exp_id, kid.info.run_id), tmp_path / "p3")
    assert f"Datasets {dataset}" in page, page[:3000]

    note = parent.data.tags["mlflow.note.content"]
    links = re.findall(r"\]\((get-artifact\?[^)]+)\)", note)
    assert links
    for link in links:
        with urllib.request.urlopen(f"{mlflow_http.url}/{link}", timeout=30) as resp:
            assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
