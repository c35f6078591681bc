import math

import pytest
import torch
import torch.nn as nn

from l2o_dynamics import learned
from l2o_dynamics.learned import L2O, L2OOptimizer, LSTMCellFunction, init_phi, l2o_from_checkpoint, preprocess
from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.errors import L2OError
from l2o_dynamics.seeds import generator


def test_preprocess_formula():
    p = 10.0
    g = torch.tensor([0.5, -2.0, 1e-3, -1e-6, 0.0, math.exp(-p), -math.exp(-p) * 0.5], dtype=torch.float64)
    got = preprocess(g, p)
    want = []
    for v in g.tolist():
        if abs(v) >= math.exp(-p):
            want.append((math.log(abs(v)) / p, math.copysign(1.0, v)))
        else:
            want.append((-1.0, math.exp(p) * v))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_lstm_cell_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(6, 2), (6, 3), (6, 3), (12, 5), (12,)]]
    assert torch.autograd.gradcheck(LSTMCellFunction.apply, args)


def _reference_network(phi, hidden, layers):
    cells = []
    for layer in range(layers):
        cell = nn.LSTMCell(2 if layer == 0 else hidden, hidden).double()
        with torch.no_grad():
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(cell, n).copy_(phi[f"lstm{layer}.{n}"])
        cells.append(cell)
    lin = nn.Linear(hidden, 1).double()
    with torch.no_grad():
        lin.weight.copy_(phi["out.weight"])
        lin.bias.copy_(phi["out.bias"])
    return cells, lin


def test_update_equals_torch_lstm_cells_per_tensor_over_steps():
    phi = init_phi(generator("phi"), hidden=20, layers=2, dtype=torch.float64)
    opt = L2O(phi)
    model = ZOO["bn_relu"]
    params = model.init(generator("p"), dtype=torch.float64)
    state = opt.init(params)
    cells, lin = _reference_network(phi, 20, 2)
    ref_state = {k: [None, None] for k in params}
    off, i = {}, 0
    for k, v in params.items():
        off[k], i = i, i + v.numel()
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 1e-2 for k, v in params.items()}
        updates, state = opt.update(grads, state, params)
        with torch.no_grad():
            for k in params:
                x = preprocess(grads[k].reshape(-1))
                for layer, cell in enumerate(cells):
                    h, c = cell(x, ref_state[k][layer])
                    ref_state[k][layer] = (h, c)
                    x = h
                want = 0.1 * lin(x).squeeze(-1)
                torch.testing.assert_close(updates[k].reshape(-1), want, rtol=1e-10, atol=1e-13)
                torch.testing.assert_close(state["h"][1][off[k]:off[k] + params[k].numel()], x,
                                           rtol=1e-10, atol=1e-13)


def test_stacked_gradients_share_one_frozen_state():
    phi = init_phi(generator("phi"))
    opt = L2O(phi)
    model = ZOO["leaky_relu"]
    params = model.init(generator("p"))
    state = opt.init(params)
    g = torch.Generator().manual_seed(1)
    grads = {k: torch.randn(v.shape, generator=g) * 1e-2 for k, v in params.items()}
    _, state = opt.update(grads, state, params)
    many = {k: torch.randn(4, *v.shape, generator=g) * 1e-2 for k, v in params.items()}
    stacked, new = opt.update(many, state, params)
    for i in range(4):
        one, _ = opt.update({k: v[i] for k, v in many.items()}, state, params)
        for k in one:
            torch.testing.assert_close(stacked[k][i], one[k], rtol=1e-6, atol=1e-9)
    assert new["h"][0].shape == (4, model.num_params, 20) and state["h"][0].shape == (model.num_params, 20)


def test_compiled_kernels_equal_eager():
    g = torch.Generator().manual_seed(0)
    gates, c, dh, dc = (torch.randn(300, s, generator=g) for s in (80, 20, 20, 20))
    eager_f = learned._cell_forward_pointwise(gates, c)
    eager_b = learned._cell_backward_pointwise(dh, dc, eager_f[0], c, eager_f[2])
    kernels = learned._Kernels()
    kernels.mode = "compile"
    comp_f = kernels.call(0, gates, c)
    comp_b = kernels.call(1, dh, dc, comp_f[0], c, comp_f[2])
    comp_i = kernels.call(2, gates, c)
    for a, b in zip((*eager_f, *eager_b, eager_f[1], eager_f[3]), (*comp_f, *comp_b, *comp_i)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_optimizer_adapter_follows_the_functional_trajectory():
    phi = init_phi(generator("phi"))
    l2o = L2O(phi)
    model = ZOO["relu"]
    params = model.init(generator("adapter"))
    net = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    with torch.no_grad():
        for (name, p), v in zip(net.named_parameters(), params.values()):
            p.copy_(v)
    opt = L2OOptimizer(net.parameters(), l2o)
    state = l2o.init(params)
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        x, y = torch.rand(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        _, grads, _ = model.loss_and_grad(params, x, y)
        updates, state = l2o.update(grads, state, params)
        params = {k: params[k] + updates[k] for k in params}
    for p, v in zip(net.parameters(), params.values()):
        torch.testing.assert_close(p.detach(), v, rtol=1e-5, atol=1e-6)


def test_pretrained_l2o_trains_a_fresh_pytorch_mlp_on_mnist(mnist):
    """The shipped L2O, as a torch.optim.Optimizer, on an nn.Module it has never seen
    (a ReLU MLP with a different width): the loss goes down."""
    from l2o_dynamics.data import Batcher
    from l2o_dynamics.learned import pretrained

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = L2OOptimizer(net.parameters(), pretrained("leaky_relu"))
    batches = Batcher(*mnist.split("train"), seed=3)
    losses = []
    for _ in range(150):
        x, y = next(batches)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-10:]) / 10  # the first loss is at chance (log 10 = 2.30)
    assert first > 2.0 and last < 0.8, (first, last)


