"""`l2o-dynamics reproduce`: the study's job graph, run by one of three executors.

Jobs are content-addressed by their config (`Job.key`); a finished job's files
live in `STORE/<key>/` (default `OUT/jobs/`), written atomically, so a re-run
after a kill skips what is done and a larger profile reuses what it can.

One writer per directory: a run holds an exclusive lock on OUT and on STORE (wherever it
lies) for its whole life; a second run on either, or on a directory inside them, fails at
once with exit 2. OUT is a directory the tool made or an empty one, STORE too
(files.run_dir, files.claim_store). Under the lock, start-up sweeps what killed runs left
(temporary files and job directories by the names the tool generates, the work
directories of finished jobs). Pool workers die with the driver, however it dies.

Executors share one interface, `run(pending, store, on_start, on_done)`:
    LocalExecutor(workers=0)   in this process, one job after another
    LocalExecutor(workers=N)   a pool of N processes (concurrent.futures)
    RayExecutor(address)       Ray tasks; each job's files are returned to the
                               driver, which writes them into OUT
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from tqdm.auto import tqdm

from .experiments import (EXPERIMENTS, L2O_FAMILIES, TRAINED_ON, Files, Job, Profile, build_jobs, get_profile,
                          missing_pretrained, run_job)
from .env import resolve_device
from .errors import L2OError
from .files import (TEMP_TAG, check_run_dir, check_store, claim_store, fresh_path, owner, remove_tree,
                    run_dir, sub_dir, sweep_temp_files)
from .locks import locked_dir
from .procs import check_interrupt, die_with_parent

DONE_MARKER = "job.json"
JOB_FILES = {"lr-search": ("result.json",), "meta-train": ("l2o.pt", "config.json", "metrics.csv"),
             "pretrained": ("l2o.pt", "config.json"), "meta-test": ("metrics.csv", "config.json")}  # + job.json
WORK = ".work"  # STORE/.work/KEY: a running job's scratch space


# ---- the store ----------------------------------------------------------------------------------
class Store:
    """Finished jobs' files, one directory per job key, in a directory the tool made (its
    marker says `store`) or claimed while empty (files.claim_store)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = claim_store(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.path(key) / DONE_MARKER).is_file()

    def read(self, key: str) -> Files:
        p = self.path(key)
        return {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}

    def write(self, key: str, files: Files) -> Path:
        """All files at once: into a temp dir `.KEY.l2o-*`, then renamed into place (the
        marker is inside). A finished job is never replaced: when one is already there
        (another writer came first; jobs are content-addressed) this copy is dropped, so a
        reader never sees a finished job vanish. A directory without the marker is not a
        finished job and is replaced (a link there is removed, never followed)."""
        final = self.path(key)
        tmp = fresh_path(self.root, f".{key}.{TEMP_TAG}", directory=True)
        try:
            for name, blob in files.items():
                (tmp / name).write_bytes(blob)
            if final.is_symlink() or (final.exists() and not final.is_dir()):
                final.unlink()  # the link, not what it points to
            elif final.exists() and not self.done(key):
                aside = fresh_path(self.root, f".{key}.{TEMP_TAG}", directory=True)
                os.rename(final, aside)  # onto an empty directory: atomic
                remove_tree(aside)
            try:
                os.rename(tmp, final)  # fails on a non-empty `final`, unlike rmtree + replace
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.done(key):
                    raise
        finally:
            if tmp.is_dir():  # still there unless renamed
                remove_tree(tmp)
        return final

    def info(self, key: str) -> dict:
        return json.loads((self.path(key) / DONE_MARKER).read_text())

    def check(self, job: Job) -> None:
        """L2OError (one line) unless finished `job` is whole: its job.json a JSON record of
        this job (key, wall time) and every file its kind writes present, a metrics.csv
        starting with the tidy header. A damaged one is never read as results (findings
        of 'n/a') nor silently redone: the user decides."""
        from .results import COLUMNS

        p = self.path(job.key)
        try:
            info = json.loads((p / DONE_MARKER).read_bytes())
            ok = isinstance(info, dict) and info.get("key") == job.key and \
                isinstance(info.get("wall_time_s"), (int, float)) and not isinstance(info.get("wall_time_s"), bool)
            problem = None if ok else f"{DONE_MARKER} is not this job's record"
        except (OSError, ValueError) as e:
            problem = f"{DONE_MARKER} is unreadable ({type(e).__name__})"
        if problem is None:
            missing = [f for f in JOB_FILES.get(job.kind, ()) if not (p / f).is_file()]
            if missing:
                problem = f"{', '.join(missing)} missing"
            elif "metrics.csv" in JOB_FILES.get(job.kind, ()):
                with open(p / "metrics.csv", "rb") as f:
                    if f.readline().rstrip(b"\r\n") != ",".join(COLUMNS).encode():
                        problem = "metrics.csv has no tidy header"
        if problem is not None:
            raise L2OError(f"job store {self.root}: finished job {job.label} [{job.key}] is damaged ({problem}); "
                           f"remove {p} to run it again")

    def workdir(self, key: str) -> Path:
        """Scratch space that survives a kill (a meta-training's checkpoint)."""
        return sub_dir(sub_dir(self.root / WORK) / key)

    def drop_workdir(self, key: str) -> None:
        if (self.root / WORK).is_dir() and not (self.root / WORK).is_symlink():
            remove_tree(self.root / WORK / key)

    def sweep(self) -> list[Path]:
        """Remove what killed runs left: temporary job directories (`.KEY.l2o-*`, names
        `write` generates), the work directories of finished jobs (an unfinished job's keeps
        its checkpoint for resume) and temporary files; returns them. Only while holding
        `locked_dir` on the store."""
        removed = [p for p in self.root.iterdir()
                   if _TEMP_JOB.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        work = self.root / WORK
        if work.is_dir() and not work.is_symlink():
            removed += [p for p in work.iterdir() if self.done(p.name)]
        for p in removed:
            remove_tree(p)
        return removed + sweep_temp_files(self.root)


_TEMP_JOB = re.compile(r"\..+\." + TEMP_TAG + r"[0-9a-f]{8}")  # `write`'s .KEY.l2o-XXXXXXXX


# ---- executors ------------------------------------------------------------------------------------
def _worker_init(threads: int, fusion: str, ignore_sigint: bool = False, driver_pid: int | None = None) -> None:
    import signal

    import torch

    from . import learned

    if driver_pid is not None:
        die_with_parent(driver_pid)  # LocalExecutor.run starts and waits for its pool in one thread
    if ignore_sigint:  # Ctrl-C reaches the whole process group; the driver stops the pool
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    learned.set_fusion(fusion)


def _execute(job: Job, deps: Mapping[str, Files], workdir: str | None) -> Files:
    return run_job(job, deps, workdir)


class LocalExecutor:
    """workers = 0: in this process; N > 0: a pool of N spawned processes."""

    def __init__(self, workers: int = 0, threads: int | None = None, fusion: str = "auto") -> None:
        self.workers = workers
        cores = os.cpu_count() or 1
        self.threads = threads or max(1, cores // max(workers, 1))
        self.fusion = fusion

    def describe(self) -> str:
        return "this process" if not self.workers else \
            f"{self.workers} worker processes x {self.threads} thread{'s' if self.threads > 1 else ''}"

    def run(self, pending: list[Job], store: Store, on_start: Callable[[Job], None],
            on_done: Callable[[Job, Files], None]) -> None:
        if not self.workers:
            for job in pending:
                on_start(job)
                deps = {k: store.read(k) for k in job.deps}
                on_done(job, run_job(job, deps, str(store.workdir(job.key)), progress=False))
            return
        import multiprocessing as mp

        pool = cf.ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                      initializer=_worker_init,
                                      initargs=(self.threads, self.fusion, True, os.getpid()))
        waiting = list(pending)
        running: dict[cf.Future, Job] = {}
        try:
            while waiting or running:
                for job in [j for j in waiting if all(store.done(d) for d in j.deps)]:
                    if len(running) >= self.workers:
                        break
                    waiting.remove(job)
                    on_start(job)
                    deps = {k: store.read(k) for k in job.deps}
                    running[pool.submit(_execute, job, deps, str(store.workdir(job.key)))] = job
                if not running:
                    raise RuntimeError("job graph has unmet dependencies: "
                                       + ", ".join(j.label for j in waiting))
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    on_done(running.pop(fut), fut.result())
        except BaseException:
            for fut in running:
                fut.cancel()
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()


class RayExecutor:
    """Ray's task API: every job is a remote task whose dependencies are passed as
    ObjectRefs, so Ray itself orders and places them; the driver writes results."""

    def __init__(self, address: str | None, num_cpus: int | None = None, threads: int = 1,
                 fusion: str = "auto") -> None:
        try:
            import ray
        except ImportError:
            raise L2OError("--ray-address needs Ray: pip install 'l2o-dynamics[ray]'") from None
        self.ray = ray
        self.address, self.threads, self.fusion = address, threads, fusion
        if not ray.is_initialized():
            if address not in (None, "auto"):
                probe_address(address)  # ray.init retries an unreachable address for minutes
            kw = {"address": address} if address else {"num_cpus": num_cpus}
            try:
                ray.init(**kw, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            except Exception as e:  # ConnectionError (no cluster), RuntimeError, ValueError, ...
                raise L2OError(f"ray_address (--ray-address) {address or 'local'}: cannot start or join Ray "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:160]}); start a cluster "
                               "(ray start --head) or drop --ray-address") from None

    def describe(self) -> str:
        return f"Ray ({self.address or 'local'}, {self.ray.cluster_resources().get('CPU', 0):g} CPUs)"

    def run(self, pending: list[Job], store: Store, on_start, on_done) -> None:
        ray = self.ray

        @ray.remote(num_cpus=self.threads)
        def remote_job(job: Job, dep_keys: list[str], threads: int, fusion: str, *dep_files) -> Files:
            _worker_init(threads, fusion)
            return run_job(job, dict(zip(dep_keys, dep_files)))

        refs: dict[str, object] = {}
        jobs: dict[object, Job] = {}
        for job in pending:  # dependencies come first in `pending`
            dep_args = [refs[d] if d in refs else ray.put(store.read(d)) for d in job.deps]
            ref = remote_job.remote(job, list(job.deps), self.threads, self.fusion, *dep_args)
            refs[job.key], jobs[ref] = ref, job
            on_start(job)
        waiting = list(jobs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for ref in ready:
                    on_done(jobs[ref], ray.get(ref))
        except BaseException:
            for ref in waiting:
                ray.cancel(ref, force=True)
            raise


RAY_CONNECT_TIMEOUT_S = 10.0


def probe_address(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S,
                  connect: Callable = socket.create_connection) -> None:
    """L2OError (one line) unless something accepts a TCP connection at [ray://]HOST:PORT
    within `timeout_s` seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        connect((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        why = f"no answer within {timeout_s:g} s" if isinstance(e, TimeoutError) else \
            (getattr(e, "strerror", None) or type(e).__name__)
        raise L2OError(f"ray_address (--ray-address) {address}: cannot reach a Ray cluster there ({why}); check "
                       "the address "
                       "(ray status on the head node), or drop --ray-address") from None


# ---- the driver -----------------------------------------------------------------------------------
def run_jobs(jobs: list[Job], store: Store, executor, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Run every job not yet in the store; returns {key: wall seconds} of those run now."""
    for job in jobs:
        if store.done(job.key):
            store.check(job)  # a damaged finished job fails here, before any work
    pending = [j for j in jobs if not store.done(j.key)]
    done_est = sum(j.estimate_s for j in jobs if store.done(j.key))
    total_est = sum(j.estimate_s for j in jobs)
    bar = tqdm(total=round(total_est), initial=round(done_est), disable=not progress, unit="s(est)",
               desc=f"jobs {len(jobs) - len(pending)}/{len(jobs)}", dynamic_ncols=True,
               bar_format="{desc} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}] {postfix}")
    active: dict[str, Job] = {}
    times: dict[str, float] = {}
    n_done = len(jobs) - len(pending)

    def on_start(job):
        active[job.key] = job
        bar.set_postfix_str(_current(active), refresh=True)

    def on_done(job, files):
        nonlocal n_done
        store.write(job.key, files)
        store.drop_workdir(job.key)
        active.pop(job.key, None)
        times[job.key] = store.info(job.key)["wall_time_s"]
        n_done += 1
        bar.set_description_str(f"jobs {n_done}/{len(jobs)}")
        bar.set_postfix_str(_current(active), refresh=False)
        bar.update(round(job.estimate_s))
        check_interrupt()
        if log:
            log(f"done {job.label} ({times[job.key]:.1f} s)")

    try:
        executor.run(pending, store, on_start, on_done)
    finally:
        bar.close()
    return times


def _current(active: Mapping[str, Job]) -> str:
    labels = [j.label for j in active.values()]
    return ("running: " + "; ".join(labels))[:110] if labels else ""


def make_executor(workers: int, ray_address: str | None, fusion: str = "auto", threads: int | None = None):
    """threads: torch threads per job (default: all cores in-process, cores // workers in a
    pool, 1 per Ray task)."""
    if ray_address:
        return RayExecutor(None if ray_address == "local" else ray_address, threads=threads or 1,
                           fusion=fusion)
    if workers < 0:
        raise L2OError(f"--workers must be >= 0, got {workers}")
    return LocalExecutor(workers, threads=threads, fusion=fusion)


# meta-training settings the pipeline sets per job, never a profile's
JOB_META = ("optimizee", "reg", "beta", "seed", "device")


def override(profile: Profile, l2os: str | None = None, meta_seeds: int | None = None,
             seeds: Sequence[int] | None = None, recipe: str | None = None,
             meta: Mapping[str, Any] | None = None, families: Sequence[str] | None = None) -> Profile:
    """The profile with where its L2Os come from, how many per setting, its meta-test seeds
    (the generalisation table keeps its share: at most as many as before), and the recipe
    and settings (MetaTrainConfig fields over the profile's) its main L2Os are meta-trained
    with replaced; checked here, before anything runs. `families` ('lstm', 'mlp'): the
    learned-optimizer families analysed; 'mlp' adds recipe 'mlp' (the MLP family) to the
    further recipes, its L2Os labelled l2o[mlp] (with l2os 'train': meta-trained with the
    profile's budget)."""
    from dataclasses import replace

    from .seeds import check_seeds

    if l2os is not None:
        profile = replace(profile, l2os=l2os)
    if recipe is not None or meta:
        profile = _override_meta(profile, recipe, dict(meta or {}))
    if families is not None:
        profile = _with_families(profile, tuple(families))
    if meta_seeds is not None:
        if meta_seeds > 1 and profile.l2os == "pretrained":
            raise L2OError(f"--meta-seeds {meta_seeds} needs --l2os train: the shipped set has one L2O per "
                           "optimizee and beta")
        profile = replace(profile, meta_seeds=meta_seeds)
    if seeds is not None:
        seeds = check_seeds(seeds, "seeds")
        unseen = None if profile.unseen_seeds is None else min(profile.unseen_seeds, len(seeds))
        profile = replace(profile, seeds=seeds, unseen_seeds=unseen)
    return profile


def _with_families(profile: Profile, families: tuple[str, ...]) -> Profile:
    from dataclasses import replace

    bad = [f for f in families if f not in L2O_FAMILIES]
    if bad or len(set(families)) != len(families) or "lstm" not in families:
        raise L2OError(f"--l2o-family {','.join(families)}: valid: lstm or lstm,mlp (the LSTM L2Os are the "
                       "profile's own, the MLP's are analysed beside them)")
    extras = tuple(r for r in profile.extra_recipes if r != "mlp")
    if "mlp" not in families:
        return replace(profile, extra_recipes=extras)
    extra_meta = dict(profile.extra_meta)
    if profile.l2os == "train" and "mlp" not in extra_meta:  # the main L2Os' budget, not the recipe's own
        from .meta import FAMILY_FIELDS

        network = {"family", *(k for keys in FAMILY_FIELDS.values() for k in keys)}  # the recipe's own
        extra_meta["mlp"] = {k: v for k, v in profile.meta.items() if k not in network}
        _check_settings(profile, "mlp", extra_meta["mlp"])
    return replace(profile, extra_recipes=(*extras, "mlp"), extra_meta=extra_meta)


def _check_settings(profile: Profile, recipe: str, meta: Mapping[str, Any]) -> None:
    """Refuse now (L2OError) what a meta-training job of `recipe` with `meta` would refuse."""
    from .meta import recipe as make_recipe

    for optimizee, reg in TRAINED_ON.items():  # every setting a job will meta-train with
        for beta in {0.0, *profile.betas}:
            make_recipe(recipe, **{**meta, "optimizee": optimizee, "reg": reg if beta else None,
                                   "beta": beta}).validate()


def _override_meta(profile: Profile, recipe: str | None, meta: dict) -> Profile:
    from dataclasses import fields, replace

    from .meta import RECIPE_ALIASES, RECIPES, MetaTrainConfig

    if profile.l2os != "train":
        raise L2OError(f"--recipe and --meta set how the L2Os are meta-trained, and profile {profile.name} "
                       "analyses the shipped ones; add --l2os train")
    names = {f.name for f in fields(MetaTrainConfig)}
    for key in meta:
        if key in JOB_META or key not in names:
            valid = ", ".join(sorted(names - set(JOB_META)))
            raise L2OError(f"--meta {key}: " + ("set by the pipeline per job" if key in JOB_META else
                                                "not a meta-training setting") + f"; valid: {valid}")
    if recipe is not None:
        recipe = RECIPE_ALIASES.get(recipe, recipe)
        if recipe not in RECIPES:
            raise L2OError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
    profile = replace(profile, recipe=recipe or profile.recipe, meta={**profile.meta, **meta},
                      extra_recipes=tuple(r for r in profile.extra_recipes
                                          if RECIPE_ALIASES.get(r, r) != (recipe or profile.recipe)))
    _check_settings(profile, profile.recipe, profile.meta)
    return profile


def reproduce(profile_name: str | Profile, out: str | os.PathLike, *, experiments: Iterable[str] = EXPERIMENTS,
              workers: int = 0, ray_address: str | None = None, device: str = "cpu",
              store: str | os.PathLike | None = None, dry_run: bool = False, progress: bool = True,
              docs: str | os.PathLike | None = None, fusion: str = "auto", threads: int | None = None,
              l2os: str | None = None, meta_seeds: int | None = None, seeds: Sequence[int] | None = None,
              recipe: str | None = None, meta: Mapping[str, Any] | None = None,
              families: Sequence[str] | None = None, echo=print) -> dict:
    """Run the experiments of a profile, then write metrics.csv, figures/, report.md/html.
    `l2os` ('pretrained' or 'train') overrides where the profile's L2Os come from,
    `meta_seeds` how many L2Os it meta-trains per setting, and `seeds` (a list of ints)
    its meta-test seeds (default: the profile's report seeds; seeds.py); `recipe` and `meta`
    (MetaTrainConfig fields) how its main L2Os are meta-trained (with l2os 'train'), e.g.
    recipe='plain', meta={'estimator': 'pes'} for L2Os meta-trained by PES."""
    from . import data as data_mod
    from .report import write_outputs

    profile = override(profile_name if isinstance(profile_name, Profile) else get_profile(profile_name),
                       l2os, meta_seeds, seeds, recipe, meta, families)
    dev = resolve_device(device)
    experiments = tuple(experiments)
    jobs = build_jobs(profile, experiments, device=str(dev))
    missing = missing_pretrained(profile, experiments)
    if missing:
        echo(f"not shipped, so analysed with the main recipe's L2O only: {', '.join(missing)}")
    out = Path(out)
    store_root = Path(store or out / "jobs")
    if dry_run:
        done = {j.key for j in jobs if (store_root / j.key / DONE_MARKER).is_file()}
        echo(format_plan(jobs, done, profile))
        return {"jobs": jobs, "done": done}
    # everything that can refuse the run comes before the first directory is created
    legacy = _made_by_an_earlier_version(out)
    check_run_dir(out, "reproduce", resume=True, adopt=legacy)
    check_store(store_root)
    data_mod.load_mnist(verbose=progress)  # fetch once, before any worker needs it
    executor = make_executor(workers, ray_address, fusion, threads)
    command = f"reproduce --profile {profile.name}"
    with contextlib.ExitStack() as held:
        held.enter_context(locked_dir(out, command))
        held.enter_context(run_dir(out, "reproduce", resume=True, adopt=legacy))  # marks, sweeps
        held.enter_context(locked_dir(store_root, command, "--store"))  # wherever it lies
        store_obj = Store(store_root)
        store_obj.sweep()
        total = sum(j.estimate_s for j in jobs)
        echo(f"l2o-dynamics reproduce: profile {profile.name}, {len(jobs)} jobs, "
             f"estimated {_hms(total)} of compute on a 2-core CPU; results in {out}")
        echo(f"running on {executor.describe()} ({dev})")
        started = time.time()
        run_jobs(jobs, store_obj, executor, progress=progress)
        summary = write_outputs(out, profile, jobs, store_obj, experiments, device=dev,
                                wall_time_s=time.time() - started, executor=executor.describe(), docs=docs)
    echo(summary["text"])
    return summary


def _made_by_an_earlier_version(out: Path) -> bool:
    """A reproduce directory written before the tool marked its directories: its
    config.json says kind reproduce."""
    if owner(out) is not None or not (out / "config.json").is_file():
        return False
    try:
        return json.loads((out / "config.json").read_text()).get("kind") == "reproduce"
    except (OSError, ValueError, AttributeError):
        return False


def format_plan(jobs: list[Job], done: set[str], profile) -> str:
    from .seeds import families_of

    lines = [f"profile {profile.name}: {len(jobs)} jobs ({len(done)} already done); meta-tests on "
             f"{families_of(profile.seeds)}", ""]
    width = max(len(j.label) for j in jobs)
    for j in jobs:
        state = "done" if j.key in done else _hms(j.estimate_s)
        deps = f" <- {', '.join(d.split('-')[-1] for d in j.deps)}" if j.deps else ""
        lines.append(f"  {j.label:<{width}}  {state:>9}  [{j.key.split('-')[-1]}]{deps}")
    left = sum(j.estimate_s for j in jobs if j.key not in done)
    lines += ["", f"estimated time left: {_hms(left)} on a 2-core CPU (one process); "
              f"about half that with --workers 2 on 4+ cores"]
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def experiment_profile(name: str, scale: str = "quick", seeds: Sequence[int] | None = None,
                       cov_unit: str = "minibatch", cov_center: str = "mean") -> Profile:
    """The profile `experiment NAME --scale SCALE` runs: the scale's profile with `seeds`
    meta-test seeds (default the first 5 report seeds; smoke: its own) and the noise
    experiment's covariance settings."""
    from dataclasses import replace

    from .seeds import report_seeds

    base = get_profile(scale)
    base = override(base, seeds=seeds or (base.seeds if base.name == "smoke" else report_seeds(5)))
    if (cov_unit, cov_center) != ("minibatch", "mean") and name != "noise":
        raise L2OError("--cov-unit/--cov-center apply to the noise experiment only")
    return replace(base, cov_unit=cov_unit, cov_center=cov_center)
