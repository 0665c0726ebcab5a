"""The version a re-audited version would replace, that version's audit read back from MLflow, and the
comparison of the two (the statistics are tldr_core.scoring.compare's).

**Which version it would replace** (:func:`baseline_version`): the model's `champion` alias when it is
set and names another version (the one in production; `tldr registry promote NAME VERSION` moves it);
otherwise the highest earlier version whose model loads (audit.status is not `error`); otherwise none,
and there is nothing to compare with. The champion itself is compared with the version before it.

**Its audit** must be usable (:func:`unusable`): finished (audit.status done, an audit run), judged by the
current rule (`audit.rule_version`), of the file the version holds now (`audit.sha256` = its `sha256`
tag), and its run must hold the per-image files (exposure_heldout.csv, lineage.json: only re-audits
write them). Otherwise the re-audit audits the baseline first.

**Paired or not**: the per-image scores pair up only when both audits ran on the same images, i.e. their
lineage.json agree on data set, split seed, sizes and the digests of T and H'. Then each attack both
versions ran (calibrated exposure) and the strongest membership attack both ran are compared by the
paired bootstrap; otherwise only the verdict levels are, and the note says which lineage field differs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tldr_core.platform.registry.audits.audit_tags import RULE_VERSION, RUN_ID, SHA256, STATUS, rule_version
from tldr_core.platform.registry.champion import CHAMPION
from tldr_core.platform.registry.models import alias_version, model_versions
from tldr_core.platform.tracking import store as tr
from tldr_core.report.score_files import HELDOUT_EXPOSURE_CSV, SCORE_FILES, VersionScores, read_version_scores
from tldr_core.scoring.compare import Comparison, compare_axis, verdict_levels

LINEAGE_KEYS = ("dataset", "data_seed", "train_size", "heldout_size", "train_digest", "heldout_digest")
MEMBERSHIP_ORDER = ("lira", "margin", "loss")  # the strongest membership attack both versions ran


def expected_baseline(version: str, versions: list, champion: str | None) -> tuple[str | None, str]:
    """(the version number ``version`` would replace, or None; how it was chosen, in words), from the
    model's ModelVersions and the version holding the champion alias (None: no alias)."""
    if champion is not None and str(champion) != str(version):
        return str(champion), f"the {CHAMPION} (alias {CHAMPION} -> version {champion})"
    earlier = [int(v.version) for v in versions
               if int(v.version) < int(version) and (v.tags or {}).get(STATUS) != "error"]
    if earlier:
        why = "it is the champion itself" if champion is not None else f"no {CHAMPION} alias is set"
        return str(max(earlier)), f"the previous version ({why})"
    return None, f"no {CHAMPION} alias and no earlier version that loads"


def baseline_version(c, name: str, version: str) -> tuple[Any | None, str]:
    """(the ModelVersion ``version`` would replace, or None; how it was chosen, in words)."""
    holder = alias_version(c, name, CHAMPION)
    versions = model_versions(c, name)
    base, how = expected_baseline(version, versions, str(holder.version) if holder is not None else None)
    return next((v for v in versions if str(v.version) == base), None), how


def unusable(tags: dict[str, str]) -> str:
    """Why a version's audit cannot serve as the baseline of a comparison ("" when it can, as far as its
    tags tell; its run's files are checked when they are read)."""
    if tags.get(STATUS) != "done" or not tags.get(RUN_ID):
        return f"it has no finished audit (audit.status={tags.get(STATUS, 'none')})"
    if tags.get(RULE_VERSION) != rule_version():
        return f"its audit was judged by rule {tags.get(RULE_VERSION, 'none')}, not the current {rule_version()}"
    if tags.get("sha256") and tags.get(SHA256) != tags.get("sha256"):
        return "its model file changed since its audit"
    return ""


def download_scores(c, run_id: str, dest: Path) -> VersionScores:
    """The comparison's files of an audit run (SCORE_FILES, per attack folder), read back."""
    import json

    dest.mkdir(parents=True, exist_ok=True)

    def get(path: str) -> None:  # MLflow puts a file under dst by its base name: dst is its folder
        target = dest / Path(path).parent
        target.mkdir(parents=True, exist_ok=True)
        try:
            tr.retry(lambda: c.download_artifacts(run_id, path, str(target)), tries=2)
        except Exception:  # noqa: BLE001 - missing: read_version_scores lists it
            pass

    get("metrics.json")
    record = json.loads((dest / "metrics.json").read_text()) if (dest / "metrics.json").is_file() else {}
    for name in SCORE_FILES:
        if name != "metrics.json":
            get(name)
    for kind, v in (record.get("other_attacks") or {}).items():
        for name in ("exposure.csv", HELDOUT_EXPOSURE_CSV):
            get(f"{v.get('folder', kind)}/{name}")
    return read_version_scores(dest)


def lineage_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """"" when the two lineages match, else which fields differ (the note of a verdict-only comparison)."""
    if not a or not b:
        return "a lineage is unknown (an audit without lineage.json)"
    diff = [f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in LINEAGE_KEYS if a.get(k) != b.get(k)]
    return ("lineages differ: " + "; ".join(diff)) if diff else ""


def compare_scores(base: VersionScores, cand: VersionScores, seed: int = 0) -> Comparison:
    """The comparison of a candidate's scores with its baseline's: paired when the lineages match, the
    verdict levels in any case."""
    levels = verdict_levels(base.levels, cand.levels)
    why = lineage_difference(base.lineage, cand.lineage)
    if why:
        return Comparison([], levels, paired=False, note=why)
    axes = []
    try:
        for kind in [k for k in cand.exposure if k in base.exposure]:
            axes.append(compare_axis(f"exposure.{kind}", (base.exposure[kind][0], cand.exposure[kind][0]),
                                     (base.exposure[kind][1], cand.exposure[kind][1]), seed=seed))
        common = [a for a in MEMBERSHIP_ORDER if a in base.membership and a in cand.membership]
        if common:
            a = common[0]
            axes.append(compare_axis(f"membership.{a}", (base.membership[a][0], cand.membership[a][0]),
                                     (base.membership[a][1], cand.membership[a][1]), seed=seed))
    except ValueError as exc:  # same lineage, yet different images scored: say so, compare levels only
        return Comparison([], levels, paired=False, note=str(exc))
    note = "" if axes else "no per-image score both audits hold"
    return Comparison(axes, levels, paired=bool(axes), note=note)
