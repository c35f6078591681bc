"""Meta-train a recipe's set of L2Os and ship them with model cards.

    python tools/ship_recipe.py COLLECTION train [--only leaky_relu/beta=0 ...] [--jobs 2]   # resumable
    python tools/ship_recipe.py COLLECTION install RUN_DIR [RUN_DIR ...]                      # finished runs
    python tools/ship_recipe.py COLLECTION cards                                              # rewrite the cards

COLLECTION is `authors` (the LSTM with the study's recipe as its authors' code runs it,
`meta.RECIPES['authors']`, about 85-120 min each on one core) or `mlp` (the per-parameter MLP
L2O of mlp_lopt.py with `meta.RECIPES['mlp']`, about 6 min each). Each set is the study's
eight: leaky_relu with its rescale penalty and bn_relu with its scale penalty, each at beta 0,
0.1, 0.5, 1, meta-training seed 0. `train` runs them (benchmarks/l2o_quality.py's worker: one
thread each, `--jobs` at a time, resumes after a kill) and installs each one that finishes.
`install` takes the directories of finished `l2o-dynamics meta-train --recipe COLLECTION`
runs (l2o.pt, config.json, metrics.csv) instead.

Installing copies the selected l2o.pt to src/l2o_dynamics/pretrained/COLLECTION/<optimizee>/
beta=<b>.pt (loadable as `pretrained:COLLECTION/<optimizee>[/beta=<b>]`), draws its
meta-training curve (docs/figures/COLLECTION/), meta-tests it next to SGD, Adam and Lion on
the report seeds 100-104 (seeds.py: no choice of this project saw them; the baselines'
learning rates searched by the study's protocol, 500 steps x 3 runs on the validation
split), and rewrites pretrained/COLLECTION/manifest.json and README.md (the model cards).
A run that collapsed is shipped all the same and its card says so: it is what the recipe gives.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # l2o_quality's worker (importable in spawned workers too)
from l2o_dynamics.errors import L2OError  # noqa: E402 (after the path above)
SET = [(o, b) for o in ("leaky_relu", "bn_relu") for b in (0.0, 0.1, 0.5, 1.0)]
PENALTY = {"leaky_relu": "rescale", "bn_relu": "scale"}
TEST_SEEDS = 5
# post hoc collapse episodes (for a recipe without the monitor): as meta.COLLAPSE_UNROLLS
# unrolls running with drift above DRIFT while the optimizee's hidden units die (meta.DEAD)
DRIFT = 0.9
META_TEST = ("Meta-tests below: 200 steps on the report seeds 100-104 (seeds.py: no choice of this project "
             "saw them), minibatch training loss, mean over seeds, next to SGD (momentum 0.9), Adam and Lion "
             "with learning rates searched by the study's protocol (every rate of the grid 1e-4 .. 3 for 500 "
             "steps in 3 runs on the validation split; lowest summed training loss).")


@dataclass(frozen=True)
class Collection:
    name: str  # the recipe (meta.RECIPES) and the directory under pretrained/
    intro: tuple[str, ...]  # the cards' opening paragraphs
    cost: str  # of one meta-training, for the "not shipped yet" line

    def check(self, cfg: dict, run_dir: Path) -> None:
        """L2OError unless `cfg` (a run's config) was meta-trained with this recipe."""
        from l2o_dynamics import meta

        expected = meta.recipe(self.name, optimizee=cfg["optimizee"]).to_dict()
        # what a run may change: its penalty, seed and device; everything else is the recipe's
        free = {"optimizee", "seed", "reg", "beta", "device", "dtype"}
        differ = sorted(k for k, v in expected.items() if k not in free and cfg.get(k, v) != v)
        if differ:
            raise L2OError(f"{run_dir} was not meta-trained with --recipe {self.name}: {', '.join(differ)} differ")


AUTHORS = Collection(
    "authors",
    ("# The study's L2Os: `--recipe authors`",
     "The coordinate-wise LSTM optimizer meta-trained with the study's own recipe as its authors' "
     "code runs it (`meta.RECIPES['authors']`; every setting with the authors' file and line in "
     "docs/replication.md): 50 epochs x 20 runs x 10 unrolls = 10,000 meta-steps, meta-Adam 1e-3, "
     "the losses before each update in the meta-loss, +1e-8 inside the preprocessing log, no "
     "clipping, rollback or collapse monitor, and the epoch whose 3 fresh runs on the training "
     "split have the lowest training loss kept. One difference stays: every run draws its own "
     "minibatch order (the authors' runs all share seed 0's). Written by "
     "`python tools/ship_recipe.py authors` (which also retrains them). Load one by name:",
     "    learned.l2o_from_checkpoint(\"pretrained:authors/leaky_relu\")   # = authors/leaky_relu/beta=0"),
    "about 85 min on one core")
MLP = Collection(
    "mlp",
    ("# The per-parameter MLP L2Os: `--recipe mlp`",
     "The learned optimizer of Metz et al. (2022), `small_fc_lopt` / AdafacMLP (mlp_lopt.py: 39 "
     "features per parameter, an MLP 39 -> 32 -> 32 -> 2, update = d * exp(m * 1e-3) * 1e-3 as in the reference), "
     "meta-trained with `meta.RECIPES['mlp']`: the default recipe's meta-training (docs/mlp_l2o.md "
     "says how it was chosen, on selection seeds) with 8 epochs x 50 runs, 90% of them cut to their "
     "first unroll: 760 meta-steps of truncated backpropagation over 20 steps, meta-Adam 1e-3, the "
     "meta-gradient clipped at 1, rollback at 1.5x the best validation score, collapse monitor at "
     "drift 0.9, the epoch with the lowest mean loss of 3 held-out runs on the validation split kept. "
     "Written by `python tools/ship_recipe.py mlp` (which also retrains them). Load one by name:",
     "    learned.l2o_from_checkpoint(\"pretrained:mlp/leaky_relu\")   # = mlp/leaky_relu/beta=0"),
    "about 6 min on one core")
COLLECTIONS = {c.name: c for c in (AUTHORS, MLP)}


def name_of(optimizee: str, beta: float) -> str:
    return f"{optimizee}/beta={beta:g}"


def _dest_dir(c: Collection) -> Path:
    from l2o_dynamics.learned import PRETRAINED_DIR

    return Path(PRETRAINED_DIR) / c.name


def _figures(c: Collection) -> Path:
    return ROOT / "docs" / "figures" / c.name


def work_items(c: Collection, only: list[str], out: Path) -> list[tuple]:
    items = []
    for optimizee, beta in SET:
        if only and name_of(optimizee, beta) not in only:
            continue
        overrides = {"reg": PENALTY[optimizee], "beta": beta} if beta else {}
        items.append((c.name, overrides, optimizee, 0, str(out / f"{optimizee}-beta{beta:g}")))
    return items


def collapse_episodes(table) -> int:
    """Episodes of >= meta.COLLAPSE_UNROLLS consecutive meta-steps with drift > DRIFT and a
    dead share of hidden units >= meta.DEAD (the monitor's rule, read off metrics.csv)."""
    import numpy as np

    from l2o_dynamics.meta import COLLAPSE_UNROLLS, DEAD

    drift = table.where(metric="drift").matrix()[2][:, 0]
    dead = table.where(metric="dead_frac").matrix()[2][:, 0]
    bad = np.concatenate([(drift > DRIFT) & (dead >= DEAD), [False]])
    episodes, run = 0, 0
    for b in bad:
        if b:
            run += 1
        else:
            episodes += run >= COLLAPSE_UNROLLS
            run = 0
    return int(episodes)


def summary_of_run(c: Collection, run_dir: Path) -> dict:
    """What a finished meta-training of the collection's recipe records (config.json, metrics.csv)."""
    from l2o_dynamics.meta import MetaTrainConfig
    from l2o_dynamics.results import Table

    if not (run_dir / "config.json").is_file() or not (run_dir / "l2o.pt").is_file():
        raise L2OError(f"{run_dir} is not a finished meta-training run (needs config.json and l2o.pt)")
    info = json.loads((run_dir / "config.json").read_text())
    cfg = info["config"]
    c.check(cfg, run_dir)
    table = Table.read(run_dir / "metrics.csv")
    return {"optimizee": cfg["optimizee"], "config": cfg, "wall_s": info.get("wall_time_s"),
            "best_score": info["best_score"], "best_epoch": info["best_epoch"], "skipped": info["skipped"],
            "collapse_episodes": collapse_episodes(table),
            "collapse_flags": len(table.where(metric="collapse")),
            "rollbacks": len(table.where(metric="rollback")),
            "meta_steps": MetaTrainConfig.from_dict(cfg).total_meta_steps(), "l2o": str(run_dir / "l2o.pt"),
            "metrics": str(run_dir / "metrics.csv")}


def measure(optimizee: str, l2o_path: str) -> dict:
    """Meta-test of the installed L2O beside the tuned baselines on the report seeds."""
    from l2o_dynamics import data, runner
    from l2o_dynamics.learned import l2o_from_checkpoint
    from l2o_dynamics.optimizers import make_baseline
    from l2o_dynamics.seeds import lr_search_seeds, report_seeds

    ds = data.load_mnist(verbose=False)
    seeds = list(report_seeds(TEST_SEEDS))
    rows = {}
    for opt_name in ("sgd", "adam", "lion", "l2o"):
        if opt_name == "l2o":
            opt, lr = l2o_from_checkpoint(l2o_path), None
        else:
            lr = runner.search_lr(opt_name, optimizee, ds, runner.STUDY_LR_HORIZON,
                                  seeds=lr_search_seeds(runner.STUDY_LR_RUNS)).lr
            opt = make_baseline(opt_name, lr=lr)
        c = runner.meta_test(opt, optimizee, ds.split("train"), seeds, 200).curve("train_loss")  # (201, S)
        rows[opt_name] = {"lr": lr, "early": float(c[1:26].mean()), "mid": float(c[1:101].mean()),
                          "final": float(c[-3:].mean())}
    return {"seeds": seeds, "rows": rows}


def install(c: Collection, summaries: list[dict]) -> None:
    import torch

    from l2o_dynamics import plotting
    from l2o_dynamics.files import atomic_write_bytes, atomic_write_text
    from l2o_dynamics.results import Table

    torch.set_num_threads(2)
    dest = _dest_dir(c)
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    _figures(c).mkdir(parents=True, exist_ok=True)
    for s in summaries:
        cfg = s["config"]
        name = name_of(cfg["optimizee"], cfg["beta"])
        target = dest / f"{name}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(target, Path(s["l2o"]).read_bytes())  # renamed into place, never written through
        figure = _figures(c) / f"{cfg['optimizee']}_beta{cfg['beta']:g}.png"
        plotting.meta_training_figure(Table.read(s["metrics"]), figure)
        entry = {k: v for k, v in s.items() if k not in ("l2o", "metrics")}
        entry["figure"] = str(figure.relative_to(ROOT))
        entry["meta_test"] = measure(cfg["optimizee"], str(target))
        manifest[name] = entry
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True))
    write_cards(c, manifest)


