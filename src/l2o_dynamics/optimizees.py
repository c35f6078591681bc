"""The optimizee zoo: functional MNIST MLPs with softmax cross-entropy.

Parameters are a dict of named tensors. Every tensor may carry leading batch
dimensions `*B` (a stack of B independent parameter sets); inputs `x` are
`(*B, n, 784)` or `(n, 784)` (shared by the stack). All functions broadcast over
`*B`, so many optimizees train in one batched computation.

Each model declares its `Structure`: which tensors are each hidden layer's
incoming weights and bias, outgoing weights, whether the activation is positively
homogeneous, whether BatchNorm follows, and which tensors produce the softmax
logits. Symmetry analysis reads this; it never guesses from names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from .errors import L2OError

Params = dict[str, torch.Tensor]

BN_EPS = 1e-5
LEAKY_SLOPE = 0.01
ACTIVATIONS = {
    # name: (function, positively homogeneous: f(a z) = a f(z) for a > 0)
    "sigmoid": (torch.sigmoid, False),
    "relu": (torch.relu, True),
    "leaky_relu": (lambda z: F.leaky_relu(z, LEAKY_SLOPE), True),
}

# name: (slope z -> f'(z), its maximum); the health monitor's "dead unit" reads these
SLOPES = {
    "sigmoid": (lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)), 0.25),
    "relu": (lambda z: (z > 0).to(z.dtype), 1.0),
    "leaky_relu": (lambda z: torch.where(z > 0, 1.0, LEAKY_SLOPE).to(z.dtype), 1.0),
}


@dataclass(frozen=True)
class HiddenLayer:
    """One hidden layer of units k = 0..width-1.

    weight: (width, fan_in) incoming weights, row k = w_k
    bias: (width,) incoming bias b_k
    out_weight: (fan_out, width) outgoing weights, column k = a_k
    homogeneous: the activation is positively homogeneous (ReLU, LeakyReLU)
    bn_weight, bn_bias: BatchNorm affine (gamma, beta) when BatchNorm follows the
        Linear (then w_k, b_k have scale symmetry, and (gamma_k, beta_k, a_k)
        carry the rescale symmetry instead of (w_k, b_k, a_k)).
    """

    weight: str
    bias: str
    out_weight: str
    activation: str
    homogeneous: bool
    bn_weight: str | None = None
    bn_bias: str | None = None

    @property
    def batchnorm(self) -> bool:
        return self.bn_weight is not None


@dataclass(frozen=True)
class Structure:
    hidden: tuple[HiddenLayer, ...]
    logits_weight: str  # (10, width) feeding the softmax
    logits_bias: str  # (10,)


@dataclass(frozen=True)
class Optimizee:
    """A functional MLP 784 -> hidden... -> 10 with softmax cross-entropy."""

    name: str
    hidden_sizes: tuple[int, ...]
    activation: str
    batchnorm: bool = False
    in_features: int = 784
    classes: int = 10
    bn_eps: float = BN_EPS  # BatchNorm's eps breaks its scale symmetry by O(eps / var)

    # ---- structure -------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.in_features, *self.hidden_sizes, self.classes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes in a fixed order (PyTorch nn.Linear layout)."""
        shapes: dict[str, tuple[int, ...]] = {}
        sizes = self.sizes
        for i in range(len(sizes) - 1):
            shapes[f"fc{i + 1}.weight"] = (sizes[i + 1], sizes[i])
            shapes[f"fc{i + 1}.bias"] = (sizes[i + 1],)
            if self.batchnorm and i < len(sizes) - 2:
                shapes[f"bn{i + 1}.weight"] = (sizes[i + 1],)
                shapes[f"bn{i + 1}.bias"] = (sizes[i + 1],)
        return shapes

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    @property
    def structure(self) -> Structure:
        _, homogeneous = ACTIVATIONS[self.activation]
        n = len(self.hidden_sizes)
        hidden = tuple(
            HiddenLayer(
                weight=f"fc{i + 1}.weight",
                bias=f"fc{i + 1}.bias",
                out_weight=f"fc{i + 2}.weight",
                activation=self.activation,
                homogeneous=homogeneous,
                bn_weight=f"bn{i + 1}.weight" if self.batchnorm else None,
                bn_bias=f"bn{i + 1}.bias" if self.batchnorm else None,
            )
            for i in range(n)
        )
        return Structure(hidden, logits_weight=f"fc{n + 1}.weight", logits_bias=f"fc{n + 1}.bias")

    # ---- functional model ------------------------------------------------------
    def init(self, generator: torch.Generator | None = None, batch_shape: tuple[int, ...] = (),
             dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Params:
        """PyTorch's default init: Linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in));
        BatchNorm gamma = 1, beta = 0. Drawn on the CPU from `generator` (so a seed gives
        the same init on every device), shape `(*batch_shape, *shape)`."""
        params: Params = {}
        for name, shape in self.shapes().items():
            full = (*batch_shape, *shape)
            if name.startswith("bn"):
                value = torch.ones(full) if name.endswith("weight") else torch.zeros(full)
            else:
                layer = name.split(".")[0]
                fan_in = self.shapes()[f"{layer}.weight"][1]
                bound = 1.0 / math.sqrt(fan_in)
                value = torch.rand(full, generator=generator, dtype=torch.float64) * (2 * bound) - bound
            params[name] = value.to(dtype=dtype, device=device)
        return params

    def logits(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x: (*B, n, in) or (n, in) -> logits (*B, n, classes)."""
        return self._forward(params, x)[0]

    def activation_inputs(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
        """What each hidden layer's activation reads (after BatchNorm): [(*B, n, width)]."""
        return self._forward(params, x)[1]

    def dead_fraction(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """(*B,) fraction of hidden units whose activation slope is at most 1% of its maximum
        on every example of x (ReLU: z <= 0; LeakyReLU(0.01): z < 0; sigmoid: |z| >= 5.9)."""
        slope, top = SLOPES[self.activation]
        with torch.no_grad():
            dead = [(slope(z) <= 0.01 * top).all(-2) for z in self.activation_inputs(params, x)]
            return torch.cat(dead, dim=-1).to(x.dtype).mean(-1)

    def _forward(self, params, x):
        act, _ = ACTIVATIONS[self.activation]
        h, pre = x, []
        n_layers = len(self.hidden_sizes) + 1
        for i in range(1, n_layers + 1):
            h = h @ params[f"fc{i}.weight"].mT + params[f"fc{i}.bias"].unsqueeze(-2)
            if i == n_layers:
                break
            if self.batchnorm:
                h = batch_norm(h, params[f"bn{i}.weight"], params[f"bn{i}.bias"], self.bn_eps)
            pre.append(h)
            h = act(h)
        return h, pre

    def loss(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean softmax cross-entropy over the n examples: (*B,)."""
        return cross_entropy(self.logits(params, x), y)

    def accuracy(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fraction of correct argmax predictions: (*B,)."""
        with torch.no_grad():
            return accuracy(self.logits(params, x), y)

    def loss_and_grad(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[torch.Tensor, Params, torch.Tensor]:
        """Per-set loss (*B,), its gradient w.r.t. each set's params (detached), and accuracy (*B,).

        The gradient is taken with respect to the current parameters only: `params`
        are detached first, so no graph that produced them is ever walked."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad():
            logits = self.logits(leaves, x)
            loss = cross_entropy(logits, y)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return loss.detach(), dict(zip(leaves, grads)), accuracy(logits.detach(), y)


def batch_norm(h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = BN_EPS
               ) -> torch.Tensor:
    """BatchNorm1d in training mode: batch statistics over the n examples (dim -2),
    biased variance, affine. h: (*B, n, width)."""
    mean = h.mean(-2, keepdim=True)
    var = h.var(-2, unbiased=False, keepdim=True)
    return (h - mean) * torch.rsqrt(var + eps) * gamma.unsqueeze(-2) + beta.unsqueeze(-2)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logits (*B, n, C), y (n,) or (*B, n) int64 -> mean NLL (*B,)."""
    logp = torch.log_softmax(logits, dim=-1)
    y = y.expand(logp.shape[:-1])
    return -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(-1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).to(logits.dtype).mean(-1)


ZOO: dict[str, Optimizee] = {
    m.name: m
    for m in (
        Optimizee("sigmoid", (20,), "sigmoid"),
        Optimizee("relu", (20,), "relu"),
        Optimizee("leaky_relu", (20,), "leaky_relu"),
        Optimizee("bn_relu", (20,), "relu", batchnorm=True),
        Optimizee("sigmoid_2x20", (20, 20), "sigmoid"),
        Optimizee("sigmoid_40", (40,), "sigmoid"),
        Optimizee("relu_100x100", (100, 100), "relu"),
    )
}


def get_optimizee(name: str | Optimizee) -> Optimizee:
    if isinstance(name, Optimizee):
        return name
    try:
        return ZOO[name]
    except KeyError:
        raise L2OError(f"unknown optimizee {name!r}; valid: {', '.join(ZOO)}") from None


def stack_params(param_sets: list[Params]) -> Params:
    """[{name: (...)}] * B -> {name: (B, ...)}."""
    return {k: torch.stack([p[k] for p in param_sets]) for k in param_sets[0]}


def flatten(tensors: Mapping[str, torch.Tensor], batch_ndim: int = 0) -> torch.Tensor:
    """Concatenate all tensors into (*B, P), keeping `batch_ndim` leading dims."""
    return torch.cat([t.reshape(*t.shape[:batch_ndim], -1) for t in tensors.values()], dim=-1)


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor], batch_ndim: int = 0) -> Params:
    """Inverse of `flatten`: (*B, P) -> dict shaped like `like` (trailing shapes), views of `flat`."""
    out: Params = {}
    i = 0
    batch = flat.shape[:-1]
    for k, t in like.items():
        shape = t.shape[batch_ndim:]
        n = math.prod(shape)
        out[k] = flat[..., i:i + n].reshape(*batch, *shape)
        i += n
    return out
