"""Symmetry detection on nn.Modules and the training-loop probe (l2o_dynamics.probes)."""
import copy
import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lion_pytorch import Lion
from torch import nn

from l2o_dynamics import learned, noise, probes, symmetry, tail
from l2o_dynamics.seeds import derive_seed
from l2o_dynamics.optimizees import ZOO, Optimizee
from l2o_dynamics.results import Table
from l2o_dynamics.errors import L2OError
from tolerance import reduction_atol

IMG = (1, 12, 12)  # small images keep the convolutional models fast
# A norm's eps breaks its scale symmetry by O(eps / var); torch refuses eps = 0 for BatchNorm in
# training, and 1e-30 puts the breaking far below float64 rounding.
TINY = 1e-30


# ---- hand-built models with known answers -----------------------------------------------------------
class Residual(nn.Module):
    """fc1's output feeds fc2 through ReLU *and* the skip: scaling fc1's units changes h."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.out(self.fc2(F.relu(h)) + h)


class Shared(nn.Module):
    """One Linear called twice (weight sharing across layers)."""

    def __init__(self):
        super().__init__()
        self.inp, self.fc, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.fc(self.inp(x))))))


class BiasAfterNorm(nn.Module):
    """A bias added after BatchNorm: not scaled with (gamma, beta), so no rescale through BN."""

    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 5), nn.BatchNorm1d(5, eps=TINY), nn.Linear(5, 3)
        self.shift = nn.Parameter(torch.linspace(-1, 1, 5))

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x)) + self.shift))


class FunctionalCNN(nn.Module):
    """Functional relu / max-pool and a view flatten."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 5 * 5, 10)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = self.c2(h).relu()
        return self.fc(h.view(h.shape[0], -1))


class Block(nn.Module):
    """Transformer-style block on (N, T, D): LN -> Linear -> ReLU -> Linear, residual; mean-pool head."""

    def __init__(self, d=6, hidden=8, classes=3):
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=TINY)
        self.fc1, self.fc2, self.head = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, classes)

    def forward(self, x):
        x = x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        return self.head(x.mean(1))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class FanOut(nn.Module):
    """One ReLU layer read by two heads whose outputs are summed."""

    def __init__(self):
        super().__init__()
        self.fc, self.left, self.right = nn.Linear(6, 5), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = F.relu(self.fc(x))
        return self.left(h) + self.right(h)


class Fire(nn.Module):
    """squeezenet's Fire module (squeeze 1x1 -> expand 1x1 and 3x3, concatenated) and a classifier."""

    def __init__(self):
        super().__init__()
        self.squeeze, self.expand1, self.expand3 = nn.Conv2d(1, 2, 1), nn.Conv2d(2, 3, 1), nn.Conv2d(2, 4, 3, padding=1)
        self.out, self.fc = nn.Conv2d(7, 4, 3, stride=2), nn.Linear(4 * 5 * 5, 10)

    def forward(self, x):
        h = F.relu(self.squeeze(x))
        h = torch.cat([F.relu(self.expand1(h)), F.relu(self.expand3(h))], 1)  # (N, 3 + 4, 12, 12)
        return self.fc(torch.flatten(F.relu(self.out(h)), 1))


class TokenMean(nn.Module):
    """(N, T, D) -> Linear -> ReLU -> mean over tokens -> head."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc(x)).mean(1))


class Encoder(nn.Module):
    """torch.nn.TransformerEncoder (a leaf for fx), mean over tokens, head."""

    def __init__(self, activation="relu"):
        super().__init__()
        layer = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, activation=activation, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class PreNormEncoder(nn.Module):
    """A pre-norm (GPT-style) torch.nn.TransformerEncoderLayer, LeakyReLU feed-forward."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(6, 2, 8, dropout=0.0, activation=nn.LeakyReLU(0.1), batch_first=True,
                                              norm_first=True, layer_norm_eps=TINY)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class Attention(nn.Module):
    """torch.nn.MultiheadAttention with keys and values of another size (v_proj_weight), and a head."""

    def __init__(self):
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(6, 2, batch_first=True, kdim=4, vdim=4), nn.Linear(6, 3)

    def forward(self, x):
        kv = x[..., :4]
        return self.head(self.att(x, kv, kv, need_weights=False)[0].mean(1))


def mlp(*act, d=6, h=5):
    return nn.Sequential(nn.Linear(d, h), *act, nn.Linear(h, 3))


def cnn(*mid, pool=()):
    side = 5 if pool else 10  # 12 -> conv(3) -> 10 -> [pool 2 -> 5] -> conv(3, padding 1) keeps it
    return nn.Sequential(nn.Conv2d(1, 3, 3), *mid, *pool, nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * side * side, 10))


def frozen_first():
    m = mlp(nn.ReLU())
    m[0].bias.requires_grad_(False)
    return m


def evaluated(m):
    return m.eval()


def frozen_norm(m, index):
    m[index].requires_grad_(False)
    return m


