"""`l2o-dynamics`: a thin command-line shell over the Python API.

Bad input gets one line on stderr (what is wrong, what is valid) and exit code 2.
"""
from __future__ import annotations

import sys

PROG = "l2o-dynamics"
INTERRUPTED = 130  # the exit status of a shell command ended by Ctrl-C (128 + SIGINT)


def _handled_interrupt() -> int:
    """The exit status of a Ctrl-C we handled. CPython marks a KeyboardInterrupt that leaves
    an `exec`/`eval` of a string (a library generating code, say) as unhandled, keeps that
    mark even when a caller catches the exception, and at exit kills the process with SIGINT
    (status -2 instead of 130). Executing any string clears the mark."""
    exec("")
    return INTERRUPTED


try:  # importing torch takes seconds: a Ctrl-C meanwhile ends as quietly as one later
    import argparse
    import ast
    import contextlib
    import json
    import os
    import re
    import time
    from pathlib import Path

    from .data import MNIST, N_TRAIN
    from .optimizers import LR_RANGE, Underflow
    from .errors import L2OError, Range
    from .files import check_run_dir, run_dir
    from .locks import locked_dir
    from .procs import remember_interrupts
    from .seeds import MAX_SEEDS, REPORT, check_seeds, report_seeds
except KeyboardInterrupt:
    print(f"{PROG}: interrupted while starting; nothing was done", file=sys.stderr)
    raise SystemExit(_handled_interrupt()) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + error)
        # main() prefixes "l2o-dynamics: error:"; a subcommand's errors name the subcommand
        raise L2OError(f"{self.prog.split(' ', 1)[-1]}: {message}" if " " in self.prog else message)


def ranged(valid: Range):
    """An argparse `type` that parses a number and checks it against `valid` (finite,
    in range); the error says what is valid."""
    def parse(s: str):
        try:
            return valid.parse(s)
        except L2OError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = str(valid)  # argparse names the type in some messages
    return parse


def _int_list(valid: Range):
    """An argparse `type` for comma-separated integers, each checked against `valid`."""
    item = ranged(valid)

    def parse(s: str) -> tuple[int, ...]:
        parts = [x.strip() for x in s.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 20,100,200), got {s!r}")
        return tuple(item(x) for x in parts)
    return parse


def _lr(s: str) -> float | str:
    if s == "auto":
        return s
    try:
        return LR_RANGE.parse(s)
    except Underflow as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except L2OError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or {LR_RANGE}, got {s!r}") from None


STEPS = Range(1, 1_000_000, integer=True)
TRAIN_BATCH = Range(1, N_TRAIN - MNIST.val_size, integer=True)  # the images of MNIST's training split
SEEDS_HELP = (f"N (the first N report seeds, {REPORT.start}..{REPORT.start}+N-1), a range A-B, or a list "
              f"A,B,C of seeds and ranges (e.g. 3 = {REPORT.start}-{REPORT.start + 2}; 0-4; 100,101,107)")


