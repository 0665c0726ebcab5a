"""The MLflow model registry side of the platform: the audited classifiers, the searches' generators,
the champion, and the re-audit of registered classifiers.

    names        registered model names (tldr-classifier-/tldr-generator-<dataset>), models:/ URIs, RegistryError
    models       a checkpoint logged as a pyfunc model; a classifier registered; a version loaded weights-only
    pyfunc       the MLflow pyfunc flavour of tldr models (the `loader_module` of every logged model)
    champion     the champion rule, decided and set under a lock
    promotion    a search's best generator registered, and made champion when it beats the champion
    cli          `tldr registry promote|show`
    audit_tags   a classifier version's audit.* tags (every axis, the comparison, the rule version); a
                 finished search recorded as its audit
    reaudit      re-audit of registered classifiers without a recent, current audit (`tune/reaudit.py`)
    reaudit_cli  its command line (`tldr reaudit`, with --fail-on-regression / --fail-on)
    version_audit  one version audited as `tldr audit` audits (every attack that applies, membership)
    reaudit_search the search a re-audit runs with --search (warm-started from the champion generator)
    compare_versions  the version it would replace, its audit read back, the paired comparison
    reaudit_runs the re-audit's MLflow runs: one per version audit, one history run per model
    history      a model's history rows (verdict axes over versions) and its history run brought up to date
    gate         the promotion gate of `tldr registry promote NAME VERSION` (missing, stale, regressed; --force)
"""


def _load_pyfunc(data_path: str):
    """The loader of models logged while `tldr_core.platform.registry` (then a module) was their
    `loader_module`; models name `pyfunc` now."""
    from tldr_core.platform.registry.pyfunc import _load_pyfunc as load

    return load(data_path)
