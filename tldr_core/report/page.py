"""The audit verdict as one self-contained HTML page (images embedded as data URIs; no network).

`render_report(...) -> str` / `write_report(path, ...)` draw results computed elsewhere: a data set,
an attack's `Scored` (tldr_core.scoring.pipeline: the TLDR generator's or the KKT candidates') and/or
a weight-template `TemplateResult` (each with its exposure and exposure gallery), the baselines, the
real unseen images beside their nearest training images (`pipeline.heldout_nearest`) and the settings.
Nothing here trains, attacks or searches. The audit command writes it as report.html; the defence
comparison uses the same pieces.

The risk level is the rule of :mod:`tldr_core.scoring.risk` (stated on the page too), per attack,
the page taking the worst.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tldr_core.attack.classifier import ClassifierSettings
from tldr_core.attack.config import AttackConfig, LossWeights
from tldr_core.attack.kkt import KKTConfig
from tldr_core.report.evidence import membership_section, references_section, stationarity_section
from tldr_core.report.html import (esc, exposure_table, fig_uri, figure_html, grid_html, kv_table, metrics_table, page,
                                   pairs_html, verdict_html)
from tldr_core.report.pictures import exposure_gallery_figure
from tldr_core.scoring.audit import combined_sentence
from tldr_core.scoring.membership_risk import assess_membership
from tldr_core.scoring.risk import LEVELS, THRESHOLDS, Risk, assess, worst

if TYPE_CHECKING:
    from tldr_core.attack.data import DatasetBundle
    from tldr_core.attack.templates import TemplateResult
    from tldr_core.scoring.pipeline import Scored

__all__ = ["headline", "thresholds_html", "reproduce_command", "describe_model", "render_report", "write_report"]


def headline(risk: Risk) -> str:
    """The verdict box's headline for a risk: what leaked, in words (tldr_core.scoring.risk.MEANING)."""
    return risk.meaning


