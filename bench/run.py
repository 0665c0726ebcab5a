"""TLDR benchmark suite (ISSUE 6): what a trial costs, and where the time goes.

    python bench/run.py            # full suite (~35 min on 2 cores), writes docs/benchmarks.md
    python bench/run.py --quick    # laptop check (~2 min), same table with smaller sizes
    python bench/run.py --only grad,scoring --out /tmp/b.md

Sections: generator steps/s (4 conditioning variants x 2 image shapes x 2 modes), the cost of each
loss term and of the four Grad forms (both scopes), scoring (brute force vs the pruned exact
search, 1k/10k/50k references), Ray Tune's overhead against a plain loop with trials/hour at 1 and 2
concurrent trials, and the peak memory of a trial. Every ratio is measured side by side in one run;
each timing is the median of repeats, and the 1-minute load average is recorded beside it because
the machine may be shared. Speed is never asserted in tests (tests/test_bench.py checks results only).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tldr_core.attack import losses  # noqa: E402
from tldr_core.scoring import metrics  # noqa: E402
from tldr_core.attack.config import VARIANTS, AttackConfig  # noqa: E402
from tldr_core.attack.models import ConditionedGenerator, PaperCNN, sample_conditioning  # noqa: E402
from tldr_core.attack.train import train_generator  # noqa: E402

SECTIONS = ("training", "terms", "grad", "scoring", "ray", "memory")
TINY = False  # --tiny: smallest sizes, for the smoke test (tests/test_bench.py); numbers are meaningless
GPU_NOTE = "not measured (no GPU lent to this task)"


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

def bench_training(q: bool) -> dict[str, Any]:
    steps = 2 if TINY else 6 if q else 25
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        clf = classifier_for(shape)
        for mode in ("inversion", "reconstruction"):
            for variant in VARIANTS[:1] if TINY else VARIANTS:
                cfg = AttackConfig(variant=variant, mode=mode, steps=steps, batch_size=64, device="cpu")
                train_generator(clf, 10, shape, AttackConfig(variant=variant, mode=mode, steps=2, device="cpu"), log=None)
                rates = []
                for _ in range(1 if q else 3):
                    res = train_generator(clf, 10, shape, cfg, log=None)
                    rates.append(res.steps / res.seconds)
                rows.append({"shape": "x".join(map(str, shape)), "mode": mode, "variant": variant,
                             "steps_per_s": statistics.median(rates), "load": load()})
    return {"steps": steps, "batch": 64, "rows": rows}


def _term_inputs(shape, batch=64):
    clf = classifier_for(shape)
    g = torch.Generator().manual_seed(0)
    v, labels = sample_conditioning(batch, 10, "reconstruction", g)
    x = torch.rand(batch, *shape, generator=g)
    return clf, x, v, labels


def bench_terms(q: bool) -> dict[str, Any]:
    """Forward + backward (to the images) of each loss term alone on a batch of 64 generated-size images,
    and of the generator forward/backward that every step pays."""
    reps = 1 if TINY else 3 if q else 9
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        clf, x0, v, y = _term_inputs(shape, 8 if TINY else 64)
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


def bench_grad(q: bool) -> dict[str, Any]:
    """The four Grad forms at batch 64 (value and gradient to the images), both scopes; the loop is the reference."""
    reps = 1 if TINY else 3 if q else 7
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        clf, x0, _, y = _term_inputs(shape, 8 if TINY else 64)
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


def bench_scoring(q: bool) -> dict[str, Any]:
    """score_reconstructions for 100 reconstructions of 3x32x32 against N training + N held-out images:
    brute force (the reference) vs the prefilter search (default) and, up to 10,000, the provable pruned
    search; identical metrics and nearest neighbours checked in every row."""
    shape = (3, 32, 32)
    sizes = (600,) if TINY else (1000, 6000) if q else (1000, 10000, 50000)
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
                metrics._STATS_CACHE.clear()
                metrics.SEARCH_STATS = metrics.SearchStats()
                t0 = time.perf_counter()
                res[method] = metrics.score_reconstructions(recon, rlab, train, held, method=method, n_boot=200)
                row[f"{method}_s"] = time.perf_counter() - t0
                st = metrics.SEARCH_STATS
                row[f"{method}_exact"] = st.exact_pairs / st.pairs if st.pairs else 1.0
            nb = metrics.nn_ssim(recon, rlab, train.images, train.labels, method="brute")
            npf = metrics.nn_ssim(recon, rlab, train.images, train.labels, method="prefilter")
            keys = ("quality", "quality_heldout", "gap", "coverage")
            row.update(same_metrics=all(abs(res["brute"][k] - r[k]) <= 1e-6 for r in res.values() for k in keys),
                       same_nn_index=bool((nb.index == npf.index).all()),
                       max_nn_value_diff=float((nb.values - npf.values).abs().max()),
                       speedup=row["brute_s"] / row["prefilter_s"], quality=res["brute"]["quality"],
                       coverage=res["brute"]["coverage"], load=load())
            rows.append(row)
            metrics._STATS_CACHE.clear()
    return {"recon": 100, "shape": "3x32x32", "rows": rows}


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


PLAIN_LOOP = r"""
# What one Tune trial of tune/search.py does (tldr_core.platform.tuning.run_trial), minus Ray, Optuna and MLflow:
# the same configurations, steps, scoring cadence, final scoring, pictures and generator checkpoint.
import sys, time, json, tempfile, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tldr_core.attack.checkpoints import GENERATOR_FORMAT, save_checkpoint
from tldr_core.attack.classifier import ClassifierSettings, load_or_train
from tldr_core.attack.config import AttackConfig
from tldr_core.attack.data import load_dataset
from tldr_core.scoring.metrics import nn_ssim, score_baselines, score_reconstructions
from tldr_core.platform.search_space import load_space
from tldr_core.attack.train import generate, train_generator
from tldr_core.report.pictures import save_grid, save_nearest
space_path = sys.argv[2]
n_trials, steps, per_class, train_size = (int(a) for a in sys.argv[3:7])
torch.set_num_threads(1)  # what a Ray trial with 1 CPU gets
t0 = time.perf_counter()
bundle = load_dataset("mnist-bundled", train_size, seed=0)
model, meta, path = load_or_train(bundle, ClassifierSettings(arch="cnn", seed=0), log=lambda s: None)
score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, per_class, classifier=model)
space = load_space(space_path)
eval_every, eval_pc = max(1, steps // 4), min(per_class, 10)
out = Path(tempfile.mkdtemp(prefix="plain-loop-"))
for i, point in enumerate(space.initial_points[:n_trials]):
    cfg = space.attack_config(point, base=AttackConfig(steps=steps, seed=0, per_class=per_class, device="cpu"))
    def cb(step, record, gen):
        if step % eval_every == 0 and step < steps:
            with torch.random.fork_rng(devices=[]):
                im, lab = generate(gen, eval_pc, seed=cfg.seed + 1)
                gen.train()
                score_reconstructions(im, lab, bundle.train, bundle.heldout, classifier=model, n_boot=200)
        return False
    res = train_generator(model, bundle.num_classes, bundle.image_shape, cfg, callback=cb, log=None)
    im, lab = generate(res.generator, per_class, seed=cfg.seed + 1)
    m = score_reconstructions(im, lab, bundle.train, bundle.heldout, classifier=model, seed=cfg.seed)
    near = nn_ssim(im, lab, bundle.train.images, bundle.train.labels)
    save_grid(out / f"grid{i}.png", im, lab, bundle.class_names, title=f"trial {i}")
    save_nearest(out / f"nearest{i}.png", im, lab, bundle.train.images[near.index], near.values, bundle.class_names)
    save_checkpoint(out / f"generator{i}.pt", res.generator.cpu(), GENERATOR_FORMAT, {"metrics": m})
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def fixed_trials_space(path: Path, trials: int) -> None:
    """tune/space.yaml with `trials` complete initial points (all four variants; the default weights,
    and every other one with the perturbed terms and Grad off): with --trials equal to their number and
    --scheduler fifo, tune/search.py runs exactly these configurations, as the plain loop does."""
    import yaml

    from tldr_core.attack.config import VARIANTS
    from tldr_core.platform.search_space import DEFAULT_SPACE, DEFAULTS_POINT, space_from_dict

    data = yaml.safe_load(DEFAULT_SPACE.read_text())
    data["initial_points"] = [DEFAULTS_POINT]
    (base,) = space_from_dict(data).initial_points  # every searched parameter at its default
    points = []
    for i in range(trials):
        p = {**base, "variant": VARIANTS[i % len(VARIANTS)]}
        if (i // len(VARIANTS)) % 2:
            p.update(kl_pert=0.0, ce_pert=0.0, grad=0.0)
            p.pop("epsilon", None)
            p.pop("perturbation", None)
        points.append(p)
    data["initial_points"] = points
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def bench_ray(q: bool) -> dict[str, Any]:
    """The same trials (same configurations, steps, data, classifier, scoring cadence, pictures and
    checkpoints) by a plain Python loop and by tune/search.py (FIFO: no early stopping) with 1 and 2
    concurrent trials; whole-command wall time in fresh processes, classifier cache warmed first."""
    search = ROOT / "tune" / "search.py"
    if not search.exists():
        return {"blocked": "tune/search.py does not exist yet"}
    trials, steps, per_class, train_size = (2, 8, 2, 200) if TINY else (4, 40, 4, 200) if q else (8, 300, 20, 1000)
    tmp = Path(tempfile.mkdtemp(prefix="tldr-bench-ray-"))
    env = {**os.environ, "TLDR_CACHE": str(tmp / "cache"), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "TMPDIR": str(tmp)}
    py = sys.executable
    space = tmp / "space.yaml"
    fixed_trials_space(space, trials)
    rows: list[dict[str, Any]] = []
    try:
        loop = [py, "-c", PLAIN_LOOP, str(ROOT), str(space)]
        _run(loop + ["0", str(steps), str(per_class), str(train_size)], env, ROOT)  # trains the classifier once
        loop_s, out = _run(loop + [str(trials), str(steps), str(per_class), str(train_size)], env, ROOT)
        rows.append({"runner": "plain Python loop (1 process, 1 thread)", "concurrent": 1, "seconds": loop_s,
                     "trials_per_hour": trials / loop_s * 3600, "load": load(), "note": ""})
        for conc in (1, 2):
            store = tmp / f"tune{conc}"
            cmd = [py, str(search), "--dataset", "mnist-bundled", "--train-size", str(train_size), "--trials",
                   str(trials), "--steps", str(steps), "--per-class", str(per_class), "--max-concurrent", str(conc),
                   "--cpus-per-trial", "1", "--storage", str(store), "--tracking-uri",
                   f"sqlite:///{tmp}/mlflow{conc}.db", "--seed", "0", "--space", str(space), "--scheduler", "fifo"]
            secs, out = _run(cmd, env, ROOT)
            done = next((ln.strip() for ln in out.splitlines() if "stopped early" in ln), "")
            rows.append({"runner": f"tune/search.py, --max-concurrent {conc}", "concurrent": conc, "seconds": secs,
                         "trials_per_hour": trials / secs * 3600, "load": load(), "note": done})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    overhead = rows[1]["seconds"] / rows[0]["seconds"] - 1.0
    return {"trials": trials, "steps": steps, "per_class": per_class, "train_size": train_size,
            "rows": rows, "overhead_1": overhead}


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


def bench_memory(q: bool) -> dict[str, Any]:
    """Peak resident memory of one trial's work in a fresh process: training (batch 64, all nine terms)
    then scoring 200 reconstructions against N training + N held-out images."""
    rows = []
    cases = [("1x28x28", 200)] if TINY else [("1x28x28", 1000), ("3x32x32", 1000)] if q else [("1x28x28", 10000), ("3x32x32", 10000),
                                                               ("3x32x32", 50000)]
    for shape, n in cases:
        p = subprocess.run([sys.executable, "-c", MEMORY, str(ROOT), shape, str(n), "2" if TINY else "5" if q else "20"],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-3000:])
        rows.append({"shape": shape, "n_train": n, **json.loads(p.stdout.strip().splitlines()[-1]), "load": load()})
    return {"rows": rows}


# ---------------------------------------------------------------------------------- report

def machine() -> dict[str, Any]:
    import numpy
    cpu = platform.processor() or ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import ray
        ray_v = ray.__version__
    except ImportError:
        ray_v = "not installed"
    return {"date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu,
            "cores": os.cpu_count(), "memory": mem, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "ray": ray_v, "threads": torch.get_num_threads(),
            "os": platform.platform(), "cuda": torch.cuda.is_available()}


def f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def _diff(r: dict[str, Any]) -> str:
    return "n/a" if r["mode"] == "batch" else f"{r['max_abs_diff_vs_loop']:.1e}"


def render(res: dict[str, Any], quick: bool, wall: float) -> str:
    m = res["machine"]
    L = ["# Benchmarks", "",
         "Regenerate with `make bench` (full, ~35 min) or `make bench ARGS=--quick` / `python bench/run.py --quick`"
         " (laptop check); the numbers below are from one run of the suite, all ratios measured side by side"
         " in that run. Each timing is a median of repeats; `load` is the 1-minute load average when it was"
         " taken (this 2-core machine is shared, so absolute numbers are noisy: trust the ratios).", "",
         f"- date: {m['date']}; mode: {'quick' if quick else 'full'}; suite wall time {wall / 60:.1f} min",
         f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}",
         f"- versions: Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, ray {m['ray']}",
         f"- torch threads: {m['threads']} (intra-op; Ray gives each 1-CPU trial one thread too)",
         f"- load average at start / end: {res['load_start']} / {res['load_end']}",
         f"- GPU column: {GPU_NOTE}", ""]
    if "training" in res:
        t = res["training"]
        L += ["## Generator training steps per second", "",
              f"Batch {t['batch']}, all terms of the mode (inversion: 4, reconstruction: 9 with Grad = ghost/head,"
              f" FGSM perturbation), {t['steps']} steps per measurement, untrained PaperCNN classifier"
              " (cost does not depend on its weights).", "",
              "| image | mode | variant | CPU steps/s | GPU steps/s | load |", "|---|---|---|---:|---|---:|"]
        L += [f"| {r['shape']} | {r['mode']} | {r['variant']} | {f(r['steps_per_s'], 1)} | {GPU_NOTE} | {r['load']} |"
              for r in t["rows"]]
        L.append("")
    if "terms" in res:
        L += ["## Cost of each loss term", "",
              "Forward + backward to the images of one term alone, batch 64 (each line includes the classifier"
              " passes it needs; in a step the classifier forward is shared by kl/ce/cos/ortho).", "",
              "| image | term | CPU ms | GPU ms | load |", "|---|---|---:|---|---:|"]
        L += [f"| {r['shape']} | {r['term']} | {f(r['ms'], 1)} | {GPU_NOTE} | {r['load']} |" for r in res["terms"]["rows"]]
        L.append("")
    if "grad" in res:
        L += ["## Grad in its forms", "",
              "Batch 64, value + backward to the images. Forms: `loop` = one autograd.grad per sample (the"
              " reference); `per-sample` = torch.func `vmap(grad)`, every per-sample weight gradient materialised;"
              " `ghost` = per-sample norms vectorised layer by layer from each layer's inputs and output gradients"
              " of one batched double backward (closed forms for linear, conv and eval-mode batch-norm layers; no"
              " per-sample fully connected gradient is ever built); `batch` = the norm of the batch-mean gradient, a"
              " different, coarser quantity. Scope `head` (default): the fully connected layers, timed from the"
              " convolutional trunk's output (a step computes it once for all terms and Grad starts from it;"
              " backward goes to it); `all`: every parameter, timed from the images. `max |diff|` is against"
              " the loop.", "",
              "| image | scope | form | CPU ms | x vs loop | max \\|diff\\| vs loop | GPU ms | load |",
              "|---|---|---|---:|---:|---:|---|---:|"]
        L += [f"| {r['shape']} | {r['scope']} | {r['mode']} | {f(r['ms'], 1)} | {f(r['speedup_vs_loop'], 1)} | "
              f"{_diff(r)} | {GPU_NOTE} | {r['load']} |"
              for r in res["grad"]["rows"]]
        L.append("")
    if "scoring" in res:
        L += ["## Scoring", "",
              "`score_reconstructions` (quality, coverage@0.5, gap with a size-matched held-out set, 200 bootstrap"
              " resamples) for 100 reconstructions (10 per class) of 3x32x32 against N training and N held-out"
              " images, cold (nothing cached). Data: random-but-structured synthetic images (bicubic-upsampled 8x8"
              " noise, 10 classes; no real CIFAR on this machine). Brute force = the full per-class `ssim_matrix`"
              " (the reference). Prefilter (the default) = rank every reference by SSIM averaged over every 4th"
              " window position, exact SSIM for the best-ranked and for all within a calibrated margin; pruned ="
              " provable upper bounds, exact SSIM where they cannot rule a reference out (not run at 50,000: it costs"
              " about what brute force does on such data). `exact pairs`: share of (reconstruction, reference)"
              " pairs whose exact SSIM the prefilter computed. `same metrics`: all methods within 1e-6 of brute"
              " force on quality, quality_heldout, gap and coverage; `same nn`: identical nearest-neighbour indices"
              " (prefilter vs brute force).", "",
              "| N train | reconstructions | brute s | prefilter s | x brute | exact pairs | pruned s | same metrics |"
              " same nn | max nn value diff | quality | coverage | load |",
              "|---:|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|"]
        L += [f"| {r['n_train']} | {r['regime']} | {f(r['brute_s'], 1)} | {f(r['prefilter_s'], 1)} | "
              f"**{f(r['speedup'], 1)}** | {100 * r['prefilter_exact']:.1f}% | "
              f"{f(r['pruned_s'], 1) if 'pruned_s' in r else 'not run'} | {r['same_metrics']} | {r['same_nn_index']} | "
              f"{r['max_nn_value_diff']:.1e} | {f(r['quality'], 3)} | {f(r['coverage'], 3)} | {r['load']} |"
              for r in res["scoring"]["rows"]]
        L.append("")
    if "ray" in res:
        r = res["ray"]
        L += ["## Ray Tune overhead and trials per hour", ""]
        if "blocked" in r:
            L += [f"Blocked: {r['blocked']}.", ""]
        else:
            L += [f"The same {r['trials']} trials ({r['steps']} generator steps, bundled MNIST, T={r['train_size']},"
                  f" scoring every {max(1, r['steps'] // 4)} steps and at the end, {r['per_class']} reconstructions per"
                  " class; the four variants, with all nine terms and with the perturbed terms and Grad off) by a plain"
                  " Python loop and by `tune/search.py --scheduler fifo` (Ray Tune + Optuna, the same configurations"
                  " enqueued as initial points, every trial run to the end, plus everything the search adds: MLflow"
                  " runs, per-step losses, pictures, generator models, the summary and registry promotion). The loop"
                  " does the same training, scoring, pictures and checkpoints without Ray, Optuna or MLflow."
                  " Whole-command wall time, fresh processes, classifier cache warmed first.", "",
                  f"Overhead of tune/search.py with one trial at a time: **{100 * r['overhead_1']:+.0f}%** of the plain"
                  " loop.", "",
                  "| runner | concurrent | seconds | trials/hour (CPU) | trials/hour (GPU) | load | note |",
                  "|---|---:|---:|---:|---|---:|---|"]
            L += [f"| {x['runner']} | {x['concurrent']} | {f(x['seconds'], 1)} | {f(x['trials_per_hour'], 0)} | "
                  f"{GPU_NOTE} | {x['load']} | {x['note']} |" for x in r["rows"]]
            L.append("")
    if "memory" in res:
        L += ["## Peak memory of a trial", "",
              "Fresh process: training (batch 64, nine terms) then scoring 200 reconstructions against N"
              " training + N held-out images (default prefilter search). Peak resident set size (VmHWM).", "",
              "| image | N train | after imports MB | after training MB | trial peak MB | load |",
              "|---|---:|---:|---:|---:|---:|"]
        L += [f"| {r['shape']} | {r['n_train']} | {f(r['import_mb'], 0)} | {f(r['train_mb'], 0)} | "
              f"{f(r['trial_mb'], 0)} | {r['load']} |" for r in res["memory"]["rows"]]
        L.append("")
    L += res.get("notes", [])
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (~8 min on a busy 2-core box)")
    p.add_argument("--tiny", action="store_true", help="smoke test: smallest sizes, no Ray section unless --only names it")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown output (default docs/benchmarks.md)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as in a 1-CPU trial)")
    args = p.parse_args(argv)
    global TINY
    TINY = args.tiny
    if args.tiny and "--only" not in " ".join(argv if argv is not None else sys.argv):
        args.only = ",".join(x for x in SECTIONS if x != "ray")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "load_start": load()}
    fns = {"training": bench_training, "terms": bench_terms, "grad": bench_grad, "scoring": bench_scoring,
           "ray": bench_ray, "memory": bench_memory}
    for name in SECTIONS:
        if name in only:
            s0 = time.perf_counter()
            print(f"[bench] {name} ...", flush=True)
            res[name] = fns[name](args.quick)
            print(f"[bench] {name} done in {time.perf_counter() - s0:.0f}s (load {load()})", flush=True)
    res["load_end"] = load()
    notes_file = Path(__file__).with_name("notes.md")
    if notes_file.exists():
        res["notes"] = ["", notes_file.read_text().rstrip()]
    wall = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(res, args.quick or args.tiny, wall))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(f"[bench] wrote {out} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
