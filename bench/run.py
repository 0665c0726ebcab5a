"""TLDR benchmark suite (ISSUE 6): what a trial costs, and where the time goes.

    python bench/run.py            # full suite (~35 min on 2 cores), writes docs/benchmarks.md
    python bench/run.py --quick    # laptop check (~2 min), same table with smaller sizes
    python bench/run.py --only grad,scoring --out /tmp/b.md
    python bench/run.py --only cifar,cifar_trials --out docs/benchmarks-cifar10.md   # make bench-cifar (~25 min)

Sections: generator steps/s (4 conditioning variants x 2 image shapes x 2 modes), KKT attack steps/s
(784-1000-1000-10 MLP, 200 candidates, CPU and CUDA when present), the cost of each
loss term and of the four Grad forms (both scopes), scoring (brute force vs the pruned exact
search, 1k/10k/50k references), Ray Tune's overhead against a plain loop with trials/hour at 1 and 2
concurrent trials, and the peak memory of a trial. Every ratio is measured side by side in one run;
each timing is the median of repeats, and the 1-minute load average is recorded beside it because
the machine may be shared. Speed is never asserted in tests (tests/e2e/test_bench.py checks results only).

The sections live in bench/sections.py and bench/ray_section.py, the markdown in bench/render.py.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.ray_section import bench_ray, fixed_trials_space  # noqa: E402,F401 (tests call fixed_trials_space here)
from bench.cifar_section import bench_cifar, bench_cifar_trials, projection  # noqa: E402
from bench.render import render  # noqa: E402
from bench.sections import (bench_grad, bench_kkt, bench_memory, bench_scoring, bench_terms,  # noqa: E402
                            bench_training, load)

SECTIONS = ("training", "kkt", "terms", "grad", "scoring", "ray", "memory", "cifar", "cifar_trials")
FUNCTIONS = {"training": bench_training, "kkt": bench_kkt, "terms": bench_terms, "grad": bench_grad,
             "scoring": bench_scoring, "ray": bench_ray, "memory": bench_memory, "cifar": bench_cifar,
             "cifar_trials": bench_cifar_trials}
CIFAR = ("cifar", "cifar_trials")  # their own page: docs/benchmarks-cifar10.md (make bench-cifar)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (~8 min on a busy 2-core box)")
    p.add_argument("--tiny", action="store_true", help="smoke test: smallest sizes, no Ray section unless --only names it")
    p.add_argument("--only", default=",".join(x for x in SECTIONS if x not in CIFAR),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but {','.join(CIFAR)}, "
                        "which make bench-cifar writes to docs/benchmarks-cifar10.md)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown output (default docs/benchmarks.md)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, as in a 1-CPU trial)")
    return p


def run_sections(only: list[str], quick: bool, tiny: bool) -> dict[str, Any]:
    """Each section named in ``only``, in SECTIONS' order, with the machine and the load around them."""
    res: dict[str, Any] = {"machine": machine(), "load_start": load()}
    for name in SECTIONS:
        if name in only:
            s0 = time.perf_counter()
            print(f"[bench] {name} ...", flush=True)
            res[name] = FUNCTIONS[name](quick, tiny)
            print(f"[bench] {name} done in {time.perf_counter() - s0:.0f}s (load {load()})", flush=True)
    if all(name in res for name in CIFAR):
        res["cifar_projection"] = projection(res["cifar"], res["cifar_trials"])
    res["load_end"] = load()
    notes_file = Path(__file__).with_name("notes-cifar10.md" if set(only) <= set(CIFAR) else "notes.md")
    if notes_file.exists():
        res["notes"] = ["", notes_file.read_text().rstrip()]
    return res


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.tiny and "--only" not in " ".join(argv if argv is not None else sys.argv):
        args.only = ",".join(x for x in SECTIONS if x != "ray" and x not in CIFAR)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run_sections(only, args.quick, args.tiny)
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