R, S, T = "rescale", "scale", "translation"
# name: (builder, input shape, loss hint, expected {(kind, modules)})
MODELS = {
    "relu_mlp": (lambda: mlp(nn.ReLU()), (6,), "cross_entropy", {(R, ("0", "2")), (T, ("2",))}),
    "leaky_dropout_mlp": (lambda: mlp(nn.LeakyReLU(0.2), nn.Dropout(0.3)), (6,), "cross_entropy",
                          {(R, ("0", "3")), (T, ("3",))}),
    "bias_free_mlp": (lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False)),
                      (6,), "cross_entropy", {(R, ("0", "2")), (T, ("2",))}),
    "identity_mlp": (lambda: mlp(), (6,), None, {(R, ("0", "1"))}),
    "tanh_mlp": (lambda: mlp(nn.Tanh()), (6,), "cross_entropy", {(T, ("2",))}),
    "sigmoid_mlp": (lambda: mlp(nn.Sigmoid()), (6,), "cross_entropy", {(T, ("2",))}),
    "gelu_mlp": (lambda: mlp(nn.GELU()), (6,), "cross_entropy", {(T, ("2",))}),
    "relu6_mlp": (lambda: mlp(nn.ReLU6()), (6,), None, set()),
    "softmax_head": (lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(-1)),
                     (6,), None, {(T, ("2",))}),
    "softmax_over_batch": (lambda: nn.Sequential(nn.Linear(6, 3), nn.Softmax(0)), (6,), None, set()),
    "linear_bn_mlp": (lambda: mlp(nn.BatchNorm1d(5, eps=TINY), nn.ReLU()), (6,), "cross_entropy",
                      {(S, ("0", "1")), (R, ("1", "3")), (T, ("3",))}),
    "linear_bn_eval": (lambda: evaluated(mlp(nn.BatchNorm1d(5), nn.ReLU())), (6,), None, {(R, ("1", "3"))}),
    "layernorm_mlp": (lambda: mlp(nn.LayerNorm(5, eps=TINY), nn.ReLU()), (6,), None,
                      {(S, ("0", "1")), (R, ("1", "3"))}),
    "bias_after_bn": (BiasAfterNorm, (6,), None, {(S, ("fc1", "bn"))}),
    "residual": (Residual, (6,), None, set()),
    "weight_sharing": (Shared, (6,), None, set()),
    "frozen_bias": (frozen_first, (6,), None, set()),
    "cnn": (lambda: cnn(nn.ReLU()), IMG, "cross_entropy", {(R, ("0", "2")), (R, ("2", "5")), (T, ("5",))}),
    "cnn_maxpool": (lambda: cnn(nn.ReLU(), pool=(nn.MaxPool2d(2),)), IMG, None, {(R, ("0", "3")), (R, ("3", "6"))}),
    "cnn_avgpool": (lambda: cnn(nn.ReLU(), pool=(nn.AvgPool2d(2),)), IMG, None, {(R, ("0", "3")), (R, ("3", "6"))}),
    "cnn_tanh": (lambda: cnn(nn.Tanh()), IMG, None, {(R, ("2", "5"))}),
    "conv_bn": (lambda: cnn(nn.BatchNorm2d(3, eps=TINY), nn.ReLU()), IMG, "cross_entropy",
                {(S, ("0", "1")), (R, ("1", "3")), (R, ("3", "6")), (T, ("6",))}),
    "conv_layernorm": (lambda: cnn(nn.LayerNorm([3, 10, 10], eps=TINY), nn.ReLU()), IMG, None,
                       {(S, ("0", "1")), (R, ("3", "6"))}),
    "conv_bn_eval": (lambda: evaluated(cnn(nn.BatchNorm2d(3), nn.ReLU())), IMG, None,
                     {(R, ("1", "3")), (R, ("3", "6"))}),
    "functional_cnn": (FunctionalCNN, IMG, "cross_entropy", {(R, ("c1", "c2")), (R, ("c2", "fc")), (T, ("fc",))}),
    "transformer_block": (Block, (4, 6), "cross_entropy", {(R, ("ln", "fc1")), (R, ("fc1", "fc2")), (T, ("head",))}),
    # the BN's frozen (gamma, beta) take no part in the conv's scale symmetry; the rescale through them is gone
    "conv_frozen_bn": (lambda: frozen_norm(cnn(nn.BatchNorm2d(3, eps=TINY), nn.ReLU()), 1), IMG, "cross_entropy",
                       {(S, ("0", "1")), (R, ("3", "6")), (T, ("6",))}),
    "cnn_prelu": (lambda: cnn(nn.PReLU(3)), IMG, None, {(R, ("0", "2")), (R, ("2", "5"))}),
    "fan_out": (FanOut, (6,), None, {(R, ("fc", "left", "right"))}),
    "fire": (Fire, IMG, "cross_entropy", {(R, ("squeeze", "expand1", "expand3")), (R, ("expand1", "out")),
                                          (R, ("expand3", "out")), (R, ("out", "fc")), (T, ("fc",))}),
    "rmsnorm_mlp": (lambda: mlp(nn.RMSNorm(5, eps=TINY), nn.ReLU()), (6,), None, {(S, ("0", "1")), (R, ("1", "3"))}),
    "token_mean": (TokenMean, (4, 6), None, {(R, ("fc", "head"))}),
    "transformer_encoder": (Encoder, (4, 6), None, {
        (R, (f"enc.layers.{i}.linear1", f"enc.layers.{i}.linear2")) for i in range(2)} | {
        (R, (f"enc.layers.{i}.self_attn", f"enc.layers.{i}.self_attn.out_proj")) for i in range(2)}),
    "transformer_encoder_gelu": (lambda: Encoder("gelu"), (4, 6), None, {
        (R, (f"enc.layers.{i}.self_attn", f"enc.layers.{i}.self_attn.out_proj")) for i in range(2)}),
    "prenorm_encoder_layer": (PreNormEncoder, (4, 6), None, {
        (R, ("enc.linear1", "enc.linear2")), (R, ("enc.self_attn", "enc.self_attn.out_proj")),
        (R, ("enc.norm1", "enc.self_attn")), (R, ("enc.norm2", "enc.linear1"))}),
    "attention_vdim": (Attention, (4, 6), None, {(R, ("att", "att.out_proj"))}),
}


def build(name, dtype=torch.float64, n=16):
    make, shape, loss, _ = MODELS[name]
    torch.manual_seed(0)
    model = make().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 10 if shape == IMG else 3, (n,), generator=g)
    return model, x, y, loss


def gradient(model, x, y):
    loss = F.cross_entropy(model(x), y)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip([n for n, _ in named], torch.autograd.grad(loss, [p for _, p in named])))


@pytest.mark.parametrize("name", list(MODELS))
def test_detection_finds_exactly_the_known_symmetries(name):
    model, x, _, loss = build(name)
    found = {(s.kind, s.layers) for s in probes.find_symmetries(model, x, loss)}
    assert found == MODELS[name][3]


@pytest.mark.parametrize("name", [n for n in MODELS if MODELS[n][3]])
def test_the_loss_gradient_lies_on_every_detected_constraint(name):
    """In float64, rel = sum_k |c_k| / sum_k ||g_k|| ||xi_k|| of the gradient is rounding
    (each c_k is a reduction over at most P terms, P = #parameters); a random vector is far off."""
    model, x, y, loss = build(name)
    grads = gradient(model, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tol = reduction_atol(torch.float64, sum(p.numel() for p in params.values()), 1.0)
    g = torch.Generator().manual_seed(2)
    rand = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    for s in probes.find_symmetries(model, x, loss):
        c, vnorm, xnorm = s.unit_terms(grads)
        assert float((vnorm * xnorm).sum()) > 0  # the bound is not trivially zero
        assert float(s.measures(grads)["rel"]) < tol, (s.kind, s.layers)
        assert float(s.measures(rand)["rel"]) > 1e-3, (s.kind, s.layers)


def act(model, sym, factors):
    """Apply `sym`'s group action in place: per unit k, w_k and b_k times factors[k] > 0 and (rescale)
    a_k divided by it. Which entries are unit k's is read off the symmetry's own views, by pushing
    each parameter entry's index (1, 2, ...; 0 = a missing bias) through them."""
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in sym.params]
    starts = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    index = {n: torch.arange(st, st + size, dtype=torch.float64).reshape(params[n].shape)
             for n, st, size in zip(sym.params, starts, sizes)}
    views = sym.views(index)
    (layer,) = sym.structure.hidden
    mult = torch.ones(1 + sum(sizes), dtype=torch.float64)
    for k, f in enumerate(factors):
        mult[views[layer.weight][k].long()] *= f
        mult[views[layer.bias][k].long()] *= f
        if sym.kind == "rescale":
            mult[views[layer.out_weight][:, k].long()] /= f
    with torch.no_grad():
        for n, st, size in zip(sym.params, starts, sizes):
            params[n].mul_(mult[st:st + size].reshape(params[n].shape).to(params[n].dtype))


