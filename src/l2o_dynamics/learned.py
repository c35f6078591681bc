"""The coordinate-wise LSTM learned optimizer of Andrychowicz et al. (2016).

One small network M_phi is shared by every coordinate of the optimizee:

    x_t    = preprocess(g_t)                      (N, 2), p = 10
    h, c   = LSTM_phi(x_t; h, c)                  two layers of 20 units
    dtheta = eta * Linear_phi(h_top)              eta = 0.1, raw output

The meta-parameters phi are an explicit dict of tensors (PyTorch LSTMCell /
Linear names and init). All coordinates of all tensors (and of all runs in a
stack) go through ONE batched network call per step. The LSTM cell is a custom
autograd function with a hand-written backward whose element-wise parts are
optionally fused by torch.compile (`set_fusion`); an eager path is always there.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .utils import L2OError

Params = dict[str, torch.Tensor]


# ---- gradient preprocessing ------------------------------------------------------
def preprocess(g: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """(N,) -> (N, 2): (log|g|/p, sign g) if |g| >= e^-p, else (-1, e^p g)."""
    g = g.detach()
    big = g.abs() >= math.exp(-p)
    first = torch.where(big, torch.log(g.abs().clamp_min(math.exp(-p))) / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


# ---- the LSTM cell: element-wise kernels --------------------------------------------
def _cell_forward_pointwise(gates: torch.Tensor, c: torch.Tensor):
    """gates (N, 4H) pre-activations in PyTorch order (i, f, g, o); c (N, H).
    Returns activations (N, 4H), c' (N, H), tanh(c') (N, H), h' (N, H)."""
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    tc = torch.tanh(c_new)
    return torch.cat([i, f, g, o], dim=1), c_new, tc, o * tc


def _cell_backward_pointwise(dh: torch.Tensor, dc: torch.Tensor, acts: torch.Tensor,
                             c: torch.Tensor, tc: torch.Tensor):
    """Gradients of the cell's element-wise part: (dgates (N, 4H), dc_prev (N, H))."""
    i, f, g, o = acts.chunk(4, dim=1)
    dc = dc + dh * o * (1 - tc * tc)
    d_i = dc * g * i * (1 - i)
    d_f = dc * c * f * (1 - f)
    d_g = dc * i * (1 - g * g)
    d_o = dh * tc * o * (1 - o)
    return torch.cat([d_i, d_f, d_g, d_o], dim=1), dc * f


_EAGER = (_cell_forward_pointwise, _cell_backward_pointwise)


class _Kernels:
    """The element-wise kernels in use: fused by torch.compile, or eager.

    mode 'auto' compiles on first use and falls back to eager (with a warning) if
    compilation fails on this platform; 'compile' raises instead; 'eager' never
    compiles. Set by `set_fusion` or the environment variable L2O_DYNAMICS_FUSION."""

    def __init__(self) -> None:
        self.mode = os.environ.get("L2O_DYNAMICS_FUSION", "auto")
        self._compiled: dict[str, tuple[Callable, Callable]] = {}
        self._failed: set[str] = set()

    def call(self, which: int, *args):
        device = args[0].device.type
        if self.mode == "eager" or device in self._failed:
            return _EAGER[which](*args)
        if device not in self._compiled:
            self._compiled[device] = tuple(torch.compile(f, dynamic=True) for f in _EAGER)
        try:
            return self._compiled[device][which](*args)
        except Exception as e:
            if self.mode == "compile":
                raise
            warnings.warn(f"torch.compile of the LSTM cell failed on {device} ({type(e).__name__}: "
                          f"{str(e)[:200]}); using the eager cell", RuntimeWarning, stacklevel=2)
            self._failed.add(device)
            return _EAGER[which](*args)

    def active(self, device: str = "cpu") -> str:
        return "eager" if self.mode == "eager" or device in self._failed else "compile"


KERNELS = _Kernels()


def set_fusion(mode: str) -> None:
    """'auto' (torch.compile, eager fallback), 'compile' (fail if unavailable) or 'eager'."""
    if mode not in ("auto", "compile", "eager"):
        raise L2OError(f"unknown fusion mode {mode!r}; valid: auto, compile, eager")
    KERNELS.mode = mode


