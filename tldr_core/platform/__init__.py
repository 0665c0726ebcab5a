"""The platform layer: the Ray Tune + Optuna search, MLflow tracking and model registry, re-audit.
Needs the `platform` extra (ray[tune], optuna, mlflow, psycopg2-binary, requests).

    search/     the search: run(settings) -> search run id, its settings and command line, Ray and the
                Tuner, the trials, the summary; spaces/ (the YAML search spaces, packaged)
    tracking/   MLflow: the tracking store and its URIs, the trials' nested runs, an audit's run
    registry/   registered classifiers and generators, the champion, the pyfunc flavour, the re-audit
    cli_flags   the flags every command shares, and the help formatter showing every default
    probe       TCP reachability (a tracking server, a Ray cluster)

Imports go one way between modules (no circles: tests/test_layers.py); each sub-package's
docstring maps its modules.
"""
