"""The audit verdict as one self-contained HTML page (images embedded as data URIs; no network).

`render_report(...) -> str` / `write_report(path, ...)` build it from a data set, the generator's
`AttackResult` and/or a `TemplateResult`, the baselines and the settings; the audit command writes it
as report.html, the search's champion and the defence comparison use the same pieces, and
`log_report_to_mlflow` puts it beside an MLflow run (the MLflow UI shows HTML artifacts).

Risk level (stated on the page too), per attack, the page taking the worst:
HIGH   the memorisation gap's 95% CI lower bound > HIGH_GAP_CI_LOW, or coverage@tau > HIGH_COVERAGE
       while the gap is significant (specific training images come back);
MEDIUM the gap is significant: its CI lower bound > MEDIUM_GAP_CI_LOW (0.005, the run-to-run noise of the gap
       measured in method.md §7: the bootstrap CI covers only the resampling of reconstructions, and on
       the defence comparison it excluded 0 on both sides for variants with no effect); or the
       reconstructions' quality reaches the class-mean baseline's (a class-level leak);
LOW    otherwise.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from tldr_core.attack.classifier import ClassifierSettings
from tldr_core.attack.config import AttackConfig, LossWeights
from tldr_core.scoring.metrics import baseline_sets, nn_ssim
from tldr_core.report.html import esc, grid_html, kv_table, metrics_table, page, pairs_html, verdict_html
from tldr_core.attack.templates import applies as templates_apply, run_template_attack

HIGH_GAP_CI_LOW = 0.02
MEDIUM_GAP_CI_LOW = 0.005
HIGH_COVERAGE = 0.05
MEDIUM_REALISM = 1.0  # quality as a fraction of the way from the noise to the class-mean baseline
LEVELS = ("LOW", "MEDIUM", "HIGH")


@dataclass
class Risk:
    level: str
    reason: str      # one clause, for the verdict sentence
    realism: float   # (quality - noise) / (class mean - noise)

    @property
    def headline(self) -> str:
        if self.level == "HIGH":
            return "this model gives away its training data"
        if self.level == "MEDIUM":
            return ("this model gives away what its classes look like" if "class-level" in self.reason
                    else "this model leaks a little about its training images")
        return "no measurable leak of training images"


def assess(m: dict[str, float], baselines: dict[str, dict[str, float]]) -> Risk:
    """Risk level of one attack's metrics against the baselines (thresholds: module doc)."""
    qn, qc = baselines["noise"]["quality"], baselines["class_mean"]["quality"]
    realism = (m["quality"] - qn) / (qc - qn) if qc - qn > 1e-9 else math.nan
    gap = f"memorisation gap {m['gap']:+.3f}, 95% CI {m['gap_ci_low']:+.3f} to {m['gap_ci_high']:+.3f}"
    look = f"quality {m['quality']:.2f} against {qc:.2f} for the class-mean image"
    if m["gap_ci_low"] > HIGH_GAP_CI_LOW:
        return Risk("HIGH", f"clearly closer to this model's own training images than to unseen images of the same "
                            f"classes ({gap}): what comes out is specific to its training set, not just to the "
                            f"classes", realism)
    significant = m["gap_ci_low"] > MEDIUM_GAP_CI_LOW
    if significant and m["coverage"] > HIGH_COVERAGE:
        return Risk("HIGH", f"{m['coverage']:.0%} of the training images have one at SSIM >= "
                            f"{m.get('tau', 0.5):g}, and they "
                            f"favour training over unseen images ({gap})", realism)
    if significant:
        return Risk("MEDIUM", f"slightly but significantly closer to the training images than to unseen ones ({gap})",
                    realism)
    if realism >= MEDIUM_REALISM:
        return Risk("MEDIUM", f"as close to the training images as each class's average image ({look}) but no "
                              f"closer to them than to unseen ones ({gap}): a class-level leak, not of individual "
                              f"images", realism)
    return Risk("LOW", f"no closer to the training images than to unseen images of the same classes beyond the "
                       f"gap's run-to-run noise ({gap}), and "
                       f"they resemble the data less than a class average does ({look}; {realism:.0%} of the way "
                       f"from noise to it)", realism)


def worst(risks: Sequence[Risk]) -> int:
    return max(range(len(risks)), key=lambda i: LEVELS.index(risks[i].level))


