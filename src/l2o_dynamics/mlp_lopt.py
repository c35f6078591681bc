"""The per-parameter MLP learned optimizer of Metz et al. (2022), "small_fc_lopt" / AdafacMLP.

("Practical tradeoffs between memory, compute, and performance in learned optimizers";
the design of learned_optimization's `learned_optimizers/adafac_mlp_lopt.py`, written anew.)

Every coordinate theta_i of a tensor W gets F = 39 features; one small MLP, shared by all
coordinates of all tensors, maps them to a direction d and a magnitude m:

    m_j   <- b_j m_j + (1 - b_j) g                 momentum, b = (0.9, 0.99, 0.999)
    r     <- c r + (1 - c) g^2                     second moment, c = 0.999
    Adafactor accumulators per decay a_j = (0.9, 0.99, 0.999), on s = g^2 + 1e-30:
      matrices (factored dims D0 = the largest, D1 = the second largest; ties: the later):
        v_row <- a v_row + (1 - a) mean_D0 s       (one value per index of D1 and other dims)
        v_col <- a v_col + (1 - a) mean_D1 s       (one value per index of D0 and other dims)
        R = rsqrt(max(v_row / (mean_D1 v_row + 1e-9), 1e-9)),  C = rsqrt(max(v_col, 1e-9))
        fac_g = g R C;  fac_m = m_j R C;  row = v_row, col = v_col (broadcast to W's shape)
      vectors (and scalars, as length-1 vectors) fall back to a diagonal accumulator v:
        v <- a v + (1 - a) s;  fac_g = g rsqrt(max(v + 1e-9, 1e-9));  fac_m = m_j (v + 1e-6)^-1/2;
        row = col = v
    x (28 per coordinate, in this order; `FEATURES` names them):
        g, theta, m (3), r, m rsqrt(r + 1e-6) (3), rsqrt(r + 1e-6), fac_g (3), row (3), col (3),
        rsqrt(row + 1e-8) (3), rsqrt(col + 1e-8) (3), fac_m (3)
    each feature normalised over the tensor: x <- x rsqrt(1e-5 + mean_W x^2)
    time (11, not normalised): tanh(t / s - 1), s = 1, 3, 10, ..., 100000; t = 0 at the first update
    (d, m)  = MLP_phi([x, time])          39 -> 32 -> 32 -> 2, ReLU between layers
    dtheta  = -d exp(exp_mult m) step_mult          exp_mult = step_mult = 1e-3

The decays are learnable: phi holds offsets o (zero at init, as in the reference) in the
reference's parametrisation decay = 1 - exp(10 (log(1 - decay_0) / 10 + o)); the second-moment
and Adafactor decays are clipped to [0, 1], the momentum decays are not (as in the reference).

The meta-parameters phi are an explicit dict: w0 (39, H), b0 (H,), w1 (H, H), b1, ..., wL (H, 2),
bL (2,) in the reference's (in, out) layout, and momentum_decays (3,), rms_decays (1,),
adafactor_decays (3,). All coordinates of all tensors (and of all runs of a stack) go through
ONE batched MLP call per step. What differs from the reference and from PyLO: docs/mlp_l2o.md.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from .errors import L2OError, Range
from .files import atomic_torch_save
from .learned import check_phi_shapes, read_torch
from .optimizers import Float32Range

Params = dict[str, torch.Tensor]

MOMENTUM_DECAYS = (0.9, 0.99, 0.999)
RMS_DECAYS = (0.999,)
ADAFACTOR_DECAYS = (0.9, 0.99, 0.999)
TIMESCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)
DECAY_KEYS = {"momentum_decays": MOMENTUM_DECAYS, "rms_decays": RMS_DECAYS,
              "adafactor_decays": ADAFACTOR_DECAYS}
# PyLO's AdafacLO_naive / AdafacLO_cuda defaults: the decay offsets it ships with its MetaMLP weights
# (its weight files carry no decays), in the same parametrisation as ours.
PYLO_DECAYS = {"momentum_decays": (0.15216392, 0.14245212, 0.06812963), "rms_decays": (0.01079706,),
               "adafactor_decays": (0.18621896, -0.10864615, -0.06185547)}


def _feature_names() -> tuple[str, ...]:
    m = [f"m{b}" for b in MOMENTUM_DECAYS]
    a = ADAFACTOR_DECAYS
    return ("g", "param", *m, f"rms{RMS_DECAYS[0]}", *(f"{x}/sqrt(rms)" for x in m), "1/sqrt(rms)",
            *(f"fac_g{d}" for d in a), *(f"row{d}" for d in a), *(f"col{d}" for d in a),
            *(f"1/sqrt(row{d})" for d in a), *(f"1/sqrt(col{d})" for d in a),
            *(f"fac_m{b}" for b in MOMENTUM_DECAYS), *(f"tanh(t/{s}-1)" for s in TIMESCALES))


FEATURES = _feature_names()  # the 39 inputs of the MLP, in the reference's order
N_NORMALISED = len(FEATURES) - len(TIMESCALES)  # 28: all but the time features


# ---- meta-parameters ---------------------------------------------------------------
def mlp_phi_shapes(hidden: int = 32, hidden_layers: int = 2) -> dict[str, tuple[int, ...]]:
    """Names and shapes of phi: the MLP (reference layout, (in, out)) and the decay offsets."""
    sizes = [len(FEATURES)] + [hidden] * hidden_layers + [2]
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(len(sizes) - 1):
        shapes[f"w{i}"] = (sizes[i], sizes[i + 1])
        shapes[f"b{i}"] = (sizes[i + 1],)
    shapes.update({k: (len(v),) for k, v in DECAY_KEYS.items()})
    return shapes


def init_mlp_phi(generator: torch.Generator | None = None, hidden: int = 32, hidden_layers: int = 2,
                 dtype: torch.dtype = torch.float32, device=None) -> Params:
    """The reference's init: weights ~ N(0, 1/fan_in) truncated at 2 standard deviations,
    biases and decay offsets zero."""
    phi: Params = {}
    for k, shape in mlp_phi_shapes(hidden, hidden_layers).items():  # drawn in this order
        t = torch.zeros(shape, dtype=torch.float64)
        if k.startswith("w"):
            torch.nn.init.trunc_normal_(t, std=1.0 / math.sqrt(shape[0]), a=-2.0 / math.sqrt(shape[0]),
                                        b=2.0 / math.sqrt(shape[0]), generator=generator)
        phi[k] = t.to(dtype=dtype, device=device)
    return phi


def decays(phi: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(momentum (3,), rms (1,), adafactor (3,)) decays from phi's offsets (module docstring)."""
    out = []
    for k, initial in DECAY_KEYS.items():
        offset = phi[k]
        d0 = torch.tensor(initial, dtype=offset.dtype, device=offset.device)
        d = 1 - torch.exp(10.0 * (torch.log(1 - d0) / 10.0 + offset))
        out.append(d if k == "momentum_decays" else d.clamp(0.0, 1.0))
    return out[0], out[1], out[2]


