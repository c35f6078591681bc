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

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

import torch

from .errors import L2OError, Range
from .optimizers import Float32Range

if TYPE_CHECKING:
    from .mlp_lopt import MLPL2O

Params = dict[str, torch.Tensor]


# ---- gradient preprocessing ------------------------------------------------------
def preprocess(g: torch.Tensor, p: float = 10.0, log_eps: float = 0.0) -> torch.Tensor:
    """(N,) -> (N, 2): (log(|g| + log_eps)/p, sign g) if |g| >= e^-p, else (-1, e^p g).

    log_eps is 0 in the paper's formula; the study's authors add 1e-8 inside the log
    (learning-to-optimize l2o/optimizer.py:50, `--recipe authors`)."""
    g = g.detach()
    big = g.abs() >= math.exp(-p)
    mag = g.abs().clamp_min(math.exp(-p))
    if log_eps:
        mag = mag + log_eps
    first = torch.where(big, torch.log(mag) / p, torch.full_like(g, -1.0))
    second = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([first, second], dim=-1)


# ---- the LSTM cell: element-wise kernels --------------------------------------------
# The g-gate rows of the weights arrive pre-scaled by 2 (`_gate_scale`), so that all
# four gates take one sigmoid: tanh(z) = 2 sigmoid(2z) - 1 (one exp instead of tanh).
def _cell_forward_pointwise(gates: torch.Tensor, c: torch.Tensor):
    """gates (N, 4H) pre-activations (i, f, 2g, o); c (N, H).
    Returns activations (i, f, g, o) (N, 4H), c' (N, H), tanh(c') (N, H), h' (N, H)."""
    s = torch.sigmoid(gates)
    i, f, sg, o = s.chunk(4, dim=1)
    g = 2 * sg - 1
    c_new = f * c + i * g
    tc = 2 * torch.sigmoid(2 * c_new) - 1
    return torch.cat([i, f, g, o], dim=1), c_new, tc, o * tc


def _cell_backward_pointwise(dh: torch.Tensor, dc: torch.Tensor, acts: torch.Tensor,
                             c: torch.Tensor, tc: torch.Tensor):
    """Gradients of the element-wise part w.r.t. (i, f, 2g, o) pre-activations and c."""
    i, f, g, o = acts.chunk(4, dim=1)
    dc = dc + dh * o * (1 - tc * tc)
    d_i = dc * g * i * (1 - i)
    d_f = dc * c * f * (1 - f)
    d_g = dc * i * (1 - g * g) * 0.5
    d_o = dh * tc * o * (1 - o)
    return torch.cat([d_i, d_f, d_g, d_o], dim=1), dc * f


def _cell_inference_pointwise(gates: torch.Tensor, c: torch.Tensor):
    """The forward without what the backward needs: (c' (N, H), h' (N, H))."""
    s = torch.sigmoid(gates)
    i, f, sg, o = s.chunk(4, dim=1)
    c_new = f * c + i * (2 * sg - 1)
    return c_new, o * (2 * torch.sigmoid(2 * c_new) - 1)


def _gate_scale(hidden: int, like: torch.Tensor) -> torch.Tensor:
    scale = torch.ones(4 * hidden, dtype=like.dtype, device=like.device)
    scale[2 * hidden:3 * hidden] = 2
    return scale


_EAGER = (_cell_forward_pointwise, _cell_backward_pointwise, _cell_inference_pointwise)


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
            self._compiled[device] = tuple(torch.compile(f) for f in _EAGER)
        try:
            return self._compiled[device][which](*args)
        except Exception as e:
            if self.mode == "compile":
                raise
            warnings.warn(f"torch.compile of the LSTM cell failed on {device} ({type(e).__name__}: "
                          f"{str(e)[:200]}); using the eager cell", RuntimeWarning, stacklevel=2)
            self._failed.add(device)
            return _EAGER[which](*args)


KERNELS = _Kernels()


def fusion_in_use(device: str | torch.device = "cpu") -> str:
    """'compile' or 'eager': which LSTM cell kernels run on `device` now ('auto' compiles
    unless compilation already failed there). The two differ in float rounding, so a
    meta-training resumes bit-identically only under the same one."""
    kind = torch.device(device).type
    return "eager" if KERNELS.mode == "eager" or kind in KERNELS._failed else "compile"


