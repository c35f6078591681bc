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

from . import analysis, plotting
from .experiments import Job, Profile, extra_meta, missing_pretrained
from .results import COLUMNS, Table, l2o_label, split_recipe
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text, environment

VERDICT = {"held": "held", "weak": "weak (CI includes 0)",
           "inconclusive-opposite": "inconclusive, opposite sign (CI includes 0)",
           "contradicted": "contradicted (CI excludes 0)", "n/a": "n/a (fewer than 3 usable seeds)"}
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
    if "regularization" in experiments and len(table.where(experiment="regularization")):
        out["regularization.png"] = plotting.regularization_figure(table, fig_dir / "regularization.png")
        if len(table.where(experiment="generalization")):
            out["generalization.png"] = plotting.generalization_figure(table, fig_dir / "generalization.png")
    if "noise" in experiments and len(table.where(experiment="noise")):
        out["noise.png"] = plotting.noise_figure(table, fig_dir / "noise.png")
    if len(table.where(experiment="meta-train")):
        out["meta_training.png"] = plotting.meta_training_figure(table, fig_dir / "meta_training.png")
    return out


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
            for suffix in ("", "_rel"):
                sub = t.where(optimizee=optimizee, optimizer=opt, metric=f"{kind}_deviation{suffix}")
                if not len(sub):
                    continue
                cells = [analysis.fmt(list(analysis.per_seed(sub, steps=(i - 1, i - 1)).values())) for i in its]
                body.append([f"{optimizee} / {kind}", plotting.label(opt), "total" if not suffix else "rel", *cells])
    return [("h", 3, "Deviations at iterations 10, 50 and 100"), ("table", header, body)]


def _noise_block(table: Table) -> list[Block]:
    t = table.where(experiment="noise")
    if not len(t):
        return []
    metrics = ["alpha_grad_pub", "alpha_update_pub", "alpha_grad", "alpha_update", "alpha_grad_std",
               "alpha_update_std", "cov_max_eig", "cov_trace"]
    header = ["optimizer"] + metrics
    body = []
    for opt in _optimizers(t):
        sub = t.where(optimizer=opt)
        if len(sub):
            body.append([plotting.label(opt)] + [analysis.fmt(list(analysis.per_seed(sub.where(metric=m)).values()))
                                                  for m in metrics])
    return [("h", 3, "Noise statistics, mean over checkpoints"), ("table", header, body)]


INTERVAL_NOTE = ("Each L2O is one meta-training (seed 0), so the intervals cover meta-test seeds only, "
                 "not the variation between meta-trainings (docs/meta_training.md measures that).")
INTERVAL_NOTE_META = ("There are {k} meta-trained L2Os per setting (meta-training seeds 0-{last}): every "
                      "statistic that involves an L2O is averaged over the meta-test seeds for each L2O "
                      "first, and its interval and verdict are over the {k} L2Os, so they include the "
                      "variation between meta-trainings ('n/a' with fewer than 3). A baseline's own numbers "
                      "keep their interval over meta-test seeds. The tables and figures below pool the "
                      "runs of all L2Os.")


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
    if c.select == "train":
        parts.append("the epoch with the lowest mean meta-training loss kept")
    return ", ".join(parts)


def build_report(table: Table, findings, figures: dict[str, Path], profile: Profile, jobs: list[Job],
                 store, env: dict, wall_time_s: float, executor: str, missing: Iterable[str] = ()) -> list[Block]:
    """`findings`: one list, or one per recipe's L2O (analysis.findings_by_recipe); `missing`:
    the further recipes' L2Os that are not shipped (experiments.missing_pretrained)."""
    by_recipe = _by_recipe(findings)
    names = recipe_names(profile, by_recipe)
    blocks: list[Block] = [
        ("h", 1, "l2o-dynamics: reproduction of \"Investigation into Training Dynamics of Learned Optimizers\""),
        ("p", f"Profile **{profile.name}**: {profile.seeds} seeds; meta-training: {_recipe_text(profile)}. "
              f"{_sources_text(profile, by_recipe, list(missing))} Noise runs of {profile.noise_steps} steps with "
              f"checkpoints every {profile.noise_every}. Wall time {wall_time_s / 60:.1f} min on {executor}. "
              "Numbers are mean [95% t-interval] over seeds; comparisons are paired by seed (same init and "
              "data order)."),
        ("h", 2, "Findings"),
        ("table", *findings_table(by_recipe, names)),
        ("p", "Verdicts, from the 95% t-interval over seeds of the paired statistic: 'held': the "
              "claimed direction, interval excludes 0; 'weak': the claimed direction, interval includes 0; "
              "'inconclusive, opposite sign': the other direction, interval includes 0; 'contradicted': the "
              "other direction, interval excludes 0; 'n/a': fewer than 3 usable seeds. Seeds whose run "
              "diverged are left out and counted. " + interval_note(table)),
    ]
    table = analysis.pool_l2os(analysis.mask_diverged(table))  # the tables below: all L2Os' runs together
    blocks += _finding_blocks(by_recipe, names)
    blocks += [("h", 2, "How the L2O compares with Adam")] + _speed_block(table)
    blocks += [("h", 2, "Figures")]
    captions = {
        "symmetry_breaking.png": "Figure 1: deviation from the rescale (left) and scale (right) constraints.",
        "symmetry_breaking_rel.png": "Figure 1 with the scale-free measure (normalised by update and parameter size).",
        "symmetry_breaking_unit.png": "Figure 1 with the per-unit measure (no cancellation between units).",
        "regularization.png": "Figure 2: training loss of L2Os meta-trained with a symmetry-breaking penalty.",
        "generalization.png": "Regularised L2Os on unseen optimizees.",
        "noise.png": "Figure 3: tail index of gradient and update noise by three estimators (the study's as "
                     "published; pooled without zeros; per-coordinate standardised); largest eigenvalue of "
                     "the update covariance.",
        "meta_training.png": "Meta-training curves of every L2O.",
    }
    if len(by_recipe) > 1:
        blocks.append(("p", "In every figure and table, " + "; ".join(
            f"{plotting.label(l2o_label('l2o', recipe=r))} is the {name} recipe's L2O" for r, name in names.items())
            + "."))
    for name in figures:
        blocks.append(("img", f"figures/{name}", captions.get(name, name)))
    blocks += _deviation_block(table) + _generalization_block(table) + _noise_block(table)
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
            ("p", f"Profile `{profile.name}`, {profile.seeds} seeds, {wall_time_s / 60:.1f} min on {executor} "
                  f"({env.get('device')}, torch {env['torch']})."), ("table", header, rows)]))
    # findings: the main recipe's L2Os' (the first); findings_by_recipe: every recipe's, by name
    return {"findings": next(iter(by_recipe.values())), "figures": figures,
            "findings_by_recipe": {names[r]: fs for r, fs in by_recipe.items()},
            "text": summary_text(by_recipe, out, figures, names)}
