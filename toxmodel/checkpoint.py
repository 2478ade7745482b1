"""Model checkpoints (one safe-to-load file) and the `Predictor` that serves them.

A checkpoint holds only plain Python types and tensors, so `torch.load(weights_only=True)` can
read it without unpickling arbitrary objects: a checkpoint from an untrusted source cannot run
code. Everything needed to predict from SMILES is inside it: weights, model and featurizer
settings, task names, input width and the descriptor scaler; and, for a model that went through
a job's finalize stage, its per-task calibration and applicability domain (optional fields: a
checkpoint without them loads and predicts with empty domain columns and raw probabilities).

Size: weights per member; everything else once per file, whatever the member count (an
ensemble's members share featurizer, tasks, scaler, calibration and domain). The one part that
grows with the training set is the domain: its distinct training fingerprints, bit-packed
(n_bits / 8 bytes a molecule: about 200 MB for 8 x 10^5 training molecules of 2048 bits), plus,
for a clustered domain, 4 bytes a molecule per partition. A trial's checkpoint holds no domain.

A fold ensemble may also hold gradient-boosted trees (`toxmodel.trees`), one set per member
(fold i's trees read fold i's inputs), and the trees' share of the blend: its probability is
(1 - w) x the networks' mean + w x the tree sets' mean. The trees are LightGBM model text,
compressed into uint8 tensors, so such a file still loads with `weights_only=True`; a reader of
an older format version refuses it by version rather than answering the networks alone.

`Predictor.predict` answers, per molecule: the probability per task (calibrated when the
checkpoint holds a calibration), then the ensemble's spread per task (`<task>_std`, the
population std of the networks' raw probabilities, trees left out; empty for a single network,
which has no spread to report), the nearest-neighbour Tanimoto similarity to the training set
(`nn_similarity`) and whether it reaches the domain threshold (`in_domain`).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from toxmodel import __version__
from toxmodel.calibration import Calibration
from toxmodel.domain import Domain
from toxmodel.errors import CheckpointError
from toxmodel.featurize import DescriptorScaler, FeaturizerConfig, featurize
from toxmodel.model import MLP, Ensemble, ModelConfig
from toxmodel.trees import Trees, blend

FORMAT = "toxtune-mlp"
FORMAT_VERSION = 1  # one model
ENSEMBLE_FORMAT_VERSION = 2  # several models averaged (an older reader refuses it by version)
# Several models averaged, each with its own descriptor scaler (a fold ensemble: each fold's
# model was scaled on its own training rows); a reader of version 2 would apply one scaler to all.
MEMBER_SCALERS_FORMAT_VERSION = 3
# Several models averaged and blended with gradient-boosted trees (`trees`, `tree_weight`); a
# reader of version 3 would answer the networks alone.
TREES_FORMAT_VERSION = 4
VERSIONS = (
    FORMAT_VERSION,
    ENSEMBLE_FORMAT_VERSION,
    MEMBER_SCALERS_FORMAT_VERSION,
    TREES_FORMAT_VERSION,
)
PREDICT_BATCH = 4096  # rows per forward pass at inference
STD_SUFFIX = "_std"  # `<task>_std`: the ensemble's spread for that task
SIMILARITY = "nn_similarity"  # nearest-neighbour Tanimoto similarity to the training set
IN_DOMAIN = "in_domain"  # nn_similarity >= the domain threshold


def uncertainty_columns(tasks: Sequence[str]) -> list[str]:
    """The columns `Predictor.predict` appends after `error`, in order."""
    return [f"{t}{STD_SUFFIX}" for t in tasks] + [SIMILARITY, IN_DOMAIN]


def _plain(value: Any, where: str) -> Any:
    """`value` as plain Python types and CPU tensors, or TypeError naming where it failed."""
    if value is None:
        return None
    for kind in (bool, int, float, str):  # exact builtins: subclasses would need unpickling
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value, copy=True))
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"checkpoint {where}: dict keys must be str, got {key!r}")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    raise TypeError(
        f"checkpoint {where}: {type(value).__name__} is not a plain type, array or tensor"
    )


def save_checkpoint(
    path: str | Path,
    model: MLP,
    model_config: ModelConfig,
    featurizer: FeaturizerConfig,
    tasks: Sequence[str],
    n_inputs: int,
    scaler: DescriptorScaler | None,
    extra: Mapping[str, Any] | None = None,
    calibration: Calibration | None = None,
    domain: Domain | None = None,
) -> Path:
    """Write one checkpoint file atomically (temp file + rename); returns its path."""
    blob = {
        "format_version": FORMAT_VERSION,
        "state_dict": _weights(model),
        "model_config": _plain(model_config, "model_config"),
    }
    return _write(Path(path), blob, featurizer, tasks, n_inputs, scaler, extra, calibration, domain)


def save_ensemble(
    path: str | Path,
    members: Sequence[tuple[MLP, ModelConfig]],
    featurizer: FeaturizerConfig,
    tasks: Sequence[str],
    n_inputs: int,
    scaler: DescriptorScaler | None,
    extra: Mapping[str, Any] | None = None,
    calibration: Calibration | None = None,
    domain: Domain | None = None,
    member_scalers: Sequence[DescriptorScaler | None] | None = None,
    trees: Sequence[Trees] | None = None,
    tree_weight: float = 0.0,
) -> Path:
    """Write several models as one checkpoint; it loads as a `Predictor` that averages them.

    Members share the featurizer, tasks and descriptor scaler (they were trained on the same
    split); their architectures may differ (e.g. the top-k trials of a search). Members trained
    on different rows (the folds of a cross-validation) each scaled their descriptors on their
    own training rows: `member_scalers` (one per member; `scaler` must then be None) keeps each
    member's, in a format version older readers refuse. `trees` (one set per member, set i
    reading member i's inputs; or one set for members sharing `scaler`) are blended in at
    `tree_weight`, likewise.
    """
    if not members:
        raise ValueError("an ensemble checkpoint needs at least one member")
    if member_scalers is not None:
        if scaler is not None:
            raise ValueError("give either one shared scaler or member_scalers, not both")
        if len(member_scalers) != len(members):
            raise ValueError(f"{len(member_scalers)} member scalers for {len(members)} members")
    if trees:
        if not (len(trees) == len(members) or (member_scalers is None and len(trees) == 1)):
            raise ValueError(f"{len(trees)} tree sets for {len(members)} members: one per member")
        if any(list(t.tasks) != [str(task) for task in tasks] for t in trees):
            raise ValueError(f"tree sets' tasks differ from {list(tasks)}")
        if not 0.0 <= tree_weight <= 1.0:
            raise ValueError(f"tree_weight {tree_weight} is not in [0, 1]")
    version = ENSEMBLE_FORMAT_VERSION if member_scalers is None else MEMBER_SCALERS_FORMAT_VERSION
    blob: dict[str, Any] = {
        "format_version": TREES_FORMAT_VERSION if trees else version,
        "members": [
            {"state_dict": _weights(m), "model_config": _plain(c, f"members[{i}].model_config")}
            for i, (m, c) in enumerate(members)
        ],
    }
    for i, member_scaler in enumerate(member_scalers or ()):
        blob["members"][i]["scaler"] = _plain(member_scaler, f"members[{i}].scaler")
    if trees:
        blob["trees"] = [t.to_blob() for t in trees]
        blob["tree_weight"] = float(tree_weight)
    return _write(Path(path), blob, featurizer, tasks, n_inputs, scaler, extra, calibration, domain)


def save_predictor(
    path: str | Path, predictor: Predictor, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write a `Predictor` (one network or an ensemble) with its calibration and domain.

    `extra` defaults to the predictor's own.
    """
    model = predictor.model
    args = (predictor.featurizer, predictor.tasks, predictor.n_inputs, predictor.scaler)
    meta = predictor.extra if extra is None else extra
    trust = {"calibration": predictor.calibration, "domain": predictor.domain}
    if isinstance(model, Ensemble):
        members = [(m, m.config) for m in model.members]
        scalers = {"member_scalers": predictor.member_scalers}
        blended = {"trees": predictor.trees, "tree_weight": predictor.tree_weight}
        return save_ensemble(path, members, *args, extra=meta, **trust, **scalers, **blended)
    if predictor.trees:
        raise ValueError("trees are saved with an ensemble's members; this predictor holds one MLP")
    return save_checkpoint(path, model, model.config, *args, extra=meta, **trust)


