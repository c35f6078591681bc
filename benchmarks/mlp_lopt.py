"""Speed of the MLP L2O (mlp_lopt.py) next to Adam and the LSTM L2O on leaky_relu (784-20-10).

    python benchmarks/mlp_lopt.py [--rounds 20] [--fusion auto] [--device cpu]

One process, one run: the three optimizers take turns (round-robin, `--steps` meta-test
steps each per round), so a busy machine slows them alike; read the ratios. Measured:
  meta-test step   draw a batch, loss and gradient, optimizer update, apply (runner.meta_test's
                   loop body), one run (S = 1), no autograd
  update only      the optimizer's update alone, on a fixed gradient
  unroll           a 20-step meta-training unroll (meta.unroll) and its meta-backward, B = 1,
                   for the two learned optimizers
Prints a table, writes JSON to benchmarks/results/mlp_lopt.json. Numbers are medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from l2o_dynamics import data as D
from l2o_dynamics import learned
from l2o_dynamics.learned import L2O, init_phi
from l2o_dynamics.meta import unroll
from l2o_dynamics.mlp_lopt import MLPL2O, init_mlp_phi
from l2o_dynamics.optimizees import ZOO
from l2o_dynamics.optimizers import Adam
from l2o_dynamics.runner import init_params
from l2o_dynamics.seeds import generator

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 5.0  # MLP L2O meta-test step / Adam step (issue 19)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_optimizers(device: str, requires_grad: bool = False) -> dict:
    def leaves(phi):
        return {k: v.requires_grad_(requires_grad) for k, v in phi.items()}

    return {"adam": Adam(lr=1e-2),
            "lstm_l2o": L2O(leaves(init_phi(generator("phi", 0), device=device))),
            "mlp_l2o": MLPL2O(leaves(init_mlp_phi(generator("phi", 0), device=device)), step_mult=0.01)}


def bench_steps(train, device: str, rounds: int, steps: int) -> dict:
    model = ZOO["leaky_relu"]
    opts = make_optimizers(device)
    runs = {}
    for name, opt in opts.items():
        params = init_params(model, [0], device=device)
        runs[name] = {"params": params, "state": opt.init(params, batch_ndim=1),
                      "batcher": [D.Batcher(*train, seed=0, device=device)], "step": [], "update": []}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up (and compiles the LSTM cell under 'auto')
            for name, opt in opts.items():
                run = runs[name]
                for _ in range(steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    x, y = D.stack_batches(run["batcher"])
                    _, grads, _ = model.loss_and_grad(run["params"], x, y)
                    t1 = time.perf_counter()
                    upd, run["state"] = opt.update(grads, run["state"], run["params"])
                    _sync(device)
                    t2 = time.perf_counter()
                    run["params"] = {k: run["params"][k] + upd[k] for k in upd}
                    _sync(device)
                    t3 = time.perf_counter()
                    if r:
                        run["step"].append(t3 - t0)
                        run["update"].append(t2 - t1)
    return {name: {"step_ms": 1000 * statistics.median(run["step"]),
                   "update_ms": 1000 * statistics.median(run["update"]),
                   "fastest_step_ms": 1000 * min(run["step"]), "fastest_update_ms": 1000 * min(run["update"]),
                   "samples": len(run["step"])}
            for name, run in runs.items()}


def bench_unroll(train, device: str, repeats: int, k: int = 20) -> dict:
    model = ZOO["leaky_relu"]
    out = {}
    for name, opt in make_optimizers(device, requires_grad=True).items():
        if name == "adam":
            continue
        params = init_params(model, [0], device=device)
        batcher = [D.Batcher(*train, seed=0, device=device)]
        state = opt.init(params, batch_ndim=1)
        x, y = D.stack_batches(batcher)
        _, grads, _ = model.loss_and_grad(params, x, y)
        times = []
        for i in range(repeats + 1):  # one warm-up
            _sync(device)
            t0 = time.perf_counter()
            res = unroll(opt, model, params, state, grads, lambda: D.stack_batches(batcher), k)
            res.meta_loss.sum().backward()
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
            params = {kk: v.detach() for kk, v in res.params.items()}
            state, grads = opt.detach_state(res.state), res.grads
        out[name] = {"unroll_s": statistics.median(times), "repeats": repeats, "unroll_steps": k}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (each optimizer --steps steps a round)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--unroll-repeats", type=int, default=5)
    ap.add_argument("--fusion", default="auto", choices=["auto", "compile", "eager"], help="the LSTM cell")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mlp_lopt.json"))
    args = ap.parse_args()
    learned.set_fusion(args.fusion)
    ds = D.load_mnist(verbose=False)
    train = tuple(t.to(args.device) for t in ds.split("train"))
    steps = bench_steps(train, args.device, args.rounds, args.steps)
    unrolls = bench_unroll(train, args.device, args.unroll_repeats)
    adam = steps["adam"]
    summary = {f"{n}_step_over_adam": steps[n]["step_ms"] / adam["step_ms"] for n in ("lstm_l2o", "mlp_l2o")}
    summary.update({f"{n}_update_over_adam": steps[n]["update_ms"] / adam["update_ms"] for n in ("lstm_l2o", "mlp_l2o")})
    summary.update({f"{n}_fastest_step_over_adam": steps[n]["fastest_step_ms"] / adam["fastest_step_ms"]
                    for n in ("lstm_l2o", "mlp_l2o")})
    summary["mlp_over_lstm_unroll"] = unrolls["mlp_l2o"]["unroll_s"] / unrolls["lstm_l2o"]["unroll_s"]
    print(f"\nMLP L2O speed on leaky_relu (784-20-10, P = 15,910), device {args.device}, "
          f"{torch.get_num_threads()} thread(s), LSTM cell {learned.fusion_in_use(args.device)}; medians\n")
    print(f"{'optimizer':<10} {'ms / step':>10} {'x Adam':>7} {'fastest':>8} {'x Adam':>7} {'ms / update':>12} "
          f"{'x Adam':>7} {'s / 20-step unroll':>19}")
    for name, r in steps.items():
        u = f"{unrolls[name]['unroll_s']:.3f}" if name in unrolls else "-"
        print(f"{name:<10} {r['step_ms']:>10.2f} {r['step_ms'] / adam['step_ms']:>7.2f} "
              f"{r['fastest_step_ms']:>8.2f} {r['fastest_step_ms'] / adam['fastest_step_ms']:>7.2f} "
              f"{r['update_ms']:>12.2f} {r['update_ms'] / adam['update_ms']:>7.2f} {u:>19}")
    print(f"\nMLP L2O step / Adam step: {summary['mlp_l2o_step_over_adam']:.2f} (medians), "
          f"{summary['mlp_l2o_fastest_step_over_adam']:.2f} (fastest samples); target <= {TARGET_RATIO:g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "fusion": learned.fusion_in_use(args.device), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "rounds": args.rounds, "steps_per_round": args.steps,
        "steps": steps, "unroll": unrolls, "summary": summary, "target_mlp_step_over_adam": TARGET_RATIO},
        indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
