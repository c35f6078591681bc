"""The MLP learned optimizer (mlp_lopt.py) against a slow per-element reference, its drop-in,
its checkpoints and the small_fc_lopt loaders."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from l2o_dynamics import mlp_lopt
from l2o_dynamics.errors import L2OError
from l2o_dynamics.learned import l2o_from_checkpoint
from l2o_dynamics.mlp_lopt import (FEATURES, PYLO_DECAYS, MLPL2O, MLPL2OOptimizer, init_mlp_phi,
                                   load_small_fc_lopt, save_mlp_l2o)
from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.seeds import generator

from tolerance import reduction_atol

F64 = torch.float64
MOM, RMS, FAC = (0.9, 0.99, 0.999), (0.999,), (0.9, 0.99, 0.999)
SCALES = (1, 3, 10, 30, 100, 300, 1000, 3000, 10000, 30000, 100000)


# ---- a slow per-element reference, written from the formulas of Metz et al. / the module docstring ----
def slow_decays(phi):
    def one(key, initial, clip):
        out = []
        for d0, o in zip(initial, phi[key].tolist()):
            d = 1 - math.exp(10 * (math.log(1 - d0) / 10 + o))
            out.append(min(max(d, 0.0), 1.0) if clip else d)
        return out
    return one("momentum_decays", MOM, False), one("rms_decays", RMS, True), one("adafactor_decays", FAC, True)


class SlowTensor:
    """Per-element accumulators of one matrix (R, C) or vector (N,), as nested Python floats."""

    def __init__(self, shape):
        self.shape = shape
        self.cells = [(i, j) for i in range(shape[0]) for j in range(shape[1])] if len(shape) == 2 else \
            [(i,) for i in range(shape[0])]
        self.m = {c: [0.0] * 3 for c in self.cells}
        self.r = {c: 0.0 for c in self.cells}
        if len(shape) == 2:
            # D0 = the larger dim (the later one on a tie), D1 = the other: the reference's argsort
            self.d0 = 0 if shape[0] > shape[1] else 1
            self.d1 = 1 - self.d0
            self.v_row = [[0.0] * 3 for _ in range(shape[self.d1])]  # one per index along D1
            self.v_col = [[0.0] * 3 for _ in range(shape[self.d0])]  # one per index along D0
        else:
            self.v = {c: [0.0] * 3 for c in self.cells}

    def features(self, g, p, decays):
        """g, p: {cell: float} -> {cell: 28 raw features} after this gradient."""
        mom, (rms,), fac = decays
        for c in self.cells:
            self.m[c] = [b * m + (1 - b) * g[c] for b, m in zip(mom, self.m[c])]
            self.r[c] = rms * self.r[c] + (1 - rms) * g[c] ** 2
        sq = {c: g[c] ** 2 + 1e-30 for c in self.cells}
        feats = {}
        if len(self.shape) == 2:
            n0, n1 = self.shape[self.d0], self.shape[self.d1]
            for a in range(n1):  # mean over D0 of the squares, per index along D1
                mean = sum(sq[c] for c in self.cells if c[self.d1] == a) / n0
                self.v_row[a] = [d * v + (1 - d) * mean for d, v in zip(fac, self.v_row[a])]
            for b in range(n0):
                mean = sum(sq[c] for c in self.cells if c[self.d0] == b) / n1
                self.v_col[b] = [d * v + (1 - d) * mean for d, v in zip(fac, self.v_col[b])]
            row_mean = [sum(self.v_row[a][j] for a in range(n1)) / n1 for j in range(3)]
            for c in self.cells:
                a, b = c[self.d1], c[self.d0]
                row = self.v_row[a]
                col = self.v_col[b]
                rf = [1 / math.sqrt(max(row[j] / (row_mean[j] + 1e-9), 1e-9)) for j in range(3)]
                cf = [1 / math.sqrt(max(col[j], 1e-9)) for j in range(3)]
                fac_g = [g[c] * rf[j] * cf[j] for j in range(3)]
                fac_m = [self.m[c][j] * rf[j] * cf[j] for j in range(3)]
                feats[c] = self._common(c, g, p) + fac_g + row + col + \
                    [1 / math.sqrt(x + 1e-8) for x in row] + [1 / math.sqrt(x + 1e-8) for x in col] + fac_m
        else:
            for c in self.cells:
                v = self.v[c] = [d * v + (1 - d) * sq[c] for d, v in zip(fac, self.v[c])]
                fac_g = [g[c] / math.sqrt(max(x + 1e-9, 1e-9)) for x in v]
                fac_m = [self.m[c][j] * (v[j] + 1e-6) ** -0.5 for j in range(3)]
                feats[c] = self._common(c, g, p) + fac_g + v + v + \
                    [1 / math.sqrt(x + 1e-8) for x in v] * 2 + fac_m
        return feats

    def _common(self, c, g, p):
        inv = 1 / math.sqrt(self.r[c] + 1e-6)
        return [g[c], p[c], *self.m[c], self.r[c], *(m * inv for m in self.m[c]), inv]


def slow_normalise(feats):
    cells = list(feats)
    out = {c: [] for c in cells}
    for f in range(28):
        scale = 1 / math.sqrt(1e-5 + sum(feats[c][f] ** 2 for c in cells) / len(cells))
        for c in cells:
            out[c].append(feats[c][f] * scale)
    return out


def slow_mlp(phi, x, layers=3):
    """x: 39 floats -> (d, m), one dot product at a time."""
    h = x
    for i in range(layers):
        w, b = phi[f"w{i}"].tolist(), phi[f"b{i}"].tolist()
        h = [sum(h[f] * w[f][o] for f in range(len(h))) + b[o] for o in range(len(b))]
        if i < layers - 1:
            h = [max(v, 0.0) for v in h]
    return h


def _phi64(seed=0):
    phi = init_mlp_phi(torch.Generator().manual_seed(seed), dtype=F64)
    g = torch.Generator().manual_seed(seed + 1)
    for k in ("b0", "b1", "b2"):  # nonzero biases and decay offsets, so that every term shows
        phi[k] = torch.randn(phi[k].shape, generator=g, dtype=F64) * 0.3
    phi["momentum_decays"] = torch.tensor([0.05, -0.1, 0.02], dtype=F64)
    phi["rms_decays"] = torch.tensor([-0.03], dtype=F64)
    phi["adafactor_decays"] = torch.tensor([0.1, 0.0, -0.05], dtype=F64)
    return phi


@pytest.mark.parametrize("matrix", [(3, 5), (5, 3), (4, 4)])
def test_features_and_updates_equal_the_slow_per_element_reference(matrix):
    """A matrix and a vector, 4 steps, float64, gradients spanning 4 orders of magnitude:
    every one of the 39 features and every update agrees with the per-element reference."""
    phi = _phi64()
    opt = MLPL2O(phi)
    shapes = {"w": matrix, "b": (4,)}
    g = torch.Generator().manual_seed(3)
    params = {k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()}
    state = opt.init(params)
    slow = {k: SlowTensor(s) for k, s in shapes.items()}
    decays = slow_decays(phi)
    for t in range(4):
        grads = {k: torch.randn(s, generator=g, dtype=F64) * 10.0 ** torch.randint(-3, 1, s, generator=g)
                 for k, s in shapes.items()}
        feats, _ = opt.features(grads, state, params)
        updates, state = opt.update(grads, state, params)
        time = [math.tanh(t / s - 1) for s in SCALES]
        for k, s in shapes.items():
            as_dict = lambda x: {c: float(x[c]) for c in slow[k].cells}  # noqa: E731
            expected = slow_normalise(slow[k].features(as_dict(grads[k]), as_dict(params[k]), decays))
            n = len(slow[k].cells)
            for c in slow[k].cells:
                # normalised features are O(sqrt(n)); each is a mean of n squares, a sqrt and a product
                torch.testing.assert_close(feats[k][c], torch.tensor(expected[c], dtype=F64), rtol=0,
                                           atol=reduction_atol(F64, n, math.sqrt(n)))
                d, m = slow_mlp(phi, expected[c] + time)
                want = -d * math.exp(1e-3 * m) * 1e-3
                # 39 + 32 + 32 products of O(sqrt(n)) features and O(1) weights, times step_mult
                assert abs(float(updates[k][c]) - want) <= reduction_atol(F64, 103, 10 * math.sqrt(n)) * 1e-3
        params = {k: params[k] + updates[k] for k in params}
    assert state["step"] == 4


def test_feature_order_is_the_references():
    """learned_optimization's adafac_mlp_lopt (and PyLO) concatenate g, p, momentum (3), rms,
    momentum * rsqrt(rms) (3), rsqrt(rms), fac_g (3), row (3), col (3), rsqrt(row) (3),
    rsqrt(col) (3), fac_mom_mult (3), then the 11 time features: 39 in all."""
    groups = [("g", 1), ("param", 1), ("m0.", 3), ("rms", 1), ("/sqrt(rms)", 3), ("1/sqrt(rms)", 1),
              ("fac_g", 3), ("row", 3), ("col", 3), ("1/sqrt(row", 3), ("1/sqrt(col", 3), ("fac_m", 3),
              ("tanh(t/", 11)]
    i = 0
    for prefix, n in groups:
        for name in FEATURES[i:i + n]:
            assert prefix in name, (prefix, name)
        i += n
    assert i == len(FEATURES) == 39 and mlp_lopt.N_NORMALISED == 28


def test_update_is_minus_direction_times_exp_of_scaled_magnitude_times_step_mult():
    """With the last layer's weights zero, every coordinate gets d = 2, m = -3 (its bias):
    update = -2 exp(0.5 * -3) 0.01 = -0.0044626032 (exp(-1.5) = 0.22313016)."""
    phi = init_mlp_phi(torch.Generator().manual_seed(0), dtype=F64)
    phi["w2"] = torch.zeros_like(phi["w2"])
    phi["b2"] = torch.tensor([2.0, -3.0], dtype=F64)
    opt = MLPL2O(phi, exp_mult=0.5, step_mult=0.01)
    params = {"w": torch.randn(3, 4, dtype=F64), "b": torch.randn(3, dtype=F64), "s": torch.tensor(1.5, dtype=F64)}
    updates, _ = opt.update({k: torch.randn_like(v) for k, v in params.items()}, opt.init(params), params)
    for k, v in params.items():
        assert updates[k].shape == v.shape
        torch.testing.assert_close(updates[k], torch.full_like(v, -0.0044626032), rtol=1e-8, atol=0)


def test_stacked_gradients_share_one_frozen_state():
    """Many gradients at one state (the per-sample noise analysis): each row's update equals
    the update of that gradient alone, and the state broadcasts."""
    opt = MLPL2O(init_mlp_phi(generator("phi")))
    params = ZOO["leaky_relu"].init(generator("p"))
    state = opt.init(params)
    g = torch.Generator().manual_seed(1)
    _, state = opt.update({k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in params.items()}, state, params)
    many = {k: torch.randn(4, *v.shape, generator=g) * 1e-2 for k, v in params.items()}
    stacked, new = opt.update(many, state, params)
    for i in range(4):
        one, _ = opt.update({k: v[i] for k, v in many.items()}, state, params)
        for k in one:
            torch.testing.assert_close(stacked[k][i], one[k], rtol=1e-5, atol=1e-9)
    assert new["m"]["fc1.weight"].shape == (4, 20, 784, 3) and state["m"]["fc1.weight"].shape == (20, 784, 3)


def test_meta_gradient_reaches_the_weights_and_the_decays():
    """phi (MLP weights and decay offsets) is learnable: the gradient of a loss after 3 updates
    equals central finite differences (float64, step 1e-6: error ~1e-6^2 relative)."""
    phi = _phi64(1)
    params0 = {"w": torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(2)),
               "b": torch.randn(4, dtype=F64, generator=torch.Generator().manual_seed(3))}

    def loss(phi):
        opt, params = MLPL2O(phi, step_mult=0.1), dict(params0)
        state = opt.init(params)
        for _ in range(3):
            grads = {k: 2 * v for k, v in params.items()}  # of sum(v^2)
            updates, state = opt.update(grads, state, params)
            params = {k: params[k] + updates[k] for k in params}
        return sum((v ** 2).sum() for v in params.values())

    leaves = {k: v.clone().requires_grad_() for k, v in phi.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()))
    for (k, v), gk in zip(phi.items(), grads):
        for idx in [(0,), (-1,)] if v.ndim == 1 else [(0, 0), (5, -1)]:
            plus, minus = dict(phi), dict(phi)
            plus[k], minus[k] = v.clone(), v.clone()
            plus[k][idx] += 1e-6
            minus[k][idx] -= 1e-6
            fd = (loss(plus) - loss(minus)) / 2e-6
            torch.testing.assert_close(gk[idx], fd, rtol=1e-5, atol=1e-9)
    assert all(float(g.abs().max()) > 0 for g in grads[-3:])  # the decays move the loss


def _net_like(params):
    net = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    with torch.no_grad():
        for p, v in zip(net.parameters(), params.values()):
            p.copy_(v)
    return net


def _batches(n, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)]


def test_drop_in_follows_the_functional_trajectory():
    opt_f = MLPL2O(init_mlp_phi(generator("phi")), step_mult=0.01)
    model = ZOO["relu"]
    params = model.init(generator("adapter"))
    net = _net_like(params)
    opt = MLPL2OOptimizer(net.parameters(), opt_f)
    state = opt_f.init(params)
    for x, y in _batches(5):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        _, grads, _ = model.loss_and_grad(params, x, y)
        updates, state = opt_f.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
    moved = float((params["fc1.weight"] - model.init(generator("adapter"))["fc1.weight"]).abs().max())
    assert moved > 1e-3  # the runs went somewhere
    for p, v in zip(net.parameters(), params.values()):
        torch.testing.assert_close(p.detach(), v, rtol=1e-5, atol=1e-6)


def test_drop_in_resumes_from_its_state_dict_to_the_same_result():
    l2o = MLPL2O(init_mlp_phi(generator("phi")), step_mult=0.01)
    params = ZOO["relu"].init(generator("resume"))
    batches = _batches(5, seed=9)

    def train(net, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    net_a = _net_like(params)
    train(net_a, MLPL2OOptimizer(net_a.parameters(), l2o), batches)
    net_b = _net_like(params)
    opt_b = MLPL2OOptimizer(net_b.parameters(), l2o)
    train(net_b, opt_b, batches[:3])
    saved = opt_b.state_dict()
    opt_c = MLPL2OOptimizer(net_b.parameters(), l2o)
    opt_c.load_state_dict(saved)
    train(net_b, opt_c, batches[3:])
    for a, b in zip(net_a.parameters(), net_b.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_round_trip_loads_by_the_common_loader(tmp_path):
    l2o = MLPL2O(init_mlp_phi(generator("phi"), hidden=8, hidden_layers=1), hidden=8, hidden_layers=1,
                 step_mult=0.02)
    save_mlp_l2o(l2o, tmp_path / "l2o.pt")
    back = l2o_from_checkpoint(str(tmp_path / "l2o.pt"))
    assert isinstance(back, MLPL2O) and (back.hidden, back.hidden_layers, back.step_mult) == (8, 1, 0.02)
    for k, v in l2o.phi.items():
        assert torch.equal(back.phi[k], v)
    bad = {"phi": {**l2o.phi, "w0": torch.zeros(38, 8)}, "net": {"family": "mlp", "hidden": 8,
                                                                 "hidden_layers": 1, "exp_mult": 1e-3,
                                                                 "step_mult": 1e-3}}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(L2OError, match=r"phi\['w0'\].*expected"):
        l2o_from_checkpoint(str(tmp_path / "bad.pt"))


class PyLOMetaMLP(nn.Module):
    """The module layout PyLO publishes small_fc_lopt / MuLO weights in (pylo/models/Meta_MLP.py):
    input (39 -> H), `hidden_layers` x linear_i (H -> H), output (H -> 2), ReLU between."""

    def __init__(self, hidden=32, hidden_layers=1):
        super().__init__()
        layers = [("input", nn.Linear(39, hidden)), ("relu_input", nn.ReLU())]
        for i in range(hidden_layers):
            layers += [(f"linear_{i}", nn.Linear(hidden, hidden)), (f"relu_{i}", nn.ReLU())]
        self.network = nn.Sequential(OrderedDict(layers + [("output", nn.Linear(hidden, 2))]))

    def forward(self, x):
        return self.network(x)


def test_pylo_layout_checkpoint_loads_and_steps_as_its_network_computes(tmp_path):
    """A synthetic PyLO MetaMLP state dict: the loaded optimizer's update equals
    -d exp(m exp_mult) step_mult with (d, m) from PyLO's own module on our 39 features."""
    torch.manual_seed(0)
    net = PyLOMetaMLP()
    torch.save(net.state_dict(), tmp_path / "mulo.pt")
    with pytest.raises(L2OError, match="no decay offsets"):
        load_small_fc_lopt(tmp_path / "mulo.pt")
    opt = load_small_fc_lopt(tmp_path / "mulo.pt", decays=PYLO_DECAYS, step_mult=0.01)
    assert (opt.hidden, opt.hidden_layers) == (32, 2)
    torch.testing.assert_close(opt.phi["momentum_decays"], torch.tensor(PYLO_DECAYS["momentum_decays"]))
    params = {"w": torch.randn(6, 4), "b": torch.randn(6)}
    state = opt.init(params)
    for t in range(2):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        feats, _ = opt.features(grads, state, params)
        updates, state = opt.update(grads, state, params)
        for k in params:
            x = torch.cat([feats[k], mlp_lopt.time_features(t).expand(*feats[k].shape[:-1], 11)], dim=-1)
            with torch.no_grad():
                d, m = net(x).unbind(-1)
            torch.testing.assert_close(updates[k], -d * torch.exp(1e-3 * m) * 0.01, rtol=1e-5, atol=1e-9)
        params = {k: params[k] + updates[k] for k in params}