def _weights(model: MLP) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _write(
    path: Path,
    blob: dict[str, Any],
    featurizer: FeaturizerConfig,
    tasks: Sequence[str],
    n_inputs: int,
    scaler: DescriptorScaler | None,
    extra: Mapping[str, Any] | None,
    calibration: Calibration | None = None,
    domain: Domain | None = None,
) -> Path:
    """Add the shared fields to `blob` and write it atomically (temp file + rename)."""
    if calibration is not None and list(calibration.tasks) != [str(t) for t in tasks]:
        raise ValueError(f"calibration tasks {list(calibration.tasks)} differ from {list(tasks)}")
    if domain is not None and domain.n_bits != featurizer.n_bits:
        raise ValueError(f"domain has {domain.n_bits} bits, featurizer {featurizer.n_bits}")
    blob = {
        "format": FORMAT,
        "toxmodel_version": __version__,
        "torch_version": str(torch.__version__),
        **blob,
        "featurizer": _plain(featurizer, "featurizer"),
        "tasks": [str(t) for t in tasks],
        "n_inputs": int(n_inputs),
        "scaler": None if scaler is None else _plain(scaler, "scaler"),
        "extra": _plain(dict(extra or {}), "extra"),
        "calibration": None if calibration is None else _plain(calibration.to_blob(), "cal"),
        "domain": None if domain is None else _plain(domain.to_blob(), "domain"),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(blob, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _to_numpy(value: Any) -> Any:
    """Tensors back to numpy arrays, recursively (for `extra`)."""
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_to_numpy(v) for v in value)
    return value


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """Read a checkpoint with `weights_only=True`; anything but plain types/tensors is refused."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than plain types and tensors, "
            f"so it is not a toxtune checkpoint or was tampered with ({exc})"
        ) from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a toxtune checkpoint (format {FORMAT!r} expected)")
    version = blob.get("format_version")
    if version not in VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this toxmodel reads "
            f"{', '.join(map(str, VERSIONS))}"
        )
    try:
        featurizer = FeaturizerConfig(**blob["featurizer"])
        tasks = list(blob["tasks"])
        n_inputs = int(blob["n_inputs"])
        members = blob["members"] if version != FORMAT_VERSION else [blob]
        models: list[MLP] = []
        for member in members:
            member_config = ModelConfig(**member["model_config"])
            models.append(MLP(n_inputs, len(tasks), member_config))
            models[-1].load_state_dict(member["state_dict"])
        model_config = models[0].config
        model: MLP | Ensemble = models[0] if version == FORMAT_VERSION else Ensemble(models)
        member_scalers = None
        if version == MEMBER_SCALERS_FORMAT_VERSION or (
            version == TREES_FORMAT_VERSION and "scaler" in members[0]
        ):
            member_scalers = [_scaler(member.get("scaler")) for member in members]
        trees = None
        if version == TREES_FORMAT_VERSION:
            trees = [Trees.from_blob(t) for t in blob["trees"]]
            one = member_scalers is None and len(trees) == 1
            if not (len(trees) == len(members) or one) or any(t.tasks != tasks for t in trees):
                raise ValueError(f"{len(trees)} tree sets for {len(members)} members of {tasks}")
        calibration = domain = None
        if blob.get("calibration") is not None:
            calibration = Calibration.from_blob(blob["calibration"])
            if list(calibration.tasks) != tasks:
                raise ValueError(f"calibration tasks {list(calibration.tasks)} are not {tasks}")
        if blob.get("domain") is not None:
            domain = Domain.from_blob(blob["domain"])
            if domain.n_bits != featurizer.n_bits:
                raise ValueError(f"domain of {domain.n_bits} bits, fingerprint {featurizer.n_bits}")
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: inconsistent checkpoint: {exc}") from exc
    scaler = _scaler(blob.get("scaler"))
    model.to(torch.device(device)).eval()
    return Predictor(
        model=model,
        featurizer=featurizer,
        tasks=tasks,
        n_inputs=n_inputs,
        model_config=model_config,
        scaler=scaler,
        extra=_to_numpy(blob.get("extra", {})),
        calibration=calibration,
        domain=domain,
        member_scalers=member_scalers,
        trees=trees,
        tree_weight=float(blob.get("tree_weight", 0.0)),
    )


def _scaler(raw: Any) -> DescriptorScaler | None:
    if raw is None:
        return None
    return DescriptorScaler(center=raw["center"].numpy(), scale=raw["scale"].numpy())


@dataclass(eq=False)
class Predictor:
    """A loaded model (or ensemble) that maps SMILES to per-task probabilities, their spread
    over the ensemble's members, and how close each molecule is to the training set."""

    model: MLP | Ensemble
    featurizer: FeaturizerConfig
    tasks: list[str]
    n_inputs: int
    model_config: ModelConfig  # an ensemble's first member's
    scaler: DescriptorScaler | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    calibration: Calibration | None = None  # applied to the (mean) probability by default
    domain: Domain | None = None  # the training set's bits and the in-domain threshold
    # An ensemble whose members scale descriptors each their own way (a fold ensemble), one per
    # member (`scaler` is then None); None: every member uses `scaler`
    member_scalers: list[DescriptorScaler | None] | None = None
    # Gradient-boosted trees blended in at `tree_weight` (a fold ensemble's: one set per member,
    # reading that member's inputs); None: the networks alone
    trees: list[Trees] | None = None
    tree_weight: float = 0.0

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (inputs are moved there)."""
        return next(self.model.parameters()).device

    @property
    def has_spread(self) -> bool:
        """True for an ensemble of two or more networks; a single network has no spread, so its
        `<task>_std` columns are empty (never a made-up 0)."""
        return isinstance(self.model, Ensemble) and len(self.model.members) > 1

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Raw (n, n_tasks) probabilities -> calibrated float64 ones (a copy when uncalibrated)."""
        if self.calibration is None:
            return np.array(probs, dtype=np.float64)
        return self.calibration.apply(probs)

    def predict(
        self,
        smiles: Sequence[str],
        batch_size: int = PREDICT_BATCH,
        n_jobs: int | None = None,
        calibrated: bool = True,
    ) -> pd.DataFrame:
        """One row per input, in order: `smiles`, one probability column per task, `error`,
        then `<task>_std` per task, `nn_similarity` and `in_domain`.

        Probabilities are float64, calibrated when the checkpoint holds a calibration and
        `calibrated` (False gives the model's raw ones). `<task>_std` is the population std of
        the members' raw probabilities (NaN for a single network: see `has_spread`);
        `nn_similarity` is NaN and `in_domain` <NA> without a stored domain. Rows whose SMILES is
        empty, over-long or unparsable get NaN/<NA> in every number column and the reason in
        `error` ("" for rows that were predicted); bad input never raises.

        `n_jobs`: processes featurizing and threads searching the domain (None: featurize in
        process for small inputs, else every CPU; the domain search uses every CPU).
        """
        items = list(smiles)
        n = len(items)
        probs = np.full((n, len(self.tasks)), np.nan)
        spread = np.full((n, len(self.tasks)), np.nan)
        similarity = np.full(n, np.nan)
        inside = np.zeros(n, dtype=bool)
        errors = [""] * n
        feats = featurize(items, self.featurizer, n_jobs=n_jobs)
        for bad in feats.invalid:
            errors[bad.row] = bad.reason or "invalid SMILES"
        if len(feats) and feats.n_features != self.n_inputs:
            raise CheckpointError(
                f"featurizer gives {feats.n_features} inputs but the model expects "
                f"{self.n_inputs}: the installed RDKit/toxmodel featurizes differently"
            )
        rows = feats.valid_rows
        if len(feats):
            mean, std = self._probabilities_and_spread(
                feats.fingerprint, feats.descriptors, batch_size
            )
            probs[rows] = mean
            if std is not None:
                spread[rows] = std
            if self.domain is not None:
                similarity[rows] = self.domain.similarity(feats.fingerprint, workers=n_jobs)
                inside[rows] = self.domain.in_domain(similarity[rows])
        if calibrated:
            probs = self.calibrate(probs)
        unknown = np.isnan(similarity)
        columns = {task: probs[:, j] for j, task in enumerate(self.tasks)}
        spreads = {f"{task}{STD_SUFFIX}": spread[:, j] for j, task in enumerate(self.tasks)}
        return pd.DataFrame(
            {
                "smiles": pd.Series(items, dtype=object),
                **columns,
                "error": errors,
                **spreads,
                SIMILARITY: similarity,
                IN_DOMAIN: pd.arrays.BooleanArray(inside, unknown),
            },
            index=pd.RangeIndex(n),
        )

    def probabilities(
        self, fingerprint: np.ndarray, descriptors: np.ndarray, batch_size: int = PREDICT_BATCH
    ) -> np.ndarray:
        """(Mean) sigmoid outputs for rows already featurized with `self.featurizer`, in
        batches, uncalibrated: what `predict` answers for their SMILES, without featurizing."""
        return self._probabilities_and_spread(fingerprint, descriptors, batch_size)[0]

    def _probabilities_and_spread(
        self, fingerprint: np.ndarray, descriptors: np.ndarray, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean sigmoid outputs for featurized rows (blended with the trees' when it holds
        trees), and their std over the networks (None for one network), in batches."""
        device = self.device
        model = self.model.eval()
        spread = self.has_spread
        means, stds = [], []
        with torch.inference_mode():
            for start in range(0, len(fingerprint), batch_size):
                stop = start + batch_size
                arrays = self.inputs(fingerprint[start:stop], descriptors[start:stop])
                xs = [torch.from_numpy(x).to(device) for x in arrays]
                if self.member_scalers is not None and isinstance(model, Ensemble):
                    members = torch.stack(
                        [torch.sigmoid(m(x)) for m, x in zip(model.members, xs, strict=True)]
                    ).float()
                elif spread and isinstance(model, Ensemble):
                    members = model.member_probabilities(xs[0]).float()
                else:
                    members = torch.sigmoid(model(xs[0])).float()[None]
                mean = members.mean(0).cpu().numpy()
                if self.trees:
                    mean = blend(mean, self.tree_probabilities(arrays), self.tree_weight)
                means.append(mean.astype(np.float32))
                if spread:
                    stds.append(members.std(0, correction=0).cpu().numpy())
        return np.concatenate(means), np.concatenate(stds) if stds else None

    def tree_probabilities(
        self, inputs: Sequence[np.ndarray], columns: Sequence[int] | None = None
    ) -> np.ndarray:
        """The tree sets' mean probabilities for the rows `inputs` (as `inputs()` builds them:
        tree set i reads copy i, or every set the one copy of members sharing a scaler), for
        the task columns asked (every task by default)."""
        if not self.trees:
            raise ValueError("this model holds no trees")
        if len(inputs) not in (1, len(self.trees)):
            raise ValueError(f"{len(inputs)} input copies for {len(self.trees)} tree sets")
        copies = inputs if len(inputs) == len(self.trees) else [inputs[0]] * len(self.trees)
        return np.mean(
            [t.probabilities(x, columns) for t, x in zip(self.trees, copies, strict=True)], axis=0
        )

    def inputs(self, fingerprint: np.ndarray, descriptors: np.ndarray) -> list[np.ndarray]:
        """The float32 model inputs of featurized rows (fingerprint, then scaled descriptors):
        one array for a model with one scaler, one per member with `member_scalers`."""
        scalers = self.member_scalers if self.member_scalers is not None else [self.scaler]
        fp = np.asarray(fingerprint).astype(np.float32)
        out = []
        for scaler in scalers:
            d = descriptors
            if scaler is not None and d.shape[1]:
                d = scaler.transform(d)
            out.append(np.concatenate([fp, np.asarray(d, dtype=np.float32)], axis=1))
        return out
