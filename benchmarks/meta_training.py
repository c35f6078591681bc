"""Speed and memory of meta-training and meta-testing on leaky_relu (784-20-10).

    python benchmarks/meta_training.py [--repeats 5] [--device cpu]

Each configuration runs in its own subprocess (so its peak memory is its own):
  reference   the slow, obviously-correct implementation of tests/test_meta.py:
              one LSTM call per tensor, autograd through the unrolled optimizee
  eager B=1   the fast path with the eager LSTM cell (one call for all coordinates)
  fused B=1   the fast path with torch.compile-fused element-wise kernels
  fused B=4   four optimizee runs meta-trained together in one computation
and the meta-test step of the L2O and of Adam. Prints a table, writes JSON to
benchmarks/results/meta_training.json. Numbers are medians over repeats; the
machine may be shared, so read ratios measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"unroll_B1_s": 0.25, "per_task_speedup_B4": 1.5, "l2o_step_ms": 5.0}


def _setup(B: int, device: str):
    import torch

    from l2o_dynamics import data as D
    from l2o_dynamics.learned import L2O, init_phi
    from l2o_dynamics.optimizees import ZOO
    from l2o_dynamics.runner import init_params
    from l2o_dynamics.seeds import generator

    ds = D.load_mnist(verbose=False)
    train = tuple(t.to(device) for t in ds.split("train"))
    model = ZOO["leaky_relu"]
    phi = {k: v.requires_grad_() for k, v in init_phi(generator("phi", 0), device=device).items()}
    params = init_params(model, list(range(B)), device=device)
    batchers = [D.Batcher(*train, seed=s, device=device) for s in range(B)]
    return torch, model, L2O(phi), params, batchers, D


def _sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_unroll(B: int, fusion: str, repeats: int, device: str) -> dict:
    from l2o_dynamics import learned
    from l2o_dynamics.meta import unroll

    learned.set_fusion(fusion)
    torch, model, l2o, params, batchers, D = _setup(B, device)
    state = l2o.init(params, batch_ndim=1)
    x, y = D.stack_batches(batchers)
    _, grads, _ = model.loss_and_grad(params, x, y)
    times = []
    for i in range(repeats + 2):  # two warm-ups (compilation)
        _sync(torch, device)
        t0 = time.perf_counter()
        out = unroll(l2o, model, params, state, grads, lambda: D.stack_batches(batchers), 20)
        out.meta_loss.mean().backward()
        _sync(torch, device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
        params = {k: v.detach() for k, v in out.params.items()}
        state, grads = l2o.detach_state(out.state), out.grads
    med = statistics.median(times)
    return {"unroll_s": med, "per_task_s": med / B, "times": times}


def bench_reference(repeats: int, device: str) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_meta import reference_unroll

    torch, model, l2o, params, batchers, D = _setup(1, device)
    params = {k: v[0] for k, v in params.items()}
    times = []
    for _ in range(repeats):
        batches = [next(batchers[0]) for _ in range(21)]
        _sync(torch, device)
        t0 = time.perf_counter()
        loss = reference_unroll(l2o.phi, model, params, batches, 20)
        torch.autograd.grad(loss, list(l2o.phi.values()))
        _sync(torch, device)
        times.append(time.perf_counter() - t0)
    return {"unroll_s": statistics.median(times), "per_task_s": statistics.median(times), "times": times}


def bench_step(optimizer: str, repeats: int, device: str, steps: int = 50) -> dict:
    from l2o_dynamics import learned
    from l2o_dynamics.optimizers import Adam

    torch, model, l2o, params, batchers, D = _setup(1, device)
    opt = L2O_detached(l2o) if optimizer == "l2o" else Adam(lr=1e-2)
    learned.set_fusion("auto")
    times = []
    with torch.no_grad():
        state = opt.init(params, batch_ndim=1)
        for i in range(steps + 5):
            _sync(torch, device)
            t0 = time.perf_counter()
            x, y = D.stack_batches(batchers)
            _, grads, _ = model.loss_and_grad(params, x, y)
            upd, state = opt.update(grads, state, params)
            params = {k: params[k] + upd[k] for k in params}
            _sync(torch, device)
            if i >= 5:
                times.append(time.perf_counter() - t0)
    return {"step_ms": 1000 * statistics.median(times)}


def L2O_detached(l2o):
    from l2o_dynamics.learned import L2O

    return L2O({k: v.detach() for k, v in l2o.phi.items()})


def run_one(name: str, repeats: int, device: str) -> dict:
    import torch

    if name == "reference":
        res = bench_reference(max(1, repeats // 2), device)
    elif name.startswith("unroll"):
        _, fusion, B = name.split(":")
        res = bench_unroll(int(B), fusion, repeats, device)
    else:
        res = bench_step(name.split(":")[1], repeats, device)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        res["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["threads"] = torch.get_num_threads()
    return res


CONFIGS = [("reference", "reference (per tensor, autograd through optimizee), B=1"),
           ("unroll:eager:1", "fast path, eager cell, B=1"),
           ("unroll:auto:1", "fast path, fused cell, B=1"),
           ("unroll:auto:4", "fast path, fused cell, B=4"),
           ("step:l2o", "meta-test step, L2O (fused, no grad)"),
           ("step:adam", "meta-test step, Adam")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "meta_training.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.repeats, args.device)))
        return
    results = {}
    for name, desc in CONFIGS:
        r = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats),
                            "--device", args.device], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        if r.returncode:
            print(f"{name} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        results[name] = {"description": desc, **json.loads(r.stdout.strip().splitlines()[-1])}
    ref = results.get("reference", {}).get("unroll_s")
    b1 = results.get("unroll:auto:1", {}).get("per_task_s")
    summary = {
        "unroll_B1_s": b1,
        "speedup_vs_reference": ref / b1 if ref and b1 else None,
        "per_task_speedup_B4": b1 / results["unroll:auto:4"]["per_task_s"] if b1 and "unroll:auto:4" in results else None,
        "l2o_step_ms": results.get("step:l2o", {}).get("step_ms"),
        "adam_step_ms": results.get("step:adam", {}).get("step_ms"),
    }
    print(f"\nmeta-training benchmark on leaky_relu (784-20-10, P = 15,910), device {args.device}, "
          f"median of {args.repeats}\n")
    print(f"{'configuration':<62} {'s / unroll':>10} {'s / task':>9} {'ms / step':>9} {'peak MB':>8}")
    for name, r in results.items():
        u = f"{r['unroll_s']:.3f}" if "unroll_s" in r else ""
        t = f"{r['per_task_s']:.3f}" if "per_task_s" in r else ""
        s = f"{r['step_ms']:.2f}" if "step_ms" in r else ""
        print(f"{r['description']:<62} {u:>10} {t:>9} {s:>9} {r['peak_rss_mb']:>8.0f}")
    print()
    for k, v in summary.items():
        target = TARGETS.get(k)
        tgt = f"  (target {'<=' if k != 'per_task_speedup_B4' else '>='} {target})" if target else ""
        print(f"{k:<24} {v:.3f}{tgt}" if v is not None else f"{k:<24} n/a")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    import platform

    import torch

    Path(args.out).write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                          "machine": platform.processor() or platform.machine(),
                                          "cpus": os.cpu_count(), "repeats": args.repeats,
                                          "results": results, "summary": summary, "targets": TARGETS},
                                         indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