def thresholds_html(tau: float) -> str:
    return ('<ul class="th">'
            f"<li><b>HIGH</b>: the memorisation gap's 95% CI lower bound is above {HIGH_GAP_CI_LOW}, or "
            f"coverage@{tau:g} is above {HIGH_COVERAGE} while the gap is significant.</li>"
            f"<li><b>MEDIUM</b>: the gap is significant: its CI lower bound is above {MEDIUM_GAP_CI_LOW} (the gap's "
            "run-to-run noise; the bootstrap CI alone covers only the choice of reconstructions); or the "
            "reconstructions' quality reaches "
            "the class-mean baseline's (they resemble the training images as much as each class's average training "
            "image does: a class-level leak, serious when a class is a person).</li>"
            "<li><b>LOW</b>: neither. The page's verdict is the worst attack's level.</li></ul>"
            '<p class="note"><b>quality</b>: mean SSIM of each reconstruction to its most similar training image of '
            "the "
            "same class (1 = identical). <b>quality vs H'</b>: the same against an equally large set of images the "
            "model never saw. <b>gap</b> = the difference, paired per reconstruction, with a bootstrap 95% CI: above "
            "zero means the model reproduces <i>its</i> training images, not just the classes. "
            f"<b>coverage@{tau:g}</b>: "
            f"share of training images with a reconstruction at SSIM &ge; {tau:g}. <b>label agreement</b>: share the "
            "classifier assigns to the intended class. <b>diversity</b>: 1 - mean SSIM between reconstructions of a "
            "class. Baselines are scored by the same code: uniform noise, each class's mean training image, and real "
            "unseen images.</p>")


CLI_ATTACK_KEYS = ("variant", "mode", "steps", "batch_size", "lr", "epsilon", "perturbation", "grad_mode",
                   "grad_scope", "per_class", "seed")


def reproduce_command(record: dict[str, Any]) -> str:
    """The audit command line that reproduces an audit record (metrics.json's layout)."""
    ds, cl, st = record.get("dataset", {}), record.get("classifier", {}), record.get("settings", {})
    cs = cl.get("settings", {}) or {}
    parts = ["python -m tldr_core.cli.audit", f"--dataset {ds.get('name', '?')}",
             f"--train-size {ds.get('train_size', '?')}"]
    default = ClassifierSettings(arch=cs.get("arch", "cnn")).__dict__
    if cs and all(cs.get(k) == v for k, v in default.items() if k not in ("arch", "epochs", "seed")):
        parts += [f"--arch {cs['arch']}", f"--classifier-epochs {cs['epochs']}", f"--data-seed {cs['seed']}"]
    elif cl.get("path"):  # training choices the audit flags cannot express: audit the saved classifier
        parts.append(f"--classifier {cl['path']}")
    base, yaml_only = AttackConfig().flat(), []
    for k, v in st.items():
        if k in base and v != base[k] and k != "device" and k not in LossWeights.names():
            if k in CLI_ATTACK_KEYS:
                parts.append(f"--{k.replace('_', '-')} {v}")
            else:
                yaml_only.append(f"{k}: {v}")
    if any(k in st for k in LossWeights.names()):  # all nine, always: the defaults may change
        parts.append(" ".join(f"--{k.replace('_', '-')} {st[k]:g}" for k in LossWeights.names() if k in st))
    tau = record.get("metrics", {}).get("tau")
    if tau is not None and tau != 0.5:
        parts.append(f"--tau {tau:g}")
    if yaml_only:
        parts.append("--config extra.yaml   # extra.yaml: " + "; ".join(yaml_only))
    return " \\\n    ".join(parts)


def describe_model(spec: dict[str, Any] | None, settings: dict[str, Any] | None) -> str:
    """One line a person can read: architecture and the training choices that matter for leakage."""
    spec, st = spec or {}, settings or {}
    arch = spec.get("arch") or st.get("arch") or "classifier"
    hidden = spec.get("hidden", st.get("hidden"))
    shape = "linear (pixels straight to classes)" if arch == "mlp" and hidden == 0 else (
        f"one hidden layer of {hidden}" if arch == "mlp" else "convolutional (the paper's CNN)")
    bits = [f"{arch}: {shape}"]
    if st:
        bits.append(f"{st.get('optimizer', '?')} lr {st.get('lr', '?')}, weight decay {st.get('weight_decay', 0)}, "
                    f"dropout {st.get('dropout', 0)}, {st.get('epochs', '?')} epochs")
    return "; ".join(bits)


