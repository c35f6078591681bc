"""Outputs of a reproduction: merged metrics.csv, figures/, report.md and report.html.

The report is built as a list of blocks (heading, paragraph, table, image) that
render to both Markdown and HTML, so the two always say the same thing. With the L2Os
of several meta-training recipes (`l2o`, `l2o[authors]`), every finding is computed per
recipe's L2O and shown in one column per recipe; tables and figures show each L2O.
"""
from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any, Iterable

from . import analysis, plotting, published
from .experiments import Job, Profile, extra_meta, missing_pretrained
from .results import COLUMNS, PUBLISHED, Table, l2o_label, split_recipe
from .env import environment
from .files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .seeds import families_of

VERDICT = {"held": "held", "weak": "weak (CI includes 0)",
           "inconclusive-opposite": "inconclusive, opposite sign (CI includes 0)",
           "contradicted": "contradicted (CI excludes 0)",
           "n/a": "n/a (fewer than 3 usable seeds, L2Os or comparisons)"}
Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption)
ByRecipe = dict  # recipe (None: the main one, plain `l2o` labels) -> its L2Os' findings (analysis.findings_by_recipe)


def merge_metrics(store, jobs: Iterable[Job], path: Path) -> None:
    """Concatenate every job's metrics.csv (one header) into `path`, atomically."""
    parts = [",".join(COLUMNS) + "\n"]
    for job in jobs:
        f = store.path(job.key) / "metrics.csv"
        if f.is_file():
            body = f.read_text().split("\n", 1)
            if len(body) > 1:
                parts.append(body[1])
    atomic_write_text(path, "".join(parts))


def make_figures(table: Table, fig_dir: Path, experiments: Iterable[str]) -> dict[str, Path]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    experiments = set(experiments)
    if "symmetry-breaking" in experiments and len(table.where(experiment="symmetry-breaking")):
        out["symmetry_breaking.png"] = plotting.symmetry_figure(table, fig_dir / "symmetry_breaking.png")
        out["symmetry_breaking_rel.png"] = plotting.symmetry_figure(
            table, fig_dir / "symmetry_breaking_rel.png", "_rel")
        out["symmetry_breaking_unit.png"] = plotting.symmetry_figure(
            table, fig_dir / "symmetry_breaking_unit.png", "_unit")
        if any(str(m).endswith(f"_deviation{PUBLISHED}") for m in table.unique("metric")):
            out["symmetry_breaking_published.png"] = plotting.symmetry_figure(
                table, fig_dir / "symmetry_breaking_published.png", PUBLISHED)
    if "regularization" in experiments and len(table.where(experiment="regularization")):
        out["regularization.png"] = plotting.regularization_figure(table, fig_dir / "regularization.png")
        if len(table.where(experiment="generalization")):
            out["generalization.png"] = plotting.generalization_figure(table, fig_dir / "generalization.png")
    if "noise" in experiments and len(table.where(experiment="noise")):
        out["noise.png"] = plotting.noise_figure(table, fig_dir / "noise.png")
    if len(table.where(experiment="meta-train")):
        out["meta_training.png"] = plotting.meta_training_figure(table, fig_dir / "meta_training.png")
    if len(table.where(experiment="symmetry-breaking")) or len(table.where(experiment="noise")):
        out["study_overlay.png"] = plotting.study_overlay(table, fig_dir / "study_overlay.png")
    return out


