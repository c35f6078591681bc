"""Optimizers as pure functions over explicit tensors (optax-style).

Every optimizer has
    init(params, batch_ndim=0) -> state      # the first batch_ndim dims index runs
    update(grads, state, params) -> (updates, new_state)      # params += updates
and `update` never mutates its inputs: the same state can be asked for the
update of many different gradients (per-sample update analysis needs this).

Parameters, gradients and states are dicts of tensors that may carry leading
batch dimensions (a stack of independent runs). A learning rate may be a float
or a 1-D tensor of length B, one rate per run along the first batch dimension
(the learning-rate search trains every rate of its grid at once).

The learned optimizer (`L2O`) shares this interface; it lives in `learned.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import torch

from .errors import L2OError, Range

Params = dict[str, torch.Tensor]
State = dict[str, Any]
Rate = float | torch.Tensor


class Optimizer(Protocol):
    name: str

    def init(self, params: Mapping[str, torch.Tensor], batch_ndim: int = 0) -> State: ...

    def update(self, grads: Mapping[str, torch.Tensor], state: State,
               params: Mapping[str, torch.Tensor]) -> tuple[Params, State]: ...


FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # 1.1754944e-38, the smallest normal float32


class Underflow(L2OError):
    """A value inside its range that float32 cannot hold (it would compute as 0 or as a
    denormal that has lost its precision)."""


class Float32Range(Range):
    """A Range for settings that multiply float32 tensors: a nonzero value must also be at
    least FLOAT32_TINY in magnitude (1e-320 is in (0, 1] but is 0 in float32)."""

    def contains(self, v) -> bool:
        return super().contains(v) and not 0 < abs(v) < FLOAT32_TINY

    def _underflow(self, what: str) -> Underflow:
        return Underflow(f"{what} underflows float32 (smallest normal {FLOAT32_TINY:.2g}): it would compute "
                         f"as 0; valid: {self} and at least {FLOAT32_TINY:.2g}")

    def check(self, name: str, v):
        if super().contains(v) and not self.contains(v):
            raise self._underflow(f"{name} {v!r}")
        return super().check(name, v)

    def parse(self, s: str):
        try:
            v = int(s) if self.integer else float(s)
        except ValueError:
            v = None
        if v is not None and super().contains(v) and not self.contains(v):
            raise self._underflow(s)
        return super().parse(s)


# Valid learning rates of the baselines (the search grid spans 1e-4..3).
LR_RANGE = Float32Range(0, 100, lo_open=True)


def check_rate(rate: Rate, name: str = "lr") -> Rate:
    """A learning rate: a number in LR_RANGE, or a 1-D tensor of them (one per run)."""
    if isinstance(rate, torch.Tensor):
        values = rate.detach().to("cpu", torch.float64).reshape(-1).tolist()
        if rate.ndim != 1 or not values:
            raise L2OError(f"{name} as a tensor must be 1-D with one rate per run, got shape {tuple(rate.shape)}")
        for i, v in enumerate(values):
            LR_RANGE.check(f"{name}[{i}]", v)
        return rate
    return LR_RANGE.check(name, rate)


def _per_run(rate: Rate, like: torch.Tensor) -> Rate:
    """A float, or a (B,) tensor reshaped to broadcast over `like` (B, ...)."""
    if isinstance(rate, torch.Tensor) and rate.ndim == 1:
        return rate.to(like).reshape(-1, *([1] * (like.ndim - 1)))
    return rate


def _describe(rate: Rate) -> Any:
    return rate.tolist() if isinstance(rate, torch.Tensor) else rate


@dataclass(frozen=True)
class SGD:
    """torch.optim.SGD: d = g + wd*theta; buf = mu*buf + (1-dampening)*d (buf = d at the
    first step); update = -lr * (d + mu*buf if nesterov else buf)."""

    lr: Rate = 0.01
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    name: str = "sgd"

    def init(self, params, batch_ndim=0):
        return {"step": 0, "buf": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(self, grads, state, params):
        first = state["step"] == 0
        updates, bufs = {}, {}
        for k, g in grads.items():
            d = g + self.weight_decay * params[k] if self.weight_decay else g
            if self.momentum:
                buf = d if first else self.momentum * state["buf"][k] + (1 - self.dampening) * d
                d = d + self.momentum * buf if self.nesterov else buf
                bufs[k] = buf
            else:
                bufs[k] = state["buf"][k]
            updates[k] = -_per_run(self.lr, d) * d
        return updates, {"step": state["step"] + 1, "buf": bufs}

    def config(self) -> dict:
        return {"name": self.name, "lr": _describe(self.lr), "momentum": self.momentum,
                "dampening": self.dampening, "nesterov": self.nesterov, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class Adam:
    """torch.optim.Adam (L2 weight decay): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    update = -lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)."""

    lr: Rate = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: str = "adam"

    def init(self, params, batch_ndim=0):
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return {"step": 0, "m": zeros, "v": dict(zeros)}

    def update(self, grads, state, params):
        b1, b2 = self.betas
        t = state["step"] + 1
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        updates, ms, vs = {}, {}, {}
        for k, g in grads.items():
            if self.weight_decay:
                g = g + self.weight_decay * params[k]
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            denom = v.sqrt() / bc2 ** 0.5 + self.eps
            updates[k] = -(_per_run(self.lr, g) / bc1) * m / denom
            ms[k], vs[k] = m, v
        return updates, {"step": t, "m": ms, "v": vs}

    def config(self) -> dict:
        return {"name": self.name, "lr": _describe(self.lr), "betas": list(self.betas),
                "eps": self.eps, "weight_decay": self.weight_decay}


@dataclass(frozen=True)
class Lion:
    """Lion (Chen et al. 2023), as lion-pytorch: c = b1 m + (1-b1) g;
    update = -lr * (sign(c) + wd*theta); m = b2 m + (1-b2) g."""

    lr: Rate = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    name: str = "lion"

    def init(self, params, batch_ndim=0):
        return {"step": 0, "m": {k: torch.zeros_like(v) for k, v in params.items()}}

    def update(self, grads, state, params):
        b1, b2 = self.betas
        updates, ms = {}, {}
        for k, g in grads.items():
            m = state["m"][k]
            direction = torch.sign(b1 * m + (1 - b1) * g)
            if self.weight_decay:
                direction = direction + self.weight_decay * params[k]
            updates[k] = -_per_run(self.lr, g) * direction
            ms[k] = b2 * m + (1 - b2) * g
        return updates, {"step": state["step"] + 1, "m": ms}

    def config(self) -> dict:
        return {"name": self.name, "lr": _describe(self.lr), "betas": list(self.betas),
                "weight_decay": self.weight_decay}


BASELINES = {"sgd": SGD, "adam": Adam, "lion": Lion}
OPTIMIZERS = (*BASELINES, "l2o")


def make_baseline(name: str, lr: Rate | None = None, **kwargs) -> Optimizer:
    """SGD (momentum 0.9), Adam or Lion (betas 0.9/0.99) by name."""
    try:
        cls = BASELINES[name]
    except KeyError:
        raise L2OError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}") from None
    if lr is not None:
        kwargs["lr"] = check_rate(lr)
    return cls(**kwargs)


def apply_updates(params: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor]) -> Params:
    """theta + dtheta, as a new dict."""
    return {k: params[k] + updates[k] for k in params}


def tree_index(tree: Any, i: int | slice) -> Any:
    """Index every tensor of a params/grads/state tree along its first (run) dim."""
    return tree_map(lambda t: t[i], tree)


def tree_map(fn, tree: Any) -> Any:
    """`fn` applied to every tensor of a params/grads/state tree (dicts, tuples, lists); other
    leaves (step counts, shapes) as they are."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(fn, v) for v in tree)
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    return tree


def tree_tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor of a tree, in `tree_map`'s order."""
    out: list[torch.Tensor] = []
    tree_map(out.append, tree)
    return out