def test_learned_optimization_layout_loads_nested_with_its_decays():
    """The reference's meta-parameters: {'nn': {'~': {w0, b0, ...}}, '*_decays': offsets}."""
    phi = init_mlp_phi(torch.Generator().manual_seed(4))
    theta = {"nn": {"~": {k: v for k, v in phi.items() if k[0] in "wb"}},
             **{k: torch.full_like(phi[k], 0.01) for k in mlp_lopt.DECAY_KEYS}}
    opt = load_small_fc_lopt(theta)
    assert (opt.hidden, opt.hidden_layers, opt.step_mult) == (32, 2, 1e-3)
    for k in phi:
        expected = torch.full_like(phi[k], 0.01) if k in mlp_lopt.DECAY_KEYS else phi[k]
        assert torch.equal(opt.phi[k], expected)
    with pytest.raises(L2OError, match="expected w0"):
        load_small_fc_lopt({**theta, "nn": {"~": {"w0": torch.zeros(28, 32), "b0": torch.zeros(32)}}})


def _write_safetensors(path, tensors):
    """The safetensors layout, written independently of the reader: u64 header length, JSON
    header with byte offsets, the raw little-endian float32 data."""
    import json
    import struct

    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_pylo_hub_safetensors_file_loads_like_its_state_dict(tmp_path):
    torch.manual_seed(1)
    state = PyLOMetaMLP().state_dict()
    _write_safetensors(tmp_path / "model.safetensors", state)
    from_file = load_small_fc_lopt(tmp_path / "model.safetensors", decays=PYLO_DECAYS)
    from_dict = load_small_fc_lopt(dict(state), decays=PYLO_DECAYS)
    for k in from_dict.phi:
        assert torch.equal(from_file.phi[k], from_dict.phi[k])
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(L2OError, match="offsets"):
        load_small_fc_lopt(tmp_path / "short.safetensors", decays=PYLO_DECAYS)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(L2OError, match="not a safetensors file"):
        load_small_fc_lopt(tmp_path / "junk.safetensors", decays=PYLO_DECAYS)


