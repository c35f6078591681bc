import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from l2o_dynamics.optimizees import ZOO, flatten, get_optimizee, unflatten
from l2o_dynamics.errors import L2OError
from l2o_dynamics.seeds import generator
from tolerance import reduction_atol


def reference_module(model, params):
    """The same network as a torch.nn module, weights copied from `params`."""
    layers = []
    sizes = model.sizes
    act = {"sigmoid": nn.Sigmoid(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.01)}[model.activation]
    for i in range(len(sizes) - 1):
        lin = nn.Linear(sizes[i], sizes[i + 1]).double()
        with torch.no_grad():
            lin.weight.copy_(params[f"fc{i + 1}.weight"])
            lin.bias.copy_(params[f"fc{i + 1}.bias"])
        layers.append(lin)
        if i < len(sizes) - 2:
            if model.batchnorm:
                bn = nn.BatchNorm1d(sizes[i + 1]).double()
                with torch.no_grad():
                    bn.weight.copy_(params[f"bn{i + 1}.weight"])
                    bn.bias.copy_(params[f"bn{i + 1}.bias"])
                layers.append(bn)
            layers.append(act)
    return nn.Sequential(*layers).train()


def test_param_counts_match_the_study():
    assert ZOO["sigmoid"].num_params == ZOO["relu"].num_params == ZOO["leaky_relu"].num_params == 15910
    assert ZOO["bn_relu"].num_params == 15950
    assert ZOO["sigmoid_2x20"].num_params == 784 * 20 + 20 + 20 * 20 + 20 + 20 * 10 + 10
    assert ZOO["relu_100x100"].num_params == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


@pytest.mark.parametrize("name", list(ZOO))
def test_loss_and_grad_match_torch_nn(name):
    model = ZOO[name]
    params = model.init(generator("t", name), dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 784, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    net = reference_module(model, params)
    ref_loss = F.cross_entropy(net(x), y)
    ref_loss.backward()
    loss, grads, acc = model.loss_and_grad(params, x, y)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-12, atol=0)
    ref_grads = [p.grad for p in net.parameters()]
    assert list(grads) == list(model.shapes())
    for (k, got), want in zip(grads.items(), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=k)
    assert acc.item() == pytest.approx((net(x).argmax(1) == y).double().mean().item())


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_params_equal_each_set_alone(name, dtype):
    model = ZOO[name]
    sets = [model.init(generator("s", i), dtype=dtype) for i in range(3)]
    stacked = {k: torch.stack([s[k] for s in sets]) for k in sets[0]}
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 32, 784, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (3, 32), generator=g)
    loss, grads, _ = model.loss_and_grad(stacked, x, y)
    # The batched and the single matmuls reduce over the 784 inputs and the 32 examples
    # in other orders (and thread splits): they agree to n * eps of the values' scale,
    # not to a fixed atol (a 3.7e-8 gradient element that cancels from O(1) terms can
    # differ by 1e-7 in float32). An indexing bug errs by O(scale).
    n = 784 * 32
    for i, s in enumerate(sets):
        li, gi, _ = model.loss_and_grad(s, x[i], y[i])
        torch.testing.assert_close(loss[i], li, rtol=0, atol=reduction_atol(dtype, n, float(li)))
        for k in gi:
            scale = float(gi[k].abs().max()) + float(li)
            torch.testing.assert_close(grads[k][i], gi[k], rtol=0, atol=reduction_atol(dtype, n, scale))
    # shared inputs broadcast over the stack
    shared = model.loss(stacked, x[0], y[0])
    ref = model.loss(sets[1], x[0], y[0])
    torch.testing.assert_close(shared[1], ref, rtol=0, atol=reduction_atol(dtype, n, float(ref)))


def test_init_is_pytorch_default_and_seeded():
    model = ZOO["sigmoid_40"]
    a = model.init(generator("init", 0))
    b = model.init(generator("init", 0))
    c = model.init(generator("init", 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])
    for k, v in a.items():
        fan_in = model.shapes()[k.split(".")[0] + ".weight"][1]
        bound = fan_in ** -0.5
        assert v.abs().max() <= bound
        if v.numel() > 1000:  # uniform over the whole interval
            assert v.abs().max() > 0.99 * bound
            assert abs(v.mean().item()) < 0.05 * bound
            assert v.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
    bn = ZOO["bn_relu"].init(generator("init", 0))
    assert torch.equal(bn["bn1.weight"], torch.ones(20)) and torch.equal(bn["bn1.bias"], torch.zeros(20))


def test_structure_is_declared_not_guessed():
    s = ZOO["bn_relu"].structure
    (layer,) = s.hidden
    assert (layer.weight, layer.bias, layer.out_weight) == ("fc1.weight", "fc1.bias", "fc2.weight")
    assert layer.batchnorm and layer.bn_weight == "bn1.weight" and layer.homogeneous
    assert (s.logits_weight, s.logits_bias) == ("fc2.weight", "fc2.bias")
    assert not ZOO["sigmoid"].structure.hidden[0].homogeneous
    deep = ZOO["sigmoid_2x20"].structure
    assert [h.out_weight for h in deep.hidden] == ["fc2.weight", "fc3.weight"]
    assert deep.logits_weight == "fc3.weight"


def test_flatten_roundtrip_and_unknown_name():
    model = ZOO["leaky_relu"]
    p = model.init(generator("f"), batch_shape=(2,))
    flat = flatten(p, batch_ndim=1)
    assert flat.shape == (2, model.num_params)
    back = unflatten(flat, p, batch_ndim=1)
    assert all(torch.equal(back[k], p[k]) for k in p)
    with pytest.raises(L2OError, match="valid: sigmoid"):
        get_optimizee("resnet")


def test_batchnorm_eps_is_the_pytorch_default():
    model = ZOO["bn_relu"]
    assert model.bn_eps == 1e-5
    assert dataclasses.replace(model, bn_eps=0.0).bn_eps == 0.0