def _top_pairs(images, labels, refs, scores, names, left: str, n: int = 7) -> str:
    """The best-matching image of each class, the `n` best of those."""
    best = [int(i[scores[i].argmax()]) for c in labels.unique() for i in [(labels == c).nonzero().flatten()]]
    idx = torch.tensor(best)[torch.argsort(scores[best], descending=True)][:n]
    return pairs_html(images[idx], labels[idx], refs[idx], scores[idx], names, left, "nearest training", per_class=n)


def render_report(bundle, baselines: dict[str, dict[str, float]], *, attack=None, templates=None,
                  classifier=None, record: dict[str, Any] | None = None, command: str | None = None,
                  title: str | None = None, per_class: int | None = None, seed: int = 0) -> str:
    """The audit report as an HTML string.

    bundle: the DatasetBundle audited; baselines: score_baselines' dict; attack: an audit.AttackResult (the
    generator's; optional); templates: a templates.TemplateResult (optional; computed from `classifier`
    when its first layer is fully connected and none is given); record: metrics.json's dict (identity and
    settings shown; optional); command: the line that reproduces it (default: derived from `record`).
    """
    record = dict(record or {})
    scored = attack if attack is not None else templates
    tau = float(scored.metrics["tau"]) if scored is not None else 0.5
    if templates is None and classifier is not None and templates_apply(classifier):
        templates = run_template_attack(classifier, bundle, tau=tau, seed=seed)
    names, train = bundle.class_names, bundle.train.images
    attacks: list[tuple[str, Any]] = []
    if attack is not None:
        variant = record.get("settings", {}).get("variant", "conditioned")
        attacks.append((f"generator ({variant}, {attack.train.steps} steps)", attack))
    if templates is not None:
        attacks.append((f"weight templates ({templates.method})", templates))
    if not attacks:
        raise ValueError("render_report needs an attack result or templates")
    risks = [assess(a.metrics, baselines) for _, a in attacks]
    w = worst(risks)
    level = risks[w].level
    sentence = f"The {attacks[w][0]} reconstructions are {risks[w].reason}."
    for (name, _), r in zip(attacks, risks):
        if name != attacks[w][0]:
            sentence += f" The {name}: {r.level}."
    cl = record.get("classifier", {})
    spec = classifier.spec() if classifier is not None and hasattr(classifier, "spec") else None
    model_line = describe_model(spec, cl.get("settings"))
    acc = f", test accuracy {cl['test_accuracy']:.3f}" if "test_accuracy" in cl else ""
    title = title or f"TLDR audit: {bundle.name}, {(spec or cl.get('settings') or {}).get('arch', 'model')}"
    pc = per_class or int(record.get("settings", {}).get("per_class", 0)) or 10
    real, real_y = baseline_sets(bundle.train, bundle.test, bundle.num_classes, pc, seed=seed)["heldout_real"]
    near = nn_ssim(real, real_y, train, bundle.train.labels)
    b = [f"<h1>{esc(title)}</h1>",
         f"<p class='idline'><b>Model</b> {esc(model_line)}{esc(acc)}. <b>Data</b> {esc(bundle.name)}: trained on "
         f"{len(bundle.train)} images, compared with {len(bundle.heldout)} it never saw.</p>",
         verdict_html(level, risks[w].headline, sentence),
         "<div class='top'><h2>What came out: each class's closest reconstruction, beside the training image it "
         "is most like</h2>"]
    for name, a in attacks:
        b += [f"<h3>{esc(name)}</h3>",
              _top_pairs(a.images, a.labels, train[a.nearest_index], a.nearest_ssim, names, "reconstruction")]
    b += [f"<h3>for comparison: real images the model never saw (SSIM median {float(near.values.median()):.2f})</h3>",
          _top_pairs(real, real_y, train[near.index], near.values, names, "unseen image"), "</div>",
          "<h2>Reconstructions against baselines</h2>",
          metrics_table([(n, a.metrics, r.level) for (n, a), r in zip(attacks, risks)]
                        + [(label, baselines[k], "") for k, label in (
                            ("noise", "baseline: uniform noise"), ("class_mean", "baseline: class-mean image of T"),
                            ("heldout_real", "baseline: real unseen images"))])]
    if attack is not None:
        b += ["<h2>Generator reconstructions, by class</h2>",
              "<p class='note'>Up to 10 hot-conditioned reconstructions per class (rows).</p>",
              grid_html(attack.images, attack.labels, names),
              "<h2>Each class's best two reconstructions beside their nearest training image</h2>",
              pairs_html(attack.images, attack.labels, train[attack.nearest_index], attack.nearest_ssim, names,
                         "reconstruction", "nearest training")]
    if templates is not None:
        means = torch.stack([train[bundle.train.labels == c].mean(0) for c in range(bundle.num_classes)])
        b += ["<h2>Weight templates: the first layer's weights read as images</h2>",
              f"<p class='note'>Method <b>{esc(templates.method)}</b>; per class the rendering the classifier scores "
              f"highest ({esc(', '.join(sorted(set(templates.choice))))}). Each template beside its nearest training "
              "image (SSIM) and the class's mean training image.</p>",
              pairs_html(templates.images, templates.labels, train[templates.nearest_index], templates.nearest_ssim,
                         names, "template", "nearest training", per_class=1, extra=means[templates.labels],
                         extra_name="class mean of T")]
    b += ["<h2>Real unseen images beside their nearest training image (the held-out baseline)</h2>",
          "<p class='note'>Best two per class, chosen the same way as for the reconstructions: this is how close "
          "data the model never saw comes to the training set.</p>",
          pairs_html(real, real_y, train[near.index], near.values, names, "unseen image", "nearest training"),
          "<h2>How the risk level is decided</h2>", thresholds_html(tau)]
    ds_id = {"data set": bundle.name, "source": bundle.source,
             "training set T / held-out H' / test": f"{len(bundle.train)} / {len(bundle.heldout)} / {len(bundle.test)}",
             "image shape": tuple(bundle.image_shape), "classes": bundle.num_classes}
    model_id = {"architecture": json.dumps(spec) if spec else None, "training settings":
                json.dumps(cl.get("settings")) if cl.get("settings") else None,
                "test accuracy": f"{cl['test_accuracy']:.3f}" if "test_accuracy" in cl else None,
                "classifier file": cl.get("path")}
    b += ["<h2>Model, data and the settings that reproduce this</h2>",
          f'<div class="cols"><div><b>Model</b>{kv_table(model_id)}</div><div><b>Data</b>{kv_table(ds_id)}</div></div>']
    cmd = command or (reproduce_command(record) if record else None)
    if cmd:
        b.append(f"<pre>{esc(cmd)}</pre>")
    settings = {k: record[k] for k in ("settings", "classifier", "dataset", "generator") if k in record}
    if templates is not None:
        settings["template_attack"] = templates.summary()
    b.append(f"<details><summary>all settings (JSON)</summary><pre>{esc(json.dumps(settings, indent=1, default=str))}"
             "</pre></details>")
    return page(title, "".join(b))


