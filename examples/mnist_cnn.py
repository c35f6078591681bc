"""Probe a small CNN on MNIST trained with Adam, Lion and the shipped L2O.

    python examples/mnist_cnn.py --out runs/probe-cnn

Two models: Conv-ReLU-Conv-ReLU-Linear ("cnn") and Conv-BN-ReLU-Conv-BN-ReLU-Linear
("cnn_bn"). The probe finds their symmetries (rescale between the convolutions and into
the Linear, BatchNorm's scale, the logits' translation), records every update's
deviations, and at a few checkpoints the gradient/update noise tail indices and the
update covariance's largest eigenvalue. Writes OUT/<model>/<optimizer>/metrics.csv and
OUT/loss.png, OUT/deviations.png, OUT/noise.png.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _probe_common as common  # noqa: E402

from l2o_dynamics import data, probes  # noqa: E402


def cnn(batchnorm: bool) -> nn.Sequential:
    """28x28 -> conv 5x5 stride 2 (8 ch, 12x12) -> conv 5x5 stride 2 (16 ch, 4x4) -> Linear(256, 10)."""
    norm = (lambda c: [nn.BatchNorm2d(c)]) if batchnorm else (lambda c: [])
    return nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), *norm(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 5, stride=2), *norm(16), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def images(split) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split
    return data.to_float(x).reshape(-1, 1, 28, 28), y  # (n, 784) uint8 -> (n, 1, 28, 28)


def run(args) -> None:
    names = common.check(args)
    ds = data.load_mnist()
    train, test = images(ds.split("train")), images(ds.split("test"))
    out = Path(args.out)
    for model_name, bn in (("cnn", False), ("cnn_bn", True)):
        torch.manual_seed(args.seed)
        found = probes.find_symmetries(cnn(bn), train[0][:2], loss="cross_entropy")
        print(f"{model_name}: " + "; ".join(f"{s.kind} {'->'.join(s.layers)}" for s in found))
        for name in names:
            torch.manual_seed(args.seed)  # the same init for every optimizer
            seconds = common.train(cnn(bn), name, train, test, out / model_name / name, args, model_name,
                                   "probe-mnist-cnn")
            print(f"  {name}: {seconds:.1f} s")
    for path in common.figures(out):
        print(path)


if __name__ == "__main__":
    common.main(run, common.parser(__doc__.splitlines()[0], steps=400).parse_args())