def output(model, x):
    torch.manual_seed(3)  # the same dropout masks
    with torch.no_grad():
        return model(x)


def changed_by(model, sym, x, seed=6):
    """max |f_{theta'}(x) - f_theta(x)| / max |f_theta(x)| for theta' = sym's action with random factors
    in [0.5, 2] (on a copy of the model)."""
    units = sym.unit_terms({n: torch.zeros_like(p) for n, p in model.named_parameters()})[0].shape[-1]
    factors = 0.5 * 4 ** torch.rand(units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    moved = copy.deepcopy(model)
    act(moved, sym, factors)
    before = output(model, x)
    return float((output(moved, x) - before).abs().max() / before.abs().max())


@pytest.mark.parametrize("name", [n for n in MODELS if {k for k, _ in MODELS[n][3]} - {T}])
def test_every_detected_rescale_and_scale_leaves_the_output_unchanged_under_a_finite_action(name):
    """The finite group action, not only its generator: each unit scaled by its own factor in [0.5, 2]
    changes the float64 output by rounding only (P-term reductions, P = #parameters)."""
    model, x, _, loss = build(name)
    tol = reduction_atol(torch.float64, sum(p.numel() for p in model.parameters()), 1.0)
    for s in probes.find_symmetries(model, x, loss):
        if s.kind != T:
            assert changed_by(model, s, x) < tol, (s.kind, s.layers)


# a rejected model, and a twin with the same parameters whose symmetries the rejected one lacks
TWINS = {
    "tanh_mlp": "relu_mlp", "sigmoid_mlp": "relu_mlp", "gelu_mlp": "relu_mlp", "cnn_tanh": "cnn",
    "linear_bn_eval": "linear_bn_mlp", "residual": None, "transformer_encoder_gelu": "transformer_encoder",
}


def _residual_without_skip():
    class NoSkip(Residual):
        def forward(self, x):
            return self.out(self.fc2(F.relu(self.fc1(x))))

    return NoSkip


@pytest.mark.parametrize("rejected", list(TWINS))
def test_constraints_the_detector_rejects_are_violated_by_the_gradient(rejected):
    """Evaluate the twin's extra constraints on the rejected model's gradient (same parameters):
    far from zero, so reporting them would be a false positive."""
    model, x, y, loss = build(rejected)
    if TWINS[rejected] is None:
        twin = _residual_without_skip()().double()
    else:
        twin = build(TWINS[rejected])[0]
    twin.load_state_dict(model.state_dict())
    twin.train(model.training)
    if rejected == "linear_bn_eval":
        twin.train()  # detected in training mode, evaluated on the eval-mode model
    kept = {(s.kind, s.layers) for s in probes.find_symmetries(model, x, loss)}
    extra = [s for s in probes.find_symmetries(twin, x, loss) if (s.kind, s.layers) not in kept]
    assert extra
    grads = gradient(model, x, y)
    params = {n: p.detach() for n, p in model.named_parameters()}
    assert all(float(s.measures(grads, params)["rel"]) > 1e-3 for s in extra), [s.layers for s in extra]


def _plus_half(module, inputs, out):
    return out + 0.5


HOOKS = {  # a model, and a hook that changes what it computes where fx does not look
    "forward_hook_on_the_activation": (lambda: mlp(nn.ReLU()), lambda m: m[1].register_forward_hook(_plus_half)),
    "pre_hook_on_the_consumer": (lambda: mlp(nn.ReLU()),
                                 lambda m: m[2].register_forward_pre_hook(lambda mod, inputs: (inputs[0] + 0.5,))),
    "forward_hook_on_a_block": (lambda: nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Linear(5, 3)),
                                lambda m: m[0].register_forward_hook(_plus_half)),
    "global_forward_hook": (lambda: mlp(nn.ReLU()), lambda m: torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inputs, out: out + 0.5 if isinstance(mod, nn.ReLU) else None)),
}


@pytest.mark.parametrize("case", list(HOOKS))
def test_no_symmetry_is_reported_through_forward_hooks_and_the_hooked_output_breaks_it(case):
    make, hook = HOOKS[case]
    torch.manual_seed(0)
    model, x = make().double(), torch.randn(16, 6, dtype=torch.float64)
    (sym,) = probes.find_symmetries(copy.deepcopy(model), x)  # the same parameters without the hook
    handle = hook(model)
    try:
        with pytest.warns(UserWarning, match="no symmetry reported"):
            assert probes.find_symmetries(model, x) == []
        assert changed_by(model, sym, x) > 1e-3  # reporting it would have been false
    finally:
        handle.remove()


def test_a_forward_hook_on_the_model_drops_only_the_translation():
    torch.manual_seed(0)
    model, x = mlp(nn.ReLU()).double(), torch.randn(16, 6, dtype=torch.float64)
    model.register_forward_hook(lambda mod, inputs, out: out * torch.tensor([1.0, 2.0, 3.0], dtype=out.dtype))
    with pytest.warns(UserWarning, match="no translation symmetry reported: a forward hook on Sequential"):
        found = probes.find_symmetries(model, x, "cross_entropy")
    assert [(s.kind, s.layers) for s in found] == [(R, ("0", "2"))]
    before = F.log_softmax(output(model, x), -1)
    with torch.no_grad():
        model[2].bias += 1.0  # the translation's action: every logit + 1 before the hook
    assert float((F.log_softmax(output(model, x), -1) - before).abs().max()) > 1e-3


