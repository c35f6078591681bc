"""Train the shipped set of L2Os and install them into the package.

    python tools/train_pretrained.py [--epochs 8 --runs 50] [--jobs 2] [--install]

The set: the study's eight (leaky_relu with its rescale penalty and bn_relu with its
scale penalty, each at beta 0, 0.1, 0.5, 1) and sigmoid (Andrychowicz et al.'s
Fig. 4 setting), all with the default recipe (meta.RECIPES['default']) and
meta-training seed 0. Each meta-training runs in its own process with one thread
(benchmarks/l2o_quality.py's worker, so the beta = 0 ones are the same runs as that
benchmark's seed 0) and resumes after a kill. `--install` copies each selected
`l2o.pt` to src/l2o_dynamics/pretrained/<optimizee>/beta=<b>.pt and writes the
model cards (pretrained/README.md): recipe, scale, wall time, validation score and
a meta-test against tuned SGD, Adam and Lion on the report seeds 100-104 (seeds.py: no
choice of this project has seen them).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # l2o_quality's worker (importable in spawned workers too)
SET = [("leaky_relu", b) for b in (0.0, 0.1, 0.5, 1.0)] + [("bn_relu", b) for b in (0.0, 0.1, 0.5, 1.0)] \
    + [("sigmoid", 0.0)]
PENALTY = {"leaky_relu": "rescale", "bn_relu": "scale"}


def _quality():
    import l2o_quality

    return l2o_quality


def work_items(epochs: int, runs: int, out: Path) -> list[tuple]:
    items = []
    for optimizee, beta in SET:
        overrides = {"epochs": epochs, "runs": runs}
        tag = "default"
        if beta:
            overrides.update(reg=PENALTY[optimizee], beta=beta)
            tag = f"default_beta{beta:g}"
        items.append(("default", overrides, optimizee, 0, str(out / "runs" / tag / optimizee / "seed0")))
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--install", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "l2o_quality"))
    p.add_argument("--cards-only", action="store_true",
                   help="train nothing: re-measure the shipped set (manifest.json) and rewrite the model cards")
    a = p.parse_args(argv)
    if a.cards_only:
        from l2o_dynamics.learned import PRETRAINED_DIR

        manifest = json.loads((Path(PRETRAINED_DIR) / "manifest.json").read_text())
        install([{**entry, "l2o": str(Path(PRETRAINED_DIR) / f"{name}.pt")} for name, entry in manifest.items()])
        return 0
    summaries = _quality().train_all(work_items(a.epochs, a.runs, Path(a.out)), a.jobs)
    if a.install:
        install(summaries)
    return 0


def install(summaries: list[dict]) -> None:
    import torch

    from l2o_dynamics import data, runner
    from l2o_dynamics.files import atomic_write_bytes
    from l2o_dynamics.learned import PRETRAINED_DIR, l2o_from_checkpoint
    from l2o_dynamics.optimizers import make_baseline
    from l2o_dynamics.seeds import lr_search_seeds, report_seeds

    torch.set_num_threads(2)
    ds = data.load_mnist(verbose=False)
    seeds = list(report_seeds(5))
    cards = []
    for s in summaries:
        cfg = s["config"]
        name = f"{cfg['optimizee']}/beta={cfg['beta']:g}"
        dest = Path(PRETRAINED_DIR) / f"{name}.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(s["l2o"]).resolve() != dest.resolve():
            atomic_write_bytes(dest, Path(s["l2o"]).read_bytes())  # renamed into place, never written through
        rows = []
        for opt_name in ("sgd", "adam", "lion", "l2o"):
            if opt_name == "l2o":
                opt, label = l2o_from_checkpoint(str(dest)), "L2O"
            else:
                lr = runner.search_lr(opt_name, cfg["optimizee"], ds, runner.STUDY_LR_HORIZON,
                                      seeds=lr_search_seeds(runner.STUDY_LR_RUNS)).lr  # the study's protocol
                opt, label = make_baseline(opt_name, lr=lr), f"{opt_name} (lr {lr:g})"
            c = runner.meta_test(opt, cfg["optimizee"], ds.split("train"), seeds, 200).curve("train_loss")
            rows.append(f"| {label} | {c[1:26].mean():.3f} | {c[1:101].mean():.3f} | {c[-3:].mean():.3f} |")
        cards.append(_card(name, s, rows, seeds))
    head = Path(ROOT / "tools" / "pretrained_header.md").read_text()
    (Path(PRETRAINED_DIR) / "README.md").write_text(head + "\n" + "\n".join(cards))
    (Path(PRETRAINED_DIR) / "manifest.json").write_text(json.dumps(
        {f"{s['config']['optimizee']}/beta={s['config']['beta']:g}": {k: v for k, v in s.items() if k != "l2o"}
         for s in summaries}, indent=1, sort_keys=True))


def _card(name: str, s: dict, rows: list[str], seeds: list[int]) -> str:
    from l2o_dynamics.seeds import families_of

    cfg = s["config"]
    penalty = f"{cfg['reg']} penalty, beta {cfg['beta']:g}" if cfg.get("reg") else "no penalty"
    return "\n".join([
        f"## `pretrained:{name}`", "",
        f"Meta-trained on `{cfg['optimizee']}` ({penalty}) with the default recipe: "
        f"{cfg['epochs']} epochs x {cfg['runs']} runs of {cfg['horizon']} steps, {cfg['short_runs']:.0%} of "
        f"them cut to their first unroll ({s['meta_steps']} meta-steps of unroll {cfg['unroll']}), "
        f"meta-lr {cfg['meta_lr']:g}, "
        f"meta-gradient clipped at {cfg['clip_grad']:g}, rollback at {cfg['rollback']:g}x the best "
        f"validation score, collapse monitor at drift {cfg['collapse']:g}; meta-training seed {cfg['seed']}. "
        f"{s['wall_s'] / 60:.1f} min on one thread of the 2-core CPU (torch 2.13, another job on the "
        f"other core). Selected epoch {s['best_epoch'] + 1} of {cfg['epochs']}: validation score "
        f"{s['best_score']:.4f} (mean minibatch loss over 200 steps, 3 held-out runs on the validation "
        f"split). Collapse flags raised: {s['collapse_flags']}; rollbacks: {s['rollbacks']}.", "",
        f"Meta-test on `{cfg['optimizee']}`, {families_of(seeds)} (no choice saw them), 200 steps, "
        "minibatch training loss "
        "(mean over seeds; baselines with learning rates searched on the validation split):", "",
        "| optimizer | steps 1-25 | steps 1-100 | @ 200 (mean of last 3) |", "|---|---|---|---|", *rows, ""])


if __name__ == "__main__":
    sys.exit(main())
