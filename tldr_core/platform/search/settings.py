"""What defines a search (`SearchSettings`), checked on construction, and `make_settings`, which fills
in the defaults the way the command line does (`--smoke-test` shrinks them).

Messages name the command-line flag of a field (`--trials must be >= 1`): the fields are the flags.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tldr_core.attack.config import ConfigError
from tldr_core.attack.data import DATASETS
from tldr_core.platform.tracking import store as tr

#: What a search can maximise: the metric names every trial reports (docs/search.md, "The objective").
OBJECTIVES = ("quality", "coverage", "gap", "exposure_tpr", "exposure_auc")
#: --objective spellings that name another metric: `exposure` is the verdict's number, TPR at 1 % FPR.
OBJECTIVE_ALIASES = {"exposure": "exposure_tpr"}
#: The --objective choices (OBJECTIVES with the aliases in place of what they stand for).
OBJECTIVE_CHOICES = ("quality", "coverage", "gap", "exposure", "exposure_auc")
DEFAULT_OBJECTIVE = "quality"
ATTACKS = ("tldr", "kkt")
SCHEDULERS = ("asha", "fifo")
DEFAULT_STEPS = 400
DEFAULTS = {"trials": 8, "steps": DEFAULT_STEPS, "per_class": 20, "train_size": 1000, "classifier_epochs": 15}
SMOKE = {"trials": 2, "steps": 20, "per_class": 4, "train_size": 200, "classifier_epochs": 2}


class SearchError(RuntimeError):
    """A problem found before (or instead of) running the search; printed as one line."""


def log_every_for(eval_every: int) -> int:
    """The largest divisor of eval_every that is <= 25 (losses are logged on that grid)."""
    for d in range(min(25, eval_every), 0, -1):
        if eval_every % d == 0:
            return d
    return 1


@dataclass(frozen=True)
class SearchSettings:
    """Everything that defines a search; stored on its MLflow run (search/settings.json) so --resume
    can continue it. Build one with `make_settings`; invalid values raise ConfigError."""

    dataset: str
    train_size: int
    data_root: str | None
    download: bool
    trials: int
    max_concurrent: int
    cpus_per_trial: float
    gpus_per_trial: float
    steps: int
    eval_every: int
    log_every: int
    per_class: int
    eval_per_class: int
    tau: float
    objective: str
    seed: int
    experiment: str
    tracking_uri: str
    storage: str
    search_name: str
    classifier: str | None
    classifier_epochs: int
    space: dict[str, Any]
    space_source: str
    smoke_test: bool
    scheduler: str = "asha"
    attack: str = "tldr"  # the attack every trial runs (a default, so settings stored before it resume)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(self.dataset in DATASETS, f"unknown data set {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        for flag, v, lo in (("--trials", self.trials, 1), ("--steps", self.steps, 4), ("--per-class", self.per_class, 1),
                            ("--train-size", self.train_size, 2), ("--max-concurrent", self.max_concurrent, 1)):
            check(v >= lo, f"{flag} must be >= {lo}, got {v}")
        check(self.cpus_per_trial > 0 and self.gpus_per_trial >= 0,
              "--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        check(0 < self.tau <= 1, f"--tau must be in (0, 1], got {self.tau}")
        check(self.objective in OBJECTIVES, f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        check(self.attack in ATTACKS, f"--attack must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        check(self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        check(1 <= self.eval_every <= self.steps and self.eval_every % self.log_every == 0,
              f"eval_every ({self.eval_every}) must be in 1..steps and a multiple of log_every ({self.log_every})")
        check(1 <= self.eval_per_class <= self.per_class, f"eval_per_class must be in 1..{self.per_class}")


def _classifier(classifier: str | None) -> str | None:
    """A registry URI as given (its syntax checked) or an existing checkpoint file, made absolute."""
    if not classifier:
        return None
    if classifier.startswith("models:/"):
        from tldr_core.platform.registry.names import parse_models_uri

        parse_models_uri(classifier)
        return classifier
    if not Path(classifier).is_file():
        raise SearchError(f"--classifier {classifier}: no such file (or use models:/name@alias)")
    return str(Path(classifier).resolve())


def _max_concurrent(given: int | None, local: bool, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """--max-concurrent, else as many trials as this machine's cores (and GPUs) hold, else 8 on a cluster."""
    if given is not None:
        return given
    if not local:
        return 8
    cap = max(1, int((os.cpu_count() or 1) // cpus_per_trial)) if cpus_per_trial > 0 else 1
    if gpus_per_trial > 0:
        import torch

        cap = min(cap, int(torch.cuda.device_count() / gpus_per_trial))
    return max(1, cap)


def _check_local_gpus(local: bool, gpus_per_trial: float) -> None:
    if local and gpus_per_trial > 0:
        import torch

        if not torch.cuda.is_available():
            raise SearchError("--gpus-per-trial > 0 but this machine has no CUDA GPU (and no --address was given)")


def _storage(storage: str | None) -> str:
    storage = storage or str(tr.runs_dir() / "tune")
    return storage if "://" in storage else str(Path(storage).resolve())


def search_name() -> str:
    """search-<date>-<time>-<6 random hex digits>: two searches started in the same second get their own
    Ray Tune folder (and tuner.pkl) under --storage."""
    return f"search-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def make_settings(dataset: str = "mnist-bundled", *, train_size: int | None = None, data_root: str | None = None,
                  download: bool = False, classifier: str | None = None, trials: int | None = None,
                  steps: int | None = None, per_class: int | None = None, objective: str = DEFAULT_OBJECTIVE,
                  space: str | Path | None = None, scheduler: str = "asha", seed: int = 0, tau: float = 0.5,
                  smoke_test: bool = False, local: bool = True, max_concurrent: int | None = None,
                  cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, storage: str | None = None,
                  tracking_uri: str | None = None, experiment: str | None = None,
                  attack: str = "tldr") -> SearchSettings:
    """SearchSettings with the command line's defaults: None means the default (the --smoke-test one
    when smoke_test). `local`: Ray runs on this machine (no --address). `space`: a YAML file (default
    the attack's packaged space). `objective`: a metric of OBJECTIVES or an OBJECTIVE_ALIASES spelling
    (stored as the metric it names). `tracking_uri`: default $MLFLOW_TRACKING_URI, else the runs
    folder's sqlite. Raises ConfigError / SearchError / RegistryError with one clear message."""
    from tldr_core.platform.search.spaces.load import DEFAULT_SPACES, load_space

    if attack not in ATTACKS:
        raise ConfigError(f"--attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    base = SMOKE if smoke_test else DEFAULTS
    steps = steps if steps is not None else base["steps"]
    per_class = per_class if per_class is not None else base["per_class"]
    space_path = Path(space) if space else DEFAULT_SPACES[attack]
    loaded = load_space(space_path, attack)  # ConfigError names the bad entry
    classifier = _classifier(classifier)
    _check_local_gpus(local, gpus_per_trial)
    eval_every = max(1, steps // 4)
    return SearchSettings(
        dataset=dataset, train_size=train_size if train_size is not None else base["train_size"],
        data_root=data_root, download=download, trials=trials if trials is not None else base["trials"],
        max_concurrent=_max_concurrent(max_concurrent, local, cpus_per_trial, gpus_per_trial),
        cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial, steps=steps, eval_every=eval_every,
        log_every=log_every_for(eval_every), per_class=per_class, eval_per_class=max(1, min(per_class, 10)),
        tau=tau, objective=OBJECTIVE_ALIASES.get(objective, objective), seed=seed, experiment=experiment or f"tldr-{dataset}",
        tracking_uri=tr.normalize_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")),
        storage=_storage(storage), search_name=search_name(),
        classifier=classifier, classifier_epochs=base["classifier_epochs"], space=loaded.as_dict(),
        space_source=str(space_path.resolve()), smoke_test=smoke_test, scheduler=scheduler, attack=attack)