POOLS = {  # a pool of the wrong dimensionality pools across channels; its twin of the right one does not
    "maxpool2d_on_conv1d": (nn.Conv1d, nn.MaxPool2d(3, 1, 1), nn.MaxPool1d(3, 1, 1), (2, 8)),
    "avgpool3d_on_conv2d": (nn.Conv2d, nn.AvgPool3d(3, 1, 1), nn.AvgPool2d(3, 1, 1), (2, 8, 8)),
}


@pytest.mark.parametrize("case", list(POOLS))
def test_a_pool_whose_dims_do_not_match_its_input_breaks_the_rescale(case):
    conv, wrong, right, shape = POOLS[case]
    torch.manual_seed(0)
    model = nn.Sequential(conv(2, 4, 3), nn.ReLU(), wrong, conv(4, 3, 3)).double()
    twin = copy.deepcopy(model)
    twin[2] = right
    x = torch.randn(4, *shape, dtype=torch.float64)
    assert probes.find_symmetries(model, x) == []
    (sym,) = probes.find_symmetries(twin, x)
    assert sym.layers == ("0", "3") and changed_by(twin, sym, x) < 1e-12
    assert changed_by(model, sym, x) > 1e-3


def test_an_unbatched_input_puts_a_convs_units_on_axis_0():
    """Conv1d on (C, L) = (2, 6) gives (4, 4): a Linear(4, 3) reads the length dim, not the channels,
    so pairing channel k with the Linear's column k (units on axis 1) is no symmetry."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Linear(4, 3)).double(), torch.randn(2, 6).double()
    assert probes.find_symmetries(model, x) == []
    before, f = output(model, x), torch.tensor([0.5, 2.0, 1.5, 0.8], dtype=torch.float64)
    with torch.no_grad():
        model[0].weight *= f[:, None, None]
        model[0].bias *= f
        model[2].weight /= f
    assert float((output(model, x) - before).abs().max()) > 1e-3


def test_an_unbatched_input_keeps_a_cnns_symmetries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                          nn.Flatten(0), nn.Linear(4 * 5 * 5, 10)).double()
    x, y = torch.randn(*IMG, dtype=torch.float64), torch.tensor(3)
    found = probes.find_symmetries(model, x, "cross_entropy")
    assert {(s.kind, s.layers) for s in found} == {(R, ("0", "3")), (R, ("3", "6")), (T, ("6",))}
    grads = gradient(model, x, y)
    tol = reduction_atol(torch.float64, sum(p.numel() for p in model.parameters()), 1.0)
    for s in found:
        assert float(s.measures(grads)["rel"]) < tol
        assert s.kind == T or changed_by(model, s, x) < tol


def test_a_learned_value_token_breaks_the_attention_value_rescale():
    """add_bias_kv appends bias_v to the values, which the rescale of the value projection does not scale."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, 6, dtype=torch.float64)
    model, twin = Attention().double(), Attention().double()
    model.att = nn.MultiheadAttention(6, 2, batch_first=True, kdim=4, vdim=4, add_bias_kv=True).double()
    twin.load_state_dict(model.state_dict(), strict=False)  # all but bias_k, bias_v
    assert probes.find_symmetries(model, x) == []
    (sym,) = probes.find_symmetries(twin, x)
    assert changed_by(twin, sym, x) < 1e-12 and changed_by(model, sym, x) > 1e-3


def test_batchnorm_eps_makes_the_scale_symmetry_inexact():
    model = mlp(nn.BatchNorm1d(5), nn.ReLU()).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    found = {s.kind: s.exact for s in probes.find_symmetries(model, x)}
    assert found == {"scale": False, "rescale": True}


