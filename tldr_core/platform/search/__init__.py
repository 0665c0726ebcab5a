"""The Ray Tune + Optuna search over an attack's settings, every trial a nested MLflow run.

    driver        run(settings) -> search run id: the search from start to end (tune/search.py)
    settings      SearchSettings, make_settings: a search's checked settings
    cli           the command line (`tldr search`, `python tune/search.py`)
    parent_run    the search's own MLflow run: data, classifier, baselines, what every trial shares; --resume
    tuner         Ray: the cluster address, ray.init, the Tuner (Optuna TPE, ASHA), a saved Tuner restored
    trial         run_trial: the function Ray workers run (the TLDR trial, scoring, artifacts, generator)
    trial_kkt     the trial of a --attack kkt search
    trial_inputs  TrialInputs and the steps both trials share (device, classifier, progress reports)
    trial_status  the driver's Ray callback: how each trial's run ends, one line per trial
    summary       the search's summary: best trial, plots, parameter importances
    pooled        a KKT search's pooled result: every trial's candidates scored as one set (pooled_result)
    spaces/       the YAML search spaces (packaged: spaces/*.yaml)
"""
