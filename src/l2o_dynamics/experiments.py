"""The study's experiments as jobs: thin orchestration over the Python API.

Three kinds of job, each a pure function of its config (and of the results of
the jobs it depends on), returning its output files as bytes:

    lr-search   a baseline's learning rate for (optimizee, horizon)
    meta-train  an L2O (optionally with a symmetry-breaking penalty)
    meta-test   an optimizer on an optimizee over S seeds, with probes that record
                symmetry deviations or noise statistics

`build_jobs(profile, experiments)` lays out the job graph of the experiments
`symmetry-breaking`, `regularization` (with the generalisation table) and
`noise`; `pipeline` runs it and `analysis` turns the merged metrics into
findings and figures.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .results import l2o_label
from .errors import L2OError
from .runner import STUDY_LR_HORIZON, STUDY_LR_RUNS
from .seeds import check_seeds, lr_search_seeds, report_seeds, stable_hash

EXPERIMENTS = ("symmetry-breaking", "regularization", "noise")
BASELINES = ("sgd", "adam", "lion")
# the study's two meta-training optimizees and the symmetry each one's penalty targets
TRAINED_ON = {"leaky_relu": "rescale", "bn_relu": "scale"}
UNSEEN = {"leaky_relu": ("sigmoid", "relu", "sigmoid_2x20", "sigmoid_40", "bn_relu"),
          "bn_relu": ("sigmoid", "relu", "sigmoid_2x20", "sigmoid_40", "leaky_relu")}


# ---- profiles -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    """Scale of a reproduction. `meta` holds MetaTrainConfig fields; `seeds` are the
    meta-test seeds (report seeds by default: seeds.py)."""

    name: str
    seeds: tuple[int, ...]
    meta: Mapping[str, Any]
    symmetry_steps: int = 100
    regularization_steps: int = 200
    betas: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
    unseen: int = 5  # how many of UNSEEN[...] the generalisation table covers
    unseen_seeds: int | None = None  # the generalisation table meta-tests on the first k seeds (default: all)
    noise_steps: int = 1000
    noise_every: int = 10
    noise_minibatches: int | None = None  # None: the whole training split
    # the baselines' learning-rate search: every rate of runner.LR_GRID over lr_horizon steps in
    # lr_runs runs (seeds 10,000, ...), on the validation split; the study's protocol is 500 x 3
    lr_horizon: int = STUDY_LR_HORIZON
    lr_runs: int = STUDY_LR_RUNS
    eval_every: int = 10
    cov_unit: str = "minibatch"  # update-covariance samples: minibatches or single examples
    cov_center: str = "mean"  # centre: mean update, or the full-batch update
    recipe: str = "default"  # meta-training recipe (meta.RECIPES) that `meta` overrides
    l2os: str = "train"  # train: meta-train every L2O here; pretrained: the shipped set
    # meta-trained L2Os per (optimizee, beta), seeds 0..meta_seeds-1, each meta-tested on the same
    # seeds; findings then take intervals over L2Os (analysis.across_l2os). With l2os="pretrained"
    # there is one (the shipped set).
    meta_seeds: int = 1
    # Further meta-training recipes (meta.RECIPES) whose L2Os are analysed beside the main ones,
    # each labelled l2o[NAME] (results.l2o_label; the main ones keep `l2o`): with
    # l2os="pretrained" the shipped set pretrained/NAME/ (a setting it lacks is skipped, and the
    # report lists it), with "train" meta-trained here by recipe NAME with extra_meta[NAME] over it
    # (none: the recipe's own budget, 10,000 meta-steps for 'authors'), meta_seeds of each.
    extra_recipes: tuple[str, ...] = ()
    extra_meta: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    extra_unseen: int | None = None  # how many unseen optimizees their L2Os are tested on (default: unseen)

    def to_dict(self) -> dict:
        return {k: (dict(v) if isinstance(v, Mapping) else list(v) if isinstance(v, tuple) else v)
                for k, v in self.__dict__.items()}

    def lr_protocol(self) -> dict:
        """The baselines' learning-rate search of this profile, and whether it is the study's."""
        study = {"horizon": STUDY_LR_HORIZON, "runs": STUDY_LR_RUNS}
        mine = {"horizon": self.lr_horizon, "runs": self.lr_runs}
        return {**mine, "study": study, "as_study": mine == study,
                "note": "the study's protocol" if mine == study else
                f"shortened from the study's {STUDY_LR_HORIZON} steps x {STUDY_LR_RUNS} runs: these "
                "learning rates are not the study's"}


_QUICK_META = dict(epochs=6, runs=2, horizon=200, unroll=20, val_runs=2, meta_lr=1e-3)
PROFILES = {
    "smoke": Profile(
        "smoke", seeds=report_seeds(2),
        meta=dict(epochs=2, runs=1, horizon=20, unroll=5, val_runs=1, meta_lr=1e-3, clip_grad=1.0,
                  rollback=1.5),
        symmetry_steps=20, regularization_steps=20, betas=(0.0, 0.5), unseen=2, noise_steps=20,
        noise_every=10, noise_minibatches=40, lr_horizon=20, lr_runs=1, eval_every=5, recipe="plain"),
    "quick": Profile(
        "quick", seeds=report_seeds(3), meta=_QUICK_META,
        noise_steps=1000, noise_every=250, unseen_seeds=3, l2os="pretrained",
        # the study's recipe and the MLP family beside the default LSTM L2Os (the shipped
        # pretrained/authors/ and pretrained/mlp/ sets; --l2o-family lstm leaves the MLP out); their
        # L2Os meet 3 of the 5 unseen optimizees in the generalisation table, which keeps `make demo`
        # within 10 minutes on 2 cores. Under --l2os train each is meta-trained with the main budget.
        extra_recipes=("authors", "mlp"), extra_unseen=3,
        extra_meta={"authors": dict(epochs=6, runs=2), "mlp": _QUICK_META}),
    # paper: the default recipe at the published number of meta-steps (50 epochs of 100 runs,
    # 90 of them one unroll: 9,500 meta-steps per L2O; the published schedule is 10,000), and the
    # authors' recipe at its own, the study's, budget (10,000 meta-steps)
    "paper": Profile(
        "paper", seeds=report_seeds(5),
        meta=dict(epochs=50, runs=100, horizon=200, unroll=20, val_runs=3, meta_lr=1e-3),
        noise_steps=1000, noise_every=10, meta_seeds=3, extra_recipes=("authors",)),
}


L2O_SOURCES = ("pretrained", "train")
L2O_FAMILIES = ("lstm", "mlp")  # the LSTM's are a profile's own L2Os; the MLP's come from recipe 'mlp'


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise L2OError(f"unknown profile {name!r}; valid: {', '.join(PROFILES)}") from None


# ---- jobs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    kind: str  # lr-search | meta-train | meta-test
    config: Mapping[str, Any]  # everything that determines the result, dependency keys included
    label: str
    deps: tuple[str, ...] = ()
    estimate_s: float = 1.0

    @property
    def key(self) -> str:
        return f"{self.kind}-{stable_hash({'kind': self.kind, 'config': self.config})}"


# Seconds on a 2-core CPU, measured with benchmarks/ (rounded up); used for --dry-run and ETA.
COST = {"unroll": 0.45, "val_step": 0.006, "l2o_step_seed": 0.004, "base_step_seed": 0.0012,
        "noise_ckpt": 0.8, "noise_ckpt_l2o": 2.5, "sym_step_seed": 0.0015, "job": 2.0}


def meta_train_job(profile: Profile, optimizee: str, beta: float, device: str, meta_seed: int = 0,
                   extra: str | None = None) -> Job:
    """An L2O of the profile's recipe, or of its further recipe `extra` (extra_recipes)."""
    from .meta import recipe

    reg = TRAINED_ON[optimizee] if beta else None
    if extra is None:
        settings = {**recipe(profile.recipe).to_dict(), **profile.meta}
    else:  # the recipe name in the config: its meta-test rows are labelled l2o[NAME]
        settings = {**recipe(extra).to_dict(), **extra_meta(profile, extra), "recipe": extra}
    cfg = {**settings, "optimizee": optimizee, "reg": reg, "beta": float(beta), "seed": meta_seed,
           "device": device}
    unrolls = _meta_steps(cfg) * _unroll_cost(cfg)
    est = unrolls * COST["unroll"] + cfg["epochs"] * cfg["val_runs"] * cfg["horizon"] * COST["val_step"]
    seed = f", seed {meta_seed}" if meta_seed else ""
    name = "L2O" if extra is None else f"L2O [{extra}]"
    return Job("meta-train", cfg, f"meta-train {name} on {optimizee} (beta={beta:g}{seed})",
               estimate_s=est + COST["job"])