def _monitoring(s: dict) -> str:
    cfg = s["config"]
    if cfg.get("collapse") is not None:
        return (f"Collapse flags raised by the monitor: {s.get('collapse_flags', 0)}; rollbacks: "
                f"{s.get('rollbacks', 0)}.")
    return (f"Collapse episodes (3 unrolls running with update drift above {DRIFT} while half the optimizee's "
            f"hidden units are dead; the recipe has no monitor, so they are counted afterwards): "
            f"{s['collapse_episodes']}.")


def _selection(s: dict) -> str:
    cfg = s["config"]
    if cfg.get("select") == "train-runs":
        return f"mean training loss {s['best_score']:.4f} of its 3 selection runs"
    return f"validation score {s['best_score']:.4f} (mean minibatch loss of 3 held-out runs on the validation split)"


def write_cards(c: Collection, manifest: dict) -> None:
    from l2o_dynamics.files import atomic_write_text

    missing = [name_of(o, b) for o, b in SET if name_of(o, b) not in manifest]
    head = [p for para in c.intro for p in (para, "")] + [META_TEST, ""]
    if missing:
        head += [f"Not shipped yet (each {c.cost}): {', '.join(missing)}. Until they are, "
                 "the reports compare those settings with the default recipe's L2O only.", ""]
    cards = []
    for name in sorted(manifest):
        s = manifest[name]
        cfg = s["config"]
        penalty = f"{cfg['reg']} penalty, beta {cfg['beta']:g}" if cfg.get("reg") else "no penalty"
        measured = s["meta_test"]["rows"]  # in the order measured (manifest.json sorts the keys)
        rows = [f"| {_row_label(c, k, measured[k]['lr'])} | {measured[k]['early']:.3f} | {measured[k]['mid']:.3f} | "
                f"{measured[k]['final']:.3f} |" for k in ("sgd", "adam", "lion", "l2o") if k in measured]
        wall = (f"{s['wall_s'] / 60:.0f} min on one thread of the 2-core CPU" if s.get("wall_s")
                else "wall time not recorded")
        cards += [
            f"## `pretrained:{c.name}/{name}`", "",
            f"Meta-trained on `{cfg['optimizee']}` ({penalty}), meta-training seed {cfg['seed']}: "
            f"{s['meta_steps']:,} meta-steps, {wall} (torch 2.13). Selected epoch {s['best_epoch'] + 1} of "
            f"{cfg['epochs']}: {_selection(s)}. Skipped meta-steps (non-finite meta-loss): {s['skipped']}. "
            f"{_monitoring(s)} Meta-training curve: `{s['figure']}`.", "",
            "| optimizer | steps 1-25 | steps 1-100 | @ 200 (mean of last 3) |", "|---|---|---|---|",
            *rows, ""]
    atomic_write_text(_dest_dir(c) / "README.md", "\n".join(head + cards))