def replace_marked(path: Path, name: str, text: str) -> bool:
    """Replace what lies between `<!-- NAME:start -->` and `<!-- NAME:end -->` in the file at
    `path` (a hand-written page with one generated part); a file without both markers is left
    alone. Returns whether it was replaced."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    try:
        page = path.read_text()
    except OSError:
        return False
    i, j = page.find(start), page.find(end)
    if i < 0 or j < i:
        return False
    atomic_write_text(path, page[:i + len(start)] + "\n" + text.rstrip("\n") + "\n" + page[j:])
    return True


def study_blocks(table: Table) -> list[Block]:
    """Our numbers beside the study's values read off its figures (published.py)."""
    blocks: list[Block] = []
    header, rows = published.fig1_rows(table)
    if rows:
        blocks += [("h", 3, "Figure 1 beside the study's values"),
                   ("p", "The study's values were read off its published figure by eye (about +-10%). 'As a "
                         "step' divides the study's L2O values by 10: its code plotted the L2O's raw network "
                         "output, 1/eta = 10x its step (docs/replication.md). 'As the study measured' is our "
                         "deviation with the same two slips (the L2O's raw output, SGD without momentum); "
                         "'corrected' is each optimizer's real step. Means over seeds."),
                   ("table", header, rows)]
    header, rows = published.covariance_rows(table)
    if rows:
        blocks += [("h", 3, "Figure 3 (right) beside the study's values"),
                   ("p", "Largest eigenvalue of the update covariance per checkpoint, leaky_relu; the study's "
                         "values read off its figure at iterations 1, 20 and 1000 ('-': not given)."),
                   ("table", header, rows)]
    return blocks


def _by_recipe(findings: list[analysis.Finding] | ByRecipe) -> ByRecipe:
    return findings if isinstance(findings, dict) else {None: findings}


def _columns(by_recipe: ByRecipe, names: dict | None) -> list[str]:
    """One heading per recipe's L2O: 'L2O (default recipe)', 'L2O [authors] (authors recipe)'."""
    names = names or {}
    return [f"{plotting.label(l2o_label('l2o', recipe=r))} ({names.get(r, r or 'main')} recipe)" for r in by_recipe]


def _keyed(by_recipe: ByRecipe) -> list[tuple[str, dict]]:
    """(finding key, {recipe: Finding}) in the order the findings come, main recipe first."""
    out: dict[str, dict] = {}
    for r, fs in by_recipe.items():
        for f in fs:
            out.setdefault(f.key, {})[r] = f
    return list(out.items())


NO_RUNS = "- (no L2O of this recipe here)"


def _verdict_cell(per: dict, r) -> str:
    """The verdict of recipe r's L2O on a finding; NO_RUNS where it has no runs behind the
    finding at all (a setting whose L2O is not shipped), which 'n/a' would misstate."""
    f = per.get(r)
    if f is None:
        return NO_RUNS
    empty = f.tests and all(len(f.stats.get(t, ())) == 0 and not getattr(f.stats.get(t), "diverged", 0)
                            for t in f.tests)
    return NO_RUNS if empty else VERDICT[f.verdict]


def findings_table(findings: list[analysis.Finding] | ByRecipe, names: dict | None = None
                   ) -> tuple[list[str], list[list[str]]]:
    """The findings and their verdicts: one verdict column, or one per recipe's L2O."""
    by_recipe = _by_recipe(findings)
    if len(by_recipe) == 1:
        (fs,) = by_recipe.values()
        return ["finding of the study", "held here?", "figure"], [[f.claim, VERDICT[f.verdict], f.figure or ""]
                                                                  for f in fs]
    header = ["finding of the study"] + [f"held here? {c}" for c in _columns(by_recipe, names)] + ["figure"]
    rows = []
    for _, per in _keyed(by_recipe):
        f0 = next(iter(per.values()))
        rows.append([f0.claim] + [_verdict_cell(per, r) for r in by_recipe]
                    + [f0.figure or ""])
    return header, rows


def _finding_blocks(by_recipe: ByRecipe, names: dict) -> list[Block]:
    """Per finding: its verdict(s), measure and values (one column per recipe's L2O)."""
    blocks: list[Block] = []
    if len(by_recipe) == 1:
        for f in next(iter(by_recipe.values())):
            blocks += [("h", 3, f.claim), ("p", f"Held here: **{VERDICT[f.verdict]}**. Measure: {f.measure}."),
                       ("table", ["quantity", "value"], [[k, v] for k, v in f.values.items()])]
        return blocks
    columns = _columns(by_recipe, names)
    for _, per in _keyed(by_recipe):
        f0 = next(iter(per.values()))
        held = "; ".join(f"{c}: **{_verdict_cell(per, r)}**" for c, r in zip(columns, by_recipe))
        quantities = list(dict.fromkeys(k for f in per.values() for k in f.values))
        blocks += [("h", 3, f0.claim), ("p", f"Held here: {held}. Measure: {f0.measure}."),
                   ("table", ["quantity"] + columns,
                    [[k] + [per[r].values.get(k, "") if r in per else "-" for r in by_recipe] for k in quantities])]
    return blocks


