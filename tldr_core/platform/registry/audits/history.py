"""A registered classifier's history: one row per audited version, read from the versions' `audit.*` tags
(the rows tldr_core.report.history_chart draws and writes), and the model's history run brought up to
date after a version's audit (tldr_core.platform.registry.audits.reaudit_runs logs it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tldr_core.platform.registry.audits.audit_tags import COMPARED_WITH, REGRESSION
from tldr_core.platform.registry.champion import CHAMPION
from tldr_core.platform.registry.models import alias_version, model_versions

EXPOSURE_PREFIXES = ("audit.exposure_auc.", "audit.exposure_tpr.")


def row_of(version: str, tags: dict[str, str], champion: str | None) -> dict[str, Any] | None:
    """The history row of one version (None when it has no audit verdict)."""
    if not tags.get("audit.risk"):
        return None
    row: dict[str, Any] = {
        "version": int(version), "reconstruction": tags["audit.risk"], "membership": tags.get("audit.membership", ""),
        "regression": tags.get(REGRESSION, ""), "compared_with": tags.get(COMPARED_WITH, ""),
        "champion": str(version) == str(champion), "quality": tags.get("audit.quality", "nan"),
        "membership_auc": tags.get("audit.membership_auc", "nan"), "membership_tpr": tags.get("audit.membership_tpr", "nan"),
        "test_accuracy": tags.get("test_accuracy", "nan"), "rule_version": tags.get("audit.rule_version", "")}
    for k, v in tags.items():
        if k.startswith(EXPOSURE_PREFIXES):
            row[k[len("audit."):]] = v
    return row


def history_rows(c, name: str, override: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """Rows of every audited version of ``name`` by version; ``override``: {version: tags} that replace
    what the store holds (the version being audited, before its tags are written)."""
    holder = alias_version(c, name, CHAMPION)
    champion = str(holder.version) if holder is not None else None
    override = override or {}
    rows = []
    for mv in model_versions(c, name):
        tags = {**(mv.tags or {}), **override.get(str(mv.version), {})}
        row = row_of(str(mv.version), tags, champion)
        if row is not None:
            rows.append(row)
    return sorted(rows, key=lambda r: r["version"])


def update_history(c, name: str, run_id: str, rows: list[dict[str, Any]], version: str, work: Path) -> list[Path]:
    """Write the history files of ``rows`` and log them (and ``version``'s row as metrics) to the run."""
    from tldr_core.platform.registry.audits.reaudit_runs import log_history
    from tldr_core.report.history_chart import write_history

    files = write_history(work, rows, name)
    row = next((r for r in rows if str(r["version"]) == str(version)), None)
    log_history(c, run_id, files, row)
    return files
