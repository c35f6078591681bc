"""Shared by the probe examples: the optimizers, a training loop with the probe attached,
and the figures (drawn only from the metrics.csv files the probe writes)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from l2o_dynamics import learned, plotting, probes
from l2o_dynamics.results import prepare_out_dir
from l2o_dynamics.errors import L2OError


def _lion(params):
    try:
        from lion_pytorch import Lion
    except ImportError:
        raise L2OError("the lion optimizer needs lion-pytorch: pip install lion-pytorch "
                       "(or leave lion out of --optimizers)") from None
    return Lion(params, lr=3e-4, weight_decay=0.0)


OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "lion": _lion,
    "l2o": lambda ps: learned.L2OOptimizer(ps, learned.pretrained("leaky_relu")),  # the shipped L2O
}


def parser(description: str, steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="results dir (one sub-dir per model and optimizer)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)}")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--every", type=int, default=1, help="record update deviations every this many steps")
    p.add_argument("--noise-every", type=int, default=steps // 4, help="noise probe every this many steps")
    p.add_argument("--noise-batches", type=int, default=32, help="minibatches the noise probe reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def check(args) -> list[str]:
    names = [o for o in args.optimizers.split(",") if o]
    bad = [o for o in names if o not in OPTIMIZERS]
    if bad or not names:
        raise L2OError(f"unknown optimizer {','.join(bad)!r}; valid: {', '.join(OPTIMIZERS)}")
    for flag in ("steps", "batch_size", "every", "noise_every", "noise_batches"):
        if getattr(args, flag) < 1:
            raise L2OError(f"--{flag.replace('_', '-')} {getattr(args, flag)}; valid: an integer >= 1")
    prepare_out_dir(args.out, args.overwrite)
    return names


def train(model, optimizer_name: str, train_xy, test_xy, out: Path, args, optimizee: str, experiment: str) -> float:
    """Train `model` for args.steps minibatch steps with the probe attached; noise probes at
    step 0, every args.noise_every steps and at the end; returns the wall time in seconds."""
    start = time.time()
    x, y = train_xy
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    probe = probes.attach(optimizer, model, x[:args.batch_size], out, every=args.every, loss="cross_entropy",
                          experiment=experiment, optimizee=optimizee, optimizer_name=optimizer_name,
                          seed=args.seed, overwrite=args.overwrite)
    b = args.batch_size
    noise_set = [(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b]) for i in range(args.noise_batches)]
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps + 1):
        if step % args.noise_every == 0 or step == args.steps:
            probe.noise(noise_set, F.cross_entropy)
        if step == args.steps:
            break
        idx = torch.randint(len(x), (b,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        probe.log_metric("train_loss", loss)
        optimizer.step()
    with torch.no_grad():
        probe.log_metric("test_loss", F.cross_entropy(model(test_xy[0]), test_xy[1]))
    probe.close()
    return time.time() - start


def figures(out: Path) -> list[Path]:
    """loss.png, deviations.png, noise.png under `out` (`l2o-dynamics plot`)."""
    return plotting.plot_dir(out)


def main(run: Callable, args) -> None:
    try:
        run(args)
    except L2OError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
