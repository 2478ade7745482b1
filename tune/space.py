"""The search space: one table of parameters, a define-by-run sampler, and the mapping to configs.

Names here are the names logged to MLflow and accepted in `search.space` overrides, e.g.

    search:
      space:
        lr: {low: 1.0e-4, high: 3.0e-3, log: true}
        activation: {choices: [relu, selu]}
        n_layers: {low: 1, high: 2}
        auc_weight: {choices: [0.0, 0.3]}

`auc_weight` (the pairwise ROC-AUC loss beside the cross-entropy) is 0 unless a config asks;
a search whose space holds only 0 does not ask Optuna for it, so its studies are as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from toxmodel.model import ACTIVATIONS, NORMS, ModelConfig
from toxmodel.train import SCHEDULERS, TrainConfig
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
    "auc_weight": Param("float", 0.0, 0.0),  # off; e.g. {choices: [0.0, 0.3]} to search it
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
    "auc_weight": 0.0,
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """The values the library accepts for one parameter (ModelConfig, TrainConfig, `sample`):
    every choice, and both bounds of a range, of a `search.space` override must pass."""

    type: type  # int, float (any finite number), str or bool
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive unless high_open
    low_open: bool = False
    high_open: bool = False
    values: tuple[Any, ...] = ()  # a closed set of names; empty: any value of the type and range

    def accepts(self, value: Any) -> bool:
        if self.type is float:
            ok = _is_number(value) and math.isfinite(value)
        else:  # bool is an int to Python, never to a config: 1 is no pos_weight, True no width
            ok = isinstance(value, self.type) and (self.type is bool) == isinstance(value, bool)
        if not ok or (self.values and value not in self.values):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (value == self.high and not self.high_open)

    def __str__(self) -> str:
        """What the values must be, for a message: 'integers in 1..3', 'numbers in [0, 1)'."""
        if self.type is bool:
            return "true or false"
        if self.values:
            *rest, last = map(str, self.values)
            return f"one of {', '.join(rest)} or {last}" if rest else last
        what = "integers" if self.type is int else "numbers"
        if self.low is not None and self.high is not None:
            if self.type is int:
                return f"{what} in {self.low:g}..{self.high:g}"
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{what} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        return what


# What each parameter may take, whatever the space says: checked when the config is loaded, so
# a value the library refuses (or would silently truncate, like a width of 256.5) never reaches
# a trial. n_layers stops at MAX_LAYERS: a layer i needs its width_<i>, and there are that many.
RULES: dict[str, Rule] = {
    "n_layers": Rule(int, 1, MAX_LAYERS),
    **{f"width_{i}": Rule(int, 1) for i in range(MAX_LAYERS)},
    "activation": Rule(str, values=tuple(ACTIVATIONS)),
    "norm": Rule(str, values=NORMS),
    "dropout": Rule(float, 0, 1, high_open=True),
    "input_dropout": Rule(float, 0, 1, high_open=True),
    "lr": Rule(float, 0, low_open=True),
    "weight_decay": Rule(float, 0),
    "batch_size": Rule(int, 1),
    "scheduler": Rule(str, values=SCHEDULERS),
    "pos_weight": Rule(bool),
    "auc_weight": Rule(float, 0),
}


def _param_from_override(name: str, spec: Any) -> Param:
    base, rule = SPACE[name], RULES[name]
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
        bad = [c for c in choices if not rule.accepts(c)]
        if bad:
            raise ConfigError(f"search.space.{name}: choices must be {rule}, got {bad}")
        return Param("categorical", choices=tuple(choices))
    if base.kind == "categorical":
        raise ConfigError(f"search.space.{name} is categorical: give `choices`")
    low, high = spec.get("low", base.low), spec.get("high", base.high)
    for bound, value in (("low", low), ("high", high)):
        if not rule.accepts(value):
            raise ConfigError(f"search.space.{name}.{bound}: values must be {rule}, got {value!r}")
    if low > high:
        raise ConfigError(f"search.space.{name}: low ({low}) is greater than high ({high})")
    log = spec.get("log", base.log)
    if not isinstance(log, bool):
        raise ConfigError(f"search.space.{name}.log must be true or false")
    if log and low <= 0:
        raise ConfigError(f"search.space.{name}: a log range needs low > 0, got {low}")
    return Param(base.kind, low, high, log)


def validate_overrides(overrides: dict[str, Any]) -> None:
    """Raise ConfigError, naming the key, for an unknown parameter, an empty or inverted range,
    or a value `RULES` refuses (load_config calls it, before Ray starts)."""
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
    if _asks_auc_weight(space):
        params["auc_weight"] = _suggest(trial, "auc_weight", space["auc_weight"])
    return params


def _asks_auc_weight(space: dict[str, Param]) -> bool:
    """Whether `sample` asks Optuna for `auc_weight`: only where the space lets it be more
    than 0, so a search without the pairwise loss keeps the parameters its studies always had
    (the one parameter added after studies existed; every other is always asked)."""
    p = space["auc_weight"]
    return any(p.choices) if p.kind == "categorical" else bool(p.high)


def _nearest(param: Param, value: Any) -> Any:
    """`value` moved into `param`: clipped to a range, or the closest numeric choice."""
    if param.contains(value):
        return value
    if param.kind == "categorical":
        numbers = [c for c in param.choices if _is_number(c)]
        if _is_number(value) and len(numbers) == len(param.choices):
            if value <= 0:  # no ratio to 0 (auc_weight's default): the nearest by difference
                return min(numbers, key=lambda c: abs(c - value))
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
    if not _asks_auc_weight(space):
        names.remove("auc_weight")
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
        auc_weight=float(params.get("auc_weight", 0.0)),
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
