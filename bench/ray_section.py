"""The Ray section of the benchmarks: the same fixed trials by a plain Python loop and by
tune/search.py (Ray Tune + Optuna + MLflow), to measure what the platform costs per trial."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sections import ROOT, load


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return dt, p.stdout + p.stderr


PLAIN_LOOP = r"""
# What one Tune trial of tune/search.py does (tldr_core.platform.search.trial.run_trial), minus Ray, Optuna and MLflow:
# the same configurations, steps, scoring cadence, final scoring, pictures and generator checkpoint, through the
# same pipeline (tldr_core.scoring.pipeline + tldr_core.report.artifacts).
import sys, time, json, tempfile, torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tldr_core.attack.classifier import ClassifierSettings, load_or_train
from tldr_core.attack.config import AttackConfig
from tldr_core.attack.data import load_dataset
from tldr_core.attack.train import generate
from tldr_core.platform.search.spaces.load import load_space
from tldr_core.report.artifacts import write_artifacts
from tldr_core.scoring.metrics import score_baselines, score_reconstructions
from tldr_core.scoring.pipeline import attack_and_score
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
    scored = attack_and_score(model, bundle, cfg, callback=cb, log=None, log_every=50)
    write_artifacts(out / f"trial{i}", bundle, scored, title=f"trial {i}", meta={"metrics": scored.metrics})
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def fixed_trials_space(path: Path, trials: int) -> None:
    """tune/space.yaml with `trials` complete initial points (all four variants; the default weights,
    and every other one with the perturbed terms and Grad off): with --trials equal to their number and
    --scheduler fifo, tune/search.py runs exactly these configurations, as the plain loop does."""
    import yaml

    from tldr_core.attack.config import VARIANTS
    from tldr_core.platform.search.spaces.load import DEFAULT_SPACE, space_from_dict
    from tldr_core.platform.search.spaces.specs import DEFAULTS_POINT

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


def search_rows(tmp: Path, env: dict[str, str], space: Path, dataset_args: list[str], trials: int, steps: int,
                per_class: int, train_size: int, concurrency: tuple[int, ...]) -> list[dict[str, Any]]:
    """Whole-command wall time of tune/search.py (FIFO) running the fixed trials of `space`, per concurrency."""
    rows = []
    for conc in concurrency:
        store = tmp / f"tune{conc}"
        cmd = [sys.executable, str(ROOT / "tune" / "search.py"), *dataset_args, "--train-size", str(train_size),
               "--trials", str(trials), "--steps", str(steps), "--per-class", str(per_class), "--max-concurrent",
               str(conc), "--cpus-per-trial", "1", "--storage", str(store), "--tracking-uri",
               f"sqlite:///{tmp}/mlflow{conc}.db", "--seed", "0", "--space", str(space), "--scheduler", "fifo"]
        secs, out = _run(cmd, env, ROOT)
        done = next((ln.strip() for ln in out.splitlines() if "stopped early" in ln), "")
        rows.append({"runner": f"tune/search.py, --max-concurrent {conc}", "concurrent": conc, "seconds": secs,
                     "trials_per_hour": trials / secs * 3600, "load": load(), "note": done})
    return rows


def bench_env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TLDR_CACHE": str(tmp / "cache"), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(tmp)}


def bench_ray(q: bool, tiny: bool = False) -> dict[str, Any]:
    """The same trials (same configurations, steps, data, classifier, scoring cadence, pictures and
    checkpoints) by a plain Python loop and by tune/search.py (FIFO: no early stopping) with 1 and 2
    concurrent trials; whole-command wall time in fresh processes, classifier cache warmed first."""
    trials, steps, per_class, train_size = (2, 8, 2, 200) if tiny else (4, 40, 4, 200) if q else (8, 300, 20, 1000)
    tmp = Path(tempfile.mkdtemp(prefix="tldr-bench-ray-"))
    env = bench_env(tmp)
    space = tmp / "space.yaml"
    fixed_trials_space(space, trials)
    rows: list[dict[str, Any]] = []
    try:
        loop = [sys.executable, "-c", PLAIN_LOOP, str(ROOT), str(space)]
        _run(loop + ["0", str(steps), str(per_class), str(train_size)], env, ROOT)  # trains the classifier once
        loop_s, out = _run(loop + [str(trials), str(steps), str(per_class), str(train_size)], env, ROOT)
        rows.append({"runner": "plain Python loop (1 process, 1 thread)", "concurrent": 1, "seconds": loop_s,
                     "trials_per_hour": trials / loop_s * 3600, "load": load(), "note": ""})
        rows += search_rows(tmp, env, space, ["--dataset", "mnist-bundled"], trials, steps, per_class, train_size,
                            (1, 2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    overhead = rows[1]["seconds"] / rows[0]["seconds"] - 1.0
    return {"trials": trials, "steps": steps, "per_class": per_class, "train_size": train_size,
            "rows": rows, "overhead_1": overhead}