def adopt_fusion(recorded: str | None, device: str | torch.device = "cpu") -> None:
    """Resume under the LSTM cell a checkpoint was written with (`recorded`, from
    `fusion_in_use`; None in checkpoints older than the record): under mode 'auto' an
    'eager' record switches to eager (a resumed run then matches the uninterrupted one);
    an explicit mode that differs from the record is refused."""
    if recorded is None or recorded == fusion_in_use(device):
        return
    if KERNELS.mode == "auto":
        if recorded == "eager":
            KERNELS.mode = "eager"
        return  # recorded 'compile' under auto: compiles, or warns that it fell back to eager
    raise L2OError(f"the checkpoint was written with the {recorded} LSTM cell and this run would use the "
                   f"{fusion_in_use(device)} one (their float rounding differs, so the resumed run would "
                   f"match neither); resume with fusion {recorded!r} (CLI: --fusion {recorded})")


def set_fusion(mode: str) -> None:
    """'auto' (torch.compile, eager fallback), 'compile' (fail if unavailable) or 'eager'."""
    if mode not in ("auto", "compile", "eager"):
        raise L2OError(f"unknown fusion mode {mode!r}; valid: auto, compile, eager")
    KERNELS.mode = mode


class LSTMCellFunction(torch.autograd.Function):
    """h', c' = LSTMCell(x, (h, c)): gates = [x, h] W^T + b with W = [W_ih, W_hh]
    (PyTorch gate order i, f, g, o). One matmul forward, two backward.

    Shapes: x (N, I), h and c (N, H), w (4H, I + H), b (4H,)."""

    @staticmethod
    def forward(ctx, x, h, c, w, b):
        xh = torch.cat([x, h], dim=1)
        acts, c_new, tc, h_new = KERNELS.call(0, torch.addmm(b, xh, w.t()), c)
        ctx.save_for_backward(xh, c, w, acts, tc)
        ctx.split = x.shape[1]
        return h_new, c_new

    @staticmethod
    def backward(ctx, dh, dc):
        xh, c, w, acts, tc = ctx.saved_tensors
        dh = torch.zeros_like(c) if dh is None else dh
        dc = torch.zeros_like(c) if dc is None else dc
        dgates, dc_prev = KERNELS.call(1, dh, dc, acts, c, tc)
        need = ctx.needs_input_grad
        dxh = dgates @ w if need[0] or need[1] else None
        dw = dgates.t() @ xh if need[3] else None
        db = dgates.sum(0) if need[4] else None
        i = ctx.split
        return (dxh[:, :i] if need[0] else None, dxh[:, i:] if need[1] else None,
                dc_prev if need[2] else None, dw, db)


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One fused LSTM cell step; plain forward when no gradient is needed."""
    scale = _gate_scale(w_hh.shape[1], w_hh)
    w, b = torch.cat([w_ih, w_hh], dim=1) * scale[:, None], (b_ih + b_hh) * scale
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, h, c, w, b)):
        return LSTMCellFunction.apply(x, h, c, w, b)
    gates = torch.addmm(b, torch.cat([x, h], dim=1), w.t())
    c_new, h_new = KERNELS.call(2, gates, c)
    return h_new, c_new


# ---- meta-parameters ---------------------------------------------------------------
def phi_shapes(hidden: int, layers: int) -> dict[str, tuple[int, ...]]:
    """The meta-parameter names and shapes of a network (as `init_phi` makes them)."""
    shapes = {}
    for layer in range(layers):
        fan_in = 2 if layer == 0 else hidden
        shapes[f"lstm{layer}.weight_ih"] = (4 * hidden, fan_in)
        shapes[f"lstm{layer}.weight_hh"] = (4 * hidden, hidden)
        shapes[f"lstm{layer}.bias_ih"] = (4 * hidden,)
        shapes[f"lstm{layer}.bias_hh"] = (4 * hidden,)
    shapes["out.weight"] = (1, hidden)
    shapes["out.bias"] = (1,)
    return shapes


def init_phi(generator: torch.Generator | None = None, hidden: int = 20, layers: int = 2,
             dtype: torch.dtype = torch.float32, device=None) -> Params:
    """PyTorch defaults: LSTMCell and Linear(H -> 1) weights and biases ~ U(+-1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden)

    def u(*shape):
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    phi: Params = {k: u(*shape) for k, shape in phi_shapes(hidden, layers).items()}  # drawn in this order
    return {k: v.to(dtype=dtype, device=device) for k, v in phi.items()}