def _optimizers(table: Table) -> list[str]:
    """The baselines, then each recipe's L2O (`l2o`, `l2o[authors]`, ...) that `table` holds."""
    present = set(table.unique("optimizer"))
    return [o for o in ("sgd", "adam", "lion", "l2o") if o in present] + sorted(
        o for o in present if o.startswith("l2o[") and "(" not in o)


def _speed_block(table: Table) -> list[Block]:
    rows = analysis.speed_table(analysis.recipe_view(table))
    for r in analysis.recipes(table):  # the L2O of each further recipe below the main one's
        if r is not None:
            rows += [{**row, "optimizer": l2o_label("l2o", recipe=r)}
                     for row in analysis.speed_table(analysis.recipe_view(table, r)) if row["optimizer"] == "l2o"]
    if not rows:
        return []
    steps = [k for k in rows[0] if isinstance(k, int)]
    header = ["optimizee", "optimizer"] + [f"loss @ {s}" for s in steps]
    body = [[r["optimizee"], plotting.label(r["optimizer"])] + [analysis.fmt(r[s]) for s in steps]
            for r in rows]
    return [("h", 3, "Training loss at iterations 25, 50, 100, 200 (L2O with beta = 0)"),
            ("p", "Minibatch training loss averaged over a 3-iteration window ending at the step; "
                  "mean [95% CI] over seeds."),
            ("table", header, body)]


def _generalization_block(table: Table) -> list[Block]:
    gen = table.where(experiment="generalization", metric="train_loss")
    if not len(gen):
        return []
    header = ["L2O trained on", "tested on", "beta", "final loss (last 10 it.)", "mean loss (AUC / T)"]
    body = []
    for opt in gen.unique("optimizer"):
        for optimizee in gen.where(optimizer=opt).unique("optimizee"):
            sub = gen.where(optimizer=opt, optimizee=optimizee)
            for beta in [b for b in sub.unique("beta") if b is not None]:
                s = sub.where(beta=beta)
                T = int(s.cols["step"].max())
                final = analysis.per_seed(s, steps=(T - 9, T))
                name, recipe = split_recipe(opt)
                trained_on = (name[4:-1] if name.startswith("l2o(") else name) + (f" [{recipe}]" if recipe else "")
                body.append([trained_on, optimizee, f"{beta:g}",
                             analysis.fmt(list(final.values())), analysis.fmt(list(analysis.auc(s).values()))])
    return [("h", 3, "Regularised L2Os on optimizees they were not meta-trained on"),
            ("table", header, body)]


DEVIATION_MEASURES = {"": "total", PUBLISHED: "total as published", "_rel": "rel"}


def _deviation_block(table: Table) -> list[Block]:
    t = table.where(experiment="symmetry-breaking")
    if not len(t):
        return []
    header = ["optimizee / symmetry", "optimizer", "measure", "iteration 10", "iteration 50", "iteration 100"]
    body = []
    T = int(t.cols["step"].max())
    its = [min(i, T) for i in (10, 50, 100)]
    for optimizee, kind in analysis.SYM_PANELS:
        for opt in _optimizers(t):
            for suffix, measure in DEVIATION_MEASURES.items():
                sub = t.where(optimizee=optimizee, optimizer=opt, metric=f"{kind}_deviation{suffix}")
                if not len(sub):
                    continue
                cells = [analysis.fmt(list(analysis.per_seed(sub, steps=(i - 1, i - 1)).values())) for i in its]
                body.append([f"{optimizee} / {kind}", plotting.label(opt), measure, *cells])
    return [("h", 3, "Deviations at iterations 10, 50 and 100"),
            ("p", "'total' is the deviation of each optimizer's real step (the default); 'total as "
                  "published' is what the study's code measured: the L2O's raw network output (1/eta = 10x "
                  "its step) and SGD's -lr*g without its momentum; Adam's and Lion's are their steps in both."),
            ("table", header, body)]


