"""The benchmark sections but Ray's (bench/run.py runs them): each returns a dict of rows.

Every section takes ``q`` (--quick: smaller sizes, fewer repeats) and ``tiny`` (--tiny: the smoke
test's smallest sizes; numbers meaningless).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tldr_core.attack import losses
from tldr_core.attack.config import VARIANTS, AttackConfig
from tldr_core.attack.models import ConditionedGenerator, PaperCNN, sample_conditioning
from tldr_core.attack.train import train_generator
from tldr_core.scoring.metrics import score_reconstructions
from tldr_core.scoring.nearest import SearchStats, nn_ssim

ROOT = Path(__file__).resolve().parents[1]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall seconds of `repeats` calls (after `warmup` untimed ones) and the last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


# ---------------------------------------------------------------------------------- data helpers

def smooth_images(n: int, shape: tuple[int, int, int], seed: int, grid: int = 8) -> torch.Tensor:
    """Random-but-structured images in [0, 1]: bicubic-upsampled uniform noise on a grid x grid lattice
    (a stand-in for CIFAR-like images; no real CIFAR on this machine)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    out = torch.empty(n, c, h, w)
    for i in range(0, n, 4096):
        k = min(4096, n - i)
        low = torch.rand(k, c, grid, grid, generator=g)
        out[i : i + k] = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp_(0, 1)
    return out


class Split:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels


def classifier_for(shape: tuple[int, int, int]) -> torch.nn.Module:
    torch.manual_seed(0)
    return PaperCNN(shape, 10).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- sections

def bench_training(q: bool, tiny: bool = False) -> dict[str, Any]:
    steps = 2 if tiny else 6 if q else 25
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        clf = classifier_for(shape)
        for mode in ("inversion", "reconstruction"):
            for variant in VARIANTS[:1] if tiny else VARIANTS:
                cfg = AttackConfig(variant=variant, mode=mode, steps=steps, batch_size=64, device="cpu")
                train_generator(clf, 10, shape, AttackConfig(variant=variant, mode=mode, steps=2, device="cpu"), log=None)
                rates = []
                for _ in range(1 if q else 3):
                    res = train_generator(clf, 10, shape, cfg, log=None)
                    rates.append(res.steps / res.seconds)
                rows.append({"shape": "x".join(map(str, shape)), "mode": mode, "variant": variant,
                             "steps_per_s": statistics.median(rates), "load": load()})
    return {"steps": steps, "batch": 64, "rows": rows}


def bench_kkt(q: bool, tiny: bool = False) -> dict[str, Any]:
    """Steps/s of the stationarity (KKT) attack: an untrained 784-1000-1000-10 ReLU MLP (the attack's
    cost does not depend on the weights), 200 candidates (20 per class), all parameters in the equation,
    on the CPU and, when there is one, on CUDA. Each step is one double backward over all candidates."""
    from tldr_core.attack.kkt import KKTConfig, run_kkt
    from tldr_core.attack.models import FC

    widths, per_class, steps = ((100, 100), 2, 3) if tiny else ((1000, 1000), 20, 10 if q else 20)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        torch.manual_seed(0)
        clf = FC((1, 28, 28), 10, widths=widths).eval().requires_grad_(False)
        cfg = KKTConfig(steps=steps, per_class=per_class, log_every=steps, device=device)
        run_kkt(clf, 10, (1, 28, 28), KKTConfig(steps=2, per_class=per_class, device=device),
                train_per_class=per_class, log=None)  # warm-up (CUDA context, allocator)
        rates = [run_kkt(clf, 10, (1, 28, 28), cfg, train_per_class=per_class, log=None).steps_per_second
                 for _ in range(1 if q or tiny else 3)]
        rows.append({"device": device, "network": "784-" + "-".join(map(str, widths)) + "-10",
                     "candidates": 10 * per_class, "steps": steps, "steps_per_s": statistics.median(rates),
                     "load": load()})
    return {"rows": rows, "cuda": torch.cuda.is_available()}


def _term_inputs(shape, batch=64):
    clf = classifier_for(shape)
    g = torch.Generator().manual_seed(0)
    v, labels = sample_conditioning(batch, 10, "reconstruction", g)
    x = torch.rand(batch, *shape, generator=g)
    return clf, x, v, labels