# One perturbed copy of the ES family, advanced over a truncation, costs about this share of a
# TBPTT meta-step (benchmarks/estimators.py: PES with 8 pairs, 16 copies, 4.6-5.5 TBPTT meta-steps).
ES_COPY = 0.35


def _unroll_cost(cfg: Mapping[str, Any]) -> float:
    """A meta-step of cfg's estimator in TBPTT meta-steps (full-es: a whole run of truncations)."""
    kind = cfg.get("estimator", "tbptt")
    if kind == "tbptt":
        return 1.0
    copies = 2 * cfg["pairs"] + (kind == "es")
    return copies * ES_COPY * (cfg["horizon"] / cfg["unroll"] if kind == "full-es" else 1)


def _meta_steps(cfg: Mapping[str, Any]) -> int:
    from .meta import MetaTrainConfig

    return MetaTrainConfig.from_dict(cfg).total_meta_steps()


def pretrained_name(optimizee: str, beta: float, extra: str | None = None) -> str:
    """The shipped L2O of a setting: 'leaky_relu/beta=0' (the default recipe's set), or
    'authors/leaky_relu/beta=0' (recipe `extra`'s set, pretrained/authors/)."""
    return f"{extra + '/' if extra else ''}{optimizee}/beta={beta:g}"


def pretrained_job(optimizee: str, beta: float, extra: str | None = None) -> Job:
    """A shipped L2O (learned.pretrained); its file's digest is part of the key."""
    import hashlib

    from .learned import pretrained

    name = pretrained_name(optimizee, beta, extra)
    digest = hashlib.sha256(Path(pretrained(name)).read_bytes()).hexdigest()
    return Job("pretrained", {"name": name, "sha256": digest}, f"shipped L2O pretrained:{name}",
               estimate_s=COST["job"])