NOISE_METRICS = {  # metric -> what it is, in the order of the report's noise table
    "alpha_grad_pub": "alpha of gradient noise, the study's estimator, exact centring",
    "alpha_update_pub": "alpha of update noise, the study's estimator, exact centring",
    "alpha_grad_pub" + PUBLISHED: "alpha of gradient noise, the study's estimator and float32 centring as published",
    "alpha_update_pub" + PUBLISHED: "alpha of update noise, the study's estimator and float32 centring as published",
    "alpha_grad": "alpha of gradient noise, pooled without zeros",
    "alpha_update": "alpha of update noise, pooled without zeros",
    "alpha_grad_std": "alpha of gradient noise, per-coordinate standardised",
    "alpha_update_std": "alpha of update noise, per-coordinate standardised",
}


def _noise_block(table: Table) -> list[Block]:
    t = table.where(experiment="noise")
    if not len(t):
        return []
    opts = [o for o in _optimizers(t) if len(t.where(optimizer=o))]
    header = ["quantity"] + [plotting.label(o) for o in opts]
    last = int(t.cols["step"].max())
    rows = [(text, m, None) for m, text in NOISE_METRICS.items()]
    rows += [("largest eigenvalue of the update covariance, checkpoints after step 0", "cov_max_eig", (1, last)),
             ("trace of the update covariance, checkpoints after step 0", "cov_trace", (1, last))]
    body = [[text] + [analysis.fmt(list(analysis.per_seed(t.where(optimizer=o, metric=m), steps=steps).values()))
                      for o in opts]
            for text, m, steps in rows if len(t.where(metric=m))]
    cov = t.where(metric="cov_max_eig")
    per_ckpt = [[f"{int(s)}"] + [analysis.fmt(list(analysis.per_seed(cov.where(optimizer=o), steps=(s, s)).values()))
                                 for o in opts] for s in cov.unique("step")]
    return [("h", 3, "Noise statistics, mean over checkpoints"), ("table", header, body),
            ("h", 3, "Largest eigenvalue of the update covariance at each checkpoint"),
            ("p", "Step 0 is the optimizers' first update (Adam's and Lion's are sign-like there); the "
                  "finding compares the checkpoints after it."),
            ("table", ["iteration"] + [plotting.label(o) for o in opts], per_ckpt)]


INTERVAL_NOTE = ("Each L2O is one meta-training (seed 0), so the intervals cover meta-test seeds only, "
                 "not the variation between meta-trainings (docs/meta_training.md measures that).")
INTERVAL_NOTE_META = ("There are {k} meta-trained L2Os per setting (meta-training seeds 0-{last}): every "
                      "statistic that reads an L2O's runs is a table of {k} L2Os by the meta-test seeds; its "
                      "value is the mean over the L2Os of each one's mean over its seeds, and its interval "
                      "and verdict come from a two-level bootstrap (the meta-trainings resampled, then the "
                      "test seeds, the same for every L2O since they share them), so they include the "
                      "variation between meta-trainings and between test seeds ('n/a' with fewer than 3 "
                      "L2Os). A baseline's own numbers keep their interval over meta-test seeds. A trend "
                      "over beta needs 3 meta-trainings at every beta. The tables and figures below pool "
                      "the runs of all L2Os: descriptive only (see there).")
POOLED_NOTE = ("Descriptive only: the tables and figures below pool the runs of all {k} L2Os, each (L2O, test "
               "seed) run counted as an independent seed, so their intervals leave out that runs of one L2O "
               "and runs on one test seed are alike; the findings above are the tested statements.")


def interval_note(table: Table) -> str:
    k = analysis.meta_seeds(table)
    return INTERVAL_NOTE if k == 1 else INTERVAL_NOTE_META.format(k=k, last=k - 1)
L2O_SOURCE = {
    "pretrained": "Every L2O analysed below is one of the shipped, pretrained set "
                  "(pretrained:leaky_relu/beta=B, pretrained:bn_relu/beta=B; see "
                  "src/l2o_dynamics/pretrained/README.md for how each was trained); the one meta-training "
                  "run here (leaky_relu, beta 0) only demonstrates the pipeline and is not analysed.",
    "train": "Every L2O analysed below was meta-trained in this run with the settings above.",
}


