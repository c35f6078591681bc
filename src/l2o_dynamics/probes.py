"""Training-dynamics probes for any `nn.Module` trained by any `torch.optim` optimizer.

Symmetry detection. `find_symmetries(model, example_input)` traces the model with
torch.fx, propagates the example's shapes, and derives the same declared structure
the MLP zoo writes by hand (`optimizees.Structure` of `HiddenLayer`s, over *views*
of the model's parameters); the constraints are then evaluated by `symmetry.py`:

    rescale      producer -> h -> consumers, h positively homogeneous per unit:
                 f(a z) = a f(z) for a > 0.  c_k = <v_wk, w_k> + v_bk b_k - <v_ak, a_k>
                 w_k: the producer's row for unit k (Linear row, Conv output channel
                 (C_in * kernel), or a norm's gamma_k as a 1-vector), b_k its bias;
                 a_k: every consumer weight reading unit k, stacked (a Linear column,
                 every column of a unit's block after Flatten, a Conv's input-channel
                 slice; at the unit's place after a concatenation).
    scale        Linear/Conv -> BatchNorm (batch statistics): per unit k,
                 Linear/Conv -> LayerNorm/RMSNorm over the whole layer's outputs: one unit.
                 c_k = <v_wk, w_k> + v_bk b_k
    translation  logits W h + b -> softmax: c_j = sum_i v_W[i, j], c_b = sum_i v_b[i]

Recognised, and nothing else (an unrecognised construct never yields a symmetry):
  producers   nn.Linear, nn.Conv1d/2d/3d (any groups; the units on the channel dim of
              the input's batching, (N, C, *S) or unbatched (C, *S)), and as rescale
              producers also affine nn.BatchNorm1d/2d/3d and nn.LayerNorm / nn.RMSNorm
              over the last dim only;
  h           every use of the units, to the consumers (fan-out; no residual add, no
              second output), through nn.ReLU, nn.LeakyReLU (any slope), nn.PReLU (any
              slopes), nn.Identity, nn.Dropout, max/avg/adaptive pooling over the
              trailing spatial dims when the input has pool dims + 1 or + 2 dims and the
              units are its channels (per channel: max(a z) = a max(z), avg is linear),
              Flatten / view / reshape of (*B, C, *S) to (*B, C * prod S), mean / sum /
              amax / amin over dims other than the units' (tokens), torch.cat along the
              units' dim (squeezenet's Fire, inception); functional relu / leaky_relu /
              dropout / pooling likewise. Tanh, sigmoid, GELU, SiLU, ReLU6, Hardtanh,
              softplus are not homogeneous, so nothing is reported through them. An empty
              path (producer feeding the consumer directly) is the identity.
  consumers   nn.Linear reading the units in its last dim; nn.Conv with groups 1.
  inside      torch.nn's Transformer, TransformerEncoder/Decoder(Layer) and
              MultiheadAttention, which fx keeps whole (their forwards branch in fast-path
              checks): each layer's linear1 -> ReLU/LeakyReLU/PReLU -> linear2, each
              attention's value projection -> out_proj (attention mixes tokens, not
              units; no add_bias_kv), and in a norm_first encoder layer norm1 -> the
              q, k, v projections and norm2 -> linear1. Exact classes only.
  scale       BatchNorm only while it uses batch statistics (training mode, or no
              running statistics): in eval mode it is a fixed affine map that keeps the
              scale. Anything may follow the norm (a bias added after it breaks the
              *rescale* through the norm's (gamma, beta), which is then not reported).
              The norm's own parameters take no part (they may be frozen).
  translation the output is softmax/log_softmax over the last dim of a Linear, or the
              Linear itself with `loss="cross_entropy"` (the caller's loss is a softmax
              cross-entropy over the output's last dim).
  Every module involved is called once, owns its parameters (no weight sharing, no
  get_attr use elsewhere), and all its parameters require grad. Forward hooks and
  pre-hooks change what a module computes and fx never runs them: nothing is reported
  through a hooked module or its submodules (fx keeps it whole), no translation under a
  forward hook on the model itself, and nothing at all under global forward hooks, each
  with a warning. Backward hooks only change the gradient and are not looked at.

A norm's eps breaks its scale symmetry by O(eps / var) (exact only for eps = 0): such
symmetries carry `exact=False`. Detection reads the modules' current train/eval mode.

The probe. `attach(optimizer, model, example_input, out)` records, through the
optimizer's step hooks, each step's applied update u = theta_after - theta_before and
its deviations (the study's measures, `symmetry.record`, aggregated over the
detected symmetries of each kind), and the gradient's as a control ('grad_' prefix).
`probe.noise(loader, loss_fn)` freezes (theta_t, s_t): minibatch gradients g_i on a
copy of the model, updates u_i = step(g_i; copy of s_t), then the tail indices of
both noises and the top eigenvalue of the update covariance (`noise`, `tail`).
The real model, optimizer and random generators are never touched.
"""
from __future__ import annotations

import copy
import functools
import math
import operator
import warnings
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from . import noise as noise_mod
from . import symmetry, tail
from .optimizees import HiddenLayer, Structure
from .results import MetricLog, prepare_out_dir, write_run
from .seeds import derive_seed
from .errors import L2OError

LOSSES = ("cross_entropy",)
Views = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = (nn.LayerNorm, nn.RMSNorm)  # over the last dims, per sample
_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Dropout)
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.leaky_relu, F.dropout, torch.dropout}
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}
_ELEMENTWISE_METHODS = {"relu", "relu_"}
_FLATTEN_FUNCTIONS = {torch.flatten}
_FLATTEN_METHODS = {"flatten", "view", "reshape"}
_FEEDFORWARD = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_CONTAINERS = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder)
_REDUCTION_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
_SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}


