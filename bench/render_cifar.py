"""The CIFAR-10 cost sections of the benchmark page (bench/cifar_section.py): step cost, scoring, trials per
hour, and the projection of the 200-trial search."""
from __future__ import annotations

from typing import Any

GPU_NOTE = "not measured (no GPU lent to this task)"


def f(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def cifar(sec: dict[str, Any]) -> list[str]:
    L = ["## CIFAR-10 (3x32x32): cost of one step", "",
         "Median seconds per step on the CPU (1 thread), the FLOPs of one step (matmuls and convolutions,"
         " forward, backward and double backward, counted with torch.utils.flop_counter's formulas) and the"
         " peak of live tensor storage in one step (what a GPU would hold for it, before the CUDA context and"
         " allocator slack). Untrained networks: the cost does not depend on the weights.", "",
         "| what | CPU s/step | GPU s/step | GFLOP/step | peak tensors MB | load |",
         "|---|---:|---|---:|---:|---:|"]
    L += [f"| {r['what']} | {f(r['s_per_step'], 3)} | "
          f"{GPU_NOTE if r.get('s_per_step_gpu') is None else f(r['s_per_step_gpu'], 4)} | {f(r['gflop_per_step'], 2)} | "
          f"{f(r['peak_tensor_mb'], 0)} | {r['load']} |" for r in sec["rows"]]
    L += ["", "Scoring (`score_reconstructions`, default prefilter search, 200 bootstrap resamples) of the"
          " reconstructions against N training and N held-out 3x32x32 images (synthetic smooth images: the"
          " cost depends on the count and shape, not the content):", "",
          "| N train (+ N held-out) | reconstructions | seconds | load |", "|---:|---:|---:|---:|"]
    L += [f"| {r['n_train']:,} | {r['n_recon']} | {f(r['seconds'], 1)} | {r['load']} |" for r in sec["scoring"]]
    L.append("")
    return L


def cifar_trials(sec: dict[str, Any]) -> list[str]:
    L = ["## CIFAR-10: trials per hour", "",
         f"`tune/search.py --dataset cifar10 --data-root <npz> --scheduler fifo` on {sec['data']}, T ="
         f" {sec['train_size']:,}, {sec['trials']} fixed trials of {sec['steps']} generator steps ({sec['per_class']}"
         " reconstructions per class scored at the end, scoring every quarter), 1 CPU per trial, classifier"
         f" trained beforehand; whole-command wall time (Ray, Optuna and MLflow start-up included). This machine"
         f" has {sec['cpus']} cores, so 4 concurrent trials share 2 cores.", "",
         "| concurrent trials | seconds | trials/hour | load |", "|---:|---:|---:|---:|"]
    L += [f"| {r['concurrent']} | {f(r['seconds'], 1)} | {f(r['trials_per_hour'], 0)} | {r['load']} |"
          for r in sec["rows"]]
    L.append("")
    return L


def cifar_projection(p: dict[str, Any]) -> list[str]:
    L = [f"## Projection: `python tune/search.py --dataset cifar10 --trials {p['trials']}`", "",
         f"From the rows above: {f(p['s_per_step'], 3)} CPU s per generator step (reconstruction mode, the"
         f" default) and {f(p['fixed_s'], 1)} s per trial for everything else (scoring, pictures, MLflow, Ray),"
         f" measured as one-at-a-time trial time minus its steps. Default trial: {p['max_t']} steps, ASHA"
         " stopping at steps/4 and steps/2 with reduction factor 2 (mean steps per trial computed as if exactly"
         " half the trials go on at each rung).", "",
         "| schedule | mean steps/trial | CPU s/trial | CPU-hours (1 thread) | PFLOP in all | GPU-hours |",
         "|---|---:|---:|---:|---:|---|"]
    L += [f"| {r['schedule']} | {f(r['mean_steps'], 0)} | {f(r['trial_cpu_s'], 0)} | {f(r['cpu_hours'], 1)} | "
          f"{f(r['pflop'], 2)} | {GPU_NOTE} |" for r in p["rows"]]
    L += ["", f"- **GPU-hours: not measured.** A step is {f(p['gflop_per_step'], 1)} GFLOP, so GPU-hours ="
          " PFLOP x 1e15 / (achieved FLOP/s) / 3600. That is a floor: at batch 64 a step is dozens of small"
          " kernels and is likely bound by launch latency, not FLOPs; only a measured GPU steps/s gives the"
          " real figure (run `python bench/run.py --only cifar` on the GPU machine: the GPU column fills in).",
          f"- **Trials per GPU.** One trial's step holds ~{f(p['peak_tensor_mb'], 0)} MB of tensors; with a"
          " ~0.5 GB CUDA context per process, memory admits dozens of trials per 80 GB card, so compute sets the"
          " packing. `--gpus-per-trial 0.25` runs 4 trials per GPU (Ray schedules by the fraction, and each"
          " trial's CUDA memory is capped at that fraction of the card); with 4 GPU workers that is 16 trials"
          " at once, 200 trials in 13 waves.",
          "- CPU-hours are single-thread hours: on an n-core machine with one trial per core, divide the wall"
          " time by n (the table above shows what 2 cores give).", ""]
    return L


RENDERERS = {"cifar": cifar, "cifar_trials": cifar_trials, "cifar_projection": cifar_projection}