def recipe_names(profile: Profile, by_recipe: ByRecipe) -> dict:
    """recipe key of `by_recipe` -> the recipe's name (the main one: 'default' for the shipped set)."""
    main = "default" if profile.l2os == "pretrained" else profile.recipe
    return {r: main if r is None else r for r in by_recipe}


def _sources_text(profile: Profile, by_recipe: ByRecipe, missing: list[str]) -> str:
    """Which recipe each L2O of the report comes from, and which further L2Os are not shipped."""
    missing_text = (" Not shipped (yet), so those settings have the main recipe's L2O only: "
                    + ", ".join(missing) + ".") if missing else ""
    if len(by_recipe) == 1:
        return L2O_SOURCE[profile.l2os] + missing_text
    parts = []
    for r, name in recipe_names(profile, by_recipe).items():
        lbl = plotting.label(l2o_label("l2o", recipe=r))
        if profile.l2os == "pretrained" and r is None:
            parts.append(f"**{lbl}**: the {name} recipe's shipped set, pretrained:OPTIMIZEE/beta=B "
                         "(docs/meta_training.md)")
        elif profile.l2os == "pretrained":
            parts.append(f"**{lbl}**: the {name} recipe's shipped set, pretrained:{r}/OPTIMIZEE/beta=B "
                         f"({_recipe_text(profile, r)}, as meta.RECIPES defines it)")
        elif r is None:
            parts.append(f"**{lbl}**: meta-trained in this run by the {name} recipe with the settings above")
        else:
            parts.append(f"**{lbl}**: meta-trained in this run by the {name} recipe ({_recipe_text(profile, r)})")
    text = ("The L2Os of several meta-training recipes are analysed side by side, each finding once per "
            "recipe's L2O: " + "; ".join(parts) + ".")
    if profile.l2os == "pretrained":
        text += (" Each shipped L2O's model card is in src/l2o_dynamics/pretrained/README.md; the one "
                 "meta-training run here (leaky_relu, beta 0) only demonstrates the pipeline and is not analysed.")
    return text + missing_text


def _recipe_text(profile: Profile, extra: str | None = None) -> str:
    """The meta-training settings of the profile's recipe, or of its further recipe `extra`
    (with l2os="pretrained": the recipe's own, as the shipped set was trained)."""
    from .meta import recipe

    if extra is None:
        name, c = profile.recipe, recipe(profile.recipe, **profile.meta)
    else:
        over = extra_meta(profile, extra) if profile.l2os == "train" else {}
        name, c = extra, recipe(extra, **over)
    parts = [f"recipe {name}", f"{c.epochs} epochs x {c.runs} runs of {c.horizon} steps",
             f"unroll {c.unroll}", f"{c.total_meta_steps():,} meta-steps", f"meta-lr {c.meta_lr:g}"]
    if c.loss_index == "current":
        parts.append("meta-loss over the losses before each update")
    if c.log_eps:
        parts.append(f"{c.log_eps:g} added inside the preprocessing log")
    if c.short_runs:
        parts.append(f"{c.short_runs:.0%} of runs cut to their first unroll")
    if c.clip_grad:
        parts.append(f"meta-gradient clipped at norm {c.clip_grad:g}")
    if c.rollback:
        parts.append(f"rollback to the best phi at {c.rollback:g}x its validation score"
                     + ("" if c.rollback_cut == 1 else f", meta-lr x {c.rollback_cut:g} each time"))
    if c.collapse:
        parts.append(f"collapse monitor at drift {c.collapse:g}")
    if c.select == "train-runs":
        parts.append("the epoch whose fresh runs on the training split have the lowest training loss kept")
    elif c.select == "meta-loss":
        parts.append("the epoch with the lowest mean meta-training loss kept")
    if c.estimator != "tbptt":
        parts.append(f"meta-gradients by {c.estimator} ({c.pairs} antithetic pairs, sigma {c.sigma:g}"
                     + (f", truncations of {c.unroll}" if c.estimator != "full-es" else "") + ")")
    if c.family != "lstm":
        parts.append(f"the {c.family} learned optimizer")
    return ", ".join(parts)