# ---- symmetries ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Symmetry:
    """One detected symmetry: `kind`, the `params` (names in `model.named_parameters()`)
    it acts on, the modules involved (`layers`), and whether it is exact (False where a
    norm's eps breaks it slightly). Measures take a dict of vectors keyed by parameter
    name (a gradient, an update) and evaluate at `params` or the model's current ones."""

    kind: str
    params: tuple[str, ...]
    layers: tuple[str, ...]
    exact: bool
    views: Views = field(repr=False)  # name -> tensor dict -> the structure's tensors
    structure: Structure = field(repr=False)  # over the keys `views` returns
    model: nn.Module = field(repr=False)

    def unit_terms(self, vectors: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-unit (c_k, ||v_k||, ||xi_k||), each (U,) (`symmetry.unit_terms`)."""
        v, theta = self._views(vectors, params)
        return symmetry.unit_terms(self.kind, v, theta, self.structure)

    def deviation(self, vectors: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """The signed total sum_k c_k, a 0-d tensor (the study's measure is its magnitude)."""
        return self.unit_terms(vectors, params)[0].sum(-1)

    def measures(self, vectors: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
        """{'total', 'unit', 'rel'} as `symmetry.measures` (|signed total|, sum_k |c_k|, scale-free)."""
        v, theta = self._views(vectors, params)
        return symmetry.measures(self.kind, v, theta, self.structure)

    def _views(self, vectors, params):
        if params is None:
            params = {n: p.detach() for n, p in self.model.named_parameters()}
        return (self.views(_require(vectors, self.params, "vectors")),
                self.views(_require(params, self.params, "params")))


def _require(tensors: Mapping[str, torch.Tensor], names: Iterable[str], what: str) -> Mapping[str, torch.Tensor]:
    """`tensors`, checked to hold a tensor for every name in `names`."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise L2OError(f"{what} lack {', '.join(missing)}; valid: a dict keyed by the model's parameter names")
    empty = [n for n in names if not isinstance(tensors[n], torch.Tensor)]
    if empty:
        raise L2OError(f"{what}[{empty[0]!r}] is {type(tensors[empty[0]]).__name__} (a .grad before backward, or "
                       "of a parameter the loss does not use); valid: a tensor for every parameter the "
                       "symmetries act on")
    return tensors


def record(symmetries: Sequence[Symmetry], vectors: Mapping[str, torch.Tensor],
           params: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The study's metrics over all detected symmetries of each kind, as `symmetry.record`
    on the zoo: '{prefix}{kind}_deviation' (|sum of c_k over every unit of that kind|),
    '_unit', '_rel' -> 0-d tensors; `rel` is NaN where it is 0/0 (the vector, or every
    generator, is zero: nothing to measure), where `symmetry.record` has 0. Empty when
    nothing was detected."""
    if not symmetries:
        return {}
    names = list(dict.fromkeys(n for s in symmetries for n in s.params))
    views, structure = _combined(symmetries)
    vectors, params = _require(vectors, names, "vectors"), _require(params, names, "params")
    return _record_views(symmetries, structure, views(vectors), views(params), prefix)


def _record_views(symmetries: Sequence[Symmetry], structure: Structure, v: Mapping[str, torch.Tensor],
                  theta: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for kind in symmetry.KINDS:
            if any(s.kind == kind for s in symmetries):
                c, vnorm, xnorm = symmetry.unit_terms(kind, v, theta, structure)
                unit = c.abs().sum(-1)
                out[f"{prefix}{kind}_deviation"] = c.sum(-1).abs()
                out[f"{prefix}{kind}_deviation_unit"] = unit
                out[f"{prefix}{kind}_deviation_rel"] = unit / (vnorm * xnorm).sum(-1)  # |c_k| <= the bound: 0/0 only
    return out


def _fast_parts(s: Symmetry) -> dict[str, Callable] | None:
    """The part views of a rescale or scale symmetry whose consumer columns (if any) have a
    copy-free (F, U, block) view, else None (then `symmetry.unit_terms` on the views)."""
    parts = getattr(s.views, "parts", None)
    keys = {"rescale": {"w", "b", "a"}, "scale": {"w", "b"}}.get(s.kind)
    if parts is None or keys is None or set(parts) != keys or (s.kind == "rescale" and not hasattr(parts["a"], "cube")):
        return None
    return parts


class _Reads(dict):
    """A dict of tensors that notes which keys are read from it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__(tensors)
        self.read: list[str] = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def _into(dst: torch.Tensor, value: torch.Tensor, add: bool) -> None:
    if add:
        dst.add_(value)
    else:
        dst.copy_(value)


def _part_sums(parts: dict[str, Callable]) -> dict[str, tuple[Callable, Callable, Callable | None]]:
    """Per part of `_fast_parts`: (its view, cross(P, dst, add), squares(x, dst, add) or None).
    cross writes (or with `add` adds) into dst (U,) the per-unit sums of the part's view of a
    dict P of elementwise products x * y; squares those of the squares of a dict x (None: cross
    of x * x). The views are reshapes, slices and concatenations of the parameters (zeros for
    a missing bias), so part(x * y) = part(x) * part(y) entry by entry: the sums are those
    `symmetry.unit_terms` forms, (vw * w).sum(-1), vb * b, (va * a) over each unit's consumer
    columns (here over the (F, U, block) view: F first, then the block, a contiguous-row sum,
    3x faster than the block first). A row's sum of squares is its squared norm: a reduction
    that writes no product, 2x faster (a norm over the columns' strided dims is slower)."""
    w, b = parts["w"], parts["b"]

    def w_cross(P, dst, add):
        x = w(P)
        if add or x.dtype != dst.dtype or x.device != dst.device:
            _into(dst, x.sum(-1), add)
        else:
            torch.sum(x, -1, out=dst)

    def w_squares(t, dst, add):
        x = w(t)
        if add or x.dtype != dst.dtype or x.device != dst.device:
            _into(dst, torch.linalg.vector_norm(x, dim=-1).square(), add)
        else:
            torch.linalg.vector_norm(x, dim=-1, out=dst).square_()

    def b_squares(t, dst, add):
        x = b(t)
        _into(dst, x * x, add)

    sums = {"w": (w, w_cross, w_squares), "b": (b, lambda P, dst, add: _into(dst, b(P), add), b_squares)}
    if "a" in parts:
        cube = parts["a"].cube

        def a_cross(P, dst, add):
            x = cube(P).sum(0)
            if add or x.dtype != dst.dtype or x.device != dst.device:
                _into(dst, x.sum(-1), add)
            else:
                torch.sum(x, -1, out=dst)

        sums["a"] = (cube, a_cross, None)
    return sums


def _chunk_mode(view: Callable, name: str) -> str | None:
    """How a part's per-unit sums over rows f0..f1 of parameter `name` make up the whole one:
    'rows' (they are units f0..f1), 'columns' (partial sums over the consumer's F: added),
    None (not known: the parameter is read whole)."""
    if getattr(view, "rows_of", None) == name:
        return "rows"
    return "columns" if getattr(view, "columns_of", None) == name else None


_PARTS = ("w", "b", "a")  # the table's second axis; its first: pairs v * theta, v * v, theta * theta


class _StepSums:
    """The per-step sums of the symmetries with copy-free part views (`_fast_parts`).

    Every parameter they read is visited once per record: its elementwise products
    (v * theta, and v * v and theta * theta where consumer columns read it; a weight read
    only as rows takes its sums of squares as norms) are formed one at a time in a reused
    buffer and reduced, while still in cache, by every part of every symmetry that reads it
    (a consumer conv is read as the scale symmetry's rows and the rescale's columns),
    straight into one table of per-unit sums (pair, part, unit) over all these symmetries'
    units, laid out kind by kind. A large weight is read in blocks of rows of about CHUNK
    bytes, so that theta, v, the copy and the product of one block stay in cache together
    (30% faster on resnet18's 512x512x3x3 convs than whole). Parameters read together by
    one part (a whole-layer norm's weight and bias) form a group, read whole. Nothing the
    size of a parameter is allocated per record: the scratch buffers and the table are kept
    (`release` frees them)."""

    CHUNK = 2 ** 21

    def __init__(self, symmetries: Sequence[Symmetry], fast: Sequence[dict | None],
                 params: Mapping[str, torch.Tensor]):
        order = sorted((i for i, parts in enumerate(fast) if parts is not None),
                       key=lambda i: symmetry.KINDS.index(symmetries[i].kind))
        self.units, self.ranges, start = {}, {}, 0  # symmetry -> (first unit, units); kind -> slice
        for i in order:
            units = fast[i]["b"](params).shape[-1]
            self.units[i] = (start, units)
            kind = symmetries[i].kind
            self.ranges[kind] = slice(self.ranges[kind].start if kind in self.ranges else start, start + units)
            start += units
        self.size = start
        terms, group_of = [], {}  # (symmetry, part, sums, names read, view); name -> its group (union-find)

        def root(n):
            while group_of[n] != n:
                n = group_of[n]
            return n

        for i in order:
            for part, (view, cross, squares) in _part_sums(fast[i]).items():
                reads = _Reads(params)
                view(reads)
                names = list(dict.fromkeys(reads.read))
                for n in names:
                    group_of.setdefault(n, n)
                for n in names[1:]:
                    group_of[root(n)] = root(names[0])
                terms.append((i, part, cross, squares, names, view))
        groups: dict[str, tuple[list[str], list]] = {}
        for n in group_of:  # in order of first use
            groups.setdefault(root(n), ([], []))[0].append(n)
        for i, part, cross, squares, names, view in terms:
            if getattr(view, "zeros", False):
                continue  # a missing bias adds nothing (its entries of the table stay 0)
            group = groups[root(names[0])]
            mode = _chunk_mode(view, group[0][0]) if len(group[0]) == 1 else None
            group[1].append((_PARTS.index(part), *self.units[i], mode, cross, squares))
        # (names, terms, whether the group may be read in blocks of rows)
        self.groups = [(names, ts, all(t[3] is not None for t in ts)) for names, ts in groups.values()]
        self.names = list(group_of)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._table: torch.Tensor | None = None
        # kept views: blocks and the table's slices per group, scratch per request (indexing costs 5 us)
        self._layouts: dict[int, tuple] = {}
        self._carved: dict[tuple, tuple] = {}
        self._epoch = 0

    def _blocks(self, names: Sequence[str], like: Mapping[str, torch.Tensor], chunked: bool) -> list[slice]:
        t = like[names[0]]
        if not chunked or t.dim() == 0 or t.numel() * t.element_size() <= 2 * self.CHUNK:
            return [slice(0, None)]
        step = max(1, self.CHUNK * t.shape[0] // (t.numel() * t.element_size()))
        return [slice(r, r + step) for r in range(0, t.shape[0], step)]

    def scratch(self, slot: str, like: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Contiguous tensors shaped like like[n], one per name, carved from a kept flat buffer
        per slot, dtype and device (grown to the largest request; a view carved before it
        grew keeps the old one alive)."""
        request = (slot, *((n, like[n].shape, like[n].dtype, like[n].device) for n in names))
        carved = self._carved.get(request)
        if carved is not None and carved[0] == self._epoch:
            return carved[1]
        out, used = {}, {}
        for n in names:
            t = like[n]
            key = (slot, t.dtype, t.device)
            start = used.get(key, 0)
            used[key] = end = start + t.numel()
            buf = self._buffers.get(key)
            if buf is None or buf.numel() < end:
                buf = self._buffers[key] = torch.empty(end, dtype=t.dtype, device=t.device)
                self._epoch += 1  # views carved from the old buffer are carved again
            out[n] = buf[start:end].view(t.shape)
        self._carved[request] = (self._epoch, out)
        return out

    def release(self) -> None:
        self._buffers.clear()
        self._table, self._layouts, self._carved = None, {}, {}

    def _layout(self, g: int, whole: Mapping[str, torch.Tensor]) -> list:
        """Group g's blocks of rows, and per block and term the table's slices (one per pair)
        its sums go to, with whether they add to them (partial sums over F) or set them."""
        names, terms, chunked = self.groups[g]
        t = whole[names[0]]
        key = (t.shape, t.dtype)
        kept = self._layouts.get(g)
        if kept is not None and kept[0] == key:
            return kept[1]
        blocks = self._blocks(names, whole, chunked)
        layout = []
        for b, rows in enumerate(blocks):
            dsts = []
            for part, start, units, mode, _, _ in terms:
                if mode == "rows" and len(blocks) > 1:
                    span, add = slice(start + rows.start, start + min(rows.stop, units)), False
                else:
                    span, add = slice(start, start + units), b > 0  # columns: partial sums over F
                dsts.append(([self._table[pair, part, span] for pair in range(3)], add))
            layout.append((rows, dsts))
        self._layouts[g] = (key, layout)
        return layout

    def run(self, whole: Mapping[str, torch.Tensor], theta_of: Callable, v_of: Callable, xi: bool) -> torch.Tensor:
        """The table (pair, part, unit) of per-unit sums, kept (the next run overwrites it):
        pairs v * theta, v * v and, with `xi`, theta * theta (else 0); parts 'w', 'b', 'a'
        (0 where a symmetry has none). theta_of(names, rows) and v_of(names, rows) give rows
        `rows` (a slice) of a group's tensors (in that order); `whole` holds tensors of the
        parameters' shapes."""
        dtype = functools.reduce(torch.promote_types, (whole[n].dtype for n in self.names), torch.float32) \
            if self.names else torch.float32
        device = whole[self.names[0]].device if self.names else None
        if self._table is None or self._table.dtype != dtype or self._table.device != device:
            self._table, self._layouts = torch.zeros(3, 3, self.size, dtype=dtype, device=device), {}
        else:
            self._table.zero_()
        for g, (names, terms, _) in enumerate(self.groups):
            squared = any(t[5] is None for t in terms)  # the columns need x * x: the rows read it too
            for rows, dsts in self._layout(g, whole):
                theta = theta_of(names, rows)
                v = v_of(names, rows)
                out = self.scratch("product", theta, names)  # one product at a time: each is reduced at once
                P = {n: torch.mul(v[n], theta[n], out=out[n]) for n in names}
                for term, (spans, add) in zip(terms, dsts):
                    term[4](P, spans[0], add)
                for pair, x in ((1, v), (2, theta)) if xi else ((1, v),):
                    P = {n: torch.square(x[n], out=out[n]) for n in names} if squared else None
                    for term, (spans, add) in zip(terms, dsts):
                        if squared:
                            term[4](P, spans[pair], add)
                        else:
                            term[5](x, spans[pair], add)
        return self._table


def _record_terms(by_kind: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]], prefix: str
                  ) -> dict[str, torch.Tensor]:
    """`record` from each kind's (c_k, ||v_k|| ||xi_k||) over groups of its units."""
    out = {}
    with torch.no_grad():
        for kind in symmetry.KINDS:
            if by_kind.get(kind):
                terms = by_kind[kind]
                c = terms[0][0] if len(terms) == 1 else torch.cat([t[0].reshape(-1) for t in terms])
                bound = terms[0][1] if len(terms) == 1 else torch.cat([t[1].reshape(-1) for t in terms])
                unit = c.abs().sum()
                out[f"{prefix}{kind}_deviation"] = c.sum().abs()
                out[f"{prefix}{kind}_deviation_unit"] = unit
                out[f"{prefix}{kind}_deviation_rel"] = unit / bound.sum()  # |c_k| <= the bound: 0/0 only
    return out


def _combined(symmetries: Sequence[Symmetry]) -> tuple[Views, Structure]:
    """One structure holding every symmetry's layers (their view keys are distinct)."""
    hidden = tuple(layer for s in symmetries for layer in s.structure.hidden)
    logits = [s.structure for s in symmetries if s.kind == "translation"]
    structure = Structure(hidden, logits[0].logits_weight if logits else "", logits[0].logits_bias if logits else "")

    def views(tensors):
        return {k: t for s in symmetries for k, t in s.views(tensors).items()}

    return views, structure


# ---- views of parameters in the zoo's layouts ---------------------------------------------------
def _rows(name: str) -> Callable:
    """(U, *fan_in) weight -> (U, fan_in): row k = w_k."""
    view = lambda d: d[name].reshape(d[name].shape[0], -1)  # noqa: E731
    view.rows_of = name  # of any rows of the weight, the rows of those units: `_StepSums` reads it in chunks
    return view


def _gamma(name: str) -> Callable:
    """A norm's per-unit gamma (U,) -> (U, 1)."""
    return lambda d: d[name].unsqueeze(-1)


def _vector(name: str | None, like: str, units: int) -> Callable:
    """A bias (U,), or zeros where the layer has none."""
    if name is None:
        view = lambda d: d[like].new_zeros(units)  # noqa: E731
        view.zeros = True  # whatever part of `like` it is given
        return view
    return lambda d: d[name]


def _linear_columns(name: str, units: int, block: int, offset: int = 0, width: int | None = None) -> Callable:
    """Linear weight (F, width * block), unit k's inputs (offset + k) * block .. + block - 1
    (channel-major flatten of `width` channels, the units at `offset` after a concatenation)
    -> (F * block, U): column k = a_k."""
    width = units if width is None else width
    if block == 1 and width == units:
        view = lambda d: d[name]  # noqa: E731
    elif block == 1:
        view = lambda d: d[name][:, offset:offset + units]  # noqa: E731
    else:
        view = lambda d: (d[name].reshape(-1, width, block)[:, offset:offset + units]  # noqa: E731
                          .transpose(-1, -2).reshape(-1, units))
    # (F, U, block) without a copy (`_part_sums`); of rows f0..f1 of the weight, rows f0..f1 of it
    view.cube = lambda d: d[name].reshape(-1, width, block)[:, offset:offset + units]
    view.cube.columns_of = name
    return view


def _conv_columns(name: str, units: int, offset: int = 0) -> Callable:
    """Conv weight (C_out, C_in, *kernel), the units at input channels offset .. offset + U - 1
    -> (C_out * prod kernel, U): column k = a_k."""
    view = lambda d: d[name][:, offset:offset + units].transpose(0, 1).reshape(units, -1).T  # noqa: E731
    view.cube = lambda d: d[name][:, offset:offset + units].flatten(2)  # (C_out, U, prod kernel): `_part_sums`
    view.cube.columns_of = name  # of output channels f0..f1 of the weight, rows f0..f1 of the cube
    return view


def _stacked(columns: Sequence[Callable]) -> Callable:
    """The columns of several consumers of the same units, (sum_i F_i, U)."""
    if len(columns) == 1:
        return columns[0]
    return lambda d: torch.cat([c(d) for c in columns])


def _whole_layer(weight: str, bias: str | None) -> Callable:
    """A layer scaled as one unit: (1, numel(W) + numel(b))."""
    def view(d):
        parts = [d[weight].reshape(-1)] + ([d[bias]] if bias is not None else [])
        return torch.cat(parts).unsqueeze(0)
    return view


def _make(kind: str, key: str, parts: dict[str, Callable], layer: HiddenLayer | None, params, layers, exact,
          model) -> Symmetry:
    """A Symmetry whose views are `parts` under keys '{key}.{part}': one hidden layer of the
    zoo's structure (rescale, scale), or the logits' 'w', 'b' (translation, layer None)."""
    if layer is None:
        structure = Structure((), f"{key}.w", f"{key}.b")
    else:
        structure = Structure((layer,), "", "")
    views = lambda d: {f"{key}.{k}": f(d) for k, f in parts.items()}  # noqa: E731
    views.parts = parts  # the probe's per-step fast path reads them (`_StepSums`)
    return Symmetry(kind, tuple(dict.fromkeys(params)), tuple(layers), exact, views, structure, model)


# ---- tracing ------------------------------------------------------------------------------------
@dataclass
class _Graph:
    nodes: list[fx.Node]
    modules: dict[str, nn.Module]
    unusable: set[str]  # module names never to build a symmetry on (shared, called twice, hooked)
    param_names: dict[str, str]  # "<module>.<attr>" -> the same (only names that exist)
    frozen: set[str] = field(default_factory=set)  # modules with a parameter that does not require grad
    hooked: set[str] = field(default_factory=set)  # modules under a forward hook or pre-hook (in `unusable`)

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def usable(self, node: fx.Node, types) -> bool:
        m = self.module(node)
        return isinstance(m, types) and node.target not in self.unusable and node.target not in self.frozen

    def param(self, node: fx.Node, attr: str) -> str | None:
        """Parameter name of module attribute `attr`, None if the module has none."""
        return self.param_names.get(f"{node.target}.{attr}")


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape")


class _Tracer(fx.Tracer):
    """fx's tracer, keeping the modules in `leaves` (those with hooks) as opaque calls."""

    def __init__(self, leaves: set[int]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.leaves or super().is_leaf_module(m, qualname)


class _Shapes(fx.Interpreter):
    """Runs the graph on the example, each tensor's shape into node.meta['shape'] (fx's
    ShapeProp prints the model's traceback to stderr before re-raising; this does not)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks or pre-hooks: they change what the module computes, and fx never runs them."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    """Forward hooks or pre-hooks registered for every module (`register_module_forward_hook`)."""
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def _hooked(model: nn.Module) -> list[str]:
    """Names of the submodules of `model` (not itself) that carry forward hooks or pre-hooks."""
    return [n for n, m in model.named_modules(remove_duplicate=False) if n and _has_hooks(m)]


def _untraceable(model: nn.Module, e: Exception) -> L2OError:
    """The one-line error for a model fx cannot trace, naming the cause where it is a known one."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    if type(model).__module__.startswith("torch.nn."):
        cause = (f"torch.nn's {type(model).__name__} checks its inputs in Python (fast-path checks), which "
                 "torch.fx cannot trace; use it inside a module of yours (torch.nn's Transformer modules "
                 "and MultiheadAttention are then recognised as a whole)")
    elif "control flow" in text:
        cause = ("its forward branches on a tensor (an if or while on a value or shape, as fast-path checks "
                 "do); torch.nn's Transformer modules and MultiheadAttention inside it are recognised as a whole")
    elif isinstance(e, TypeError) and "Proxy" in text:
        cause = ("its forward uses a tensor's shape or value as a Python number (range(x.shape[0]), "
                 "int(x.size(1)), a slice bound computed from one); write it with tensor operations")
    else:
        cause = "symmetry detection needs a forward without data-dependent control flow"
    return L2OError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {first[:160]}): "
                    f"{cause} (attach(..., symmetries=[]) still probes the noise)")


def _trace(model: nn.Module, example_input) -> _Graph:
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    if hasattr(model, "_orig_mod"):
        raise L2OError(f"{type(model).__name__} is a torch.compile'd model, which torch.fx cannot trace; "
                       "pass the original module, model._orig_mod (it shares the compiled model's parameters)")
    twin = copy.deepcopy(model)  # shape propagation runs forward: BN statistics change here only
    hooked = _hooked(twin)
    try:
        gm = fx.GraphModule(twin, _Tracer({id(twin.get_submodule(n)) for n in hooked}).trace(twin))
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        raise _untraceable(model, e) from None
    try:
        with torch.random.fork_rng(devices=_rng_devices(model)), torch.no_grad():
            _Shapes(gm).run(*inputs)
    except Exception as e:  # whatever the model raises on this input
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise L2OError(f"{type(model).__name__} failed on example_input ({type(e).__name__}: {first[:160]}); "
                       "give an input the model accepts (a batch of at least 2 with BatchNorm)") from None
    modules = dict(gm.named_modules())
    names: dict[int, list[str]] = defaultdict(list)
    for n, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(n)
    frozen = {n.rpartition(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    unusable = set()
    for ns in names.values():  # shared parameters: their modules are out
        if len(ns) > 1:
            unusable.update(n.rpartition(".")[0] for n in ns)
    calls = defaultdict(int)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
        elif node.op == "get_attr":
            unusable.add(node.target.rpartition(".")[0])
            unusable.add(node.target)
    unusable.update(t for t, c in calls.items() if c > 1)
    under_hooks = {n for n in dict(twin.named_modules(remove_duplicate=False))
                   if any(n == h or n.startswith(h + ".") for h in hooked)}
    param_names = {n: n for ns in names.values() for n in ns}
    return _Graph(list(gm.graph.nodes), modules, unusable | under_hooks, param_names, frozen, under_hooks)


def _size_query(node: fx.Node, source: fx.Node) -> bool:
    """`node` reads only the shape of `source` (x.shape, x.size(), x.shape[0]), not its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[:2] == (source, "shape")
    if node.op == "call_method" and node.target == "size":
        return node.args[0] is source
    return node.op == "call_function" and node.target is operator.getitem \
        and isinstance(node.args[0], fx.Node) and _size_query(node.args[0], source)


def _value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _size_query(u, node)]


def _single_input(node: fx.Node, source: fx.Node) -> bool:
    """`node`'s first argument is `source` and it reads no other values."""
    return bool(node.args) and node.args[0] is source and all(
        n is source or _size_query(n, source) for n in node.all_input_nodes)


# ---- the path between producer and consumer -------------------------------------------------------
@dataclass(frozen=True)
class _Path:
    axis: int  # dim of the units in the current tensor
    block: int  # entries per unit after a channel-major flatten (1 = not flattened)
    ops: tuple[str, ...]
    offset: int = 0  # index of the first unit along `axis` (after a concatenation)
    width: int = 0  # size of `axis` before any flatten: the units, or every concatenated channel


def _spatial_dims(module: nn.Module | None, node: fx.Node) -> int:
    """1, 2 or 3: the dims a pool reduces (its name ends in 1d, 2d, 3d)."""
    name = type(module).__name__ if module is not None else node.target.__name__
    return int(name[-2])


def _reduced_dims(node: fx.Node, ndim: int) -> set[int] | None:
    """The dims a mean / sum / amax / amin reduces, None where it reduces every dim."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    dims = (dim,) if isinstance(dim, int) else dim
    if not isinstance(dims, (tuple, list)) or not dims or not all(isinstance(d, int) for d in dims):
        return None
    return {d % ndim for d in dims}


def _homogeneous_step(g: _Graph, node: fx.Node, source: fx.Node, path: _Path) -> list[_Path] | None:
    """Where `node` (reading `source`) moves the units: one path, or one per place a concatenation
    puts `source`; None if it is not a recognised positively homogeneous per-unit map."""
    shape_in, shape_out = _shape(source), _shape(node)
    if shape_in is None or shape_out is None or node.target in g.hooked:
        return None
    module = g.module(node)
    name = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        return _concatenated(node, source, path, name)
    if not _single_input(node, source):
        return None
    elementwise = (type(module) in _ELEMENTWISE_MODULES  # exact types: a subclass may change forward
                   or node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS
                   or node.op == "call_method" and node.target in _ELEMENTWISE_METHODS)
    if elementwise:
        return [_Path(path.axis, path.block, path.ops + (name,), path.offset, path.width)] \
            if shape_out == shape_in else None
    pool = (type(module) in _POOL_MODULES and not getattr(module, "return_indices", False)
            or node.op == "call_function" and node.target in _POOL_FUNCTIONS
            and not node.kwargs.get("return_indices", False))
    if pool:  # over the trailing spatial dims, channel by channel: (N, C, *S) or unbatched (C, *S)
        axis = len(shape_in) - _spatial_dims(module, node) - 1
        ok = path.block == 1 and path.axis == axis and shape_out[:axis + 1] == shape_in[:axis + 1]
        return [_Path(axis, 1, path.ops + (name,), path.offset, path.width)] if ok else None
    flatten = (isinstance(module, nn.Flatten)
               or node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS
               or node.op == "call_method" and node.target in _FLATTEN_METHODS)
    a = path.axis
    if flatten and path.block == 1 and shape_out == shape_in[:a] + (math.prod(shape_in[a:]),):
        return [_Path(a, math.prod(shape_in[a + 1:]), path.ops + (name,), path.offset, path.width)]
    reduction = (node.op == "call_function" and node.target in _REDUCTION_FUNCTIONS
                 or node.op == "call_method" and node.target in _REDUCTION_METHODS)
    dims = _reduced_dims(node, len(shape_in)) if reduction else None
    if dims is not None and path.block == 1 and a not in dims:  # over other dims (tokens): per unit
        axis = a if len(shape_out) == len(shape_in) else a - sum(d < a for d in dims)
        if 0 <= axis < len(shape_out) and shape_out[axis] == shape_in[a]:
            return [_Path(axis, 1, path.ops + (name,), path.offset, path.width)]
    return None


def _concatenated(node: fx.Node, source: fx.Node, path: _Path, name: str) -> list[_Path] | None:
    """torch.cat along the units' axis: the units keep their axis at their place in the result."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (tuple, list)) or not isinstance(dim, int) or path.block != 1 \
            or set(node.all_input_nodes) != set(tensors) or set(node.kwargs) - {"tensors", "dim"}:
        return None
    shapes = [_shape(t) for t in tensors]
    if any(s is None or len(s) != len(shapes[0]) for s in shapes) or dim % len(shapes[0]) != path.axis:
        return None
    starts = [sum(s[path.axis] for s in shapes[:i]) for i in range(len(shapes))]
    width = starts[-1] + shapes[-1][path.axis]
    return [_Path(path.axis, 1, path.ops + (name,), start + path.offset, width)
            for t, start in zip(tensors, starts) if t is source]


def _consumer_columns(g: _Graph, node: fx.Node, source: fx.Node, path: _Path, units: int) -> Callable | None:
    shape = _shape(source)
    if shape is None or not _single_input(node, source) or len(node.args) != 1 or node.kwargs:
        return None
    module, weight = g.module(node), g.param(node, "weight")
    if weight is None:
        return None
    if g.usable(node, _LINEAR) and path.axis == len(shape) - 1 and module.in_features == path.width * path.block:
        return _linear_columns(weight, units, path.block, path.offset, path.width)
    if g.usable(node, _CONV) and path.block == 1 and module.groups == 1 and module.in_channels == path.width \
            and path.axis == len(shape) - (module.weight.dim() - 2) - 1:  # channels of (N, C, *S) or (C, *S)
        return _conv_columns(weight, units, path.offset)
    return None


# ---- detection --------------------------------------------------------------------------------------
def _producer(g: _Graph, node: fx.Node) -> tuple[str, Callable, Callable, int, int] | None:
    """(incoming weight name, its rows view, bias view, units, unit axis) of a rescale producer."""
    shape = _shape(node)
    module, weight = g.module(node), g.param(node, "weight")
    if shape is None or weight is None:
        return None
    bias = g.param(node, "bias")
    if g.usable(node, _LINEAR):
        u = module.out_features
        return weight, _rows(weight), _vector(bias, weight, u), u, len(shape) - 1
    if g.usable(node, _CONV):
        u = module.out_channels
        return weight, _rows(weight), _vector(bias, weight, u), u, _channel_axis(module, shape)
    if g.usable(node, _BATCHNORM) and module.affine:
        u = module.num_features
        return weight, _gamma(weight), _vector(bias, weight, u), u, 1
    if g.usable(node, _NORMS) and module.elementwise_affine and len(module.normalized_shape) == 1:
        u = module.normalized_shape[0]  # LayerNorm's (gamma, beta), RMSNorm's gamma
        return weight, _gamma(weight), _vector(bias, weight, u), u, len(shape) - 1
    return None


def _channel_axis(conv: nn.Module, shape: tuple[int, ...]) -> int:
    """The channel dim of a Conv's input or output: 1 in (N, C, *S), 0 unbatched (C, *S)."""
    return len(shape) - (conv.weight.dim() - 2) - 1


def _reach(g: _Graph, node: fx.Node, path: _Path, units: int) -> list[tuple[fx.Node, Callable, str]] | None:
    """Every consumer `node`'s units reach along positively homogeneous per-unit paths (through
    fan-out and concatenation): (consumer, its columns view, the path's ops); None if any use
    of the units is something else (a residual add, the model's output)."""
    users = _value_users(node)
    if not users:
        return None
    found = []
    for nxt in users:
        columns = _consumer_columns(g, nxt, node, path, units)
        if columns is not None:
            found.append((nxt, columns, "->".join(path.ops) or "identity"))
            continue
        for step in _homogeneous_step(g, nxt, node, path) or [None]:
            further = None if step is None else _reach(g, nxt, step, units)
            if further is None:
                return None
            found += further
    return found


def _rescale(g: _Graph, node: fx.Node, key: str, model) -> Symmetry | None:
    prod = _producer(g, node)
    if prod is None:
        return None
    weight, rows, bias_view, units, axis = prod
    reached = _reach(g, node, _Path(axis, 1, (), 0, units), units)
    if not reached:
        return None
    outs = [g.param(consumer, "weight") for consumer, _, _ in reached]
    return _rescale_of(key, {"w": rows, "b": bias_view, "a": _stacked([c for _, c, _ in reached])},
                       " | ".join(dict.fromkeys(p for _, _, p in reached)), [weight, g.param(node, "bias"), *outs],
                       [node.target] + [c.target for c, _, _ in reached], model)


def _rescale_of(key: str, parts: dict[str, Callable], activation: str, params: list[str | None], layers, model
                ) -> Symmetry:
    """A rescale symmetry over the views `parts` 'w' (U, fan_in), 'b' (U,), 'a' (fan_out, U) of
    `params` (None: a missing bias)."""
    layer = HiddenLayer(f"{key}.w", f"{key}.b", f"{key}.a", activation, True)
    return _make("rescale", key, parts, layer, [p for p in params if p is not None], layers, True, model)


def _scale(g: _Graph, node: fx.Node, key: str, model) -> Symmetry | None:
    users = _value_users(node)
    if not (g.usable(node, _LINEAR) or g.usable(node, _CONV)) or len(users) != 1:
        return None
    norm = users[0]
    shape, module = _shape(node), g.module(node)
    m, weight, bias = g.module(norm), g.param(node, "weight"), g.param(node, "bias")
    if shape is None or weight is None or m is None or norm.target in g.unusable or not _single_input(norm, node):
        return None
    axis = _channel_axis(module, shape) if isinstance(module, _CONV) else len(shape) - 1
    units = shape[axis]
    if isinstance(m, _BATCHNORM) and (m.training or m.running_mean is None) and m.num_features == units \
            and axis == 1 and (isinstance(module, _CONV) or len(shape) == 2):
        parts = {"w": _rows(weight), "b": _vector(bias, weight, units)}
    elif isinstance(m, _NORMS) and tuple(m.normalized_shape) == tuple(shape[axis:]):
        parts = {"w": _whole_layer(weight, bias), "b": lambda d: d[weight].new_zeros(1)}
    else:
        return None
    layer = HiddenLayer(f"{key}.w", f"{key}.b", "", type(m).__name__, False, bn_weight=norm.target,
                        bn_bias=norm.target)  # a normalisation follows: the scale branch of symmetry.py
    return _make("scale", key, parts, layer, [weight] + ([bias] if bias else []), [node.target, norm.target],
                 m.eps == 0, model)


def _inside(g: _Graph, node: fx.Node, start: int, model) -> list[Symmetry]:
    """Symmetries inside a torch.nn Transformer module or attention that fx keeps as one call (their
    forwards branch in fast-path checks fx cannot trace): each layer's feed-forward block
    linear1 -> ReLU -> linear2, each attention's values -> out_proj (attention mixes tokens,
    never units), and in a pre-norm encoder layer norm1 -> the q, k, v projections and
    norm2 -> linear1. Only the exact torch.nn classes, whose forwards are known."""
    module = g.module(node)
    if type(module) not in _CONTAINERS + _FEEDFORWARD + (nn.MultiheadAttention,) or node.target in g.hooked:
        return []
    detectors = {nn.TransformerEncoderLayer: (_feedforward, _prenorm("norm1", "self_attn", "in_proj_weight"),
                                              _prenorm("norm2", "linear1", "weight")),
                 nn.TransformerDecoderLayer: (_feedforward,), nn.MultiheadAttention: (_attention_values,)}
    found = []
    for name, sub in _known_parts(module, node.target):
        for detect in detectors.get(type(sub), ()):
            s = detect(g, name, sub, str(start + len(found)), model)
            found += [s] if s is not None else []
    return found


def _known_parts(module: nn.Module, name: str) -> Iterable[tuple[str, nn.Module]]:
    """`module` and, through the exact torch.nn classes whose forwards call them, its layers and attentions."""
    yield name, module
    children = {nn.Transformer: ("encoder", "decoder"), nn.TransformerEncoder: ("layers",),
                nn.TransformerDecoder: ("layers",), nn.TransformerEncoderLayer: ("self_attn",),
                nn.TransformerDecoderLayer: ("self_attn", "multihead_attn")}.get(type(module), ())
    for attr in children:
        child = getattr(module, attr)
        if type(child) is nn.ModuleList:
            for i, layer in enumerate(child):
                yield from _known_parts(layer, f"{name}.{attr}.{i}")
        else:
            yield from _known_parts(child, f"{name}.{attr}")


def _clean(g: _Graph, *modules: str) -> bool:
    """None of `modules` is shared, hooked, read elsewhere or frozen."""
    return not any(m in g.unusable or m in g.frozen for m in modules)


def _feedforward(g: _Graph, name: str, layer: nn.Module, key: str, model) -> Symmetry | None:
    """linear1 -> activation -> dropout -> linear2 of a Transformer{Encoder,Decoder}Layer."""
    act = layer.activation
    if not (act is F.relu or type(act) in (nn.ReLU, nn.LeakyReLU, nn.PReLU)) \
            or not _clean(g, f"{name}.linear1", f"{name}.linear2", f"{name}.dropout", f"{name}.activation"):
        return None
    weight, bias, out = (g.param_names.get(f"{name}.{p}") for p in ("linear1.weight", "linear1.bias", "linear2.weight"))
    if weight is None or out is None:
        return None
    units = layer.linear1.out_features
    parts = {"w": _rows(weight), "b": _vector(bias, weight, units), "a": _linear_columns(out, units, 1)}
    return _rescale_of(key, parts, getattr(act, "__name__", type(act).__name__), [weight, bias, out],
                       [f"{name}.linear1", f"{name}.linear2"], model)


def _prenorm(norm: str, consumer: str, weight: str) -> Callable:
    """Detector of the rescale through a norm_first TransformerEncoderLayer's `norm` (LayerNorm
    (gamma, beta)), whose output only `consumer`'s `weight` reads (x + block(norm(x)))."""
    def detect(g: _Graph, name: str, layer: nn.Module, key: str, model) -> Symmetry | None:
        m, reader = getattr(layer, norm), getattr(layer, consumer)
        if not layer.norm_first or type(m) is not nn.LayerNorm or not m.elementwise_affine \
                or len(m.normalized_shape) != 1 or not getattr(reader, "_qkv_same_embed_dim", True) \
                or not _clean(g, f"{name}.{norm}", f"{name}.{consumer}"):
            return None
        gamma, beta = g.param_names.get(f"{name}.{norm}.weight"), g.param_names.get(f"{name}.{norm}.bias")
        out, units = g.param_names.get(f"{name}.{consumer}.{weight}"), m.normalized_shape[0]
        if gamma is None or out is None:
            return None
        parts = {"w": _gamma(gamma), "b": _vector(beta, gamma, units), "a": _linear_columns(out, units, 1)}
        return _rescale_of(key, parts, "identity", [gamma, beta, out], [f"{name}.{norm}", f"{name}.{consumer}"],
                           model)
    return detect


def _attention_values(g: _Graph, name: str, mha: nn.MultiheadAttention, key: str, model) -> Symmetry | None:
    """v -> out_proj of a MultiheadAttention: output = (softmax(q k^T) v) W_out^T + b_out, per value unit."""
    if mha.bias_k is not None or not _clean(g, name, f"{name}.out_proj"):  # add_bias_kv: a learned value token
        return None
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:  # in_proj_weight (3E, E): rows 2E.. are the values'
        weight = g.param_names.get(f"{name}.in_proj_weight")
        rows = lambda d: d[weight][2 * e:]  # noqa: E731
    else:
        weight = g.param_names.get(f"{name}.v_proj_weight")
        rows = _rows(weight)
    bias, out = g.param_names.get(f"{name}.in_proj_bias"), g.param_names.get(f"{name}.out_proj.weight")
    if weight is None or out is None:
        return None
    parts = {"w": rows, "b": (lambda d: d[bias][2 * e:]) if bias else _vector(None, weight, e), "a": lambda d: d[out]}
    return _rescale_of(key, parts, "attention", [weight, bias, out], [name, f"{name}.out_proj"], model)


def _translation(g: _Graph, key: str, loss: str | None, model) -> Symmetry | None:
    out = next(n for n in g.nodes if n.op == "output")
    node = out.args[0]
    if not isinstance(node, fx.Node) or len(_value_users(node)) != 1:
        return None
    shape = _shape(node)
    if shape is not None and _is_softmax(g, node, len(shape)) and isinstance(node.args[0], fx.Node):
        logits = node.args[0]
        if len(_value_users(logits)) != 1 or not _single_input(node, logits):
            return None
    elif loss == "cross_entropy":
        logits = node
    else:
        return None
    weight, bias = g.param(logits, "weight"), g.param(logits, "bias")
    if not g.usable(logits, _LINEAR) or weight is None or len(logits.args) != 1 or logits.kwargs:
        return None
    units = g.module(logits).out_features
    parts = {"w": lambda d: d[weight], "b": _vector(bias, weight, units)}
    return _make("translation", key, parts, None, [weight] + ([bias] if bias else []), [logits.target], True, model)


def _is_softmax(g: _Graph, node: fx.Node, ndim: int) -> bool:
    module = g.module(node)
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        dim = module.dim
    elif node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS \
            or node.op == "call_method" and node.target in _SOFTMAX_METHODS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    else:
        return False
    return isinstance(dim, int) and dim % ndim == ndim - 1


def find_symmetries(model: nn.Module, example_input, loss: str | None = None) -> list[Symmetry]:
    """Every symmetry of `model` the module docstring recognises, in graph order
    (rescale, scale per layer, then the translation of the logits). `example_input`:
    a tensor or a tuple of the forward's inputs. `loss="cross_entropy"`: the output is
    logits of a softmax cross-entropy over its last dim (otherwise only an explicit
    softmax in the model gives the translation symmetry). Forward hooks: a warning
    naming what is not reported because of them."""
    if loss is not None and loss not in LOSSES:
        raise L2OError(f"unknown loss {loss!r}; valid: None, {', '.join(LOSSES)}")
    if not _hooks_allow_any(model):
        return []
    g = _trace(model, example_input)
    found: list[Symmetry] = []
    for node in g.nodes:
        for detect in (_rescale, _scale):
            s = detect(g, node, str(len(found)), model)
            if s is not None:
                found.append(s)
        found += _inside(g, node, len(found), model)
    t = None if model._forward_hooks else _translation(g, str(len(found)), loss, model)  # a hook sees the logits
    return found + ([t] if t is not None else [])


def _hooks_allow_any(model: nn.Module) -> bool:
    """Warn about the forward hooks that rule symmetries out; False under global ones (no symmetry at all)."""
    if _global_hooks():
        warnings.warn(f"no symmetry reported for {type(model).__name__}: global forward hooks or pre-hooks are "
                      "registered (torch.nn.modules.module.register_module_forward_hook), and they can change "
                      "what any module computes", stacklevel=3)
        return False
    if _hooked(model):
        warnings.warn(f"no symmetry reported through modules {', '.join(map(repr, _hooked(model)))}: forward hooks "
                      "or pre-hooks can change what a module computes, and torch.fx does not see them", stacklevel=3)
    if model._forward_hooks:
        warnings.warn(f"no translation symmetry reported: a forward hook on {type(model).__name__} sees the logits",
                      stacklevel=3)
    return True


# ---- frozen copies ------------------------------------------------------------------------------
def _optimizer_copy(optimizer: torch.optim.Optimizer, scratch: Mapping[int, torch.Tensor]):
    """A copy of `optimizer` stepping the `scratch` tensors (keyed by id of the originals):
    its own state (deep copy) and param groups, no hooks; hyper-parameters and anything
    else it holds (an L2O's network) are shared read-only."""
    clone = object.__new__(type(optimizer))
    clone.__dict__.update(optimizer.__dict__)
    clone.param_groups = [{**{k: copy.deepcopy(v) for k, v in group.items() if k != "params"},
                           "params": [scratch[id(p)] for p in group["params"]]}
                          for group in optimizer.param_groups]
    clone.state = defaultdict(dict, {scratch[id(p)]: copy.deepcopy(s) for p, s in optimizer.state.items()})
    clone._optimizer_step_pre_hooks = OrderedDict()
    clone._optimizer_step_post_hooks = OrderedDict()
    return clone


def _rng_devices(model: nn.Module) -> list:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def minibatch_gradients(model: nn.Module, names: Sequence[str], loader: Iterable, loss_fn: Callable | None,
                        max_batches: int | None = None, batch_loss: Callable | None = None
                        ) -> tuple[torch.Tensor, set[str]]:
    """Gradients of each batch's loss (`batch_loss_of`) on a copy of the model: (M, P)
    flattened in `names` order, and the names that got no gradient (zeros in G)."""
    rows, unused = [], set()
    for g, missing in gradient_rows(model, names, loader, loss_fn, max_batches, batch_loss):
        rows.append(g)
        unused |= missing
    if len(rows) < 2:
        raise L2OError(f"the noise probe needs at least 2 minibatches; the loader gave {len(rows)}")
    return torch.stack(rows), unused


def batch_loss_of(model: nn.Module, batch, index: int, loss_fn: Callable | None,
                  batch_loss: Callable | None = None) -> torch.Tensor:
    """The scalar loss of one batch: `batch_loss(model, batch)`, or for a batch
    (inputs, *targets) loss_fn(model(inputs), *targets) (inputs a tuple: model(*inputs))."""
    if batch_loss is not None:
        loss = batch_loss(model, batch)
    else:
        if isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
            what = "a dict" if isinstance(batch, Mapping) else (
                f"a {len(batch)}-tuple" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
            raise L2OError(f"batch {index} is {what}; valid: (inputs, *targets) for loss_fn(output, *targets) "
                           "(inputs a tuple for a model of several inputs), or any batch with "
                           "batch_loss=lambda model, batch: <scalar loss>")
        inputs, *targets = batch
        out = model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)
        loss = loss_fn(out, *targets)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise L2OError(f"the loss of batch {index} is a {got}; valid: a scalar tensor (reduce it to the mean)")
    return loss.reshape(())


def gradient_rows(model: nn.Module, names: Sequence[str], loader: Iterable, loss_fn: Callable | None,
                  max_batches: int | None = None, batch_loss: Callable | None = None):
    """Yields, batch by batch, (g (P,) in `names` order, the names without a gradient in
    that batch: zeros in g), computed on one copy of the model."""
    frozen = copy.deepcopy(model)
    params = dict(frozen.named_parameters())
    with torch.enable_grad():
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            loss = batch_loss_of(frozen, batch, i, loss_fn, batch_loss)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            yield (torch.cat([(torch.zeros_like(params[n]) if gr is None else gr).reshape(-1)
                              for n, gr in zip(names, grads)]),
                   {n for n, gr in zip(names, grads) if gr is None})


class FrozenStep:
    """u = theta' - theta after one step of a copy of `optimizer` (its state s_t) from the
    model's current theta with a given gradient (P,) in `names` order; names in `unused`
    step with no gradient, as in the real loop. The real optimizer is only read."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, names: Sequence[str]) -> None:
        self.optimizer, self.names = optimizer, list(names)
        self.params = dict(model.named_parameters())
        self.originals = [p for group in optimizer.param_groups for p in group["params"]]
        self.scratch = {id(p): nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                        for p in self.originals}
        self.sizes = [self.params[n].numel() for n in self.names]

    def __call__(self, g: torch.Tensor, unused: set[str] = frozenset()) -> torch.Tensor:
        params, scratch = self.params, self.scratch
        with torch.no_grad():
            clone = _optimizer_copy(self.optimizer, scratch)
            for p in self.originals:
                scratch[id(p)].copy_(p)
                scratch[id(p)].grad = None
            for n, gn in zip(self.names, g.split(self.sizes)):
                if id(params[n]) in scratch and n not in unused:
                    scratch[id(params[n])].grad = gn.view_as(params[n]).clone()
            type(clone).step(clone)  # the class's step: an instance-level wrapper may hold the original
            return torch.cat([(scratch[id(params[n])] - params[n]).reshape(-1) if id(params[n]) in scratch
                              else torch.zeros(params[n].numel(), dtype=g.dtype, device=g.device)
                              for n in self.names])


def frozen_updates(optimizer: torch.optim.Optimizer, model: nn.Module, names: Sequence[str], G: torch.Tensor,
                   unused: set[str] = frozenset()) -> torch.Tensor:
    """`FrozenStep` for every gradient row of G (M, P, `names` order): (M, P)."""
    step = FrozenStep(optimizer, model, names)
    return torch.stack([step(g, unused) for g in G])


# ---- the probe ----------------------------------------------------------------------------------------
_CROSS_ENTROPY = (F.cross_entropy, torch.nn.functional.cross_entropy)


def _loss_spec(loss) -> tuple[str | None, Callable | None]:
    """attach's `loss`: (the hint for `find_symmetries`, the default loss_fn of `noise`)."""
    if loss is None:
        return None, None
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise L2OError(f"unknown loss {loss!r}; valid: None, {', '.join(map(repr, LOSSES))}, or a callable "
                           "loss_fn(output, *targets)")
        return loss, F.cross_entropy
    if isinstance(loss, nn.CrossEntropyLoss) or loss in _CROSS_ENTROPY:
        return "cross_entropy", loss  # a softmax cross-entropy over the output's last dim, whatever its options
    if callable(loss):
        return None, loss
    raise L2OError(f"loss is a {type(loss).__name__}; valid: None, 'cross_entropy', or a callable "
                   "loss_fn(output, *targets)")


def _modes(model: nn.Module) -> tuple[bool, ...]:
    return tuple(m.training for m in model.modules())


def _min_batches(estimators: Sequence[str]) -> int:
    """Minibatches `noise` needs: 4 for the per-coordinate estimator (blocks of >= 2 of the
    batches per coordinate), else 2 (a spread to centre)."""
    return 4 if "mohammadi_std" in estimators else 2


class ModelProbe:
    """Rides on a training loop through the optimizer's step hooks; see `attach`."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, example_input, out, *,
                 every: int = 1, loss: str | Callable | None = None, symmetries: Sequence[Symmetry] | None = None,
                 experiment: str = "probe", optimizee: str | None = None, optimizer_name: str | None = None,
                 seed: int = 0, overwrite: bool = False) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise L2OError(f"every={every!r}; valid: an integer >= 1 (record every that many steps)")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise L2OError(f"optimizer is a {type(optimizer).__name__}; valid: a torch.optim.Optimizer")
        self.optimizer, self.model, self.every, self.seed = optimizer, model, every, seed
        self._hint, self._loss_fn = _loss_spec(loss)
        self._example, self._detect = example_input, symmetries is None
        self.symmetries = list(find_symmetries(model, example_input, self._hint) if symmetries is None
                               else symmetries)
        self.out = prepare_out_dir(out, overwrite, flag="out")
        self.log = MetricLog(experiment, optimizee or type(model).__name__,
                             optimizer_name or type(optimizer).__name__.lower(), [seed])
        self.config = {"experiment": experiment, "optimizee": self.log.optimizee, "optimizer": self.log.optimizer,
                       "seed": seed, "every": every,
                       "loss": loss if loss is None or isinstance(loss, str) else
                       getattr(loss, "__name__", type(loss).__name__),
                       "optimizer_class": type(optimizer).__name__,
                       "optimizer_defaults": {k: repr(v) for k, v in optimizer.defaults.items()},
                       "symmetries": self._describe(self.symmetries)}
        self.step = 0  # optimizer steps taken since attaching
        self._modes = _modes(model)
        self._by_mode = {self._modes: self.symmetries}
        self._use(self.symmetries)
        self._before: dict[str, torch.Tensor] | None = None  # theta at the recorded step, until its update
        self._params: dict[str, nn.Parameter] = {}  # the model's, from the recorded step's pre-hook to its post-hook
        self._kept: dict[str, torch.Tensor] = {}  # the buffers of `_before`, kept between steps when every == 1
        self._xi: dict = {}  # the generators' norms at the recorded step: "table" (`_StepSums`), or by symmetry
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]
        # a parameter the optimizer does not step keeps its .grad (zero_grad skips it): sum
        # its gradients since the last step here instead
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._outside: dict[str, torch.Tensor] = {}
        self._outside_names = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in stepped}
        for n, p in model.named_parameters():
            if n in self._outside_names:
                self._handles.append(p.register_hook(lambda g, n=n: self._accumulate(n, g)))

    @staticmethod
    def _describe(symmetries: Sequence[Symmetry]) -> list[dict]:
        return [{"kind": s.kind, "params": list(s.params), "layers": list(s.layers), "exact": s.exact}
                for s in symmetries]

    def _use(self, symmetries: Sequence[Symmetry]) -> None:
        self.symmetries = list(symmetries)
        self._watched = list(dict.fromkeys(n for s in self.symmetries for n in s.params))
        self._fast = [_fast_parts(s) for s in self.symmetries]
        self._sums = _StepSums(self.symmetries, self._fast, {n: p.detach() for n, p in self.model.named_parameters()})
        self._rest = list(dict.fromkeys(n for s, f in zip(self.symmetries, self._fast) if f is None for n in s.params))

    def _accumulate(self, name: str, grad: torch.Tensor) -> None:
        acc = self._outside.get(name)
        self._outside[name] = grad.detach().clone() if acc is None else acc + grad.detach()

    def _check_modes(self) -> None:
        """The symmetries of the model's current train/eval modes (BatchNorm's scale symmetry
        holds only on batch statistics): re-detected once per new combination of modes."""
        modes = _modes(self.model)
        if modes == self._modes:
            return
        self._modes = modes
        if not self._detect:
            warnings.warn(f"{type(self.model).__name__}'s train/eval modes changed at step {self.step}; the "
                          "symmetries given to attach are kept (pass symmetries=None to re-detect them)",
                          stacklevel=4)
            return
        if modes not in self._by_mode:
            self._by_mode[modes] = find_symmetries(self.model, self._example, self._hint)
        found = self._by_mode[modes]
        if self._describe(found) != self._describe(self.symmetries):
            self.config.setdefault("redetected", []).append({"step": self.step, "training": self.model.training,
                                                             "symmetries": self._describe(found)})
            warnings.warn(f"{type(self.model).__name__}'s train/eval modes changed at step {self.step}; "
                          f"symmetries re-detected: {len(found)} (before: {len(self.symmetries)})", stacklevel=4)
        self._use(found)

    def _copies(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Buffers for theta before the step, one per watched parameter (reused from the last
        record while every == 1: no allocation, no page faults)."""
        kept = {}
        for n in self._watched:
            p, t = params[n], self._kept.get(n)
            if t is None or t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
                t = torch.empty(p.shape, dtype=p.dtype, device=p.device)
            kept[n] = t
        self._kept = kept
        return dict(kept)

    def _terms(self, table: torch.Tensor, v: Callable, theta: Mapping[str, torch.Tensor], xi: bool
               ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per kind, (c_k, ||v_k|| ||xi_k||) over groups of its units: `_StepSums`' table, and
        `symmetry.unit_terms` on the views of each other symmetry (v() gives the vectors); with
        `xi`, the generators' norms ||xi_k|| are computed and kept for the step's second record."""
        c = table[0, 0] + table[0, 1] - table[0, 2]
        vn = (table[1, 0] + table[1, 1] + table[1, 2]).sqrt()
        if xi:
            self._xi = {"table": (table[2, 0] + table[2, 1] + table[2, 2]).sqrt()}
        bound = vn * self._xi["table"]
        by_kind = {kind: [(c[span], bound[span])] for kind, span in self._sums.ranges.items()}
        vectors = None
        for i, s in enumerate(self.symmetries):
            if i not in self._sums.units:
                vectors = v() if vectors is None else vectors
                ci, vi, xn = symmetry.unit_terms(s.kind, s.views(vectors), s.views(theta), s.structure)
                if xi:
                    self._xi[i] = xn
                by_kind.setdefault(s.kind, []).append((ci, vi * self._xi[i]))
        return by_kind

    def _pre_step(self, optimizer, args, kwargs) -> None:
        if self.step % self.every:
            return
        self._check_modes()
        if not self._watched:
            return
        params = self._params = dict(self.model.named_parameters())  # the step keeps them (post reads it)
        before = self._before = self._copies(params)
        grads = {}
        for n in self._watched:
            g = self._outside.get(n) if n in self._outside_names or params[n].grad is None else params[n].grad.detach()
            grads[n] = torch.zeros_like(params[n]) if g is None else g
        with torch.no_grad():
            # theta is copied block by block, each read again at once for its sums while in cache
            sums = self._sums.run(before, lambda names, rows: {n: before[n][rows].copy_(params[n].detach()[rows])
                                                               for n in names},
                                  lambda names, rows: {n: grads[n][rows] for n in names}, xi=True)
            for n in self._watched:
                if n not in self._sums.names:
                    before[n].copy_(params[n].detach())
            terms = self._terms(sums, lambda: grads, before, xi=True)
        for name, value in _record_terms(terms, "grad_").items():
            self.log.add(name, self.step, value)

    def _post_step(self, optimizer, args, kwargs) -> None:
        if self._before is not None:
            params, before = self._params, self._before

            def updates(names, rows):  # u = theta_after - theta_before, into a kept buffer
                theta = {n: before[n][rows] for n in names}
                out = self._sums.scratch("update", theta, names)
                return {n: torch.sub(params[n].detach()[rows], theta[n], out=out[n]) for n in names}

            with torch.no_grad():
                sums = self._sums.run(before, lambda names, rows: {n: before[n][rows] for n in names}, updates,
                                      xi=False)
                terms = self._terms(sums, lambda: {n: params[n].detach() - before[n] for n in self._rest}, before,
                                    xi=False)
            for name, value in _record_terms(terms, "").items():
                self.log.add(name, self.step, value)
            self._before, self._xi, self._params = None, {}, {}
            if self.every > 1:  # nothing held between records
                self._kept = {}
                self._sums.release()
        self._outside.clear()
        self.step += 1

    def log_metric(self, metric: str, value) -> None:
        """Add a scalar (a training loss, an accuracy) at the current step (before its update)."""
        self.log.add(metric, self.step, float(value.detach() if isinstance(value, torch.Tensor) else value))

    def _noise_loss(self, loss_fn: Callable | None, batch_loss: Callable | None) -> Callable | None:
        if loss_fn is not None and batch_loss is not None:
            raise L2OError("both loss_fn and batch_loss given; valid: one of them")
        if batch_loss is not None:
            if not callable(batch_loss):
                raise L2OError(f"batch_loss is a {type(batch_loss).__name__}; valid: a callable (model, batch) -> loss")
            return None
        loss_fn = self._loss_fn if loss_fn is None else loss_fn
        if not callable(loss_fn):
            raise L2OError("no loss for the noise probe; valid: loss_fn(output, *targets), batch_loss(model, batch), "
                           "or a callable loss= (or 'cross_entropy') at attach")
        return loss_fn

    def noise_samples(self, loader: Iterable, loss_fn: Callable | None = None, max_batches: int | None = None, *,
                      batch_loss: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(G, U, names): minibatch gradients and frozen-state updates, (M, P) each, dense, at
        the current point (the reference `noise` streams against); model, optimizer and
        random generators are left as they were."""
        loss_fn = self._noise_loss(loss_fn, batch_loss)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=_rng_devices(self.model)):
            G, unused = minibatch_gradients(self.model, names, loader, loss_fn, max_batches, batch_loss)
            U = frozen_updates(self.optimizer, self.model, names, G, unused)
        return G, U, names

    def noise(self, loader: Iterable, loss_fn: Callable | None = None, *, max_batches: int | None = None,
              estimators: Sequence[str] = noise_mod.DEFAULT_ESTIMATORS, coordinates: int | None = None,
              batch_loss: Callable | None = None) -> dict[str, float]:
        """Tail indices of gradient and update noise (`noise.noise_alphas`, every estimator in
        `estimators`) over the loader's minibatches (the first `max_batches`), and cov_max_eig /
        cov_trace / cov_n of the update covariance over all of them; logged at the current step
        and written, with noise_coordinates (the coordinates read).

        Batches: (inputs, *targets) with loss_fn(model(inputs), *targets) (inputs a tuple:
        model(*inputs); loss_fn defaults to attach's loss), or anything with
        batch_loss(model, batch) -> scalar loss. Streamed batch by batch: each batch's
        gradient and frozen update are reduced to the kept coordinates before the next batch,
        so memory is 2 x M x K values (K = all P trainable coordinates, or `coordinates`),
        and the estimators read those rows without further copies (`noise.streamed_noise`).
        coordinates=K: a random subset of K coordinates, the same at every call of this probe
        (drawn from seeds.derive_seed('noise-coordinates', seed)); the tail indices are those
        of the subset, cov_max_eig and cov_trace those of its Gram matrix times P / K (an
        unbiased estimate of the full one). README gives the subset's measured error."""
        loss_fn = self._noise_loss(loss_fn, batch_loss)
        estimators = tuple(estimators)
        for name in estimators:
            if name not in tail.ESTIMATORS:
                raise L2OError(f"unknown tail estimator {name!r}; valid: {', '.join(tail.ESTIMATORS)}")
        need = _min_batches(estimators)
        if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                        or max_batches < need):
            raise L2OError(f"max_batches={max_batches!r}; valid: an integer >= {need} (the minimum for "
                           f"estimators {', '.join(estimators)}) or None")
        available = len(loader) if hasattr(loader, "__len__") else None
        if available is not None and available < need:
            raise L2OError(f"the noise probe needs at least {need} minibatches for estimators "
                           f"{', '.join(estimators)}; the loader has {available}")
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        P = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        keep = self._coordinates(coordinates, P)
        G_rows, U_rows = [], []
        with torch.random.fork_rng(devices=_rng_devices(self.model)):
            step = FrozenStep(self.optimizer, self.model, names)
            for g, unused in gradient_rows(self.model, names, loader, loss_fn, max_batches, batch_loss):
                u = step(g, unused)
                G_rows.append(g if keep is None else g[keep])
                U_rows.append(u if keep is None else u[keep])
        if len(G_rows) < need:
            raise L2OError(f"the noise probe needs at least {need} minibatches for estimators "
                           f"{', '.join(estimators)}; the loader gave {len(G_rows)}")
        metrics = noise_mod.streamed_noise(G_rows, U_rows, estimators)
        if keep is not None:
            metrics["cov_max_eig"] *= P / len(keep)
            metrics["cov_trace"] *= P / len(keep)
        metrics["noise_coordinates"] = float(P if keep is None else len(keep))
        for name, value in metrics.items():
            self.log.add(name, self.step, value)
        self.write()
        return metrics

    def _coordinates(self, coordinates: int | None, P: int) -> torch.Tensor | None:
        """The sorted indices of the kept coordinates, or None for all of them."""
        if coordinates is None:
            return None
        if isinstance(coordinates, bool) or not isinstance(coordinates, int) or coordinates < 2:
            raise L2OError(f"coordinates={coordinates!r}; valid: an integer >= 2 (a random subset of that many "
                           "coordinates) or None (all)")
        if coordinates >= P:
            return None
        rng = np.random.default_rng(derive_seed("noise-coordinates", self.seed))
        return torch.from_numpy(np.sort(rng.choice(P, coordinates, replace=False)))

    def write(self) -> None:
        """metrics.csv and config.json under `out` (atomic)."""
        write_run(self.out, self.config, self.log.rows())

    def close(self) -> None:
        """Remove the hooks and write the results."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._kept, self._before = {}, None
        self._sums.release()
        self.write()


def attach(optimizer: torch.optim.Optimizer, model: nn.Module, example_input, out, every: int = 1,
           **kwargs: Any) -> ModelProbe:
    """Probe a training loop: detect `model`'s symmetries on `example_input` and record each
    `every`-th step's update deviations to `out`/metrics.csv. Keywords: loss, symmetries,
    experiment, optimizee, optimizer_name, seed, overwrite (see `ModelProbe`)."""
    return ModelProbe(optimizer, model, example_input, out, every=every, **kwargs)


__all__ = ["Symmetry", "ModelProbe", "attach", "find_symmetries", "record", "minibatch_gradients",
           "gradient_rows", "batch_loss_of", "FrozenStep", "frozen_updates"]
