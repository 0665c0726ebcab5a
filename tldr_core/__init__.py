"""tldr: audits image classifiers for training-data leakage (Training-Like Data Reconstruction).

Entry points: `python -m tldr_core.cli.audit` (one attack run), `python tune/search.py` (the search).
"""
__version__ = "0.1.0"
