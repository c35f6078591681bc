"""Cost of the model probe (l2o_dynamics.probes) on research-size networks, in one run.

    python benchmarks/probe_overhead.py [--steps 6] [--batch 32] [--noise-batches 16]
                                        [--parts overhead,noise,subset]

overhead  one SGD-with-momentum training step of resnet18 and of a VGG-like net (vgg11's
          convolutions with BatchNorm, a 10-way head) on 3x32x32 inputs, with and without
          the probe at every=1, timed alternately on two identical copies (median of
          --steps steps each); the ratio is the probe's share of a step. On a shared
          machine that difference of two medians is noisy (a few % of a step either way),
          so the time spent inside the probe's two step hooks is also timed directly
          (hooks_s, median over the steps; hooks_share = hooks_s / step_s).
noise     `probe.noise()` on resnet18 with --noise-batches minibatches and Adam's state,
          in a fresh process: wall time (and the estimators' share) and the rise of the
          peak resident memory above what the model and its training step already held.
subset    the error of `noise(coordinates=K)` against the full-coordinate result on a
          narrow resnet18 (width 16, both fit): |alpha difference| and the relative error
          of cov_max_eig over 3 subset seeds per K.

torchvision's resnet18 and vgg11_bn are used where `import torchvision` works against the
installed torch; otherwise the same architectures are built here. Prints a table and
writes benchmarks/results/probe_overhead.json (--out); the parts not run this time are kept
from that file when it holds a run at the same batch size (listed under "kept_from_previous_run").
Batch 128 goes to its own file: --parts overhead --batch 128 --out
benchmarks/results/probe_overhead_batch128.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from l2o_dynamics import noise as noise_mod
from l2o_dynamics import probes

ROOT = Path(__file__).resolve().parents[1]


# ---- the architectures (torchvision's layouts) -----------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class ResNet18(nn.Module):
    def __init__(self, classes=10, width=64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = [w, w, 2 * w, 4 * w, 8 * w]
        for i in range(4):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(chans[i], chans[i + 1], stride),
                                                        BasicBlock(chans[i + 1], chans[i + 1], 1)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * w, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def vgg_like(classes=10):
    """vgg11_bn's convolutions; the CIFAR-style head (512 -> classes) after a 1x1 pool."""
    layers, cin = [], 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, classes))


def models(source: str):
    if source == "torchvision":
        import torchvision

        vgg = torchvision.models.vgg11_bn(num_classes=10)
        vgg.avgpool, vgg.classifier = nn.Identity(), nn.Linear(512, 10)  # 32x32 inputs: 1x1 after the convs
        return {"resnet18": lambda: torchvision.models.resnet18(num_classes=10), "vgg11_bn-like": lambda: vgg}
    return {"resnet18": ResNet18, "vgg11_bn-like": vgg_like}


def source() -> str:
    try:
        importlib.import_module("torchvision")
        return "torchvision"
    except Exception:  # a wheel built against another torch fails at import in many ways
        return "built here"


