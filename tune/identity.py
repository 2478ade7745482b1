"""Which job a command means: unique default names, safe names, and the fingerprint of the data
a job was run on, which any continuation must match.

A new job gets `<experiment>-<UTC timestamp>` unless the user names it, so two commands never
share a record by accident (Ray Tune and MLflow name runs the same way). A job is continued only
when asked: `--resume NAME`, or an explicit `--run-name` of a job that exists. A continuation
whose data content hash, targets, duplicates policy, molecule key, featurizer or split differ
from the saved job's is refused before Ray starts, naming what differs: otherwise one Optuna
study and one MLflow run would hold trials scored on two datasets, and the winner could be
tested on data it never saw validated.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from tune.errors import ConfigError, JobMismatchError

if TYPE_CHECKING:
    from tune.storage import Storage

FINGERPRINT_FILE = "toxtune_fingerprint.json"
# A job name is a folder under the results storage and an MLflow run name: one path segment.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,199}$")
# MLflow registered-model names: no '/', ':' and friends (its server refuses them).
_MODEL_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def check_name(name: str, what: str = "tracking.run_name") -> str:
    """`name` if it is a safe job name (one path segment, no '..'); ConfigError otherwise."""
    if not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{what} {name!r} is not a valid job name: use letters, digits and . _ - + = "
            "(no path separators, no '..', at most 200 characters)"
        )
    return name


def new_name(base: str, exists: Any = None, now: dt.datetime | None = None) -> str:
    """`<base>-<YYYYmmdd-HHMMSS>` (UTC), suffixed `-2`, `-3`, ... while `exists(name)` is true."""
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    safe_base = re.sub(r"[^A-Za-z0-9_.+=-]+", "-", base).strip("-.") or "toxtune"
    name = f"{safe_base}-{stamp}"
    n = 1
    while exists is not None and exists(name):
        n += 1
        name = f"{safe_base}-{stamp}-{n}"
    return name


def default_model_name(source: str) -> str:
    """`toxtune-<data file stem>`: `toxtune-tox21` for the default Tox21, `toxtune-clintox` for
    `clintox.csv.gz`; so jobs on different data never share a registered model by default."""
    if not source or source.strip().lower() == "default":
        stem = "tox21"
    else:
        name = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
        for suffix in (".gz", ".csv", ".tsv", ".txt"):
            name = name.removesuffix(suffix).removesuffix(suffix.upper())
        stem = _MODEL_UNSAFE.sub("-", name).strip("-.") or "data"
    return f"toxtune-{stem}"


# What a fingerprint saved before the `data` section existed means: every row kept (the only
# behaviour then), so such a job continues under the default policy.
_OLD_DATA: dict[str, Any] = {"duplicates": "keep"}
# The folds of a fingerprint saved before `search.folds` existed: one validation split.
_OLD_FOLDS = 1
# The molecule key of a fingerprint saved before it was recorded: stereo was part of it then, so
# such a job is not continued under today's stereo-blind keys (its split would change).
_OLD_MOLECULE_KEY = "canonical SMILES with stereo"


@dataclass(frozen=True)
class Fingerprint:
    """What makes two jobs' scores comparable: the same rows, targets, features and split (with
    the number of cross-validation folds a trial is scored on)."""

    content_hash: str
    tasks: list[str]
    featurizer: dict[str, Any]
    split: dict[str, Any]
    # duplicates policy and molecule key: which rows count as one molecule
    data: dict[str, Any] = field(default_factory=lambda: dict(_OLD_DATA))

    def differences(self, other: Fingerprint) -> list[str]:
        """Human-readable list of what differs from `other` (empty when nothing does)."""
        out = []
        if self.content_hash != other.content_hash:
            out.append(
                f"data content (sha256 {other.content_hash[:12]} saved, "
                f"{self.content_hash[:12]} now)"
            )
        if self.tasks != other.tasks:
            out.append(f"targets ({other.tasks} saved, {self.tasks} now)")
        for section in ("data", "featurizer", "split"):
            mine, saved = getattr(self, section), getattr(other, section)
            for key in sorted(set(mine) | set(saved)):
                if mine.get(key) != saved.get(key):
                    out.append(f"{section}.{key} ({saved.get(key)!r} saved, {mine.get(key)!r} now)")
        return out


def read_fingerprint(storage: Storage, name: str) -> Fingerprint | None:
    """The fingerprint saved in job `name`'s folder, or None (a new job, or an older one)."""
    text = storage.read_text(name, FINGERPRINT_FILE)
    if text is None:
        return None
    raw = json.loads(text)
    return Fingerprint(
        content_hash=str(raw["content_hash"]),
        tasks=[str(t) for t in raw["tasks"]],
        featurizer=dict(raw["featurizer"]),
        split={"folds": _OLD_FOLDS, **raw["split"]},
        data={"molecule_key": _OLD_MOLECULE_KEY, **raw.get("data", _OLD_DATA)},
    )


def write_fingerprint(storage: Storage, name: str, fingerprint: Fingerprint) -> None:
    storage.write_text(name, FINGERPRINT_FILE, text=json.dumps(asdict(fingerprint), indent=1))


def check_continuation(name: str, saved: Fingerprint | None, now: Fingerprint) -> None:
    """Refuse to continue job `name` on data, targets, duplicates policy, featurizer or split
    other than its own."""
    if saved is None:
        return
    diff = now.differences(saved)
    if diff:
        raise JobMismatchError(
            f"job {name!r} was run on other data or settings; continuing it would mix two "
            f"experiments in one record. Differs: {'; '.join(diff)}. Start a new job instead "
            "(leave out --run-name/--resume, or pick a new --run-name)."
        )