def test_tbptt_meta_steps_through_meta_unroll_lower_the_meta_loss(synthetic):
    """The MLP family is meta-trainable by the LSTM's truncated BPTT as it stands (meta.unroll,
    unchanged): 8 Adam steps on phi lower the meta-loss of a fixed 10-step unroll (same init,
    same minibatches every time)."""
    from l2o_dynamics.data import Batcher, stack_batches
    from l2o_dynamics.meta import unroll
    from l2o_dynamics.runner import init_params

    model = ZOO["leaky_relu"]
    train = synthetic.split("train")
    phi = {k: v.requires_grad_() for k, v in init_mlp_phi(generator("phi", 3)).items()}
    meta_opt = torch.optim.Adam(phi.values(), lr=3e-3)

    def meta_loss():
        l2o = MLPL2O(phi, step_mult=0.01)
        batchers = [Batcher(*train, seed=0)]
        params = init_params(model, [0])
        x, y = stack_batches(batchers)
        _, grads, _ = model.loss_and_grad(params, x, y)
        return unroll(l2o, model, params, l2o.init(params, batch_ndim=1), grads,
                      lambda: stack_batches(batchers), 10).meta_loss.sum()

    losses = []
    for _ in range(8):
        loss = meta_loss()
        losses.append(float(loss.detach()))
        meta_opt.zero_grad()
        loss.backward()
        meta_opt.step()
    final = float(meta_loss().detach())
    assert all(g is not None for g in (p.grad for p in phi.values()))
    # log of the 10 losses' sum: 3.13 at the start, 2.60 after 8 meta-steps on this machine
    assert final < losses[0] - 0.2, (losses, final)


