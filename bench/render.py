"""docs/benchmarks.md from the suite's results (bench/run.py): a header, then one table per section run."""
from __future__ import annotations

from typing import Any

from bench.render_cifar import RENDERERS as CIFAR_RENDERERS

GPU_NOTE = "not measured (no GPU lent to this task)"


def f(x: float, nd: int = 2) -> str:
    return f"{x:.{nd}f}"


def _diff(r: dict[str, Any]) -> str:
    return "n/a" if r["mode"] == "batch" else f"{r['max_abs_diff_vs_loop']:.1e}"


def _training(t: dict[str, Any]) -> list[str]:
    L = ["## Generator training steps per second", "",
         f"Batch {t['batch']}, all terms of the mode (inversion: 4, reconstruction: 9 with Grad = ghost/head,"
         f" FGSM perturbation), {t['steps']} steps per measurement, untrained PaperCNN classifier"
         " (cost does not depend on its weights).", "",
         "| image | mode | variant | CPU steps/s | GPU steps/s | load |", "|---|---|---|---:|---|---:|"]
    L += [f"| {r['shape']} | {r['mode']} | {r['variant']} | {f(r['steps_per_s'], 1)} | {GPU_NOTE} | {r['load']} |"
          for r in t["rows"]]
    L.append("")
    return L


def _kkt(sec: dict[str, Any]) -> list[str]:
    L = ["## KKT (stationarity) attack steps per second", "",
         "One Adam step on all candidates = one double backward of the stationarity residual"
         " (docs/method.md §8; `tldr_core.attack.kkt.run_kkt`, layers `all`, soft margin), untrained fully"
         " connected ReLU classifier (cost does not depend on its weights), 1x28x28 images.", "",
         "| device | network | candidates | steps | steps/s | load |", "|---|---|---:|---:|---:|---:|"]
    L += [f"| {r['device']} | {r['network']} | {r['candidates']} | {r['steps']} | {f(r['steps_per_s'], 1)} | "
          f"{r['load']} |" for r in sec["rows"]]
    if not sec.get("cuda"):
        L.append(f"| cuda | | | | {GPU_NOTE} | |")
    L.append("")
    return L


def _terms(sec: dict[str, Any]) -> list[str]:
    L = ["## Cost of each loss term", "",
         "Forward + backward to the images of one term alone, batch 64 (each line includes the classifier"
         " passes it needs; in a step the classifier forward is shared by kl/ce/cos/ortho).", "",
         "| image | term | CPU ms | GPU ms | load |", "|---|---|---:|---|---:|"]
    L += [f"| {r['shape']} | {r['term']} | {f(r['ms'], 1)} | {GPU_NOTE} | {r['load']} |" for r in sec["rows"]]
    L.append("")
    return L


def _grad(sec: dict[str, Any]) -> list[str]:
    L = ["## Grad in its forms", "",
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
          for r in sec["rows"]]
    L.append("")
    return L


def _scoring(sec: dict[str, Any]) -> list[str]:
    L = ["## Scoring", "",
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
          for r in sec["rows"]]
    L.append("")
    return L


def _ray(r: dict[str, Any]) -> list[str]:
    L = ["## Ray Tune overhead and trials per hour", ""]
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
    return L


def _memory(sec: dict[str, Any]) -> list[str]:
    L = ["## Peak memory of a trial", "",
         "Fresh process: training (batch 64, nine terms) then scoring 200 reconstructions against N"
         " training + N held-out images (default prefilter search). Peak resident set size (VmHWM).", "",
         "| image | N train | after imports MB | after training MB | trial peak MB | load |",
         "|---|---:|---:|---:|---:|---:|"]
    L += [f"| {r['shape']} | {r['n_train']} | {f(r['import_mb'], 0)} | {f(r['train_mb'], 0)} | "
          f"{f(r['trial_mb'], 0)} | {r['load']} |" for r in sec["rows"]]
    L.append("")
    return L


SECTION_RENDERERS = {"training": _training, "kkt": _kkt, "terms": _terms, "grad": _grad, "scoring": _scoring, "ray": _ray,
                     "memory": _memory, **CIFAR_RENDERERS}


def _header(res: dict[str, Any], quick: bool, wall: float) -> list[str]:
    m = res["machine"]
    return ["# Benchmarks", "",
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


def render(res: dict[str, Any], quick: bool, wall: float) -> str:
    """The whole markdown page: header, the sections present in ``res`` (in SECTION_RENDERERS' order), notes."""
    L = _header(res, quick, wall)
    for name, fn in SECTION_RENDERERS.items():
        if name in res:
            L += fn(res[name])
    L += res.get("notes", [])
    return "\n".join(L) + "\n"