def data(n, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


# ---- parts ----------------------------------------------------------------------------------------------
def step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def overhead(args, tmp):
    rows = {}
    for name, make in models(args.source).items():
        torch.manual_seed(0)
        plain, probed = make(), make()
        probed.load_state_dict(plain.state_dict())
        o1 = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
        o2 = torch.optim.SGD(probed.parameters(), lr=0.01, momentum=0.9)
        batches = data(2, args.batch)
        clock = {}
        # optimizer hooks run in the order registered: these time the probe's own two hooks
        o2.register_step_pre_hook(lambda *a: clock.__setitem__("pre", time.perf_counter()))
        o2.register_step_post_hook(lambda *a: clock.__setitem__("post", time.perf_counter()))
        probe = probes.attach(o2, probed, batches[0][0], Path(tmp) / name, every=1, loss="cross_entropy")
        hooks = []
        o2.register_step_pre_hook(lambda *a: clock.__setitem__("in_pre", time.perf_counter() - clock["pre"]))
        o2.register_step_post_hook(lambda *a: hooks.append(clock["in_pre"] + time.perf_counter() - clock["post"]))
        for _ in range(2):  # warm-up
            step(plain, o1, *batches[0])
            step(probed, o2, *batches[0])
        t_plain, t_probe = [], []
        hooks.clear()
        for i in range(args.steps):
            x, y = batches[i % 2]
            t0 = time.perf_counter()
            step(plain, o1, x, y)
            t1 = time.perf_counter()
            step(probed, o2, x, y)
            t2 = time.perf_counter()
            t_plain.append(t1 - t0)
            t_probe.append(t2 - t1)
        probe.close()
        a, b, h = statistics.median(t_plain), statistics.median(t_probe), statistics.median(hooks)
        kinds = [s.kind for s in probe.symmetries]
        rows[name] = {"params": sum(p.numel() for p in plain.parameters()), "step_s": a, "probed_step_s": b,
                      "probe_s": b - a, "overhead": b / a - 1, "hooks_s": h, "hooks_share": h / a,
                      "symmetries": {k: kinds.count(k) for k in sorted(set(kinds))}}
        print(f"{name}: done", flush=True)
    return rows


def noise_child(args) -> dict:
    """In a fresh process: the model, a few Adam steps, then noise() alone."""
    torch.manual_seed(0)
    model = models(args.source)["resnet18"]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = data(args.noise_batches, args.batch, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        probe = probes.attach(opt, model, batches[0][0], Path(tmp) / "run", symmetries=[])
        for x, y in batches[:2]:
            step(model, opt, x, y)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        inner = []
        streamed = noise_mod.streamed_noise

        def timed(*a, **k):
            t = time.perf_counter()
            out = streamed(*a, **k)
            inner.append(time.perf_counter() - t)
            return out

        noise_mod.streamed_noise = timed
        cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731  user + system
        t0, c0 = time.perf_counter(), cpu()
        metrics = probe.noise(batches, F.cross_entropy, coordinates=args.coordinates)
        total, cpu_s = time.perf_counter() - t0, cpu() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    P = sum(p.numel() for p in model.parameters())
    return {"params": P, "batches": args.noise_batches, "coordinates": int(metrics["noise_coordinates"]),
            "total_s": total, "cpu_s": cpu_s, "estimators_s": inner[0], "peak_rise_mb": peak - before,
            "peak_rss_mb": peak, "rows_mb": 2 * args.noise_batches * metrics["noise_coordinates"] * 4 / 2**20,
            "alpha_update_pub": metrics["alpha_update_pub"], "cov_max_eig": metrics["cov_max_eig"]}


def noise_part(args, coordinates=None) -> dict:
    cmd = [sys.executable, __file__, "--child-noise", "--batch", str(args.batch),
           "--noise-batches", str(args.noise_batches), "--source", args.source]
    if coordinates:
        cmd += ["--coordinates", str(coordinates)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def subset(args, tmp) -> dict:
    torch.manual_seed(0)
    model = ResNet18(width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = data(args.noise_batches, args.batch, seed=2)
    for x, y in batches[:2]:
        step(model, opt, x, y)
    P = sum(p.numel() for p in model.parameters())
    full = probes.attach(opt, model, batches[0][0], Path(tmp) / "full", symmetries=[]).noise(batches, F.cross_entropy)
    rows = {}
    for K in (P // 64, P // 16, P // 4):
        errs = []
        for seed in range(3):
            probe = probes.attach(opt, model, batches[0][0], Path(tmp) / f"s{K}-{seed}", symmetries=[], seed=seed)
            m = probe.noise(batches, F.cross_entropy, coordinates=K)
            errs.append({k: abs(m[k] - full[k]) for k in full if k.startswith("alpha")}
                        | {"cov_max_eig_rel": abs(m["cov_max_eig"] / full["cov_max_eig"] - 1)})
        rows[K] = {k: max(e[k] for e in errs) for k in errs[0]}
    return {"params": P, "batches": args.noise_batches, "full": full, "max_error_over_3_seeds": rows}


def _keep_previous(out: Path, result: dict, parts: list[str]) -> list[str]:
    """Copy into `result` the parts not run now from `out`'s previous run at the same batch size."""
    try:
        previous = json.loads(out.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(previous, dict) or previous.get("batch") != result["batch"]:
        return []
    kept = [p for p in ("overhead", "noise", "subset") if p not in parts and p in previous]
    for p in kept:
        result[p] = previous[p]
    if kept:
        result["kept_from_previous_run"] = kept
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--noise-batches", type=int, default=16)
    ap.add_argument("--parts", default="overhead,noise,subset")
    ap.add_argument("--coordinates", type=int, default=None)
    ap.add_argument("--source", default=None)
    ap.add_argument("--child-noise", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "probe_overhead.json"))
    args = ap.parse_args()
    args.source = args.source or source()
    if args.child_noise:
        print(json.dumps(noise_child(args)))
        return
    parts = args.parts.split(",")
    result = {"torch": torch.__version__, "architectures": args.source, "threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "batch": args.batch, "input": [3, 32, 32]}
    with tempfile.TemporaryDirectory() as tmp:
        if "overhead" in parts:
            result["overhead"] = overhead(args, tmp)
        if "noise" in parts:
            result["noise"] = {"all": noise_part(args), "coordinates=2^20": noise_part(args, 2**20)}
        if "subset" in parts:
            result["subset"] = subset(args, tmp)
    kept = _keep_previous(Path(args.out), result, parts)
    print(f"\nprobe cost, {args.source} architectures, batch {args.batch} of 3x32x32, "
          f"{torch.get_num_threads()} thread(s)\n")
    if kept:
        print(f"(kept from the previous {args.out}: {', '.join(kept)})")
    for name, r in result.get("overhead", {}).items():
        hooks = (f"  (in its hooks {1e3 * r['hooks_s']:.0f} ms, {100 * r['hooks_share']:.1f}%)" if "hooks_s" in r
                 else "")
        print(f"{name:<14} {r['params'] / 1e6:6.1f}M params  step {r['step_s']:.3f} s  probed {r['probed_step_s']:.3f} s"
              f"  overhead {100 * r['overhead']:+.1f}%{hooks}  {r['symmetries']}")
    for name, r in result.get("noise", {}).items():
        print(f"noise() resnet18, {r['batches']} batches, {name:<16}: {r['total_s']:.1f} s ({r['cpu_s']:.1f} s CPU) "
              f"(estimators {r['estimators_s']:.1f} s), peak memory +{r['peak_rise_mb']:.0f} MB "
              f"(rows {r['rows_mb']:.0f} MB)")
    if "subset" in result:
        s = result["subset"]
        print(f"\ncoordinates=K against all {s['params']} (resnet18 width 16, {s['batches']} batches), max over 3 seeds:")
        for K, e in s["max_error_over_3_seeds"].items():
            print(f"  K={K:>7}: " + "  ".join(f"{k} {v:.3f}" for k, v in e.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
