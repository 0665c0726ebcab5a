"""KKT extraction to convergence on a control: residual and recovered images against steps.

    python bench/kkt_convergence.py --control stationary-fc --steps 50000 --every 5000 --out runs/kkt-conv/sfc
    python bench/kkt_convergence.py --control leaky-fc --dataset cifar10 --data-root ../shared/data/cifar10-dev.npz ...
    python bench/kkt_convergence.py --smoke-test

The control classifier comes from the cache (tldr_core.attack.zoo, trained on first use). The run is
one KKT extraction with the KKTConfig defaults (plus --set NAME=VALUE), continued in chunks of
``--every`` steps through the resumable state (tldr_core.attack.kkt_state: a 2 x N-step run equals
one 2N-step run), and after each chunk the candidates are scored as the audit scores them
(tldr_core.scoring.exposure_score: calibrated exposure against the population, one-to-one matches).
Writes convergence.csv (one row per chunk), convergence.png (residual and matches against steps),
kkt.pt (the last state: a later call with --resume continues it) and the last chunk's metrics.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tldr_core.attack.checkpoints import save_checkpoint  # noqa: E402
from tldr_core.attack.classifier import load_or_train  # noqa: E402
from tldr_core.attack.data import load_dataset  # noqa: E402
from tldr_core.attack.kkt import KKT_FORMAT, KKTConfig, run_kkt  # noqa: E402
from tldr_core.attack.kkt_resume import load_resume  # noqa: E402
from tldr_core.attack.kkt_state import KKTResume  # noqa: E402
from tldr_core.attack.zoo import CONTROLS, control_bundles  # noqa: E402
from tldr_core.scoring.exposure_score import score_exposure  # noqa: E402

BARS = (0.4, 0.5, 0.6)
FIELDS = ("steps", "seconds", "residual", "matched_train_040", "matched_heldout_040", "matched_train_050",
          "matched_heldout_050", "matched_train_060", "matched_heldout_060", "exposure_tpr", "exposure_tpr_lo",
          "exposure_auc", "raw_exposure_tpr", "raw_exposure_auc", "exposure_mean_train", "exposure_mean_heldout")


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--control", default="stationary-fc", choices=sorted(CONTROLS))
    p.add_argument("--dataset", default="mnist-bundled")
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=None,
                   help="total steps, counted from the first run's start (default 50000; 40 with --smoke-test)")
    p.add_argument("--every", type=int, default=None, help="score after every this many steps (default 5000; 20)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a KKTConfig setting")
    p.add_argument("--resume", default=None, help="a kkt.pt this script wrote: continue it")
    p.add_argument("--out", default="runs/kkt-convergence")
    p.add_argument("--smoke-test", action="store_true", help="digits-8x8, a shrunk control, 2 chunks of 20 steps")
    args = p.parse_args(argv)
    if args.smoke_test:  # shrinks what was not given
        args.dataset = "digits-8x8"
    args.steps = args.steps or (40 if args.smoke_test else 50_000)
    args.every = args.every or (20 if args.smoke_test else 5_000)
    return args


def control_model(args: argparse.Namespace):
    control = CONTROLS[args.control]
    if args.smoke_test:
        from tldr_core.cli.controls import shrink

        control = shrink(control)
    data = load_dataset(args.dataset, control.train_size, seed=0, data_root=args.data_root)
    trained_on, scored, _ = control_bundles(control, data)
    model, meta, _ = load_or_train(trained_on, control.settings, device="cpu", log=print)
    return model.eval(), scored, meta


def score(out, bundle, res: float, steps: int, seconds: float) -> dict[str, float]:
    exp = score_exposure(out.images, out.labels, bundle.train, bundle.heldout, bundle.test, bars=BARS, n_boot=300)
    m = exp.metrics()
    return {"steps": steps, "seconds": round(seconds, 1), "residual": res, **{k: m[k] for k in FIELDS if k in m}}


def figure(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["steps"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.semilogy(steps, [r["residual"] for r in rows], "o-")
    a.set(xlabel="KKT steps", ylabel="stationarity loss (normalised residual)", title="residual")
    for bar, style in (("040", "s-"), ("050", "^-"), ("060", "o-")):
        b.plot(steps, [r[f"matched_train_{bar}"] for r in rows], style, label=f"T at SSIM >= 0.{bar[1]}")
        b.plot(steps, [r[f"matched_heldout_{bar}"] for r in rows], style, alpha=0.35, label=f"H' at 0.{bar[1]}")
    b.set(xlabel="KKT steps", ylabel="images matched one-to-one", title="recovered images")
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, bundle, meta = control_model(args)
    per = len(bundle.train) // bundle.num_classes
    flat = {kv.split("=", 1)[0]: _value(kv.split("=", 1)[1]) for kv in args.set}
    resume: KKTResume | None = load_resume(args.resume) if args.resume else None
    rows: list[dict[str, float]] = []
    t0 = time.time()
    start = resume.step if resume is not None else 0
    for target in range(start + args.every, args.steps + 1, args.every):
        cfg = KKTConfig.from_flat({**flat, "steps": target, "log_every": max(1, args.every // 4)})
        out = run_kkt(model, bundle.num_classes, tuple(bundle.image_shape), cfg, train_per_class=per, resume=resume)
        resume = KKTResume(out.module, out.settings)
        res = out.history[-1]["loss_residual"]
        rows.append(score(out, bundle, res, target, time.time() - t0))
        print(json.dumps(rows[-1]), flush=True)
        with (out_dir / "convergence.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        save_checkpoint(out_dir / "kkt.pt", out.module, KKT_FORMAT, {"attack": dict(out.settings)})
        torch.save({"images": out.images, "labels": out.labels}, out_dir / "candidates.pt")
        figure(rows, out_dir / "convergence.png", f"KKT on {args.control} ({args.dataset}), {out.settings}")
    (out_dir / "metrics.json").write_text(json.dumps({"control": args.control, "dataset": args.dataset,
                                                      "classifier": {k: meta.get(k) for k in
                                                                     ("train_accuracy", "test_accuracy",
                                                                      "stationarity_residual")},
                                                      "rows": rows}, indent=2, default=float))
    print(f"wrote {out_dir}/ (convergence.csv, convergence.png, kkt.pt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