# ---- the optimizer --------------------------------------------------------------
@dataclass(frozen=True)
class L2O:
    """Coordinate-wise LSTM optimizer with the functional optimizer interface.

    state = {"h": (h_0, .., h_{L-1}), "c": (...), "shapes": {name: shape}} with
    h_l, c_l of shape (*B, P, H): the per-coordinate states of layer l for every
    run of a stack of B runs (P coordinates each, in `shapes` order), zero at the
    start of a run. Leading dims index runs, as for every other optimizer state
    (`optimizers.tree_index`). `update` accepts gradients with extra leading dims
    (many gradients at one frozen state): the state broadcasts over them.
    """

    phi: Mapping[str, torch.Tensor]
    hidden: int = 20
    layers: int = 2
    p: float = 10.0
    eta: float = 0.1
    name: str = "l2o"
    meta: dict = field(default_factory=dict, compare=False)
    log_eps: float = 0.0  # added inside the log of `preprocess` (the authors' 1e-8)

    def init(self, params, batch_ndim: int = 0):
        """Zero states for params whose first `batch_ndim` dims index independent runs."""
        first = next(iter(params.values()))
        batch = first.shape[:batch_ndim]
        shapes = {k: tuple(v.shape[batch_ndim:]) for k, v in params.items()}
        P = sum(math.prod(s) for s in shapes.values())
        zeros = lambda: tuple(torch.zeros(*batch, P, self.hidden, dtype=first.dtype, device=first.device)  # noqa: E731
                              for _ in range(self.layers))
        return {"h": zeros(), "c": zeros(), "shapes": shapes}

    def update(self, grads, state, params=None):
        shapes = state["shapes"]
        names = list(shapes)
        first = grads[names[0]]
        batch = first.shape[:first.ndim - len(shapes[names[0]])]
        g = torch.cat([grads[k].reshape(*batch, -1) for k in names], dim=-1)  # (*batch, P)
        P = g.shape[-1]

        def rows(t):  # (*state batch, P, H) -> (N, H), broadcast over the gradients' batch
            return t.expand(*batch, P, self.hidden).reshape(-1, self.hidden)

        x = preprocess(g.reshape(-1), self.p, self.log_eps).to(g.dtype)
        new_h, new_c = [], []
        for layer in range(self.layers):
            pre = f"lstm{layer}."
            h, c = lstm_cell(x, rows(state["h"][layer]), rows(state["c"][layer]),
                             self.phi[pre + "weight_ih"], self.phi[pre + "weight_hh"],
                             self.phi[pre + "bias_ih"], self.phi[pre + "bias_hh"])
            new_h.append(h.reshape(*batch, P, self.hidden))
            new_c.append(c.reshape(*batch, P, self.hidden))
            x = h
        out = torch.addmm(self.phi["out.bias"], x, self.phi["out.weight"].t())
        step = (self.eta * out).reshape(*batch, P)
        updates, i = {}, 0
        for k in names:
            n = math.prod(shapes[k])
            updates[k] = step[..., i:i + n].reshape(*batch, *shapes[k])
            i += n
        return updates, {"h": tuple(new_h), "c": tuple(new_c), "shapes": shapes}

    def detach_state(self, state):
        return {"h": tuple(t.detach() for t in state["h"]), "c": tuple(t.detach() for t in state["c"]),
                "shapes": state["shapes"]}

    def config(self) -> dict:
        return {"name": self.name, "hidden": self.hidden, "layers": self.layers, "p": self.p,
                "eta": self.eta, "log_eps": self.log_eps, **self.meta}

    @property
    def num_meta_params(self) -> int:
        return sum(v.numel() for v in self.phi.values())


PRETRAINED_DIR = os.path.join(os.path.dirname(__file__), "pretrained")


