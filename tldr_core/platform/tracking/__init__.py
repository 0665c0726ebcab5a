"""MLflow tracking for the platform: the store, its URIs, the runs of a search's trials, and the run of
an audit.

    store       the tracking store (URI check, client, retried logging, run tags, metric names, a report)
    uris        tracking URIs normalised (relative sqlite paths, postgresql drivers) and credentials redacted
    trial_runs  a trial's nested MLflow run; the trials of a search, summarised and ranked
    audit_run   an audit recorded in MLflow (`tldr audit --tracking-uri`)
"""
