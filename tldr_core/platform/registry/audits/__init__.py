"""The registry's audits: every new classifier version audited, compared with the one it would replace,
and gated (docs/registry.md).

- ``reaudit``: the routine: pending versions -> a full audit each -> tags, comparison, history, gate.
- ``reaudit_cli``: its command line (``tldr reaudit``, ``tune/reaudit.py``).
- ``version_audit``: one version's audit (the same pipeline as ``tldr audit``), logged as one MLflow run.
- ``reaudit_search``: a version audited by a search (``--search``), pooled KKT candidates included.
- ``reaudit_runs``: finding and reading the audit runs of a version.
- ``compare_versions``: the paired comparison with the version a candidate would replace.
- ``gate``: what blocks a promotion (missing, stale or regressed audits) and --fail-on-regression.
- ``history``: each registered model's verdict axes over its versions, as charts in MLflow.
- ``audit_tags``: the ``audit.*`` tags written to a version (and read back).
"""
