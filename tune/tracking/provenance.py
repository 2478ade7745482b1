"""What a run was trained on and by which code: the dataset input and the source tags.

Contract: `log_dataset(client, run_id, info)` records the job's data as an MLflow dataset input
(the UI's Datasets column and filter): name = the data file's stem, digest = the start of the
table's content hash (the whole hash, the row count, targets and split are in the dataset's
profile and schema). It holds no rows, so what it stores is the same size at 10 rows and at
10^6. It is idempotent: MLflow keeps one dataset per (name, digest) in an experiment and one
input per dataset and run, so a replayed or repeated call adds nothing. `source_tags()` are the
tags that fill the UI's Source column: toxtune, its version, and the git commit when toxtune runs
from a checkout.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Dataset, DatasetInput, InputTag

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from toxmodel.data import MoleculeTable
    from toxmodel.split import SplitConfig

DIGEST_CHARS = 16  # MLflow's dataset digest column holds 36 characters; a sha256 has 64
CONTEXT_TAG = "mlflow.data.context"  # shown beside the dataset in the UI
CHECKOUT = Path(__file__).resolve().parents[2]  # the repository root when run from a checkout


@dataclass(frozen=True)
class DatasetInfo:
    """The job's data as MLflow shows it."""

    name: str  # the data file's stem: tox21, clintox, ...
    content_hash: str  # sha256 of the file's bytes (`MoleculeTable.content_hash`)
    source: str  # the path or URL the table was read from
    rows: int
    targets: tuple[str, ...]
    split: str  # e.g. "random:0 (0.8/0.1/0.1)"

    @property
    def digest(self) -> str:
        return self.content_hash[:DIGEST_CHARS]

    def entity(self) -> Dataset:
        """The MLflow dataset entity (source JSON as MLflow's http/local sources write it)."""
        if self.source.startswith(("http://", "https://")):
            source_type, source = "http", {"url": self.source}
        else:
            source_type, source = "local", {"uri": str(Path(self.source).expanduser().resolve())}
        schema = {"mlflow_colspec": [{"type": "double", "name": t} for t in self.targets]}
        profile = {
            "num_rows": self.rows,
            "num_targets": len(self.targets),
            "split": self.split,
            "content_hash": self.content_hash,
        }
        return Dataset(
            name=self.name,
            digest=self.digest,
            source_type=source_type,
            source=json.dumps(source),
            schema=json.dumps(schema),
            profile=json.dumps(profile),
        )


def data_stem(source: str) -> str:
    """`tox21` for `.../tox21.csv.gz` or a URL ending in it (the query string dropped)."""
    name = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    for suffix in (".gz", ".bz2", ".zip", ".csv", ".tsv", ".txt"):
        name = name.removesuffix(suffix)
    return name or "data"


def dataset_info(table: MoleculeTable, split: SplitConfig) -> DatasetInfo:
    """The dataset of a job that reads `table` and splits it as `split` says."""
    return DatasetInfo(
        name=data_stem(table.source),
        content_hash=table.content_hash,
        source=table.source,
        rows=len(table.smiles),
        targets=tuple(table.tasks),
        split=f"{split.method}:{split.seed} ({split.train}/{split.valid}/{split.test})",
    )


def log_dataset(
    client: MlflowClient, run_id: str, info: DatasetInfo, context: str = "train"
) -> None:
    """Record `info` as a dataset input of the run (idempotent, see the module docstring)."""
    tags = [InputTag(CONTEXT_TAG, context), InputTag("toxtune.split", info.split)]
    client.log_inputs(run_id, datasets=[DatasetInput(info.entity(), tags=tags)])


@functools.cache
def source_tags() -> dict[str, str]:
    """`mlflow.source.*` and `toxtune.version` tags, the same for every run of this process."""
    try:
        version = metadata.version("toxtune")
    except metadata.PackageNotFoundError:
        version = "unknown"
    tags = {
        "mlflow.source.name": "toxtune",
        "mlflow.source.type": "LOCAL",
        "toxtune.version": version,
    }
    commit = git_commit(CHECKOUT)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit(root: Path) -> str | None:
    """The commit checked out at `root`, or None when it is not a git checkout."""
    if not (root / ".git").exists():
        return None
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = proc.stdout.strip()
    return commit if proc.returncode == 0 and len(commit) == 40 else None