def test_phi_of_another_network_is_refused_in_one_line():
    phi = init_mlp_phi(hidden=8, hidden_layers=1)
    with pytest.raises(L2OError, match=r"names or shapes differ at b0, b1, b2, w0, w1, w2\)"):
        MLPL2O(phi)  # defaults: 2 hidden layers of 32
    assert MLPL2O(phi, hidden=8, hidden_layers=1).num_meta_params == 39 * 8 + 8 + 8 * 2 + 2 + 7


def test_cli_meta_test_runs_a_saved_mlp_l2o_with_symmetry_recording(tmp_path, mnist, capsys):
    import csv

    from l2o_dynamics.cli import main

    save_mlp_l2o(MLPL2O(init_mlp_phi(generator("phi")), step_mult=0.01), tmp_path / "mlp.pt")
    out = tmp_path / "run"
    assert main(["meta-test", "--optimizer", "l2o", "--checkpoint", str(tmp_path / "mlp.pt"), "--optimizee",
                 "leaky_relu", "--steps", "6", "--seeds", "2", "--record-symmetry", "3", "--out", str(out),
                 "--no-progress"]) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} == {"mlp_l2o"} and {r["seed"] for r in rows} == {"100", "101"}
    assert any(r["metric"].startswith("rescale") for r in rows)