class RangeOverBatch(nn.Module):
    """A Python loop over a shape: fx's proxies are not integers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return torch.stack([self.fc(x[i]) for i in range(x.shape[0])])


UNTRACEABLE = {
    "branchy": (Branchy, (4, 6), r"cannot trace Branchy with torch.fx .*branches on a tensor"),
    "range_over_a_shape": (RangeOverBatch, (4, 6), r"cannot trace RangeOverBatch.*shape or value as a Python number"),
    "torch_nn_transformer_as_the_model": (lambda: nn.TransformerEncoderLayer(6, 2, 8, batch_first=True), (4, 5, 6),
                                          r"TransformerEncoderLayer checks its inputs in Python \(fast-path checks\)"
                                          r".*inside a module of yours"),
    "compiled": (lambda: torch.compile(mlp(nn.ReLU())), (4, 6), r"torch.compile'd model.*model._orig_mod"),
}


@pytest.mark.parametrize("case", list(UNTRACEABLE))
def test_an_untraceable_model_gets_a_one_line_error_naming_the_cause(case, capfd):
    make, shape, match = UNTRACEABLE[case]
    with pytest.raises(L2OError, match=match) as e:
        probes.find_symmetries(make(), torch.randn(*shape))
    assert "\n" not in str(e.value)
    assert capfd.readouterr().err == ""  # no fx traceback before it


def test_detection_leaves_the_model_untouched():
    model, x, _, _ = build("conv_bn")
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    probes.find_symmetries(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())


def test_signed_deviation_by_hand_on_a_tiny_network():
    """The numbers of test_symmetry.test_measures_by_hand_on_a_tiny_layer, found by detection."""
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    theta = {"0.weight": torch.tensor([[1., 2., 0.], [0., 1., 1.]]), "0.bias": torch.tensor([1., -1.]),
             "2.weight": torch.tensor([[1., 0.], [2., 1.]]), "2.bias": torch.tensor([0., 0.])}
    v = {"0.weight": torch.tensor([[1., 0., 0.], [0., 0., 1.]]), "0.bias": torch.tensor([1., 4.]),
         "2.weight": torch.tensor([[0., 3.], [1., 0.]]), "2.bias": torch.tensor([1., 2.])}
    model.load_state_dict(theta)
    rescale, translation = probes.find_symmetries(model, torch.zeros(2, 3), "cross_entropy")
    # unit 0: 1 + 1 - <(0, 1), (1, 2)> = 0;  unit 1: 1 - 4 - <(3, 0), (0, 1)> = -3
    assert rescale.deviation(v).item() == -3.0 and rescale.measures(v)["total"].item() == 3.0
    # output-weight columns sum to 1 and 3, the bias to 3
    assert translation.deviation(v, theta).item() == 7.0


def test_a_batchnorm_model_given_one_example_gets_a_one_line_error(capfd):
    with pytest.raises(L2OError, match=r"on example_input \(ValueError: Expected more than 1 value.*at least 2"):
        probes.find_symmetries(mlp(nn.BatchNorm1d(5)), torch.zeros(1, 6))
    assert capfd.readouterr().err == ""  # fx's ShapeProp would print the model's traceback here


def test_vectors_missing_a_parameter_are_an_error():
    model, x, y, loss = build("relu_mlp")
    s = probes.find_symmetries(model, x, loss)[0]
    with pytest.raises(L2OError, match="vectors lack 2.weight"):
        s.deviation({"0.weight": torch.zeros(5, 6), "0.bias": torch.zeros(5)})


# ---- the probe's numbers equal the zoo's declared-structure numbers --------------------------------------
class ZooNet(nn.Module):
    """An optimizees.Optimizee as an nn.Module with the same parameter names."""

    def __init__(self, spec: Optimizee):
        super().__init__()
        self.spec = spec
        sizes = spec.sizes
        for i in range(len(sizes) - 1):
            setattr(self, f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
            if spec.batchnorm and i < len(sizes) - 2:
                setattr(self, f"bn{i + 1}", nn.BatchNorm1d(sizes[i + 1], eps=spec.bn_eps))
        self.act = {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid()}[spec.activation]

    def forward(self, x):
        n = len(self.spec.hidden_sizes)
        for i in range(1, n + 1):
            x = getattr(self, f"fc{i}")(x)
            if self.spec.batchnorm:
                x = getattr(self, f"bn{i}")(x)
            x = self.act(x)
        return getattr(self, f"fc{n + 1}")(x)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "bn_relu", "sigmoid_2x20", "relu_100x100"])
def test_probe_numbers_equal_the_zoo_on_our_mlps(name):
    spec = ZOO[name]
    params = spec.init(torch.Generator().manual_seed(3), dtype=torch.float64)
    net = ZooNet(spec).double()
    net.load_state_dict(params, strict=False)
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(32, 784, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g)
    _, zoo_grads, _ = spec.loss_and_grad(params, x, y)
    grads = gradient(net, x, y)
    syms = probes.find_symmetries(net, x, "cross_entropy")
    assert tuple(dict.fromkeys(s.kind for s in sorted(syms, key=lambda s: symmetry.KINDS.index(s.kind)))) \
        == symmetry.applicable(spec.structure)
    tol = reduction_atol(torch.float64, spec.num_params, 1.0)
    for n in params:  # the module is the zoo's model
        assert torch.allclose(grads[n], zoo_grads[n], rtol=0, atol=tol)
    updates = {n: 0.01 * grads[n] + 1e-3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
               for n, p in params.items()}  # an update off the constraints
    ours = probes.record(syms, updates, params)
    zoo = symmetry.record(updates, params, spec.structure)
    assert ours.keys() == zoo.keys()
    for k in zoo:
        assert torch.allclose(ours[k], zoo[k], rtol=tol, atol=0), (k, ours[k], zoo[k])


# ---- the probe on a training loop, with every optimizer -----------------------------------------------
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "lion": lambda ps: Lion(ps, lr=1e-3, weight_decay=0.1),
    "l2o": lambda ps: learned.L2OOptimizer(ps, learned.pretrained("leaky_relu")),
}


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 10))


def batches(n=6, size=8, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *IMG, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def train(model, opt, data, probe=None):
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if probe is not None:
            probe.log_metric("train_loss", loss)
        opt.step()


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_the_probe_records_every_step_without_changing_the_training(opt, tmp_path):
    data = batches()
    plain, probed = small_cnn(), small_cnn()
    opt_plain, opt_probed = OPTIMIZERS[opt](plain.parameters()), OPTIMIZERS[opt](probed.parameters())
    train(plain, opt_plain, data)
    probe = probes.attach(opt_probed, probed, data[0][0], tmp_path / "run", every=2, loss="cross_entropy")
    train(probed, opt_probed, data, probe)
    probe.close()
    for a, b in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(a, b)
    t = Table.read(tmp_path / "run" / "metrics.csv")
    for kind in ("rescale", "scale", "translation"):
        assert list(t.where(metric=f"{kind}_deviation").matrix()[0]) == [0, 2, 4]
        assert len(t.where(metric=f"grad_{kind}_deviation_rel")) == 3
    assert len(t.where(metric="train_loss")) == len(data)


@pytest.mark.parametrize("opt,on", [("sgd", True), ("adam", False)])
def test_recorded_updates_lie_on_the_constraints_for_sgd_only(opt, on, tmp_path):
    """SGD without momentum applies -lr * g, on every constraint (float64); Adam's are off them."""
    model = small_cnn().double()
    data = [(x.double(), y) for x, y in batches(3)]
    probe = probes.attach(OPTIMIZERS[opt](model.parameters()), model, data[0][0], tmp_path / opt,
                          loss="cross_entropy")
    train(model, probe.optimizer, data)
    probe.close()
    t = Table.read(tmp_path / opt / "metrics.csv")
    # BatchNorm's eps breaks the scale symmetry by O(eps / var): check rescale and translation
    rel = max(t.where(metric=[f"{k}_deviation_rel" for k in ("rescale", "translation")]).cols["value"])
    tol = reduction_atol(torch.float64, sum(p.numel() for p in model.parameters()), 1.0)
    assert (rel < tol) if on else (rel > 1e-3), rel


def _snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), {n: p.grad.clone() for n, p in model.named_parameters()},
            copy.deepcopy(opt.state_dict()), torch.get_rng_state())


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_the_noise_probe_leaves_model_optimizer_and_rng_bit_identical(opt, tmp_path):
    model = small_cnn()
    model[4] = nn.Sequential(nn.Dropout(0.2), nn.Flatten())  # the probe's forward passes draw random masks
    optimizer = OPTIMIZERS[opt](model.parameters())
    data = batches(8)
    probe = probes.attach(optimizer, model, data[0][0], tmp_path / "run")
    train(model, optimizer, data[:3], probe)  # optimizer state is non-trivial now, grads are set
    before = _snapshot(model, optimizer)
    probe.noise(data, lambda out, y: F.cross_entropy(out, y))
    after = _snapshot(model, optimizer)
    assert all(_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_frozen_updates_equal_a_real_step_from_the_same_state(opt, tmp_path):
    model = small_cnn()
    optimizer = OPTIMIZERS[opt](model.parameters())
    data = batches(5)
    train(model, optimizer, data[:2])
    probe = probes.attach(optimizer, model, data[0][0], tmp_path / "run")
    G, U, names = probe.noise_samples(data[2:], lambda out, y: F.cross_entropy(out, y))
    params = dict(model.named_parameters())
    sizes = [params[n].numel() for n in names]
    before = {n: params[n].detach().clone() for n in names}
    for n, gn in zip(names, G[1].split(sizes)):  # the real optimizer, given minibatch 1's gradient
        params[n].grad = gn.view_as(params[n]).clone()
    optimizer.step()
    real = torch.cat([(params[n].detach() - before[n]).reshape(-1) for n in names])
    assert torch.equal(real, U[1])


def test_sgd_frozen_updates_are_minus_lr_times_the_minibatch_gradients(tmp_path):
    model = small_cnn().double()
    data = [(x.double(), y) for x, y in batches(4)]
    probe = probes.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, data[0][0], tmp_path / "run")
    G, U, _ = probe.noise_samples(data, lambda out, y: F.cross_entropy(out, y))
    # theta - 0.1 g - theta rounds once in float64 per coordinate
    assert torch.allclose(U, -0.1 * G, rtol=0, atol=reduction_atol(torch.float64, 2, 1.0))
    # the gradients are those of each minibatch at the frozen point
    x, y = data[2]
    ref = gradient(model, x, y)
    assert torch.allclose(G[2], torch.cat([g.reshape(-1) for g in ref.values()]), rtol=0,
                          atol=reduction_atol(torch.float64, 8 * 100, 1.0))