def lr_search_job(profile: Profile, optimizer: str, optimizee: str, device: str) -> Job:
    """A baseline's learning rate for `optimizee`, by the profile's protocol (the study's:
    500 steps x 3 runs), shared by every experiment that runs the baseline there."""
    h, runs = profile.lr_horizon, profile.lr_runs
    cfg = {"optimizer": optimizer, "optimizee": optimizee, "horizon": h,
           "seeds": list(lr_search_seeds(runs)), "device": device}
    est = h * 10 * runs * COST["base_step_seed"] + COST["job"]
    return Job("lr-search", cfg, f"lr search {optimizer} on {optimizee} ({h} steps x {runs} run{'s' * (runs > 1)})",
               estimate_s=est)


def meta_test_job(experiment: str, optimizer_job: Job, optimizer: str, optimizee: str, steps: int,
                  seeds: tuple[int, ...], profile: Profile, device: str, beta: float | None = None,
                  trained_on: str | None = None, symmetry_every: int | None = None,
                  noise: Mapping[str, Any] | None = None, eval_every: int | None = None,
                  meta_seed: int = 0, extra: str | None = None) -> Job:
    cfg = {"experiment": experiment, "optimizer": optimizer, "optimizee": optimizee, "steps": steps,
           "seeds": list(seeds), "eval_every": eval_every or profile.eval_every, "beta": beta,
           "trained_on": trained_on, "symmetry_every": symmetry_every,
           "noise": dict(noise) if noise else None, "source": optimizer_job.key, "device": device}
    if meta_seed:  # absent for seed 0, so that one-seed job keys stay as they were
        cfg["meta_seed"] = meta_seed
    if symmetry_every or noise:  # the probes also record the study's measurements as published
        cfg["published"] = True  # (results.PUBLISHED); new keys: the alphas now use exact centring
    if extra:  # absent for the main recipe's L2Os, whose job keys stay as they were
        cfg["recipe"] = extra
    per = COST["l2o_step_seed"] if optimizer == "l2o" else COST["base_step_seed"]
    est = steps * len(seeds) * (per + (COST["sym_step_seed"] if symmetry_every else 0))
    if noise:
        ck = steps // noise["every"] + 1
        est += ck * len(seeds) * (COST["noise_ckpt_l2o"] if optimizer == "l2o" else COST["noise_ckpt"])
    name = l2o_label(optimizer if trained_on in (None, optimizee) else f"l2o({trained_on})", meta_seed, extra)
    lbl = f"{experiment}: {name}{'' if beta is None else f' beta={beta:g}'} on {optimizee} ({steps} steps)"
    return Job("meta-test", cfg, lbl, deps=(optimizer_job.key,), estimate_s=est + COST["job"])


