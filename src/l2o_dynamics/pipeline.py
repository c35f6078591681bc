"""`l2o-dynamics reproduce`: the study's job graph, run by one of three executors.

Jobs are content-addressed by their config (`Job.key`); a finished job's files
live in `STORE/<key>/` (default `OUT/jobs/`), written atomically, so a re-run
after a kill skips what is done and a larger profile reuses what it can.

One writer per directory: a run holds an exclusive lock on OUT (and on STORE when it
lies outside OUT) for its whole life; a second run on either fails at once with exit 2.
Under the lock, start-up sweeps what killed runs left (temporary files and job
directories, the work directories of finished jobs). Pool workers die with the driver,
however it dies.

Executors share one interface, `run(pending, store, on_start, on_done)`:
    LocalExecutor(workers=0)   in this process, one job after another
    LocalExecutor(workers=N)   a pool of N processes (concurrent.futures)
    RayExecutor(address)       Ray tasks; each job's files are returned to the
                               driver, which writes them into OUT
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping

from tqdm.auto import tqdm

from .experiments import (EXPERIMENTS, L2O_SOURCES, PROFILES, Files, Job, Profile, build_jobs, get_profile,
                          missing_pretrained, run_job)
from .utils import LOCK_NAME, L2OError, Range, die_with_parent, fresh_path, locked_dir, resolve_device

DONE_MARKER = "job.json"
WORK = ".work"  # STORE/.work/KEY: a running job's scratch space


# ---- the store ----------------------------------------------------------------------------------
class Store:
    """Finished jobs' files, one directory per job key."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.path(key) / DONE_MARKER).is_file()

    def read(self, key: str) -> Files:
        p = self.path(key)
        return {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}

    def write(self, key: str, files: Files) -> Path:
        """All files at once: into a temp dir `.KEY.*`, then renamed into place (the marker
        is inside). A finished job is never replaced: when one is already there (another
        writer came first; jobs are content-addressed) this copy is dropped, so a reader
        never sees a finished job vanish. A directory without the marker is not a finished
        job and is replaced."""
        final = self.path(key)
        tmp = fresh_path(self.root, f".{key}.", directory=True)
        try:
            for name, blob in files.items():
                (tmp / name).write_bytes(blob)
            if final.exists() and not self.done(key):
                aside = fresh_path(self.root, f".{key}.", directory=True)
                os.rename(final, aside)  # onto an empty directory: atomic
                shutil.rmtree(aside)
            try:
                os.rename(tmp, final)  # fails on a non-empty `final`, unlike rmtree + replace
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.done(key):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # still there unless renamed
        return final

    def info(self, key: str) -> dict:
        return json.loads((self.path(key) / DONE_MARKER).read_text())

    def workdir(self, key: str) -> Path:
        """Scratch space that survives a kill (a meta-training's checkpoint)."""
        p = self.root / WORK / key
        p.mkdir(parents=True, exist_ok=True)
        return p

    def drop_workdir(self, key: str) -> None:
        shutil.rmtree(self.root / WORK / key, ignore_errors=True)

    def sweep(self) -> list[Path]:
        """Remove what killed runs left: temporary job directories `.KEY.*` and the work
        directories of finished jobs (an unfinished job's keeps its checkpoint for resume);
        returns them. Only while holding `locked_dir` on the store, which has already swept
        the temporary files."""
        removed = [p for p in self.root.iterdir()
                   if p.name.startswith(".") and p.name not in (WORK, LOCK_NAME) and p.is_dir()]
        if (self.root / WORK).is_dir():
            removed += [p for p in (self.root / WORK).iterdir() if self.done(p.name)]
        for p in removed:
            shutil.rmtree(p, ignore_errors=True)
        return removed


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
            kw = {"address": address} if address else {"num_cpus": num_cpus}
            ray.init(**kw, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)

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