# ---- meta-training the MLP family (meta.meta_train, every estimator) ------------------------------
def _stacked_states(l2o, params, steps, g):
    """One state per run with random accumulators (second moments positive), and their stack
    (the step a tensor (Q,) of the runs' own steps)."""
    states = []
    for p, t in zip(params, steps):
        st = l2o.init(p)
        st["m"] = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in st["m"].items()}
        st["rms"] = {k: torch.rand(v.shape, generator=g, dtype=F64) for k, v in st["rms"].items()}
        st["fac"] = {k: tuple(torch.rand(x.shape, generator=g, dtype=F64) + 0.1 for x in v)
                     for k, v in st["fac"].items()}
        st["step"] = t
        states.append(st)
    stack = {"step": torch.tensor(steps), "shapes": states[0]["shapes"],
             **{key: {k: torch.stack([s[key][k] for s in states]) for k in states[0][key]} for key in ("m", "rms")},
             "fac": {k: tuple(torch.stack([s["fac"][k][j] for s in states]) for j in range(len(v)))
                     for k, v in states[0]["fac"].items()}}
    return states, stack


def test_population_update_equals_one_mlp_l2o_per_phi_each_at_its_own_step():
    """The ES family's batched step (mlp_lopt.population_update): Q = 3 runs, each with its own
    phi (decay offsets too), parameters, accumulators and step count, equal 3 separate MLPL2Os."""
    g = torch.Generator().manual_seed(11)
    phis = []
    for s in range(3):
        phi = _phi64(seed=s)
        for k in ("momentum_decays", "rms_decays", "adafactor_decays"):
            phi[k] = 0.1 * torch.randn(phi[k].shape, generator=g, dtype=F64)
        phis.append(phi)
    shapes = {"w": (3, 5), "b": (5,)}
    params = [{k: torch.randn(s, generator=g, dtype=F64) for k, s in shapes.items()} for _ in phis]
    grads = [{k: torch.randn(s, generator=g, dtype=F64) * 10.0 ** -i for k, s in shapes.items()}
             for i in range(len(phis))]
    steps = [0, 7, 250]
    net = MLPL2O(phis[0])
    states, state = _stacked_states(net, params, steps, g)
    stack = lambda trees: {k: torch.stack([t[k] for t in trees]) for k in trees[0]}  # noqa: E731
    updates, new = mlp_lopt.population_update(net, stack(phis), stack(grads), state, stack(params))
    for i, phi in enumerate(phis):
        u, s = MLPL2O(phi).update(grads[i], states[i], params[i])
        for k in shapes:
            torch.testing.assert_close(updates[k][i], u[k], rtol=1e-12, atol=1e-16)
            torch.testing.assert_close(new["m"][k][i], s["m"][k], rtol=1e-12, atol=1e-16)
            for a, b in zip(new["fac"][k], s["fac"][k]):
                torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-16)
        assert int(new["step"][i]) == s["step"] == steps[i] + 1


