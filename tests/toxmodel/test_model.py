"""The MLP, its config validation and the activation registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from toxmodel.model import ACTIVATIONS, MLP, Ensemble, ModelConfig, make_activation

NAMES = ["relu", "leaky_relu", "selu", "gelu", "tanh", "sigmoid", "elu", "silu"]


def test_registry_holds_the_documented_activations_and_is_read_only() -> None:
    assert sorted(ACTIVATIONS) == sorted(NAMES)
    assert isinstance(make_activation("leaky_relu"), nn.LeakyReLU)
    with pytest.raises(TypeError):
        ACTIVATIONS["swish"] = nn.SiLU  # type: ignore[index]


def test_unknown_activation_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="swish") as info:
        ModelConfig(activation="swish")
    for name in NAMES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"input_dropout": 1.5},
        {"hidden": (0,)},
        {"hidden": (64, -1)},
        {"hidden": (1.5,)},
        {"norm": "group"},
        {"activation": "selu", "norm": "batch"},
    ],
)
def test_config_rejects_invalid_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_config_accepts_a_list_of_widths_from_yaml() -> None:
    config = ModelConfig(hidden=[128, 64])  # type: ignore[arg-type]
    assert config.hidden == (128, 64)
    assert hash(config) == hash(ModelConfig(hidden=(128, 64)))


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_one_logit_per_task(name: str) -> None:
    model = MLP(20, 3, ModelConfig(hidden=(16, 8), activation=name))
    assert model(torch.rand(5, 20)).shape == (5, 3)


def test_layer_order_per_hidden_layer() -> None:
    model = MLP(10, 2, ModelConfig(hidden=(8, 4), norm="batch", dropout=0.1, input_dropout=0.2))
    kinds = [type(m) for m in model.body]
    block = [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert kinds == [nn.Dropout, *block, *block]
    assert model.head.out_features == 2
    layer = MLP(10, 2, ModelConfig(hidden=(8,), norm="layer", dropout=0.0))
    assert [type(m) for m in layer.body] == [nn.Linear, nn.LayerNorm, nn.ReLU]


def test_no_hidden_layers_is_logistic_regression() -> None:
    model = MLP(10, 2, ModelConfig(hidden=()))
    assert len(model.body) == 0
    assert sum(p.numel() for p in model.parameters()) == 10 * 2 + 2


def test_dropout_only_in_training_mode() -> None:
    model = MLP(30, 2, ModelConfig(hidden=(64,), dropout=0.5))
    x = torch.rand(4, 30)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_selu_net_is_self_normalising() -> None:
    torch.manual_seed(0)
    config = ModelConfig(hidden=(256,) * 8, activation="selu", dropout=0.1, input_dropout=0.1)
    model = MLP(256, 1, config)
    assert any(isinstance(m, nn.AlphaDropout) for m in model.modules())
    assert not any(type(m) is nn.Dropout for m in model.modules())
    first = model.body[1]
    assert isinstance(first, nn.Linear)
    assert first.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)
    assert torch.all(first.bias == 0)
    model.train()  # AlphaDropout keeps the statistics too
    with torch.no_grad():
        h = model.body(torch.randn(2048, 256))
    assert abs(h.mean().item()) < 0.15
    assert h.std().item() == pytest.approx(1.0, abs=0.15)


def test_mlp_rejects_empty_shapes() -> None:
    with pytest.raises(ValueError):
        MLP(0, 1, ModelConfig())
    with pytest.raises(ValueError):
        MLP(4, 0, ModelConfig())


def test_ensemble_output_is_the_logit_of_its_members_mean_probability() -> None:
    torch.manual_seed(0)
    members = [MLP(16, 3, ModelConfig(hidden=(8,), dropout=0.0)) for _ in range(3)]
    ensemble = Ensemble(members).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        assert torch.allclose(torch.sigmoid(ensemble(x)), mean, atol=1e-6)
        single = Ensemble(members[:1])(x)
        assert torch.allclose(single, members[0](x), atol=1e-4)  # one member: itself


def test_ensemble_refuses_members_of_different_shapes() -> None:
    with pytest.raises(ValueError, match="disagree"):
        Ensemble([MLP(16, 3, ModelConfig(hidden=(8,))), MLP(16, 2, ModelConfig(hidden=(8,)))])
    with pytest.raises(ValueError, match="at least one"):
        Ensemble([])
