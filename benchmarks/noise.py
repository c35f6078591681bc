"""Cost of the noise analysis at one checkpoint of a leaky_relu run.

    python benchmarks/noise.py [--repeats 3] [--device cpu] [--checkpoint l2o.pt]

Per optimizer (SGD, Adam, Lion, L2O), at a state reached by 20 real steps:
  gradients   minibatch gradients of the whole training split (429 x 128 examples)
  updates     the update each gradient would cause at the frozen state
  alphas      alpha_grad and alpha_update with the three default estimators (the study's as
              published, pooled without zeros, per-coordinate standardised)
and the largest eigenvalue of the update covariance for N = 93 minibatches and for
N = 10,000 single examples (per-example gradients). Prints a table and writes
benchmarks/results/noise.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from l2o_dynamics import data as D
from l2o_dynamics import noise
from l2o_dynamics.learned import L2O, init_phi, l2o_from_checkpoint
from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.optimizers import SGD, Adam, Lion, tree_index
from l2o_dynamics.runner import init_params
from l2o_dynamics.seeds import generator

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sgd": 1.0, "adam": 1.0, "lion": 1.0, "l2o": 3.0}


def timed(fn, repeats):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--checkpoint", help="an l2o.pt; default: a randomly initialised L2O (same cost)")
    ap.add_argument("--samples", type=int, default=10_000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "noise.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    ds = D.load_mnist(verbose=False)
    train = tuple(t.to(dev) for t in ds.split("train"))
    model = ZOO["leaky_relu"]
    l2o = l2o_from_checkpoint(args.checkpoint, dev) if args.checkpoint else \
        L2O(init_phi(generator("phi"), device=dev))
    optimizers = {"sgd": SGD(lr=0.1), "adam": Adam(lr=1e-2), "lion": Lion(lr=1e-3), "l2o": l2o}
    rows = {}
    for name, opt in optimizers.items():
        params = init_params(model, [0], device=dev)
        state = opt.init(params, batch_ndim=1)
        b = D.Batcher(*train, seed=0, device=dev)
        with torch.no_grad():
            for _ in range(20):
                x, y = next(b)
                _, g, _ = model.loss_and_grad(params, x[None], y[None])
                u, state = opt.update(g, state, params)
                params = {k: params[k] + u[k] for k in params}
        p, s = tree_index(params, 0), tree_index(state, 0)
        with torch.no_grad():
            noise.updates_at(opt, s, p, torch.zeros(2, model.num_params, device=dev))  # warm-up / compile
            G, t_grad = timed(lambda: noise.minibatch_gradients(model, p, *train), args.repeats)
            U, t_upd = timed(lambda: noise.updates_at(opt, s, p, G), args.repeats)
            _, t_alpha = timed(lambda: noise.noise_alphas(G, U), args.repeats)
            # the same without the published estimator (what a checkpoint cost before it was added)
            _, t_alpha2 = timed(lambda: noise.noise_alphas(G, U, ("mohammadi", "mohammadi_std")), args.repeats)
            cov93, t_cov93 = timed(lambda: noise.update_covariance(opt, model, p, s, train, n=93),
                                   args.repeats)
            row = {"minibatches": G.shape[0], "gradients_s": t_grad, "updates_s": t_upd, "alphas_s": t_alpha,
                   "alphas_without_published_s": t_alpha2,
                   "checkpoint_s": t_grad + t_upd + t_alpha, "cov_minibatch93_s": t_cov93,
                   "cov_minibatch93_max_eig": cov93["cov_max_eig"]}
            if name in ("adam", "l2o") and args.samples:
                cov, t_cov = timed(lambda: noise.update_covariance(opt, model, p, s, train, unit="sample",
                                                                   n=args.samples), 1)
                row.update({"cov_sample_s": t_cov, "cov_sample_n": args.samples,
                            "cov_sample_max_eig": cov["cov_max_eig"]})
        rows[name] = row
        print(f"{name}: done", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nnoise analysis at one checkpoint, leaky_relu, {args.device}, median of {args.repeats}\n")
    print(f"{'optimizer':<9} {'grads s':>8} {'updates s':>10} {'alphas s':>9} {'(2 est.)':>9} {'checkpoint s':>13} "
          f"{'target s':>9} {'cov N=93 s':>11} {'cov N=' + str(args.samples) + ' s':>14}")
    for name, r in rows.items():
        cs = f"{r['cov_sample_s']:.1f}" if "cov_sample_s" in r else "-"
        print(f"{name:<9} {r['gradients_s']:>8.3f} {r['updates_s']:>10.3f} {r['alphas_s']:>9.3f} "
              f"{r['alphas_without_published_s']:>9.3f} "
              f"{r['checkpoint_s']:>13.3f} {TARGETS[name]:>9.1f} {r['cov_minibatch93_s']:>11.3f} {cs:>14}")
    print(f"\npeak RSS {peak:.0f} MB; a previous implementation took 13-15 s per checkpoint for the alphas")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                          "machine": platform.processor() or platform.machine(),
                                          "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                          "repeats": args.repeats, "results": rows, "targets_s": TARGETS,
                                          "peak_rss_mb": peak}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