def factored_dims(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(D1, D0): the second-largest and the largest dim of a tensor with >= 2 dims, as the
    reference picks them (numpy's argsort of the shape); None for vectors and scalars."""
    if len(shape) < 2:
        return None
    order = np.argsort(shape)
    return int(order[-2]), int(order[-1])


def time_features(step: int | torch.Tensor, dtype=torch.float32, device=None) -> torch.Tensor:
    """(11,): tanh(step / s - 1) for the timescales s of TIMESCALES; a tensor of steps (*B,)
    (one per run) gives (*B, 11)."""
    s = torch.tensor(TIMESCALES, dtype=dtype, device=device)
    if isinstance(step, torch.Tensor):
        return torch.tanh(step.to(dtype=dtype, device=device).unsqueeze(-1) / s - 1.0)
    return torch.tanh(step / s - 1.0)


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.clamp_min(1e-9))


# ---- the optimizer --------------------------------------------------------------
@dataclass(frozen=True)
class MLPL2O:
    """The MLP learned optimizer with the functional optimizer interface:
    update = -d exp(exp_mult m) step_mult, (d, m) = MLP_phi(features) (module docstring).

    state = {"step": t, "m": {name: (*B, *S, 3)}, "rms": {name: (*B, *S, 1)},
    "fac": {name: (v_row (*B, *S minus D0, 3), v_col (*B, *S minus D1, 3)) for matrices,
    (v (*B, *S, 3),) for vectors}, "shapes": {name: S}}, all zero at the start of a run (a
    scalar parameter is kept as S = (1,)). Leading dims index runs, as for every other
    optimizer state. `update` accepts gradients with extra leading dims (many gradients at
    one frozen state): the state and the parameters broadcast over them.
    """

    phi: Mapping[str, torch.Tensor]
    hidden: int = 32
    hidden_layers: int = 2
    exp_mult: float = 1e-3
    step_mult: float = 1e-3
    name: str = "mlp_l2o"
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        expected = mlp_phi_shapes(self.hidden, self.hidden_layers)
        got = {k: tuple(v.shape) for k, v in self.phi.items()}
        if got != expected:
            wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
            raise L2OError(f"phi does not match an MLP L2O with {self.hidden_layers} hidden layers of {self.hidden} "
                           f"(names or shapes differ at {', '.join(wrong)}); make phi with "
                           f"init_mlp_phi(hidden={self.hidden}, hidden_layers={self.hidden_layers})")

    def init(self, params, batch_ndim: int = 0):
        """Zero accumulators for params whose first `batch_ndim` dims index independent runs."""
        m, rms, fac, shapes = {}, {}, {}, {}
        for k, v in params.items():
            batch, shape = v.shape[:batch_ndim], tuple(v.shape[batch_ndim:])
            work = shape or (1,)
            zeros = lambda *s: torch.zeros(*batch, *s, dtype=v.dtype, device=v.device)  # noqa: E731
            m[k], rms[k] = zeros(*work, len(MOMENTUM_DECAYS)), zeros(*work, len(RMS_DECAYS))
            dims = factored_dims(work)
            if dims is None:
                fac[k] = (zeros(*work, len(ADAFACTOR_DECAYS)),)
            else:
                d1, d0 = dims
                fac[k] = (zeros(*(n for i, n in enumerate(work) if i != d0), len(ADAFACTOR_DECAYS)),
                          zeros(*(n for i, n in enumerate(work) if i != d1), len(ADAFACTOR_DECAYS)))
            shapes[k] = shape
        return {"step": 0, "m": m, "rms": rms, "fac": fac, "shapes": shapes}

    def features(self, grads, state, params):
        """({name: normalised features (*batch, *S, 28)}, the new state). The 11 time features
        of this step are `time_features(state['step'])`."""
        raw, new_state = self._raw_features(grads, state, params)
        return {k: x * scale for k, (x, scale) in raw.items()}, new_state

    def _raw_features(self, grads, state, params):
        """({name: (raw features (*batch, *S, 28), their normaliser (*batch, 1.., 28))}, new state)."""
        return _raw_features(self.phi, grads, state, params)

    def update(self, grads, state, params):
        return _update(self.phi, grads, state, params, self.hidden_layers, self.exp_mult, self.step_mult)

    def mlp(self, x: torch.Tensor, step: int | torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Features x (R, n, 28) of R runs at step t (or R steps (R,)), normalised by `scale`
        (R, 1, 28) (None: x is normalised) -> (R, n, 2) = (d, m). The per-run normaliser is folded
        into the first layer's weights, and the time features, the same for every coordinate,
        into its bias (one (n, 28)-sized product fewer per tensor)."""
        return _mlp(self.phi, x, _first_bias(self.phi, step, x, x.shape[:1]), scale, self.hidden_layers)

    def detach_state(self, state):
        return {"step": state["step"], "m": {k: v.detach() for k, v in state["m"].items()},
                "rms": {k: v.detach() for k, v in state["rms"].items()},
                "fac": {k: tuple(t.detach() for t in v) for k, v in state["fac"].items()},
                "shapes": state["shapes"]}

    def config(self) -> dict:
        return {"name": self.name, "family": "mlp", "hidden": self.hidden, "hidden_layers": self.hidden_layers,
                "exp_mult": self.exp_mult, "step_mult": self.step_mult, **self.meta}

    @property
    def num_meta_params(self) -> int:
        return sum(v.numel() for v in self.phi.values())


# ---- the functional core (phi explicit: one optimizer's, or a population's) ---------------
# A population (`population_update`) carries a leading run dim Q on every phi tensor: run q
# has phi[k][q] (w0 (Q, 39, H), ..., decay offsets (Q, 3)), and its params and state lead with Q.
def _raw_features(phi, grads, state, params):
    """({name: (raw features (*batch, *S, 28), their normaliser (*batch, 1.., 28))}, new state)."""
    mom_d, rms_d, fac_d = decays(phi)
    raw, new_m, new_rms, new_fac = {}, {}, {}, {}
    for k, shape in state["shapes"].items():
        g, p = grads[k], params[k]
        if not shape:  # a scalar as a length-1 vector
            g, p = g.unsqueeze(-1), p.unsqueeze(-1)
        x, scale, new_m[k], new_rms[k], new_fac[k] = _tensor_features(
            g, p, state["m"][k], state["rms"][k], state["fac"][k], shape or (1,), mom_d, rms_d, fac_d)
        raw[k] = (x, scale)
    return raw, {"step": state["step"] + 1, "m": new_m, "rms": new_rms, "fac": new_fac,
                 "shapes": state["shapes"]}


def _update(phi, grads, state, params, hidden_layers: int, exp_mult: float, step_mult: float):
    """`MLPL2O.update` with phi explicit: (updates {name: (*batch, *S)}, new state)."""
    raw, new_state = _raw_features(phi, grads, state, params)
    updates, bias = {}, None
    for k, (x, scale) in raw.items():
        lead = x.shape[:-1]  # (*batch, *S)
        nd = len(state["shapes"][k]) or 1
        runs = math.prod(lead[:-nd])
        bias = _first_bias(phi, state["step"], x, lead[:-nd]) if bias is None else bias
        out = _mlp(phi, x.reshape(runs, -1, N_NORMALISED), bias,
                   scale.reshape(runs, 1, N_NORMALISED), hidden_layers)  # (runs, n, 2)
        u = -(out[..., 0] * torch.exp(exp_mult * out[..., 1]) * step_mult).reshape(lead)
        updates[k] = u if state["shapes"][k] else u.squeeze(-1)
    return updates, new_state


def _first_bias(phi, step: int | torch.Tensor, like: torch.Tensor, batch: tuple[int, ...]) -> torch.Tensor:
    """The first layer's bias plus its response to the time features: (H,) for one phi at one
    step t; (R, 1, H) for R = prod(batch) runs with their own steps (a tensor broadcastable to
    `batch`) or their own phis (Q = R)."""
    w_time = phi["w0"][..., N_NORMALISED:, :]  # (11, H) or (Q, 11, H)
    t = time_features(step, like.dtype, like.device)  # (11,) or (*B, 11)
    if t.ndim == 1 and phi["w0"].ndim == 2:
        return phi["b0"] + t @ w_time
    t = t.expand(*batch, len(TIMESCALES)).reshape(-1, 1, len(TIMESCALES)) if t.ndim > 1 else t[None]
    return phi["b0"].unsqueeze(-2) + t @ w_time  # (R, 1, H)


def _mlp(phi, x: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor | None, hidden_layers: int) -> torch.Tensor:
    """x (R, n, 28) -> (R, n, 2) through the MLP of phi (shared, or one per run)."""
    w0 = phi["w0"][..., :N_NORMALISED, :]  # (28, H) or (R, 28, H)
    w = w0 if scale is None else scale.transpose(-1, -2) * w0  # (R, 28, H)
    h = torch.baddbmm(bias, x, w.expand(x.shape[0], *w.shape[-2:]))  # (R, n, H)
    for i in range(1, hidden_layers + 1):
        weight, b = phi[f"w{i}"], phi[f"b{i}"]
        if weight.ndim == 2:
            h = torch.nn.functional.linear(torch.relu_(h), weight.t(), b)
        else:  # one layer per run: (R, in, out)
            h = torch.baddbmm(b.unsqueeze(-2), torch.relu_(h), weight)
    return h


def population_update(net: MLPL2O, phis, grads, state, params):
    """`MLPL2O.update` for Q runs, each with its own phi, in one batched computation (the ES
    family's copies, `estimators.Tasks`): phis {name: (Q, *phi shape)}, grads and params
    {name: (Q, *param shape)}, state of Q runs (`init(params, batch_ndim=1)`; its step an int
    or (Q,)). Returns (updates {name: (Q, *param shape)}, new state)."""
    return _update(phis, grads, state, params, net.hidden_layers, net.exp_mult, net.step_mult)


def _per_run(d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Decays d (3,) as they are; a population's (Q, 3) as (Q, 1, .., 1, 3), like `like` (Q, .., 3)."""
    return d if d.ndim == 1 else d.reshape(d.shape[0], *[1] * (like.ndim - 2), d.shape[-1])


def _tensor_features(g, p, m, rms, fac, shape, mom_d, rms_d, fac_d):
    """One tensor of shape S = `shape`: g (*gb, *S), p (*B, *S), accumulators (*B, ...) ->
    (raw features x (*gb|B, *S, 28), normaliser (*gb|B, 1.., 28): x * it are the features,
    m, rms, fac) after this gradient. Axes are counted from the
    end, so any leading dims pass (and broadcast)."""
    nd = len(shape)
    # an EMA b a + (1 - b) x is lerp(x, a, b) = x + b (a - x): one kernel, one new tensor
    g1 = g.unsqueeze(-1)  # (*gb, *S, 1)
    g2 = g1 * g1
    m = torch.lerp(g1, m, _per_run(mom_d, m))  # (.., *S, 3)
    rms = torch.lerp(g2, rms, _per_run(rms_d, rms))  # (.., *S, 1)
    sq = g2 + 1e-30
    dims = factored_dims(shape)
    if dims is None:
        v = torch.lerp(sq, fac[0], _per_run(fac_d, fac[0]))
        fac_g = g1 * _safe_rsqrt(v + 1e-9)
        row = col = v
        fac_m = m * (v + 1e-6) ** -0.5
        fac = (v,)
    else:
        d1, d0 = dims
        a0, a1 = d0 - nd - 1, d1 - nd - 1  # the factored axes, counted from the end of (.., *S, 3)
        v_row = torch.lerp(sq.mean(a0), fac[0], _per_run(fac_d, fac[0]))  # (.., S minus D0, 3)
        v_col = torch.lerp(sq.mean(a1), fac[1], _per_run(fac_d, fac[1]))  # (.., S minus D1, 3)
        reduced_d1 = d1 - 1 if d1 > d0 else d1  # D1's axis in v_row
        row_mean = v_row.mean(reduced_d1 - nd, keepdim=True)
        row_factor = _safe_rsqrt(v_row / (row_mean + 1e-9)).unsqueeze(a0)
        col_factor = _safe_rsqrt(v_col).unsqueeze(a1)
        both = row_factor * col_factor  # (.., *S, 3)
        fac_g, fac_m = g1 * both, m * both
        row, col = v_row.unsqueeze(a0), v_col.unsqueeze(a1)
        fac = (v_row, v_col)
    inv = torch.rsqrt(rms + 1e-6)
    pieces = [g1, p.unsqueeze(-1), m, rms, m * inv, inv, fac_g, row, col,
              torch.rsqrt(row + 1e-8), torch.rsqrt(col + 1e-8), fac_m]
    lead = torch.broadcast_shapes(g.shape, p.shape)  # (*gb|B, *S)
    x = torch.cat([q.expand(*lead, q.shape[-1]) for q in pieces], dim=-1)  # (*gb|B, *S, 28)
    scale = torch.rsqrt(1e-5 + x.square().mean(dim=tuple(range(-nd - 1, -1)), keepdim=True))
    return x, scale, m, rms, fac



# ---- checkpoints ----------------------------------------------------------------
# Valid settings of an MLP L2O (of a checkpoint and of the drop-in). exp_mult and step_mult scale
# outputs of order 1; 0 < step_mult, 0 <= exp_mult.
MLP_RANGES = {"hidden": Range(1, 4096, integer=True), "hidden_layers": Range(1, 16, integer=True),
              "exp_mult": Float32Range(0, 10), "step_mult": Float32Range(0, 10, lo_open=True)}


def check_mlp_settings(net, name: str) -> dict:
    """`net` = {family: 'mlp', hidden, hidden_layers, exp_mult, step_mult}, each in MLP_RANGES."""
    if not isinstance(net, dict) or net.get("family") != "mlp" or set(MLP_RANGES) - set(net):
        raise L2OError(f"checkpoint {name}: 'net' must be {{'family': 'mlp', {', '.join(MLP_RANGES)}}}; "
                       f"got {net!r:.80}")
    for key, valid in MLP_RANGES.items():
        try:
            valid.check(f"net {key}", net[key])
        except L2OError as e:
            raise L2OError(f"checkpoint {name}: {e}") from None
    return net


def check_mlp_phi(phi, hidden: int, hidden_layers: int, name: str,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`phi` must hold exactly the names and shapes of `mlp_phi_shapes(hidden, hidden_layers)`,
    as dense finite floating tensors with |value| <= MAX_ABS_WEIGHT. Returns them as `dtype`."""
    return check_phi_shapes(phi, mlp_phi_shapes(hidden, hidden_layers),
                            f"an MLP L2O with {hidden_layers} hidden layers of {hidden}", name, dtype)


def save_mlp_l2o(l2o: MLPL2O, path: str | os.PathLike, **extra) -> None:
    """Write `l2o` as an l2o.pt that `mlp_l2o_from_checkpoint` (and `learned.l2o_from_checkpoint`)
    load: {'phi': ..., 'net': {'family': 'mlp', ...}} plus `extra` entries, atomically."""
    net = mlp_net(l2o.hidden, l2o.hidden_layers, l2o.exp_mult, l2o.step_mult)
    atomic_torch_save({"phi": {k: v.detach().cpu() for k, v in l2o.phi.items()}, "net": net, **extra}, path)


def mlp_net(hidden: int, hidden_layers: int, exp_mult: float, step_mult: float) -> dict:
    """The 'net' entry of an MLP L2O's checkpoint (what `check_mlp_settings` accepts)."""
    return {"family": "mlp", "hidden": hidden, "hidden_layers": hidden_layers, "exp_mult": exp_mult,
            "step_mult": step_mult}


def mlp_l2o_from_checkpoint(source, device=None) -> MLPL2O:
    """Load an MLP L2O written by `save_mlp_l2o` (a path or its bytes); malformed ones are refused."""
    name, blob = read_torch(source)
    return _mlp_from_blob(blob, name, device)


def _mlp_from_blob(blob, name: str, device=None) -> MLPL2O:
    if not isinstance(blob, dict) or "phi" not in blob or "net" not in blob:
        raise L2OError(f"{name!r} is not an l2o-dynamics checkpoint (no 'phi'/'net' entries)")
    net = check_mlp_settings(blob["net"], repr(name))
    phi = blob["best_phi"] if blob.get("best_phi") is not None else blob["phi"]
    phi = check_mlp_phi(phi, net["hidden"], net["hidden_layers"], repr(name))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return MLPL2O({k: v.to(dev) for k, v in phi.items()}, net["hidden"], net["hidden_layers"],
                  net["exp_mult"], net["step_mult"], meta={"checkpoint": name})


# ---- interop: small_fc_lopt weights as learned_optimization and PyLO publish them ------------
def load_small_fc_lopt(source, *, decays: Mapping | None = None, exp_mult: float = 1e-3,
                       step_mult: float = 1e-3, device=None) -> MLPL2O:
    """An MLP L2O from small_fc_lopt / AdafacMLP weights (a torch.save file, its bytes, a
    .safetensors file as the Hugging Face hub serves PyLO's, or the dict itself) in either
    published layout:

      learned_optimization: w0 (39, H), b0, w1 (H, H), b1, ..., wL (H, 2), bL, (in, out), and the
          decay offsets momentum_decays (3,), rms_decays (1,), adafactor_decays (3,); nested
          dicts are flattened and keys are matched by their last '/'-separated part
          ('nn/~/w0' is w0);
      PyLO (`MetaMLP` state dict): network.input.{weight,bias} (H, 39), network.linear_{i}.{weight,
          bias} (H, H), network.output.{weight,bias} (2, H), (out, in). Its files carry no decays:
          pass `decays` (PyLO's AdafacLO defaults are PYLO_DECAYS).

    `decays` (the three offset vectors) fills in decays the file lacks; with neither, the load
    is refused. exp_mult and step_mult are the output scales (the reference's 1e-3; PyLO's
    AdafacLO uses step_mult 0.01 with its muP weights)."""
    if isinstance(source, Mapping):
        name, blob = "<dict>", source
    elif isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".safetensors"):
        name, blob = os.fspath(source), read_safetensors(source)
    else:
        name, blob = read_torch(source, "small_fc_lopt weights")
    checkpoint, name = name, repr(name)
    if not isinstance(blob, Mapping):
        raise L2OError(f"{name} is not a dict of small_fc_lopt weights (got {type(blob).__name__})")
    flat = _flatten(blob)
    if any(k.endswith("network.input.weight") for k in flat):
        weights = _from_pylo(flat, name)
    else:
        weights = {k.rsplit("/", 1)[-1]: v for k, v in flat.items()}
    for k in DECAY_KEYS:
        if k not in weights and decays is not None and k in decays:
            weights[k] = torch.as_tensor(decays[k], dtype=torch.float32)
    missing = [k for k in DECAY_KEYS if k not in weights]
    if missing:
        raise L2OError(f"{name} has no decay offsets ({', '.join(missing)}); pass decays= (PyLO's AdafacLO "
                       "defaults: mlp_lopt.PYLO_DECAYS; the reference's initial decays: zeros)")
    w0 = weights.get("w0")
    layers = sum(1 for k in weights if k[:1] == "w" and k[1:].isdigit()) - 1
    if not isinstance(w0, torch.Tensor) or w0.ndim != 2 or w0.shape[0] != len(FEATURES) or layers < 1:
        raise L2OError(f"{name}: expected w0 of shape ({len(FEATURES)}, H) and at least w0, w1 (the "
                       f"learned_optimization layout) or network.input/output (PyLO's); got keys "
                       f"{sorted(weights)[:12]}")
    MLP_RANGES["exp_mult"].check("exp_mult", exp_mult)
    MLP_RANGES["step_mult"].check("step_mult", step_mult)
    phi = check_mlp_phi(weights, int(w0.shape[1]), layers, name)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return MLPL2O({k: v.to(dev) for k, v in phi.items()}, int(w0.shape[1]), layers, exp_mult, step_mult,
                  name="small_fc_lopt", meta={"checkpoint": checkpoint})


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The floating tensors of a .safetensors file (the format: an 8-byte little-endian header
    length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__':
    ...}, then the little-endian data). Read here so that no extra package is needed; anything
    malformed is an L2OError."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise L2OError(f"safetensors file {name!r} does not exist or is not a file")
    with open(name, "rb") as f:
        data = f.read()
    if sys.byteorder != "little":
        raise L2OError("reading .safetensors here needs a little-endian machine; convert the file with "
                       "safetensors.torch.load_file and pass the dict")
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 + n:
            raise ValueError
        header = json.loads(data[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise L2OError(f"{name!r} is not a safetensors file (bad header)") from None
    buf, out = memoryview(data)[8 + n:], {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise L2OError(f"{name!r}: tensor {key!r} is not a floating tensor with shape and offsets "
                           f"({', '.join(SAFETENSORS_DTYPES)}); refused") from None
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(buf) or end - begin != size or min(shape, default=1) < 0:
            raise L2OError(f"{name!r}: tensor {key!r} has offsets {begin}..{end} that do not hold its "
                           f"shape {shape} within the file's {len(buf)} data bytes; refused")
        flat = torch.frombuffer(bytearray(buf[begin:end]), dtype=dtype) if size else torch.empty(0, dtype=dtype)
        out[key] = flat.reshape(shape)
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def _from_pylo(flat: dict, name: str) -> dict:
    """PyLO's MetaMLP names and (out, in) weights -> ours (w_i (in, out), b_i)."""
    prefix = next(k for k in flat if k.endswith("network.input.weight"))[:-len("input.weight")]
    layers = ["input"] + [f"linear_{i}" for i in range(sum(1 for k in flat if k.startswith(prefix + "linear_")
                                                                  and k.endswith(".weight")))] + ["output"]
    out = {}
    for i, layer in enumerate(layers):
        w, b = flat.get(f"{prefix}{layer}.weight"), flat.get(f"{prefix}{layer}.bias")
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor) or w.ndim != 2:
            raise L2OError(f"{name}: PyLO MetaMLP layer {layer!r} lacks a 2-D weight or a bias; refused")
        out[f"w{i}"], out[f"b{i}"] = w.t(), b
    known = {f"{prefix}{layer}.{p}" for layer in layers for p in ("weight", "bias")}
    out.update({k.rsplit("/", 1)[-1]: v for k, v in flat.items() if k not in known})
    return out


# ---- torch.optim drop-in ----------------------------------------------------------
class MLPL2OOptimizer(torch.optim.Optimizer):
    """An MLP L2O as a `torch.optim.Optimizer` for any `nn.Module`.

        opt = MLPL2OOptimizer(model.parameters(), "runs/mlp/l2o.pt")   # or an MLPL2O
        loss.backward(); opt.step()

    The parameters of a group with gradients go through one batched MLP call per step (one per
    distinct step count, when some parameters missed steps); the accumulators and the step count
    live in `self.state[p]` (so `state_dict` / `load_state_dict` resume a run). A group's
    `step_mult` (default the L2O's) scales its updates."""

    def __init__(self, params, checkpoint: str | os.PathLike | MLPL2O, step_mult: float | None = None):
        l2o = checkpoint if isinstance(checkpoint, MLPL2O) else mlp_l2o_from_checkpoint(checkpoint)
        if step_mult is not None:
            MLP_RANGES["step_mult"].check("step_mult", step_mult)
        self.l2o = l2o
        super().__init__(params, {"step_mult": l2o.step_mult if step_mult is None else step_mult})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            try:
                MLP_RANGES["step_mult"].check("step_mult", group["step_mult"])
            except L2OError as e:
                raise L2OError(f"param_groups[{i}]: {e}") from None
            by_step: dict[int, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.state[p].update(self._fresh(p))
                by_step.setdefault(int(self.state[p]["step"]), []).append(p)
            for t, ps in by_step.items():
                self._step_together(ps, t, group["step_mult"])
        return loss

    def _fresh(self, p: torch.Tensor) -> dict:
        st = self.l2o.init({"p": p})
        return {"step": torch.tensor(0), "m": st["m"]["p"], "rms": st["rms"]["p"],
                **{f"fac{j}": v for j, v in enumerate(st["fac"]["p"])}}

    def _step_together(self, ps: list, t: int, step_mult: float) -> None:
        p0 = ps[0]
        l2o = MLPL2O({k: v.to(p0.device, p0.dtype) for k, v in self.l2o.phi.items()}, self.l2o.hidden,
                     self.l2o.hidden_layers, self.l2o.exp_mult, step_mult)
        names = [str(j) for j in range(len(ps))]
        state = {"step": t, "shapes": {n: tuple(p.shape) for n, p in zip(names, ps)},
                 "m": {n: self.state[p]["m"] for n, p in zip(names, ps)},
                 "rms": {n: self.state[p]["rms"] for n, p in zip(names, ps)},
                 "fac": {n: tuple(self.state[p][f"fac{j}"] for j in range(2) if f"fac{j}" in self.state[p])
                         for n, p in zip(names, ps)}}
        updates, new = l2o.update({n: p.grad for n, p in zip(names, ps)}, state, dict(zip(names, ps)))
        for n, p in zip(names, ps):
            p.add_(updates[n])
            st = self.state[p]
            st["step"], st["m"], st["rms"] = torch.tensor(t + 1), new["m"][n], new["rms"][n]
            for j, v in enumerate(new["fac"][n]):
                st[f"fac{j}"] = v