class LSTMCellFunction(torch.autograd.Function):
    """h', c' = LSTMCell(x, (h, c)) with gates = x W_ih^T + h W_hh^T + b (PyTorch order).

    Shapes: x (N, I), h and c (N, H), w_ih (4H, I), w_hh (4H, H), b (4H,)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b):
        gates = torch.addmm(b, x, w_ih.t()).addmm_(h, w_hh.t())
        acts, c_new, tc, h_new = KERNELS.call(0, gates, c)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, acts, tc)
        return h_new, c_new

    @staticmethod
    def backward(ctx, dh, dc):
        x, h, c, w_ih, w_hh, acts, tc = ctx.saved_tensors
        dh = torch.zeros_like(h) if dh is None else dh
        dc = torch.zeros_like(c) if dc is None else dc
        dgates, dc_prev = KERNELS.call(1, dh, dc, acts, c, tc)
        need = ctx.needs_input_grad
        dx = dgates @ w_ih if need[0] else None
        dh_prev = dgates @ w_hh if need[1] else None
        dw_ih = dgates.t() @ x if need[3] else None
        dw_hh = dgates.t() @ h if need[4] else None
        db = dgates.sum(0) if need[5] else None
        return dx, dh_prev, dc_prev if need[2] else None, dw_ih, dw_hh, db


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One fused LSTM cell step; plain forward when no gradient is needed."""
    b = b_ih + b_hh
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, c, w_ih, w_hh, b)):
        return LSTMCellFunction.apply(x, h, c, w_ih, w_hh, b)
    gates = torch.addmm(b, x, w_ih.t()).addmm_(h, w_hh.t())
    _, c_new, _, h_new = KERNELS.call(0, gates, c)
    return h_new, c_new


