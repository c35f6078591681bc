"""Speed of the meta-gradient estimators on leaky_relu (784-20-10), one task, K = 20.

    python benchmarks/estimators.py [--repeats 3] [--pairs 1,4,8,16] [--device cpu]

Times one meta-step (one truncation of K optimizee steps and its meta-gradient) of
  tbptt      autograd through the K steps (what meta_train runs by default)
  es N       antithetic ES over the truncation: 2N + 1 copies, one batched forward computation
  pes N      persistent ES: 2N copies, one batched forward computation
in one process, round-robin over the configurations in each repeat (so a busy machine slows
them alike), and reports the median seconds and its ratio to TBPTT's. Data: random images
(timings do not depend on the pixels). Prints a table, writes JSON to
benchmarks/results/estimators.json. The issue's target: PES with N = 8 at most 4x TBPTT.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = {"pes_N8_over_tbptt": 4.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", default="1,4,8,16")
    ap.add_argument("--unroll", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "estimators.json"))
    args = ap.parse_args()

    import torch

    from l2o_dynamics import estimators as E
    from l2o_dynamics.data import Batcher
    from l2o_dynamics.env import resolve_device
    from l2o_dynamics.learned import L2O, fusion_in_use, init_phi
    from l2o_dynamics.optimizees import ZOO

    device = resolve_device(args.device)
    model = ZOO["leaky_relu"]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6000, 784), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (6000,), generator=g)
    phi = init_phi(torch.Generator().manual_seed(1), device=device)
    net = L2O(phi)

    def factory(b, run):
        params = model.init(torch.Generator().manual_seed(1000 * run + b), device=device)
        return params, Batcher(x, y, batch_size=128, seed=run, device=device)

    configs = {"tbptt": E.Settings(estimator="tbptt", unroll=args.unroll, horizon=10 ** 6, offsets=False)}
    for n in [int(v) for v in args.pairs.split(",")]:
        for kind in ("es", "pes"):
            configs[f"{kind} N={n}"] = E.Settings(estimator=kind, unroll=args.unroll, horizon=10 ** 6,
                                                  offsets=False, pairs=n)
    made = {name: E.make(s, net, model, factory, torch.Generator().manual_seed(2), device=device)
            for name, s in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for name, est in made.items():  # warm-up: first calls (and torch.compile of the cell, if on)
        est.estimate(phi)
    for r in range(args.repeats):
        for name, est in made.items():
            sync()
            t = time.perf_counter()
            est.estimate(phi)
            sync()
            times[name].append(time.perf_counter() - t)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    base = statistics.median(times["tbptt"])
    rows = {name: {"seconds": statistics.median(ts), "ratio_to_tbptt": statistics.median(ts) / base,
                   "copies": 1 if name == "tbptt" else 2 * configs[name].pairs + (name.startswith("es"))}
            for name, ts in times.items()}
    print(f"\nmeta-step of K={args.unroll} steps on leaky_relu, {device}, threads {torch.get_num_threads()}, "
          f"fusion {fusion_in_use(device)}; median of {args.repeats}")
    print(f"{'estimator':<12}{'copies':>8}{'s / meta-step':>16}{'x tbptt':>10}")
    for name, row in rows.items():
        print(f"{name:<12}{row['copies']:>8}{row['seconds']:>16.3f}{row['ratio_to_tbptt']:>10.2f}")
    pes8 = rows.get("pes N=8", {}).get("ratio_to_tbptt")
    if pes8 is not None:
        print(f"target: pes N=8 at most {TARGET['pes_N8_over_tbptt']}x tbptt -> {pes8:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                               "threads": torch.get_num_threads(), "fusion": fusion_in_use(device),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "unroll": args.unroll,
                               "repeats": args.repeats, "results": rows, "target": TARGET}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