def _mlp_cfg(**kw):
    from l2o_dynamics.meta import recipe

    base = dict(optimizee="small", family="mlp", step_mult=0.01, epochs=2, runs=1, horizon=20, unroll=5,
                val_runs=1, meta_lr=1e-2, seed=7)
    base.update(kw)
    return recipe("plain", **base)


@pytest.fixture
def small(monkeypatch):
    from l2o_dynamics import optimizees

    monkeypatch.setitem(optimizees.ZOO, "small", optimizees.Optimizee("small", (2,), "leaky_relu"))


def test_tbptt_meta_training_of_the_mlp_family_lowers_the_validation_score(synthetic):
    from l2o_dynamics.meta import init_meta_params, make_l2o, meta_train, validation_score

    cfg = _mlp_cfg(optimizee="leaky_relu", epochs=2, runs=2)
    before = validation_score(make_l2o(cfg, init_meta_params(cfg, torch.float32, "cpu")), cfg, synthetic)
    res = meta_train(cfg, data=synthetic, progress=False)
    assert isinstance(res.l2o, MLPL2O) and res.l2o.step_mult == 0.01
    # mean loss of 2 validation runs of 20 steps: 2.32 untrained (chance is log 10 = 2.30), about
    # 1.0 after 16 meta-steps on this machine
    assert res.best_score < 0.7 * before, (before, res.best_score)