# ---- the driver -----------------------------------------------------------------------------------
def run_jobs(jobs: list[Job], store: Store, executor, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Run every job not yet in the store; returns {key: wall seconds} of those run now."""
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


def override(profile: Profile, l2os: str | None = None, meta_seeds: int | None = None) -> Profile:
    """The profile with where its L2Os come from and how many per setting replaced."""
    from dataclasses import replace

    if l2os is not None:
        profile = replace(profile, l2os=l2os)
    if meta_seeds is not None:
        if meta_seeds > 1 and profile.l2os == "pretrained":
            raise L2OError(f"--meta-seeds {meta_seeds} needs --l2os train: the shipped set has one L2O per "
                           "optimizee and beta")
        profile = replace(profile, meta_seeds=meta_seeds)
    return profile


def reproduce(profile_name: str | Profile, out: str | os.PathLike, *, experiments: Iterable[str] = EXPERIMENTS,
              workers: int = 0, ray_address: str | None = None, device: str = "cpu",
              store: str | os.PathLike | None = None, dry_run: bool = False, progress: bool = True,
              docs: str | os.PathLike | None = None, fusion: str = "auto", threads: int | None = None,
              l2os: str | None = None, meta_seeds: int | None = None, echo=print) -> dict:
    """Run the experiments of a profile, then write metrics.csv, figures/, report.md/html.
    `l2os` ('pretrained' or 'train') overrides where the profile's L2Os come from, and
    `meta_seeds` how many L2Os it meta-trains per setting."""
    from . import data as data_mod
    from .report import write_outputs

    profile = override(profile_name if isinstance(profile_name, Profile) else get_profile(profile_name),
                       l2os, meta_seeds)
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
    data_mod.load_mnist(verbose=progress)  # fetch once, before any worker needs it
    executor = make_executor(workers, ray_address, fusion, threads)
    with contextlib.ExitStack() as held:
        held.enter_context(locked_dir(out, f"reproduce --profile {profile.name}"))
        if not _inside(store_root, out):
            held.enter_context(locked_dir(store_root, f"reproduce --profile {profile.name}", "--store"))
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


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def format_plan(jobs: list[Job], done: set[str], profile) -> str:
    lines = [f"profile {profile.name}: {len(jobs)} jobs ({len(done)} already done)", ""]
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


# ---- CLI -----------------------------------------------------------------------------------------
WORKERS = Range(0, 256, integer=True)
META_SEEDS = Range(1, 20, integer=True)


def _common(p: argparse.ArgumentParser) -> None:
    from .cli import ranged, ray_address

    p.add_argument("--out", required=True, help="results directory (re-running it continues)")
    p.add_argument("--workers", type=ranged(WORKERS), default=0, help="local worker processes (0: this process)")
    p.add_argument("--ray-address", type=ray_address, default=None, metavar="ADDR",
                   help="run jobs as Ray tasks: auto, HOST:PORT, or local (start a local Ray)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--store", default=None, help="job store shared between output dirs (default OUT/jobs)")
    p.add_argument("--fusion", choices=("auto", "compile", "eager"), default="auto")
    p.add_argument("--dry-run", action="store_true", help="list the job graph and estimated time")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def add_parser(sub) -> None:
    from .cli import SEEDS, ranged

    r = sub.add_parser("reproduce", help="run every experiment of the study; figures and a report")
    r.add_argument("--profile", choices=list(PROFILES), default="quick")
    r.add_argument("--l2os", choices=L2O_SOURCES, default=None,
                   help="pretrained: analyse the shipped L2Os (quick's default); train: meta-train them "
                        "here (paper's and smoke's default)")
    r.add_argument("--meta-seeds", type=ranged(META_SEEDS), default=None, metavar="K",
                   help="meta-train K L2Os per setting (seeds 0..K-1; needs --l2os train) and take the "
                        "findings' intervals over them (default: the profile's; paper 3, quick 1)")
    r.add_argument("--docs", default=None, help="also copy the figures and findings table to this dir")
    _common(r)
    r.set_defaults(handler=_cmd_reproduce)
    e = sub.add_parser("experiment", help="run one experiment of the study")
    e.add_argument("name", choices=EXPERIMENTS)
    e.add_argument("--scale", choices=("quick", "paper", "smoke"), default="quick")
    e.add_argument("--seeds", type=ranged(SEEDS), default=None, help="meta-test seeds (default 5; smoke: 2)")
    e.add_argument("--cov-unit", choices=("minibatch", "sample"), default="minibatch")
    e.add_argument("--cov-center", choices=("mean", "fullbatch"), default="mean")
    _common(e)
    e.set_defaults(handler=_cmd_experiment)


def _check_paths(args) -> None:
    """--out, --store and --docs are (or can be made) writable directories, and MNIST
    loads, before reproduce creates anything."""
    from . import data as data_mod
    from .cli import check_out_dir

    check_out_dir(args.out)
    for flag, value in (("--store", args.store), ("--docs", getattr(args, "docs", None))):
        if value is not None:
            check_out_dir(value, flag)
    resolve_device(args.device)
    if not args.dry_run:
        data_mod.load_mnist(verbose=args.progress)


def _cmd_reproduce(args) -> int:
    from . import learned

    learned.set_fusion(args.fusion)
    profile = override(get_profile(args.profile), args.l2os, args.meta_seeds)
    _check_paths(args)
    reproduce(profile, args.out, workers=args.workers, ray_address=args.ray_address,
              device=args.device, store=args.store, dry_run=args.dry_run, progress=args.progress,
              docs=args.docs, fusion=args.fusion)
    return 0


def _cmd_experiment(args) -> int:
    from dataclasses import replace

    from . import learned

    learned.set_fusion(args.fusion)
    base = get_profile(args.scale)
    seeds = args.seeds if args.seeds is not None else (base.seeds if base.name == "smoke" else 5)
    base = replace(base, seeds=seeds, unseen_seeds=None if base.unseen_seeds is None else min(base.unseen_seeds, seeds))
    if (args.cov_unit, args.cov_center) != ("minibatch", "mean") and args.name != "noise":
        raise L2OError("--cov-unit/--cov-center apply to the noise experiment only")
    profile = replace(base, cov_unit=args.cov_unit, cov_center=args.cov_center)
    _check_paths(args)
    reproduce(profile, args.out, experiments=(args.name,), workers=args.workers,
              ray_address=args.ray_address, device=args.device, store=args.store,
              dry_run=args.dry_run, progress=args.progress, fusion=args.fusion)
    return 0
