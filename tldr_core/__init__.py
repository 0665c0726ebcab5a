"""tldr: audits image classifiers for training-data leakage (Training-Like Data Reconstruction).

Layers, each importing only the ones before it:
  tldr_core.attack    the attacks (torch + yaml only): config, models, losses, train/generate, checkpoints
  tldr_core.scoring   SSIM, nearest-neighbour search, metrics, baselines, the risk rule
  tldr_core.report    pictures and the HTML report (renders results, computes nothing)
  tldr_core.platform  Ray Tune search, MLflow tracking and registry, re-audit (the `platform` extra)
  tldr_core.cli       command lines

Entry points: `python -m tldr_core.cli.audit` (one attack run), `python tune/search.py` (the search,
`tldr_core.platform.search.driver.run`), `python tune/reaudit.py` (re-audit of registered classifiers).
"""
__version__ = "0.1.0"