def seeds_text(profile: Profile) -> str:
    """'3 meta-test seeds (report seeds 100-102: ...)', saying whether any choice saw them."""
    from .seeds import seed_family

    fams = {seed_family(s) for s in profile.seeds}
    why = ("no choice of this project has seen them" if fams == {"report"} else
           "not only report seeds: numbers on selection seeds are not independent of the choices "
           "made on them" if "selection" in fams else "not the report seeds")
    return f"{len(profile.seeds)} meta-test seeds ({families_of(profile.seeds)}; {why}; seeds.py)"


def lr_search_block(jobs: list[Job], store, profile: Profile) -> list[Block]:
    """Every learning rate searched for a baseline: protocol, chosen rate and each rate's score."""
    from .runner import LR_GRID

    searches = [j for j in jobs if j.kind == "lr-search" and store.done(j.key)]
    if not searches:
        return []
    used: dict[str, set[str]] = {}
    for j in jobs:
        for d in j.deps:
            if j.kind == "meta-test":
                used.setdefault(d, set()).add(j.config["experiment"])
    header = ["optimizer", "optimizee", "horizon", "runs", "chosen lr", "used by"] + [f"{lr:g}" for lr in LR_GRID]
    body = []
    for j in sorted(searches, key=lambda j: (j.config["optimizee"], j.config["optimizer"])):
        found = json.loads((store.path(j.key) / "result.json").read_text())
        scores = {float(k): v for k, v in found["scores"].items()}

        def cell(lr: float) -> str:
            v = scores.get(lr)
            text = "-" if v is None else "diverged" if v == float("inf") else f"{v:.4g}"
            return f"**{text}**" if lr == found["lr"] else text
        body.append([j.config["optimizer"], j.config["optimizee"], str(j.config["horizon"]),
                     str(len(j.config["seeds"])), f"{found['lr']:g}", ", ".join(sorted(used.get(j.key, ())))]
                    + [cell(lr) for lr in LR_GRID])
    proto = profile.lr_protocol()
    note = ("This is the study's protocol." if proto["as_study"] else
            f"This profile's search is {proto['note']} (config.json, lr_search).")
    return [("h", 2, "Baselines' learning rates"),
            ("p", "Each baseline's learning rate is searched once per optimizee and used by every experiment "
                  "that runs it there: every rate of the grid trains `runs` optimizees (seeds 10,000, ...) for "
                  "`horizon` steps on the validation split, and the lowest mean summed training loss wins "
                  "(bold). The study's protocol is 500 steps x 3 runs (the authors' scripts/meta_test.py:153-167, "
                  f"l2o/training.py:467-505). {note} Scores: mean over runs of the summed minibatch training "
                  "loss; 'diverged': a run's loss was not finite."),
            ("table", header, body)]