@pytest.mark.parametrize("estimator, settings", [
    ("tbptt", dict(reg="rescale", beta=0.1)),  # the symmetry penalty acts on updates: any family
    ("pes", dict(horizon_min=10, pairs=2, tasks=2)),  # tasks end their runs at different steps
])
def test_mlp_family_meta_training_resumed_after_a_stop_equals_an_uninterrupted_one(tmp_path, synthetic, small,
                                                                                   estimator, settings):
    cfg = _mlp_cfg(estimator=estimator, epochs=3, **settings)
    full = meta_train_to(cfg, tmp_path / "full", synthetic)
    meta_train_to(cfg, tmp_path / "cut", synthetic, stop_after_epochs=1)
    assert not (tmp_path / "cut" / "l2o.pt").exists()
    resumed = meta_train_to(cfg, tmp_path / "cut", synthetic, resume=True)
    for k in full.l2o.phi:
        assert torch.equal(full.l2o.phi[k], resumed.l2o.phi[k]), k
    assert (tmp_path / "full" / "metrics.csv").read_bytes() == (tmp_path / "cut" / "metrics.csv").read_bytes()
    start = init_mlp_phi(generator("phi", cfg.seed))
    assert any(not torch.equal(full.l2o.phi[k], start[k]) for k in start)  # it did train


def meta_train_to(cfg, out, data, **kw):
    from l2o_dynamics.meta import meta_train

    return meta_train(cfg, out, data=data, progress=False, **kw)


@pytest.mark.parametrize("estimator", ["es", "full-es"])
def test_es_and_full_es_meta_train_the_mlp_family(synthetic, small, estimator):
    from l2o_dynamics.meta import meta_train

    cfg = _mlp_cfg(estimator=estimator, epochs=1, pairs=2)
    res = meta_train(cfg, data=synthetic, progress=False)
    values = [v for m, _, v in res.log.entries if m == "meta_grad_norm"]
    assert len(values) == cfg.total_meta_steps() and all(math.isfinite(v) and v > 0 for v in values)
    start = init_mlp_phi(generator("phi", cfg.seed))
    assert all(not torch.equal(res.l2o.phi[k], start[k]) for k in start)  # every entry moved, decays too


def test_meta_trained_mlp_l2o_is_exported_and_meta_tests_by_path(tmp_path, mnist, small, capsys):
    """CLI meta-train --family mlp (PES) -> l2o.pt: loads by path (learned.l2o_from_checkpoint, the
    drop-in) as the selected phi, and `meta-test --checkpoint` runs it."""
    import csv

    from l2o_dynamics.cli import main
    from l2o_dynamics.meta import read_checkpoint

    out = tmp_path / "mlp"
    assert main(["meta-train", "--recipe", "plain", "--family", "mlp", "--estimator", "pes", "--optimizee", "small",
                 "--epochs", "1", "--runs", "1", "--horizon", "10", "--unroll", "5", "--val-runs", "1",
                 "--pairs", "2", "--step-mult", "0.01", "--mlp-hidden", "8", "--seed", "7", "--meta-lr", "0.01",
                 "--out", str(out), "--no-progress"]) == 0
    assert "meta-trained mlp L2O on small" in capsys.readouterr().out
    l2o = l2o_from_checkpoint(out / "l2o.pt")
    assert isinstance(l2o, MLPL2O) and (l2o.hidden, l2o.hidden_layers, l2o.step_mult) == (8, 2, 0.01)
    cfg = _mlp_cfg(estimator="pes", epochs=1, horizon=10, pairs=2, mlp_hidden=8)
    ck = read_checkpoint(out / "checkpoint.pt", cfg)
    for k, v in ck["best_phi"].items():
        assert torch.equal(l2o.phi[k], v), k
    MLPL2OOptimizer(nn.Linear(3, 2).parameters(), out / "l2o.pt")
    run = tmp_path / "test"
    assert main(["meta-test", "--optimizer", "l2o", "--checkpoint", str(out / "l2o.pt"), "--optimizee",
                 "leaky_relu", "--steps", "4", "--seeds", "100-101", "--out", str(run), "--no-progress"]) == 0
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["optimizer"] for r in rows} == {"mlp_l2o"} and {r["seed"] for r in rows} == {"100", "101"}


