"""The platform layer: the Ray Tune + Optuna search, MLflow tracking and model registry, re-audit.
Needs the `platform` extra (ray[tune], optuna, mlflow, psycopg2-binary, requests).

    search          run(settings) -> search run id; search_settings (SearchSettings, make_settings),
                    search_run (the driver's MLflow side), search_ray (Ray and the Tuner), search_cli
    tuning          the trial function Ray workers run; trial_kkt (the trial of a --attack kkt
                    search); trial_status (the driver's callback: how each trial's run ends)
    search_space    the YAML search space (space_specs parses its entries; kkt_space: a KKT search's
                    space; spaces/*.yaml ship here)
    tracking        MLflow helpers; trial_runs (a trial's nested run), search_summary (plots,
                    importances), probe (TCP reachability)
    registry        registered classifiers and generators, the champion rule; pyfunc (the MLflow flavour)
    reaudit         re-audit of registered classifiers (reaudit_cli: its command line)
    audit_tracking  an audit recorded in MLflow (`tldr audit --tracking-uri`)
    cli_flags       the flags every command shares, and the help formatter showing every default
"""