def _row_label(c: Collection, optimizer: str, lr: float | None) -> str:
    return f"L2O [{c.name}]" if optimizer == "l2o" else f"{optimizer} (lr {lr:g})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("collection", choices=sorted(COLLECTIONS))
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--only", nargs="*", default=[], help="names such as leaky_relu/beta=0")
    t.add_argument("--jobs", type=int, default=2)
    t.add_argument("--out", default=None, help="default: benchmarks/results/COLLECTION")
    i = sub.add_parser("install")
    i.add_argument("runs", nargs="+")
    sub.add_parser("cards")
    a = p.parse_args(argv)
    try:
        _run(COLLECTIONS[a.collection], a)
    except L2OError as e:  # a run of another recipe, a missing file: one line, exit 2
        print(f"ship_recipe: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(c: Collection, a: argparse.Namespace) -> None:
    if a.cmd == "train":
        import l2o_quality

        out = Path(a.out or ROOT / "benchmarks" / "results" / c.name)
        summaries = l2o_quality.train_all(work_items(c, a.only, out), a.jobs)
        install(c, [summary_of_run(c, Path(s["l2o"]).parent) for s in summaries])
    elif a.cmd == "install":
        install(c, [summary_of_run(c, Path(r)) for r in a.runs])
    else:
        write_cards(c, json.loads((_dest_dir(c) / "manifest.json").read_text()))


if __name__ == "__main__":
    sys.exit(main())