def pretrained(name: str = "leaky_relu") -> str:
    """Path of an L2O shipped with the package: 'OPTIMIZEE' or 'OPTIMIZEE/beta=B' (the one
    meta-trained on OPTIMIZEE with symmetry penalty weight B by the default recipe;
    'OPTIMIZEE' is beta=0), 'RECIPE/OPTIMIZEE[/beta=B]' (the same, meta-trained by another
    recipe of `meta.RECIPES`: 'authors/leaky_relu', 'authors/bn_relu/beta=0.5'), or
    'base/leaky_relu' (the L2O shipped before the default recipe, kept for comparison).
    How each was made: pretrained/README.md (and pretrained/RECIPE/README.md).

    A name resolves only to a file of the shipped set (`available_pretrained`): the path
    comes from the package's listing, never from the name, and B must equal a shipped
    beta exactly (0.5 and 0.50 name the same file; 0.5000001 names none)."""
    shipped = _shipped_pretrained()
    if name in shipped:
        return shipped[name]
    parts = name.split("/")
    recipe_dirs = {key.split("/")[0] for key in shipped if key.count("/") == 2}  # pretrained/RECIPE/OPTIMIZEE/
    recipe = parts.pop(0) if len(parts) > 1 and parts[0] in recipe_dirs else None
    if parts[0] == "base":
        raise L2OError(f"no pretrained L2O {name!r}; available: {', '.join(shipped) or 'none'}")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].startswith("beta=")):
        raise L2OError(f"no pretrained L2O {name!r} (expected OPTIMIZEE/beta=B or OPTIMIZEE, optionally "
                       f"after RECIPE/); "
                       f"available: {', '.join(shipped) or 'none'}")
    try:
        beta = float(parts[1][5:]) if len(parts) == 2 else 0.0
    except ValueError:
        raise L2OError(f"pretrained name {name!r}: beta must be a number; "
                       f"available: {', '.join(shipped) or 'none'}") from None
    prefix = f"{recipe}/{parts[0]}" if recipe else parts[0]
    key = next((k for k in shipped if k.rpartition("/")[0] == prefix and _shipped_beta(k) == beta), None)
    if key is None:
        raise L2OError(f"no pretrained L2O {name!r}; available: {', '.join(shipped) or 'none'}")
    return shipped[key]


def _shipped_beta(key: str) -> float | None:
    """The beta of a shipped name '[RECIPE/]OPTIMIZEE/beta=B' (None for other names)."""
    tail = key.rpartition("/")[2]
    try:
        return float(tail[5:]) if tail.startswith("beta=") else None
    except ValueError:
        return None


def _shipped_pretrained() -> dict[str, str]:
    """{'[RECIPE/]OPTIMIZEE/beta=B': path} of every regular .pt file one directory below
    PRETRAINED_DIR, or two below inside a recipe's directory."""
    out = {}
    if not os.path.isdir(PRETRAINED_DIR):
        return out
    for sub in sorted(os.listdir(PRETRAINED_DIR)):
        d = os.path.join(PRETRAINED_DIR, sub)
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        for f in sorted(os.listdir(d)):
            path = os.path.join(d, f)
            if f.endswith(".pt") and os.path.isfile(path) and not os.path.islink(path):
                out[f"{sub}/{f[:-3]}"] = path
            elif os.path.isdir(path) and not os.path.islink(path):
                for g in sorted(os.listdir(path)):
                    q = os.path.join(path, g)
                    if g.endswith(".pt") and os.path.isfile(q) and not os.path.islink(q):
                        out[f"{sub}/{f}/{g[:-3]}"] = q
    return out


def available_pretrained() -> list[str]:
    """Names `pretrained` accepts, e.g. ['authors/leaky_relu/beta=0', ..., 'bn_relu/beta=0', ...,
    'leaky_relu/beta=1', 'sigmoid/beta=0']."""
    return list(_shipped_pretrained())


# Valid network settings (of a checkpoint, and of meta-training: `meta.RANGES`). p: e^p
# must stay finite in float32 (p < 88); eta scales an output of order 1.
NET_RANGES = {"hidden": Range(1, 4096, integer=True), "layers": Range(1, 16, integer=True),
              "p": Float32Range(0, 50, lo_open=True), "eta": Float32Range(0, 10, lo_open=True)}
