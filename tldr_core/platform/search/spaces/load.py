"""Which search space a search runs: the packaged defaults (`spaces/*.yaml`, linked as `tune/space.yaml`
and `tune/kkt.yaml` in a checkout), a YAML file read and checked for the search's attack (`load_space`:
a TLDR space is `tldr_space`'s, a KKT space `kkt_space`'s), and the space fitted to the classifier
under audit (`fit_to_classifier`)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tldr_core.attack.config import ConfigError
from tldr_core.platform.search.spaces.specs import ATTACKS
from tldr_core.platform.search.spaces.tldr_space import SearchSpace, tldr_space_from_dict

# Search spaces ship inside the package (tune/space*.yaml are links to them), so an installed
# package finds its default without a checkout.
SPACES_DIR = Path(str(resources.files("tldr_core.platform.search.spaces")))
DEFAULT_SPACE = SPACES_DIR / "tldr.yaml"
#: Each attack's default space (tune/space.yaml, tune/kkt.yaml).
DEFAULT_SPACES = {"tldr": DEFAULT_SPACE, "kkt": SPACES_DIR / "kkt.yaml"}


def space_from_dict(data: Any, source: str = "<dict>", attack: str = "tldr") -> Any:
    """Validate a parsed space (`tldr_space`, or for attack="kkt" `kkt_space`); raises ConfigError
    naming the bad entry. Returns a SearchSpace (tldr) or a KKTSearchSpace (kkt)."""
    if attack == "kkt":
        from tldr_core.platform.search.spaces.kkt_space import kkt_space_from_dict  # the KKT attack: only when asked

        return kkt_space_from_dict(data, source)
    return tldr_space_from_dict(data, source, attack)


def load_space(path: str | Path | None = None, attack: str = "tldr") -> Any:
    """Read and validate a search-space YAML file (default: the attack's packaged space,
    `spaces/tldr.yaml` or `spaces/kkt.yaml`)."""
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; choose one of {ATTACKS}")
    path = Path(path) if path else DEFAULT_SPACES[attack]
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {path} is not valid YAML: {exc}") from None
    return space_from_dict(data, str(path), attack)


def has_batchnorm(model: Any) -> bool:
    """Whether `model` has BatchNorm layers with running statistics (what the bn prior matches)."""
    from torch import nn

    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


def fit_to_classifier(space: Any, model: Any) -> tuple[Any, str | None]:
    """The space to search against `model`, and a note when it had to change: a classifier without
    BatchNorm cannot take the bn prior (the loss would refuse it), so a searched `bn` is dropped
    (trials keep bn = 0) rather than spending trials on a parameter that can only fail."""
    if not isinstance(space, SearchSpace) or has_batchnorm(model):
        return space, None
    if float(space.fixed.get("bn", 0) or 0) > 0:
        raise ConfigError(f"search space {space.source}: fixed bn > 0 needs a classifier with BatchNorm layers, "
                          f"and {type(model).__name__} has none; set bn: 0 or search it")
    if "bn" not in space.params:
        return space, None
    params = {k: v for k, v in space.params.items() if k != "bn"}
    points = [{k: v for k, v in p.items() if k != "bn"} for p in space.initial_points]
    new = SearchSpace(space.weights, params, dict(space.fixed), points, space.source)
    return new, f"bn not searched: the classifier ({type(model).__name__}) has no BatchNorm layers; trials keep bn = 0"
