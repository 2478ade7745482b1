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


def test_the_pairwise_loss_is_off_and_unasked_unless_the_space_asks_for_it() -> None:
    """A default space never asks Optuna for `auc_weight` (its studies keep the parameters
    they always had) and trains with the cross-entropy alone; a space with choices or a range
    samples it, starts from 0, and every trial's TrainConfig carries the value drawn."""
    default = build_space()
    assert all("auc_weight" not in params for params in _sample_many(default, 10))
    assert "auc_weight" not in default_point(default)
    _, train = to_run_configs(default_point(default), max_epochs=3, patience=0, seed=0)
    assert train.auc_weight == 0.0

    chosen = build_space({"auc_weight": {"choices": [0.0, 0.3]}})
    assert default_point(chosen)["auc_weight"] == 0.0
    drawn = [p["auc_weight"] for p in _sample_many(chosen, 20)]
    assert set(drawn) == {0.0, 0.3}
    for params in _sample_many(chosen, 5):
        _, train = to_run_configs(params, max_epochs=3, patience=0, seed=0)
        assert train.auc_weight == params["auc_weight"]
    ranged = build_space({"auc_weight": {"low": 0.1, "high": 1.0}})
    assert default_point(ranged)["auc_weight"] == 0.1  # 0 clipped into the range
    assert all(0.1 <= p["auc_weight"] <= 1.0 for p in _sample_many(ranged, 10))
    only = build_space({"auc_weight": {"choices": [0.5, 1.0]}})
    assert default_point(only)["auc_weight"] == 0.5  # the nearest choice to 0


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


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"width_0": {"choices": [0]}},
         "search.space.width_0: choices must be integers >= 1, got [0]"),
        # 256.5 used to be truncated to 256; 256.0 is refused as well (an int field never
        # takes a float in this config, e.g. search.num_samples: 2.0)
        ({"width_0": {"choices": [256, 256.5]}},
         "search.space.width_0: choices must be integers >= 1, got [256.5]"),
        ({"width_2": {"choices": [256.0]}},
         "search.space.width_2: choices must be integers >= 1, got [256.0]"),
        ({"width_1": {"choices": [True]}},
         "search.space.width_1: choices must be integers >= 1, got [True]"),
        ({"batch_size": {"choices": [0]}},
         "search.space.batch_size: choices must be integers >= 1, got [0]"),
        ({"dropout": {"low": 0.5, "high": 1.5}},
         "search.space.dropout.high: values must be numbers in [0, 1), got 1.5"),
        ({"input_dropout": {"choices": [0.0, 1.0]}},
         "search.space.input_dropout: choices must be numbers in [0, 1), got [1.0]"),
        # a layer i needs a width_<i>: there are MAX_LAYERS of them (it was a KeyError: 'width_3'
        # in a trial, after Ray started)
        ({"n_layers": {"choices": [1, 5]}},
         "search.space.n_layers: choices must be integers in 1..3, got [5]"),
        ({"n_layers": {"low": 1, "high": 4}},
         "search.space.n_layers.high: values must be integers in 1..3, got 4"),
        ({"n_layers": {"low": 0.5, "high": 2}},
         "search.space.n_layers.low: values must be integers in 1..3, got 0.5"),
        ({"lr": {"choices": [0, 1.0e-3]}},
         "search.space.lr: choices must be numbers > 0, got [0]"),
        ({"lr": {"low": -1.0, "high": 1.0e-3}},
         "search.space.lr.low: values must be numbers > 0, got -1.0"),
        ({"weight_decay": {"low": -1.0e-5, "high": 1.0e-3}},
         "search.space.weight_decay.low: values must be numbers >= 0, got -1e-05"),
        ({"weight_decay": {"low": 0, "high": 1.0e-3, "log": True}},
         "search.space.weight_decay: a log range needs low > 0, got 0"),
        ({"dropout": {"low": 0.4, "high": 0.2}},
         "search.space.dropout: low (0.4) is greater than high (0.2)"),
        ({"pos_weight": {"choices": [0, 1]}},
         "search.space.pos_weight: choices must be true or false, got [0, 1]"),
        ({"auc_weight": {"choices": [0.0, -0.3]}},
         "search.space.auc_weight: choices must be numbers >= 0, got [-0.3]"),
        ({"auc_weight": {"low": 0, "high": float("inf")}},
         "search.space.auc_weight.high: values must be numbers >= 0, got inf"),
        ({"norm": {"choices": ["none", "group"]}},
         "search.space.norm: choices must be one of none, batch or layer, got ['group']"),
        ({"scheduler": {"choices": ["warp"]}},
         "search.space.scheduler: choices must be one of none, cosine, onecycle or lambda, "
         "got ['warp']"),
    ],
)  # fmt: skip
def test_space_values_the_library_refuses_are_refused_when_the_config_loads(
    space: dict, message: str
) -> None:
    """Issue 25 item 8: these were checked only inside trials (after Ray started), or, for a
    width of 256.5, silently truncated. load_config (tune, submit and --resume) refuses them."""
    from tune.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(overrides={"search.space": space})
    assert str(err.value) == message


def test_every_parameter_has_a_rule_and_the_defaults_pass_it() -> None:
    from tune.space import RULES, SPACE

    assert set(RULES) == set(SPACE)
    for name, param in SPACE.items():
        values = param.choices or (param.low, param.high)
        assert all(RULES[name].accepts(v) for v in values), name
        assert name not in DEFAULT_POINT or RULES[name].accepts(DEFAULT_POINT[name]), name


def test_values_inside_the_rules_are_accepted_and_map_onto_the_library() -> None:
    space = build_space(
        {
            "n_layers": {"choices": [3]},
            "width_2": {"choices": [1, 7]},
            "dropout": {"choices": [0, 0.99]},
            "lr": {"choices": [1.0e-3]},
            "weight_decay": {"low": 0, "high": 1.0e-4, "log": False},
            "scheduler": {"choices": ["onecycle", "lambda"]},  # TrainConfig takes all four
        }
    )
    for params in _sample_many(space, 10):
        model, train = to_run_configs(params, max_epochs=2, patience=0, seed=0)
        assert len(model.hidden) == 3 and model.hidden[2] in (1, 7)
        assert train.scheduler in ("onecycle", "lambda")