# ---- the shipped set -------------------------------------------------------------------
SETTINGS = [f"{o}/beta={b}" for o in ("bn_relu", "leaky_relu") for b in ("0", "0.1", "0.5", "1")]  # the study's eight
SHIPPED = SETTINGS + ["sigmoid/beta=0"] \
    + [f"{recipe}/{name}" for recipe in ("authors", "mlp") for name in SETTINGS]  # tools/ship_recipe.py


def test_the_shipped_set_is_complete():
    from l2o_dynamics.learned import available_pretrained

    assert sorted(available_pretrained()) == sorted(SHIPPED + ["base/leaky_relu"])


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_l2o_loads_by_name_and_trains_a_fresh_optimizee(name, mnist):
    from l2o_dynamics.runner import meta_test

    l2o = l2o_from_checkpoint(f"pretrained:{name}")
    if name.startswith("mlp/"):  # the MLP family: small_fc_lopt's shape, the reference's output scale
        assert type(l2o).__name__ == "MLPL2O" and (l2o.hidden, l2o.hidden_layers, l2o.step_mult) == (32, 2, 1e-3)
    else:
        assert l2o.num_meta_params == 5_301 and (l2o.hidden, l2o.layers, l2o.p, l2o.eta) == (20, 2, 10.0, 0.1)
    optimizee = name.split("/")[-2]  # [RECIPE/]OPTIMIZEE/beta=B
    log = meta_test(l2o, optimizee, mnist.split("train"), seeds=[123], steps=60)
    c = log.curve("train_loss")[:, 0]  # a fresh init (seed 123 is no training seed), 60 steps
    # below its initial loss by more than minibatch noise (+-0.05 at chance): the penalised
    # leaky_relu L2Os are slow (1.67 and 1.90 after 60 steps at beta 0.5 and 1), the others
    # reach 0.3-0.6; an L2O that does not train stays at 2.3
    assert c[0] > 2.0 and c[-10:].mean() < 0.9 * c[0], (name, c[0], c[-10:].mean())


def test_pretrained_names():
    from l2o_dynamics.learned import pretrained

    assert pretrained("leaky_relu") == pretrained("leaky_relu/beta=0") == pretrained("leaky_relu/beta=0.0")
    assert pretrained("bn_relu/beta=0.50").endswith("bn_relu/beta=0.5.pt")
    for bad, msg in (("resnet", "available: "), ("leaky_relu/0.5", "OPTIMIZEE/beta=B"),
                     ("leaky_relu/beta=x", "beta must be a number"), ("leaky_relu/beta=0.3", "available: ")):
        with pytest.raises(L2OError, match=msg):
            pretrained(bad)


def test_a_further_recipes_set_loads_by_recipe_name_and_only_shipped_names_resolve(shipped):
    from l2o_dynamics.learned import available_pretrained, pretrained

    default = shipped("leaky_relu/beta=0", seed=0)
    authors = shipped("authors/leaky_relu/beta=0", seed=1)
    shipped("authors/bn_relu/beta=0.5", seed=2)
    assert available_pretrained() == ["authors/bn_relu/beta=0.5", "authors/leaky_relu/beta=0", "leaky_relu/beta=0"]
    assert pretrained("leaky_relu") == str(default)
    assert pretrained("authors/leaky_relu") == pretrained("authors/leaky_relu/beta=0.0") == str(authors)
    assert pretrained("authors/bn_relu/beta=0.50").endswith("authors/bn_relu/beta=0.5.pt")
    # loaded by name, it is the authors' file, not the default recipe's of the same setting
    got = l2o_from_checkpoint("pretrained:authors/leaky_relu").phi["out.weight"]
    assert torch.equal(got, torch.load(authors, weights_only=True)["phi"]["out.weight"])
    assert not torch.equal(got, torch.load(default, weights_only=True)["phi"]["out.weight"])
    for bad, msg in (("authors/bn_relu", "available: "), ("authors/leaky_relu/0", "OPTIMIZEE/beta=B"),
                     ("authors/../leaky_relu/beta=0", "OPTIMIZEE/beta=B"), ("authors", "available: "),
                     ("authors/leaky_relu/beta=0/x", "OPTIMIZEE/beta=B"), ("base/../leaky_relu/beta=0", "available: ")):
        with pytest.raises(L2OError, match=msg):
            pretrained(bad)