def thresholds_html(tau: float) -> str:
    """The risk rule of tldr_core.scoring.risk in words (its criteria are checked in this order)."""
    th = THRESHOLDS
    return ('<ul class="th">'
            "<li><b>HIGH</b> = individual training images recovered (per-image evidence only): the calibrated "
            f"exposure's TPR at 1% FPR has its 95% CI lower bound above {th['high_tpr_ci_low']:.0%} and its AUC's "
            f"above 0.5, and at least {th['high_distinct_fraction']:.0%} of the training images (and at least "
            f"{th['high_min_images']:g}) are exposed each by a reconstruction of its own; or at least "
            f"{th['high_min_images']:g} training images are matched one-to-one at SSIM &ge; 0.6, significantly more "
            f"than unseen images (Fisher's exact test, p &lt; {th['high_match_p']:g}).</li>"
            "<li><b>MEDIUM</b> = a signal specific to this training set without per-image evidence: the calibrated "
            f"or the raw exposure's TPR lower bound above {th['medium_tpr_ci_low']:.0%} (chance: the FPR itself) "
            "with the AUC's lower bound above 0.5, or a memorisation gap whose CI lower bound is above "
            f"{th['medium_gap_ci_low']} (the gap's run-to-run noise).</li>"
            "<li><b>LOW</b>: none of these. Reconstructions that only look like the classes (as close to the "
            "training images as a class's average image, no closer than to unseen images) are class statistics "
            "and stay LOW. The gap alone never makes HIGH. The criteria are checked in this order and the first "
            "that holds sets the level; the page's verdict is the worst attack's level.</li></ul>"
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


#: The architectures the audit's --arch can train (tldr_core.cli.audit); others ("fc") are reproduced from the file.
AUDIT_ARCHS = ("cnn", "mlp")
CLI_ATTACK_KEYS = ("variant", "mode", "steps", "batch_size", "lr", "epsilon", "perturbation", "grad_mode",
                   "grad_scope", "per_class", "seed", "bn", "jitter", "flip")


def reproduce_command(record: dict[str, Any]) -> str:
    """The audit command line that reproduces an audit record (metrics.json's layout)."""
    ds, cl, st = record.get("dataset", {}), record.get("classifier", {}), record.get("settings", {})
    cs = cl.get("settings", {}) or {}
    parts = ["python -m tldr_core.cli.audit", f"--dataset {ds.get('name', '?')}",
             f"--train-size {ds.get('train_size', '?')}"]
    default = ClassifierSettings(arch=cs.get("arch", "cnn")).__dict__
    if cs and cs.get("arch", "cnn") in AUDIT_ARCHS and all(
            cs.get(k) == v for k, v in default.items() if k not in ("arch", "epochs", "seed")):
        parts += [f"--arch {cs['arch']}", f"--classifier-epochs {cs['epochs']}", f"--data-seed {cs['seed']}"]
    elif cl.get("path"):  # training choices the audit flags cannot express: audit the saved classifier
        parts.append(f"--classifier {cl['path']}")
    yaml_only: list[str] = []
    parts += _kkt_flags(st) if record.get("attack") == "kkt" else _tldr_flags(st, yaml_only)
    tau = record.get("metrics", {}).get("tau")
    if tau is not None and tau != 0.5:
        parts.append(f"--tau {tau:g}")
    if yaml_only:
        parts.append("--config extra.yaml   # extra.yaml: " + "; ".join(yaml_only))
    return " \\\n    ".join(parts)


def _cli_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _tldr_flags(st: dict[str, Any], yaml_only: list[str]) -> list[str]:
    """The audit flags of the TLDR settings ``st`` that differ from the defaults (and all nine weights);
    settings no flag expresses are appended to ``yaml_only`` as "key: value"."""
    base, parts = AttackConfig().flat(), []
    for k, v in st.items():
        if k in base and v != base[k] and k != "device" and k not in LossWeights.names():
            if k in CLI_ATTACK_KEYS:
                parts.append(f"--{k.replace('_', '-')} {_cli_value(v)}")
            else:
                yaml_only.append(f"{k}: {v}")
    if any(k in st for k in LossWeights.names()):  # all nine, always: the defaults may change
        parts.append(" ".join(f"--{k.replace('_', '-')} {st[k]:g}" for k in LossWeights.names() if k in st))
    return parts


def _kkt_flags(st: dict[str, Any]) -> list[str]:
    """``--attack kkt`` and a ``--kkt-<name>`` flag (tldr_core.cli.audit) per KKT setting that differs
    from KKTConfig's defaults (per_class is recorded resolved, so it is always there)."""
    base = KKTConfig().flat()
    flags = [f"--kkt-{k.replace('_', '-')} {_cli_value(v)}" for k, v in st.items()
             if k in base and k != "device" and v != base[k]]
    return ["--attack kkt"] + ([" ".join(flags)] if flags else [])


def describe_model(spec: dict[str, Any] | None, settings: dict[str, Any] | None) -> str:
    """One line a person can read: architecture and the training choices that matter for leakage."""
    spec, st = spec or {}, settings or {}
    arch = spec.get("arch") or st.get("arch") or "classifier"
    hidden = spec.get("hidden", st.get("hidden"))
    if arch == "fc":  # models.FC: ReLU layers of spec["widths"], no dropout
        widths = spec.get("widths")
        shape = "fully connected ReLU" + (f", hidden layers {'-'.join(str(w) for w in widths)}" if widths else "")
    else:
        shape = "linear (pixels straight to classes)" if arch == "mlp" and hidden == 0 else (
            f"one hidden layer of {hidden}" if arch == "mlp" else "convolutional (the paper's CNN)")
    bits = [f"{arch}: {shape}"]
    if st:
        dropout = 0 if arch == "fc" else st.get("dropout", 0)
        bits.append(f"{st.get('optimizer', '?')} lr {st.get('lr', '?')}, weight decay {st.get('weight_decay', 0)}, "
                    f"dropout {dropout}, {st.get('epochs', '?')} epochs")
    return "; ".join(bits)


def _top_pairs(images, labels, refs, scores, names, left: str, n: int = 7) -> str:
    """The best-matching image of each class, the `n` best of those."""
    best = [int(i[scores[i].argmax()]) for c in labels.unique() for i in [(labels == c).nonzero().flatten()]]
    idx = torch.tensor(best)[torch.argsort(scores[best], descending=True)][:n]
    return pairs_html(images[idx], labels[idx], refs[idx], scores[idx], names, left, "nearest training", per_class=n)


def _attacks(attack, templates, record: dict[str, Any], others: dict[str, Any] | None = None
             ) -> list[tuple[str, Any]]:
    """(display name, result) of each attack shown, the generator's (or KKT candidates') first, then
    ``others`` (further attacks by kind), then the templates."""
    attacks: list[tuple[str, Any]] = []
    for a in [attack, *(others or {}).values()]:
        if a is not None and a.kind == "kkt":
            attacks.append((f"KKT candidates ({a.steps} steps)", a))
        elif a is not None:
            variant = (record.get("settings", {}) if a is attack else a.out.settings).get("variant", "conditioned")
            attacks.append((f"generator ({variant}, {a.steps} steps)", a))
    if templates is not None:
        attacks.append((f"weight templates ({templates.method})", templates))
    if not attacks:
        raise ValueError("render_report needs an attack result or templates")
    return attacks


def verdict_sentence(name: str, risk: Risk) -> str:
    """The verdict box's sentence for one attack's risk: the level's meaning, then the evidence."""
    return f"{risk.level}: {risk.meaning}. With the {name} reconstructions: {risk.reason}."


def _verdict(attacks: list[tuple[str, Any]], risks: list[Risk], membership: Risk | None = None) -> str:
    """The box: the reconstruction axis (the worst attack) with its evidence, the other attacks' levels,
    then the membership axis and what the two mean together."""
    w = worst(risks)
    sentence = verdict_sentence(attacks[w][0], risks[w])
    for (name, _), r in zip(attacks, risks):
        if name != attacks[w][0]:
            sentence += f" The {name}: {r.level}."
    if membership is None:
        return verdict_html(risks[w].level, headline(risks[w]), sentence)
    level = max(risks[w].level, membership.level, key=LEVELS.index)  # the box's colour: the worse axis
    return verdict_html(level, f"reconstruction {risks[w].level}, membership {membership.level}. "
                               f"{combined_sentence(risks[w], membership)}",
                        sentence, [f"Membership {membership.level}: {membership.reason}."])


def _top_section(bundle, attacks, heldout) -> list[str]:
    names, train = bundle.class_names, bundle.train.images
    b = ["<div class='top'><h2>What came out: each class's closest reconstruction, beside the training image it "
         "is most like</h2>"]
    for name, a in attacks:
        b += [f"<h3>{esc(name)}</h3>",
              _top_pairs(a.images, a.labels, train[a.nearest_index], a.nearest_ssim, names, "reconstruction")]
    if heldout is not None:
        b += [f"<h3>for comparison: real images the model never saw (SSIM median "
              f"{float(heldout.nearest_ssim.median()):.2f})</h3>",
              _top_pairs(heldout.images, heldout.labels, train[heldout.nearest_index], heldout.nearest_ssim, names,
                         "unseen image")]
    return b + ["</div>"]


def _metrics_section(attacks, risks, baselines) -> list[str]:
    rows = [(n, a.metrics, r.level) for (n, a), r in zip(attacks, risks)]
    rows += [(label, baselines[k], "") for k, label in (
        ("noise", "baseline: uniform noise"), ("class_mean", "baseline: class-mean image of T"),
        ("heldout_real", "baseline: real unseen images"))]
    return ["<h2>Reconstructions against baselines</h2>", metrics_table(rows)]


EXPOSURE_NOTE = ("<b>Calibrated exposure</b> e_cal(t): how much closer the best reconstruction of its class comes to "
                 "training image t than to any image of the population P (images neither in T nor in H'); the same "
                 "is computed for as many images the model never saw (H'). An AUC above 0.5 and a TPR at 1% FPR above "
                 "1% mean the reconstructions single out this model's training images, not just typical images of "
                 "the class. At 1% FPR about 1% of the training images are above the threshold by chance. The raw "
                 "exposure (best SSIM, not calibrated) is the secondary line.")


def _exposure_section(bundle, attacks) -> list[str]:
    """Per attack: the exposure table and the gallery of its most exposed training images."""
    b = ["<h2>Exposure: which training images come back</h2>", f"<p class='note'>{EXPOSURE_NOTE}</p>"]
    for name, a in attacks:
        b.append(f"<h3>{esc(name)}</h3>")
        if "exposure_auc" not in a.metrics:
            b.append("<p class='note'>not scored for exposure</p>")
            continue
        b.append(exposure_table(a.metrics, len(bundle.train)))
        gallery = getattr(a, "gallery", None)
        if gallery is not None and gallery.rows:
            fig = exposure_gallery_figure(gallery, bundle.class_names)
            b.append(figure_html(fig_uri(fig), f"{name}: the most exposed training images, each beside the "
                                               "reconstruction reaching it, its best unseen match and its best "
                                               "population match"))
    return b


def _image_sections(bundle, attack, templates, heldout) -> list[str]:
    names, train = bundle.class_names, bundle.train.images
    b: list[str] = []
    if attack is not None:
        if attack.kind == "kkt":
            b += ["<h2>KKT candidates, by class</h2>", "<p class='note'>Up to 10 candidate images per class (rows): "
                  "the images whose margin gradients, weighted, best add up to the classifier's weights.</p>"]
        else:
            b += ["<h2>Generator reconstructions, by class</h2>",
                  "<p class='note'>Up to 10 hot-conditioned reconstructions per class (rows).</p>"]
        b += [
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
    if heldout is not None:
        b += ["<h2>Real unseen images beside their nearest training image (the held-out baseline)</h2>",
              "<p class='note'>Best two per class, chosen the same way as for the reconstructions: this is how close "
              "data the model never saw comes to the training set.</p>",
              pairs_html(heldout.images, heldout.labels, train[heldout.nearest_index], heldout.nearest_ssim, names,
                         "unseen image", "nearest training")]
    return b


def _identity_sections(bundle, spec, record: dict[str, Any], templates, command: str | None) -> list[str]:
    cl = record.get("classifier", {})
    ds_id = {"data set": bundle.name, "source": bundle.source,
             "training set T / held-out H' / test": f"{len(bundle.train)} / {len(bundle.heldout)} / {len(bundle.test)}",
             "image shape": tuple(bundle.image_shape), "classes": bundle.num_classes}
    model_id = {"architecture": json.dumps(spec) if spec else None, "training settings":
                json.dumps(cl.get("settings")) if cl.get("settings") else None,
                "test accuracy": f"{cl['test_accuracy']:.3f}" if "test_accuracy" in cl else None,
                "classifier file": cl.get("path")}
    b = ["<h2>Model, data and the settings that reproduce this</h2>",
         f'<div class="cols"><div><b>Model</b>{kv_table(model_id)}</div><div><b>Data</b>{kv_table(ds_id)}</div></div>']
    cmd = command or (reproduce_command(record) if record else None)
    if cmd:
        b.append(f"<pre>{esc(cmd)}</pre>")
    settings = {k: record[k] for k in ("attack", "settings", "classifier", "dataset", "generator", "kkt")
                if k in record}
    if templates is not None:
        settings["template_attack"] = templates.summary()
    b.append(f"<details><summary>all settings (JSON)</summary><pre>{esc(json.dumps(settings, indent=1, default=str))}"
             "</pre></details>")
    return b


def render_report(bundle: DatasetBundle, baselines: dict[str, dict[str, float]], *, attack: Scored | None = None,
                  templates: TemplateResult | None = None, heldout: Scored | None = None,
                  spec: dict[str, Any] | None = None, record: dict[str, Any] | None = None,
                  command: str | None = None, title: str | None = None,
                  references: dict[str, Scored] | None = None, membership: Any = None,
                  stationarity: Any = None, others: dict[str, Scored] | None = None) -> str:
    """The audit report as an HTML string, from results computed by the caller.

    bundle: the DatasetBundle audited; baselines: score_baselines' dict; attack: the generator's
    `Scored` (tldr_core.scoring.pipeline; optional); templates: a scored `TemplateResult` (optional;
    at least one of the two); heldout: `pipeline.heldout_nearest`'s real unseen images beside their
    nearest training images (optional: its sections are left out without it); spec: the classifier's
    `spec()` (architecture line); record: metrics.json's dict (identity and settings shown); command:
    the line that reproduces it (default: derived from `record`); references: the model-free references
    (tldr_core.scoring.references.score_references), judged by the same rule beside the attacks;
    membership: a tldr_core.scoring.mia.MembershipResult (the verdict's second axis); stationarity: the
    KKT premise on T (tldr_core.scoring.stationarity; its note from ``record["stationarity"]`` when None);
    others: further scored attacks by kind, judged and shown beside the first (the re-audit's KKT).
    """
    record = dict(record or {})
    attacks = _attacks(attack, templates, record, others)
    tau = float(attacks[0][1].metrics["tau"])
    risks = [assess(a.metrics, baselines) for _, a in attacks]
    mrisk = assess_membership(membership.metrics()) if membership is not None else None
    cl = record.get("classifier", {})
    acc = f", test accuracy {cl['test_accuracy']:.3f}" if "test_accuracy" in cl else ""
    title = title or f"TLDR audit: {bundle.name}, {(spec or cl.get('settings') or {}).get('arch', 'model')}"
    b = [f"<h1>{esc(title)}</h1>",
         f"<p class='idline'><b>Model</b> {esc(describe_model(spec, cl.get('settings')))}{esc(acc)}. <b>Data</b> "
         f"{esc(bundle.name)}: trained on {len(bundle.train)} images, compared with {len(bundle.heldout)} it never "
         "saw.</p>",
         _verdict(attacks, risks, mrisk)]
    b += _top_section(bundle, attacks, heldout)
    b += _metrics_section(attacks, risks, baselines)
    if references:
        b += references_section(attacks, risks, {n: (r, assess(r.metrics, baselines)) for n, r in references.items()})
    if membership is not None:
        b += membership_section(membership, mrisk)
    b += _exposure_section(bundle, attacks)
    if stationarity is not None or "stationarity" in record:
        b += stationarity_section(stationarity, (record.get("stationarity") or {}).get("note", ""))
    b += _image_sections(bundle, attack, templates, heldout)
    b += ["<h2>How the risk level is decided</h2>", thresholds_html(tau)]
    b += _identity_sections(bundle, spec, record, templates, command)
    return page(title, "".join(b))


def write_report(path: str | Path, bundle: DatasetBundle | None = None,
                 baselines: dict[str, dict[str, float]] | None = None, *, html_text: str | None = None,
                 **kwargs: Any) -> Path:
    """Write `html_text`, or `render_report(bundle, baselines, **kwargs)`, to `path`."""
    text = html_text if html_text is not None else render_report(bundle, baselines, **kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
    return Path(path)
