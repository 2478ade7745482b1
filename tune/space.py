"""The search space: one table of parameters, a define-by-run sampler, and the mapping to configs.

Names here are the names logged to MLflow and accepted in `search.space` overrides, e.g.

    search:
      space:
        lr: {low: 1.0e-4, high: 3.0e-3, log: true}
        activation: {choices: [relu, selu]}
        n_layers: {low: 1, high: 2}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from toxmodel.model import ModelConfig
from toxmodel.train import TrainConfig
from tune.errors import ConfigError

MAX_LAYERS = 3


@dataclass(frozen=True)
class Param:
    """One searchable parameter: a float/int range or a categorical choice."""

    kind: str  # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high


SPACE: dict[str, Param] = {
    "n_layers": Param("int", 1, MAX_LAYERS),
    **{
        f"width_{i}": Param("categorical", choices=(256, 512, 1024, 2048))
        for i in range(MAX_LAYERS)
    },
    "activation": Param("categorical", choices=("relu", "leaky_relu", "gelu", "selu", "tanh")),
    "norm": Param("categorical", choices=("none", "batch", "layer")),  # not asked for selu
    "dropout": Param("float", 0.0, 0.6),
    "input_dropout": Param("float", 0.0, 0.3),
    "lr": Param("float", 1e-4, 3e-3, log=True),
    "weight_decay": Param("float", 1e-7, 1e-3, log=True),
    "batch_size": Param("categorical", choices=(64, 128, 256, 512)),
    "scheduler": Param("categorical", choices=("none", "cosine")),
    "pos_weight": Param("categorical", choices=(False, True)),
}

# Known-good first point: a 2-layer ReLU MLP with moderate dropout (evaluated first).
DEFAULT_POINT: dict[str, Any] = {
    "n_layers": 2,
    "width_0": 1024,
    "width_1": 512,
    "activation": "relu",
    "norm": "none",
    "dropout": 0.3,
    "input_dropout": 0.1,
    "lr": 1e-3,
    "weight_decay": 1e-5,
    "batch_size": 128,
    "scheduler": "cosine",
    "pos_weight": False,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _allowed_names(name: str, base: Param) -> set[Any] | None:
    """The closed set of values a categorical parameter accepts (None: any number)."""
    if name == "activation":
        from toxmodel.model import ACTIVATIONS

        return set(ACTIVATIONS)
    if name in ("norm", "scheduler", "pos_weight"):
        return set(base.choices)
    return None


def _param_from_override(name: str, spec: Any) -> Param:
    base = SPACE[name]
    if not isinstance(spec, dict):
        raise ConfigError(
            f"search.space.{name}: expected a mapping like {{low, high}} or {{choices}}"
        )
    unknown = set(spec) - {"low", "high", "log", "choices"}
    if unknown:
        raise ConfigError(f"search.space.{name}: unknown key(s) {', '.join(sorted(unknown))}")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list | tuple) or len(choices) == 0:
            raise ConfigError(f"search.space.{name}.choices must be a non-empty list")
        numeric = base.kind != "categorical" or all(_is_number(c) for c in base.choices)
        if numeric and not all(_is_number(c) for c in choices):
            raise ConfigError(f"search.space.{name}.choices must be numbers, got {choices}")
        allowed = _allowed_names(name, base)
        if allowed is not None and not set(choices) <= allowed:
            bad = sorted(map(str, set(choices) - allowed))
            raise ConfigError(
                f"search.space.{name}: unknown choice(s) {', '.join(bad)}; "
                f"valid: {', '.join(sorted(map(str, allowed)))}"
            )
        return Param("categorical", choices=tuple(choices))
    if base.kind == "categorical":
        raise ConfigError(f"search.space.{name} is categorical: give `choices`")
    low, high = spec.get("low", base.low), spec.get("high", base.high)
    for bound, value in (("low", low), ("high", high)):
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not math.isfinite(value)
        ):
            raise ConfigError(f"search.space.{name}.{bound} must be a finite number, got {value!r}")
    if low > high:
        raise ConfigError(f"search.space.{name}: low ({low}) is greater than high ({high})")
    log = spec.get("log", base.log)
    if not isinstance(log, bool):
        raise ConfigError(f"search.space.{name}.log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"search.space.{name}: a log range needs low > 0, got {low}")
    if base.kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ConfigError(f"search.space.{name}: bounds must be integers")
    return Param(base.kind, low, high, log)


def validate_overrides(overrides: dict[str, Any]) -> None:
    """Raise ConfigError for an unknown parameter or an empty/inverted range."""
    build_space(overrides)


def build_space(overrides: dict[str, Any] | None = None) -> dict[str, Param]:
    """The default space with `search.space` overrides applied."""
    space = dict(SPACE)
    for name, spec in (overrides or {}).items():
        if name not in SPACE:
            raise ConfigError(
                f"search.space: unknown parameter {name!r}; searchable: {', '.join(SPACE)}"
            )
        space[name] = _param_from_override(name, spec)
    n = space["n_layers"]
    if n.kind != "categorical" and not ((n.low or 0) >= 1 and (n.high or 0) <= MAX_LAYERS):
        raise ConfigError(f"search.space.n_layers must lie within 1..{MAX_LAYERS}")
    return space


def _suggest(trial: Any, name: str, p: Param) -> Any:
    if p.kind == "categorical":
        return trial.suggest_categorical(name, list(p.choices))
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(name, float(p.low), float(p.high), log=p.log)


def sample(trial: Any, space: dict[str, Param]) -> dict[str, Any]:
    """Define-by-run sampling for an Optuna trial; conditional widths and norm."""
    params: dict[str, Any] = {"n_layers": _suggest(trial, "n_layers", space["n_layers"])}
    for i in range(int(params["n_layers"])):
        params[f"width_{i}"] = _suggest(trial, f"width_{i}", space[f"width_{i}"])
    params["activation"] = _suggest(trial, "activation", space["activation"])
    if params["activation"] != "selu":
        params["norm"] = _suggest(trial, "norm", space["norm"])
    for name in ("dropout", "input_dropout", "lr", "weight_decay", "batch_size"):
        params[name] = _suggest(trial, name, space[name])
    params["scheduler"] = _suggest(trial, "scheduler", space["scheduler"])
    params["pos_weight"] = _suggest(trial, "pos_weight", space["pos_weight"])
    return params


def _nearest(param: Param, value: Any) -> Any:
    """`value` moved into `param`: clipped to a range, or the closest numeric choice."""
    if param.contains(value):
        return value
    if param.kind == "categorical":
        numbers = [c for c in param.choices if _is_number(c)]
        if _is_number(value) and len(numbers) == len(param.choices):
            return min(numbers, key=lambda c: abs(math.log(c / value)) if c > 0 else abs(c - value))
        return None
    return type(value)(min(max(value, param.low), param.high))


def default_point(space: dict[str, Param]) -> dict[str, Any] | None:
    """The known-good first point, moved into `space`; None if a categorical choice is gone.

    Numeric values outside a narrowed space are clipped or moved to the nearest choice, so a
    small space still starts from the same kind of network.
    """
    n_layers = _nearest(space["n_layers"], DEFAULT_POINT["n_layers"])
    names = [k for k in DEFAULT_POINT if not k.startswith("width_")]
    names += [f"width_{i}" for i in range(int(n_layers))]
    point: dict[str, Any] = {}
    for name in names:
        if name == "norm" and DEFAULT_POINT["activation"] == "selu":
            continue
        value = DEFAULT_POINT.get(name, DEFAULT_POINT["width_1"])
        moved = _nearest(space[name], value)
        if moved is None:
            return None
        point[name] = moved
    point["n_layers"] = n_layers
    return point


def to_run_configs(
    params: dict[str, Any], max_epochs: int, patience: int, seed: int
) -> tuple[ModelConfig, TrainConfig]:
    """Map one trial's sampled values onto the library's model and training configs."""
    n_layers = int(params["n_layers"])
    hidden = tuple(int(params[f"width_{i}"]) for i in range(n_layers))
    activation = str(params["activation"])
    model = ModelConfig(
        hidden=hidden,
        activation=activation,
        dropout=float(params["dropout"]),
        input_dropout=float(params["input_dropout"]),
        norm="none" if activation == "selu" else str(params.get("norm", "none")),
    )
    train = TrainConfig(
        epochs=max_epochs,
        batch_size=int(params["batch_size"]),
        optimizer="adamw",
        lr=float(params["lr"]),
        weight_decay=float(params["weight_decay"]),
        scheduler=str(params["scheduler"]),
        pos_weight=bool(params["pos_weight"]),
        patience=patience,
        seed=seed,
    )
    return model, train


def describe(space: dict[str, Param]) -> dict[str, Any]:
    """A JSON-friendly description of the space (logged to MLflow)."""
    out: dict[str, Any] = {}
    for name, p in space.items():
        if p.kind == "categorical":
            out[name] = {"choices": list(p.choices)}
        else:
            out[name] = {"kind": p.kind, "low": p.low, "high": p.high, "log": p.log}
    return out