NET_OPTIONAL = {"log_eps": Float32Range(0, 1)}  # absent in checkpoints written before it existed: 0
MAX_ABS_WEIGHT = 1e4  # trained weights are O(1); beyond this the LSTM saturates into garbage


def check_net(net, name: str) -> dict:
    """`net` = {hidden, layers, p, eta} of a checkpoint, each in NET_RANGES."""
    if not isinstance(net, dict) or set(NET_RANGES) - set(net):
        raise L2OError(f"checkpoint {name}: 'net' must hold {', '.join(NET_RANGES)}; got {net!r:.80}")
    present = {**NET_RANGES, **{k: v for k, v in NET_OPTIONAL.items() if k in net}}
    for key, valid in present.items():
        try:
            valid.check(f"net {key}", net[key])
        except L2OError as e:
            raise L2OError(f"checkpoint {name}: {e}") from None
    return net


PHI_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # converted on load


def check_phi(phi, hidden: int, layers: int, name: str,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`phi` must be a dict of finite floating tensors (float16, bfloat16, float32 or
    float64, dense, on a real device) with exactly the names and shapes of a (hidden,
    layers) network, every |weight| <= MAX_ABS_WEIGHT. Returns it as dense tensors of
    `dtype` on their device (half precision widens exactly; float64 rounds to float32).
    Sparse, quantized, complex and meta-device tensors are refused."""
    return check_phi_shapes(phi, phi_shapes(hidden, layers), f"a {layers}-layer network of hidden size {hidden}",
                            name, dtype)


def check_phi_shapes(phi, expected: Mapping[str, tuple], network: str, name: str,
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`check_phi` for any family: `expected` {name: shape}, `network` says what they describe."""
    if not isinstance(phi, Mapping) or not all(isinstance(v, torch.Tensor) for v in phi.values()):
        raise L2OError(f"checkpoint {name}: phi must be a dict of tensors, got {type(phi).__name__}")
    if set(phi) != set(expected):
        missing, extra = sorted(set(expected) - set(phi)), sorted(set(phi) - set(expected))
        raise L2OError(f"checkpoint {name}: phi does not match {network} "
                       f"(missing {missing or 'none'}, unexpected {extra or 'none'})")
    out = {}
    for k, shape in expected.items():
        v = phi[k]
        if tuple(v.shape) != shape or v.dtype not in PHI_DTYPES:
            raise L2OError(f"checkpoint {name}: phi[{k!r}] is {v.dtype} {tuple(v.shape)}; expected floating {shape} "
                           f"({', '.join(str(d).removeprefix('torch.') for d in PHI_DTYPES)})")
        if v.layout != torch.strided or v.is_meta:
            where = "on the meta device (no values)" if v.is_meta else f"{v.layout} on {v.device}"
            raise L2OError(f"checkpoint {name}: phi[{k!r}] is {where}; expected a dense tensor with values; refused")
        v = v.detach().to(dtype).contiguous()
        if not bool(torch.isfinite(v).all()) or float(v.abs().max()) > MAX_ABS_WEIGHT:
            raise L2OError(f"checkpoint {name}: phi[{k!r}] has non-finite or huge (> {MAX_ABS_WEIGHT:g}) weights; "
                           "refused")
        out[k] = v
    return out


def read_torch(source, what: str = "checkpoint"):
    """(name, object) of a torch.save file or its bytes, loaded with weights_only;
    L2OError (one line) for a missing, truncated or garbage one."""
    if isinstance(source, (bytes, bytearray)):
        name, fobj = "<bytes>", io.BytesIO(source)
    else:
        name = fobj = os.fspath(source)
        if not os.path.isfile(name):
            raise L2OError(f"{what} {name!r} does not exist or is not a file; pass the l2o.pt written by meta-train")
    try:
        return name, torch.load(fobj, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types (pickle, zip, runtime) for a bad file
        raise L2OError(f"cannot read {what} {name!r} ({type(e).__name__}); "
                       "expected an l2o.pt or checkpoint.pt written by meta-train") from None


def l2o_from_checkpoint(source, device=None) -> L2O | MLPL2O:
    """Load the selected phi of an `l2o.pt` (or a meta-training `checkpoint.pt`) from a
    path or from its bytes; 'pretrained:NAME' loads a shipped one (`pretrained`). A checkpoint
    of the MLP family (net family 'mlp', `mlp_lopt.save_mlp_l2o`) loads as an `MLPL2O`.
    Malformed ones (missing keys, wrong shapes, non-finite weights) are refused."""
    if isinstance(source, str) and source.startswith("pretrained:"):
        source = pretrained(source.split(":", 1)[1])
    name, blob = read_torch(source)
    if isinstance(blob, dict) and isinstance(blob.get("net"), dict) and blob["net"].get("family") == "mlp":
        from .mlp_lopt import _mlp_from_blob  # the MLP family (mlp_lopt.py) imports this module

        return _mlp_from_blob(blob, name, device)
    if not isinstance(blob, dict) or "phi" not in blob or "net" not in blob:
        raise L2OError(f"{name!r} is not an l2o-dynamics checkpoint (no 'phi'/'net' entries)")
    net = check_net(blob["net"], repr(name))
    phi = blob["best_phi"] if blob.get("best_phi") is not None else blob["phi"]
    phi = check_phi(phi, net["hidden"], net["layers"], repr(name))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return L2O({k: v.to(dev) for k, v in phi.items()}, hidden=net["hidden"], layers=net["layers"],
               p=net["p"], eta=net["eta"], log_eps=net.get("log_eps", 0.0), meta={"checkpoint": name})


class L2OOptimizer(torch.optim.Optimizer):
    """A trained L2O as a `torch.optim.Optimizer` for any `nn.Module`.

        opt = L2OOptimizer(model.parameters(), "runs/l2o/l2o.pt")
        loss.backward(); opt.step()

    Every parameter with a gradient goes through one batched network call per step;
    per-coordinate LSTM states live in `self.state[p]` and start at zero."""

    def __init__(self, params, checkpoint: str | os.PathLike | L2O, eta: float | None = None):
        l2o = checkpoint if isinstance(checkpoint, L2O) else l2o_from_checkpoint(checkpoint)
        if not isinstance(l2o, L2O):
            raise L2OError(f"{checkpoint} is a {type(l2o).__name__}, not the LSTM L2O; use "
                           "mlp_lopt.MLPL2OOptimizer for the MLP family")
        if eta is not None:
            NET_RANGES["eta"].check("eta", eta)
        super().__init__(params, {"eta": l2o.eta if eta is None else eta})
        self.l2o = l2o

    def add_param_group(self, param_group: dict) -> None:
        """torch's, and a group's own `eta` must be in NET_RANGES['eta'] like the default."""
        super().add_param_group(param_group)
        _check_group_eta(len(self.param_groups) - 1, self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            _check_group_eta(i, group)  # also when changed after construction (a scheduler)
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            l2o = L2O({k: v.to(ps[0].device, ps[0].dtype) for k, v in self.l2o.phi.items()},
                      self.l2o.hidden, self.l2o.layers, self.l2o.p, group["eta"], log_eps=self.l2o.log_eps)
            names = [str(i) for i in range(len(ps))]
            for p in ps:
                if "h" not in self.state[p]:  # (L, numel, H), zero at the start
                    zeros = torch.zeros(l2o.layers, p.numel(), l2o.hidden, dtype=p.dtype, device=p.device)
                    self.state[p]["h"], self.state[p]["c"] = zeros, zeros.clone()
            state = {key: tuple(torch.cat([self.state[p][key][layer] for p in ps])
                                for layer in range(l2o.layers)) for key in ("h", "c")}
            state["shapes"] = {n: tuple(p.shape) for n, p in zip(names, ps)}
            updates, new = l2o.update(dict(zip(names, (p.grad for p in ps))), state)
            i = 0
            for n, p in zip(names, ps):
                p.add_(updates[n])
                for key in ("h", "c"):
                    self.state[p][key] = torch.stack([t[i:i + p.numel()] for t in new[key]])
                i += p.numel()
        return loss


def _check_group_eta(index: int, group: dict) -> None:
    try:
        NET_RANGES["eta"].check("eta", group["eta"])
    except L2OError as e:
        raise L2OError(f"param_groups[{index}]: {e}") from None