def extra_recipes(profile: Profile) -> tuple[str, ...]:
    """The profile's further recipes by their canonical names (meta.RECIPE_ALIASES), each a
    recipe of meta.RECIPES other than the main one's (with l2os="pretrained": 'default', the
    shipped set's), listed once."""
    from .meta import RECIPE_ALIASES, RECIPES

    main = "default" if profile.l2os == "pretrained" else RECIPE_ALIASES.get(profile.recipe, profile.recipe)
    out: list[str] = []
    for given in profile.extra_recipes:
        name = RECIPE_ALIASES.get(given, given)
        if name not in RECIPES:
            raise L2OError(f"unknown recipe {given!r} in extra_recipes; valid: {', '.join(RECIPES)}")
        if name == main or name in out:
            raise L2OError(f"extra recipe {given!r} repeats the main recipe ({main}) or another extra one; "
                           f"list each recipe once, other than {main}")
        out.append(name)
    return tuple(out)


def extra_meta(profile: Profile, extra: str) -> dict:
    """The profile's meta-training settings over further recipe `extra` (keyed by it or an alias)."""
    from .meta import RECIPE_ALIASES

    return {k: v for name, m in profile.extra_meta.items() if RECIPE_ALIASES.get(name, name) == extra
            for k, v in m.items()}


def l2o_settings(profile: Profile, experiments: tuple[str, ...] = EXPERIMENTS) -> list[tuple[str, float]]:
    """The (optimizee, beta) settings whose L2Os the experiments meta-test."""
    found = set()
    if "symmetry-breaking" in experiments:
        found |= {(o, 0.0) for o in TRAINED_ON}
    if "regularization" in experiments:
        found |= {(o, float(b)) for o in TRAINED_ON for b in profile.betas}
    if "noise" in experiments:
        found.add(("leaky_relu", 0.0))
    return sorted(found)


def missing_pretrained(profile: Profile, experiments: tuple[str, ...] = EXPERIMENTS) -> list[str]:
    """With l2os="pretrained": the L2Os of the further recipes that the experiments would
    analyse but that are not shipped ('pretrained:authors/bn_relu/beta=0.5', ...); their
    settings are analysed with the main recipe's L2O only."""
    from .learned import available_pretrained

    if profile.l2os != "pretrained":
        return []
    shipped = set(available_pretrained())
    return [f"pretrained:{pretrained_name(o, b, r)}" for r in extra_recipes(profile)
            for o, b in l2o_settings(profile, experiments) if pretrained_name(o, b, r) not in shipped]


