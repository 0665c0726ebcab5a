"""The promotion gate: `tldr registry promote NAME VERSION` moves the model's `champion` alias to a version
only when its audit is there, current and not a regression (docs/registry.md).

A version is refused (:func:`gate_reasons`) when

- **missing**: it has no finished audit (audit.status is not `done`, or no audit run);
- **stale**: its audit was judged by another rule (`audit.rule_version` differs from the current
  `audit_tags.rule_version()`: the verdict's logic or a threshold changed; audits by a search or by
  `tldr audit` carry none), or the model's artifacts changed after it (the checkpoint downloaded now
  hashes to something else than `audit.sha256`), or it was compared with another version than the one
  it would replace now (`audit.compared_with`; e.g. the champion moved since);
- **regressed**: `audit.regression=true` (a paired difference whose 95 % interval lies above 0, or a
  verdict level that rose, against the version it would replace).

`--force` promotes anyway and records it on the version: `promotion.forced=true`, `promotion.forced_by`
(the user), `promotion.forced_at` (UTC time), `promotion.overridden` (the refusals). Every decision is
the version tag `promotion`. The alias is set under the store's promotion lock (champion.py).

The re-audit's `pending_reason` uses :func:`stale_reason` (the tags-only part) so that what the gate would
call stale is audited again by the next scheduled run.
"""
from __future__ import annotations

import getpass
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from tldr_core.platform.registry.audits.audit_tags import (COMPARED_WITH, REGRESSION, REGRESSION_AXES, RULE_VERSION, RUN_ID,
                                                    SHA256, STATUS, Candidate, now_iso, rule_version,
                                                    set_version_tags)
from tldr_core.platform.registry.champion import CHAMPION, promotion_lock
from tldr_core.platform.registry.names import RegistryError
from tldr_core.platform.tracking import store as tr

GATE_STATUS = 3  # exit status of a refused promotion (and of a failed re-audit gate), as `tldr audit --fail-on`


@dataclass
class GateResult:
    name: str
    version: str
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    forced: bool = False
    replaced: str | None = None


def stale_reason(tags: dict[str, str], expected_baseline: str | None = None) -> str:
    """Why a finished audit is stale by its tags ("" when it is not): another rule, a changed model file
    (as far as the version's `sha256` tag tells), or a comparison with another version than
    ``expected_baseline`` (a models:/ URI, "none" when there is nothing to replace; None: not checked)."""
    if tags.get(RULE_VERSION) != rule_version():
        was = tags.get(RULE_VERSION) or "none (a search or tldr audit, not every axis)"
        return f"audited under rule {was}; the rule is now {rule_version()}"
    if tags.get("sha256") and tags.get(SHA256) and tags["sha256"] != tags[SHA256]:
        return "the model's file changed after its audit"
    if expected_baseline is not None and tags.get(COMPARED_WITH, "none") != expected_baseline:
        return (f"compared with {tags.get(COMPARED_WITH, 'nothing')}, but it would now replace "
                f"{expected_baseline if expected_baseline != 'none' else 'nothing'}")
    return ""


def _file_sha(c, name: str, version: str) -> str:
    from tldr_core.platform.registry.models import download_checkpoint, sha256_file

    with tempfile.TemporaryDirectory(prefix="tldr-gate-") as tmp:
        path, _mv = download_checkpoint(c, f"models:/{name}/{version}", tmp)
        return sha256_file(path)


def gate_reasons(c, name: str, version: str, check_file: bool = True) -> list[str]:
    """Why ``version`` may not be promoted (empty: it may). ``check_file``: hash the model's file now."""
    from tldr_core.platform.registry.audits.compare_versions import baseline_version

    mv = tr.retry(lambda: c.get_model_version(name, version))
    tags = dict(mv.tags or {})
    if tags.get(STATUS) != "done" or not tags.get(RUN_ID):
        return [f"missing: version {version} has no finished audit (audit.status={tags.get(STATUS, 'none')}); "
                f"run `tldr reaudit` (or tag it reaudit=requested)"]
    base, _how = baseline_version(c, name, version)
    expected = f"models:/{name}/{base.version}" if base is not None else "none"
    reasons = []
    stale = stale_reason(tags, expected)
    if stale:
        reasons.append(f"stale: {stale}; run `tldr reaudit` (tag the version reaudit=requested)")
    if check_file and tags.get(SHA256):
        sha = _file_sha(c, name, version)
        if sha != tags[SHA256]:
            reasons.append(f"stale: the model's artifacts changed after the audit (audited {tags[SHA256][:12]}, now "
                           f"{sha[:12]})")
    if tags.get(REGRESSION) == "true":
        reasons.append(f"regressed against {tags.get(COMPARED_WITH, '?')} on {tags.get(REGRESSION_AXES) or '?'} "
                       f"(audit run {tags[RUN_ID]})")
    return reasons


def promote_version(c, name: str, version: str, *, force: bool = False, who: str | None = None,
                    say: Callable[[str], None] = print) -> GateResult:
    """Move `champion` to ``version`` if the gate allows it (or ``force``); tag the decision on the version."""
    try:
        mv = tr.retry(lambda: c.get_model_version(name, str(version)))
    except Exception as exc:  # noqa: BLE001 - MlflowException: no such version
        raise RegistryError(f"models:/{name}/{version}: no such registered model version "
                            f"({str(exc).splitlines()[0][:200]})") from None
    version = str(mv.version)
    cand = Candidate(name, version, "", "promotion")
    reasons = gate_reasons(c, name, version)
    if reasons and not force:
        set_version_tags(c, cand, {"promotion": f"refused at {now_iso()}: " + " | ".join(reasons)[:4000]})
        return GateResult(name, version, False, reasons)
    from tldr_core.platform.registry.models import alias_version

    with promotion_lock(c.tracking_uri):
        holder = alias_version(c, name, CHAMPION)
        tr.retry(lambda: c.set_registered_model_alias(name, CHAMPION, version))
    replaced = str(holder.version) if holder is not None and str(holder.version) != version else None
    what = f"promoted to {CHAMPION} at {now_iso()}" + (f", replacing version {replaced}" if replaced else "")
    tags = {"promotion": what + (" (forced over: " + " | ".join(reasons) + ")" if reasons else "")}
    if reasons:
        tags.update({"promotion.forced": "true", "promotion.forced_by": who or _user(),
                     "promotion.forced_at": now_iso(), "promotion.overridden": " | ".join(reasons)[:4000]})
    set_version_tags(c, cand, tags)
    return GateResult(name, version, True, reasons, forced=bool(reasons), replaced=replaced)


def _user() -> str:
    """Who forced a promotion: $TLDR_USER (e.g. a CI job's actor), else the login name."""
    try:
        return os.environ.get("TLDR_USER") or getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        return f"uid {os.getuid()}"