@pytest.mark.parametrize("change, message", [
    (dict(hidden=10), "hidden apply to the lstm family only, not to family mlp; the mlp family's network settings "
                      "are mlp_hidden, mlp_layers, step_mult, exp_mult"),
    (dict(log_eps=1e-8, out_bias="zero"), "log_eps, out_bias apply to the lstm family only"),
    (dict(family="lstm", step_mult=0.01), "step_mult apply to the mlp family only, not to family lstm; the lstm "
                                          "family's network settings are hidden, layers, p, eta, log_eps, out_bias"),
    (dict(family="gru"), "unknown family 'gru'; valid: lstm, mlp"),
    (dict(mlp_hidden=0), "mlp_hidden must be an integer in 1..4096, got 0"),
    (dict(step_mult=0.0), "step_mult must be a finite number in (0, 10]"),
])
def test_settings_that_do_not_apply_to_the_family_are_refused_in_one_line(small, change, message):
    with pytest.raises(L2OError) as e:
        _mlp_cfg(**change).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_init_from_an_l2o_of_the_other_family_is_refused(tmp_path, small):
    from l2o_dynamics.learned import init_phi

    torch.save({"phi": init_phi(), "net": {"hidden": 20, "layers": 2, "p": 10.0, "eta": 0.1}}, tmp_path / "lstm.pt")
    with pytest.raises(L2OError, match=r"is an L2O of the lstm family; this config's family is mlp: make them "
                                        r"equal \(CLI: --family lstm\)"):
        _mlp_cfg(init_from=str(tmp_path / "lstm.pt")).validate()
    save_mlp_l2o(MLPL2O(init_mlp_phi(hidden=8), hidden=8), tmp_path / "mlp8.pt")
    with pytest.raises(L2OError, match="has 2 hidden layers of 8; this config has mlp_layers 2, mlp_hidden 32"):
        _mlp_cfg(init_from=str(tmp_path / "mlp8.pt")).validate()
    _mlp_cfg(init_from=str(tmp_path / "mlp8.pt"), mlp_hidden=8).validate()


def test_a_recipe_leaves_out_the_other_familys_settings():
    from l2o_dynamics.meta import recipe

    assert recipe("authors").log_eps == 1e-8
    cfg = recipe("authors", family="mlp").validate()  # the authors' meta-training, no LSTM preprocessing
    assert (cfg.log_eps, cfg.loss_index, cfg.select) == (0.0, "current", "train-runs")
    with pytest.raises(L2OError, match="log_eps apply to the lstm family only"):
        recipe("authors", family="mlp", log_eps=1e-8).validate()
    # the MLP family's recipe: the default recipe's meta-training at 760 meta-steps, the
    # reference's output scale (docs/mlp_l2o.md: chosen on selection seeds)
    mlp, default = recipe("mlp").validate(), recipe("default")
    assert (mlp.family, mlp.step_mult, mlp.exp_mult, mlp.total_meta_steps()) == ("mlp", 1e-3, 1e-3, 760)
    assert all(getattr(mlp, k) == getattr(default, k)
               for k in ("short_runs", "clip_grad", "rollback", "rollback_cut", "collapse", "select", "meta_lr"))


def test_the_cli_refuses_an_lstm_setting_with_family_mlp_with_exit_2(tmp_path, capsys):
    from l2o_dynamics.cli import main

    assert main(["meta-train", "--family", "mlp", "--hidden", "10", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "hidden apply to the lstm family only" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_the_memory_estimate_of_the_mlp_family_adds_up_the_documented_terms():
    from l2o_dynamics import meta

    cfg = meta.recipe("plain", optimizee="relu", family="mlp", mlp_hidden=3, mlp_layers=1, tasks=2, unroll=5,
                      horizon=5, batch_size=4)
    # s = 4; n = 15910 (relu), R = B n = 31820; F = 28; P = 39*3 + 3 + 3*2 + 2 + 7 decay offsets = 135
    # unroll: K s (R (2F + 2 L H + 2) + 8 B n) = 5 * 4 * (31820 * 64 + 8 * 2 * 15910)
    # data: 60000 * 784 + 2 B batch 784 s = 47,040,000 + 2 * 2 * 4 * 784 * 4
    assert meta.memory_estimate(cfg) == {"meta_params": 7 * 135 * 4, "unroll": 5 * 4 * (31820 * 64 + 254560),
                                         "data": 47_040_000 + 50_176}
    # population (pes, N = 8): s ((2N+1) R (2F + 2H + 4) + (2N+2) B P) = 4 (17 * 31820 * 66 + 18 * 2 * 135)
    pes = meta.recipe("plain", optimizee="relu", family="mlp", mlp_hidden=3, mlp_layers=1, tasks=2, unroll=5,
                      horizon=5, batch_size=4, estimator="pes")
    assert meta.memory_estimate(pes)["population"] == 4 * (17 * 31820 * 66 + 18 * 2 * 135)
