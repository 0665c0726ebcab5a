"""The search spaces: which settings a search draws, read from YAML files a user can copy and edit.

    load        load_space / space_from_dict for either attack, the packaged defaults, fit_to_classifier
    tldr_space  SearchSpace: the TLDR loss weights and attack settings (Optuna define-by-run)
    kkt_space   KKTSearchSpace: the KKT attack's settings
    specs       one entry of a space file (weights, params), the attacks, helpers both spaces share
    *.yaml      the packaged spaces: tldr.yaml, tldr-refine.yaml, kkt.yaml (tune/*.yaml link here)
"""
