"""The multitask MLP: fingerprint (+ descriptor) vector in, one logit per toxicity task out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch
from torch import Tensor, nn

ACTIVATIONS: Mapping[str, type[nn.Module]] = MappingProxyType(
    {
        "relu": nn.ReLU,
        "leaky_relu": nn.LeakyReLU,
        "selu": nn.SELU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "elu": nn.ELU,
        "silu": nn.SiLU,
    }
)
NORMS = ("none", "batch", "layer")


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by registry name; an unknown name lists the valid ones."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; choose one of: {valid}") from None


@dataclass(frozen=True)
class ModelConfig:
    """MLP architecture; validated on construction so a bad trial fails before training."""

    hidden: tuple[int, ...] = (1024, 512)  # hidden layer widths; () = logistic regression
    activation: str = "relu"
    dropout: float = 0.2  # after every hidden activation
    input_dropout: float = 0.0  # on the input features
    norm: str = "none"  # none | batch | layer (selu is self-normalising: none only)

    def __post_init__(self) -> None:
        hidden = tuple(self.hidden)
        for width in hidden:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise ValueError(f"hidden widths must be positive integers, got {self.hidden!r}")
        object.__setattr__(self, "hidden", hidden)
        make_activation(self.activation)
        for name in ("dropout", "input_dropout"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.activation == "selu" and self.norm != "none":
            raise ValueError("selu is self-normalising: use norm='none' with it")


class MLP(nn.Module):
    """Linear -> [norm] -> activation -> dropout per hidden layer, then one logit per task.

    With selu the net is self-normalising: AlphaDropout (keeps mean and variance) and LeCun-normal
    initialisation, as in Klambauer et al. 2017.
    """

    def __init__(self, n_inputs: int, n_tasks: int, config: ModelConfig) -> None:
        super().__init__()
        if n_inputs < 1 or n_tasks < 1:
            raise ValueError(f"need n_inputs >= 1 and n_tasks >= 1, got {n_inputs}, {n_tasks}")
        self.n_inputs, self.n_tasks, self.config = n_inputs, n_tasks, config
        selu = config.activation == "selu"
        drop = nn.AlphaDropout if selu else nn.Dropout
        layers: list[nn.Module] = []
        if config.input_dropout > 0:
            layers.append(drop(config.input_dropout))
        width = n_inputs
        for out in config.hidden:
            layers.append(nn.Linear(width, out))
            if config.norm == "batch":
                layers.append(nn.BatchNorm1d(out))
            elif config.norm == "layer":
                layers.append(nn.LayerNorm(out))
            layers.append(make_activation(config.activation))
            if config.dropout > 0:
                layers.append(drop(config.dropout))
            width = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_tasks)
        if selu:
            self._lecun_normal()

    def _lecun_normal(self) -> None:
        """Weights ~ N(0, 1/fan_in) and zero biases: the init SELU's fixed point assumes."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=1.0 / math.sqrt(module.in_features))
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (batch, n_tasks); apply a sigmoid for probabilities."""
        return self.head(self.body(x))


class Ensemble(nn.Module):
    """Several MLPs over the same inputs and tasks, averaged in probability space.

    `forward` returns the logit of the members' mean probability, so an ensemble drops in
    wherever an MLP's logits are expected (a sigmoid of its output is the averaged probability).
    """

    EPS = 1e-7  # keeps the logit finite when every member is certain

    def __init__(self, members: list[MLP]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        shapes = {(m.n_inputs, m.n_tasks) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"ensemble members disagree on (inputs, tasks): {sorted(shapes)}")
        self.members = nn.ModuleList(members)
        self.n_inputs, self.n_tasks = members[0].n_inputs, members[0].n_tasks

    def member_probabilities(self, x: Tensor) -> Tensor:
        """Each member's sigmoid outputs, stacked: (n_members, batch, n_tasks)."""
        return torch.stack([torch.sigmoid(m(x)) for m in self.members])

    def forward(self, x: Tensor) -> Tensor:
        return torch.logit(self.member_probabilities(x).mean(0), eps=self.EPS)