def build_report(table: Table, findings, figures: dict[str, Path], profile: Profile, jobs: list[Job],
                 store, env: dict, wall_time_s: float, executor: str, missing: Iterable[str] = ()) -> list[Block]:
    """`findings`: one list, or one per recipe's L2O (analysis.findings_by_recipe); `missing`:
    the further recipes' L2Os that are not shipped (experiments.missing_pretrained)."""
    by_recipe = _by_recipe(findings)
    names = recipe_names(profile, by_recipe)
    blocks: list[Block] = [
        ("h", 1, "l2o-dynamics: reproduction of \"Investigation into Training Dynamics of Learned Optimizers\""),
        ("p", f"Profile **{profile.name}**: {seeds_text(profile)}; meta-training: {_recipe_text(profile)}. "
              f"{_sources_text(profile, by_recipe, list(missing))} Noise runs of {profile.noise_steps} steps with "
              f"checkpoints every {profile.noise_every}. Wall time {wall_time_s / 60:.1f} min on {executor}. "
              "Numbers are mean [95% t-interval] over seeds; comparisons are paired by seed (same init and "
              "data order)."),
        ("h", 2, "Findings"),
        ("table", *findings_table(by_recipe, names)),
        ("p", "Verdicts, from the 95% t-interval over seeds of the paired statistic: 'held': the "
              "claimed direction, interval excludes 0; 'weak': the claimed direction, interval includes 0; "
              "'inconclusive, opposite sign': the other direction, interval includes 0; 'contradicted': the "
              "other direction, interval excludes 0; 'n/a': fewer than 3 usable seeds (or, for a claim "
              "about most of several comparisons, fewer than 3 decided ones). Seeds whose run "
              "diverged are left out and counted. " + interval_note(table)),
    ]
    n_l2os = analysis.meta_seeds(table)
    pooled_note = [("p", POOLED_NOTE.format(k=n_l2os))] if n_l2os > 1 else []
    table = analysis.pool_l2os(analysis.mask_diverged(table))  # the tables below: all L2Os' runs together
    blocks += _finding_blocks(by_recipe, names)
    blocks += [("h", 2, "How the L2O compares with Adam")] + pooled_note + _speed_block(table)
    blocks += lr_search_block(jobs, store, profile)
    blocks += [("h", 2, "Figures")] + pooled_note
    captions = {
        "symmetry_breaking.png": "Figure 1: deviation from the rescale (left) and scale (right) constraints.",
        "symmetry_breaking_rel.png": "Figure 1 with the scale-free measure (normalised by update and parameter size).",
        "symmetry_breaking_unit.png": "Figure 1 with the per-unit measure (no cancellation between units).",
        "symmetry_breaking_published.png": "Figure 1 as the study measured it: the L2O's raw network output "
                                           "(10x its step) and SGD without momentum; Adam and Lion unchanged.",
        "regularization.png": "Figure 2: training loss of L2Os meta-trained with a symmetry-breaking penalty.",
        "generalization.png": "Regularised L2Os on unseen optimizees.",
        "noise.png": "Figure 3: tail index of gradient and update noise: the study's estimator on exactly "
                     "centred noise, the same on float32-centred noise as published, pooled without zeros, "
                     "per-coordinate standardised; largest eigenvalue of the update covariance per checkpoint.",
        "meta_training.png": "Meta-training curves of every L2O.",
        "study_overlay.png": "Our curves beside the study's values read off its figures (x): Figure 1 as the "
                             "study measured it and corrected, and the covariance eigenvalue per checkpoint.",
    }
    if len(by_recipe) > 1:
        blocks.append(("p", "In every figure and table, " + "; ".join(
            f"{plotting.label(l2o_label('l2o', recipe=r))} is the {name} recipe's L2O" for r, name in names.items())
            + "."))
    for name in figures:
        blocks.append(("img", f"figures/{name}", captions.get(name, name)))
    blocks += _deviation_block(table) + _generalization_block(table) + _noise_block(table) + study_blocks(table)
    blocks += [("h", 2, "Jobs"),
               ("table", ["job", "key", "wall time (s)"],
                [[j.label, j.key, f"{store.info(j.key)['wall_time_s']:.1f}"] for j in jobs if store.done(j.key)]),
               ("h", 2, "Environment"),
               ("table", ["", ""], [[k, str(v)] for k, v in env.items()] +
                [["profile", json.dumps(profile.to_dict(), sort_keys=True)]])]
    return blocks


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "table":
            header, rows = b[1], b[2]
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(map(cell, header)) + " |\n|" + "---|" * len(header) + "\n"
                       + "\n".join("| " + " | ".join(map(cell, r)) + " |" for r in rows))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})\n\n*{b[2]}*")
    return "\n\n".join(out) + "\n"


