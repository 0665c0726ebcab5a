"""What the membership stage costs: seconds per reference model and for the whole stage at K references.

    python bench/membership_cost.py                  # the demo's classifier (CNN, mnist-bundled, T = 1,000), K = 8
    python bench/membership_cost.py --k 4 --train-size 100
    python bench/membership_cost.py --smoke-test     # digits-8x8, 2 tiny references

The references are trained into an empty cache folder (so nothing is reused) as parallel Ray tasks of
one CPU each on a local Ray with this machine's cores, exactly as ``tldr audit`` trains them
(tldr_core.platform.references); then the membership scores of T and H' are computed
(tldr_core.scoring.mia). Reported: each reference's own training seconds (its checkpoint meta), the
stage's wall time (Ray start included), the scoring seconds, and the second call's wall time (every
reference from the cache). Prints a markdown table for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.sections import load  # noqa: E402
from tldr_core.attack.classifier import ClassifierSettings, load_or_train  # noqa: E402
from tldr_core.attack.data import load_dataset  # noqa: E402
from tldr_core.platform.references import train_references  # noqa: E402
from tldr_core.scoring.mia import score_membership  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist-bundled")
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--smoke-test", action="store_true")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.dataset, args.train_size, args.arch, args.k = "digits-8x8", 100, "mlp", 2
    settings = ClassifierSettings(arch=args.arch, epochs=2 if args.smoke_test else ClassifierSettings.epochs)
    bundle = load_dataset(args.dataset, args.train_size, seed=0)
    load0 = load()
    with tempfile.TemporaryDirectory() as cache:
        target, _, _ = load_or_train(bundle, settings, cache_dir=Path(cache), log=lambda s: None)
        t0 = time.perf_counter()
        refs = train_references(bundle, settings, args.k, cache_dir=cache, log=lambda s: print(s, flush=True))
        stage = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = score_membership(target, bundle.train, bundle.heldout, references=[r.model for r in refs])
        scoring = time.perf_counter() - t1
        t2 = time.perf_counter()
        train_references(bundle, settings, args.k, cache_dir=cache, log=lambda s: None)
        again = time.perf_counter() - t2
    per = [float(r.meta.get("train_seconds") or 0.0) for r in refs]
    s = res.summaries[res.best]
    print(f"\n{args.dataset}, T = {len(bundle.train)}, P = {len(bundle.test)}, {args.arch}, K = {args.k}, "
          f"torch threads {torch.get_num_threads()}, load {load0} at start, {load()} at the end\n")
    print("| K | per reference (median, min-max) | training stage wall (Ray start included) | scoring T and H' | "
          "second call (cached) | LiRA AUC | TPR at 1% FPR |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.k} | {statistics.median(per):.1f} s ({min(per):.1f}-{max(per):.1f}) | {stage:.1f} s | "
          f"{scoring:.1f} s | {again:.1f} s | {s.auc:.3f} | {s.tpr[0]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