_COUNT = re.compile(r"[0-9]+")
_SEED_ITEM = re.compile(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?")  # A or A-B


def seed_spec(s: str) -> tuple[int, ...]:
    """An argparse `type` for meta-test seeds (seeds.py): 'N' is a count, the first N
    report seeds; 'A-B' the seeds A..B; 'A,B-C,...' a list of seeds and ranges (one seed
    alone: 'A-A'). Empty, reversed, negative, repeated or more than MAX_SEEDS seeds fail."""
    text = s.strip()
    try:
        if not text:
            raise L2OError(f"no seeds given; expected {SEEDS_HELP}")
        if _COUNT.fullmatch(text):
            return report_seeds(int(text))
        out: list[int] = []
        for part in text.split(","):
            m = _SEED_ITEM.fullmatch(part)
            if m is None:
                negative = re.match(r"\s*-\s*[0-9]", part) or re.search(r"--", part)
                raise L2OError(f"seeds must be non-negative integers, got {s!r}" if negative
                               else f"expected {SEEDS_HELP}, got {s!r}")
            lo = int(m[1])
            hi = lo if m[2] is None else int(m[2])
            if hi < lo:
                raise L2OError(f"the range {lo}-{hi} is reversed; write it low-high ({hi}-{lo})")
            if len(out) + hi - lo + 1 > MAX_SEEDS:
                raise L2OError(f"{s!r} gives more than {MAX_SEEDS} seeds")
            out += range(lo, hi + 1)
        return check_seeds(out, "")
    except L2OError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def ray_address(s: str) -> str:
    """An argparse `type`: auto, local, or [ray://]HOST:PORT."""
    host, _, port = s.removeprefix("ray://").rpartition(":")
    if s in ("auto", "local") or (host and port.isdigit() and 0 < int(port) < 65536):
        return s
    raise argparse.ArgumentTypeError(f"expected auto, local or HOST:PORT (e.g. 10.0.0.1:6379), got {s!r}")


def check_out_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output directory before anything is created: an existing directory, or a new
    one whose nearest existing ancestor is a writable directory."""
    p = Path(path).expanduser().absolute()
    _check_name_lengths(p, flag)
    if p.exists() and not p.is_dir():
        raise L2OError(f"{flag} {path} exists and is not a directory; give a new or existing directory")
    base = p
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise L2OError(f"{flag} {path} is not writable: {base} is a file; give a path under a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise L2OError(f"{flag} {path} is not writable ({base}: permission denied); choose a writable directory")
    return p


def _check_name_lengths(p: Path, flag: str) -> None:
    """Each name in `p` within the file system's NAME_MAX (255 on most) and the whole within
    PATH_MAX, checked before any lookup (which would fail with ENAMETOOLONG)."""
    name_max, path_max = 255, 4096
    with contextlib.suppress(OSError, ValueError, AttributeError):
        name_max = os.pathconf(p.anchor or "/", "PC_NAME_MAX")
        path_max = os.pathconf(p.anchor or "/", "PC_PATH_MAX")
    long = next((part for part in p.parts if len(os.fsencode(part)) > name_max), None)
    if long is not None:
        raise L2OError(f"{flag}: the name {long[:40]}... is {len(os.fsencode(long))} bytes long; this file system "
                       f"allows at most {name_max} per name")
    if len(os.fsencode(str(p))) >= path_max:
        raise L2OError(f"{flag}: the path is {len(os.fsencode(str(p)))} bytes long; this system allows at most "
                       f"{path_max - 1}")




def build_parser() -> argparse.ArgumentParser:
    from .meta import (FAMILIES, LOSS_INDICES, META_LOSSES, OUT_BIAS, RANGES, RECIPE_ALIASES, RECIPES, REGS,
                       SCHEDULES, SELECTIONS)
    from .estimators import ESTIMATORS, FULL_ES_LOSSES
    from .optimizees import ZOO
    from .optimizers import OPTIMIZERS

    p = _Parser(prog=PROG, description="Meta-train coordinate-wise LSTM learned optimizers and "
                "measure their training dynamics (symmetry breaking, heavy-tailed noise, update covariance).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    d = sub.add_parser("data", help="fetch MNIST or show what is cached")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser, metavar="ACTION")
    f = dsub.add_parser("fetch", help="load MNIST from the first source that works and cache it")
    f.add_argument("--idx-dir", help="directory holding the standard IDX files (optionally .gz)")
    f.add_argument("--force", action="store_true", help="rebuild the cache even if it exists")
    dsub.add_parser("info", help="show the cache path, its source and checksums (never downloads)")

    t = sub.add_parser("meta-test", help="run an optimizer on an optimizee over several seeds")
    t.add_argument("--optimizer", required=True, choices=OPTIMIZERS)
    t.add_argument("--optimizee", required=True, choices=list(ZOO))
    t.add_argument("--steps", type=ranged(STEPS), default=200)
    t.add_argument("--seeds", type=seed_spec, default=report_seeds(3), metavar="SEEDS", help=SEEDS_HELP)
    t.add_argument("--lr", type=_lr, default="auto", help="learning rate, or 'auto' to search it")
    t.add_argument("--checkpoint", help="l2o.pt written by meta-train, or pretrained:NAME (e.g. pretrained:leaky_relu, "
                   "pretrained:bn_relu/beta=0.5) "
                   "(for --optimizer l2o)")
    t.add_argument("--eval-every", type=ranged(STEPS), default=10, help="test-set evaluation interval")
    t.add_argument("--record-symmetry", type=ranged(STEPS), default=None, metavar="K",
                   help="record symmetry deviations of updates and gradients every K steps")
    t.add_argument("--batch-size", type=ranged(TRAIN_BATCH), default=128)
    t.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    t.add_argument("--out", required=True, help="results directory")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    m = sub.add_parser("meta-train", help="meta-train the L2O (truncated BPTT, ES or PES)")
    m.add_argument("--recipe", choices=[*RECIPES, *RECIPE_ALIASES], default="default",
                   help="default: measured to train a fast starter (docs/meta_training.md); authors (alias "
                        "published): the study's recipe as its authors' code runs it (docs/replication.md); "
                        "plain: the paper's formulas, validation selection. Options below override the recipe's.")
    m.add_argument("--optimizee", default="leaky_relu", help="zoo name, or a comma-separated mixture")
    m.add_argument("--family", choices=FAMILIES, default=None,
                   help="the learned optimizer: lstm (coordinate-wise LSTM, the default) or mlp (the per-parameter "
                        "MLP of Metz et al. 2022, docs/mlp_l2o.md)")
    m.add_argument("--epochs", type=ranged(RANGES["epochs"]), default=None, help="(published: 50)")
    m.add_argument("--runs", type=ranged(RANGES["runs"]), default=None, help="optimizee runs per epoch (published: 20)")
    m.add_argument("--horizon", type=ranged(RANGES["horizon"]), default=None, help="optimizee steps per run (200)")
    m.add_argument("--unroll", type=ranged(RANGES["unroll"]), default=None, help="truncation length (20)")
    m.add_argument("--tasks", type=ranged(RANGES["tasks"]), default=None, help="optimizee runs meta-trained together")
    m.add_argument("--batch-size", type=ranged(RANGES["batch_size"]), default=None)
    m.add_argument("--meta-lr", type=ranged(RANGES["meta_lr"]), default=None, help="(published: 1e-3)")
    m.add_argument("--lr-schedule", choices=SCHEDULES, default=None)
    m.add_argument("--meta-loss", choices=META_LOSSES, default=None)
    m.add_argument("--loss-index", choices=LOSS_INDICES, default=None,
                   help="next: sum L(theta_s+1..s+K) (default, plain); current: the authors' L(theta_s..s+K-1)")
    m.add_argument("--clip-grad", type=ranged(RANGES["clip_grad"]), default=None,
                   help="max global norm of the meta-gradient")
    m.add_argument("--out-bias", choices=OUT_BIAS, default=None, help="init of the L2O's output bias")
    m.add_argument("--short-runs", type=ranged(RANGES["short_runs"]), default=None, metavar="SHARE",
                   help="share of runs cut to their first unroll")
    m.add_argument("--curriculum", type=_int_list(RANGES["horizon"]), default=None, metavar="H1,H2,..",
                   help="run horizons growing over equal shares of the epochs")
    m.add_argument("--reg", choices=REGS, default=None, help="symmetry-breaking penalty")
    m.add_argument("--beta", type=ranged(RANGES["beta"]), default=None, help="penalty weight")
    m.add_argument("--reg-measure", choices=("total", "rel"), default=None)
    m.add_argument("--val-runs", type=ranged(RANGES["val_runs"]), default=None,
                   help="runs scored after every epoch to select the kept epoch (3)")
    m.add_argument("--select", choices=SELECTIONS, default=None,
                   help="keep the epoch with the best: val (runs on the validation split; default), train-runs "
                        "(runs on the training split: authors), meta-loss (the epoch's own training losses)")
    m.add_argument("--log-eps", type=ranged(RANGES["log_eps"]), default=None, metavar="EPS",
                   help="added inside the log of the gradient preprocessing (authors: 1e-8; else 0)")
    m.add_argument("--rollback", type=ranged(RANGES["rollback"]), default=None, metavar="F",
                   help="restore the best phi when an epoch's validation score is worse than F x the best")
    m.add_argument("--rollback-cut", type=ranged(RANGES["rollback_cut"]), default=None, metavar="C",
                   help="multiply the meta-lr by C at every rollback (published: 0.5)")
    m.add_argument("--collapse", type=ranged(RANGES["collapse"]), default=None, metavar="D",
                   help="flag a collapse when the update drift |mean u|/mean|u| stays above D while the "
                        "optimizee dies; roll back to the best validated phi")
    m.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="meta-gradient estimator: tbptt (truncated backprop, the default), es (antithetic ES "
                        "over one truncation), pes (persistent ES, unbiased over the run), full-es (ES over "
                        "whole runs); the ES family needs --recipe plain or authors (docs/meta_training.md)")
    m.add_argument("--pairs", type=ranged(RANGES["pairs"]), default=None, metavar="N",
                   help="ES family: antithetic pairs per task (8)")
    m.add_argument("--sigma", type=ranged(RANGES["sigma"]), default=None,
                   help="ES family: std of the perturbations of phi (0.01)")
    m.add_argument("--horizon-min", type=ranged(RANGES["horizon_min"]), default=None, metavar="H",
                   help="ES family: run lengths log-uniform between H and --horizon (default: all --horizon)")
    m.add_argument("--offsets", action=argparse.BooleanOptionalAction, default=None,
                   help="es, pes: each epoch's first runs start at a random multiple of --unroll (on)")
    m.add_argument("--full-es-loss", choices=FULL_ES_LOSSES, default=None,
                   help="full-es: mean of the run's losses (default) or the last one")
    m.add_argument("--sign", action=argparse.BooleanOptionalAction, default=None,
                   help="full-es: use the sign of the antithetic loss difference (off)")
    m.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from a trained L2O (an l2o.pt, or pretrained:NAME) instead of a fresh init")
    m.add_argument("--seed", type=ranged(RANGES["seed"]), default=None)
    m.add_argument("--hidden", type=ranged(RANGES["hidden"]), default=None, help="family lstm: LSTM units (20)")
    m.add_argument("--layers", type=ranged(RANGES["layers"]), default=None, help="family lstm: LSTM layers (2)")
    m.add_argument("--p", type=ranged(RANGES["p"]), default=None, help="gradient preprocessing constant (10)")
    m.add_argument("--eta", type=ranged(RANGES["eta"]), default=None, help="output scale of the L2O's update (0.1)")
    m.add_argument("--mlp-hidden", type=ranged(RANGES["mlp_hidden"]), default=None,
                   help="family mlp: width of the MLP's hidden layers (32)")
    m.add_argument("--mlp-layers", type=ranged(RANGES["mlp_layers"]), default=None,
                   help="family mlp: hidden layers of the MLP (2)")
    m.add_argument("--step-mult", type=ranged(RANGES["step_mult"]), default=None,
                   help="family mlp: update = -d exp(exp_mult m) step_mult (1e-3)")
    m.add_argument("--exp-mult", type=ranged(RANGES["exp_mult"]), default=None,
                   help="family mlp: scale of the magnitude output m (1e-3)")
    m.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    m.add_argument("--fusion", choices=("auto", "compile", "eager"), default="auto",
                   help="fuse the LSTM cell's element-wise ops with torch.compile")
    m.add_argument("--out", required=True)
    m.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)

    pl = sub.add_parser("plot", help="draw loss curves (mean and 95%% band over seeds) of a results dir, and "
                                     "a probe's deviation and noise figures (deviations.png, noise.png beside them)")
    pl.add_argument("dir")
    pl.add_argument("--out", help="PNG path of the loss figure (default DIR/loss.png); the others go beside it")

    _add_estimators_parser(sub)
    _add_experiment_parsers(sub)
    return p


def meta_setting(s: str) -> tuple[str, object]:
    """An argparse `type` for KEY=VALUE: VALUE a Python literal (4, 0.01, None, True, (50, 200))
    or else the text itself (pes); the pipeline checks the key and the value."""
    key, sep, value = s.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. estimator=pes), got {s!r}")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        parsed = value.strip()
    return key.strip(), parsed


def _name_list(valid: tuple[str, ...]):
    """An argparse `type` for comma-separated names, each one of `valid`, each once."""
    def parse(s: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in s.split(","))
        bad = [n for n in names if n not in valid]
        if bad or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(valid)}, got {s!r}")
        return names
    return parse


def _add_estimators_parser(sub) -> None:
    from .estimator_diagnostic import DRAWS, HORIZON
    from .estimators import ESTIMATORS
    from .meta import RANGES
    from .optimizees import ZOO

    d = sub.add_parser("estimators", help="bias, variance and cost of the meta-gradient estimators at a fixed "
                       "phi, against the exact gradient of whole runs (docs/estimators.md)")
    d.add_argument("--l2o", action="append", default=None, metavar="L2O",
                   help="untrained (the init meta-training seed 0 starts from), an l2o.pt, or pretrained:NAME; "
                        "repeat for several (default: untrained and pretrained:leaky_relu)")
    d.add_argument("--optimizee", choices=list(ZOO), default="leaky_relu")
    d.add_argument("--estimators", type=_name_list(ESTIMATORS), default=ESTIMATORS, metavar="E1,E2,..",
                   help=f"from {', '.join(ESTIMATORS)} (default: all)")
    d.add_argument("--unroll", type=_int_list(RANGES["unroll"]), default=(10, 20, 50), metavar="K1,K2,..",
                   help="truncation lengths of tbptt, es, pes; each must divide --horizon (10,20,50)")
    d.add_argument("--horizon", type=ranged(HORIZON), default=100, help="run length T (100)")
    d.add_argument("--draws", type=ranged(DRAWS), default=4,
                   help="independent tasks and perturbation streams (report seeds 100..; 4)")
    d.add_argument("--pairs", type=ranged(RANGES["pairs"]), default=8, metavar="N", help="antithetic pairs (8)")
    d.add_argument("--sigma", type=ranged(RANGES["sigma"]), default=0.01, help="std of the perturbations (0.01)")
    d.add_argument("--batch-size", type=ranged(TRAIN_BATCH), default=128)
    d.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    d.add_argument("--fusion", choices=("auto", "compile", "eager"), default="auto")
    d.add_argument("--out", required=True, help="directory for estimators.json, estimators.md, estimators.png")
    d.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier diagnostic in --out, and start over from a checkpoint "
                        "of one with other settings (a killed run of the same command resumes by itself)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


WORKERS = Range(0, 256, integer=True)
META_SEEDS = Range(1, 20, integer=True)


def _pipeline_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="results directory (re-running it continues)")
    p.add_argument("--workers", type=ranged(WORKERS), default=0, help="local worker processes (0: this process)")
    p.add_argument("--ray-address", type=ray_address, default=None, metavar="ADDR",
                   help="run jobs as Ray tasks: auto, HOST:PORT, or local (start a local Ray)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--store", default=None, help="job store shared between output dirs (default OUT/jobs)")
    p.add_argument("--fusion", choices=("auto", "compile", "eager"), default="auto")
    p.add_argument("--dry-run", action="store_true", help="list the job graph and estimated time")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def _add_experiment_parsers(sub) -> None:
    from .experiments import EXPERIMENTS, L2O_FAMILIES, L2O_SOURCES, PROFILES
    from .meta import RECIPE_ALIASES, RECIPES

    r = sub.add_parser("reproduce", help="run every experiment of the study; figures and a report")
    r.add_argument("--profile", choices=list(PROFILES), default="quick")
    r.add_argument("--l2os", choices=L2O_SOURCES, default=None,
                   help="pretrained: analyse the shipped L2Os (quick's default); train: meta-train them "
                        "here (paper's and smoke's default)")
    r.add_argument("--meta-seeds", type=ranged(META_SEEDS), default=None, metavar="K",
                   help="meta-train K L2Os per setting (seeds 0..K-1; needs --l2os train) and take the "
                        "findings' intervals over them (default: the profile's; paper 3, quick 1)")
    r.add_argument("--seeds", type=seed_spec, default=None, metavar="SEEDS",
                   help=f"meta-test seeds: {SEEDS_HELP} (default: the profile's, quick 3, paper 5)")
    r.add_argument("--recipe", choices=[*RECIPES, *RECIPE_ALIASES], default=None,
                   help="meta-train the main L2Os by this recipe (needs --l2os train; default: the profile's)")
    r.add_argument("--meta", type=meta_setting, action="append", default=None, metavar="KEY=VALUE",
                   help="a meta-training setting over the profile's and the recipe's, for the main L2Os (needs "
                        "--l2os train; repeatable), e.g. --meta estimator=pes --meta pairs=4: any "
                        "MetaTrainConfig field but optimizee, reg, beta, seed and device")
    r.add_argument("--l2o-family", type=_name_list(L2O_FAMILIES), default=None, metavar="lstm[,mlp]",
                   help="learned-optimizer families analysed: lstm (the profile's L2Os), lstm,mlp (also the "
                        "per-parameter MLP optimizer, recipe mlp, labelled l2o[mlp]: a findings column of its "
                        "own; with --l2os train meta-trained with the profile's budget)")
    r.add_argument("--docs", default=None, help="also copy the figures and findings table to this dir")
    _pipeline_options(r)
    e = sub.add_parser("experiment", help="run one experiment of the study")
    e.add_argument("name", choices=EXPERIMENTS)
    e.add_argument("--scale", choices=("quick", "paper", "smoke"), default="quick")
    e.add_argument("--seeds", type=seed_spec, default=None, metavar="SEEDS",
                   help=f"meta-test seeds: {SEEDS_HELP} (default 5, smoke 2)")
    e.add_argument("--cov-unit", choices=("minibatch", "sample"), default="minibatch")
    e.add_argument("--cov-center", choices=("mean", "fullbatch"), default="mean")
    _pipeline_options(e)


# ---- commands ----------------------------------------------------------------------------
def cmd_data(args) -> int:
    from . import data

    if args.data_command == "fetch":
        ds = data.fetch(args.idx_dir, force=args.force)
        if not ds.is_reference:
            print(f"note: this is not the reference MNIST (digest {ds.digest[:16]}...)", file=sys.stderr)
        print(f"MNIST ready: {len(ds.train_x)} training + {len(ds.test_x)} test images; source: {ds.source}")
    else:
        print(json.dumps(data.info(), indent=2))
    return 0


def make_optimizer(name: str, optimizee, steps: int, lr, checkpoint: str | None, data, device,
                   progress: bool = False):
    """The optimizer of a meta-test, with its learning rate searched when lr == 'auto'."""
    from .learned import l2o_from_checkpoint
    from .optimizers import make_baseline
    from .runner import search_lr

    check_optimizer_args(name, checkpoint, lr)
    if name == "l2o":
        return l2o_from_checkpoint(checkpoint, device), {"checkpoint": str(checkpoint)}
    info: dict = {}
    if lr == "auto":
        found = search_lr(name, optimizee, data, steps, device=device, progress=progress)
        lr = found.lr
        info["lr_search"] = found.to_dict()
    return make_baseline(name, lr=lr), info


def check_optimizer_args(name: str, checkpoint: str | None, lr="auto") -> None:
    if name == "l2o":
        if lr != "auto":
            raise L2OError("--lr applies to the baselines (sgd, adam, lion) only; an L2O's step size is "
                           "its output scale, stored in its checkpoint")
        if not checkpoint:
            raise L2OError("--optimizer l2o needs --checkpoint PATH (the l2o.pt written by meta-train)")
        if not checkpoint.startswith("pretrained:") and not Path(checkpoint).is_file():
            raise L2OError(f"--checkpoint {checkpoint} does not exist; pass the l2o.pt written by meta-train")
    elif checkpoint:
        raise L2OError(f"--checkpoint applies to --optimizer l2o only, not {name}")


def cmd_meta_test(args) -> int:
    from . import data as data_mod
    from . import symmetry
    from .learned import l2o_from_checkpoint
    from .optimizees import get_optimizee
    from .results import MetricLog, save_run
    from .runner import meta_test
    from .env import resolve_device

    started = time.time()
    device = resolve_device(args.device)
    check_optimizer_args(args.optimizer, args.checkpoint, args.lr)
    check_run_dir(check_out_dir(args.out), "meta-test", overwrite=args.overwrite)  # files.run_dir's rules
    if args.optimizer == "l2o":
        l2o_from_checkpoint(args.checkpoint)  # a malformed checkpoint fails here, before any work
    ds = data_mod.load_mnist()
    model = get_optimizee(args.optimizee)
    opt, info = make_optimizer(args.optimizer, model, args.steps, args.lr, args.checkpoint, ds, device,
                               args.progress)
    out = Path(args.out)
    seeds = list(args.seeds)
    probes = [symmetry.probe(args.record_symmetry)] if args.record_symmetry else []
    log = MetricLog("meta-test", model.name, opt.name, seeds)
    meta_test(opt, model, ds.split("train"), seeds, args.steps, batch_size=args.batch_size,
              eval_set=ds.split("test"), eval_every=args.eval_every, probes=probes, log=log,
              device=device, progress=args.progress)
    config = {"kind": "meta-test", "optimizer": opt.config(), "optimizee": model.name,
              "steps": args.steps, "seeds": seeds, "batch_size": args.batch_size,
              "eval_every": args.eval_every, "record_symmetry": args.record_symmetry,
              "data_source": ds.source, "data_digest": ds.digest, **info}
    with run_dir(out, "meta-test", overwrite=args.overwrite):  # old contents aside only now
        save_run(out, config, log.rows(), device=device, started=started)  # a full disk: saved elsewhere, said where
    final = [r[7] for r in log.rows() if r[6] == "test_loss" and r[5] == args.steps]
    print(f"{opt.name} on {model.name}: final test loss {sum(final) / len(final):.4f} "
          f"(mean of {len(final)} seeds); results in {out}")
    return 0


CONFIG_FLAGS = ("optimizee", "family", "epochs", "runs", "horizon", "unroll", "tasks", "batch_size", "meta_lr",
                "lr_schedule", "meta_loss", "loss_index", "clip_grad", "out_bias", "short_runs",
                "curriculum", "reg", "beta", "reg_measure", "val_runs", "rollback", "rollback_cut",
                "collapse", "init_from", "seed", "hidden", "layers", "p", "eta", "log_eps", "select", "device",
                "estimator", "pairs", "sigma", "horizon_min", "offsets", "full_es_loss", "sign",
                "mlp_hidden", "mlp_layers", "step_mult", "exp_mult")


def cmd_meta_train(args) -> int:
    from . import data as data_mod
    from . import learned
    from .meta import meta_train, read_checkpoint, recipe

    learned.set_fusion(args.fusion)
    given = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    cfg = recipe(args.recipe, **given).validate()
    out = check_out_dir(args.out)
    ours = False  # a valid checkpoint of this config: a meta-training's directory, marker or not
    if args.resume and (out / "checkpoint.pt").exists():
        read_checkpoint(out / "checkpoint.pt", cfg)  # a damaged one fails here, before any work
        ours = True
    overwrite = args.overwrite and not args.resume
    check_run_dir(out, "meta-train", overwrite=overwrite, resume=args.resume, adopt=ours)  # main() holds its lock
    data = data_mod.load_mnist()
    with run_dir(out, "meta-train", overwrite=overwrite, resume=args.resume, adopt=ours):
        res = meta_train(cfg, out, data=data, resume=args.resume, progress=args.progress)
    what = {"val": "validation score", "train-runs": "score of the training-split runs",
            "meta-loss": "mean meta-training loss"}[cfg.select]
    print(f"meta-trained {cfg.family} L2O on {cfg.optimizee}: best {what} {res.best_score:.4f} "
          f"(epoch {res.best_epoch + 1}), {res.skipped} skipped meta-steps, "
          f"{res.wall_time_s:.0f} s; optimizer in {out / 'l2o.pt'}")
    return 0


def _check_pipeline_paths(args) -> None:
    """--out, --store and --docs are (or can be made) writable directories, and MNIST
    loads, before reproduce creates anything."""
    from . import data as data_mod
    from .env import resolve_device

    check_out_dir(args.out)
    for flag, value in (("--store", args.store), ("--docs", getattr(args, "docs", None))):
        if value is not None:
            check_out_dir(value, flag)
    resolve_device(args.device)
    if args.ray_address and not args.dry_run:
        from .pipeline import make_executor
        make_executor(args.workers, args.ray_address, args.fusion)  # joins Ray (or fails) before MNIST loads
    if not args.dry_run:
        data_mod.load_mnist(verbose=args.progress)


def cmd_reproduce(args) -> int:
    from . import learned
    from .experiments import get_profile
    from .pipeline import override, reproduce

    learned.set_fusion(args.fusion)
    profile = override(get_profile(args.profile), args.l2os, args.meta_seeds, args.seeds, args.recipe,
                       dict(args.meta or ()), args.l2o_family)
    _check_pipeline_paths(args)
    reproduce(profile, args.out, workers=args.workers, ray_address=args.ray_address,
              device=args.device, store=args.store, dry_run=args.dry_run, progress=args.progress,
              docs=args.docs, fusion=args.fusion)
    return 0


def cmd_experiment(args) -> int:
    from . import learned
    from .pipeline import experiment_profile, reproduce

    learned.set_fusion(args.fusion)
    profile = experiment_profile(args.name, args.scale, args.seeds, args.cov_unit, args.cov_center)
    _check_pipeline_paths(args)
    reproduce(profile, args.out, experiments=(args.name,), workers=args.workers,
              ray_address=args.ray_address, device=args.device, store=args.store,
              dry_run=args.dry_run, progress=args.progress, fusion=args.fusion)
    return 0


ESTIMATOR_FILES = ("estimators.json", "estimators.md", "estimators.png")


def _diagnostic_l2o(spec: str):
    from .learned import L2O, init_phi, l2o_from_checkpoint
    from .seeds import generator

    if spec == "untrained":
        return L2O(init_phi(generator("phi", 0)))
    l2o = l2o_from_checkpoint(spec)
    if not isinstance(l2o, L2O):
        raise L2OError(f"--l2o {spec}: the diagnostic takes the LSTM L2O, not {type(l2o).__name__}")
    return l2o


def cmd_estimators(args) -> int:
    import torch

    from . import data as data_mod
    from . import learned
    from .env import resolve_device
    from .estimator_diagnostic import (Checkpoint, DiagnosticConfig, check_memory, diagnose, done_count,
                                       fingerprint, table)
    from .files import atomic_write_json, atomic_write_text, make_dir
    from .optimizees import get_optimizee
    from .plotting import estimator_figure

    learned.set_fusion(args.fusion)
    cfg = DiagnosticConfig(estimators=args.estimators, unrolls=args.unroll, horizon=args.horizon,
                           draws=args.draws, pairs=args.pairs, sigma=args.sigma,
                           batch_size=args.batch_size).validate()
    specs = args.l2o or ["untrained", "pretrained:leaky_relu"]
    if len(set(specs)) != len(specs):
        raise L2OError(f"--l2o {', '.join(specs)}: each L2O once")
    out = check_out_dir(args.out)
    there = [n for n in ESTIMATOR_FILES if (out / n).exists()]
    if there and not args.overwrite:
        raise L2OError(f"--out {args.out} already holds {', '.join(there)}; pass --overwrite or choose another directory")
    device = resolve_device(args.device)
    l2os = {spec: _diagnostic_l2o(spec) for spec in specs}  # a bad checkpoint fails here, before any work
    model = get_optimizee(args.optimizee)
    check_memory(cfg, model, l2os, torch.float32, device)
    ckpt = Checkpoint(out, fingerprint(l2os, model, cfg, torch.float32, device, learned.fusion_in_use(device)))
    done = ckpt.load(discard=args.overwrite)  # a killed run of the same command resumes
    if done:
        print(f"resuming from {ckpt.path}: {done_count(done)} references and estimates already done")
    ds = data_mod.load_mnist()
    make_dir(out)
    result = diagnose(l2os, model, ds.split("train"), cfg, device=device, progress=args.progress,
                      done=done, save=ckpt.save)
    atomic_write_json(out / "estimators.json", result)
    text = table(result)
    atomic_write_text(out / "estimators.md", text)
    estimator_figure(out / "estimators.json", out / "estimators.png")
    ckpt.remove()
    print(text + f"\nwrote {', '.join(str(out / n) for n in ESTIMATOR_FILES)}")
    return 0


FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def cmd_plot(args) -> int:
    from .plotting import plot_dir

    if args.out is not None:
        _check_name_lengths(Path(args.out).absolute(), "--out")
        if Path(args.out).suffix.lower() not in FIGURE_SUFFIXES or Path(args.out).is_dir():
            raise L2OError(f"--out {args.out} must be a file path ending in {', '.join(FIGURE_SUFFIXES)}")
        check_out_dir(Path(args.out).absolute().parent, "--out's directory")
    else:
        check_out_dir(Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).absolute().parent, "DIR")
    for path in plot_dir(args.dir, args.out):
        print(f"wrote {path}")
    return 0


COMMANDS = {"data": cmd_data, "meta-test": cmd_meta_test, "meta-train": cmd_meta_train, "plot": cmd_plot,
            "reproduce": cmd_reproduce, "experiment": cmd_experiment, "estimators": cmd_estimators}
LOCKED = ("meta-test", "meta-train", "estimators")  # one writer per --out; reproduce/experiment lock in pipeline


def run_command(args) -> int:
    """The command's handler; a run directory's commands hold its lock (locks.locked_dir)
    throughout, and a failed run leaves no directory it created."""
    handler = COMMANDS[args.command]
    if args.command not in LOCKED:
        return handler(args)
    with locked_dir(check_out_dir(args.out), args.command):
        return handler(args)


def main(argv: list[str] | None = None) -> int:
    try:
        with remember_interrupts():
            return run_command(build_parser().parse_args(argv))
    except L2OError as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; finished results are kept, nothing half-written", file=sys.stderr)
        return _handled_interrupt()
    except BrokenPipeError:  # e.g. `l2o-dynamics data info | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