def test_noise_metrics_are_written_and_the_covariance_eigenvalue_matches_a_dense_one(tmp_path):
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(12)
    probe = probes.attach(optimizer, model, data[0][0], tmp_path / "run")
    train(model, optimizer, data[:2], probe)
    loss_fn = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    metrics = probe.noise(data, loss_fn)
    _, U, _ = probe.noise_samples(data, loss_fn)
    U = U.double()
    dense = torch.linalg.eigvalsh(torch.cov(U.T, correction=0))[-1]  # K = (1/N) sum (u - mean)(u - mean)^T
    assert metrics["cov_max_eig"] == pytest.approx(float(dense), rel=1e-6)
    assert {"alpha_grad_pub", "alpha_grad", "alpha_grad_std", "alpha_update_pub", "alpha_update",
            "alpha_update_std", "cov_trace", "cov_n"} <= metrics.keys()
    t = Table.read(tmp_path / "run" / "metrics.csv")
    assert set(t.where(step=2).unique("metric")) == set(metrics)


def test_probe_output_plots_with_the_projects_plot_command(tmp_path):
    from l2o_dynamics.plotting import plot_dir

    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(3)
    probe = probes.attach(optimizer, model, data[0][0], tmp_path / "runs" / "sgd")
    train(model, optimizer, data, probe)
    probe.close()
    assert all(p.stat().st_size > 0 for p in plot_dir(tmp_path / "runs"))


def test_bad_probe_arguments_are_one_line_errors(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(L2OError, match="every=0; valid: an integer >= 1"):
        probes.attach(opt, model, batches(1)[0][0], tmp_path / "a", every=0)
    with pytest.raises(L2OError, match="unknown loss 'mse'"):
        probes.attach(opt, model, batches(1)[0][0], tmp_path / "b", loss="mse")
    probe = probes.attach(opt, model, batches(1)[0][0], tmp_path / "c")
    with pytest.raises(L2OError, match="at least 2 minibatches"):
        probe.noise(batches(1), lambda out, y: F.cross_entropy(out, y), estimators=("mohammadi",))


# ---- noise at research scale: streamed, on a subset of coordinates, any batch -----------------------------
def _dense(G, U, estimators=tuple(tail.ESTIMATORS)):
    out = noise.noise_alphas(G, U, estimators)
    cov = tail.top_eigenvalue_gram(U)
    return {**out, "cov_max_eig": cov["max_eig"], "cov_trace": cov["trace"]}


def _close(a, b, n):
    """Equal up to the order of float64 reductions over n terms: each alpha is 1 / a difference
    of means of logs (|log| < 40 here), the covariance sums n squares."""
    assert a.keys() <= b.keys()
    for k in a:
        scale = max(abs(a[k]), 1.0) ** 2 * 40 if k.startswith("alpha") else abs(a[k])
        assert b[k] == pytest.approx(a[k], rel=0, abs=reduction_atol(torch.float64, n, scale)), k


def test_streamed_noise_equals_the_dense_estimators_with_carries_across_pieces(monkeypatch):
    """Pieces of 997 samples: block sums and the per-coordinate blocks straddle pieces and rows;
    flat columns, exact zeros and heavy tails exercise every branch of the centring."""
    monkeypatch.setattr(noise, "STREAM_PIECE", 997)
    g = torch.Generator().manual_seed(0)
    M, P = 8, 3001
    G = torch.distributions.StudentT(1.5).sample((M, P)).double()
    G[:, :50] = 0.3
    G[:3, 60:70] = 0.0
    U = -0.1 * G + 0.01 * torch.randn(M, P, generator=g, dtype=torch.float64)
    ref = _dense(G, U)
    ours = noise.streamed_noise(list(G.clone()), list(U.clone()), tuple(tail.ESTIMATORS))
    _close(ref, ours, M * P)
    assert ours["cov_n"] == M


def test_the_probes_streamed_noise_equals_the_dense_result_on_its_own_samples(tmp_path):
    model = small_cnn().double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [(x.double(), y) for x, y in batches(8)]
    probe = probes.attach(optimizer, model, data[0][0], tmp_path / "run", loss="cross_entropy")
    train(model, optimizer, data[:2])
    G, U, _ = probe.noise_samples(data)
    ours = probe.noise(data, estimators=tuple(tail.ESTIMATORS))
    _close(_dense(G, U), ours, G.numel())
    assert ours["noise_coordinates"] == G.shape[1]


def test_a_coordinate_subset_is_the_dense_estimators_on_those_columns_drawn_from_the_seed(tmp_path):
    model = small_cnn().double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = [(x.double(), y) for x, y in batches(6)]
    probe = probes.attach(optimizer, model, data[0][0], tmp_path / "run", seed=7, loss=F.cross_entropy)
    train(model, optimizer, data[:2])
    G, U, _ = probe.noise_samples(data)
    P, K = G.shape[1], 100
    keep = np.sort(np.random.default_rng(derive_seed("noise-coordinates", 7)).choice(P, K, replace=False))
    ours = probe.noise(data, coordinates=K)
    ref = _dense(G[:, keep], U[:, keep], noise.DEFAULT_ESTIMATORS)
    ref["cov_max_eig"] *= P / K  # the subset's Gram matrix, scaled to estimate the full one
    ref["cov_trace"] *= P / K
    _close(ref, ours, G.numel())
    assert ours["noise_coordinates"] == K
    assert probe.noise(data, coordinates=P + 1)["noise_coordinates"] == P  # more than P: all of them


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 5), nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x, z):
        return self.out(torch.relu(self.a(x) + self.b(z)))