def bench_terms(q: bool, tiny: bool = False) -> dict[str, Any]:
    """Forward + backward (to the images) of each loss term alone on a batch of 64 generated-size images,
    and of the generator forward/backward that every step pays."""
    reps = 1 if tiny else 3 if q else 9
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        clf, x0, v, y = _term_inputs(shape, 8 if tiny else 64)
        v, y = v[: x0.shape[0]], y[: x0.shape[0]]
        cfg = AttackConfig()

        def run(fn):
            def f():
                x = x0.clone().requires_grad_(True)
                fn(x).backward()
            return f

        cases = {
            "classifier forward (shared by kl, ce, cos, ortho)": lambda x: clf(x).sum(),
            "kl": lambda x: losses.kl(v, clf(x)),
            "ce": lambda x: losses.ce(clf(x), y),
            "cos": lambda x: losses.cos(clf.features(x)),
            "ortho": lambda x: losses.ortho(clf.features(x)),
            "kl_pert + ce_pert (FGSM step + 2nd forward)": lambda x: (
                lambda lp: losses.kl(v, lp) + losses.ce(lp, y))(clf(losses.perturb(clf, x, y, cfg.epsilon, "fgsm"))),
            "var": lambda x: losses.var(x),
            "pix": lambda x: losses.pix(x),
            "grad (ghost, head; default)": lambda x: losses.grad_term(clf, x, y, "ghost", "head"),
            "all nine terms (compute_terms + weighted_total)": lambda x: losses.weighted_total(
                losses.compute_terms(clf, x, v, y, cfg), cfg.effective_weights),
        }
        for name, fn in cases.items():
            t, _ = timed(run(fn), reps)
            rows.append({"shape": "x".join(map(str, shape)), "term": name, "ms": t * 1e3, "load": load()})
        h0 = clf.trunk(x0).detach()  # in a step the trunk output is computed once and shared with Grad

        def grad_on_trunk():
            h = h0.clone().requires_grad_(True)
            losses.grad_term(clf, x0, y, "ghost", "head", trunk=h).backward()
        t, _ = timed(grad_on_trunk, reps)
        rows.append({"shape": "x".join(map(str, shape)), "term": "grad (ghost, head) from the shared trunk output:"
                     " its extra cost in a step", "ms": t * 1e3, "load": load()})
        gen = ConditionedGenerator("vector-matrix", 10, shape)
        z = torch.randn(x0.shape[0], gen.latent_dim)

        def gen_step():
            gen.zero_grad(set_to_none=True)
            gen(z, v, y).mean().backward()
        t, _ = timed(gen_step, reps)
        rows.append({"shape": "x".join(map(str, shape)), "term": "generator forward + backward (vector-matrix)",
                     "ms": t * 1e3, "load": load()})
    return {"batch": 64, "rows": rows}


def bench_grad(q: bool, tiny: bool = False) -> dict[str, Any]:
    """The four Grad forms at batch 64 (value and gradient to the images), both scopes; the loop is the reference."""
    reps = 1 if tiny else 3 if q else 7
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        clf, x0, _, y = _term_inputs(shape, 8 if tiny else 64)
        h0 = clf.trunk(x0).detach()
        for scope in ("head", "all"):
            # head: every form starts from the trunk's output (computed once per step, shared with the
            # other terms) and back-propagates to it; all: from the images
            start = h0 if scope == "head" else x0
            ref = losses.grad_norm_loop(clf, x0, y, scope, trunk=h0 if scope == "head" else None).detach()
            times = {}
            for mode in ("loop", "per-sample", "batch", "ghost"):
                fn = losses.GRAD_FUNCS[mode]

                def f(fn=fn, start=start, scope=scope):
                    s_ = start.clone().requires_grad_(True)
                    out = fn(clf, x0, y, scope, trunk=s_) if scope == "head" else fn(clf, s_, y, scope)
                    out.mean().backward()
                    return out.detach()
                t, out = timed(f, reps)
                times[mode] = t
                err = float((out - ref).abs().max()) if mode != "batch" else float("nan")
                rows.append({"shape": "x".join(map(str, shape)), "scope": scope, "mode": mode, "ms": t * 1e3,
                             "max_abs_diff_vs_loop": err, "load": load()})
            for r in rows:
                if r["shape"] == "x".join(map(str, shape)) and r["scope"] == scope:
                    r["speedup_vs_loop"] = times["loop"] / times[r["mode"]]
    return {"batch": 64, "rows": rows}


