"""KKT step speed against the FLOP limit of this machine: eager, functional (torch.func) and compiled.

    python bench/kkt_speed.py                 # the MNIST leaky-fc shape (784-1000-1000-10, 200 candidates)
    python bench/kkt_speed.py --quick         # fewer steps
    python bench/kkt_speed.py --smoke-test    # tiny shapes (the test suite runs this)

Each step of the stationarity attack is one double backward over all candidates. FLOPs per step are
counted by torch.utils.flop_counter's formulas (bench/cifar_section.StepCost: matmuls and convolutions,
forward, backward and double backward); seconds per step are the median of repeats after a warm-up (the
compiled path's first call compiles). GFLOP/s = counted FLOPs / measured seconds, compared with one
core's fp32 peak (--peak-gflops, default 83: 2 AVX2 FMA units x 8 lanes x 2 FLOP x ~2.6 GHz; say
yours). The three paths must give the same loss to the tolerance printed (eager vs the others after
the same steps). Prints a markdown table (paste it into docs/benchmarks.md with the date and load).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.cifar_section import StepCost  # noqa: E402
from bench.sections import load  # noqa: E402
from tldr_core.attack.kkt import KKTConfig, run_kkt  # noqa: E402
from tldr_core.attack.models import FC  # noqa: E402


def measure(clf: torch.nn.Module, shape: tuple[int, int, int], per_class: int, steps: int, reps: int,
            compile_: bool, batch: int | None) -> tuple[float, float]:
    """(median seconds per step, final loss) of ``steps`` steps with the given path."""
    cfg = KKTConfig(steps=steps, per_class=per_class, log_every=steps, compile=compile_, batch=batch)
    run_kkt(clf, 10, shape, KKTConfig(steps=2, per_class=per_class, compile=compile_, batch=batch),
            train_per_class=per_class, log=None)  # warm-up (and the compile)
    outs = [run_kkt(clf, 10, shape, cfg, train_per_class=per_class, log=None) for _ in range(reps)]
    return statistics.median(o.seconds / o.steps for o in outs), outs[-1].history[-1]["loss"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peak-gflops", type=float, default=83.0, help="one core's fp32 peak, GFLOP/s")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths, per_class, steps, reps = ((64, 64), 2, 3, 1) if args.smoke_test else \
        ((1000, 1000), 20, 20 if args.quick else 60, 1 if args.quick else 3)
    shape = (1, 28, 28)
    torch.manual_seed(0)
    clf = FC(shape, 10, widths=widths).eval().requires_grad_(False)
    with StepCost() as cost:
        run_kkt(clf, 10, shape, KKTConfig(steps=1, per_class=per_class, log_every=1), train_per_class=per_class,
                log=None)
    gflop = cost.flops / 1e9
    print(f"784-{'-'.join(map(str, widths))}-10, {10 * per_class} candidates, {args.threads} thread(s), "
          f"{gflop:.2f} GFLOP and {cost.peak / 2**20:.0f} MB of tensors per step; load {load()} at start")
    print("\n| path | s/step | steps/s | GFLOP/s | of the core's peak | loss after the steps | load |")
    print("|---|---|---|---|---|---|---|")
    base = None
    for name, compile_, batch in (("eager", False, None), ("eager, candidates in chunks of 50", False, 50),
                                  ("torch.func + torch.compile", True, None)):
        t0 = time.perf_counter()
        try:
            sec, loss = measure(clf, shape, per_class, steps, reps, compile_, batch)
        except Exception as exc:  # noqa: BLE001 - a path that does not run here is a result, not a crash
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:80]} | | | | | |")
            continue
        base = loss if base is None else base
        print(f"| {name} | {sec:.4f} | {1 / sec:.1f} | {gflop / sec:.1f} | {gflop / sec / args.peak_gflops:.0%} | "
              f"{loss:.6g} (vs eager {abs(loss - base) / max(abs(base), 1e-30):.1e} relative) | {load()} |",
              flush=True)
        if args.smoke_test and time.perf_counter() - t0 > 120:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