def test_noise_reads_weighted_dict_and_multi_input_batches_alike(tmp_path):
    """(x, y, w), ((x, z), y) and dict batches with batch_loss give the same gradients."""
    torch.manual_seed(0)
    model = TwoInputs().double()
    g = torch.Generator().manual_seed(1)
    raw = [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g), torch.rand(8, generator=g, dtype=torch.float64))
           for _ in range(4)]

    def weighted(out, y, w):
        return (F.cross_entropy(out, y, reduction="none") * w).mean()

    probe = probes.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, (raw[0][0], raw[0][1]),
                          tmp_path / "run", symmetries=[])
    tuples, _, _ = probe.noise_samples([((x, z), y, w) for x, z, y, w in raw], weighted)
    dicts, _, _ = probe.noise_samples([{"x": x, "z": z, "y": y, "w": w} for x, z, y, w in raw],
                                      batch_loss=lambda m, b: weighted(m(b["x"], b["z"]), b["y"], b["w"]))
    assert torch.equal(tuples, dicts)
    with pytest.raises(L2OError, match="batch 0 is a dict; valid: .*batch_loss=lambda model, batch"):
        probe.noise([{"x": x} for x, *_ in raw], weighted)


def test_too_few_batches_are_refused_up_front_with_the_real_minimum(tmp_path):
    model = small_cnn()
    probe = probes.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, batches(1)[0][0], tmp_path / "run")
    calls = []

    def loss(out, y):
        calls.append(1)
        return F.cross_entropy(out, y)

    with pytest.raises(L2OError, match="needs at least 4 minibatches for estimators .*mohammadi_std; the loader has 3"):
        probe.noise(batches(3), loss)
    with pytest.raises(L2OError, match="max_batches=3; valid: an integer >= 4"):
        probe.noise(batches(8), loss, max_batches=3)
    assert not calls  # refused before any gradient
    with pytest.raises(L2OError, match="the loader gave 3"):  # a loader without len: counted
        probe.noise(iter(batches(3)), loss)


def test_rerunning_into_a_directory_from_python_names_the_python_argument(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes.attach(opt, model, batches(1)[0][0], tmp_path / "run").close()
    with pytest.raises(L2OError, match=r"^out .* pass overwrite=True or choose") as e:
        probes.attach(opt, model, batches(1)[0][0], tmp_path / "run")
    assert "--overwrite" not in str(e.value)
    probes.attach(opt, model, batches(1)[0][0], tmp_path / "run", overwrite=True).close()


def _probe_run(out, lr, steps=3, **kw):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    probe = probes.attach(opt, model, batches(1)[0][0], out, loss="cross_entropy", **kw)
    train(model, opt, batches(steps), probe)
    probe.noise(batches(4))
    probe.close()


def test_runs_with_the_same_default_labels_plot_as_separate_curves(tmp_path):
    from l2o_dynamics.plotting import read_runs

    _probe_run(tmp_path / "runs" / "lr0.1", 0.1)
    _probe_run(tmp_path / "runs" / "lr0.01", 0.01)
    t = read_runs(tmp_path / "runs")
    assert t.unique("optimizer") == ["sgd (lr0.01)", "sgd (lr0.1)"]
    for opt, lr in (("sgd (lr0.1)", 0.1), ("sgd (lr0.01)", 0.01)):
        own = Table.read(tmp_path / "runs" / f"lr{lr}" / "metrics.csv")
        assert np.array_equal(t.where(optimizer=opt).cols["value"], own.cols["value"])


def test_plot_draws_the_loss_deviation_and_noise_figures_of_any_probe_output(tmp_path, capsys):
    from l2o_dynamics.cli import main

    _probe_run(tmp_path / "runs" / "a", 0.1)
    assert main(["plot", str(tmp_path / "runs")]) == 0
    written = capsys.readouterr().out
    for name in ("loss.png", "deviations.png", "noise.png"):
        png = tmp_path / "runs" / name
        assert f"wrote {png}" in written and png.read_bytes()[:4] == b"\x89PNG"
    # without a logged loss the other two are still drawn
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = probes.attach(opt, model, batches(1)[0][0], tmp_path / "quiet")
    train(model, opt, batches(2))
    probe.close()
    assert main(["plot", str(tmp_path / "quiet")]) == 0
    assert sorted(p.name for p in (tmp_path / "quiet").glob("*.png")) == ["deviations.png"]


@pytest.mark.parametrize("loss", [F.cross_entropy, nn.CrossEntropyLoss(label_smoothing=0.1)])
def test_a_cross_entropy_callable_as_loss_gives_the_translation_symmetry_and_the_noise_loss(loss, tmp_path):
    model, x, y, _ = build("cnn")
    probe = probes.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, x, tmp_path / "run", loss=loss)
    assert {s.kind for s in probe.symmetries} == {"rescale", "translation"}
    data = [(x[i::4], y[i::4]) for i in range(4)]
    G, _, _ = probe.noise_samples(data)
    ref, _, _ = probe.noise_samples(data, lambda out, t: loss(out, t))
    assert torch.equal(G, ref)
    other = probes.attach(torch.optim.SGD(model.parameters(), lr=0.1), model, x, tmp_path / "other",
                          loss=lambda out, t: F.mse_loss(out, F.one_hot(t, 10).to(out.dtype)))
    assert "translation" not in {s.kind for s in other.symmetries}  # an arbitrary callable is no softmax