# ---- meta-parameters ---------------------------------------------------------------
def init_phi(generator: torch.Generator | None = None, hidden: int = 20, layers: int = 2,
             dtype: torch.dtype = torch.float32, device=None) -> Params:
    """PyTorch defaults: LSTMCell and Linear(H -> 1) weights and biases ~ U(+-1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden)

    def u(*shape):
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    phi: Params = {}
    for layer in range(layers):
        fan_in = 2 if layer == 0 else hidden
        phi[f"lstm{layer}.weight_ih"] = u(4 * hidden, fan_in)
        phi[f"lstm{layer}.weight_hh"] = u(4 * hidden, hidden)
        phi[f"lstm{layer}.bias_ih"] = u(4 * hidden)
        phi[f"lstm{layer}.bias_hh"] = u(4 * hidden)
    phi["out.weight"] = u(1, hidden)
    phi["out.bias"] = u(1)
    return {k: v.to(dtype=dtype, device=device) for k, v in phi.items()}


# ---- the optimizer --------------------------------------------------------------
@dataclass(frozen=True)
class L2O:
    """Coordinate-wise LSTM optimizer with the functional optimizer interface.

    state = {"h": {name: (L, *shape, H)}, "c": {...}}: per-coordinate hidden and
    cell states of every layer, zero at the start of a run. `update` accepts
    gradients with extra leading dims (a stack of gradients at one frozen state):
    the state broadcasts over them.
    """

    phi: Mapping[str, torch.Tensor]
    hidden: int = 20
    layers: int = 2
    p: float = 10.0
    eta: float = 0.1
    name: str = "l2o"
    meta: dict = field(default_factory=dict, compare=False)

    def init(self, params):
        zeros = {k: torch.zeros(self.layers, *v.shape, self.hidden, dtype=v.dtype, device=v.device)
                 for k, v in params.items()}
        return {"h": zeros, "c": {k: z.clone() for k, z in zeros.items()}}

    def update(self, grads, state, params=None):
        names = list(grads)
        L, H = self.layers, self.hidden
        g = torch.cat([grads[k].reshape(-1) for k in names])

        def gather(states):
            parts = []
            for k in names:
                s = states[k]
                extra = grads[k].ndim + 2 - s.ndim
                if extra:
                    s = s.reshape(L, *([1] * extra), *s.shape[1:]).expand(L, *grads[k].shape, H)
                parts.append(s.reshape(L, -1, H))
            return torch.cat(parts, dim=1)

        h_all, c_all = gather(state["h"]), gather(state["c"])
        x = preprocess(g, self.p).to(g.dtype)
        new_h, new_c = [], []
        for layer in range(L):
            pre = f"lstm{layer}."
            h, c = lstm_cell(x, h_all[layer], c_all[layer], self.phi[pre + "weight_ih"],
                             self.phi[pre + "weight_hh"], self.phi[pre + "bias_ih"],
                             self.phi[pre + "bias_hh"])
            new_h.append(h)
            new_c.append(c)
            x = h
        out = torch.addmm(self.phi["out.bias"], x, self.phi["out.weight"].t()).squeeze(-1)
        step = self.eta * out
        h_stack, c_stack = torch.stack(new_h), torch.stack(new_c)
        updates, hs, cs = {}, {}, {}
        i = 0
        for k in names:
            n = grads[k].numel()
            updates[k] = step[i:i + n].reshape(grads[k].shape)
            hs[k] = h_stack[:, i:i + n].reshape(L, *grads[k].shape, H)
            cs[k] = c_stack[:, i:i + n].reshape(L, *grads[k].shape, H)
            i += n
        return updates, {"h": hs, "c": cs}

    def detach_state(self, state):
        return {"h": {k: v.detach() for k, v in state["h"].items()},
                "c": {k: v.detach() for k, v in state["c"].items()}}

    def config(self) -> dict:
        return {"name": self.name, "hidden": self.hidden, "layers": self.layers, "p": self.p,
                "eta": self.eta, **self.meta}

    @property
    def num_meta_params(self) -> int:
        return sum(v.numel() for v in self.phi.values())


def l2o_from_checkpoint(path, device=None) -> L2O:
    """Load the selected (best) phi of a meta-training checkpoint or exported `l2o.pt`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise L2OError(f"checkpoint {path!r} does not exist; pass the l2o.pt written by meta-train")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise L2OError(f"cannot read checkpoint {path!r}: {type(e).__name__}; "
                       "expected an l2o.pt or checkpoint.pt written by meta-train") from None
    if not isinstance(blob, dict) or "phi" not in blob or "net" not in blob:
        raise L2OError(f"{path!r} is not an l2o-dynamics checkpoint (no 'phi'/'net' entries)")
    phi = blob.get("best_phi") or blob["phi"]
    net = blob["net"]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return L2O({k: v.to(dev) for k, v in phi.items()}, hidden=net["hidden"], layers=net["layers"],
               p=net["p"], eta=net["eta"], meta={"checkpoint": path})


class L2OOptimizer(torch.optim.Optimizer):
    """A trained L2O as a `torch.optim.Optimizer` for any `nn.Module`.

        opt = L2OOptimizer(model.parameters(), "runs/l2o/l2o.pt")
        loss.backward(); opt.step()

    Every parameter with a gradient goes through one batched network call per step;
    per-coordinate LSTM states live in `self.state[p]` and start at zero."""

    def __init__(self, params, checkpoint: str | os.PathLike | L2O, eta: float | None = None):
        l2o = checkpoint if isinstance(checkpoint, L2O) else l2o_from_checkpoint(checkpoint)
        super().__init__(params, {"eta": l2o.eta if eta is None else eta})
        self.l2o = l2o

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            l2o = L2O({k: v.to(ps[0].device, ps[0].dtype) for k, v in self.l2o.phi.items()},
                      self.l2o.hidden, self.l2o.layers, self.l2o.p, group["eta"])
            names = [str(i) for i in range(len(ps))]
            grads = dict(zip(names, (p.grad for p in ps)))
            state = {"h": {}, "c": {}}
            for n, p in zip(names, ps):
                st = self.state[p]
                if "h" not in st:
                    st["h"] = torch.zeros(l2o.layers, *p.shape, l2o.hidden, dtype=p.dtype, device=p.device)
                    st["c"] = torch.zeros_like(st["h"])
                state["h"][n], state["c"][n] = st["h"], st["c"]
            updates, new = l2o.update(grads, state)
            for n, p in zip(names, ps):
                p.add_(updates[n])
                self.state[p]["h"], self.state[p]["c"] = new["h"][n], new["c"][n]
        return loss
