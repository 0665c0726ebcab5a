"""The CIFAR-10 cost section: what one 3x32x32 step, one scoring and one trial cost, and the projection of the
200-trial search (`python tune/search.py --dataset cifar10 --trials 200`) built from those measurements.

FLOPs are counted by torch.utils.flop_counter (matmuls and convolutions, forward and backward, double
backward included), so a GPU projection needs only an achieved FLOP rate. GPU memory per trial is
estimated from the peak of live tensor bytes during a step (tracked here on the CPU, where tensor
storage is the same size), not measured on a card.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bench.ray_section import bench_env, fixed_trials_space, search_rows
from bench.sections import ROOT, Split, classifier_for, load, smooth_images
from tldr_core.attack.config import AttackConfig
from tldr_core.attack.kkt import KKTConfig, run_kkt
from tldr_core.attack.models import FC
from tldr_core.attack.train import train_generator
from tldr_core.scoring.metrics import score_reconstructions

SHAPE = (3, 32, 32)


class StepCost(TorchDispatchMode):
    """FLOPs of every op with a formula in torch.utils.flop_counter (matmuls, convolutions; forward, backward
    and double backward alike), and the peak bytes of tensor storage alive at once, counting every storage
    created inside the mode. (torch's FlopCounterMode tracks modules with hooks that break autograd.grad,
    which the perturbed terms and Grad call, so the same formulas are applied here directly.)"""

    def __init__(self) -> None:
        super().__init__()
        self.flops, self.live, self.peak, self._seen = 0, 0, 0, set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.flops += int(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._seen:
                    self._seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def _gen_seconds(clf: torch.nn.Module, mode: str, steps: int, reps: int, device: str) -> float:
    cfg = AttackConfig(mode=mode, steps=steps, batch_size=64, device=device)
    train_generator(clf, 10, SHAPE, AttackConfig(mode=mode, steps=2, device=device), log=None)  # warm-up
    secs = statistics.median(
        (lambda r: r.seconds / r.steps)(train_generator(clf, 10, SHAPE, cfg, log=None)) for _ in range(reps))
    clf.cpu()
    return secs


def _gen_step_cost(mode: str, steps: int, reps: int) -> dict[str, Any]:
    clf = classifier_for(SHAPE)
    secs = _gen_seconds(clf, mode, steps, reps, "cpu")
    gpu = _gen_seconds(clf, mode, 5 * steps, reps, "cuda") if torch.cuda.is_available() else None
    one = AttackConfig(mode=mode, steps=1, batch_size=64, device="cpu")
    with StepCost() as cost:
        train_generator(clf, 10, SHAPE, one, log=None)
    return {"what": f"generator step, {mode} (vector-matrix, batch 64, PaperCNN)", "s_per_step": secs,
            "s_per_step_gpu": gpu,
            "gflop_per_step": cost.flops / 1e9, "peak_tensor_mb": cost.peak / 2**20, "load": load()}


def _kkt_step_cost(net: str, steps: int, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    clf = (FC(SHAPE, 10, widths=(1000, 1000)) if net == "fc" else classifier_for(SHAPE)).eval().requires_grad_(False)
    per_class = 64 // 10 + 1  # 70 candidates: the batch of 64 rounded up to whole classes
    label = "3072-1000-1000-10 MLP" if net == "fc" else "PaperCNN"
    cfg = KKTConfig(steps=steps, per_class=per_class, log_every=steps, device="cpu")
    run_kkt(clf, 10, SHAPE, KKTConfig(steps=1, per_class=per_class), train_per_class=per_class, log=None)
    secs = statistics.median(1.0 / run_kkt(clf, 10, SHAPE, cfg, train_per_class=per_class, log=None).steps_per_second
                             for _ in range(reps))
    one = KKTConfig(steps=1, per_class=per_class, log_every=1)
    with StepCost() as cost:
        run_kkt(clf, 10, SHAPE, one, train_per_class=per_class, log=None)
    return {"what": f"KKT step, {label}, {10 * per_class} candidates", "s_per_step": secs,
            "gflop_per_step": cost.flops / 1e9, "peak_tensor_mb": cost.peak / 2**20, "load": load()}


def _scoring_cost(n: int, n_recon: int) -> dict[str, Any]:
    """score_reconstructions (default search) of n_recon reconstructions against n training + n held-out."""
    imgs = smooth_images(2 * n, SHAPE, seed=n)
    labels = torch.arange(2 * n) % 10
    train, held = Split(imgs[:n], labels[:n]), Split(imgs[n:], labels[n:])
    recon = smooth_images(n_recon, SHAPE, seed=7)
    rlab = torch.arange(n_recon) % 10
    t0 = time.perf_counter()
    score_reconstructions(recon, rlab, train, held, n_boot=200)
    return {"n_train": n, "n_recon": n_recon, "seconds": time.perf_counter() - t0, "load": load()}


def bench_cifar(q: bool, tiny: bool = False) -> dict[str, Any]:
    """Steps, FLOPs and memory at 3x32x32; scoring against 5,000 and 50,000 training images."""
    steps, reps = (2, 1) if tiny else (6, 1) if q else (20, 3)
    kkt_steps = 1 if tiny else 3 if q else 6
    rows = [_gen_step_cost(m, steps, reps) for m in (("reconstruction",) if tiny else ("inversion", "reconstruction"))]
    rows += [_kkt_step_cost(net, kkt_steps, reps) for net in (("fc",) if tiny else ("fc", "cnn"))]
    sizes = (500,) if tiny else (5000, 20000) if q else (5000, 50000)
    scoring = [_scoring_cost(n, 40 if tiny else 200) for n in sizes]
    return {"rows": rows, "scoring": scoring, "cuda": torch.cuda.is_available()}


DEV_NPZ = ROOT.parent / "shared" / "data" / "cifar10-dev.npz"  # 6,000 real CIFAR-10 images (see docs/results.md)
WARM = r"""
import sys
sys.path.insert(0, sys.argv[1])
from tldr_core.attack.classifier import ClassifierSettings, load_or_train
from tldr_core.attack.data import load_dataset
bundle = load_dataset("cifar10", int(sys.argv[3]), data_root=sys.argv[2])
load_or_train(bundle, ClassifierSettings(epochs=int(sys.argv[4])), log=lambda s: None)
"""


def _tiny_npz(path: Path) -> None:
    x = (smooth_images(400, SHAPE, seed=3).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    y = np.arange(400) % 10
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])


def bench_cifar_trials(q: bool, tiny: bool = False) -> dict[str, Any]:
    """Trials per hour of tune/search.py on CIFAR-10 (the dev file: real images) at 1, 2 and 4 concurrent
    trials of 1 CPU each: the same fixed configurations, FIFO, classifier trained once beforehand."""
    trials, steps, per_class, train_size = (2, 4, 2, 100) if tiny else (4, 20, 4, 1000) if q else (6, 40, 20, 1000)
    epochs = 15  # what tune/search.py trains with (not a flag there)
    tmp = Path(tempfile.mkdtemp(prefix="tldr-bench-cifar-"))
    env = bench_env(tmp)
    data = DEV_NPZ if DEV_NPZ.is_file() and not tiny else tmp / "tiny.npz"
    if data != DEV_NPZ:
        _tiny_npz(data)
    space = tmp / "space.yaml"
    fixed_trials_space(space, trials)
    try:
        subprocess.run([sys.executable, "-c", WARM, str(ROOT), str(data), str(train_size), str(epochs)], env=env,
                       check=True, capture_output=True, cwd=ROOT)
        args = ["--dataset", "cifar10", "--data-root", str(data)]
        rows = search_rows(tmp, env, space, args, trials, steps, per_class, train_size,
                           (1, 2) if tiny else (1, 2, 4))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"trials": trials, "steps": steps, "per_class": per_class, "train_size": train_size,
            "data": "synthetic tiny npz" if data != DEV_NPZ else "cifar10-dev.npz (real CIFAR-10)",
            "cpus": os.cpu_count(), "rows": rows}


def asha_mean_steps(max_t: int, grace: int, rf: int = 2) -> float:
    """Expected steps per trial under ASHA when 1/rf of the trials go on at each rung (grace, grace*rf, ...)."""
    rungs, t = [], grace
    while t < max_t:
        rungs.append(t)
        t *= rf
    steps, prev, share = 0.0, 0, 1.0
    for r in rungs + [max_t]:
        steps += share * (r - prev)
        prev, share = r, share / rf
    return steps


def projection(cost: dict[str, Any], trials_sec: dict[str, Any], n_trials: int = 200, max_t: int = 400
               ) -> dict[str, Any]:
    """The 200-trial search, projected from the measured step cost and the measured per-trial overhead."""
    step = next(r for r in cost["rows"] if r["what"].startswith("generator step, reconstruction"))
    one = next(r for r in trials_sec["rows"] if r["concurrent"] == 1)
    per_trial_s = one["seconds"] / trials_sec["trials"]
    fixed_s = max(per_trial_s - trials_sec["steps"] * step["s_per_step"], 0.0)  # scoring, pictures, MLflow, Ray
    rows = []
    for name, mean_steps in (("FIFO (every trial 400 steps)", float(max_t)),
                             ("ASHA (default: rungs 100, 200; half go on)", asha_mean_steps(max_t, max_t // 4))):
        trial_s = mean_steps * step["s_per_step"] + fixed_s
        rows.append({"schedule": name, "mean_steps": mean_steps, "trial_cpu_s": trial_s,
                     "cpu_hours": n_trials * trial_s / 3600,
                     "pflop": n_trials * mean_steps * step["gflop_per_step"] / 1e6})
    return {"trials": n_trials, "max_t": max_t, "s_per_step": step["s_per_step"], "fixed_s": fixed_s,
            "gflop_per_step": step["gflop_per_step"], "peak_tensor_mb": step["peak_tensor_mb"], "rows": rows}