def build_jobs(profile: Profile, experiments: tuple[str, ...] = EXPERIMENTS, device: str = "cpu"
               ) -> list[Job]:
    """The job graph, dependencies first. Jobs shared by several experiments (the
    beta = 0 L2Os, learning-rate searches) appear once. The L2Os of the profile's further
    recipes (`extra_recipes`) are meta-tested beside the main ones; a shipped set that lacks
    a setting is skipped there (`missing_pretrained`)."""
    from .learned import available_pretrained

    for e in experiments:
        if e not in EXPERIMENTS:
            raise L2OError(f"unknown experiment {e!r}; valid: {', '.join(EXPERIMENTS)}")
    jobs: dict[str, Job] = {}

    def add(job: Job) -> Job:
        jobs.setdefault(job.key, job)
        return jobs[job.key]

    if profile.l2os not in L2O_SOURCES:
        raise L2OError(f"unknown L2O source {profile.l2os!r}; valid: {', '.join(L2O_SOURCES)}")
    if not isinstance(profile.meta_seeds, int) or profile.meta_seeds < 1:
        raise L2OError(f"meta_seeds must be a positive integer, got {profile.meta_seeds!r}")
    S = check_seeds(profile.seeds, "the profile's seeds")
    if profile.unseen_seeds is not None and not 1 <= profile.unseen_seeds <= len(S):
        raise L2OError(f"unseen_seeds must be in 1..{len(S)} (the number of seeds), got {profile.unseen_seeds!r}")
    S_unseen = S[:profile.unseen_seeds]
    for name in ("lr_horizon", "lr_runs"):
        if not isinstance(getattr(profile, name), int) or getattr(profile, name) < 1:
            raise L2OError(f"{name} must be a positive integer, got {getattr(profile, name)!r}")
    # the shipped set holds one L2O per setting
    meta_seeds = range(1 if profile.l2os == "pretrained" else profile.meta_seeds)
    extras = extra_recipes(profile)
    # (recipe, meta seed) of every L2O per setting; recipe None: the main one
    l2os = [(r, k) for r in (None, *extras) for k in meta_seeds]
    shipped = set(available_pretrained()) if extras and profile.l2os == "pretrained" else set()

    def source(optimizer: str, optimizee: str, beta: float = 0.0, meta_seed: int = 0,
               extra: str | None = None) -> Job | None:
        if optimizer == "l2o" and profile.l2os == "pretrained":
            if extra is not None and pretrained_name(optimizee, beta, extra) not in shipped:
                return None  # not shipped (yet): missing_pretrained lists it
            return add(pretrained_job(optimizee, beta, extra))
        if optimizer == "l2o":
            return add(meta_train_job(profile, optimizee, beta, device, meta_seed, extra))
        return add(lr_search_job(profile, optimizer, optimizee, device))

    if profile.l2os == "pretrained":  # the analyses use the shipped set; one short meta-training
        add(meta_train_job(profile, "leaky_relu", 0.0, device))  # shows the whole pipeline

    runs = [(o, 0, None) for o in BASELINES] + [("l2o", k, r) for r, k in l2os]
    if "symmetry-breaking" in experiments:
        for optimizee in TRAINED_ON:
            for opt, k, r in runs:
                src = source(opt, optimizee, meta_seed=k, extra=r)
                if src is not None:
                    add(meta_test_job("symmetry-breaking", src, opt, optimizee, profile.symmetry_steps, S,
                                      profile, device, symmetry_every=1, meta_seed=k, extra=r))
    if "regularization" in experiments:
        T = profile.regularization_steps
        for optimizee in TRAINED_ON:
            for opt in BASELINES:
                add(meta_test_job("regularization", source(opt, optimizee), opt, optimizee, T, S,
                                  profile, device))
            for beta in profile.betas:
                for r, k in l2os:
                    src = source("l2o", optimizee, beta, meta_seed=k, extra=r)
                    if src is None:
                        continue
                    add(meta_test_job("regularization", src, "l2o", optimizee, T, S, profile, device,
                                      beta=beta, meta_seed=k, extra=r))
                    unseen = profile.unseen if r is None or profile.extra_unseen is None else profile.extra_unseen
                    for name in UNSEEN[optimizee][:unseen]:
                        add(meta_test_job("generalization", src, "l2o", name, T,
                                          S_unseen, profile, device, beta=beta,
                                          trained_on=optimizee, eval_every=max(profile.eval_every, T // 4),
                                          meta_seed=k, extra=r))
    if "noise" in experiments:
        noise = {"every": profile.noise_every, "minibatches": profile.noise_minibatches,
                 "cov_unit": profile.cov_unit, "cov_center": profile.cov_center}
        for opt, k, r in runs:
            src = source(opt, "leaky_relu", meta_seed=k, extra=r)
            if src is not None:
                add(meta_test_job("noise", src, opt, "leaky_relu", profile.noise_steps, S, profile, device,
                                  noise=noise, meta_seed=k, extra=r))
    # dependencies first; within a kind the longest first, so a pool's workers finish together
    order = {"pretrained": 0, "lr-search": 0, "meta-train": 1, "meta-test": 2}
    return sorted(jobs.values(), key=lambda j: (order[j.kind], -j.estimate_s))


# ---- running one job (in any process or on any Ray node) ----------------------------------------
Files = dict[str, bytes]


def run_job(job: Job, deps: Mapping[str, Files], workdir: str | os.PathLike | None = None,
            progress: bool = False) -> Files:
    """Execute one job; returns its output files. `deps` maps dependency keys to their
    files. `workdir` (local executors) keeps a meta-training's checkpoint for resume."""
    started = time.time()
    if job.kind == "lr-search":
        files = _run_lr_search(job.config, progress)
    elif job.kind == "meta-train":
        files = _run_meta_train(job.config, workdir, progress)
    elif job.kind == "pretrained":
        files = _run_pretrained(job.config)
    elif job.kind == "meta-test":
        files = _run_meta_test(job.config, deps[job.config["source"]], progress)
    else:
        raise L2OError(f"unknown job kind {job.kind!r}")
    info = {"kind": job.kind, "label": job.label, "key": job.key, "config": dict(job.config),
            "wall_time_s": round(time.time() - started, 3), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    files["job.json"] = json.dumps(info, indent=2, sort_keys=True).encode()
    return files


def _device(cfg) -> torch.device:
    from .env import resolve_device

    return resolve_device(cfg.get("device", "cpu"))


def _run_lr_search(cfg, progress) -> Files:
    from .data import load_mnist
    from .runner import search_lr

    found = search_lr(cfg["optimizer"], cfg["optimizee"], load_mnist(verbose=False), cfg["horizon"],
                      seeds=cfg["seeds"], device=_device(cfg), use_cache=False, progress=progress)
    return {"result.json": json.dumps(found.to_dict(), indent=2).encode()}


def _run_meta_train(cfg, workdir, progress) -> Files:
    import tempfile

    from .data import load_mnist
    from .meta import MetaTrainConfig, meta_train
    from .results import format_rows

    mcfg = MetaTrainConfig.from_dict(cfg)
    # in the store's work dir; a temporary directory only where there is none (a Ray task)
    with (contextlib.nullcontext(workdir) if workdir is not None
          else tempfile.TemporaryDirectory(prefix="l2o-meta-")) as where:
        out = Path(where)
        res = meta_train(mcfg, out, data=load_mnist(verbose=False), resume=True, progress=progress)
        files = {name: (out / name).read_bytes() for name in ("l2o.pt", "config.json")}
    res.log.optimizer = l2o_label("l2o", recipe=cfg.get("recipe"))  # l2o[NAME] for a further recipe's
    files["metrics.csv"] = format_rows(res.log.rows()).encode()
    return files


def _run_pretrained(cfg) -> Files:
    import hashlib

    from .learned import pretrained

    blob = Path(pretrained(cfg["name"])).read_bytes()
    if hashlib.sha256(blob).hexdigest() != cfg["sha256"]:
        raise L2OError(f"shipped L2O pretrained:{cfg['name']} changed while the job graph was built")
    return {"l2o.pt": blob, "config.json": json.dumps(cfg, indent=2).encode()}


def _run_meta_test(cfg, source: Files, progress) -> Files:
    from . import noise as noise_mod
    from . import symmetry
    from .data import load_mnist
    from .learned import l2o_from_checkpoint
    from .optimizers import LR_RANGE, make_baseline
    from .results import MetricLog, format_rows
    from .runner import meta_test

    device = _device(cfg)
    ds = load_mnist(verbose=False)
    if cfg["optimizer"] == "l2o":
        opt = l2o_from_checkpoint(source["l2o.pt"], device)
        name = l2o_label("l2o" if cfg["trained_on"] in (None, cfg["optimizee"]) else f"l2o({cfg['trained_on']})",
                         cfg.get("meta_seed", 0), cfg.get("recipe"))
        lr = None
    else:
        lr = LR_RANGE.check("the searched learning rate", json.loads(source["result.json"])["lr"])
        opt = make_baseline(cfg["optimizer"], lr=lr)
        name = cfg["optimizer"]
    published = bool(cfg.get("published"))
    probes = [symmetry.probe(cfg["symmetry_every"], published)] if cfg.get("symmetry_every") else []
    train = ds.split("train")
    if cfg.get("noise"):
        n = cfg["noise"]
        x, y = train
        if n.get("minibatches"):
            x, y = x[:n["minibatches"] * 128], y[:n["minibatches"] * 128]
        probes.append(noise_mod.noise_probe((x.to(device), y.to(device)), cfg["seeds"], every=n["every"],
                                            cov_unit=n["cov_unit"], cov_center=n["cov_center"],
                                            published=published))
    log = MetricLog(cfg["experiment"], cfg["optimizee"], name, cfg["seeds"], beta=cfg["beta"])
    meta_test(opt, cfg["optimizee"], train, cfg["seeds"], cfg["steps"], eval_set=ds.split("test"),
              eval_every=cfg["eval_every"], probes=probes, log=log, device=device, progress=progress,
              desc=f"{cfg['experiment']}: {name} on {cfg['optimizee']}")
    config = {"kind": "meta-test", **cfg, "lr": lr, "optimizer_config": opt.config(), "data_digest": ds.digest}
    return {"metrics.csv": format_rows(log.rows()).encode(),
            "config.json": json.dumps(config, indent=2, sort_keys=True, default=str).encode()}