def bench_scoring(q: bool, tiny: bool = False) -> dict[str, Any]:
    """score_reconstructions for 100 reconstructions of 3x32x32 against N training + N held-out images:
    brute force (the reference) vs the prefilter search (default) and, up to 10,000, the provable pruned
    search; identical metrics and nearest neighbours checked in every row."""
    shape = (3, 32, 32)
    sizes = (600,) if tiny else (1000, 6000) if q else (1000, 10000, 50000)
    rows = []
    for n in sizes:
        imgs = smooth_images(2 * n, shape, seed=n)
        labels = torch.arange(2 * n) % 10
        train, held = Split(imgs[:n], labels[:n]), Split(imgs[n:], labels[n:])
        g = torch.Generator().manual_seed(1)
        pick = torch.cat([(train.labels == c).nonzero()[:10, 0] for c in range(10)])
        regimes = {
            # noisy, slightly blurred copies of training images: the leak the audit looks for
            "near-copies of training images": (F.avg_pool2d(train.images[pick], 3, 1, 1, count_include_pad=False)
                                               + 0.03 * torch.randn(100, *shape, generator=g)).clamp(0, 1),
            # half a training image, half a fresh one: a partial leak
            "half copies": (0.5 * train.images[pick] + 0.5 * smooth_images(100, shape, seed=7)).clamp(0, 1),
            # fresh images of the same kind: nothing leaks, best matches are poor and close together
            "fresh images (no leak)": smooth_images(100, shape, seed=10**6 + n),
        }
        rlab = train.labels[pick]
        for regime, recon in regimes.items():
            row: dict[str, Any] = {"n_train": n, "regime": regime}
            res = {}
            for method in ("brute", "prefilter", "pruned"):
                if method == "pruned" and n > 10000:
                    continue  # costs about what brute force does here (see the notes); minutes at 50k
                st = SearchStats()  # cold: each call builds its own ReferenceIndex, nothing cached
                t0 = time.perf_counter()
                res[method] = score_reconstructions(recon, rlab, train, held, method=method, n_boot=200, stats=st)
                row[f"{method}_s"] = time.perf_counter() - t0
                row[f"{method}_exact"] = st.exact_pairs / st.pairs if st.pairs else 1.0
            nb = nn_ssim(recon, rlab, train.images, train.labels, method="brute")
            npf = nn_ssim(recon, rlab, train.images, train.labels, method="prefilter")
            keys = ("quality", "quality_heldout", "gap", "coverage")
            row.update(same_metrics=all(abs(res["brute"][k] - r[k]) <= 1e-6 for r in res.values() for k in keys),
                       same_nn_index=bool((nb.index == npf.index).all()),
                       max_nn_value_diff=float((nb.values - npf.values).abs().max()),
                       speedup=row["brute_s"] / row["prefilter_s"], quality=res["brute"]["quality"],
                       coverage=res["brute"]["coverage"], load=load())
            rows.append(row)
    return {"recon": 100, "shape": "3x32x32", "rows": rows}


MEMORY = r"""
import sys, json, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
from tldr_core.attack.config import AttackConfig
from tldr_core.scoring.metrics import score_reconstructions
from tldr_core.attack.models import PaperCNN
from tldr_core.attack.train import generate, train_generator
shape = tuple(int(s) for s in sys.argv[2].split("x")); n = int(sys.argv[3]); steps = int(sys.argv[4])
class S:
    def __init__(s, i, l): s.images, s.labels = i, l
def hwm():  # peak RSS of this process since exec (ru_maxrss would include the forking parent's)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
base = hwm()
clf = PaperCNN(shape, 10).eval().requires_grad_(False)
res = train_generator(clf, 10, shape, AttackConfig(steps=steps, device="cpu"), log=None)
train_peak = hwm()
imgs = torch.rand(2 * n, *shape); labels = torch.arange(2 * n) % 10
im, lab = generate(res.generator, 20)
score_reconstructions(im, lab, S(imgs[:n], labels[:n]), S(imgs[n:], labels[n:]), classifier=clf, n_boot=200)
print(json.dumps({"import_mb": base / 1024, "train_mb": train_peak / 1024,
                  "trial_mb": hwm() / 1024}))
"""


def bench_memory(q: bool, tiny: bool = False) -> dict[str, Any]:
    """Peak resident memory of one trial's work in a fresh process: training (batch 64, all nine terms)
    then scoring 200 reconstructions against N training + N held-out images."""
    rows = []
    cases = [("1x28x28", 200)] if tiny else [("1x28x28", 1000), ("3x32x32", 1000)] if q else [("1x28x28", 10000), ("3x32x32", 10000),
                                                               ("3x32x32", 50000)]
    for shape, n in cases:
        p = subprocess.run([sys.executable, "-c", MEMORY, str(ROOT), shape, str(n), "2" if tiny else "5" if q else "20"],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        rows.append({"shape": shape, "n_train": n, **json.loads(p.stdout.strip().splitlines()[-1]), "load": load()})
    return {"rows": rows}