class Partly(nn.Module):
    """A relu MLP whose first layer the optimizer does not step (its .grad is never zeroed)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_the_gradient_control_of_parameters_outside_the_optimizer_is_this_steps_gradient(tmp_path):
    torch.manual_seed(0)
    model = Partly().double()
    opt = torch.optim.SGD(model.fc2.parameters(), lr=0.1)
    probe = probes.attach(opt, model, torch.zeros(2, 6, dtype=torch.float64), tmp_path / "run")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]
    expected = []
    for x, y in data:
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = gradient(copy.deepcopy(model), x, y)  # a copy: the probe hears the model's backward passes only
        expected.append(float(probes.record(probe.symmetries, grads, params, "grad_")["grad_rescale_deviation"]))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    probe.close()
    t = Table.read(tmp_path / "run" / "metrics.csv")
    got = t.where(metric="grad_rescale_deviation").matrix()[2][:, 0]
    assert got == pytest.approx(expected, rel=0, abs=reduction_atol(torch.float64, 100, 1.0))


def test_a_switch_to_eval_mode_after_attach_re_detects_the_symmetries(tmp_path):
    model, x, y, loss = build("conv_bn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = probes.attach(opt, model, x, tmp_path / "run", loss=loss)
    train(model, opt, [(x, y)])
    model.eval()  # BatchNorm on running statistics: no scale symmetry any more
    with pytest.warns(UserWarning, match="train/eval modes changed at step 1; symmetries re-detected"):
        train(model, opt, [(x, y)])
    probe.close()
    t = Table.read(tmp_path / "run" / "metrics.csv")
    assert list(t.where(metric="scale_deviation").cols["step"]) == [0]
    assert list(t.where(metric="rescale_deviation").cols["step"]) == [0, 1]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [s["kind"] for s in config["redetected"][0]["symmetries"]] == ["rescale", "rescale", "translation"]


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m[3]])
def test_the_per_step_path_logs_what_record_computes_on_the_views(name, tmp_path):
    """The step hooks' copy-free per-unit sums (conv and flattened linear consumers, BatchNorm and
    LayerNorm scale, translation) equal `record` on the zoo-layout views, in float64."""
    model, x, y, loss = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, [(x, y)])  # momentum state: the update is not a multiple of the gradient
    probe = probes.attach(opt, model, x, tmp_path / "run", loss=loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    opt.step()
    probe.close()
    updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    ref = {**probes.record(probe.symmetries, updates, before), **probes.record(probe.symmetries, grads, before, "grad_")}
    t = Table.read(tmp_path / "run" / "metrics.csv")
    assert set(t.unique("metric")) == set(ref)
    tol = reduction_atol(torch.float64, sum(p.numel() for p in before.values()), 1.0)
    for k, v in ref.items():
        stem = k.removesuffix("_unit").removesuffix("_rel")
        bound = float(ref[stem + "_unit"] / ref[stem + "_rel"])  # sum_k ||v_k|| ||xi_k||: the terms' scale
        got = float(t.where(metric=k).cols["value"][0])
        assert got == pytest.approx(float(v), rel=0, abs=tol * (1.0 if k.endswith("_rel") else bound)), k


@pytest.mark.parametrize("name", ["conv_bn", "functional_cnn", "fire", "linear_bn_mlp", "transformer_block",
                                  "conv_layernorm"])
@pytest.mark.parametrize("every", [1, 2])
def test_weights_read_in_blocks_of_rows_log_what_record_computes_at_every_recorded_step(name, every, tmp_path,
                                                                                         monkeypatch):
    """Blocks of one row (the zoo's weights are smaller than a block) and the buffers kept (every=1)
    or released (every=2) between records: each recorded step equals `record`, in float64."""
    monkeypatch.setattr(probes._StepSums, "CHUNK", 8)
    model, x, y, loss = build(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    probe = probes.attach(opt, model, x, tmp_path / "run", loss=loss, every=every)
    g = torch.Generator().manual_seed(4)
    refs = []
    for step in range(4):
        xb = x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        F.cross_entropy(model(xb), y).backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
        opt.step()
        if step % every == 0:
            updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
            refs.append((step, {**probes.record(probe.symmetries, updates, before),
                                **probes.record(probe.symmetries, grads, before, "grad_")}))
    probe.close()
    t = Table.read(tmp_path / "run" / "metrics.csv")
    tol = reduction_atol(torch.float64, sum(p.numel() for p in model.parameters()), 1.0)
    for step, ref in refs:
        for k, v in ref.items():
            stem = k.removesuffix("_unit").removesuffix("_rel")
            bound = float(ref[stem + "_unit"] / ref[stem + "_rel"])
            rows = t.where(metric=k)
            got = float(rows.cols["value"][list(rows.cols["step"]).index(step)])
            assert got == pytest.approx(float(v), rel=0, abs=tol * (1.0 if k.endswith("_rel") else bound)), (step, k)
    assert len(t.where(metric="grad_" + next(iter(refs[0][1])))) == len(refs)


def test_a_deviation_of_missing_gradients_is_a_one_line_error():
    model, x, _, loss = build("relu_mlp")
    s = probes.find_symmetries(model, x, loss)[0]
    with pytest.raises(L2OError, match=r"vectors\['0.weight'\] is NoneType \(a .grad before backward"):
        s.deviation({n: p.grad for n, p in model.named_parameters()})


def test_a_zero_update_logs_rel_as_nan_not_as_a_perfect_zero(tmp_path):
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    probe = probes.attach(opt, model, batches(1)[0][0], tmp_path / "run")
    train(model, opt, batches(1))
    probe.close()
    t = Table.read(tmp_path / "run" / "metrics.csv")
    assert np.isnan(t.where(metric="rescale_deviation_rel").cols["value"]).all()
    assert (t.where(metric="rescale_deviation").cols["value"] == 0).all()
    assert (t.where(metric="grad_rescale_deviation_rel").cols["value"] > 0).all()


# ---- the README section and the examples run as written ---------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def test_readme_probe_section_runs(tmp_path, monkeypatch):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
              if "probes.attach" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    t = Table.read(tmp_path / "runs" / "mine" / "metrics.csv")
    assert {"rescale_deviation", "translation_deviation", "train_loss", "cov_max_eig"} <= set(t.unique("metric"))
    assert namespace["noise"]["alpha_update_pub"] > 0


@pytest.mark.parametrize("example", ["mnist_cnn", "tiny_transformer"])
def test_examples_run_and_write_metrics_and_figures(example, tmp_path, mnist):
    """Each example at a few steps (the defaults take ~20-40 s; README)."""
    mod = runpy.run_path(str(ROOT / "examples" / f"{example}.py"), run_name="example")
    parser = mod["common"].parser("test", steps=4)
    args = parser.parse_args(["--out", str(tmp_path / "out"), "--steps", "4", "--noise-every", "2",
                              "--noise-batches", "4", "--batch-size", "16"])
    mod["run"](args)
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*"))
    runs = [f for f in files if f.endswith("metrics.csv")]
    assert len(runs) == (6 if example == "mnist_cnn" else 3)
    assert {"loss.png", "deviations.png", "noise.png"} <= set(files)
    t = Table.read([tmp_path / "out" / r for r in runs])
    assert list(t.where(metric="cov_max_eig", optimizer="l2o").matrix()[0])[:3] == [0, 2, 4]
