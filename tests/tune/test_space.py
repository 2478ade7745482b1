"""The search space: sampling respects overrides and conditions; configs map onto the library."""

from __future__ import annotations

import optuna
import pytest

from toxmodel.model import ModelConfig
from toxmodel.train import TrainConfig
from tune.space import DEFAULT_POINT, build_space, default_point, sample, to_run_configs


def _sample_many(space, n: int = 40, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(sample(trial, space))
        study.tell(trial, 0.5)
    return out


def test_samples_respect_ranges_and_conditions() -> None:
    space = build_space(
        {"lr": {"low": 1e-4, "high": 1e-3, "log": True}, "n_layers": {"low": 1, "high": 2}}
    )
    for params in _sample_many(space):
        assert 1e-4 <= params["lr"] <= 1e-3
        assert params["n_layers"] in (1, 2)
        assert all(f"width_{i}" in params for i in range(params["n_layers"]))
        assert f"width_{params['n_layers']}" not in params  # only active widths are sampled
        assert ("norm" in params) == (params["activation"] != "selu")
        model, train = to_run_configs(params, max_epochs=5, patience=2, seed=1)
        assert isinstance(model, ModelConfig) and isinstance(train, TrainConfig)
        assert len(model.hidden) == params["n_layers"]


def test_default_point_is_inside_default_space_and_dropped_when_outside() -> None:
    point = default_point(build_space())
    assert point is not None and point["activation"] == DEFAULT_POINT["activation"]
    assert default_point(build_space({"activation": {"choices": ["tanh"]}})) is None
    small = default_point(
        build_space(
            {"width_0": {"choices": [32, 64]}, "lr": {"low": 1e-2, "high": 0.1, "log": True}}
        )
    )
    assert small is not None and small["width_0"] == 64 and small["lr"] == 1e-2


def test_same_seed_same_samples() -> None:
    space = build_space()
    assert _sample_many(space, 5, seed=3) == _sample_many(space, 5, seed=3)
    assert _sample_many(space, 5, seed=3) != _sample_many(space, 5, seed=4)


def test_selu_gets_no_norm() -> None:
    params = {**DEFAULT_POINT, "activation": "selu", "norm": "batch"}
    model, _ = to_run_configs(params, max_epochs=3, patience=0, seed=0)
    assert model.norm == "none"


@pytest.mark.parametrize("bad", [{"width_0": {"choices": ["wide"]}}])
def test_numeric_choices_must_be_numbers(bad: dict) -> None:
    from tune.config import ConfigError

    with pytest.raises(ConfigError, match="width_0"):
        build_space(bad)


@pytest.mark.parametrize(
    ("bad", "name"),
    [
        ({"activation": {"choices": ["relu", "swish9"]}}, "swish9"),
        ({"scheduler": {"choices": ["warp"]}}, "warp"),
        ({"batch_size": {"choices": [64, "big"]}}, "batch_size"),
    ],
)
def test_categorical_choices_are_checked_against_what_the_library_accepts(
    bad: dict, name: str
) -> None:
    from tune.config import ConfigError

    with pytest.raises(ConfigError, match=name):
        build_space(bad)