def to_html(blocks: list[Block]) -> str:
    import re

    def inline(s: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(str(s)))

    out = ["<!doctype html><html><head><meta charset='utf-8'><title>l2o-dynamics report</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}"
           "</style></head><body>"]
    for b in blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{inline(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{inline(b[1])}</p>")
        elif b[0] == "table":
            rows = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
            out.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in b[1]) + f"</tr>{rows}</table>")
        elif b[0] == "img":
            out.append(f"<figure><img src='{html.escape(b[1])}' alt='{html.escape(b[2])}'>"
                       f"<figcaption>{inline(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def summary_text(findings, out: Path, figures: dict[str, Path], names: dict | None = None) -> str:
    """The terminal summary: each finding's verdict, one column per recipe's L2O."""
    width = 92
    by_recipe = _by_recipe(findings)
    lines = ["", "=" * width, "Findings of the study, tested in this run", "=" * width]
    if len(by_recipe) > 1:
        lines.append("  ".join(f"{(names or {}).get(r, r or 'main'):<22}" for r in by_recipe)
                     + "  (verdict per recipe's L2O)")
    room = width - 24 * len(by_recipe) - 2
    for _, per in _keyed(by_recipe):
        f0 = next(iter(per.values()))
        claim = f0.claim if len(f0.claim) <= room else f0.claim[:room - 3] + "..."
        verdicts = "  ".join(f"{per[r].verdict if _verdict_cell(per, r) != NO_RUNS else '-':<22}"
                             for r in by_recipe)
        lines.append(f"{verdicts}  {claim}")  # the short verdict: one column wide
    lines += ["-" * width, f"report:  {out / 'report.md'}  (and report.html)",
              f"metrics: {out / 'metrics.csv'}", f"figures: {out / 'figures'}/ ({len(figures)} files)", "=" * width]
    return "\n".join(lines)


def data_digests(store, jobs: Iterable[Job]) -> list[str]:
    """The MNIST digests the jobs recorded (one, the reference, unless data was substituted)."""
    found = set()
    for job in jobs:
        f = store.path(job.key) / "config.json"
        if f.is_file():
            found.add(json.loads(f.read_text()).get("data_digest"))
    return sorted(d for d in found if d)


def write_outputs(out: Path, profile: Profile, jobs: list[Job], store, experiments, *, device,
                  wall_time_s: float, executor: str, docs=None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    merge_metrics(store, jobs, out / "metrics.csv")
    table = Table.read(out / "metrics.csv")
    figures = make_figures(analysis.pool_l2os(table), out / "figures", experiments)
    by_recipe = analysis.findings_by_recipe(table)
    names = recipe_names(profile, by_recipe)
    env = environment(device)
    blocks = build_report(table, by_recipe, figures, profile, jobs, store, env, wall_time_s, executor,
                          missing=missing_pretrained(profile, tuple(experiments)))
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks))
    atomic_write_json(out / "config.json", {
        "kind": "reproduce", "profile": profile.to_dict(), "experiments": list(experiments),
        "lr_search": profile.lr_protocol(),
        "data_digests": data_digests(store, jobs),
        "jobs": [{"key": j.key, "kind": j.kind, "label": j.label, "config": dict(j.config)} for j in jobs],
        "environment": env, "wall_time_s": round(wall_time_s, 1), "executor": executor,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    if docs is not None:
        docs = Path(docs)
        (docs / "figures").mkdir(parents=True, exist_ok=True)
        for name, path in figures.items():
            atomic_write_bytes(docs / "figures" / name, path.read_bytes())
        header, rows = findings_table(by_recipe, names)
        atomic_write_text(docs / "findings.md", to_markdown([
            ("p", f"Profile `{profile.name}`, {seeds_text(profile)}, {wall_time_s / 60:.1f} min on {executor} "
                  f"({env.get('device')}, torch {env['torch']})."), ("table", header, rows)]))
        replace_marked(docs / "replication.md", "replication", to_markdown([
            ("p", f"Generated by `l2o-dynamics reproduce --profile {profile.name} --docs docs` "
                  f"({seeds_text(profile)}; {wall_time_s / 60:.1f} min on {executor}). Verdicts per claim, "
                  "for the L2O of each recipe, each claim under the corrected measurement and, where the "
                  "study's code measured otherwise, its 'as published' twin:"),
            ("table", header, rows), *study_blocks(table)]))
    # findings: the main recipe's L2Os' (the first); findings_by_recipe: every recipe's, by name
    return {"findings": next(iter(by_recipe.values())), "figures": figures,
            "findings_by_recipe": {names[r]: fs for r, fs in by_recipe.items()},
            "text": summary_text(by_recipe, out, figures, names)}