def write_report(path: str | Path, bundle=None, baselines=None, *, html_text: str | None = None, **kwargs) -> Path:
    """Write `html_text`, or `render_report(bundle, baselines, **kwargs)`, to `path`."""
    text = html_text if html_text is not None else render_report(bundle, baselines, **kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)


def log_report_to_mlflow(html_path: str | Path, run_id: str | None = None, *, artifact_path: str | None = None,
                         tracking_uri: str | None = None, client=None) -> None:
    """Log the report as an artifact: to `run_id` through an MlflowClient (`client`, or one for
    `tracking_uri`), or to the active fluent run when run_id is None."""
    import mlflow

    if run_id is None:
        mlflow.log_artifact(str(html_path), artifact_path)
        return
    client = client or mlflow.MlflowClient(tracking_uri=tracking_uri)
    client.log_artifact(run_id, str(html_path), artifact_path)


def audit_report(bundle, cfg, attack, baselines, record: dict[str, Any], classifier=None) -> tuple[str, dict]:
    """For audit.write_outputs: the report's HTML and the record entries to add (the template attack's
    scores when the classifier's first layer is fully connected)."""
    extra: dict[str, Any] = {}
    res = None
    if classifier is not None and templates_apply(classifier):
        res = run_template_attack(classifier, bundle, tau=attack.metrics["tau"], seed=cfg.seed)
        extra["template_attack"] = res.summary()
    text = render_report(bundle, baselines, attack=attack, templates=res, classifier=classifier,
                         record={**record, **extra}, per_class=cfg.per_class, seed=cfg.seed)
    return text, extra
