"""Quality of meta-trained L2Os against tuned baselines (not a timed test).

    python benchmarks/l2o_quality.py --recipe default --epochs 10 --runs 10 \\
        --optimizees leaky_relu,sigmoid --meta-seeds 3 --test-seeds 5 \\
        --unseen relu,sigmoid_2x20 --jobs 2 --out benchmarks/results/l2o_quality

1. Meta-trains one L2O per (optimizee, meta-training seed) with the recipe and budget
   given, each in its own process with one thread (`--jobs` at a time). A killed
   benchmark resumes: finished meta-trainings are kept, unfinished ones resume from
   their checkpoint.
2. Meta-tests each selected L2O for 200 steps on `--test-seeds` (the CLI's seed syntax:
   a count N is the first N report seeds, 100, 101, ...; no choice has seen them, and
   meta-training, validation and learning-rate searches never use them: seeds.py) on its
   own optimizee and on the unseen ones, next to SGD, Adam and Lion with learning rates
   searched on the validation split (runner.search_lr, 200 steps). A comparison that
   chooses (a recipe, a variant) passes selection seeds instead: `--test-seeds 0-4`.
3. Prints a table and writes JSON: mean minibatch training loss over steps 1-25 and
   1-100, and the loss at step 200 (mean of the last 3 logged steps), each as mean
   [95% interval]; for the L2O the interval is over meta-training seeds (each seed's
   value first averaged over the test seeds), for a baseline over the test seeds.
   Also: collapses (collapse flags raised during meta-training; L2Os that ended with
   loss @ 200 above 1.5), wall time per meta-training, and the issue's targets.

`--set key=value` overrides any MetaTrainConfig field (for ablations), `--tag`
names the variant (its own directory under --out/runs/).
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("sgd", "adam", "lion")
EARLY, MID, WINDOW = 25, 100, 3
TARGETS = {"collapsed": 0, "early_below_adam": "every meta-training seed", "final_vs_adam": 1.10,
           "meta_train_minutes": 45}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _train_one(args: tuple) -> dict:
    """Meta-train one L2O (in a worker with one thread); returns its summary."""
    recipe_name, overrides, optimizee, seed, out_dir = args
    import torch
    torch.set_num_threads(1)
    from l2o_dynamics import data, meta

    out = Path(out_dir)
    done = out / "summary.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = meta.recipe(recipe_name, **{**overrides, "optimizee": optimizee, "seed": seed})
    started, cpu = time.time(), time.process_time()
    prior = json.loads((out / "wall.json").read_text())["s"] if (out / "wall.json").exists() else 0.0
    res = meta.meta_train(cfg, out, data=data.load_mnist(verbose=False), resume=True, progress=False)
    rows = res.log.entries
    summary = {"optimizee": optimizee, "seed": seed, "config": cfg.to_dict(),
               "wall_s": prior + time.time() - started, "best_score": res.best_score,
               "cpu_s": time.process_time() - cpu,  # this process's (a resumed run: its last part only)
               "best_epoch": res.best_epoch, "skipped": res.skipped,
               "collapse_flags": sum(1 for m, _, _ in rows if m == "collapse"),
               "rollbacks": sum(1 for m, _, _ in rows if m == "rollback"),
               "meta_steps": cfg.total_meta_steps(), "l2o": str(out / "l2o.pt")}
    done.write_text(json.dumps(summary, indent=1))
    return summary


def train_all(work: list[tuple], jobs: int) -> list[dict]:
    """`_train_one` over `work`, `jobs` processes at a time (one thread each)."""
    if jobs > 1:
        from l2o_dynamics.procs import die_with_parent

        # workers end with this process, even on kill -9 (no orphans training on)
        with mp.get_context("spawn").Pool(jobs, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            return pool.map(_train_one, work, chunksize=1)
    return [_train_one(w) for w in work]


def _curve_stats(log) -> dict[str, np.ndarray]:
    c = log.curve("train_loss")  # (T, S)
    return {"early": c[1:EARLY + 1].mean(0), "mid": c[1:MID + 1].mean(0), "final": c[-WINDOW:].mean(0)}


def evaluate(summaries: list[dict], optimizees: list[str], unseen: list[str], test_seeds: tuple[int, ...],
             steps: int = 200) -> dict:
    from l2o_dynamics import data, learned, runner
    from l2o_dynamics.analysis import interval
    from l2o_dynamics.optimizers import make_baseline

    ds = data.load_mnist(verbose=False)
    seeds = list(test_seeds)
    results: dict = {}
    for trained_on in optimizees:
        mine = [s for s in summaries if s["optimizee"] == trained_on]
        for target in [trained_on, *unseen]:
            row: dict = {}
            for name in BASELINES:
                lr = runner.search_lr(name, target, ds, steps).lr
                log = runner.meta_test(make_baseline(name, lr=lr), target, ds.split("train"), seeds, steps)
                st = _curve_stats(log)
                row[name] = {"lr": lr, **{k: interval(v.tolist()) for k, v in st.items()},
                             "per_seed": {k: v.tolist() for k, v in st.items()}}
            per_l2o = []
            for s in mine:
                log = runner.meta_test(learned.l2o_from_checkpoint(s["l2o"]), target, ds.split("train"),
                                       seeds, steps)
                st = _curve_stats(log)
                per_l2o.append({"seed": s["seed"], **{k: v.tolist() for k, v in st.items()}})
            means = {k: [float(np.mean(p[k])) for p in per_l2o] for k in ("early", "mid", "final")}
            adam = row["adam"]["per_seed"]
            row["l2o"] = {
                **{k: interval(v) for k, v in means.items()}, "per_meta_seed": per_l2o,
                # fast start: the L2O's mean over test seeds below Adam's, per meta-training seed
                "early_below_adam": sum(m < float(np.mean(adam["early"])) for m in means["early"]),
                "final_vs_adam": [m / float(np.mean(adam["final"])) for m in means["final"]],
                "ended_collapsed": sum(m > 1.5 for m in means["final"]),
            }
            results[f"{trained_on}->{target}"] = row
    return results


def fmt(iv) -> str:
    m, lo, hi = iv
    return "n/a" if not math.isfinite(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def table(results: dict, summaries: list[dict], meta_seeds: int) -> str:
    lines = ["| trained on -> tested on | optimizer | loss, steps 1-25 | loss, steps 1-100 | loss @ 200 |",
             "|---|---|---|---|---|"]
    for key, row in results.items():
        for name in (*BASELINES, "l2o"):
            r = row[name]
            label = f"{name} (lr {r['lr']:g})" if name != "l2o" else f"L2O ({meta_seeds} meta-seeds)"
            lines.append(f"| {key} | {label} | {fmt(r['early'])} | {fmt(r['mid'])} | {fmt(r['final'])} |")
    lines += ["", "| trained on -> tested on | L2O early < Adam (meta-seeds) | L2O loss@200 / Adam's "
              "(per meta-seed) | ended collapsed |", "|---|---|---|---|"]
    for key, row in results.items():
        l = row["l2o"]
        lines.append(f"| {key} | {l['early_below_adam']} of {len(l['per_meta_seed'])} | "
                     f"{', '.join(f'{x:.2f}' for x in l['final_vs_adam'])} | {l['ended_collapsed']} |")
    lines += ["", "| meta-training | meta-steps | wall (min, 1 thread) | CPU (min) | best epoch | val score | "
              "collapse flags | rollbacks |", "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        cpu = f"{s['cpu_s'] / 60:.1f}" if "cpu_s" in s else "-"
        lines.append(f"| {s['optimizee']} seed {s['seed']} | {s['meta_steps']} | {s['wall_s'] / 60:.1f} | {cpu} | "
                     f"{s['best_epoch'] + 1} | {s['best_score']:.4f} | {s['collapse_flags']} | "
                     f"{s['rollbacks']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from l2o_dynamics.cli import SEEDS_HELP, seed_spec
    from l2o_dynamics.seeds import report_seeds

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="default")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--tag", default=None)
    p.add_argument("--optimizees", default="leaky_relu,sigmoid")
    p.add_argument("--unseen", default="relu,sigmoid_2x20")
    p.add_argument("--meta-seeds", type=int, default=3)
    p.add_argument("--test-seeds", type=seed_spec, default=report_seeds(5), metavar="SEEDS",
                   help=f"meta-test seeds: {SEEDS_HELP} (default 5: report seeds 100-104)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--train-only", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "l2o_quality"))
    a = p.parse_args(argv)
    from l2o_dynamics import meta
    from l2o_dynamics.seeds import families_of
    overrides = _parse_set(a.set)
    meta.recipe(a.recipe, **overrides).validate()  # fail before any work
    tag = a.tag or a.recipe
    out = Path(a.out)
    optimizees = [o for o in a.optimizees.split(",") if o]
    unseen = [o for o in a.unseen.split(",") if o]
    work = [(a.recipe, overrides, o, seed, str(out / "runs" / tag / o / f"seed{seed}"))
            for o in optimizees for seed in range(a.meta_seeds)]
    started = time.time()
    summaries = train_all(work, a.jobs)
    if a.train_only:
        return 0
    import torch
    torch.set_num_threads(max(1, min(a.jobs, os.cpu_count() or 1)))
    results = evaluate(summaries, optimizees, unseen, a.test_seeds)
    text = f"Meta-test on {families_of(a.test_seeds)} (seeds.py).\n\n" + table(results, summaries, a.meta_seeds)
    print(text)
    blob = {"recipe": a.recipe, "overrides": overrides, "tag": tag, "targets": TARGETS,
            "test_seeds": list(a.test_seeds), "test_seed_families": families_of(a.test_seeds),
            "wall_s": time.time() - started, "summaries": summaries, "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(blob, indent=1))
    (out / f"{tag}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
