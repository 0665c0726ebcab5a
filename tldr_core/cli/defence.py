"""Defence comparison: which training choice leaks least for the accuracy a model owner needs.

    python -m tldr_core.cli.defence --dataset mnist-bundled --out runs/defence

Trains classifier variants that differ from one base in exactly one choice (optimiser, weight decay,
training-set size, dropout) on the same data, attacks each with the same settings, and writes
defence.csv, defence.md, defence.png (leakage against test accuracy), templates.png / generator.png
(what came out of each variant), results.json and report.html into --out.

Attacks: the weight-template attack runs on every architecture whose first layer is fully connected
(`mlp`, here the linear model of the blog post); the generator attack on the architectures in
--generator-archs (default: cnn, the paper's classifier). With the default --archs mlp,cnn every row
has both: templates on the mlp variant, the generator on the cnn variant of the same choice.
Training-set-size variants keep the number of gradient steps of the base (epochs scaled by
base T / T), so they differ in data, not in optimisation length.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from tldr_core.cli.audit import run_attack
from tldr_core.attack.classifier import ClassifierSettings, load_or_train
from tldr_core.attack.config import AttackConfig, ConfigError, LossWeights, load_yaml_config
from tldr_core.attack.data import DATASETS, DataError, DatasetNotFoundError, load_dataset
from tldr_core.scoring.metrics import score_baselines
from tldr_core.report.page import MEDIUM_GAP_CI_LOW, assess, thresholds_html
from tldr_core.report.html import COLOURS, esc, fig_uri, kv_table, montage, page, verdict_html
from tldr_core.attack.templates import applies, run_template_attack
from tldr_core.attack.train import resolve_device


@dataclass(frozen=True)
class Variant:
    name: str
    change: str                                   # what differs from the base, in words
    overrides: dict[str, Any] = field(default_factory=dict)  # ClassifierSettings fields
    train_size: int | None = None                 # None: the base T


VARIANTS = (
    Variant("base", "SGD (momentum 0.9), no weight decay, no dropout"),
    Variant("adam", "Adam instead of SGD", {"optimizer": "adam", "lr": 1e-3}),
    Variant("wd-1e-3", "weight decay 0.001", {"weight_decay": 1e-3}),
    Variant("wd-1e-2", "weight decay 0.01", {"weight_decay": 1e-2}),
    Variant("wd-1e-1", "weight decay 0.1", {"weight_decay": 1e-1}),
    Variant("T-100", "training set of 100 (10 per class)", train_size=100),
    Variant("T-2000", "training set of 2000", train_size=2000),
    Variant("dropout-0.5", "dropout 0.5", {"dropout": 0.5}),
)
ATTACK_LABEL = {"templates": "weight templates", "generator": "generator"}
# The comparison's own generator settings, pinned so its numbers do not drift with the project defaults (tuned for
# 1,200-step runs; measured here: with them, 200 steps left 5 of 8 variants at label agreement ~0.1). These weights
# converge in 200 steps on every variant. --config YAML replaces them (e.g. a search champion's settings).
DEFENCE_WEIGHTS = LossWeights(kl=1.0, kl_pert=0.5, ce=1.0, ce_pert=0.5, cos=0.5, ortho=0.5, var=0.004, pix=1.0,
                              grad=0.05)
DEFENCE_ATTACK = {"steps": 200, "per_class": 10, "batch_size": 64}


def base_settings(arch: str, epochs: int, seed: int) -> ClassifierSettings:
    """The base every variant changes one thing of: plain SGD, no regularisation (the blog's set-up)."""
    return ClassifierSettings(arch=arch, epochs=epochs, optimizer="sgd", lr=0.01, weight_decay=0.0, dropout=0.0,
                              hidden=0 if arch == "mlp" else 128, seed=seed)


def variant_settings(v: Variant, arch: str, epochs: int, base_t: int, seed: int) -> tuple[ClassifierSettings, int]:
    t = v.train_size or base_t
    s = replace(base_settings(arch, epochs, seed), **v.overrides)
    if t != base_t:  # same number of gradient steps as the base
        s = replace(s, epochs=max(1, round(epochs * base_t / t)))
    return s, t


def attack_config(config: str | None = None, *, steps: int | None = None, per_class: int | None = None,
                  batch_size: int | None = None, seed: int = 0, device: str = "cpu",
                  smoke: bool = False) -> AttackConfig:
    """The one generator configuration used for every variant: DEFENCE_WEIGHTS/DEFENCE_ATTACK, or a YAML file,
    then the flags."""
    base = load_yaml_config(config) if config else AttackConfig(weights=DEFENCE_WEIGHTS, **DEFENCE_ATTACK)
    over = {k: v for k, v in dict(steps=steps, per_class=per_class, batch_size=batch_size).items() if v is not None}
    if smoke:
        over = {"steps": min(over.get("steps", base.steps), 5), "per_class": 2, "batch_size": 16}
    return AttackConfig.from_flat({**over, "seed": seed, "device": device}, base=base)


def run_comparison(dataset: str, *, attack: AttackConfig | None = None, variants=VARIANTS, archs=("mlp", "cnn"),
                   generator_archs=("cnn",), train_size: int = 1000, test_size: int = 500, epochs: int = 10,
                   tau: float = 0.5, data_root: str | None = None,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One result row per variant (flat dict: `<arch>_acc`, `<arch>_<attack>_<metric>`, ...)."""
    cfg = attack or attack_config()
    seed, per_class, steps, device = cfg.seed, cfg.per_class, cfg.steps, str(resolve_device(cfg.device))
    bundles: dict[int, Any] = {}
    rows, t_start = [], time.time()
    for n, v in enumerate(variants, 1):
        row: dict[str, Any] = {"variant": v.name, "change": v.change}
        t0 = time.time()
        for arch in archs:
            s, t = variant_settings(v, arch, epochs, train_size, seed)
            if t not in bundles:
                bundles[t] = load_dataset(dataset, t, seed=seed, data_root=data_root, test_size=test_size)
            bundle = bundles[t]
            row["train_size"] = t
            log(f"[{n}/{len(variants)}] {v.name}: {arch} ({s.optimizer} lr {s.lr}, wd {s.weight_decay}, dropout "
                f"{s.dropout}, {s.epochs} epochs) on {t} {dataset} images")
            model, meta, _ = load_or_train(bundle, s, device=device, log=lambda m: log("    " + m))
            row[f"{arch}_acc"] = meta["test_accuracy"]
            row[f"{arch}_epochs"] = s.epochs
            base = score_baselines(bundle.train, bundle.heldout, bundle.test, bundle.num_classes, per_class,
                                   classifier=model, tau=tau, seed=seed)
            row.update({f"baseline_{k}_quality": base[k]["quality"] for k in base})
            results = []
            if applies(model):
                res = run_template_attack(model, bundle, tau=tau, seed=seed)
                results.append(("templates", res))
            if arch in generator_archs:
                res = run_attack(model, bundle, cfg, tau=tau, log=lambda m: log("    " + m),
                                 log_every=max(steps // 3, 1))
                results.append(("generator", res))
            for attack, res in results:
                m = res.metrics
                for k in ("quality", "quality_heldout", "gap", "gap_ci_low", "gap_ci_high", "coverage",
                          "label_agreement"):
                    row[f"{arch}_{attack}_{k}"] = m[k]
                row[f"{arch}_{attack}_risk"] = assess(m, base).level
                row[f"_{arch}_{attack}"] = res  # images for the montages; not written to the table
                log(f"    {ATTACK_LABEL[attack]} on {arch}: quality {m['quality']:.3f} (class means "
                    f"{base['class_mean']['quality']:.3f}), gap {m['gap']:+.4f} [{m['gap_ci_low']:+.4f}, "
                    f"{m['gap_ci_high']:+.4f}], label agreement {m['label_agreement']:.2f}")
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        done = time.time() - t_start
        log(f"    variant done in {row['seconds']:.0f}s; {done / 60:.1f} min so far, about "
            f"{done / n * (len(variants) - n) / 60:.1f} min left")
    return rows


def attack_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(arch, attack) pairs present in the rows, in a stable order."""
    seen = []
    for r in rows:
        for k in r:
            if k.endswith("_quality_heldout") and not k.startswith("baseline"):
                arch, attack = k[: -len("_quality_heldout")].split("_", 1)
                if (arch, attack) not in seen:
                    seen.append((arch, attack))
    return seen


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    flat = table_rows(rows)
    keys = list(dict.fromkeys(k for r in flat for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in flat:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


def _table(rows: list[dict[str, Any]], html: bool) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison table (markdown text or HTML cell contents)."""
    cols = attack_columns(rows)
    archs = list(dict.fromkeys(a for a, _ in cols))
    head = ["variant", "what changed", "T"] + [f"{a} test acc" for a in archs]
    for a, k in cols:
        head += [f"{ATTACK_LABEL[k]} ({a}): quality", "gap [95% CI]", "risk"]
    e = esc if html else str
    body = []
    for r in rows:
        cells = [f"<b>{e(r['variant'])}</b>" if html else r["variant"], e(r["change"]), str(r["train_size"])]
        cells += [f"{r.get(a + '_acc', math.nan):.3f}" for a in archs]
        for a, k in cols:
            p = f"{a}_{k}"
            if p + "_quality" not in r:
                cells += ["n/a"] * 3
                continue
            ci = f"[{r[p + '_gap_ci_low']:+.3f}, {r[p + '_gap_ci_high']:+.3f}]"
            lvl, la = r[p + "_risk"], r.get(p + "_label_agreement", 1.0)
            note = f" (label agreement {la:.2f}: did not converge)" if la < 0.8 else ""
            cells += [f"{r[p + '_quality']:.3f}", f"{r[p + '_gap']:+.3f} " + (f"<small>{ci}</small>" if html else ci),
                      (f"<span class='badge' style='background:{COLOURS[lvl]}'>{lvl}</span>" if html else lvl) + note]
        body.append(cells)
    return head, body


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head, body = _table(rows, html=False)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]
    return "\n".join(lines) + "\n"


def html_table(rows: list[dict[str, Any]]) -> str:
    head, body = _table(rows, html=True)
    trs = "".join("<tr>" + "".join(f"<td{' class=l' if i < 2 else ''}>{c}</td>" for i, c in enumerate(cells)) + "</tr>"
                  for cells in body)
    return "<table class='metrics'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + f"</tr>{trs}</table>"


def plot(rows: list[dict[str, Any]]):
    """Leakage (quality, gap with 95% CI) against test accuracy: one row of panels per attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = attack_columns(rows)
    fig, axes = plt.subplots(len(cols), 2, figsize=(11, 3.6 * len(cols)), squeeze=False)
    for i, (arch, attack) in enumerate(cols):
        p = f"{arch}_{attack}"
        pts = [r for r in rows if p + "_quality" in r]
        acc = [r[f"{arch}_acc"] for r in pts]
        for j, (key, what) in enumerate((("quality", "quality (SSIM to nearest training image)"),
                                         ("gap", "memorisation gap (95% CI)"))):
            ax = axes[i][j]
            y = [r[f"{p}_{key}"] for r in pts]
            if key == "gap":
                err = [[r[p + "_gap"] - r[p + "_gap_ci_low"] for r in pts], [r[p + "_gap_ci_high"] - r[p + "_gap"]
                                                                             for r in pts]]
                ax.errorbar(acc, y, yerr=err, fmt="none", ecolor="#999", capsize=3, zorder=1)
                ax.axhline(0, color="#444", lw=0.8)
            else:
                b = pts[0]
                ax.axhline(b["baseline_class_mean_quality"], color="tab:green", ls="--", lw=1,
                           label=f"class-mean image ({b['variant']})")
                ax.axhline(b["baseline_noise_quality"], color="tab:gray", ls=":", lw=1, label="uniform noise")
                ax.legend(fontsize=7, loc="best")
            colours = [COLOURS[r[p + "_risk"]] for r in pts]
            ax.scatter(acc, y, c=colours, s=36, zorder=2, edgecolors="k", linewidths=0.5)
            for r, xv, yv in zip(pts, acc, y):
                ax.annotate(r["variant"], (xv, yv), textcoords="offset points", xytext=(4, 3), fontsize=7.5)
            ax.set_xlabel(f"{arch} test accuracy")
            ax.set_ylabel(what, fontsize=8.5)
            ax.set_title(f"{ATTACK_LABEL[attack]} on {arch}", fontsize=9.5)
            ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    fig.legend(handles=[Line2D([], [], marker="o", ls="", color=c, markeredgecolor="k", label=f"{lvl} risk")
                        for lvl, c in COLOURS.items()], loc="upper right", fontsize=8, ncol=3)
    fig.suptitle("Leakage against test accuracy (further down = leaks less; right = more accurate)", fontsize=10,
                 x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def summary(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """(worst risk level, one sentence per attack: which variant leaks least among the accurate ones)."""
    parts, levels = [], []
    for arch, attack in attack_columns(rows):
        p = f"{arch}_{attack}"
        pts = [r for r in rows if p + "_quality" in r]
        best_acc = max(r[f"{arch}_acc"] for r in pts)
        ok = [r for r in pts if r[f"{arch}_acc"] >= best_acc - 0.01]
        least = min(ok, key=lambda r: (r[p + "_gap_ci_low"] > MEDIUM_GAP_CI_LOW, r[p + "_quality"]))
        sig = [r["variant"] for r in pts if r[p + "_gap_ci_low"] > MEDIUM_GAP_CI_LOW]
        levels += [r[p + "_risk"] for r in pts]
        parts.append(f"{ATTACK_LABEL[attack].capitalize()} on {arch}: the gap is significant (CI above "
                     f"{MEDIUM_GAP_CI_LOW}) for {', '.join(sig) if sig else 'no variant'}; of the variants within 0.01 "
                     f"of the best test "
                     f"accuracy ({best_acc:.3f}), {least['variant']} leaks least (quality {least[p + '_quality']:.3f}, "
                     f"gap {least[p + '_gap']:+.3f}).")
    level = max(levels, key=["LOW", "MEDIUM", "HIGH"].index) if levels else "LOW"
    return level, parts


def render_defence_report(rows: list[dict[str, Any]], settings: dict[str, Any], figures: dict[str, str]) -> str:
    level, items = summary(rows)
    headline = {"HIGH": "some variants give away training images", "MEDIUM": "some variants leak measurably",
                "LOW": "no variant leaks measurably"}[level]
    b = [f"<h1>TLDR defence comparison: {esc(settings['dataset'])}</h1>",
         "<p class='idline'>Classifier variants that differ from the base in one training choice, each attacked "
         "with the same settings. Which setting leaks least for the accuracy you need?</p>",
         verdict_html(level, headline, "The worst variant sets the level; per attack:", items),
         "<h2>Leakage against test accuracy</h2>",
         f"<img src='{figures['plot']}' alt='leakage against test accuracy' style='max-width:100%'>",
         "<h2>Table</h2>", html_table(rows)]
    for key, title in (("templates", "What came out: weight templates of each variant"),
                       ("generator", "What came out: each variant's best generator reconstruction per class")):
        if key in figures:
            b += [f"<h2>{title}</h2>", f"<img src='{figures[key]}' alt='{esc(title)}' style='max-width:100%'>"]
    b += ["<h2>How the risk level is decided</h2>", thresholds_html(settings["tau"]),
          "<h2>Settings that reproduce this</h2>", f"<pre>{esc(settings['command'])}</pre>",
          kv_table({k: v for k, v in settings.items() if k != "command"})]
    return page(f"TLDR defence comparison: {settings['dataset']}", "".join(b))


def write_outputs(rows: list[dict[str, Any]], out: Path, settings: dict[str, Any], class_names) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(rows, out / "defence.csv"), "md": out / "defence.md", "png": out / "defence.png"}
    paths["md"].write_text(markdown_table(rows))
    fig = plot(rows)
    fig.savefig(paths["png"], dpi=110)
    figures = {"plot": fig_uri(fig)}
    for arch, attack in attack_columns(rows):
        key = f"_{arch}_{attack}"
        title = (f"weight templates of each {arch} variant (rows)" if attack == "templates" else
                 f"best generator reconstruction per class, each {arch} variant (rows)")
        fig = montage([(r["variant"], r[key]) for r in rows if key in r], class_names, title)
        fig.savefig(out / f"{attack}.png", dpi=110)
        figures[attack] = fig_uri(fig)
        paths[attack] = out / f"{attack}.png"
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": table_rows(rows)}, indent=1,
                                                 default=float))
    paths["report"] = out / "report.html"
    paths["report"].write_text(render_defence_report(rows, settings, figures), encoding="utf-8")
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tldr_core.cli.defence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist-bundled", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default="runs/defence")
    p.add_argument("--train-size", type=int, default=1000, help="the base training-set size T (default 1000)")
    p.add_argument("--test-size", type=int, default=500, help="test images for accuracy (default 500)")
    p.add_argument("--variants", default=",".join(v.name for v in VARIANTS),
                   help="comma-separated subset of: " + ", ".join(v.name for v in VARIANTS))
    p.add_argument("--archs", default="mlp,cnn", help="classifier architectures (default mlp,cnn)")
    p.add_argument("--generator-archs", default="cnn", help="architectures the generator attacks (default cnn)")
    p.add_argument("--epochs", type=int, default=10, help="classifier epochs at the base T (default 10)")
    p.add_argument("--config", default=None, help="YAML attack settings (audit format) instead of the comparison's "
                   "pinned ones (DEFENCE_WEIGHTS, 200 steps)")
    p.add_argument("--steps", type=int, default=None, help="generator steps, the same for every variant (default 200)")
    p.add_argument("--per-class", type=int, default=None, help="generator reconstructions per class (default 10)")
    p.add_argument("--batch-size", type=int, default=None, help="generator batch size (default 64)")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a small shared machine 2+ threads can thrash 10x slower)")
    p.add_argument("--smoke-test", action="store_true", help="tiny run: T=100 base, 1 epoch, 5 generator steps")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    known = {v.name: v for v in VARIANTS}
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    gen_archs = tuple(a.strip() for a in args.generator_archs.split(",") if a.strip())
    if bad or not names or set(archs) - {"mlp", "cnn"} or set(gen_archs) - set(archs):
        print(f"error: --variants must name some of {list(known)} (got {bad or names}); --archs must be mlp and/or "
              f"cnn, and --generator-archs a subset of --archs", file=sys.stderr)
        return 2
    variants = [known[n] for n in names]
    torch.set_num_threads(max(1, args.threads))
    try:
        cfg = attack_config(args.config, steps=args.steps, per_class=args.per_class, batch_size=args.batch_size,
                            seed=args.seed, device=args.device, smoke=args.smoke_test)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    kw = dict(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs)
    if args.smoke_test:
        kw.update(train_size=min(args.train_size, 100), test_size=min(args.test_size, 100), epochs=1)
        variants = [replace(v, train_size=min(v.train_size, 2 * kw["train_size"]),
                            change=f"training set of {min(v.train_size, 2 * kw['train_size'])}") if v.train_size else v
                    for v in variants]
    argv_text = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    settings = {"dataset": args.dataset, **kw, "archs": ",".join(archs), "generator_archs": ",".join(gen_archs),
                "variants": ",".join(v.name for v in variants), "tau": args.tau, "seed": args.seed,
                "steps": cfg.steps, "base": json.dumps(asdict(base_settings("mlp", kw["epochs"], args.seed))),
                "attack": json.dumps(cfg.flat()),
                "command": f"python -m tldr_core.cli.defence {argv_text}".strip()}
    t0 = time.time()
    try:
        rows = run_comparison(args.dataset, attack=cfg, variants=variants, archs=archs, generator_archs=gen_archs,
                              tau=args.tau, data_root=args.data_root, log=log, **kw)
        settings["wall_seconds"] = round(time.time() - t0, 1)
        class_names = load_dataset(args.dataset, kw["train_size"], seed=args.seed, data_root=args.data_root,
                                   test_size=kw["test_size"]).class_names
        paths = write_outputs(rows, Path(args.out), settings, class_names)
    except (DataError, DatasetNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    log("\n" + markdown_table(rows))
    log(f"{len(rows)} variants in {settings['wall_seconds'] / 60:.1f} min; wrote "
        + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
